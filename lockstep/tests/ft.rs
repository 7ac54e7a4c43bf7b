//! Fault tolerance on: a primary in host a and a backup in host b of a
//! testbed of namespaces, the log over the logging link, the guest serving
//! real clients in the client namespace through a real TAP, the Output Rule
//! enforced by the output gate. Needs root, /dev/kvm, /dev/net/tun,
//! iproute2 and redis-tools (installed by .ci/run).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Net, Ns, command, stop};

/// A backup in host b listening on the logging link, then a primary in host
/// a serving the guest; both publish their status in `status_dir`.
fn start_pair(net: &Net, status_dir: &str) -> (Child, Child) {
    std::fs::create_dir_all(status_dir).expect("status dir");
    let key = common::keygen(std::path::Path::new(status_dir), "link.key");
    let key = key.to_str().expect("utf-8 path").to_string();
    // No arbiter here: a peer declared lost would stop the pair, so give
    // a loaded CI host (and the SIGSTOP below) plenty of time.
    let both = ["--peer-timeout-ms", "20000", "--status-dir", status_dir];
    let both = [&both[..], &["--link-key", &key]].concat();
    net.start_pair(&both, &["--quiet"], &["--digest-interval", "300"])
}

/// A status directory of the test's own.
fn status_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("status").to_string_lossy().into_owned();
    (dir, path)
}

fn finish(primary: Child, backup: Child) -> (String, String) {
    let primary = stop(primary);
    let backup = backup.wait_with_output().expect("backup");
    let primary_err = String::from_utf8_lossy(&primary.stderr).into_owned();
    let backup_out = String::from_utf8_lossy(&backup.stdout).into_owned();
    assert!(
        backup.status.success(),
        "backup failed: {backup_out}{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    (primary_err, backup_out)
}

#[test]
fn ft_on_serves_redis_benchmark_and_every_acknowledged_incr_counts() {
    let net = Net::new();
    let (_dir, status) = status_dir();
    let (primary, backup) = start_pair(&net, &status);

    let mut stream = net.connect(6379);
    let increments = 400;
    for expected in 1..=increments {
        assert_eq!(
            command(&mut stream, &["INCR", "ft"]),
            format!(":{expected}")
        );
    }
    assert_eq!(command(&mut stream, &["GET", "ft"]), increments.to_string());
    drop(stream);

    // `lockstep status` shows both replicas, their roles and figures.
    std::thread::sleep(Duration::from_millis(600));
    let status = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["status", "--dir", &status])
        .output()
        .expect("lockstep status");
    let status = String::from_utf8_lossy(&status.stdout);
    for expected in [
        "== primary: updated",
        "role: primary",
        "protection: protected (backup following)",
        "held outputs:",
        "== backup: updated",
        "role: backup (following the primary)",
        "lag (exits):",
    ] {
        assert!(
            status.contains(expected),
            "`{expected}` missing from:\n{status}"
        );
    }

    net.redis_benchmark_passes();

    let (primary_err, backup_out) = finish(primary, backup);
    assert!(
        primary_err.contains("(everything)"),
        "the backup acknowledged every entry: {primary_err}"
    );
    assert!(
        primary_err.contains("output gate released"),
        "{primary_err}"
    );
    let summary = backup_out.lines().last().expect("backup summary");
    assert!(summary.starts_with("backup:"), "{summary}");
    let (matched, taken) = common::digests(summary);
    assert_eq!(
        matched, taken,
        "primary's and backup's digests match at the same exits: {summary}"
    );
    assert!(matched >= 2, "{summary}");
}

