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

/// The authority of a two-host test: a three-member etcd cluster, one
/// member per extra testbed host (`testbed::etcd`), optionally over TLS
/// with client certificates and an etcd login.
struct Authority {
    cluster: testbed::etcd::Cluster,
    /// What the replicas' `[arbiter]` section holds.
    security: arbiter::EtcdSecurity,
}

impl Authority {
    /// Starts the members and waits until each answers from host a (as the
    /// replicas will ask). With `tls`: certificates made here (`openssl`),
    /// HTTPS with `--client-cert-auth`, and auth on with a user `lockstep`
    /// (password in a 0600 file) allowed under `/lockstep` only.
    fn start(net: &common::Net, dir: &Path, tls: bool) -> Authority {
        let members: Vec<std::net::IpAddr> = (0..3)
            .map(|i| net.bed.addresses().extra_host(i).into())
            .collect();
        let pki = tls.then(|| {
            let pki_dir = dir.join("pki");
            std::fs::create_dir_all(&pki_dir).expect("pki dir");
            testbed::etcd::Pki::make(&pki_dir, &members).expect("certificates (openssl)")
        });
        let cluster = testbed::etcd::Cluster::start(&net.bed, dir, 3, pki.as_ref())
            .expect("etcd members (Debian's etcd-server)");
        let mut security = arbiter::EtcdSecurity {
            ca: pki.as_ref().map(|p| p.ca.clone()),
            cert: pki.as_ref().map(|p| p.client_cert.clone()),
            key: pki.as_ref().map(|p| p.client_key.clone()),
            ..arbiter::EtcdSecurity::default()
        };
        let mut authority = Authority {
            cluster,
            security: security.clone(),
        };
        for i in 0..3 {
            authority.wait_member(net, i, std::time::Duration::from_secs(60));
        }
        if tls {
            let etcdctl = |args: &[&str]| {
                let output = authority
                    .cluster
                    .etcdctl(&net.bed)
                    .expect("arbiter namespace")
                    .args(args)
                    .output()
                    .expect("etcdctl (Debian's etcd-client)");
                assert!(
                    output.status.success(),
                    "etcdctl {args:?}: {}",
                    text_of(&output.stderr)
                );
            };
            etcdctl(&["user", "add", "root", "--new-user-password=root-pw"]);
            etcdctl(&["user", "grant-role", "root", "root"]);
            etcdctl(&["user", "add", "lockstep", "--new-user-password=pair-pw"]);
            etcdctl(&["role", "add", "lockstep-rw"]);
            etcdctl(&[
                "role",
                "grant-permission",
                "lockstep-rw",
                "--prefix=true",
                "readwrite",
                "/lockstep",
            ]);
            etcdctl(&["user", "grant-role", "lockstep", "lockstep-rw"]);
            etcdctl(&["--user=root:root-pw", "auth", "enable"]);
            let password = dir.join("etcd.password");
            std::fs::write(&password, "pair-pw\n").expect("password file");
            std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            security.user = Some("lockstep".into());
            security.password_file = Some(password);
            authority.security = security;
        }
        authority
    }

    /// A client of member `i` alone, with the replicas' settings.
    fn member(&self, i: usize) -> arbiter::EtcdArbiter {
        let scheme = if self.security.ca.is_some() {
            "etcds"
        } else {
            "etcd"
        };
        arbiter::EtcdArbiter::from_url(
            &format!("{scheme}://{}", self.cluster.endpoints()[i]),
            &self.security,
            std::time::Duration::from_secs(2),
        )
        .expect("etcd client")
    }

