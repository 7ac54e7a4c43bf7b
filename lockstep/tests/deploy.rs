//! Deployment: config files, keys, metrics and a two-host run as an
//! operator would start it, through the real `lockstep` binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .output()
        .expect("start lockstep")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn keygen_writes_a_private_32_byte_key_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::keygen(dir.path(), "link.key");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let hex = std::fs::read_to_string(&key).expect("read");
    assert_eq!(hex.trim().len(), 64, "{hex:?}");
    assert!(hex.trim().bytes().all(|b| b.is_ascii_hexdigit()), "{hex:?}");
    let again = lockstep(&["keygen", path_str(&key)]);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&key).expect("read"), hex);
}

#[test]
fn config_check_accepts_a_good_file_and_names_the_key_and_line_of_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::keygen(dir.path(), "link.key");
    let good = dir.path().join("primary.toml");
    std::fs::write(
        &good,
        format!(
            "role = \"primary\"\nmetrics = \"127.0.0.1:9400\"\n\n[replica]\nid = \"host-a\"\nlink_key = \"{}\"\narbiter = \"etcd://10.0.0.5:2379,10.0.0.6:2379\"\n\n[guest]\nname = \"net\"\n\n[primary]\nbackup = \"10.1.0.2:7700\"\n",
            key.display()
        ),
    )
    .expect("write");
    let output = lockstep(&["config", "check", path_str(&good)]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("valid config file for `lockstep primary`"),
        "{}",
        text(&output.stdout)
    );

    let cases = [
        // (file text, what the error must name)
        (
            "role = \"backup\"\n[replica]\nlink_key = \"K\"\npeer_timeout = 5\n".to_string(),
            vec!["line 4", "peer_timeout"],
        ),
        (
            "role = \"backup\"\n[replica]\nlink_key = \"K\"\ntransport = \"udp\"\n".to_string(),
            vec!["line 4", "replica.transport", "udp"],
        ),
        (
            "role = \"backup\"\n[replica]\nlink_key = \"/nonexistent/key\"\n".to_string(),
            vec!["line 3", "replica.link_key", "/nonexistent/key"],
        ),
        (
            "role = \"primary\"\n[replica]\nlink_key = \"K\"\n[guest]\nname = \"nosuch\"\n"
                .to_string(),
            vec!["line 5", "guest.name", "nosuch"],
        ),
        (
            "role = \"backup\"\n[replica]\nlink_key = \"K\"\n[guest]\nmem_mib = 4\n".to_string(),
            vec!["line 5", "guest.mem_mib"],
        ),
    ];
    for (body, expected) in cases {
        let body = body.replace("\"K\"", &format!("\"{}\"", key.display()));
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, &body).expect("write");
        let output = lockstep(&["config", "check", path_str(&file)]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{body}\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for what in expected {
            assert!(stderr.contains(what), "{body}: no {what:?} in {stderr}");
        }
    }
}

#[test]
fn a_replica_takes_its_settings_from_the_file_and_flags_override_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::keygen(dir.path(), "link.key");
    let file = dir.path().join("backup.toml");
    // An address nobody can listen on: the error shows which one was used.
    std::fs::write(
        &file,
        format!(
            "role = \"backup\"\n[replica]\nlink_key = \"{}\"\nstatus_dir = \"{}\"\n[backup]\nlisten = \"203.0.113.77:7700\"\n",
            key.display(),
            dir.path().join("status").display()
        ),
    )
    .expect("write");
    let output = lockstep(&["backup", "--config", path_str(&file)]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("listen on 203.0.113.77:7700"), "{stderr}");

    let output = lockstep(&[
        "backup",
        "--config",
        path_str(&file),
        "--listen",
        "203.0.113.78:7701",
    ]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("listen on 203.0.113.78:7701"), "{stderr}");

    // A backup's file given to a primary is refused before anything starts.
    let output = lockstep(&["primary", "--config", path_str(&file)]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 1") && stderr.contains("not `lockstep primary`"),
        "{stderr}"
    );
}

/// `GET /metrics` from inside namespace `ns` (the endpoint is served in the
/// replica's own namespace): the body, or why not.
fn scrape(net: &common::Net, ns: common::Ns, address: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let target = address.parse().map_err(|e| format!("{address}: {e}"))?;
    let mut stream = net
        .bed
        .connect(ns, target, std::time::Duration::from_secs(2))
        .map_err(|e| format!("connect {address}: {e}"))?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: replica\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP reply: {reply:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.to_string());
    }
    Ok(body.to_string())
}

