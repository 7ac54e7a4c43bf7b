//! `lockstep chaos --trials N`: a randomized failover campaign.
//!
//! The campaign runs on a testbed of namespaces (the `testbed` crate) made
//! for it and removed after it: each trial starts an embedded arbiter in the
//! arbiter's namespace, a backup in host b and a primary of the `net` guest
//! in host a (real processes, real TAPs bridged to the client's switch), the
//! log over the logging link. A client in the client namespace increments a
//! counter and counts the INCRs it saw acknowledged. At a random moment one
//! fault strikes: the primary or the backup is killed with SIGKILL, or the
//! logging link is cut (nothing crosses, nothing is closed; the arbiter
//! stays reachable). The client carries on. At the end the trial checks:
//!
//! - **split brain**: two replicas won the same generation, or both are still
//!   running as live (must be 0);
//! - **lost acknowledged writes**: the counter reads less than the number of
//!   INCRs acknowledged to the client (must be 0).
//!
//! With `--reprotect`, once a replica runs alone after the fault, a third
//! replica joins it by state transfer (`lockstep backup --join`) from the
//! other host (after a partition, once the loser halted, the logging link
//! is restored first), and then the survivor is killed too: the joined
//! replica must go live with every acknowledged write, and no generation may
//! have two winners.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use testbed::{Link, Ns, Testbed};

pub mod cli;
pub mod deploy;
pub mod linearize;

use crate::linearize::{Call, Op, Reply, Verdict};

/// What stops a campaign.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error(transparent)]
    Testbed(#[from] testbed::TestbedError),
    #[error("{what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] lockstep_config::keys::KeyError),
    #[error("{0}")]
    Usage(String),
    /// The replicas' heartbeat settings do not fit together.
    #[error(transparent)]
    Liveness(#[from] replica::pair::LivenessError),
    /// The campaign judged the pair wrong (split brain, lost writes, …).
    #[error("{0}")]
    Verdict(String),
}

const TAP: &str = testbed::TAP;

/// The fault a trial injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of the primary.
    KillPrimary,
    /// SIGKILL of the backup.
    KillBackup,
    /// SIGSTOP of the primary (resumed with SIGCONT before the trial ends:
    /// it must learn it lost and halt).
    StopPrimary,
    /// SIGSTOP of the backup (resumed likewise).
    StopBackup,
    /// The logging link cut (both replicas keep their sockets).
    Partition,
    /// Host a's client link cut for a while: the pair is healthy, the
    /// clients cannot reach the primary; nobody may go live.
    CutClientA,
    /// The arbiter killed: the pair carries on, nobody needs it.
    KillArbiter,
}

impl Fault {
    /// Every kind, in the order the first trials of a campaign use them.
    pub const ALL: [Fault; 7] = [
        Fault::KillPrimary,
        Fault::KillBackup,
        Fault::StopPrimary,
        Fault::StopBackup,
        Fault::Partition,
        Fault::CutClientA,
        Fault::KillArbiter,
    ];

    /// Whether a replica must go live alone after it.
    fn needs_failover(self) -> bool {
        !matches!(self, Fault::CutClientA | Fault::KillArbiter)
    }
}

/// Totals of a campaign.
#[derive(Debug, Default)]
pub struct Campaign {
    /// Trials run.
    pub trials: u64,
    /// Trials in which a replica went live alone after winning the arbiter.
    pub failovers: u64,
    /// Trials with two live replicas in one generation (must be 0).
    pub split_brains: u64,
    /// Acknowledged INCRs missing from the final counter, summed (must be 0).
    pub lost_writes: u64,
    /// INCRs acknowledged, summed.
    pub acknowledged: u64,
    /// Re-protections: a new backup joined the survivor (with `--reprotect`).
    pub joins: u64,
    /// Joined backups that went live when the survivor was killed in turn.
    pub second_failovers: u64,
    /// Failover times: from the fault to the end of the longest reply gap
    /// of any client around it (see `recovery`), in ms, one per trial.
    pub failover_ms: Vec<f64>,
    /// The same, by fault kind.
    pub recovery_by_fault: Vec<(Fault, Vec<f64>)>,
    /// Operations recorded (all clients, all trials).
    pub operations: u64,
    /// Trials whose history is not linearizable (must be 0).
    pub violations: u64,
    /// Trials whose history the checker could not decide.
    pub undecided: u64,
    /// Frames the promoted backups resent at go-live, one entry per
    /// promotion.
    pub resent_frames: Vec<u64>,
    /// One JSON object per trial.
    pub trial_json: Vec<String>,
}