    /// Waits until member `i` answers a read from host a.
    fn wait_member(&self, net: &common::Net, i: usize, within: std::time::Duration) {
        let etcd = self.member(i);
        let endpoint = &self.cluster.endpoints()[i];
        net.bed
            .run_in(common::Ns::A, || {
                let deadline = std::time::Instant::now() + within;
                while let Err(error) = arbiter::Arbiter::read(&etcd, 999) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "etcd member {endpoint} did not answer in {within:?}: {}",
                        arbiter::error_chain(&error)
                    );
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .expect("host a");
    }

    /// The VM's record as the whole cluster has it, asked from host a.
    fn record(
        &self,
        net: &common::Net,
        vm: u64,
    ) -> Result<Option<arbiter::VmRecord>, arbiter::ArbiterError> {
        let etcd = arbiter::EtcdArbiter::from_url(
            &self.cluster.url(),
            &self.security,
            std::time::Duration::from_secs(2),
        )
        .expect("etcd client");
        net.bed
            .run_in(common::Ns::A, || arbiter::Arbiter::read(&etcd, vm))
            .expect("host a")
    }

    /// The `[arbiter]` section of the replicas' config files.
    fn section(&self) -> String {
        let s = &self.security;
        let mut out = String::from("[arbiter]\n");
        for (key, path) in [("ca", &s.ca), ("cert", &s.cert), ("key", &s.key)] {
            if let Some(path) = path {
                out.push_str(&format!("{key} = \"{}\"\n", path.display()));
            }
        }
        if let (Some(user), Some(path)) = (&s.user, &s.password_file) {
            out.push_str(&format!(
                "user = \"{user}\"\npassword_file = \"{}\"\n",
                path.display()
            ));
        }
        out
    }
}

/// The two config files of a pair (host a's primary, host b's backup),
/// with the metrics and status settings the tests read.
struct PairFiles {
    primary: std::path::PathBuf,
    backup: std::path::PathBuf,
    metrics_a: String,
    metrics_b: String,
    status: std::path::PathBuf,
}

fn pair_files(net: &common::Net, dir: &Path, key: &Path, authority: &Authority) -> PairFiles {
    use common::Ns;
    let arbiter_address = authority.cluster.url();
    let link = net.log_address(Ns::B, 7700);
    let metrics_a = net.log_address(Ns::A, 9400);
    let metrics_b = net.log_address(Ns::B, 9400);
    let status = dir.join("status");
    let replica_section = |id: &str| {
        format!(
            "[replica]\nid = \"{id}\"\nvm_id = 1\narbiter = \"{arbiter_address}\"\nlink_key = \"{}\"\npeer_timeout_ms = 1500\nstatus_dir = \"{}\"\n\n{}",
            key.display(),
            status.display(),
            authority.section()
        )
    };
    let backup = dir.join("backup.toml");
    std::fs::write(
        &backup,
        format!(
            "role = \"backup\"\nmetrics = \"{metrics_b}\"\n\n{}\n[guest]\ntap = \"{}\"\nquiet = true\n\n[backup]\nlisten = \"{link}\"\n",
            replica_section("host-b"),
            net.tap()
        ),
    )
    .expect("write");
    let primary = dir.join("primary.toml");
    std::fs::write(
        &primary,
        format!(
            "role = \"primary\"\nmetrics = \"{metrics_a}\"\n\n{}\n[guest]\nname = \"net\"\narg = {}\ntap = \"{}\"\nmem_mib = 32\n\n[primary]\nbackup = \"{link}\"\nbackup_id = \"host-b\"\n",
            replica_section("host-a"),
            net.guest_arg(),
            net.tap()
        ),
    )
    .expect("write");
    for file in [&backup, &primary] {
        let check = lockstep(&["config", "check", path_str(file)]);
        assert!(check.status.success(), "{}", text_of(&check.stderr));
    }
    PairFiles {
        primary,
        backup,
        metrics_a,
        metrics_b,
        status,
    }
}

/// Starts the backup (host b) and then the primary (host a) from their
/// files; returns them once the backup's endpoint says `backup` and the
/// primary printed its banner.
fn start_pair(net: &common::Net, files: &PairFiles) -> (std::process::Child, std::process::Child) {
    use common::Ns;
    let backup = net
        .lockstep(Ns::B)
        .arg("backup")
        .arg("--config")
        .arg(&files.backup)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the backup");
    scrape_until(net, Ns::B, &files.metrics_b, "the backup's endpoint", |t| {
        t.contains("lockstep_role{role=\"backup\"} 1")
    });
    let primary = net.start(Ns::A, &["primary", "--config", path_str(&files.primary)]);
    (backup, primary)
}

/// Two hosts started as an operator would, from one config file each
/// (`lockstep backup --config` in host b, `lockstep primary --config` in
/// host a, not through `up`), with a three-member etcd cluster as the
/// authority, one member per testbed host, over TLS with client
/// certificates and an etcd login (`etcds://`, `[arbiter]`): both metrics
/// endpoints are scraped in their namespaces, both pass `promtool check
/// metrics`, `lockstep status --json` reports the same figures (lag in
/// exits and entries included); then one etcd member (the first endpoint
/// both replicas name) is killed and the primary SIGKILLed: the survivor
/// wins the next generation from the remaining quorum, and its metrics
/// report the new role and generation.
#[test]
fn two_hosts_from_config_files_report_metrics_and_the_failover() {
    use common::Ns;
    let net = common::Net::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::keygen(dir.path(), "pair.key");
    let mut authority = Authority::start(&net, dir.path(), true);
    let files = pair_files(&net, dir.path(), &key, &authority);
    let (metrics_a, metrics_b, status) = (&files.metrics_a, &files.metrics_b, &files.status);

    // A wrong password or a wrong CA: the primary refuses to start, saying
    // which etcd and why, at once (no panic, no hang).
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").expect("write");
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let other_ca = dir.path().join("pki/other-ca.crt");
    for (flag, value, expected) in [
        ("--etcd-password-file", &wrong, "refused user \"lockstep\""),
        ("--etcd-ca", &other_ca, "TLS with etcd at"),
    ] {
        let mut child = net
            .lockstep(Ns::A)
            .args(["primary", "--config", path_str(&files.primary), flag])
            .arg(value)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start lockstep");
        let code = exit_within(&mut child, std::time::Duration::from_secs(20));
        let mut stderr = String::new();
        if code.is_some() {
            use std::io::Read;
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut stderr);
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            matches!(code, Some(c) if c != 0),
            "{flag}: exit {code:?} (None: still running after 20 s): {stderr}"
        );
        assert!(
            stderr.contains(expected)
                && stderr.contains(&authority.cluster.endpoints()[0])
                && !stderr.contains("panicked"),
            "{flag}: {stderr}"
        );
    }

