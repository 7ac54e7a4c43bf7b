//! `lockstep up`, `lockstep client` and `lockstep testbed` as a user runs
//! them: the deployment on its own namespaces, the printed command that
//! reaches the guest, a failover and re-protection, and nothing left behind.
//! Needs root, /dev/kvm, iproute2 and redis-tools (installed by .ci/run).

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .output()
        .expect("run lockstep")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn namespaces() -> String {
    text(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
}

/// Waits for a line of `up`'s stderr containing `what`; returns it.
fn line_with(lines: &mpsc::Receiver<String>, what: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(what) {
                    return line;
                }
            }
            Err(_) => panic!(
                "`{what}` never came; lockstep up said:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// `lockstep client --run RUN -- redis-cli -h GUEST ARGS…`, retried until
/// it answers (a cut-over may be under way).
fn redis(run: &str, guest: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = vec!["client", "--run", run, "--", "redis-cli", "-h", guest];
        all.extend_from_slice(args);
        let output = lockstep(&all);
        let reply = text(&output.stdout).trim().to_string();
        if output.status.success() && !reply.is_empty() && !reply.contains("rror") {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "redis-cli never answered: {reply} {}",
            text(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn up_serves_the_printed_command_fails_over_reprotects_and_cleans_up() {
    let mut up = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["up", "--log-link", "1gbit"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lockstep up");
    let stderr = up.stderr.take().expect("stderr");
    let (send, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let banner = line_with(&lines, "lockstep up: testbed ", &mut seen);
    let words: Vec<&str> = banner.split_whitespace().collect();
    let run = words[3].trim_end_matches(':').to_string();
    let pid_after = |what: &str| -> i32 {
        let at = words
            .windows(2)
            .position(|w| w[0] == what)
            .unwrap_or_else(|| panic!("no {what} in {banner}"));
        words[at + 4]
            .trim_end_matches([')', ',', ';'])
            .parse()
            .expect("pid")
    };
    let primary = pid_after("primary");
    // The exact command it prints reaches the guest.
    let printed = line_with(&lines, "redis-cli -h", &mut seen);
    let printed: Vec<&str> = printed.split_whitespace().collect();
    assert_eq!(&printed[..3], ["ip", "netns", "exec"], "{printed:?}");
    assert_eq!(printed[3], format!("lst-{run}-client"));
    let guest = printed[6].to_string();
    let output = Command::new(printed[0])
        .args(&printed[1..])
        .output()
        .expect("the printed command");
    assert_eq!(text(&output.stdout).trim(), "1", "{}", text(&output.stderr));
    assert_eq!(redis(&run, &guest, &["incr", "counter"]), "2");
    // The testbed is the deployment's: shaped as asked, the guest behind a.
    let status = text(&lockstep(&["testbed", "status", &run]).stdout);
    assert!(status.contains("link log      a log0 up 1Gbit"), "{status}");
    assert!(status.contains("guest MAC on port a0"), "{status}");

    // Kill the primary: the backup in host b goes live, and a new backup
    // joins it from host a.
    // SAFETY: kill(2) with a pid lockstep up reported for its child.
    unsafe { libc::kill(primary, libc::SIGKILL) };
    assert_eq!(redis(&run, &guest, &["incr", "counter"]), "3");
    line_with(&lines, "protected again", &mut seen);
    let status = text(&lockstep(&["testbed", "status", &run]).stdout);
    assert!(status.contains("guest MAC on port b0"), "{status}");
    assert_eq!(redis(&run, &guest, &["get", "counter"]), "3");

    // Ctrl-C: everything stops and the namespaces go.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(up.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while up.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "lockstep up did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !namespaces().contains(&format!("lst-{run}-")),
        "up left its namespaces"
    );
    let after = lockstep(&["client", "--run", &run, "--", "true"]);
    assert!(!after.status.success());
    assert!(
        text(&after.stderr).contains(&format!("no testbed {run}")),
        "{}",
        text(&after.stderr)
    );
}

#[test]
fn testbed_up_stays_until_down_and_cuts_links_by_name() {
    let output = lockstep(&["testbed", "up", "--client-link", "1gbit"]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    let run = stdout
        .split_whitespace()
        .nth(1)
        .expect("testbed N")
        .to_string();
    assert!(
        stdout.contains(&format!("ip netns exec lst-{run}-a lockstep run")),
        "{stdout}"
    );
    assert!(
        stdout.contains("link client-a a up0 up 1Gbit | client a0 up 1Gbit"),
        "{stdout}"
    );
    // It outlives the command that made it.
    assert!(namespaces().contains(&format!("lst-{run}-client")));
    let cut = lockstep(&["testbed", "cut", "log", "--run", &run]);
    assert!(cut.status.success(), "{}", text(&cut.stderr));
    let status = text(&lockstep(&["testbed", "status", &run]).stdout);
    assert!(status.contains("a log0 CUT"), "{status}");
    let shaped = lockstep(&["testbed", "shape", "log", "10gbit", "--run", &run]);
    assert!(shaped.status.success(), "{}", text(&shaped.stderr));
    let restored = lockstep(&["testbed", "restore", "log", "--run", &run]);
    assert!(restored.status.success(), "{}", text(&restored.stderr));
    let status = text(&lockstep(&["testbed", "status", &run]).stdout);
    assert!(status.contains("a log0 up 10Gbit"), "{status}");
    let bad = lockstep(&["testbed", "cut", "nosuch", "--run", &run]);
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("is not a link"),
        "{}",
        text(&bad.stderr)
    );
    // A client command runs in its client namespace.
    let inside = lockstep(&[
        "client", "--run", &run, "--", "ip", "-o", "-4", "addr", "show", "dev", "sw0",
    ]);
    assert!(
        text(&inside.stdout).contains(" sw0 "),
        "{}",
        text(&inside.stderr)
    );
    let down = lockstep(&["testbed", "down", &run]);
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(!namespaces().contains(&format!("lst-{run}-")));
    let again = lockstep(&["testbed", "down", &run]);
    assert!(!again.status.success());
}
