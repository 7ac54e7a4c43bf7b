//! The failover campaign, in CI: one trial of each fault kind at a random
//! moment under load from several clients, and the re-protection campaign.
//! Needs root, /dev/kvm, /dev/net/tun and iproute2.

use std::process::Command;
use std::sync::Mutex;

/// Both campaigns use the same TAP device and ports: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The short campaign: seven trials, one of each fault kind (SIGKILL and
/// SIGSTOP of either replica, the logging link cut, host a's client link
/// cut, the arbiter killed), three clients on shared keys, default
/// liveness (5 ms / 50 ms); the history of every trial is checked for
/// linearizability and the JSON report is written.
#[test]
fn every_fault_kind_once_no_split_brain_no_lost_write_linearizable() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("chaos.json");
    let output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["chaos", "--trials", "7", "--seed", "20261123", "--json"])
        .arg(&json)
        .output()
        .expect("run lockstep chaos");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("chaos: 7 trials,")
            && stdout.contains(" 0 split brains, 0 lost acknowledged writes")
            && stdout.contains(" 0 linearizability violations"),
        "{stdout}\n{stderr}"
    );
    for fault in [
        "KillPrimary",
        "KillBackup",
        "StopPrimary",
        "StopBackup",
        "Partition",
        "CutClientA",
        "KillArbiter",
    ] {
        assert!(
            stderr.contains(&format!(": {fault} after")),
            "the campaign never tried {fault}:\n{stderr}"
        );
    }
    // Every fault that takes a replica away ends with one live replica.
    assert!(
        stdout.contains("5 failovers") || stdout.contains("6 failovers"),
        "{stdout}\n{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report"))
            .expect("valid JSON");
    assert_eq!(
        report["trials"].as_array().map(Vec::len),
        Some(7),
        "{report}"
    );
    assert_eq!(report["summary"]["split_brains"], 0, "{report}");
    assert_eq!(
        report["summary"]["linearizability_violations"], 0,
        "{report}"
    );
    assert!(
        report["summary"]["operations"].as_u64().unwrap_or(0) > 1000,
        "{report}"
    );
}

#[test]
fn reprotected_survivors_hand_over_to_their_joined_backups() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["chaos", "--trials", "4", "--seed", "7", "--reprotect"])
        .output()
        .expect("run lockstep chaos --reprotect");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(" 0 split brains, 0 lost acknowledged writes"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("4 re-protections by state transfer; 4 joined backups went live"),
        "{stdout}\n{stderr}"
    );
}