/// The value of the unlabelled sample `name` in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
}

/// Scrapes until `check` holds on the exposition (or 30 s pass).
fn scrape_until(
    net: &common::Net,
    ns: common::Ns,
    address: &str,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        match scrape(net, ns, address) {
            Ok(text) if check(&text) => return text,
            Ok(text) => last = text,
            Err(error) => last = error,
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("{what}: not seen at {address} in 30 s; last scrape:\n{last}");
}

/// `promtool check metrics` (Debian's `prometheus`) on `text`: `None` when
/// promtool is not installed (then the caller says `skipped`, unless
/// LOCKSTEP_REQUIRE_PROMTOOL=1, which .ci/run sets, makes it a failure).
fn promtool_check(text: &str) -> Option<Result<(), String>> {
    use std::io::Write;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("LOCKSTEP_REQUIRE_PROMTOOL").as_deref() != Ok("1"),
                "LOCKSTEP_REQUIRE_PROMTOOL=1 but promtool is not installed (Debian package prometheus)"
            );
            return None;
        }
        Err(error) => panic!("cannot run promtool: {error}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool");
    Some(if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            text_of(&output.stdout),
            text_of(&output.stderr)
        ))
    })
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A three-member etcd cluster (Debian's etcd-server) in the testbed's
/// arbiter namespace: member `i` serves clients on the management network
/// at port 2379 + 100 i and its peers on the namespace's loopback. Returns
/// the members and the client endpoints, once the cluster answers from
/// host a.
fn etcd_cluster(net: &common::Net, dir: &Path) -> (Vec<std::process::Child>, Vec<String>) {
    use common::Ns;
    let arbiter = net.bed.addresses().arbiter;
    let peer = |i: u16| format!("http://127.0.0.1:{}", 2380 + 100 * i);
    let cluster = (0..3)
        .map(|i| format!("m{i}={}", peer(i)))
        .collect::<Vec<_>>()
        .join(",");
    let endpoints: Vec<String> = (0..3)
        .map(|i| format!("{arbiter}:{}", 2379 + 100 * i))
        .collect();
    let members = (0..3u16)
        .map(|i| {
            let client = format!("http://{}", endpoints[usize::from(i)]);
            net.bed
                .command(Ns::Arbiter, "etcd")
                .expect("arbiter namespace")
                .arg(format!("--name=m{i}"))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("etcd-{i}")).display()
                ))
                .arg(format!("--listen-client-urls={client}"))
                .arg(format!("--advertise-client-urls={client}"))
                .arg(format!("--listen-peer-urls={}", peer(i)))
                .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
                .arg(format!("--initial-cluster={cluster}"))
                .arg("--initial-cluster-state=new")
                .arg(format!("--initial-cluster-token={}", net.bed.run_id()))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start etcd (Debian's etcd-server)")
        })
        .collect();
    // Every member answers, asked from host a as the replicas will.
    for endpoint in &endpoints {
        let etcd =
            arbiter::EtcdArbiter::new(&[endpoint.as_str()], std::time::Duration::from_secs(2))
                .expect("endpoint");
        net.bed
            .run_in(Ns::A, || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                while arbiter::Arbiter::read(&etcd, 999).is_err() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "etcd member {endpoint} did not become ready"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .expect("host a");
    }
    (members, endpoints)
}

