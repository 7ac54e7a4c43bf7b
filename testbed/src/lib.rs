//! The paper's hosts, emulated: a client, a primary host, a backup host and
//! an arbiter, each a network namespace, joined by veth links shaped with
//! `tbf`. Nothing of it appears in the root namespace, and the namespaces
//! have no route anywhere else: test, benchmark and chaos traffic stays
//! inside them.
//!
//! ```text
//!  lst-<run>-client                      lst-<run>-a (host a: the primary)
//!  ┌────────────────────────┐ client-a  ┌──────────────────────────────────┐
//!  │ sw0 (bridge, "switch") │ a0 ══ up0 │ br0 (host bridge) ── tap0 (guest)│
//!  │  client 10.X.Y.1 ──────┤           │  lan_a 10.X.Y.11                 │
//!  │                        │ client-b  │ log0 10.X.Y+1.1 ══╗ log          │
//!  │                        │ b0 ══ up0 │ mg0  10.X.Y+2.2 ═╗║              │
//!  └────────────────────────┘     ║     └──────────────────║║──────────────┘
//!                                 ║     lst-<run>-b (host b: the backup)
//!                                 ║     ┌──────────────────║║──────────────┐
//!                                 ╚═════╡ up0 ── br0 ── tap0 (guest, after │
//!                                       │  lan_b .12         go-live)      │
//!  lst-<run>-arb                        │ log0 10.X.Y+1.2 ══╝              │
//!  ┌────────────────────────┐  mgmt-a   │ mg0  10.X.Y+2.3 ═╗               │
//!  │ mg0 (bridge) ── a0 ════╪═══════════╪══(host a's mg0)  ║               │
//!  │  arbiter 10.X.Y+2.1 b0 ╪═══════════╪══════════════════╝ mgmt-b        │
//!  └────────────────────────┘           └──────────────────────────────────┘
//! ```
//!
//! - **Client segment.** The switch `sw0` lives in the client namespace and
//!   joins each host's uplink; each host bridges its uplink with the guest's
//!   TAP `tap0` (a persistent TAP the VMM attaches to). Both replicas use the
//!   guest's one MAC: when the backup goes live, its gratuitous ARP crosses
//!   host b's uplink and the switch learns the guest's MAC on port `b0`, as
//!   a physical switch would. [`Testbed::status`] shows the port.
//! - **Logging link** `log0`: a veth between host a and host b, its own
//!   subnet; the replicas' channel (TCP) and joins run over it.
//! - **Management**: both hosts reach the arbiter's namespace.
//! - **Shaping.** Every link is shaped on the egress of both ends with `tbf`
//!   ([`Rate`], [`Tbf`]); rates are set at [`Testbed::up`] and changed with
//!   [`Testbed::set_rate`]. [`Testbed::cut`] takes a link down at both ends
//!   (sockets stay open, nothing crosses: a partition) and
//!   [`Testbed::restore`] brings it back.
//! - **Runs.** Each testbed holds a slot, recorded under
//!   `/run/lockstep-testbed/` with its owner's pid (and start time). The
//!   slot gives the run id, the namespace names (`lst-<run>-client`, `-a`,
//!   `-b`, `-arb`) and the subnets ([`Addresses`]), so two runs at once
//!   never collide; inside a namespace, interface names and ports are the
//!   run's own. Dropping the [`Testbed`] removes it (after SIGKILLing what
//!   still runs inside); a run whose owner died is removed by the next
//!   [`Testbed::up`] on the host.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns) and iproute2 (`ip`,
//! `tc`, `bridge`).
//!
//! # Usage
//!
//! ```no_run
//! use testbed::{Config, Link, Ns, Rate, Testbed};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Table 2's setting: a 1 Gbit/s client link, a 1 Gbit/s logging link.
//! let bed = Testbed::up(&Config {
//!     client_link: Rate::Mbit(1000),
//!     log_link: Rate::Mbit(1000),
//!     ..Config::new("bench")
//! })?;
//! let at = bed.addresses().clone();
//! // The backup in host b, listening on its end of the logging link …
//! let backup = bed
//!     .command(Ns::B, "lockstep")?
//!     .args(["backup", "--listen", &format!("{}:7700", at.log_b)])
//!     .args(["--tap", testbed::TAP])
//!     .spawn()?;
//! // … the primary in host a, serving the guest at `at.guest` on tap0.
//! let primary = bed
//!     .command(Ns::A, "lockstep")?
//!     .args(["primary", "--backup", &format!("{}:7700", at.log_b)])
//!     .args(["--guest", "net", "--tap", testbed::TAP])
//!     .args(["--arg", &at.guest_arg().to_string()])
//!     .spawn()?;
//! // A stock client in the client namespace …
//! let status = bed
//!     .command(Ns::Client, "iperf3")?
//!     .args(["-c", &at.guest.to_string(), "-t", "10"])
//!     .status()?;
//! // … or an in-process one: the socket is made inside the namespace.
//! let stream = bed.connect(Ns::Client, (at.guest, 6379).into(), std::time::Duration::from_secs(5))?;
//! // The 10 Gbit/s column, then a partition of the logging link.
//! bed.set_rate(Link::Log, Rate::Mbit(10_000))?;
//! bed.cut(Link::Log)?;
//! bed.restore(Link::Log)?;
//! println!("{}", bed.status()?);
//! # drop((backup, primary, status, stream));
//! # Ok(()) }
//! // Dropping `bed` removes every namespace, link and TAP.
//! ```
//!
//! FT off is one VM in host a (`lockstep run --tap tap0 --arg …` through
//! `bed.command(Ns::A, …)`); the unshaped variant is `Rate::Unshaped` on
//! every link.