    let (mut backup, mut primary) = start_pair(&net, &files);

    // The pair runs: the guest answers, the primary's figures move.
    let mut client = net.connect(6379);
    for _ in 0..20 {
        assert!(common::command(&mut client, &["incr", "counter"]).starts_with(':'));
    }
    let primary_text = scrape_until(&net, Ns::A, metrics_a, "a protected primary", |t| {
        t.contains("lockstep_role{role=\"primary\"} 1")
            && sample(t, "lockstep_protected") == Some(1.0)
            && sample(t, "lockstep_acked_position").is_some_and(|v| v > 0.0)
            && sample(t, "lockstep_held_output_seconds_count").is_some_and(|v| v > 0.0)
    });
    let generation = sample(&primary_text, "lockstep_generation").expect("generation");
    assert!(generation >= 1.0, "{primary_text}");
    let backup_text = scrape_until(&net, Ns::B, metrics_b, "a following backup", |t| {
        sample(t, "lockstep_log_position").is_some_and(|v| v > 0.0)
    });
    for (who, text) in [("primary", &primary_text), ("backup", &backup_text)] {
        match promtool_check(text) {
            Some(Ok(())) => {}
            Some(Err(complaint)) => {
                panic!("promtool check metrics refused the {who}'s metrics:\n{complaint}\n{text}")
            }
            None => eprintln!(
                "SKIPPED: promtool check metrics (promtool not installed: Debian package prometheus)"
            ),
        }
    }
    assert!(
        backup_text.contains("lockstep_role{role=\"backup\"} 1"),
        "{backup_text}"
    );
    assert_eq!(
        sample(&backup_text, "lockstep_generation"),
        Some(generation)
    );
    for family in [
        "lockstep_backup_lag_exits",
        "lockstep_backup_lag_entries",
        "lockstep_backup_max_lag_entries",
    ] {
        assert!(
            sample(&backup_text, family).is_some(),
            "no {family} in {backup_text}"
        );
    }
    // The largest lag is never below the current one.
    assert!(
        sample(&backup_text, "lockstep_backup_max_lag_entries")
            >= sample(&backup_text, "lockstep_backup_lag_entries"),
        "{backup_text}"
    );
    let json = lockstep(&["status", "--json", "--dir", path_str(status)]);
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
    for field in [
        "backup_lag_exits",
        "backup_lag_entries",
        "backup_max_lag_entries",
    ] {
        assert!(of("host-b")[field].is_u64(), "no {field} in {json}");
    }

    // One etcd member gone (the first endpoint in both files): the other
    // two are a quorum. Then SIGKILL the primary: the backup wins
    // generation g+1 and says so.
    authority.cluster.kill(0);
    primary.kill().expect("kill the primary");
    let _ = primary.wait();
    let live = scrape_until(&net, Ns::B, metrics_b, "the survivor live", |t| {
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
}

/// Sends one RESP command without waiting for its reply.
fn send(stream: &mut std::net::TcpStream, words: &[&str]) {
    use std::io::Write;
    let mut request = format!("*{}\r\n", words.len());
    for word in words {
        request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
    }
    stream.write_all(request.as_bytes()).expect("send");
}

/// Reads one RESP line (`:21`) within `within`; `None` if nothing came.
fn reply_within(stream: &mut std::net::TcpStream, within: std::time::Duration) -> Option<String> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).expect("timeout");
        match stream.read(&mut byte) {
            Ok(1) => reply.push(byte[0]),
            Ok(_) => panic!("the guest closed the connection after {reply:?}"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if reply.is_empty() {
                    return None;
                }
                panic!("half a reply: {reply:?}");
            }
            Err(e) => panic!("reading the reply: {e}"),
        }
    }
    Some(String::from_utf8_lossy(&reply[..reply.len() - 2]).into_owned())
}