/// Two hosts started as an operator would, from one config file each
/// (`lockstep backup --config` in host b, `lockstep primary --config` in
/// host a, not through `up`), with a three-member etcd cluster as the
/// authority: both metrics endpoints are scraped in their namespaces, the
/// primary's passes `promtool check metrics`, `lockstep status --json`
/// reports the same figures; then one etcd member (the first endpoint
/// both replicas name) is killed and the primary SIGKILLed: the survivor
/// wins the next generation from the remaining quorum, and its metrics
/// report the new role and generation.
#[test]
fn two_hosts_from_config_files_report_metrics_and_the_failover() {
    use common::Ns;
    let net = common::Net::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::keygen(dir.path(), "pair.key");
    let (mut members, endpoints) = etcd_cluster(&net, dir.path());
    let arbiter_address = format!("etcd://{}", endpoints.join(","));
    let link = net.log_address(Ns::B, 7700);
    let metrics_a = net.log_address(Ns::A, 9400);
    let metrics_b = net.log_address(Ns::B, 9400);
    let status = dir.path().join("status");
    let replica_section = |id: &str| {
        format!(
            "[replica]\nid = \"{id}\"\nvm_id = 1\narbiter = \"{arbiter_address}\"\nlink_key = \"{}\"\npeer_timeout_ms = 1500\nstatus_dir = \"{}\"\n",
            key.display(),
            status.display()
        )
    };
    let backup_file = dir.path().join("backup.toml");
    std::fs::write(
        &backup_file,
        format!(
            "role = \"backup\"\nmetrics = \"{metrics_b}\"\n\n{}\n[guest]\ntap = \"{}\"\nquiet = true\n\n[backup]\nlisten = \"{link}\"\n",
            replica_section("host-b"),
            net.tap()
        ),
    )
    .expect("write");
    let primary_file = dir.path().join("primary.toml");
    std::fs::write(
        &primary_file,
        format!(
            "role = \"primary\"\nmetrics = \"{metrics_a}\"\n\n{}\n[guest]\nname = \"net\"\narg = {}\ntap = \"{}\"\nmem_mib = 32\n\n[primary]\nbackup = \"{link}\"\nbackup_id = \"host-b\"\n",
            replica_section("host-a"),
            net.guest_arg(),
            net.tap()
        ),
    )
    .expect("write");
    for file in [&backup_file, &primary_file] {
        let check = lockstep(&["config", "check", path_str(file)]);
        assert!(check.status.success(), "{}", text_of(&check.stderr));
    }
    let mut backup = net
        .lockstep(Ns::B)
        .arg("backup")
        .arg("--config")
        .arg(&backup_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the backup");
    scrape_until(&net, Ns::B, &metrics_b, "the backup's endpoint", |t| {
        t.contains("lockstep_role{role=\"backup\"} 1")
    });
    let mut primary = net.start(Ns::A, &["primary", "--config", path_str(&primary_file)]);

    // The pair runs: the guest answers, the primary's figures move.
    let mut client = net.connect(6379);
    for _ in 0..20 {
        assert!(common::command(&mut client, &["incr", "counter"]).starts_with(':'));
    }
    let primary_text = scrape_until(&net, Ns::A, &metrics_a, "a protected primary", |t| {
        t.contains("lockstep_role{role=\"primary\"} 1")
            && sample(t, "lockstep_protected") == Some(1.0)
            && sample(t, "lockstep_acked_position").is_some_and(|v| v > 0.0)
            && sample(t, "lockstep_held_output_seconds_count").is_some_and(|v| v > 0.0)
    });
    let generation = sample(&primary_text, "lockstep_generation").expect("generation");
    assert!(generation >= 1.0, "{primary_text}");
    match promtool_check(&primary_text) {
        Some(Ok(())) => {}
        Some(Err(complaint)) => {
            panic!(
                "promtool check metrics refused the primary's metrics:\n{complaint}\n{primary_text}"
            )
        }
        None => eprintln!(
            "SKIPPED: promtool check metrics (promtool not installed: Debian package prometheus)"
        ),
    }
    let backup_text = scrape_until(&net, Ns::B, &metrics_b, "a following backup", |t| {
        sample(t, "lockstep_log_position").is_some_and(|v| v > 0.0)
    });
    assert!(
        backup_text.contains("lockstep_role{role=\"backup\"} 1"),
        "{backup_text}"
    );
    assert_eq!(
        sample(&backup_text, "lockstep_generation"),
        Some(generation)
    );
    let json = lockstep(&["status", "--json", "--dir", path_str(&status)]);
    assert!(json.status.success(), "{}", text_of(&json.stderr));
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status --json");
    let replicas = json.as_array().expect("a list");
    let of = |id: &str| {
        replicas
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {json}"))["figures"]
            .clone()
    };
    assert_eq!(of("host-a")["role"], "primary", "{json}");
    assert_eq!(
        of("host-a")["generation"].as_f64(),
        Some(generation),
        "{json}"
    );
    assert_eq!(of("host-b")["role"], "backup", "{json}");

    // One etcd member gone (the first endpoint in both files): the other
    // two are a quorum. Then SIGKILL the primary: the backup wins
    // generation g+1 and says so.
    members[0].kill().expect("kill etcd member 0");
    let _ = members[0].wait();
    primary.kill().expect("kill the primary");
    let _ = primary.wait();
    let live = scrape_until(&net, Ns::B, &metrics_b, "the survivor live", |t| {
        t.contains("lockstep_role{role=\"live\"} 1")
    });
    assert_eq!(
        sample(&live, "lockstep_generation"),
        Some(generation + 1.0),
        "{live}"
    );
    assert_eq!(
        sample(&live, "lockstep_failovers_total"),
        Some(1.0),
        "{live}"
    );
    assert_eq!(
        sample(&live, "lockstep_peer_silences_total"),
        Some(1.0),
        "{live}"
    );
    // The survivor serves the guest's state: the counter carries on.
    let mut client = net.connect(6379);
    let after = common::command(&mut client, &["incr", "counter"]);
    assert_eq!(after, ":21", "the survivor lost acknowledged INCRs");
    let _ = backup.kill();
    let _ = backup.wait();
    for member in &mut members {
        let _ = member.kill();
        let _ = member.wait();
    }
}

#[test]
fn logs_are_json_lines_with_log_format_json_and_rust_log_filters_them() {
    let run = |format: &str, filter: &str| {
        Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args(["--log-format", format, "run", "--guest", "fold"])
            .args(["--arg", "10", "--quiet"])
            .env("RUST_LOG", filter)
            .output()
            .expect("start lockstep")
    };
    let output = run("json", "info");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(value["timestamp"].is_string(), "{line}");
        assert_eq!(value["level"], "INFO", "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("guest fold exited with code 0")),
        "{stderr}"
    );
    // Text on a pipe is the bare sentence, as before structured logs.
    let output = run("text", "info");
    assert!(
        text(&output.stderr).starts_with("lockstep: guest fold exited with code 0"),
        "{}",
        text(&output.stderr)
    );
    // RUST_LOG=warn drops the info lines.
    let output = run("text", "warn");
    assert!(output.status.success());
    assert_eq!(text(&output.stderr), "", "RUST_LOG=warn printed info lines");
    // Errors are logged at error level.
    let output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "--log-format",
            "json",
            "replay",
            "--log",
            "/nonexistent.log",
        ])
        .output()
        .expect("start lockstep");
    assert_eq!(output.status.code(), Some(1));
    let value: serde_json::Value =
        serde_json::from_str(text(&output.stderr).trim()).expect("one JSON line");
    assert_eq!(value["level"], "ERROR");
    assert!(
        value["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot open the log file /nonexistent.log")),
        "{value}"
    );
}

