//! The disk in a fault-tolerant pair (local disks): a real primary and a
//! real backup process, each with its own image file, the log over shared
//! memory (a unix socket in the test's own directory). Needs /dev/kvm.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const KEY: &[u8] = b"lockstep disk test key, at least 32 bytes";

/// Runs the `disk` guest as primary (image `a`) and backup (image `b`);
/// returns both outputs.
fn pair(dir: &Path, a: &Path, b: &Path, rounds: u64) -> (Output, Output) {
    pair_in(dir, a, b, rounds, "local", |_| {})
}

/// As [`pair`], in disk mode `mode`; `meanwhile` gets the backup's pid
/// while the primary runs.
fn pair_in(
    dir: &Path,
    a: &Path,
    b: &Path,
    rounds: u64,
    mode: &str,
    meanwhile: impl FnOnce(u32) + Send + 'static,
) -> (Output, Output) {
    let key = dir.join("key");
    std::fs::write(&key, KEY).expect("key");
    let socket = dir.join("link.sock");
    let status = dir.join("status");
    let backup = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["backup", "--quiet", "--transport", "shm"])
        .args(["--peer-timeout-ms", "5000", "--listen"])
        .arg(&socket)
        .arg("--disk")
        .arg(b)
        .args(["--disk-mode", mode])
        .arg("--link-key")
        .arg(&key)
        .arg("--status-dir")
        .arg(&status)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backup");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let primary = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["primary", "--guest", "disk", "--arg", &rounds.to_string()])
        .args(["--transport", "shm", "--backup"])
        .arg(&socket)
        .args(["--digest-interval", "20", "--peer-timeout-ms", "5000"])
        .arg("--disk")
        .arg(a)
        .args(["--disk-mode", mode])
        .arg("--link-key")
        .arg(&key)
        .arg("--status-dir")
        .arg(&status)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the primary");
    let backup_pid = backup.id();
    let side = std::thread::spawn(move || meanwhile(backup_pid));
    let primary = primary.wait_with_output().expect("primary");
    side.join().expect("meanwhile");
    // A backup that refused every connection keeps listening: stop it.
    let mut backup = backup;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while backup.try_wait().expect("backup status").is_none()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = backup.kill();
    let backup = backup.wait_with_output().expect("backup");
    (primary, backup)
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// Both replicas of `boot` exited 0, and the guest saw its disk at that
/// boot with no mismatch.
fn assert_boot_ran_clean(primary: &Output, backup: &Output, boot: u32) {
    let (primary_text, backup_text) = (text(primary), text(backup));
    assert!(
        primary.status.success(),
        "primary: {primary_text}\nbackup: {backup_text}"
    );
    assert!(backup.status.success(), "backup: {backup_text}");
    assert!(
        primary_text.contains(&format!("disk: boot {boot} id lockstep-disk"))
            && primary_text.contains("mismatches 0"),
        "{primary_text}"
    );
}

#[test]
fn a_pair_with_local_disks_keeps_both_images_identical_across_runs() {
    let _serial = UP_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    for boot in 1..=2 {
        let (primary, backup) = pair(dir.path(), &a, &b, 30);
        assert_boot_ran_clean(&primary, &backup, boot);
        let (a_bytes, b_bytes) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        assert_eq!(a_bytes.len(), 64 << 20, "created with the default size");
        assert!(
            a_bytes == b_bytes,
            "run {boot}: the replicas' images differ"
        );
    }
}

#[test]
fn a_backup_whose_image_differs_refuses_the_pair() {
    let _serial = UP_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, vec![0u8; 1 << 20]).expect("a");
    let mut other = vec![0u8; 1 << 20];
    other[4096] = 7;
    std::fs::write(&b, other).expect("b");
    let (primary, backup) = pair(dir.path(), &a, &b, 5);
    let backup_text = text(&backup);
    assert!(!backup.status.success(), "backup: {backup_text}");
    assert!(
        backup_text.contains("the disks differ") && backup_text.contains("content hash"),
        "{backup_text}"
    );
    // The primary learns of it only by losing its backup (fail-stop without
    // an arbiter); this guest is short enough to finish first.
    let _ = primary;
}

#[test]
fn a_pair_in_shared_mode_runs_on_one_image() {
    let _serial = UP_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("shared.img");
    for boot in 1..=2 {
        let (primary, backup) = pair_in(dir.path(), &image, &image, 30, "shared", |_| {});
        assert_boot_ran_clean(&primary, &backup, boot);
    }
}

