//! One measurement as real processes in the testbed's hosts, started fresh
//! each time:
//!
//! ```text
//!  FT off   host a: lockstep run --guest net --tap tap0
//!  FT on    host b: lockstep backup --listen LOG_B:7790 (tcp) | --listen DIR/link.sock (shm)
//!           host a: lockstep primary --backup … --stats DIR/primary.json --guest net --tap tap0
//!  client   the load (see super::load) in the client namespace, over the client link
//! ```
//!
//! Stopping: SIGTERM to the primary (or the lone VM); a primary ends its
//! stream with a stop record, which ends the backup. Then the figures the
//! processes reported are read (see [`super::stats`]).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use testbed::Ns;

use super::anatomy::Anatomy;
use super::hosts::Hosts;
use super::load::{Load, Timing};
use super::scenario::{Config, Direction, Scenario, Transport};
use super::stats::{self, Measured, Sample};

/// The logging link's port on host b (each testbed is its own namespaces,
/// so a fixed port never collides with another run).
const LINK_PORT: u16 = 7790;

/// What every measurement of a run shares.
pub struct Bench<'a> {
    /// The `lockstep` executable.
    pub exe: &'a Path,
    /// The emulated hosts.
    pub hosts: &'a mut Hosts,
    /// The load generator.
    pub load: &'a dyn Load,
    /// Warm-up and window.
    pub timing: Timing,
    /// Scratch directory (logs, stats, sockets).
    pub dir: &'a Path,
}

/// A benchmark process: its role, and files holding its stdout and stderr.
pub struct Proc {
    /// `vm`, `primary`, `backup` or `recorder`.
    pub role: &'static str,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// What it printed.
    pub fn output(&self) -> String {
        let mut text = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(&self.stderr).unwrap_or_default());
        text
    }

    /// The last line the process printed that says something went wrong,
    /// or its last line.
    fn last_words(&self) -> String {
        let output = self.output();
        let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
        lines
            .iter()
            .rev()
            .find(|line| line.contains("halted") || line.contains("error") || line.contains("fail"))
            .or(lines.last())
            .map_or_else(|| "no output".into(), |line| line.trim().to_string())
    }
}

/// The processes of one configuration, stopped and reaped on drop.
pub struct Running {
    /// First the primary (or lone VM), then the backup.
    pub procs: Vec<Proc>,
    stats: Option<PathBuf>,
    /// Where the replicas publish their status (`ROLE.status`).
    status_dir: PathBuf,
}

impl Running {
    /// (role, pid) of each process.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.procs.iter().map(|p| (p.role, p.child.id())).collect()
    }

    /// `Err` naming the first process that has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        for proc in &mut self.procs {
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}): {}",
                    proc.role,
                    proc.last_words()
                ));
            }
        }
        Ok(())
    }

    /// SIGTERM to the first process (the primary, or the lone VM). Waits up
    /// to 10 s for it, then up to 0.5 s for the others (a backup over shm
    /// only notices the end after its peer timeout; its figures then come
    /// from its status file), then kills stragglers.
    pub fn stop(&mut self) {
        if let Some(first) = self.procs.first_mut()
            && let Ok(None) = first.child.try_wait()
            && let Ok(pid) = libc::pid_t::try_from(first.child.id())
        {
            // SAFETY: kill(2) with a pid of our own unreaped child (it has
            // not been waited for, so the pid is not reused) and a valid
            // signal number; it touches no memory.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for (index, proc) in self.procs.iter_mut().enumerate() {
            let patience = if index == 0 { 10_000 } else { 500 };
            let deadline = Instant::now() + Duration::from_millis(patience);
            while proc.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }

    /// Fills in the figures the processes reported when they stopped.
    pub fn read_reports(&self, measured: &mut Measured) {
        for proc in &self.procs {
            let output = proc.output();
            stats::apply_output(measured, proc.role, &output);
            if proc.role == "backup"
                && !output.contains("lag: at most ")
                && let Ok(status) = std::fs::read_to_string(self.status_dir.join("backup.status"))
            {
                stats::apply_backup_status(measured, &status);
            }
        }
        if let Some(stats) = self
            .stats
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| serde_json::from_str::<replica::stats::PrimaryStats>(&text).ok())
        {
            stats::apply_stats(measured, &stats);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for proc in &mut self.procs {
            if let Ok(None) = proc.child.try_wait() {
                let _ = proc.child.kill();
                let _ = proc.child.wait();
            }
        }
    }
}