/// The repository's `deploy/` directory.
fn deploy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The values of `key=` in a unit file.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_replica_units_cannot_restart_into_a_takeover() {
    for name in ["lockstep-primary.service", "lockstep-backup.service"] {
        let unit = std::fs::read_to_string(deploy_dir().join(name)).expect("unit file");
        let one = |key: &str| {
            let values = unit_values(&unit, key);
            assert_eq!(values.len(), 1, "{name}: {key}= {values:?}");
            values[0].clone()
        };
        assert_eq!(one("LimitMEMLOCK"), "infinity", "{name}");
        assert_eq!(one("KillMode"), "mixed", "{name}");
        assert_eq!(one("KillSignal"), "SIGTERM", "{name}");
        // Only start-up failures are retried; a halted replica (lost the
        // arbiter, or the VM is recorded already) is never restarted.
        assert_eq!(one("Restart"), "on-failure", "{name}");
        assert_eq!(
            one("RestartPreventExitStatus"),
            replica::failover::EXIT_HALTED.to_string(),
            "{name}"
        );
        let start = one("ExecStart");
        assert!(start.contains("--config /etc/lockstep/"), "{name}: {start}");
        assert!(
            !unit
                .lines()
                .any(|l| !l.starts_with('#') && l.contains("--supersede-generation")),
            "{name}: a unit must never supersede a pair"
        );
    }
}

#[test]
fn the_example_config_files_pass_config_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::keygen(dir.path(), "link.key");
    for name in ["primary.toml", "backup.toml"] {
        let text = std::fs::read_to_string(deploy_dir().join(name)).expect("example");
        assert!(text.contains("/etc/lockstep/link.key"), "{name}");
        let copy = dir.path().join(name);
        std::fs::write(
            &copy,
            text.replace("/etc/lockstep/link.key", path_str(&key)),
        )
        .expect("write");
        let output = lockstep(&["config", "check", path_str(&copy)]);
        assert!(
            output.status.success(),
            "{name}: {}",
            text_of(&output.stderr)
        );
    }
}
