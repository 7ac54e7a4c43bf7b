//! `lockstep up`: the embedded default deployment on a testbed made for it.
//!
//! ```text
//!  arbiter ns: lockstep arbiter (:7400, fresh state and key in a 0700 dir)
//!  host a: lockstep primary (guest net, tap0, --join-listen :7800) ──log link──▶
//!  host b: lockstep backup  (tap0, --join-listen :7800)
//!  client ns: the guest's address (redis 6379, echo 7, sink 5001, source 5002)
//! ```
//!
//! Supervision, every 200 ms until the stop flag is set: when the live
//! replica dies the standby goes live on its own (the arbiter decides), and
//! a second later a new backup is started on the dead replica's host with
//! `backup --join` (state transfer from the live one); when the standby
//! dies, a new one joins likewise. At the end the live replica is stopped
//! first (its stop record ends the backup's replay), a standby still
//! running after 3 s gets SIGTERM, and 20 s later SIGKILL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use testbed::Ns;

use crate::ChaosError;

/// Port of each replica's join service (`--join-listen`) on its end of the
/// logging link, and of the arbiter in its namespace.
const UP_JOIN_PORT: u16 = 7800;
const UP_ARBITER_PORT: u16 = 7400;

/// What `lockstep up` deploys.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// How the replicas carry the log.
    pub transport: replica::link::TransportKind,
    /// Overrides the logging link's address.
    pub link: Option<String>,
    /// The client link's rate.
    pub client_link: testbed::Rate,
    /// The logging link's rate.
    pub log_link: testbed::Rate,
    /// The heartbeat flags each replica gets.
    pub liveness: Vec<String>,
    /// The primary's disk image (the backup's is the same path with
    /// `.backup` appended), if the guest has a disk.
    pub disk: Option<PathBuf>,
}