/// Starts `exe ARGS` in host `ns`, its output into `dir/ROLE.{out,err}`.
pub fn spawn(bench: &Bench, ns: Ns, role: &'static str, args: &[&str]) -> Result<Proc, String> {
    let stdout = bench.dir.join(format!("{role}.out"));
    let stderr = bench.dir.join(format!("{role}.err"));
    let file = |path: &Path| {
        std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
    };
    let mut command = bench.hosts.command(ns, bench.exe)?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(&stdout)?)
        .stderr(file(&stderr)?);
    // SAFETY: the hook runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe and touches no shared state.
    unsafe {
        command.pre_exec(|| {
            // Die with the benchmark: a bench stopped by a signal must not
            // leave a VM on the TAP or a backup on the link port.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bench.exe.display()))?;
    Ok(Proc {
        role,
        child,
        stdout,
        stderr,
    })
}

/// The VM arguments every configuration shares.
fn vm_args(hosts: &Hosts, guest_arg: &str) -> Vec<String> {
    [
        "--guest",
        "net",
        "--tap",
        hosts.tap(),
        "--arg",
        guest_arg,
        "--quiet",
        "--mem-mib",
        "32",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `config` and waits until the guest answers on the load's port.
pub fn start(bench: &Bench, config: Config) -> Result<Running, String> {
    let status_path = bench.dir.join("status");
    let _ = std::fs::remove_dir_all(&status_path);
    let status_dir = status_path.to_string_lossy().into_owned();
    let guest_arg = bench.hosts.guest_arg().to_string();
    let vm = vm_args(bench.hosts, &guest_arg);
    let vm: Vec<&str> = vm.iter().map(String::as_str).collect();
    let mut running = match config {
        Config::FtOff => {
            let mut args = vec!["run"];
            args.extend(&vm);
            Running {
                procs: vec![spawn(bench, Ns::A, "vm", &args)?],
                stats: None,
                status_dir: status_path,
            }
        }
        Config::FtOn(variant) => {
            let link = match variant.transport {
                Transport::Tcp => format!("{}:{LINK_PORT}", bench.hosts.log_b()),
                Transport::Shm => bench.dir.join("link.sock").to_string_lossy().into_owned(),
            };
            if variant.transport == Transport::Shm {
                let _ = std::fs::remove_file(&link);
            }
            let stats = bench.dir.join("primary.json");
            let _ = std::fs::remove_file(&stats);
            // Both replicas prove a key of this run's own (`lockstep keygen`).
            let key = bench.dir.join("link.key");
            let _ = std::fs::remove_file(&key);
            let made = std::process::Command::new(bench.exe)
                .arg("keygen")
                .arg(&key)
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {} keygen: {e}", bench.exe.display()))?;
            if !made.success() {
                return Err(format!("`lockstep keygen {}` failed", key.display()));
            }
            let key_text = key.to_string_lossy().into_owned();
            let common = [
                "--link-key",
                &key_text,
                "--transport",
                variant.transport.name(),
                "--peer-timeout-ms",
                "60000",
                "--status-dir",
                &status_dir,
            ];
            let mut args = vec!["backup", "--listen", &link, "--quiet"];
            args.extend(common);
            let backup = spawn(bench, Ns::B, "backup", &args)?;
            // Dropping `running` on an error below stops the backup.
            let mut running = Running {
                procs: vec![backup],
                stats: Some(stats.clone()),
                status_dir: status_path,
            };
            let stats_text = stats.to_string_lossy().into_owned();
            let mut args = vec!["primary", "--backup", &link, "--stats", &stats_text];
            args.extend(&vm);
            args.extend(common);
            // Primary first: stopping it ends the backup.
            running
                .procs
                .insert(0, spawn(bench, Ns::A, "primary", &args)?);
            running
        }
    };
    wait_for_guest(bench, &mut running, &config.name())?;
    Ok(running)
}

/// Waits (up to 20 s) until the guest accepts a connection on the load's
/// port from the client's namespace.
pub fn wait_for_guest(bench: &Bench, running: &mut Running, what: &str) -> Result<(), String> {
    let address = SocketAddr::from((bench.hosts.guest(), bench.load.ready_port()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answered = bench.hosts.in_client(|| {
            std::net::TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok()
        })?;
        if answered {
            return Ok(());
        }
        running.check_alive()?;
        if Instant::now() > deadline {
            return Err(format!(
                "the {what} guest did not answer on {address} within 20 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs one measurement of `config` in `direction` under `scenario`'s
/// shaping (the logging link's from the variant).
pub fn one(
    bench: &mut Bench,
    scenario: &Scenario,
    index: usize,
    config: Config,
    direction: Direction,
) -> Sample {
    let began = Instant::now();
    let mut startup_s = f64::NAN;
    let mut stop_s = f64::NAN;
    let log_mbit = match config {
        Config::FtOn(variant) => variant.log_mbit,
        Config::FtOff => None,
    };
    let result = bench
        .hosts
        .shape(scenario.client_mbit, log_mbit)
        .and_then(|()| start(bench, config))
        .and_then(|mut running| {
            startup_s = began.elapsed().as_secs_f64();
            let pids = running.pids();
            let figures = {
                let mut alive = || running.check_alive();
                bench
                    .load
                    .run(bench.hosts, direction, bench.timing, &pids, &mut alive)
            };
            let stopping = Instant::now();
            running.stop();
            stop_s = stopping.elapsed().as_secs_f64();
            let figures = figures?;
            let mut measured = Measured::new(figures.mbit_s, figures.window_s, figures.cpu);
            measured.client_bytes = figures.client_bytes;
            measured.active_s = figures.active_s;
            running.read_reports(&mut measured);
            Ok(measured)
        });
    Sample {
        round: 0,
        scenario: index,
        config,
        direction,
        result,
        startup_s,
        stop_s,
    }
}

/// Records the primary's log of one receive run to a file
/// (`lockstep record` in host a, under `scenario`'s client link and the
/// same load) and takes it apart.
pub fn record_receive(bench: &mut Bench, scenario: &Scenario) -> Result<Anatomy, String> {
    bench.hosts.shape(scenario.client_mbit, None)?;
    let log = bench.dir.join("receive.log");
    let log_text = log.to_string_lossy().into_owned();
    let guest_arg = bench.hosts.guest_arg().to_string();
    let vm = vm_args(bench.hosts, &guest_arg);
    let mut args = vec!["record", "--log", &log_text];
    args.extend(vm.iter().map(String::as_str));
    let mut running = Running {
        procs: vec![spawn(bench, Ns::A, "recorder", &args)?],
        stats: None,
        status_dir: bench.dir.join("status"),
    };
    wait_for_guest(bench, &mut running, "recording")?;
    let pids = running.pids();
    let figures = {
        let mut alive = || running.check_alive();
        bench.load.run(
            bench.hosts,
            Direction::Receive,
            bench.timing,
            &pids,
            &mut alive,
        )
    };
    running.stop();
    figures?;
    let anatomy = Anatomy::of_file(&log);
    let _ = std::fs::remove_file(&log);
    anatomy
}
