//! The randomized failover campaign, in CI: 20 trials of SIGKILL (primary or
//! backup) and link partitions at random moments under client load. Needs
//! root, /dev/kvm, /dev/net/tun and iproute2.

use std::process::Command;
use std::sync::Mutex;

/// Both campaigns use the same TAP device and ports: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn twenty_random_faults_no_split_brain_no_lost_acknowledged_write() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["chaos", "--trials", "20", "--seed", "20261123"])
        .output()
        .expect("run lockstep chaos");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("chaos: 20 trials,")
            && stdout.contains(" 0 split brains, 0 lost acknowledged writes"),
        "{stdout}\n{stderr}"
    );
    // Every trial injected a fault that needs a replica to go live alone.
    assert!(stdout.contains("20 failovers"), "{stdout}\n{stderr}");
    for fault in ["KillPrimary", "KillBackup", "Partition"] {
        assert!(
            stderr.contains(fault),
            "the campaign never tried {fault}:\n{stderr}"
        );
    }
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