/// `lockstep up`: the default deployment, supervised until `stop` is set
/// (see the module docs). `binary` is the `lockstep` executable the
/// arbiter and the replicas run.
pub fn up(binary: &Path, options: &UpOptions, stop: Arc<AtomicBool>) -> Result<(), ChaosError> {
    let UpOptions {
        transport,
        link,
        client_link,
        log_link,
        liveness,
        disk,
    } = options.clone();
    // The replicas start in other namespaces, maybe elsewhere: absolute.
    let disk = match disk {
        Some(path) => Some(
            std::path::absolute(&path).map_err(|source| ChaosError::File {
                what: "cannot resolve the disk image path",
                path: path.to_path_buf(),
                source,
            })?,
        ),
        None => None,
    };
    let bed = testbed::Testbed::up(&testbed::Config {
        client_link,
        log_link,
        ..testbed::Config::new("up")
    })?;
    let at = bed.addresses().clone();
    let spawn = |ns: Ns, args: &[String], what: &'static str| -> Result<_, ChaosError> {
        bed.command(ns, binary)?
            .args(args)
            .spawn()
            .map_err(|source| ChaosError::File {
                what,
                path: binary.to_path_buf(),
                source,
            })
    };
    // An embedded arbiter with a fresh state and key for this deployment.
    // A private directory (0700, unpredictable name) and a key (0600) of
    // this deployment's own.
    let dir = lockstep_config::keys::private_dir("lockstep-up")?;
    let key = dir.join("arbiter.key");
    lockstep_config::keys::generate(&key)?;
    let state = dir.join("arbiter.state");
    let arbiter_address = format!("{}:{UP_ARBITER_PORT}", at.arbiter);
    let key_text = key.to_string_lossy().into_owned();
    let state_text = state.to_string_lossy().into_owned();
    let owned = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let mut arbiter = spawn(
        Ns::Arbiter,
        &owned(&[
            "arbiter",
            "--listen",
            &arbiter_address,
            "--state",
            &state_text,
            "--key-file",
            &key_text,
        ]),
        "cannot start the arbiter",
    )?;
    let link = link.unwrap_or_else(|| match transport {
        replica::link::TransportKind::Shm => dir.join("link.sock").to_string_lossy().into_owned(),
        replica::link::TransportKind::Tcp | replica::link::TransportKind::Rdma => {
            format!("{}:7700", at.log_b)
        }
    });
    let mut ft_flags = owned(&[
        "--arbiter",
        &arbiter_address,
        "--arbiter-key",
        &key_text,
        "--transport",
        transport.name(),
    ]);
    ft_flags.extend(liveness.iter().cloned());
    let join_address = |ns: Ns| {
        format!(
            "{}:{UP_JOIN_PORT}",
            at.log(ns).unwrap_or(std::net::Ipv4Addr::LOCALHOST)
        )
    };
    // Give the arbiter a moment to listen (the primary registers the pair);
    // asked from host a, over the management link.
    if let Ok(target) = arbiter_address.parse::<std::net::SocketAddr>() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while bed
            .connect(Ns::A, target, std::time::Duration::from_millis(500))
            .is_err()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let mut backup_args = owned(&[
        "backup",
        "--listen",
        &link,
        "--quiet",
        "--tap",
        testbed::TAP,
        "--id",
        "backup",
        "--join-listen",
        &join_address(Ns::B),
    ]);
    backup_args.extend(ft_flags.iter().cloned());
    if let Some(disk) = &disk {
        let mut backup_disk = disk.clone().into_os_string();
        backup_disk.push(".backup");
        backup_args.extend(["--disk".into(), backup_disk.to_string_lossy().into_owned()]);
    }
    let backup = spawn(Ns::B, &backup_args, "cannot start the backup")?;
    // Each host keeps its own image: host a the given FILE, host b
    // FILE.backup (a joining backup overwrites its host's copy).
    let disk_of = |host: Ns| -> Option<String> {
        let disk = disk.as_ref()?;
        let mut image = disk.clone().into_os_string();
        if host != Ns::A {
            image.push(".backup");
        }
        Some(image.to_string_lossy().into_owned())
    };
    let guest_arg = at.guest_arg().to_string();
    let mut primary_args = owned(&[
        "primary",
        "--backup",
        &link,
        "--backup-id",
        "backup",
        "--id",
        "primary",
        "--guest",
        "net",
        "--mem-mib",
        "32",
        "--tap",
        testbed::TAP,
        "--arg",
        &guest_arg,
        "--join-listen",
        &join_address(Ns::A),
    ]);
    primary_args.extend(ft_flags.iter().cloned());
    if let Some(disk) = &disk {
        primary_args.extend(["--disk".into(), disk.to_string_lossy().into_owned()]);
    }
    let primary = spawn(Ns::A, &primary_args, "cannot start the primary")?;
    let client_ns = bed.netns(Ns::Client);
    tracing::info!(
        "lockstep up: testbed {run}: arbiter in {arb} (pid {}), primary in {a} (pid {}), backup in {b} (pid {}); the log over {} on the logging link {}-{}",
        arbiter.id(),
        primary.id(),
        backup.id(),
        transport.name(),
        at.log_a,
        at.log_b,
        run = bed.run_id(),
        arb = bed.netns(Ns::Arbiter),
        a = bed.netns(Ns::A),
        b = bed.netns(Ns::B),
    );
    tracing::info!(
        "lockstep up: the guest is {} in {client_ns}: redis 6379, echo 7, sink 5001, source 5002. From another terminal:\n    ip netns exec {client_ns} redis-cli -h {} incr counter\n    lockstep client -- redis-benchmark -h {} -t ping,set,get,incr -n 20000 -q\nlockstep up: Ctrl-C stops (`lockstep testbed status` shows the links)",
        at.guest,
        at.guest,
        at.guest
    );
    // Supervise: whichever replica dies, the other goes live, and a new
    // backup joins it by state transfer (`backup --join`) from the dead
    // one's host, for as long as a replica runs.
    let mut live = (Ns::A, primary);
    let mut standby: Option<(Ns, std::process::Child)> = Some((Ns::B, backup));
    let mut pending_join: Option<(Ns, std::time::Instant)> = None;
    let mut joins = 1u32;
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        if let Ok(Some(status)) = live.1.try_wait() {
            if status.success() {
                break Ok(());
            }
            let Some(next) = standby.take() else {
                break Err(ChaosError::Usage(format!(
                    "the live replica in {} exited ({status}) with no backup to take over",
                    live.0
                )));
            };
            tracing::info!(
                "lockstep up: the live replica in {} exited ({status}); the backup in {} takes over, and a new backup joins it from {}",
                live.0,
                next.0,
                live.0
            );
            // Give the backup time to notice and win the arbiter.
            pending_join = Some((
                live.0,
                std::time::Instant::now() + std::time::Duration::from_secs(1),
            ));
            live = next;
            continue;
        }
        if let Some((host, child)) = standby.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let host = *host;
            standby = None;
            if !status.success() {
                tracing::info!(
                    "lockstep up: the backup in {host} exited ({status}); starting a new one there, which joins the primary by state transfer"
                );
                // Give the primary time to notice and win the arbiter.
                pending_join = Some((
                    host,
                    std::time::Instant::now() + std::time::Duration::from_secs(1),
                ));
            }
        }
        if let Some((host, due)) = pending_join
            && standby.is_none()
            && std::time::Instant::now() >= due
        {
            pending_join = None;
            joins += 1;
            let mut args = owned(&[
                "backup",
                "--join",
                &join_address(live.0),
                "--quiet",
                "--tap",
                testbed::TAP,
                "--id",
                &format!("backup-{joins}"),
                "--join-listen",
                &join_address(host),
            ]);
            args.extend(ft_flags.iter().cloned());
            if let Some(image) = disk_of(host) {
                // Its image is emptied and filled with the live one's.
                args.extend(["--disk".into(), image]);
            }
            match spawn(host, &args, "cannot start a joining backup") {
                Ok(child) => standby = Some((host, child)),
                Err(error) => tracing::info!("lockstep up: {error}"),
            }
        }
    };
    // Stop: the primary first (its stop record ends the backup's replay);
    // a backup still running after a grace period is stopped too.
    let finish = |child: &mut std::process::Child, grace: std::time::Duration| {
        let exited_within = |child: &mut std::process::Child, time| {
            let deadline = std::time::Instant::now() + time;
            while child.try_wait().ok().flatten().is_none() {
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            true
        };
        if !exited_within(child, grace) {
            // SAFETY: kill(2) on our own, not yet reaped, child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            if !exited_within(child, std::time::Duration::from_secs(20)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    };
    finish(&mut live.1, std::time::Duration::ZERO);
    if let Some((_, mut child)) = standby {
        finish(&mut child, std::time::Duration::from_secs(3));
    }
    let _ = arbiter.kill();
    let _ = arbiter.wait();
    let _ = std::fs::remove_dir_all(&dir);
    drop(bed);
    result
}