#[test]
fn in_shared_mode_a_frozen_backup_holds_the_primarys_writes_off_the_image() {
    let _serial = UP_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("shared.img");
    let watched = image.clone();
    let frozen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = std::sync::Arc::clone(&frozen);
    let (primary, backup) = pair_in(dir.path(), &image, &image, 4000, "shared", move |pid| {
        let hash = |path: &Path| std::fs::read(path).map(|b| xxh(&b)).unwrap_or(0);
        // Wait until the guest writes, then freeze the backup (SIGSTOP).
        let start = hash(&watched);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while hash(&watched) == start && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let signal = |sig: &str| {
            Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .expect("kill")
        };
        signal("-STOP");
        // Writes issued before the freeze land within this wait.
        std::thread::sleep(Duration::from_millis(500));
        let at_freeze = hash(&watched);
        std::thread::sleep(Duration::from_millis(2000));
        let later = hash(&watched);
        signal("-CONT");
        *seen.lock().expect("seen") = Some((at_freeze, later));
    });
    let (primary_text, backup_text) = (text(&primary), text(&backup));
    let (at_freeze, later) = frozen.lock().expect("frozen").expect("froze the backup");
    assert_eq!(
        at_freeze, later,
        "the image changed while the backup was frozen: a write left before its ack"
    );
    assert!(
        primary.status.success() && primary_text.contains("mismatches 0"),
        "primary: {primary_text}\nbackup: {backup_text}"
    );
    assert!(backup.status.success(), "backup: {backup_text}");
}

fn xxh(bytes: &[u8]) -> u64 {
    // FNV-1a: any hash that changes with the bytes will do here.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Serialises this binary's tests: each runs a pair of spinning replicas,
/// and two at once on two cores starve `up`'s channel threads past its
/// 50 ms peer timeout (seen: "backup silent: no acknowledgement for 51 ms",
/// "peer silent … last sequence number 0").
static UP_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `lockstep up --disk FILE` until `until` says done; returns its stderr.
mod up {
    use std::io::{BufRead, BufReader, Write};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    pub struct Up {
        child: std::process::Child,
        lines: mpsc::Receiver<String>,
        pub seen: Vec<String>,
        pub run: String,
        pub guest: String,
        /// The first primary's and backup's pids, from the banner.
        pub primary: i32,
        pub backup: i32,
    }

    impl Up {
        pub fn start(disk: &Path) -> Self {
            let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
                .arg("up")
                .arg("--disk")
                .arg(disk)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("lockstep up");
            let stderr = child.stderr.take().expect("stderr");
            let (send, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if send.send(line).is_err() {
                        break;
                    }
                }
            });
            let mut up = Self {
                child,
                lines,
                seen: Vec::new(),
                run: String::new(),
                guest: String::new(),
                primary: 0,
                backup: 0,
            };
            let banner = up.line_with("lockstep up: testbed ");
            let pid_after = |what: &str| -> i32 {
                let at = banner.find(what).expect("pid in the banner") + what.len();
                let at = at + banner[at..].find("(pid ").expect("(pid") + 5;
                banner[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .find(|part| !part.is_empty())
                    .and_then(|pid| pid.parse().ok())
                    .expect("pid")
            };
            up.primary = pid_after("primary in ");
            up.backup = pid_after("backup in ");
            up.run = banner
                .split_whitespace()
                .nth(3)
                .expect("run")
                .trim_end_matches(':')
                .into();
            let printed = up.line_with("redis-cli -h");
            up.guest = printed.split_whitespace().nth(6).expect("guest").into();
            up
        }

        /// Waits (up to a minute) for a line of up's output with `what`.
        pub fn line_with(&mut self, what: &str) -> String {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(line) => {
                        self.seen.push(line.clone());
                        if line.contains(what) {
                            return line;
                        }
                    }
                    Err(_) => panic!("`{what}` never came; up said:\n{}", self.seen.join("\n")),
                }
            }
        }

        /// Stock redis-cli in the client namespace, `input` on its stdin
        /// (one command a line), retried until it answers.
        pub fn redis(&self, args: &[&str], input: &str) -> String {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
                    .args([
                        "client",
                        "--run",
                        &self.run,
                        "--",
                        "redis-cli",
                        "-h",
                        &self.guest,
                    ])
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("redis-cli");
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(input.as_bytes()).expect("commands");
                drop(stdin);
                let output = child.wait_with_output().expect("redis-cli");
                let reply = String::from_utf8_lossy(&output.stdout).trim().to_string();
                if output.status.success() && !reply.is_empty() && !reply.contains("rror") {
                    return reply;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-cli never answered: {reply}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }

        /// SIGKILL to one of the deployment's replicas.
        pub fn kill(&self, pid: i32) {
            assert!(pid > 1, "not a replica's pid: {pid}");
            // SAFETY: kill(2) on a pid `up` just reported as its child.
            unsafe { libc_kill(pid, 9) };
        }

        /// Ctrl-C, and wait for the whole deployment to stop.
        pub fn stop(mut self) -> Vec<String> {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc_kill(self.child.id() as i32, 2) };
            let status = self.child.wait().expect("up");
            while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                self.seen.push(line);
            }
            assert!(status.success(), "up: {status}\n{}", self.seen.join("\n"));
            self.seen
        }
    }

    unsafe extern "C" {
        #[link_name = "kill"]
        fn libc_kill(pid: i32, signal: i32) -> i32;
    }
}