pub mod cli;
pub mod etcd;
mod netns;
pub mod plan;

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use plan::{
    Addresses, GUEST_MAC, Link, MAX_EXTRA_HOSTS, MAX_SLOTS, Ns, PREFIX, Rate, Record, TAP, Tbf,
};

/// Where the runs' state files (and the lock that orders their creation
/// and clean-up) live.
pub const STATE_DIR: &str = "/run/lockstep-testbed";

/// Errors of the testbed, each naming the command, file or namespace.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// An iproute2 command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr (and its exit status).
        stderr: String,
    },
    /// A program could not be started at all.
    #[error("cannot run `{program}` (the testbed needs iproute2 and root)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A state file or directory could not be used.
    #[error("{what} {}", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A state file that does not parse.
    #[error("testbed state file {} is malformed: {reason}", path.display())]
    BadState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Entering a namespace failed (it does not exist, or no CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {name} (does the testbed exist? setns needs root)")]
    Enter {
        /// The namespace.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A closure run inside a namespace panicked.
    #[error("the thread running inside network namespace {name} panicked")]
    Thread {
        /// The namespace.
        name: String,
    },
    /// Every slot is held by a live run.
    #[error("all {0} testbed slots are taken (see `lockstep testbed status`)")]
    NoFreeSlot(u16),
    /// No such run.
    #[error("no testbed {0} on this host (see `lockstep testbed status`)")]
    NotFound(String),
    /// Which testbed or what to do is unclear (none or several running,
    /// conflicting arguments).
    #[error("{0}")]
    Choice(String),
}

/// How to build a testbed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Both hosts' client-facing links (the paper: 1 Gbit/s).
    pub client_link: Rate,
    /// The logging link (the paper: 1 or 10 Gbit/s).
    pub log_link: Rate,
    /// Both management links.
    pub mgmt_link: Rate,
    /// A word recorded in the state file (`up`, `test`, `bench`, …).
    pub label: String,
}

impl Config {
    /// Every link unshaped, with `label`.
    pub fn new(label: &str) -> Config {
        Config {
            client_link: Rate::Unshaped,
            log_link: Rate::Unshaped,
            mgmt_link: Rate::Unshaped,
            label: label.to_string(),
        }
    }