/// A small deterministic generator (`fastrand`'s wyrand), seeded per
/// campaign: a seed replays its campaign's choices.
type Random = fastrand::Rng;

/// Starts this program in namespace `ns` of `bed`.
fn spawn(
    bed: &Testbed,
    ns: Ns,
    exe: &Path,
    args: &[&str],
    stderr: Option<&Path>,
) -> Result<Child, ChaosError> {
    let mut command: Command = bed.command(ns, exe)?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match stderr {
        Some(path) => {
            let file = std::fs::File::create(path).map_err(|source| ChaosError::File {
                what: "cannot create",
                path: path.to_path_buf(),
                source,
            })?;
            command.stderr(file);
        }
        None => {
            command.stderr(Stdio::null());
        }
    }
    command.spawn().map_err(|source| ChaosError::File {
        what: "cannot start",
        path: exe.to_path_buf(),
        source,
    })
}

/// Sends one RESP command and reads its reply; `None` if the connection
/// failed (the operation may or may not have taken effect).
fn request(stream: &mut TcpStream, words: &[&str]) -> Option<Reply> {
    let mut message = format!("*{}\r\n", words.len());
    for word in words {
        message.push_str(&format!("${}\r\n{word}\r\n", word.len()));
    }
    stream.write_all(message.as_bytes()).ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        stream.read_exact(&mut byte).ok()?;
        line.push(byte[0]);
        if line.len() > 1 << 16 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    match line.first() {
        Some(b'+') => Some(Reply::Ok),
        Some(b'-') => Some(Reply::Error),
        Some(b':') => text.parse().ok().map(Reply::Int),
        Some(b'$') if text == "-1" => Some(Reply::Value(None)),
        Some(b'$') => {
            let len: usize = text.parse().ok()?;
            let mut body = vec![0u8; len.checked_add(2)?];
            stream.read_exact(&mut body).ok()?;
            Some(Reply::Value(Some(
                String::from_utf8_lossy(&body[..len]).into_owned(),
            )))
        }
        _ => None,
    }
}

/// Clients per trial.
const CLIENTS: u32 = 3;
/// The keys the clients share.
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
/// A key only ever INCRed (the lost-acknowledged-writes count).
const COUNTER: &str = "chaos";

/// Sends `signal` (`-STOP`, `-CONT`) to `child`.
fn signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

/// Every operation of a trial's clients.
struct History {
    start: Instant,
    ops: Vec<Op>,
}