fn wait_until_stopped(pid: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
        let all_stopped = tasks.filter_map(Result::ok).all(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit(')')
                .next()
                .map(str::trim_start)
                .is_some_and(|rest| rest.starts_with('T'))
        });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backup did not stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn output_waits_for_the_backups_ack() {
    let net = Net::new();
    let (_dir, status) = status_dir();
    let (primary, backup) = start_pair(&net, &status);
    let mut stream = net.connect(6379);
    assert_eq!(command(&mut stream, &["PING"]), "+PONG");

    // Freeze the backup: it can no longer acknowledge anything.
    let pid = backup.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // SIGSTOP takes effect only once one of its threads dequeues it: wait
    // until every thread of the backup is stopped.
    wait_until_stopped(&pid);
    stream
        .write_all(b"*2\r\n$4\r\nINCR\r\n$4\r\nheld\r\n")
        .expect("send");
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let mut reply = [0u8; 16];
    let early = stream.read(&mut reply);
    assert!(
        matches!(&early, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "the reply must be held while the backup cannot ack it, got {early:?}"
    );
    // Thaw it: the ack arrives and releases the reply.
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let count = stream.read(&mut reply).expect("the reply after the ack");
    assert_eq!(&reply[..count], b":1\r\n");
    drop(stream);
    let (primary_err, backup_out) = finish(primary, backup);
    assert!(primary_err.contains("(everything)"), "{primary_err}");
    assert!(backup_out.starts_with("backup: "), "{backup_out}");
}

/// Runs `fold` as primary (host a) and backup (host b) over `transport`
/// with the given link keys; returns both outputs (primary's stderr,
/// backup's stdout+stderr).
fn fold_pair(
    net: &Net,
    transport: &str,
    address: &str,
    keys: [&std::path::Path; 2],
    status_dir: &str,
) -> (String, String) {
    let backup = net
        .lockstep(Ns::B)
        .args([
            "backup",
            "--quiet",
            "--transport",
            transport,
            "--listen",
            address,
        ])
        .arg("--link-key")
        .arg(keys[1])
        .args(["--status-dir", status_dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backup");
    std::thread::sleep(Duration::from_millis(300));
    let primary = net
        .lockstep(Ns::A)
        .args([
            "primary",
            "--quiet",
            "--guest",
            "fold",
            "--transport",
            transport,
        ])
        .args(["--backup", address, "--digest-interval", "500"])
        .arg("--link-key")
        .arg(keys[0])
        .args(["--status-dir", status_dir])
        .stdin(Stdio::null())
        .output()
        .expect("run the primary");
    let mut backup = backup;
    if !primary.status.success() {
        // A refused primary leaves the backup listening for the real one.
        std::thread::sleep(Duration::from_millis(500));
        let _ = backup.kill();
    }
    let backup = backup.wait_with_output().expect("backup");
    (
        String::from_utf8_lossy(&primary.stderr).into_owned(),
        String::from_utf8_lossy(&backup.stdout).into_owned()
            + &String::from_utf8_lossy(&backup.stderr),
    )
}

#[test]
fn the_log_streams_over_shared_memory_and_a_wrong_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key");
    let other = dir.path().join("other");
    std::fs::write(&key, "the right key, at least 32 bytes long").expect("key");
    std::fs::write(&other, "another key, also 32 bytes or more").expect("key");
    let socket = dir.path().join("link.sock");
    let socket = socket.to_str().expect("utf-8 path");
    let status = dir.path().join("status");
    let status = status.to_str().expect("utf-8 path");

    // The unix socket path works across the hosts' network namespaces:
    // they share the filesystem (shm is the same-host transport).
    let net = Net::new();
    let (primary, backup) = fold_pair(&net, "shm", socket, [&key, &key], status);
    assert!(primary.contains("over shm"), "{primary}");
    assert!(primary.contains("(everything)"), "{primary}");
    let summary = backup
        .lines()
        .find(|line| line.starts_with("backup:"))
        .unwrap_or_else(|| panic!("no backup summary in {backup}"));
    let (matched, taken) = common::digests(summary);
    assert_eq!(matched, taken, "{summary}");
    assert!(matched >= 5, "{summary}");

    // Same over io_uring TCP across the logging link, but the primary
    // proves another key.
    let link = net.log_address(Ns::B, 7700);
    let (primary, backup) = fold_pair(&net, "tcp", &link, [&other, &key], status);
    assert!(
        primary.contains("wrong key") || primary.contains("rejected"),
        "{primary}"
    );
    assert!(backup.contains("refused a connection"), "{backup}");
    assert!(backup.contains("wrong key"), "{backup}");
}
