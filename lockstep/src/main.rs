//! `lockstep`: the command-line front end. Thin on purpose: it parses
//! arguments, builds the pieces from the library crates and prints results.

mod chaos;
mod ft;
mod guests;
mod keys;

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use channel::log::{LogMeta, LogReader, LogWriter};
use clap::{Args, Parser, Subcommand};
use nic::gate::OutputGate;
use nic::tap::{RxQueue, TapDevice};
use vmm::events::{Discard, Live, LogSink, Replay};
use vmm::{Machine, VmConfig, VmmError};

use crate::guests::GuestImage;

/// Fault-tolerant virtual machines: a primary runs a guest on KVM, a backup
/// replays it in lockstep from a log of its non-deterministic events.
#[derive(Parser)]
#[command(name = "lockstep", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a guest once, logging nothing.
    Run(RunArgs),
    /// Run a guest and record its non-deterministic events to a log file.
    Record {
        /// The log file to write; `-` streams it to stdout for a live backup.
        #[arg(long)]
        log: PathBuf,
        #[command(flatten)]
        run: RunArgs,
        /// Take a state digest every this many exits (0: only at the end).
        #[arg(long, default_value_t = 1000)]
        digest_interval: u64,
    },
    /// Replay a log against a fresh guest and check every digest.
    Replay {
        /// The log file to replay; `-` reads a live stream from stdin.
        #[arg(long)]
        log: PathBuf,
        /// The guest the log was recorded from (default: the one it names).
        #[arg(long)]
        guest: Option<String>,
        /// Do not print the guest's console output.
        #[arg(long)]
        quiet: bool,
    },
    /// Run a guest as the primary of a fault-tolerant pair: stream its log
    /// to the backup and hold every output until the backup has it.
    Primary {
        /// The backup's address (`lockstep backup --listen`).
        #[arg(long, default_value = "127.0.0.1:7700")]
        backup: String,
        /// The backup's name at the arbiter.
        #[arg(long, default_value = "backup")]
        backup_id: String,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        ft: ft::FtArgs,
        /// Write the primary's figures (log bytes, acks, hold times) as JSON here at exit.
        #[arg(long)]
        stats: Option<PathBuf>,
        /// Take a state digest every this many exits (0: only at the end).
        #[arg(long, default_value_t = 1000)]
        digest_interval: u64,
        /// Accept new backups here (`lockstep backup --join`) whenever this
        /// primary runs alone: re-protection by state transfer.
        #[arg(long)]
        join_listen: Option<String>,
        /// Start a new pair even though the arbiter records generation G
        /// for this VM (with this replica as its primary): the operator's
        /// word that the pair of generation G is gone for good. Without it,
        /// a primary starts only a VM the arbiter has never seen, and
        /// refuses to supersede a running (or failing-over) pair.
        #[arg(long, value_name = "G")]
        supersede_generation: Option<u64>,
    },
    /// Wait for a primary and replay its guest in lockstep, output suppressed.
    Backup {
        /// Address to listen on for the primary.
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: String,
        /// The TAP interface to serve on if this backup goes live.
        #[arg(long)]
        tap: Option<String>,
        /// Join a running primary that lost its backup (its `--join-listen`
        /// address): clone it by state transfer, then follow it.
        #[arg(long)]
        join: Option<String>,
        /// Once this backup has gone live, accept a new backup of its own
        /// here (`lockstep backup --join`).
        #[arg(long)]
        join_listen: Option<String>,
        #[command(flatten)]
        ft: ft::FtArgs,
        /// Do not print the guest's console output.
        #[arg(long)]
        quiet: bool,
    },
    /// Show role, generation, lag, held outputs and link figures of every
    /// replica on this host.
    Status {
        /// Where replicas publish their status.
        #[arg(long, default_value = replica::status::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// A randomized failover campaign: kill either replica or partition the
    /// link at random moments under client load; report split brains and lost
    /// acknowledged writes (both must be 0).
    Chaos {
        /// Trials to run.
        #[arg(long, default_value_t = 20)]
        trials: u64,
        /// Seed of the campaign's random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// After each failover, join a new backup to the survivor by state
        /// transfer, then kill the survivor: the joined backup must take over.
        #[arg(long)]
        reprotect: bool,
    },
    /// The embedded arbiter: an atomic test-and-set on generations that
    /// decides which replica may go live alone.
    Arbiter {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: String,
        /// State file (fsync'ed before every grant).
        #[arg(long)]
        state: PathBuf,
        /// File holding the pre-shared key.
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Make a new pre-shared key: 32 random bytes (64 hex digits) in a new
    /// file created 0600, for `--link-key`, `--arbiter-key` and
    /// `arbiter --key-file`.
    Keygen {
        /// The key file to create (it must not exist).
        file: PathBuf,
    },
    /// The embedded default deployment: an arbiter, a backup and a primary
    /// on this host, the `net` guest on TAP lstap0 at 10.77.0.2, until
    /// interrupted. Kill either replica and the other goes live.
    Up {
        /// TAP interface (created with 10.77.0.1/24 if missing).
        #[arg(long, default_value = "lstap0")]
        tap: String,
        /// The logging channel's transport: `shm` (shared memory; both
        /// replicas run on this host) or `tcp` (io_uring TCP).
        #[arg(long, default_value = "shm")]
        transport: replica::link::TransportKind,
        /// Link address between primary and backup (default: a unix socket
        /// in the deployment's directory for shm, 127.0.0.1:7700 for tcp).
        #[arg(long)]
        link: Option<String>,
    },
    /// The embedded default: record the `fold` guest fed with 1 MiB of input,
    /// then replay the log in a fresh VM and check every digest.
    Demo {
        /// Where to keep the log (default: a file in the temporary directory).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Benchmarks: `lockstep bench` lists them.
    Bench {
        /// Which benchmark.
        name: Option<String>,
        /// Shorter runs, for CI.
        #[arg(long)]
        quick: bool,
        /// Write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// table2: fail (exit 1) when an FT/base ratio falls below this
        /// committed baseline by more than its tolerance.
        #[arg(long)]
        check: Option<PathBuf>,
        /// table2: write the SVG plots to this directory (default:
        /// target/table2 beside the executable's profile directory).
        #[arg(long)]
        plots: Option<PathBuf>,
    },
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Guest program: an embedded guest's name (see --help) or a path to an ELF file.
    #[arg(long, default_value = "fold", long_help = guests::help())]
    guest: String,
    /// Guest memory, in MiB.
    #[arg(long, default_value_t = 16)]
    mem_mib: u64,
    /// The guest argument (fold: rounds; exits: clock reads; 0: the guest's default).
    #[arg(long, default_value_t = 0)]
    arg: u64,
    /// Feed this file to the guest's input stream (default: empty input).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Let the guest execute RDTSC (clears CR4.TSD): its runs then cannot be replayed.
    #[arg(long)]
    allow_rdtsc: bool,
    /// Do not print the guest's console output.
    #[arg(long)]
    quiet: bool,
    /// Give the guest a virtio-net NIC backed by this TAP interface (created
    /// if missing; needs CAP_NET_ADMIN). See scripts/net-setup.sh.
    #[arg(long)]
    tap: Option<String>,
}

/// Errors of the command line, over those of the library crates.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Log(#[from] channel::log::LogError),
    #[error(transparent)]
    Bench(#[from] perf::BenchError),
    #[error(transparent)]
    Nic(#[from] nic::NicError),
    #[error(transparent)]
    Replica(#[from] replica::ReplicaError),
    #[error("{what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let halted = matches!(error, CliError::Vmm(VmmError::Halted(_)));
            let mut message = format!("lockstep: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            if halted {
                ExitCode::from(replica::failover::EXIT_HALTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn execute(command: Command) -> Result<(), CliError> {
    match command {
        Command::Run(args) => run(&args),
        Command::Record {
            log,
            run,
            digest_interval,
        } => record(&run, &log, digest_interval),
        Command::Replay { log, guest, quiet } => replay(&log, guest.as_deref(), quiet),
        Command::Demo { log } => demo(log),
        Command::Primary {
            backup,
            backup_id,
            run,
            ft,
            digest_interval,
            stats,
            join_listen,
            supersede_generation,
        } => ft::primary(
            &run,
            &ft::Peers {
                backup: &backup,
                backup_id: &backup_id,
                join_listen: join_listen.as_deref(),
                supersede_generation,
            },
            &ft,
            digest_interval,
            stop_flag(),
            stats.as_deref(),
        ),
        Command::Backup {
            listen,
            tap,
            join,
            join_listen,
            ft,
            quiet,
        } => match join {
            Some(primary) => ft::join(
                &primary,
                tap.as_deref(),
                join_listen.as_deref(),
                &ft,
                quiet,
                stop_flag(),
            ),
            None => ft::backup(
                &listen,
                tap.as_deref(),
                join_listen.as_deref(),
                &ft,
                quiet,
                stop_flag(),
            ),
        },
        Command::Status { dir } => ft::status(&dir),
        Command::Chaos {
            trials,
            seed,
            reprotect,
        } => {
            let campaign = chaos::run(trials, seed, reprotect)?;
            let mut times = campaign.failover_ms.clone();
            let p50 = perf::median(&mut times);
            let max = times.last().copied().unwrap_or(f64::NAN);
            println!(
                "chaos: {} trials, {} failovers, {} split brains, {} lost acknowledged writes ({} INCRs acknowledged); \
                 client served again after the fault: p50 {p50:.0} ms, max {max:.0} ms",
                campaign.trials,
                campaign.failovers,
                campaign.split_brains,
                campaign.lost_writes,
                campaign.acknowledged
            );
            if reprotect {
                println!(
                    "chaos: {} re-protections by state transfer; {} joined backups went live when the survivor was killed in turn",
                    campaign.joins, campaign.second_failovers
                );
                if campaign.second_failovers < campaign.joins {
                    return Err(CliError::Usage(
                        "a joined backup did not take over from its dead primary".into(),
                    ));
                }
            }
            if campaign.split_brains > 0 || campaign.lost_writes > 0 {
                return Err(CliError::Usage(
                    "the campaign found split brains or lost writes".into(),
                ));
            }
            Ok(())
        }
        Command::Arbiter {
            listen,
            state,
            key_file,
        } => ft::serve_arbiter(&listen, &state, &key_file),
        Command::Keygen { file } => {
            keys::generate(&file)?;
            eprintln!(
                "lockstep keygen: wrote a new key to {} (mode 0600)",
                file.display()
            );
            Ok(())
        }
        Command::Up {
            tap,
            transport,
            link,
        } => up(&tap, transport, link),
        Command::Bench {
            name,
            quick,
            json,
            check,
            plots,
        } => bench(name.as_deref(), quick, json, check, plots),
    }
}

/// Set by SIGINT/SIGTERM: the run stops at the guest's next exit, and a
/// recording ends with a stop record (so that its replay ends there too).
static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn request_stop(_signal: libc::c_int) {
    // Only an atomic load and store: async-signal-safe.
    if let Some(flag) = STOP.get() {
        flag.store(true, Ordering::Relaxed);
    }
}

fn stop_flag() -> Arc<AtomicBool> {
    let flag = STOP.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only touches an atomic through an
        // initialised OnceLock (async-signal-safe); `request_stop` has the
        // signature `signal` expects.
        unsafe { libc::signal(signal, request_stop as *const () as libc::sighandler_t) };
    }
    Arc::clone(flag)
}

pub(crate) fn console(quiet: bool) -> Box<dyn Write + Send> {
    if quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(std::io::stdout())
    }
}

pub(crate) fn open_input(path: Option<&PathBuf>) -> Result<Box<dyn Read + Send>, CliError> {
    match path {
        None => Ok(Box::new(std::io::empty())),
        Some(path) => {
            let file = File::open(path).map_err(|source| CliError::File {
                what: "cannot open the input file",
                path: path.clone(),
                source,
            })?;
            Ok(Box::new(BufReader::new(file)))
        }
    }
}

pub(crate) fn vm_config(args: &RunArgs) -> VmConfig {
    VmConfig {
        mem_size: args.mem_mib << 20,
        trap_rdtsc: !args.allow_rdtsc,
        mac: args.tap.as_ref().map(|_| vmm::DEFAULT_MAC),
    }
}

/// A TAP interface wired to the guest: its reader thread fills `queue`, and
/// `gate` (open: no backup to wait for) writes the guest's frames to it.
pub(crate) struct Network {
    queue: Arc<RxQueue>,
    gate: Arc<OutputGate>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Network {
    fn open(args: &RunArgs) -> Result<Option<Self>, CliError> {
        Self::open_with(args, false)
    }

    /// With `gated`, frames are held until acknowledged (a primary with a
    /// backup); otherwise they leave at once (FT off).
    fn open_with(args: &RunArgs, gated: bool) -> Result<Option<Self>, CliError> {
        let Some(name) = &args.tap else {
            return Ok(None);
        };
        let tap = TapDevice::open(name)?;
        let queue = Arc::new(RxQueue::default());
        let stop = Arc::new(AtomicBool::new(false));
        let reader = tap.spawn_reader(Arc::clone(&queue), Arc::clone(&stop))?;
        let out = Box::new(tap.writer()?);
        let gate = Arc::new(if gated {
            OutputGate::new(out)
        } else {
            OutputGate::open(out)
        });
        Ok(Some(Self {
            queue,
            gate,
            stop,
            reader: Some(reader),
        }))
    }

    fn live<S: vmm::events::EventSink>(network: &Option<Self>, live: Live<S>) -> Live<S> {
        match network {
            Some(network) => live.with_network(Arc::clone(&network.queue)),
            None => live,
        }
    }

    fn attach<E: vmm::events::EventSource>(
        network: &Option<Self>,
        machine: &mut Machine<E>,
    ) -> Result<(), CliError> {
        if let Some(network) = network {
            machine.set_net_output(Arc::clone(&network.gate))?;
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn run(args: &RunArgs) -> Result<(), CliError> {
    let guest = GuestImage::resolve(&args.guest)?;
    let network = Network::open(args)?;
    let events = Network::live(
        &network,
        Live::new(open_input(args.input.as_ref())?, Discard),
    )
    .with_stop(stop_flag());
    let mut machine = Machine::new(
        &vm_config(args),
        guest.bytes(),
        args.arg,
        events,
        console(args.quiet),
        0,
    )?;
    Network::attach(&network, &mut machine)?;
    let summary = machine.run()?;
    eprintln!(
        "lockstep: guest {} {} after {} exits in {:.3} s ({:.0} exits/s)",
        guest.name(),
        ending(&summary),
        summary.exits,
        summary.elapsed.as_secs_f64(),
        summary.exits_per_second()
    );
    Ok(())
}

fn record(args: &RunArgs, log: &PathBuf, digest_interval: u64) -> Result<(), CliError> {
    let guest = GuestImage::resolve(&args.guest)?;
    let config = vm_config(args);
    let meta = LogMeta {
        image_id: guest.id(),
        mem_size: config.mem_size,
        guest_arg: args.arg,
        digest_interval,
        vm_flags: config.flags(),
        guest_name: guest.name().to_string(),
    };
    // `--log -` streams to stdout for a live backup (`lockstep replay --log -`
    // at the other end of a pipe): Progress marks and a flush at every sync
    // point, and the guest's console moves to stderr.
    let streaming = log.as_os_str() == "-";
    let (out, file): (Box<dyn Write + Send>, Option<File>) = if streaming {
        (Box::new(std::io::stdout()), None)
    } else {
        let file = File::create(log).map_err(|source| CliError::File {
            what: "cannot create the log file",
            path: log.clone(),
            source,
        })?;
        let handle = file.try_clone().map_err(|source| CliError::File {
            what: "cannot use the log file",
            path: log.clone(),
            source,
        })?;
        (Box::new(file), Some(handle))
    };
    let sink = LogSink::new(LogWriter::new(
        BufWriter::with_capacity(1 << 16, out),
        &meta,
    )?);
    let network = Network::open(args)?;
    let mut events = Network::live(&network, Live::new(open_input(args.input.as_ref())?, sink))
        .with_stop(stop_flag());
    if streaming {
        events = events.streaming();
    }
    let console: Box<dyn Write + Send> = match (args.quiet, streaming) {
        (true, _) => Box::new(std::io::sink()),
        (false, true) => Box::new(std::io::stderr()),
        (false, false) => Box::new(std::io::stdout()),
    };
    let mut machine = Machine::new(
        &config,
        guest.bytes(),
        args.arg,
        events,
        console,
        digest_interval,
    )?;
    Network::attach(&network, &mut machine)?;
    let summary = machine.run()?;
    let sink = machine.into_events().into_sink();
    let (entries, bytes) = (sink.entries(), sink.bytes());
    sink.into_inner()?
        .flush()
        .map_err(|source| CliError::File {
            what: "cannot write the log file",
            path: log.clone(),
            source,
        })?;
    if let Some(file) = file {
        file.sync_all().map_err(|source| CliError::File {
            what: "cannot sync the log file",
            path: log.clone(),
            source,
        })?;
    }
    eprintln!(
        "lockstep: recorded {} exits, {} log entries ({} bytes), {} digests; guest {} {} in {:.3} s",
        summary.exits,
        entries,
        bytes,
        summary.digests,
        guest.name(),
        ending(&summary),
        summary.elapsed.as_secs_f64()
    );
    Ok(())
}

fn replay(log: &PathBuf, guest: Option<&str>, quiet: bool) -> Result<(), CliError> {
    let input: Box<dyn Read + Send> = if log.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(log).map_err(|source| CliError::File {
            what: "cannot open the log file",
            path: log.clone(),
            source,
        })?)
    };
    let reader = LogReader::new(BufReader::with_capacity(1 << 16, input))?;
    let meta = reader.meta().clone();
    let guest = GuestImage::resolve(guest.unwrap_or(&meta.guest_name))?;
    if guest.id() != meta.image_id {
        return Err(VmmError::LogMismatch(format!(
            "{} was recorded from guest '{}' (image {:016x}), not from '{}' (image {:016x})",
            log.display(),
            meta.guest_name,
            meta.image_id,
            guest.name(),
            guest.id()
        ))
        .into());
    }
    let config = VmConfig::with_flags(meta.mem_size, meta.vm_flags);
    let events = Replay::new(reader);
    let mut machine = Machine::new(
        &config,
        guest.bytes(),
        meta.guest_arg,
        events,
        console(quiet),
        meta.digest_interval,
    )?;
    let summary = machine.run()?;
    let stats = machine.events().stats();
    println!(
        "replayed {} exits and {} events; {} of {} digests matched; guest {} {}",
        summary.exits,
        stats.events,
        stats.digests_matched,
        summary.digests,
        guest.name(),
        ending(&summary)
    );
    Ok(())
}

pub(crate) fn log_meta(
    guest: &GuestImage,
    config: &VmConfig,
    arg: u64,
    digest_interval: u64,
) -> LogMeta {
    LogMeta {
        image_id: guest.id(),
        mem_size: config.mem_size,
        guest_arg: arg,
        digest_interval,
        vm_flags: config.flags(),
        guest_name: guest.name().to_string(),
    }
}

fn up(
    tap: &str,
    transport: replica::link::TransportKind,
    link: Option<String>,
) -> Result<(), CliError> {
    nic::tap::ensure_persistent(tap, "10.77.0.1/24")?;
    let binary = std::env::current_exe().map_err(|source| CliError::File {
        what: "cannot find this program",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let spawn = |args: &[&str], what: &'static str| {
        std::process::Command::new(&binary)
            .args(args)
            .spawn()
            .map_err(|source| CliError::File {
                what,
                path: binary.clone(),
                source,
            })
    };
    // An embedded arbiter with a fresh state and key for this deployment.
    // A private directory (0700, unpredictable name) and a key (0600) of
    // this deployment's own.
    let dir = keys::private_dir("lockstep-up")?;
    let key = dir.join("arbiter.key");
    keys::generate(&key)?;
    let state = dir.join("arbiter.state");
    let arbiter_address = "127.0.0.1:7400";
    let key_text = key.to_string_lossy().into_owned();
    let state_text = state.to_string_lossy().into_owned();
    let mut arbiter = spawn(
        &[
            "arbiter",
            "--listen",
            arbiter_address,
            "--state",
            &state_text,
            "--key-file",
            &key_text,
        ],
        "cannot start the arbiter",
    )?;
    let link = link.unwrap_or_else(|| match transport {
        replica::link::TransportKind::Shm => dir.join("link.sock").to_string_lossy().into_owned(),
        replica::link::TransportKind::Tcp | replica::link::TransportKind::Rdma => {
            "127.0.0.1:7700".into()
        }
    });
    let link = link.as_str();
    let ft_flags = [
        "--arbiter",
        arbiter_address,
        "--arbiter-key",
        &key_text,
        "--transport",
        transport.name(),
    ];
    let mut backup_args = vec![
        "backup", "--listen", link, "--quiet", "--tap", tap, "--id", "backup",
    ];
    backup_args.extend(ft_flags);
    let backup = spawn(&backup_args, "cannot start the backup")?;
    eprintln!(
        "lockstep up: arbiter pid {}, backup pid {}, primary pid {}; guest at 10.77.0.2 on {tap}: redis 6379, echo 7, sink 5001, source 5002; Ctrl-C stops",
        arbiter.id(),
        backup.id(),
        std::process::id()
    );
    // Re-protection: whenever the backup dies, a new one joins the primary
    // by state transfer (`backup --join`), for as long as the primary runs.
    let join_address = "127.0.0.1:7800";
    let current_backup = Arc::new(std::sync::Mutex::new(Some(backup)));
    let finished = Arc::new(AtomicBool::new(false));
    {
        let current_backup = Arc::clone(&current_backup);
        let finished = Arc::clone(&finished);
        let binary = binary.clone();
        let mut join_args: Vec<String> =
            ["backup", "--join", join_address, "--quiet", "--tap", tap]
                .iter()
                .map(|s| s.to_string())
                .collect();
        join_args.extend(ft_flags.iter().map(|s| s.to_string()));
        std::thread::Builder::new()
            .name("up-reprotect".into())
            .spawn(move || {
                let mut generation = 1u32;
                while !finished.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let mut slot = current_backup.lock().unwrap_or_else(|p| p.into_inner());
                    let exited = match slot.as_mut().map(std::process::Child::try_wait) {
                        Some(Ok(Some(status))) => Some(status),
                        _ => None,
                    };
                    let Some(status) = exited else { continue };
                    if finished.load(Ordering::Acquire) {
                        break;
                    }
                    if status.success() {
                        // It followed the primary to the end: nothing to replace.
                        *slot = None;
                        continue;
                    }
                    generation += 1;
                    let id = format!("backup-{generation}");
                    eprintln!(
                        "lockstep up: the backup exited ({status}); starting {id}, which joins the primary by state transfer"
                    );
                    // Give the primary time to notice and win the arbiter.
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    let mut args = join_args.clone();
                    args.extend(["--id".to_string(), id]);
                    *slot = std::process::Command::new(&binary).args(&args).spawn().ok();
                }
            })
            .map_err(|source| CliError::File {
                what: "cannot start the re-protection watcher",
                path: PathBuf::from("up-reprotect"),
                source,
            })?;
    }
    let args = RunArgs {
        guest: "net".into(),
        mem_mib: 32,
        arg: 0,
        input: None,
        allow_rdtsc: false,
        quiet: false,
        tap: Some(tap.to_string()),
    };
    let ft_args = ft::FtArgs {
        arbiter: Some(arbiter_address.into()),
        arbiter_key: Some(key.clone()),
        vm_id: 1,
        id: Some("primary".into()),
        peer_timeout_ms: 500,
        status_dir: PathBuf::from(replica::status::DEFAULT_DIR),
        transport,
        link_key: None,
    };
    // Give the arbiter a moment to listen (the primary registers the pair).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(arbiter_address).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let peers = ft::Peers {
        backup: link,
        backup_id: "backup",
        join_listen: Some(join_address),
        supersede_generation: None,
    };
    let result = ft::primary(&args, &peers, &ft_args, 1000, stop_flag(), None);
    finished.store(true, Ordering::Release);
    if let Some(mut backup) = current_backup
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        if result.is_err() {
            let _ = backup.kill();
        }
        let _ = backup.wait();
    }
    let _ = arbiter.kill();
    let _ = arbiter.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

pub(crate) fn ending(summary: &vmm::RunSummary) -> String {
    if summary.stopped {
        "was stopped by the host".to_string()
    } else {
        format!("exited with code {}", summary.exit_code)
    }
}

fn demo(log: Option<PathBuf>) -> Result<(), CliError> {
    let dir = std::env::temp_dir();
    let log = log.unwrap_or_else(|| dir.join(format!("lockstep-demo-{}.log", std::process::id())));
    let input = dir.join(format!("lockstep-demo-{}.input", std::process::id()));
    let mut bytes = vec![0u8; 1 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for byte in bytes.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    std::fs::write(&input, &bytes).map_err(|source| CliError::File {
        what: "cannot write the demo input",
        path: input.clone(),
        source,
    })?;
    let args = RunArgs {
        guest: "fold".into(),
        mem_mib: 16,
        arg: 0,
        input: Some(input.clone()),
        allow_rdtsc: false,
        quiet: true,
        tap: None,
    };
    eprintln!("lockstep demo: recording guest 'fold' to {}", log.display());
    let recorded = record(&args, &log, 250);
    let _ = std::fs::remove_file(&input);
    recorded?;
    eprintln!("lockstep demo: replaying {} in a fresh VM", log.display());
    replay(&log, None, true)
}

fn bench(
    name: Option<&str>,
    quick: bool,
    json: Option<PathBuf>,
    check: Option<PathBuf>,
    plots: Option<PathBuf>,
) -> Result<(), CliError> {
    let Some(name) = name else {
        println!("benchmarks (run one with `lockstep bench NAME [--quick] [--json FILE]`):");
        for (name, about) in perf::BENCHMARKS {
            println!("  {name:<10} {about}");
        }
        return Ok(());
    };
    let mut regressions = Vec::new();
    let report = if name == "table2" {
        let exe = std::env::current_exe().map_err(|source| CliError::File {
            what: "cannot find this program",
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let mut options = perf::table2::Options::new(exe, quick);
        if plots.is_some() {
            options.plots = plots;
        }
        let (report, rows) = perf::table2::run(&options)?;
        if let Some(path) = &check {
            let baseline = std::fs::read_to_string(path).map_err(|source| CliError::File {
                what: "cannot read the baseline",
                path: path.clone(),
                source,
            })?;
            regressions = perf::table2::check(&rows, &baseline)?;
        }
        report
    } else {
        perf::run(name, quick)?
    };
    println!("{}", report.text);
    if let Some(path) = json {
        std::fs::write(&path, report.json).map_err(|source| CliError::File {
            what: "cannot write",
            path,
            source,
        })?;
    }
    if !regressions.is_empty() {
        return Err(CliError::Usage(format!(
            "performance regression: {}",
            regressions.join("; ")
        )));
    }
    Ok(())
}

impl From<guests::UnknownGuest> for CliError {
    fn from(error: guests::UnknownGuest) -> Self {
        CliError::Usage(error.to_string())
    }
}