/// Waits (at most `within`) for `child` to exit; its exit code.
fn exit_within(child: &mut std::process::Child, within: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// Two of the three etcd members killed, then the pair partitioned (the
/// logging link cut): both replicas lose their peer and ask the arbiter,
/// which has no quorum. Nobody goes live: the client's INCR gets no reply
/// (the primary holds it: it was never replicated), the backup stays a
/// backup, both stay in generation g. When the two members come back,
/// quorum returns and exactly one replica wins generation g+1 (the other
/// halts with EXIT_HALTED); the held INCR is answered `:21` (by the
/// primary releasing it, or by the backup after the client retransmits),
/// and the counter goes on. Every wait has a deadline.
#[test]
fn two_etcd_members_killed_nobody_goes_live_and_quorum_back_the_pair_carries_on() {
    use common::Ns;
    use std::time::Duration;
    let net = common::Net::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = common::keygen(dir.path(), "pair.key");
    let mut authority = Authority::start(&net, dir.path(), false);
    let files = pair_files(&net, dir.path(), &key, &authority);
    let (mut backup, mut primary) = start_pair(&net, &files);
    let mut client = net.connect(6379);
    for n in 1..=20 {
        assert_eq!(
            common::command(&mut client, &["incr", "counter"]),
            format!(":{n}")
        );
    }
    let text = scrape_until(&net, Ns::A, &files.metrics_a, "a protected primary", |t| {
        sample(t, "lockstep_protected") == Some(1.0)
    });
    let generation = sample(&text, "lockstep_generation").expect("generation");

    // No quorum, then a partition.
    authority.cluster.kill(0);
    authority.cluster.kill(1);
    net.bed
        .cut(common::Link::Log)
        .expect("cut the logging link");
    send(&mut client, &["incr", "counter"]);
    // Three peer timeouts and several arbiter attempts: nobody decides.
    assert_eq!(
        reply_within(&mut client, Duration::from_secs(8)),
        None,
        "a reply left that was never replicated, with no arbiter quorum"
    );
    for (ns, metrics, role) in [
        (Ns::A, &files.metrics_a, "primary"),
        (Ns::B, &files.metrics_b, "backup"),
    ] {
        let text = scrape(&net, ns, metrics).unwrap_or_else(|e| panic!("{ns}: {e}"));
        assert!(
            text.contains(&format!("lockstep_role{{role=\"{role}\"}} 1")),
            "{ns} is no longer {role} without a quorum:\n{text}"
        );
        assert_eq!(
            sample(&text, "lockstep_generation"),
            Some(generation),
            "{text}"
        );
        assert_eq!(
            sample(&text, "lockstep_failovers_total"),
            Some(0.0),
            "{text}"
        );
    }
    assert!(
        authority.record(&net, 1).is_err(),
        "one member alone answered"
    );
    assert!(
        primary.try_wait().expect("primary").is_none(),
        "the primary gave up"
    );
    assert!(
        backup.try_wait().expect("backup").is_none(),
        "the backup gave up"
    );

    // Quorum returns: exactly one replica wins g + 1.
    authority
        .cluster
        .restart(&net.bed, 0, dir.path())
        .expect("restart member 0");
    authority
        .cluster
        .restart(&net.bed, 1, dir.path())
        .expect("restart member 1");
    let reply = reply_within(&mut client, Duration::from_secs(90));
    assert_eq!(
        reply.as_deref(),
        Some(":21"),
        "the held INCR after quorum came back"
    );
    assert_eq!(common::command(&mut client, &["incr", "counter"]), ":22");
    let record = authority
        .record(&net, 1)
        .expect("the cluster answers again")
        .expect("a record");
    assert_eq!(record.generation as f64, generation + 1.0, "{record:?}");
    // The loser halts for good (it lost generation g + 1).
    let (loser, winner) = if record.primary.as_str() == "host-a" {
        (&mut backup, &mut primary)
    } else {
        assert_eq!(record.primary.as_str(), "host-b", "{record:?}");
        (&mut primary, &mut backup)
    };
    assert_eq!(
        exit_within(loser, Duration::from_secs(30)),
        Some(i32::from(replica::failover::EXIT_HALTED)),
        "the replica that lost generation g+1 did not halt"
    );
    assert!(
        winner.try_wait().expect("winner").is_none(),
        "the winner stopped"
    );
    let _ = winner.kill();
    let _ = winner.wait();
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