    /// The configured rate of `link`.
    pub fn rate(&self, link: Link) -> Rate {
        match link {
            Link::ClientA | Link::ClientB => self.client_link,
            Link::Log => self.log_link,
            Link::MgmtA | Link::MgmtB => self.mgmt_link,
        }
    }
}

/// A running testbed. Owned (made by [`Testbed::up`]) it is removed on drop;
/// attached ([`Testbed::attach`], or after [`Testbed::keep`]) it is not.
#[derive(Debug)]
pub struct Testbed {
    record: Record,
    addresses: Addresses,
    owned: bool,
}

/// A held exclusive lock on the state directory.
struct StateLock(#[allow(dead_code)] File);

fn lock_state() -> Result<StateLock, TestbedError> {
    let dir = Path::new(STATE_DIR);
    std::fs::create_dir_all(dir).map_err(|source| TestbedError::File {
        what: "cannot create the testbed state directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| TestbedError::File {
            what: "cannot open",
            path: path.clone(),
            source,
        })?;
    file.lock().map_err(|source| TestbedError::File {
        what: "cannot lock",
        path,
        source,
    })?;
    Ok(StateLock(file))
}

fn state_path(run: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{run}.state"))
}

/// The start time of process `pid`, if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    plan::start_time_from_stat(&stat)
}

/// Runs an iproute2 program; fails with its command line and stderr.
fn run_tool(program: &str, args: &[&str]) -> Result<String, TestbedError> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(TestbedError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: format!(
                "{} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip -n NS ARGS…`.
fn ip_in(netns: &str, args: &[&str]) -> Result<String, TestbedError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run_tool("ip", &all)
}

/// `tc -n NS ARGS…`.
fn tc_in(netns: &str, args: &[&str]) -> Result<String, TestbedError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run_tool("tc", &all)
}

/// Removes run `run`'s namespaces (SIGKILLing what runs inside) and its
/// state file. Missing pieces are fine: this is also the stale clean-up.
fn remove_run(run: &str) {
    let names = Ns::ALL
        .into_iter()
        .map(|ns| plan::namespace_name(run, ns))
        .chain((0..plan::MAX_EXTRA_HOSTS).map(|i| plan::extra_host_name(run, i)));
    for name in names {
        if netns::path(&name).exists() {
            netns::kill_all_in(&name);
            let _ = run_tool("ip", &["netns", "del", &name]);
        }
    }
    let _ = std::fs::remove_file(state_path(run));
}

/// Every record in the state directory, with whether its owner still runs
/// (persistent runs count as alive).
fn read_records() -> Result<Vec<(Record, bool)>, TestbedError> {
    let dir = Path::new(STATE_DIR);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TestbedError::File {
                what: "cannot read",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut records = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.extension() != Some(OsStr::new("state")) {
            continue;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(TestbedError::File {
                    what: "cannot read",
                    path,
                    source,
                });
            }
        };
        let record = Record::parse(&text).map_err(|reason| TestbedError::BadState {
            path: path.clone(),
            reason,
        })?;
        let alive = record.persistent || start_time(record.pid) == Some(record.start);
        records.push((record, alive));
    }
    records.sort_by_key(|(record, _)| record.slot);
    Ok(records)
}

/// With the state lock held: removes runs whose owner died and testbed
/// namespaces that no state file claims (a run killed while it was being
/// removed). Returns the run ids removed.
fn clean_stale_locked() -> Result<Vec<String>, TestbedError> {
    let records = read_records()?;
    let mut removed = Vec::new();
    for (record, alive) in &records {
        if !alive {
            remove_run(&record.run);
            removed.push(record.run.clone());
        }
    }
    let claimed: std::collections::HashSet<&str> =
        records.iter().map(|(r, _)| r.run.as_str()).collect();
    if let Ok(entries) = std::fs::read_dir(netns::NETNS_DIR) {
        for entry in entries.filter_map(Result::ok) {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if let Some((run, _)) = plan::parse_namespace_name(&name)
                && !claimed.contains(run.as_str())
            {
                netns::kill_all_in(&name);
                let _ = run_tool("ip", &["netns", "del", &name]);
                if !removed.contains(&run) {
                    removed.push(run);
                }
            }
        }
    }
    Ok(removed)
}

