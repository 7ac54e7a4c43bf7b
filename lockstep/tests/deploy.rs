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