#[test]
fn the_store_persists_through_a_restart_of_up_on_the_same_disk() {
    // One deployment at a time: two `up`s in parallel on two cores starve
    // each other's channel threads past the 50 ms peer timeout.
    let _serial = UP_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("store.img");
    let mut backup_disk = disk.clone().into_os_string();
    backup_disk.push(".backup");
    let first = up::Up::start(&disk);
    let sets: String = (0..1000)
        .map(|i| format!("SET key:{i} value-{i}\n"))
        .collect();
    first.redis(&[], &sets);
    assert_eq!(first.redis(&["dbsize"], ""), "1000");
    let said = first.stop().join("\n");
    let (a, b) = (
        std::fs::read(&disk).expect("primary image"),
        std::fs::read(&backup_disk).expect("backup image"),
    );
    assert!(
        a == b,
        "the replicas' images differ after the stop:\n{said}"
    );

    let second = up::Up::start(&disk);
    assert_eq!(second.redis(&["dbsize"], ""), "1000");
    assert_eq!(second.redis(&["get", "key:0"], ""), "value-0");
    assert_eq!(second.redis(&["get", "key:999"], ""), "value-999");
    second.stop();
}

/// SETs batches of 40 keys through stock redis-cli until `stop`; returns
/// every key whose OK came back (a batch cut by a failover counts its
/// replies up to the first that is not OK).
fn write_until(run: &str, guest: &str, stop: &std::sync::atomic::AtomicBool) -> Vec<String> {
    let mut acked = Vec::new();
    let mut batch = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let keys: Vec<String> = (0..40).map(|i| format!("w:{batch}:{i}")).collect();
        let input: String = keys.iter().map(|k| format!("SET {k} v-{k}\n")).collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args([
                "client",
                "--run",
                run,
                "--",
                "timeout",
                "20",
                "redis-cli",
                "-h",
                guest,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            let _ = stdin.write_all(input.as_bytes());
        }
        let output = child.wait_with_output().expect("redis-cli");
        let replies = String::from_utf8_lossy(&output.stdout);
        let ok = replies
            .lines()
            .take_while(|line| line.trim() == "OK")
            .count();
        acked.extend(keys.into_iter().take(ok));
        batch += 1;
        if ok < 40 {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    acked
}

#[test]
fn a_vm_with_a_disk_is_re_protected_and_a_failover_to_the_joined_backup_loses_nothing() {
    // One deployment at a time: two `up`s in parallel on two cores starve
    // each other's channel threads past the 50 ms peer timeout.
    let _serial = UP_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("store.img");
    let mut backup_disk = disk.clone().into_os_string();
    backup_disk.push(".backup");
    let mut up = up::Up::start(&disk);
    let sets: String = (0..300)
        .map(|i| format!("SET key:{i} value-{i}\n"))
        .collect();
    up.redis(&[], &sets);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (run, guest) = (up.run.clone(), up.guest.clone());
    let acked = std::thread::scope(|scope| {
        // A failed wait below must not leave the writer running.
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        let writer = scope.spawn(|| write_until(&run, &guest, &stop));
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("killing the backup (pid {})", up.backup);
        // The backup dies under writes; a new one joins the primary by
        // state transfer, the disk with it.
        up.kill(up.backup);
        let joined = up.line_with("protected again");
        eprintln!("{joined}");
        std::thread::sleep(Duration::from_millis(500));
        // Now the primary dies: the joined backup must have everything.
        eprintln!("killing the primary (pid {})", up.primary);
        up.kill(up.primary);
        up.line_with("takes over");
        eprintln!("taken over");
        // Writes continue on the promoted replica; then a third backup
        // joins it (on host a, whose image it overwrites).
        up.line_with("protected again");
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("re-protected again");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer")
    });
    eprintln!("{} keys acknowledged under the faults", acked.len());
    assert!(
        acked.len() >= 40,
        "{} keys acknowledged under the faults",
        acked.len()
    );
    assert_eq!(up.redis(&["get", "key:0"], ""), "value-0");
    assert_eq!(up.redis(&["get", "key:299"], ""), "value-299");
    // Every acknowledged key, in one redis-cli run.
    let gets: String = acked.iter().map(|k| format!("GET {k}\n")).collect();
    let values = up.redis(&[], &gets);
    let lost: Vec<&String> = acked
        .iter()
        .zip(values.lines().chain(std::iter::repeat("")))
        .filter(|(key, value)| value.trim() != format!("v-{key}"))
        .map(|(key, _)| key)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged keys lost, first {:?}",
        lost.len(),
        acked.len(),
        lost.first()
    );
    let said = up.stop().join("\n");
    let (a, b) = (
        std::fs::read(&disk).expect("host a's image"),
        std::fs::read(&backup_disk).expect("host b's image"),
    );
    assert!(
        a == b,
        "the replicas' images differ after two re-protections:\n{said}"
    );
}
