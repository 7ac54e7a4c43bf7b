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

use crate::CliError;

const TAP: &str = testbed::TAP;

/// The fault a trial injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillPrimary,
    KillBackup,
    Partition,
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
    /// Failover times: from the fault to the client's first acknowledged
    /// reply afterwards, in ms, one per trial.
    pub failover_ms: Vec<f64>,
}

/// A small deterministic generator (xorshift), seeded per campaign.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// Starts this program in namespace `ns` of `bed`.
fn spawn(
    bed: &Testbed,
    ns: Ns,
    exe: &Path,
    args: &[&str],
    stderr: Option<&Path>,
) -> Result<Child, CliError> {
    let mut command: Command = bed.command(ns, exe)?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match stderr {
        Some(path) => {
            let file = std::fs::File::create(path).map_err(|source| CliError::File {
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
    command.spawn().map_err(|source| CliError::File {
        what: "cannot start",
        path: exe.to_path_buf(),
        source,
    })
}

fn resp(stream: &mut TcpStream, words: &[&str]) -> Option<String> {
    let mut request = format!("*{}\r\n", words.len());
    for word in words {
        request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        stream.read_exact(&mut byte).ok()?;
        reply.push(byte[0]);
    }
    if reply.starts_with(b"$") {
        let len: usize = String::from_utf8_lossy(&reply[1..reply.len() - 2])
            .parse()
            .ok()?;
        let mut body = vec![0u8; len + 2];
        stream.read_exact(&mut body).ok()?;
        return Some(String::from_utf8_lossy(&body[..len]).into_owned());
    }
    Some(String::from_utf8_lossy(&reply[..reply.len() - 2]).into_owned())
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

/// Sends INCRs for `duration`, counting the acknowledged ones; reconnects
/// after a failure. Returns when the time is up.
fn incr_for(
    guest: Ipv4Addr,
    stream: &mut Option<TcpStream>,
    acknowledged: &mut u64,
    duration: Duration,
) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        let Some(connection) = stream.as_mut() else {
            *stream = connect(guest, Duration::from_secs(2));
            continue;
        };
        match resp(connection, &["INCR", "chaos"]) {
            Some(reply) if reply.starts_with(':') => {
                if let Ok(value) = reply[1..].parse::<u64>() {
                    *acknowledged = (*acknowledged).max(value);
                }
            }
            _ => *stream = None,
        }
    }
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
) -> Result<Outcome, CliError> {
    let at = bed.addresses().clone();
    let guest = at.guest;
    let guest_arg = at.guest_arg().to_string();
    let fault = match random.below(3) {
        0 => Fault::KillPrimary,
        1 => Fault::KillBackup,
        _ => Fault::Partition,
    };
    let fault_after = Duration::from_millis(200 + random.below(1200));
    // Ports inside the testbed's namespaces; a fresh one each trial.
    let port = 7600 + (number % 50) as u16;
    let arbiter_address = format!("{}:{}", at.arbiter, 7550 + (number % 50));
    let key = dir.join("key");
    std::fs::write(
        &key,
        format!("chaos campaign key {number:016x}, long enough"),
    )
    .map_err(|source| CliError::File {
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
        .map_err(|e| CliError::Usage(format!("arbiter address {arbiter_address}: {e}")))?;
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

    let mut acknowledged = 0u64;
    let mut stream = connect(guest, Duration::from_secs(20));
    let mut cut = false;
    let started = Instant::now();
    let mut struck = false;
    let mut struck_at = None;
    let mut recovered_after = None;
    let run_for = fault_after + Duration::from_secs(3);
    while started.elapsed() < run_for {
        if !struck && started.elapsed() >= fault_after {
            struck = true;
            struck_at = Some(Instant::now());
            match fault {
                Fault::KillPrimary => {
                    let _ = children[2].1.kill();
                }
                Fault::KillBackup => {
                    let _ = children[1].1.kill();
                }
                Fault::Partition => {
                    bed.cut(Link::Log)?;
                    cut = true;
                }
            }
        }
        let Some(connection) = stream.as_mut() else {
            stream = connect(guest, Duration::from_secs(2));
            continue;
        };
        match resp(connection, &["INCR", "chaos"]) {
            Some(reply) if reply.starts_with(':') => {
                if let Ok(value) = reply[1..].parse::<u64>() {
                    acknowledged = acknowledged.max(value);
                }
                if recovered_after.is_none() {
                    recovered_after = struck_at.map(|at| at.elapsed());
                }
            }
            _ => stream = None, // unanswered: not acknowledged; reconnect
        }
    }
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
            incr_for(
                guest,
                &mut stream,
                &mut acknowledged,
                Duration::from_millis(100),
            );
        };
        if let Some((survivor, join_address)) = survivor {
            // The joiner runs on the other host, over the logging link: after
            // a partition, heal it once the loser has halted.
            let (joiner_host, loser) = if survivor == 2 {
                (Ns::B, 1usize)
            } else {
                (Ns::A, 2usize)
            };
            if cut {
                let deadline = Instant::now() + Duration::from_secs(10);
                while children[loser].1.try_wait().ok().flatten().is_none()
                    && Instant::now() < deadline
                {
                    incr_for(
                        guest,
                        &mut stream,
                        &mut acknowledged,
                        Duration::from_millis(100),
                    );
                }
                bed.restore(Link::Log)?;
                cut = false;
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
                incr_for(
                    guest,
                    &mut stream,
                    &mut acknowledged,
                    Duration::from_millis(100),
                );
                joined = log_says(&joiner_log, "clone verified");
            }
            if joined {
                // Let it follow under load a while, then kill the survivor.
                incr_for(
                    guest,
                    &mut stream,
                    &mut acknowledged,
                    Duration::from_millis(300 + random.below(1000)),
                );
                let _ = children[survivor].1.kill();
                incr_for(
                    guest,
                    &mut stream,
                    &mut acknowledged,
                    Duration::from_secs(3),
                );
            }
        }
    }
    let final_value = connect(guest, Duration::from_secs(10))
        .and_then(|mut connection| resp(&mut connection, &["GET", "chaos"]))
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    let codes = reap(&mut children);
    if cut {
        bed.restore(Link::Log)?;
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
    let second_failover = joiner_text.contains("won generation 4");
    let lost = acknowledged.saturating_sub(final_value);
    eprintln!(
        "chaos: trial {number}: {fault:?} after {} ms; acknowledged {acknowledged}, counter {final_value}; service back after {}; live alone: {}{}; exit codes {codes:?}",
        fault_after.as_millis(),
        recovered_after.map_or("never".to_string(), |d| format!("{} ms", d.as_millis())),
        match (primary_won, backup_won) {
            (true, true) => "BOTH (split brain)",
            (true, false) => "primary",
            (false, true) => "backup",
            (false, false) => "nobody",
        },
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
    })
}

/// Runs `trials` trials with `seed` (with `reprotect`, a new backup joins
/// the survivor of each trial and then takes over from it).
pub fn run(
    trials: u64,
    seed: u64,
    reprotect: bool,
    liveness: crate::ft::LivenessArgs,
) -> Result<Campaign, CliError> {
    let exe = std::env::current_exe().map_err(|source| CliError::File {
        what: "cannot find this program",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let bed = Testbed::up(&testbed::Config::new("chaos"))?;
    let dir = std::env::temp_dir().join(format!("lockstep-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| CliError::File {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;
    let mut random = Random(seed.max(1));
    let mut campaign = Campaign::default();
    // The client's thread lives in the client namespace: every connection
    // to the guest it makes starts there. Processes are started in their
    // own namespaces whatever the thread's.
    thread::scope(|scope| {
        thread::Builder::new()
            .name("chaos-client".into())
            .spawn_scoped(scope, || -> Result<(), CliError> {
                bed.enter(Ns::Client)?;
                for number in 1..=trials {
                    let outcome = trial(
                        &bed,
                        &exe,
                        &dir,
                        number,
                        &mut random,
                        reprotect,
                        &liveness.flags(),
                    )?;
                    campaign.trials += 1;
                    campaign.joins += u64::from(outcome.joined);
                    campaign.second_failovers += u64::from(outcome.second_failover);
                    campaign.failovers += u64::from(outcome.failover);
                    campaign.split_brains += u64::from(outcome.split_brain);
                    campaign.lost_writes += outcome.lost;
                    campaign.acknowledged += outcome.acknowledged;
                    if let Some(after) = outcome.recovered_after {
                        campaign.failover_ms.push(after.as_secs_f64() * 1000.0);
                    }
                }
                Ok(())
            })
            .map_err(|source| CliError::File {
                what: "cannot start the chaos client thread",
                path: PathBuf::from("chaos-client"),
                source,
            })?
            .join()
            .map_err(|_| CliError::Usage("the chaos client thread panicked".into()))?
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(campaign)
}