impl History {
    /// The highest value an INCR of the counter was acknowledged with.
    fn acknowledged_incr(&self) -> u64 {
        self.ops
            .iter()
            .filter(|op| op.key == COUNTER && op.call == Call::Incr)
            .filter_map(|op| match op.reply {
                Some(Reply::Int(n)) => u64::try_from(n).ok(),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// The clients of a trial: each on its own connection (made from the
/// calling thread's namespace, the client's), issuing SET, GET and INCR on
/// shared keys without pause and recording each with its times.
struct Workers {
    start: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<thread::JoinHandle<Vec<Op>>>,
}

impl Workers {
    fn start(guest: Ipv4Addr, clients: u32, seed: u64) -> Self {
        let start = Instant::now();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = (0..clients)
            .map(|client| {
                let stop = std::sync::Arc::clone(&stop);
                thread::spawn(move || {
                    let ns = |at: Instant| at.saturating_duration_since(start).as_nanos() as u64;
                    let mut random = Random::with_seed(
                        seed ^ ((u64::from(client) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    );
                    let mut ops = Vec::new();
                    let mut stream: Option<TcpStream> = None;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let Some(connection) = stream.as_mut() else {
                            stream = connect(guest, Duration::from_secs(2));
                            continue;
                        };
                        let key = KEYS[random.usize(..KEYS.len())];
                        let value = random.u64(..1000).to_string();
                        let (key, call, words): (&str, Call, Vec<&str>) = match random.u64(..10) {
                            0..=2 => (key, Call::Set(value.clone()), vec!["SET", key, &value]),
                            3..=5 => (key, Call::Get, vec!["GET", key]),
                            6..=8 => (key, Call::Incr, vec!["INCR", key]),
                            _ => (COUNTER, Call::Incr, vec!["INCR", COUNTER]),
                        };
                        let invoked_ns = ns(Instant::now());
                        let reply = request(connection, &words);
                        let completed_ns = match reply {
                            Some(_) => ns(Instant::now()),
                            None => u64::MAX,
                        };
                        if reply.is_none() {
                            stream = None; // unanswered: reconnect
                        }
                        ops.push(Op {
                            client,
                            key: key.to_string(),
                            call,
                            reply,
                            invoked_ns,
                            completed_ns,
                        });
                    }
                    ops
                })
            })
            .collect();
        Self {
            start,
            stop,
            handles,
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_nanos() as u64
    }

    fn finish(self) -> History {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut ops = Vec::new();
        for handle in self.handles {
            if let Ok(mut more) = handle.join() {
                ops.append(&mut more);
            }
        }
        History {
            start: self.start,
            ops,
        }
    }
}

/// A connection to the guest's RESP port, made from the calling thread's
/// namespace (the campaign's client thread is in the client namespace).
fn connect(guest: Ipv4Addr, timeout: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + timeout;
    loop {
        let address = SocketAddr::from((guest, 6379));
        if let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_millis(500)) {
            stream.set_read_timeout(Some(Duration::from_secs(8))).ok()?;
            return Some(stream);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Kills what is still running, waits for every child; returns exit codes.
fn reap(children: &mut [(&str, Child)]) -> Vec<(String, Option<i32>)> {
    for (_, child) in children.iter_mut() {
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }
    let mut codes = Vec::new();
    for (name, child) in children.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait().ok();
        codes.push((name.to_string(), status.and_then(|s| s.code())));
    }
    codes
}

fn log_says(path: &Path, text: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|log| log.contains(text))
}

/// What one trial found.
struct Outcome {
    joined: bool,
    second_failover: bool,
    failover: bool,
    split_brain: bool,
    lost: u64,
    acknowledged: u64,
    recovered_after: Option<Duration>,
    fault: Fault,
    operations: u64,
    verdict: Verdict,
    resent: Vec<u64>,
    json: String,
}

/// Runs one trial on `bed`, from a thread inside its client namespace.
fn trial(
    bed: &Testbed,
    exe: &Path,
    dir: &Path,
    number: u64,
    random: &mut Random,
    reprotect: bool,
    liveness: &[String],
) -> Result<Outcome, ChaosError> {
    let at = bed.addresses().clone();
    let guest = at.guest;
    let guest_arg = at.guest_arg().to_string();
    // The first trials try every kind once (a short campaign covers them
    // all); then at random.
    let fault = match usize::try_from(number - 1) {
        Ok(i) if i < Fault::ALL.len() => Fault::ALL[i],
        _ => Fault::ALL[random.usize(..Fault::ALL.len())],
    };
    let fault_after = Duration::from_millis(200 + random.u64(..1200));
    // Ports inside the testbed's namespaces; a fresh one each trial.
    let port = 7600 + (number % 50) as u16;
    let arbiter_address = format!("{}:{}", at.arbiter, 7550 + (number % 50));
    let key = dir.join("key");
    std::fs::write(
        &key,
        format!("chaos campaign key {number:016x}, long enough"),
    )
    .map_err(|source| ChaosError::File {
        what: "cannot write",
        path: key.clone(),
        source,
    })?;
    let state = dir.join(format!("arbiter-{number}.state"));
    let key_text = key.to_string_lossy().into_owned();
    let state_text = state.to_string_lossy().into_owned();
    let arbiter = spawn(
        bed,
        Ns::Arbiter,
        exe,
        &[
            "arbiter",
            "--listen",
            &arbiter_address,
            "--state",
            &state_text,
            "--key-file",
            &key_text,
        ],
        None,
    )?;
    let arbiter_socket: SocketAddr = arbiter_address
        .parse()
        .map_err(|e| ChaosError::Usage(format!("arbiter address {arbiter_address}: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while bed
        .connect(Ns::A, arbiter_socket, Duration::from_millis(500))
        .is_err()
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
    }
    let link = format!("{}:{port}", at.log_b);
    // The campaign's own status directory: `lockstep status` on the host
    // never lists its replicas.
    let status_dir = dir.join("status").to_string_lossy().into_owned();
    let mut ft = vec![
        "--arbiter",
        arbiter_address.as_str(),
        "--arbiter-key",
        key_text.as_str(),
        "--status-dir",
        status_dir.as_str(),
    ];
    ft.extend(liveness.iter().map(String::as_str));
    let backup_log = dir.join(format!("backup-{number}.log"));
    let primary_log = dir.join(format!("primary-{number}.log"));
    let primary_join = format!("{}:{}", at.log_a, 7450 + (number % 50));
    let backup_join = format!("{}:{}", at.log_b, 7500 + (number % 50));
    let mut backup_args = vec![
        "backup", "--listen", &link, "--tap", TAP, "--id", "b", "--quiet",
    ];
    backup_args.extend(ft.iter().copied());
    if reprotect {
        backup_args.extend(["--join-listen", backup_join.as_str()]);
    }
    let backup = spawn(bed, Ns::B, exe, &backup_args, Some(&backup_log))?;
    let mut primary_args = vec![
        "primary",
        "--backup",
        &link,
        "--backup-id",
        "b",
        "--id",
        "a",
        "--guest",
        "net",
        "--tap",
        TAP,
        "--arg",
        &guest_arg,
        "--quiet",
    ];
    primary_args.extend(ft.iter().copied());
    if reprotect {
        primary_args.extend(["--join-listen", primary_join.as_str()]);
    }
    let primary = spawn(bed, Ns::A, exe, &primary_args, Some(&primary_log))?;
    let mut children = vec![
        ("arbiter", arbiter),
        ("backup", backup),
        ("primary", primary),
    ];

    // The bridges may still hold the guest's MAC where it was live in the
    // last trial: forget it, as a switch does when a port goes down, so
    // the clients' first frames are flooded. Not only the switch: when the
    // backup went live on host b, its gratuitous ARP taught host a's bridge
    // that the guest is behind the uplink (up0), and that bridge then
    // dropped every unicast frame for the guest coming in on up0 (the new
    // primary's guest is behind tap0) until the guest happened to send
    // something: the trials that served nobody for seconds.
    let mac = testbed::GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    for (ns, port) in [
        (Ns::Client, "a0"),
        (Ns::Client, "b0"),
        (Ns::A, "up0"),
        (Ns::B, "up0"),
    ] {
        let _ = Command::new("bridge")
            .args(["-n", &bed.netns(ns), "fdb", "del", &mac])
            .args(["dev", port, "master"])
            .stderr(Stdio::null())
            .status();
    }
    // Wait for the guest to serve before the fault clock starts.
    drop(connect(guest, Duration::from_secs(20)));
    let workers = Workers::start(guest, CLIENTS, random.u64(..));
    let mut cut: Option<Link> = None;
    let started = Instant::now();
    thread::sleep(fault_after);
    let struck_at = Instant::now();
    let struck_ns = workers.ns(struck_at);
    let (arbiter_child, backup_child, primary_child) = (0usize, 1usize, 2usize);
    let stopped = match fault {
        Fault::KillPrimary => {
            let _ = children[primary_child].1.kill();
            None
        }
        Fault::KillBackup => {
            let _ = children[backup_child].1.kill();
            None
        }
        Fault::StopPrimary => {
            signal(&children[primary_child].1, "-STOP");
            Some(primary_child)
        }
        Fault::StopBackup => {
            signal(&children[backup_child].1, "-STOP");
            Some(backup_child)
        }
        Fault::Partition => {
            bed.cut(Link::Log)?;
            cut = Some(Link::Log);
            None
        }
        Fault::CutClientA => {
            bed.cut(Link::ClientA)?;
            cut = Some(Link::ClientA);
            None
        }
        Fault::KillArbiter => {
            let _ = children[arbiter_child].1.kill();
            None
        }
    };
    // A frozen replica resumes once the other went live (or after 2 s):
    // it must learn that it lost and halt.
    if let Some(frozen) = stopped {
        let deadline = Instant::now() + Duration::from_secs(2);
        let survivor_log = if frozen == primary_child {
            &backup_log
        } else {
            &primary_log
        };
        while !log_says(survivor_log, "won generation 2") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(100));
        signal(&children[frozen].1, "-CONT");
    }
    if cut == Some(Link::ClientA) {
        thread::sleep(Duration::from_millis(500));
        bed.restore(Link::ClientA)?;
        cut = None;
    }
    let run_for = fault_after + Duration::from_millis(1500);
    thread::sleep(run_for.saturating_sub(started.elapsed()));
    // Re-protection: a third replica joins the survivor, then the survivor
    // dies too and the joined replica must take over.
    let joiner_log = dir.join(format!("joiner-{number}.log"));
    let mut joined = false;
    if reprotect {
        let deadline = Instant::now() + Duration::from_secs(10);
        let survivor = loop {
            if log_says(&primary_log, "won generation 2") {
                break Some((2usize, primary_join.as_str()));
            }
            if log_says(&backup_log, "won generation 2") {
                break Some((1usize, backup_join.as_str()));
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(Duration::from_millis(100));
        };
        if let Some((survivor, join_address)) = survivor {
            // The joiner runs on the other host, over the logging link: after
            // a partition, heal it once the loser has halted.
            let (joiner_host, loser) = if survivor == 2 {
                (Ns::B, 1usize)
            } else {
                (Ns::A, 2usize)
            };
            if cut == Some(Link::Log) {
                let deadline = Instant::now() + Duration::from_secs(10);
                while children[loser].1.try_wait().ok().flatten().is_none()
                    && Instant::now() < deadline
                {
                    thread::sleep(Duration::from_millis(100));
                }
                bed.restore(Link::Log)?;
                cut = None;
            }
            let mut joiner_args = vec![
                "backup",
                "--join",
                join_address,
                "--tap",
                TAP,
                "--id",
                "c",
                "--quiet",
            ];
            joiner_args.extend(ft.iter().copied());
            let joiner = spawn(bed, joiner_host, exe, &joiner_args, Some(&joiner_log))?;
            children.push(("joiner", joiner));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !joined && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
                joined = log_says(&joiner_log, "clone verified");
            }
            if joined {
                // Let it follow under load a while, then kill the survivor.
                thread::sleep(Duration::from_millis(300 + random.u64(..1000)));
                let _ = children[survivor].1.kill();
                thread::sleep(Duration::from_secs(3));
            }
        }
    }
    let mut history = workers.finish();
    // The final reads, as operations of their own.
    let final_value = {
        let mut final_value = 0;
        if let Some(mut connection) = connect(guest, Duration::from_secs(10)) {
            for key in KEYS.iter().chain([&COUNTER]) {
                let invoked = history.start.elapsed().as_nanos() as u64;
                let reply = request(&mut connection, &["GET", key]);
                let completed = history.start.elapsed().as_nanos() as u64;
                if *key == COUNTER
                    && let Some(Reply::Value(Some(v))) = &reply
                {
                    final_value = v.parse().unwrap_or(0);
                }
                history.ops.push(Op {
                    client: CLIENTS,
                    key: key.to_string(),
                    call: Call::Get,
                    completed_ns: if reply.is_some() { completed } else { u64::MAX },
                    reply,
                    invoked_ns: invoked,
                });
            }
        }
        final_value
    };
    let acknowledged = history.acknowledged_incr();
    let recovered_after = recovery(&history.ops, CLIENTS, struck_ns);
    // The trial's timeline (ns since the workload started).
    let first_reply = history
        .ops
        .iter()
        .filter(|op| op.reply.is_some())
        .map(|op| op.completed_ns)
        .min();
    let first_reply_after_fault = history
        .ops
        .iter()
        .filter(|op| op.reply.is_some() && op.completed_ns > struck_ns)
        .map(|op| op.completed_ns - struck_ns)
        .min();
    let verdict = crate::linearize::check(&history.ops);
    let codes = reap(&mut children);
    if let Some(link) = cut {
        bed.restore(link)?;
    }
    let backup_text = std::fs::read_to_string(&backup_log).unwrap_or_default();
    let primary_text = std::fs::read_to_string(&primary_log).unwrap_or_default();
    let joiner_text = std::fs::read_to_string(&joiner_log).unwrap_or_default();
    let backup_won = backup_text.contains("won generation 2");
    let primary_won = primary_text.contains("won generation 2");
    // Two winners of any generation is a split brain (the joined pair is
    // generation 3, the joined replica going live wins 4).
    let split_brain = (2..=6).any(|generation| {
        let won = format!("won generation {generation} ");
        [&backup_text, &primary_text, &joiner_text]
            .iter()
            .filter(|text| text.contains(&won))
            .count()
            > 1
    });
    // Split brain, judged from the arbiter's record: two replicas that
    // each served as primary of one generation. The record names who holds
    // the last generation; a replica whose log says it went live in that
    // generation but is not the one recorded is a second brain, and so are
    // two logs claiming one earlier generation.
    let names = [
        ("b", &backup_text),
        ("a", &primary_text),
        ("c", &joiner_text),
    ];
    let record = arbiter::state::load(&state)
        .ok()
        .and_then(|registry| registry.get(1).cloned());
    let claims = |generation: u64| {
        let won = format!("won generation {generation} ");
        names
            .iter()
            .filter(|(_, text)| text.contains(&won))
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
    };
    let split_brain = match &record {
        None => true, // no record: nothing was granted safely
        Some(record) => {
            let last = claims(record.generation);
            last.iter().any(|name| *name != record.primary.as_str())
                || (2..record.generation).any(|g| claims(g).len() > 1)
        }
    } || split_brain;
    let resent: Vec<u64> = names
        .iter()
        .filter_map(|(_, text)| {
            let at = text.find("; resent ")?;
            text[at + 9..].split_whitespace().next()?.parse().ok()
        })
        .collect();
    for text in [&backup_text, &primary_text, &joiner_text] {
        if let Some(line) = text.lines().find(|line| line.contains("; resent ")) {
            eprintln!("chaos: trial {number}: {line}");
        }
    }
    let second_failover = joiner_text.contains("won generation 4");
    let lost = acknowledged.saturating_sub(final_value);
    let verdict_text = match &verdict {
        Verdict::Linearizable => "linearizable".to_string(),
        Verdict::Violation { key, ops, clients } => {
            format!("NOT linearizable (key {key}, {ops} operations by {clients} clients)")
        }
        Verdict::Unknown { key } => format!("undecided (key {key})"),
    };
    let live = match (primary_won, backup_won) {
        (true, true) => "both",
        (true, false) => "primary",
        (false, true) => "backup",
        (false, false) => "nobody",
    };
    let json = format!(
        "{{\"trial\":{number},\"fault\":\"{fault:?}\",\"fault_after_ms\":{},\"live\":\"{live}\",\"generation\":{},\"recovery_ms\":{},\"operations\":{},\"unanswered\":{},\"verdict\":\"{}\",\"split_brain\":{split_brain},\"lost_acknowledged_writes\":{lost},\"resent_frames\":{:?},\"fault_ms\":{:.3},\"first_reply_ms\":{},\"first_reply_after_fault_ms\":{}}}",
        fault_after.as_millis(),
        record.as_ref().map_or(0, |r| r.generation),
        recovered_after.map_or("null".to_string(), |d| format!(
            "{:.3}",
            d.as_secs_f64() * 1000.0
        )),
        history.ops.len(),
        history.ops.iter().filter(|op| op.reply.is_none()).count(),
        verdict_text,
        resent,
        struck_ns as f64 / 1e6,
        ms_or_null(first_reply),
        ms_or_null(first_reply_after_fault),
    );
    eprintln!(
        "chaos: trial {number}: {fault:?} after {} ms; {} operations by {CLIENTS} clients, {verdict_text}; acknowledged {acknowledged}, counter {final_value}; service back after {}; live alone: {}; resent frames {resent:?}{}; exit codes {codes:?}",
        fault_after.as_millis(),
        history.ops.len(),
        recovered_after.map_or("never".to_string(), |d| format!("{} ms", d.as_millis())),
        if split_brain { "SPLIT BRAIN" } else { live },
        match (reprotect, joined, second_failover) {
            (false, _, _) => "",
            (true, true, true) => "; joined by c, which went live when the survivor was killed",
            (true, true, false) =>
                "; joined by c, which did NOT go live after the survivor was killed",
            (true, false, _) => "; no re-protection",
        }
    );
    Ok(Outcome {
        joined,
        second_failover,
        failover: primary_won || backup_won,
        split_brain,
        lost,
        acknowledged,
        recovered_after,
        fault,
        operations: history.ops.len() as u64,
        verdict,
        resent,
        json,
    })
}

/// Client-visible recovery: per client, the longest gap between replies
/// (from the start of the trial's workload, or a reply, to the next reply)
/// among those that end after the fault; the trial's figure is the latest
/// end of these, measured from the fault. A client that got no reply after
/// the fault makes it `None` (service never came back for it). Counting
/// the first reply after the fault instead would call a trial recovered
/// when one reply already on its way arrived, however long the service
/// stalled after it.
///
/// ```text
///  client 1: ─r──r──r──r─┊─r────────────────────r──r──r─   longest gap ends at R1
///  client 2: ─r──r──r────┊──────────────────r──r──r──r─    longest gap ends at R2
///                      fault                R2   R1        recovery = R1 - fault
/// ```
fn recovery(ops: &[Op], clients: u32, struck_ns: u64) -> Option<Duration> {
    let mut latest = 0u64;
    for client in 0..clients {
        let mut replies: Vec<u64> = ops
            .iter()
            .filter(|op| op.client == client && op.reply.is_some())
            .map(|op| op.completed_ns)
            .collect();
        replies.sort_unstable();
        if replies.last().is_none_or(|&last| last <= struck_ns) {
            return None;
        }
        let mut previous = 0u64;
        let mut longest: Option<(u64, u64)> = None;
        for &at in &replies {
            let gap = at.saturating_sub(previous);
            if at > struck_ns && longest.is_none_or(|(g, _)| gap > g) {
                longest = Some((gap, at));
            }
            previous = at;
        }
        if let Some((_, end)) = longest {
            latest = latest.max(end.saturating_sub(struck_ns));
        }
    }
    Some(Duration::from_nanos(latest))
}

fn ms_or_null(ns: Option<u64>) -> String {
    ns.map_or("null".to_string(), |ns| format!("{:.3}", ns as f64 / 1e6))
}

/// Runs `trials` trials with `seed` (with `reprotect`, a new backup joins
/// the survivor of each trial and then takes over from it). `exe` is the
/// `lockstep` binary the replicas and the arbiter run; `liveness` the
/// heartbeat flags every replica gets.
pub fn run(
    trials: u64,
    seed: u64,
    reprotect: bool,
    liveness: &[String],
    exe: &Path,
) -> Result<Campaign, ChaosError> {
    let bed = Testbed::up(&testbed::Config::new("chaos"))?;
    let dir = std::env::temp_dir().join(format!("lockstep-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| ChaosError::File {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;
    let mut random = Random::with_seed(seed);
    let mut campaign = Campaign::default();
    // The client's thread lives in the client namespace: every connection
    // to the guest it makes starts there. Processes are started in their
    // own namespaces whatever the thread's.
    thread::scope(|scope| {
        thread::Builder::new()
            .name("chaos-client".into())
            .spawn_scoped(scope, || -> Result<(), ChaosError> {
                bed.enter(Ns::Client)?;
                for number in 1..=trials {
                    let outcome = trial(&bed, exe, &dir, number, &mut random, reprotect, liveness)?;
                    campaign.trials += 1;
                    campaign.joins += u64::from(outcome.joined);
                    campaign.second_failovers += u64::from(outcome.second_failover);
                    campaign.failovers += u64::from(outcome.failover);
                    campaign.split_brains += u64::from(outcome.split_brain);
                    campaign.lost_writes += outcome.lost;
                    campaign.acknowledged += outcome.acknowledged;
                    campaign.operations += outcome.operations;
                    match outcome.verdict {
                        Verdict::Linearizable => {}
                        Verdict::Violation { .. } => campaign.violations += 1,
                        Verdict::Unknown { .. } => campaign.undecided += 1,
                    }
                    campaign.resent_frames.extend(&outcome.resent);
                    campaign.trial_json.push(outcome.json);
                    if let Some(after) = outcome.recovered_after {
                        let ms = after.as_secs_f64() * 1000.0;
                        if outcome.fault.needs_failover() {
                            campaign.failover_ms.push(ms);
                        }
                        match campaign
                            .recovery_by_fault
                            .iter_mut()
                            .find(|(fault, _)| *fault == outcome.fault)
                        {
                            Some((_, times)) => times.push(ms),
                            None => campaign.recovery_by_fault.push((outcome.fault, vec![ms])),
                        }
                    }
                }
                Ok(())
            })
            .map_err(|source| ChaosError::File {
                what: "cannot start the chaos client thread",
                path: PathBuf::from("chaos-client"),
                source,
            })?
            .join()
            .map_err(|_| ChaosError::Usage("the chaos client thread panicked".into()))?
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(campaign)
}

/// The `p`-quantile (0..=1) of `times` (sorted here), nearest rank.
fn quantile(times: &mut [f64], p: f64) -> f64 {
    if times.is_empty() {
        return f64::NAN;
    }
    times.sort_by(f64::total_cmp);
    let rank = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len());
    times[rank - 1]
}

/// Prints recovery p50/p99 per fault kind and the resent frames, and
/// writes the JSON report to `json` if given.
pub fn report(campaign: &Campaign, json: Option<&Path>) -> Result<(), ChaosError> {
    let mut kinds = Vec::new();
    for (fault, times) in &campaign.recovery_by_fault {
        let mut times = times.clone();
        let (p50, p99) = (quantile(&mut times, 0.5), quantile(&mut times, 0.99));
        println!(
            "chaos: {fault:?}: {} trials, client served again after p50 {p50:.1} ms, p99 {p99:.1} ms",
            times.len()
        );
        kinds.push(format!(
            "{{\"fault\":\"{fault:?}\",\"trials\":{},\"recovery_p50_ms\":{p50:.3},\"recovery_p99_ms\":{p99:.3}}}",
            times.len()
        ));
    }
    let resent = &campaign.resent_frames;
    if !resent.is_empty() {
        let mut frames: Vec<f64> = resent.iter().map(|&n| n as f64).collect();
        println!(
            "chaos: promoted backups resent p50 {:.0}, max {:.0} frames at go-live ({} promotions)",
            quantile(&mut frames, 0.5),
            quantile(&mut frames, 1.0),
            resent.len()
        );
    }
    let Some(path) = json else {
        return Ok(());
    };
    let text = format!(
        "{{\"trials\":[{}],\"summary\":{{\"trials\":{},\"failovers\":{},\"split_brains\":{},\"lost_acknowledged_writes\":{},\"linearizability_violations\":{},\"undecided\":{},\"operations\":{},\"by_fault\":[{}],\"resent_frames\":{:?}}}}}\n",
        campaign.trial_json.join(","),
        campaign.trials,
        campaign.failovers,
        campaign.split_brains,
        campaign.lost_writes,
        campaign.violations,
        campaign.undecided,
        campaign.operations,
        kinds.join(","),
        campaign.resent_frames,
    );
    std::fs::write(path, text).map_err(|source| ChaosError::File {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(client: u32, completed_ms: u64) -> Op {
        Op {
            client,
            key: "k".into(),
            call: Call::Get,
            reply: Some(Reply::Value(None)),
            invoked_ns: 0,
            completed_ns: completed_ms * 1_000_000,
        }
    }

    /// Recovery is the end of the longest gap around the fault, not the
    /// first reply after it; a client never served again makes it `None`.
    #[test]
    fn recovery_is_the_end_of_the_longest_reply_gap_per_client() {
        let fault = 100 * 1_000_000;
        // Client 0: one reply right after the fault, then a 900 ms gap.
        // Client 1: replies every 10 ms throughout.
        let mut ops = vec![reply(0, 90), reply(0, 101), reply(0, 1001), reply(0, 1010)];
        ops.extend((1..150).map(|i| reply(1, i * 10)));
        assert_eq!(recovery(&ops, 2, fault), Some(Duration::from_millis(901)));
        // A gap from the start of the workload counts too.
        let ops = vec![reply(0, 3000), reply(0, 3010)];
        assert_eq!(recovery(&ops, 1, fault), Some(Duration::from_millis(2900)));
        // A client with no reply after the fault: never recovered.
        let ops = vec![reply(0, 50), reply(1, 50), reply(1, 200)];
        assert_eq!(recovery(&ops, 2, fault), None);
    }
}