impl Testbed {
    /// Builds a testbed: claims a slot (removing stale runs first), creates
    /// the namespaces, bridges, TAPs and links, and shapes them.
    pub fn up(config: &Config) -> Result<Testbed, TestbedError> {
        let record = {
            let _lock = lock_state()?;
            clean_stale_locked()?;
            Self::claim(&config.label)?
        };
        let testbed = Testbed {
            addresses: Addresses::for_slot(record.slot),
            record,
            owned: true,
        };
        // On failure, dropping `testbed` removes what was made.
        testbed.build(config)?;
        testbed.wait_forwarding()?;
        Ok(testbed)
    }

    /// Writes the state file of the lowest free slot (the lock is held).
    fn claim(label: &str) -> Result<Record, TestbedError> {
        let pid = std::process::id();
        let start = start_time(pid).unwrap_or(0);
        for slot in 0..MAX_SLOTS {
            let run = plan::run_id(slot);
            let path = state_path(&run);
            let record = Record {
                run,
                slot,
                pid,
                start,
                persistent: false,
                label: label.split_whitespace().collect::<Vec<_>>().join("-"),
            };
            match File::options().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    file.write_all(record.to_text().as_bytes())
                        .map_err(|source| TestbedError::File {
                            what: "cannot write",
                            path,
                            source,
                        })?;
                    return Ok(record);
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(TestbedError::File {
                        what: "cannot create",
                        path,
                        source,
                    });
                }
            }
        }
        Err(TestbedError::NoFreeSlot(MAX_SLOTS))
    }

    fn build(&self, config: &Config) -> Result<(), TestbedError> {
        let a = &self.addresses;
        let cidr = |address: std::net::Ipv4Addr| format!("{address}/{}", a.prefix);
        let [client, host_a, host_b, arb] = Ns::ALL.map(|ns| self.netns(ns));
        for name in [&client, &host_a, &host_b, &arb] {
            run_tool("ip", &["netns", "add", name])?;
            // No IPv6: its router and neighbour chatter would reach the
            // guest as frames to log and replay.
            netns::run_in(name, || {
                for knob in ["all", "default"] {
                    let _ =
                        std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
                }
            })?;
            ip_in(name, &["link", "set", "lo", "up"])?;
        }
        // The switch, with the client's address on it.
        ip_in(&client, &["link", "add", "sw0", "type", "bridge"])?;
        ip_in(&client, &["addr", "add", &cidr(a.client), "dev", "sw0"])?;
        ip_in(&client, &["link", "set", "sw0", "up"])?;
        // The management bridge, with the arbiter's address on it.
        ip_in(&arb, &["link", "add", "mg0", "type", "bridge"])?;
        ip_in(&arb, &["addr", "add", &cidr(a.arbiter), "dev", "mg0"])?;
        ip_in(&arb, &["link", "set", "mg0", "up"])?;
        for (host, ns) in [(&host_a, Ns::A), (&host_b, Ns::B)] {
            let port = if ns == Ns::A { "a0" } else { "b0" };
            // The host bridge: its uplink and the guest's TAP.
            ip_in(host, &["link", "add", "br0", "type", "bridge"])?;
            if let Some(lan) = a.lan(ns) {
                ip_in(host, &["addr", "add", &cidr(lan), "dev", "br0"])?;
            }
            ip_in(host, &["link", "set", "br0", "up"])?;
            ip_in(host, &["tuntap", "add", "dev", TAP, "mode", "tap"])?;
            ip_in(host, &["link", "set", TAP, "master", "br0", "up"])?;
            ip_in(
                host,
                &[
                    "link", "add", "up0", "type", "veth", "peer", "name", port, "netns", &client,
                ],
            )?;
            ip_in(host, &["link", "set", "up0", "master", "br0", "up"])?;
            ip_in(&client, &["link", "set", port, "master", "sw0", "up"])?;
            // Management.
            ip_in(
                host,
                &[
                    "link", "add", "mg0", "type", "veth", "peer", "name", port, "netns", &arb,
                ],
            )?;
            if let Some(mgmt) = a.mgmt(ns) {
                ip_in(host, &["addr", "add", &cidr(mgmt), "dev", "mg0"])?;
            }
            ip_in(host, &["link", "set", "mg0", "up"])?;
            ip_in(&arb, &["link", "set", port, "master", "mg0", "up"])?;
        }
        // The logging link.
        ip_in(
            &host_a,
            &[
                "link", "add", "log0", "type", "veth", "peer", "name", "log0", "netns", &host_b,
            ],
        )?;
        for (host, address) in [(&host_a, a.log_a), (&host_b, a.log_b)] {
            ip_in(host, &["addr", "add", &cidr(address), "dev", "log0"])?;
            ip_in(host, &["link", "set", "log0", "up"])?;
        }
        for link in Link::ALL {
            let rate = config.rate(link);
            if rate != Rate::Unshaped {
                self.set_rate(link, rate)?;
            }
        }
        Ok(())
    }

    /// A handle on an existing run (see [`Testbed::list`]); dropping it
    /// leaves the run alone.
    pub fn attach(run: &str) -> Result<Testbed, TestbedError> {
        let (record, _) = read_records()?
            .into_iter()
            .find(|(record, _)| record.run == run)
            .ok_or_else(|| TestbedError::NotFound(run.to_string()))?;
        Ok(Testbed {
            addresses: Addresses::for_slot(record.slot),
            record,
            owned: false,
        })
    }

    /// Every run on this host, with whether its owner is alive.
    pub fn list() -> Result<Vec<(Record, bool)>, TestbedError> {
        read_records()
    }

    /// The live runs labelled `label`.
    pub fn find(label: &str) -> Result<Vec<Record>, TestbedError> {
        Ok(read_records()?
            .into_iter()
            .filter(|(record, alive)| *alive && record.label == label)
            .map(|(record, _)| record)
            .collect())
    }

    /// Removes run `run` (namespaces, links, TAPs, processes inside, state).
    pub fn down(run: &str) -> Result<(), TestbedError> {
        let _lock = lock_state()?;
        let known = read_records()?.iter().any(|(record, _)| record.run == run);
        let any_namespace = Ns::ALL
            .iter()
            .any(|&ns| netns::path(&plan::namespace_name(run, ns)).exists());
        if !known && !any_namespace {
            return Err(TestbedError::NotFound(run.to_string()));
        }
        remove_run(run);
        Ok(())
    }

    /// Removes the runs whose owner died; returns their run ids.
    pub fn clean_stale() -> Result<Vec<String>, TestbedError> {
        let _lock = lock_state()?;
        clean_stale_locked()
    }

    /// Keeps the testbed after this handle (and its owner) is gone, until
    /// [`Testbed::down`]; returns its record.
    pub fn keep(mut self) -> Result<Record, TestbedError> {
        self.record.persistent = true;
        let path = state_path(&self.record.run);
        std::fs::write(&path, self.record.to_text()).map_err(|source| TestbedError::File {
            what: "cannot write",
            path,
            source,
        })?;
        self.owned = false;
        Ok(self.record.clone())
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.record.run
    }

    /// The run's state record.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The name of namespace `ns` (for `ip netns exec NAME …`).
    pub fn netns(&self, ns: Ns) -> String {
        plan::namespace_name(&self.record.run, ns)
    }

    /// The run's addresses.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// A command that runs `program` inside namespace `ns` (setns before
    /// exec; the child's pid is the program's).
    pub fn command(&self, ns: Ns, program: impl AsRef<OsStr>) -> Result<Command, TestbedError> {
        netns::command(&self.netns(ns), program.as_ref())
    }

    /// Runs `f` on a thread inside namespace `ns`: sockets it makes belong
    /// to `ns` and can be used anywhere afterwards.
    pub fn run_in<T: Send, F: FnOnce() -> T + Send>(
        &self,
        ns: Ns,
        f: F,
    ) -> Result<T, TestbedError> {
        netns::run_in(&self.netns(ns), f)
    }

    /// Adds extra host `i` (below [`MAX_EXTRA_HOSTS`]): a namespace
    /// `lst-<run>-x<i>` on the management network, its `mg0` at
    /// [`Addresses::extra_host`] joined by a veth to the arbiter's bridge
    /// (port `x<i>` there), so hosts a and b and the arbiter reach it and
    /// nothing else does. One etcd member per extra host makes the members
    /// separate machines: killing one, or cutting it off
    /// ([`Testbed::cut_extra_host`]), leaves the others alone. Removed with
    /// the run. Returns its namespace name.
    pub fn add_host(&self, i: u8) -> Result<String, TestbedError> {
        if i >= MAX_EXTRA_HOSTS {
            return Err(TestbedError::BadState {
                path: state_path(&self.record.run),
                reason: format!("extra host {i}: at most {MAX_EXTRA_HOSTS} per run"),
            });
        }
        let name = plan::extra_host_name(&self.record.run, i);
        let arb = self.netns(Ns::Arbiter);
        let port = format!("x{i}");
        let cidr = format!("{}/{}", self.addresses.extra_host(i), self.addresses.prefix);
        run_tool("ip", &["netns", "add", &name])?;
        netns::run_in(&name, || {
            for knob in ["all", "default"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"), "1");
            }
        })?;
        ip_in(&name, &["link", "set", "lo", "up"])?;
        ip_in(
            &name,
            &[
                "link", "add", "mg0", "type", "veth", "peer", "name", &port, "netns", &arb,
            ],
        )?;
        ip_in(&name, &["addr", "add", &cidr, "dev", "mg0"])?;
        ip_in(&name, &["link", "set", "mg0", "up"])?;
        ip_in(&arb, &["link", "set", &port, "master", "mg0", "up"])?;
        Ok(name)
    }

    /// A command that runs `program` inside extra host `i`.
    pub fn extra_host_command(
        &self,
        i: u8,
        program: impl AsRef<OsStr>,
    ) -> Result<Command, TestbedError> {
        netns::command(
            &plan::extra_host_name(&self.record.run, i),
            program.as_ref(),
        )
    }

    /// Takes extra host `i`'s link down at both ends (a partition: its
    /// processes run on, nothing crosses).
    pub fn cut_extra_host(&self, i: u8) -> Result<(), TestbedError> {
        let name = plan::extra_host_name(&self.record.run, i);
        ip_in(&name, &["link", "set", "mg0", "down"])?;
        ip_in(
            &self.netns(Ns::Arbiter),
            &["link", "set", &format!("x{i}"), "down"],
        )?;
        Ok(())
    }

    /// Brings extra host `i`'s link back.
    pub fn restore_extra_host(&self, i: u8) -> Result<(), TestbedError> {
        let name = plan::extra_host_name(&self.record.run, i);
        ip_in(&name, &["link", "set", "mg0", "up"])?;
        ip_in(
            &self.netns(Ns::Arbiter),
            &["link", "set", &format!("x{i}"), "up"],
        )?;
        Ok(())
    }

    /// A TCP connection made from inside namespace `ns`.
    pub fn connect(&self, ns: Ns, address: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run_in(ns, || TcpStream::connect_timeout(&address, timeout))
            .map_err(io::Error::other)?
    }

    /// Moves the calling thread into namespace `ns` for good (for a helper
    /// thread that does all its work there).
    pub fn enter(&self, ns: Ns) -> Result<(), TestbedError> {
        let name = self.netns(ns);
        netns::enter(&netns::open(&name)?, &name)
    }

    /// Shapes `link` to `rate` in both directions (or removes the shaping).
    pub fn set_rate(&self, link: Link, rate: Rate) -> Result<(), TestbedError> {
        self.set_tbf(link, rate.tbf())
    }

    /// Shapes `link` with an explicit token bucket on both ends' egress
    /// (`None`: unshaped).
    pub fn set_tbf(&self, link: Link, tbf: Option<Tbf>) -> Result<(), TestbedError> {
        for (ns, device) in link.ends() {
            let name = self.netns(ns);
            match tbf {
                Some(tbf) => {
                    let mut args = vec!["qdisc", "replace", "dev", device, "root"];
                    let rest = tbf.tc_args();
                    args.extend(rest.iter().map(String::as_str));
                    tc_in(&name, &args)?;
                }
                None => {
                    let shaped = tc_in(&name, &["qdisc", "show", "dev", device])?;
                    if shaped.contains("tbf") {
                        tc_in(&name, &["qdisc", "del", "dev", device, "root"])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Cuts `link`: both ends down. Sockets stay open and nothing crosses
    /// (a partition); the addresses stay configured for [`Testbed::restore`].
    pub fn cut(&self, link: Link) -> Result<(), TestbedError> {
        for (ns, device) in link.ends() {
            ip_in(&self.netns(ns), &["link", "set", device, "down"])?;
        }
        Ok(())
    }

    /// Restores a cut `link`, and returns once its bridge ports forward.
    pub fn restore(&self, link: Link) -> Result<(), TestbedError> {
        for (ns, device) in link.ends() {
            ip_in(&self.netns(ns), &["link", "set", device, "up"])?;
        }
        self.wait_forwarding()
    }

    /// Waits (up to 3 s) until every bridge port of the client segment
    /// (`a0`, `b0` on the switch, each host's `up0`) forwards. A veth's
    /// carrier reaches its bridge through the kernel's link-watch work,
    /// which batches events up to a second apart: until then the port is
    /// `disabled` and drops every frame (a fresh testbed, or a restored
    /// link, would silently drop the first frames of a test). The guests'
    /// TAPs are left out: they get a carrier only when a VMM attaches.
    fn wait_forwarding(&self) -> Result<(), TestbedError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        for link in [Link::ClientA, Link::ClientB] {
            let ends = link.ends();
            // A cut link's ports never forward: skip it.
            let mut cut = false;
            for (ns, device) in ends {
                let shown = ip_in(&self.netns(ns), &["-o", "link", "show", "dev", device])?;
                cut |= !(shown.contains(",UP") || shown.contains("<UP"));
            }
            if cut {
                continue;
            }
            for (ns, port) in ends {
                loop {
                    let shown = run_tool(
                        "bridge",
                        &["-n", &self.netns(ns), "link", "show", "dev", port],
                    )?;
                    if shown.contains("state forwarding") {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(TestbedError::Command {
                            command: format!("bridge -n {} link show dev {port}", self.netns(ns)),
                            stderr: format!(
                                "the port does not forward after 3 s: {}",
                                shown.trim()
                            ),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        Ok(())
    }

    /// What the kernel says about the testbed now: each link's state and
    /// shaping, and the switch port that the guest's MAC was learnt on.
    pub fn status(&self) -> Result<Status, TestbedError> {
        let mut links = Vec::new();
        for link in Link::ALL {
            let mut ends = Vec::new();
            for (ns, device) in link.ends() {
                let name = self.netns(ns);
                let shown = ip_in(&name, &["-o", "link", "show", "dev", device])?;
                let up = shown.contains(",UP") || shown.contains("<UP");
                let qdisc = tc_in(&name, &["qdisc", "show", "dev", device])?;
                let tbf = qdisc
                    .lines()
                    .find(|line| line.starts_with("qdisc tbf"))
                    .and_then(|line| {
                        let words: Vec<&str> = line.split_whitespace().collect();
                        let at = words.iter().position(|w| *w == "rate")?;
                        words.get(at + 1).map(|rate| rate.to_string())
                    });
                ends.push(EndStatus {
                    ns,
                    device,
                    up,
                    tbf_rate: tbf,
                });
            }
            links.push(LinkStatus { link, ends });
        }
        let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
        let fdb = run_tool(
            "bridge",
            &["-n", &self.netns(Ns::Client), "fdb", "show", "br", "sw0"],
        )?;
        let guest_port = fdb
            .lines()
            .filter(|line| line.starts_with(&mac))
            .find_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "dev")?;
                words.get(at + 1).map(|port| port.to_string())
            });
        Ok(Status {
            record: self.record.clone(),
            addresses: self.addresses.clone(),
            namespaces: Ns::ALL.map(|ns| self.netns(ns)).to_vec(),
            links,
            guest_port,
        })
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.owned {
            let _lock = lock_state();
            remove_run(&self.record.run);
        }
    }
}

/// One end of a link, as the kernel has it.
#[derive(Clone, Debug)]
pub struct EndStatus {
    /// Its namespace.
    pub ns: Ns,
    /// Its interface.
    pub device: &'static str,
    /// Administratively up (not cut).
    pub up: bool,
    /// The tbf rate installed on its egress, as tc prints it (`1Gbit`).
    pub tbf_rate: Option<String>,
}

/// A link, as the kernel has it.
#[derive(Clone, Debug)]
pub struct LinkStatus {
    /// Which link.
    pub link: Link,
    /// Its two ends.
    pub ends: Vec<EndStatus>,
}

/// [`Testbed::status`]: the run, its namespaces and addresses, its links.
#[derive(Clone, Debug)]
pub struct Status {
    /// The state record.
    pub record: Record,
    /// The addresses.
    pub addresses: Addresses,
    /// The namespace names.
    pub namespaces: Vec<String>,
    /// Every link.
    pub links: Vec<LinkStatus>,
    /// The switch port (`a0`: host a, `b0`: host b) the guest's MAC was
    /// learnt on, if any frame of the guest crossed the switch yet.
    pub guest_port: Option<String>,
}

impl Status {
    /// The status of `link`.
    pub fn link(&self, link: Link) -> Option<&LinkStatus> {
        self.links.iter().find(|status| status.link == link)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.addresses;
        writeln!(
            f,
            "testbed {} ({}; owner pid {}{})",
            self.record.run,
            self.record.label,
            self.record.pid,
            if self.record.persistent { ", kept" } else { "" }
        )?;
        writeln!(f, "  namespaces: {}", self.namespaces.join(" "))?;
        writeln!(
            f,
            "  client segment: client {}, guest {} (arg {}), host a {}, host b {}",
            a.client,
            a.guest,
            a.guest_arg(),
            a.lan_a,
            a.lan_b
        )?;
        writeln!(
            f,
            "  logging link: host a {}, host b {}; arbiter {} (host a {}, host b {})",
            a.log_a, a.log_b, a.arbiter, a.mgmt_a, a.mgmt_b
        )?;
        for link in &self.links {
            let ends: Vec<String> = link
                .ends
                .iter()
                .map(|end| {
                    format!(
                        "{} {} {} {}",
                        end.ns.suffix(),
                        end.device,
                        if end.up { "up" } else { "CUT" },
                        end.tbf_rate.as_deref().unwrap_or("unshaped")
                    )
                })
                .collect();
            writeln!(f, "  link {:<8} {}", link.link.name(), ends.join(" | "))?;
        }
        match self.guest_port.as_deref() {
            Some("a0") => writeln!(f, "  switch: guest MAC on port a0 (host a)"),
            Some("b0") => writeln!(f, "  switch: guest MAC on port b0 (host b)"),
            Some(port) => writeln!(f, "  switch: guest MAC on port {port}"),
            None => writeln!(f, "  switch: guest MAC not learnt yet"),
        }
    }
}
