//! `lockstep`: the command-line front end. Thin on purpose: it parses
//! arguments, builds the pieces from the library crates and prints results.

mod ft;
mod overrides;

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use channel::log::{LogMeta, LogReader, LogWriter};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use replica::network::Network;
use vmm::events::{Discard, Live, LogSink, Replay};
use vmm::{Machine, VmConfig, VmmError};

use guest_images::choice::{self as guests, GuestImage};
use lockstep_config::{self as config, keys};

/// Fault-tolerant virtual machines: a primary runs a guest on KVM, a backup
/// replays it in lockstep from a log of its non-deterministic events.
#[derive(Parser)]
#[command(name = "lockstep", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr: `text` (a sentence a line; with time and level
    /// on a terminal) or `json` (one JSON object a line, for log shippers).
    /// `RUST_LOG` filters them (default `info`; e.g. `RUST_LOG=warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Installs the `tracing` subscriber: `RUST_LOG`'s filter (default
/// `info`), on stderr. Text on a terminal has time and level; text
/// elsewhere (a pipe, the journal, which stamps lines itself) is the bare
/// sentence, exactly what lockstep printed before structured logs (tests
/// and `perf` read it); JSON has time, level, target and fields.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(error) => (
            EnvFilter::new("info"),
            std::env::var("RUST_LOG").ok().map(|text| (text, error)),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text if std::io::stderr().is_terminal() => builder.with_target(false).try_init(),
        LogFormat::Text => builder
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false)
            .try_init(),
    };
    if let Some((text, error)) = bad_filter {
        tracing::warn!("lockstep: RUST_LOG={text:?} is not a filter ({error}); logging at info");
    }
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
        #[command(flatten)]
        ops: OpsArgs,
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
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Config files: `lockstep config check FILE`.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Show role, generation, lag, held outputs and link figures of every
    /// replica on this host.
    Status {
        /// Where replicas publish their status.
        #[arg(long, default_value = replica::status::DEFAULT_DIR)]
        dir: PathBuf,
        /// Print the figures (those of `--metrics`) as JSON instead.
        #[arg(long)]
        json: bool,
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
        /// The replicas' heartbeat interval and peer timeout.
        #[command(flatten)]
        liveness: ft::LivenessArgs,
        /// Write every trial (fault, its time, who went live, generation,
        /// recovery, operations, verdict) and the summary to FILE as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
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
    /// The embedded default deployment on a testbed of network namespaces
    /// made for it: an arbiter in its own namespace, the primary of the `net`
    /// guest in host a, the backup in host b, until interrupted. Kill either
    /// replica and the other goes live; a new backup then joins it.
    Up {
        /// The logging channel's transport: `tcp` (io_uring TCP over the
        /// logging link between host a and host b) or `shm` (shared memory:
        /// both hosts are on this machine, and a unix socket path works
        /// across network namespaces).
        #[arg(long, default_value = "tcp")]
        transport: replica::link::TransportKind,
        /// Link address between primary and backup (default: host b's end
        /// of the logging link, port 7700, for tcp; a unix socket in the
        /// deployment's directory for shm).
        #[arg(long)]
        link: Option<String>,
        /// Both hosts' client links: a rate (`1gbit`, `100mbit`) or `unshaped`.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        client_link: testbed::Rate,
        /// The logging link between the hosts: a rate or `unshaped`.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        log_link: testbed::Rate,
        /// The replicas' heartbeat interval and peer timeout.
        #[command(flatten)]
        liveness: ft::LivenessArgs,
        /// Give the guest a disk: the primary's image is FILE, the
        /// backup's FILE.backup (local disks; both created when missing).
        /// The Redis store keeps an append-only file there and reloads it
        /// at boot.
        #[arg(long, value_name = "FILE")]
        disk: Option<PathBuf>,
    },
    /// Run a command in the client namespace of the running `lockstep up`
    /// (or of testbed `--run ID`), e.g. `lockstep client -- redis-cli -h
    /// GUEST incr counter`. The guest's address is in $LOCKSTEP_GUEST.
    Client {
        /// The testbed (default: the one `lockstep up` is running).
        #[arg(long)]
        run: Option<String>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// The emulated hosts by hand: network namespaces for a client, host a,
    /// host b and an arbiter, joined by shaped links.
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
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
        /// table2: what drives the traffic: `iperf3` (stock iperf3 against
        /// the guest's port 5201) or `builtin` (the guest's sink and source).
        #[arg(long, default_value = "iperf3")]
        load: String,
        /// table2: rounds of every configuration (default: 5, or 3 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
    },
}

/// What an operator's deployment adds to a replica's flags: a config file
/// (flags given on the command line override it) and the metrics endpoint.
#[derive(Args, Default)]
pub(crate) struct OpsArgs {
    /// Read the settings from this TOML file (see `lockstep config check`);
    /// flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (in this process's
    /// network namespace).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// `lockstep config …`.
#[derive(Subcommand)]
enum ConfigAction {
    /// Parse and validate a replica's config file (keys, guest, addresses)
    /// without starting anything; exits 1 with the key and line at fault.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// `lockstep testbed …`.
#[derive(Subcommand)]
enum TestbedAction {
    /// Build a testbed that stays until `lockstep testbed down`.
    Up {
        /// Both hosts' client links: a rate (`1gbit`, `100mbit`) or `unshaped`.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        client_link: testbed::Rate,
        /// The logging link.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        log_link: testbed::Rate,
        /// Both management links.
        #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
        mgmt_link: testbed::Rate,
    },
    /// Remove testbed RUN (and what runs in it), or every one with --all.
    Down {
        /// The run id (`lockstep testbed status` lists them).
        run: Option<String>,
        /// Remove every testbed on this host.
        #[arg(long)]
        all: bool,
    },
    /// List the testbeds on this host with their links, rates and the
    /// switch port the guest was learnt on.
    Status {
        /// Only this run.
        run: Option<String>,
    },
    /// Cut a link (both ends down): `log`, `client-a`, `client-b`, `mgmt-a`, `mgmt-b`.
    Cut {
        /// The link.
        #[arg(value_parser = parse_link)]
        link: testbed::Link,
        /// The testbed (default: the only one).
        #[arg(long)]
        run: Option<String>,
    },
    /// Restore a cut link.
    Restore {
        /// The link.
        #[arg(value_parser = parse_link)]
        link: testbed::Link,
        /// The testbed (default: the only one).
        #[arg(long)]
        run: Option<String>,
    },
    /// Shape a link to RATE in both directions (`unshaped` removes it).
    Shape {
        /// The link.
        #[arg(value_parser = parse_link)]
        link: testbed::Link,
        /// The rate.
        #[arg(value_parser = parse_rate)]
        rate: testbed::Rate,
        /// The testbed (default: the only one).
        #[arg(long)]
        run: Option<String>,
    },
}

fn parse_rate(text: &str) -> Result<testbed::Rate, String> {
    testbed::Rate::parse(text)
        .ok_or_else(|| format!("`{text}` is not a rate (say 1gbit, 100mbit or unshaped)"))
}

fn parse_link(text: &str) -> Result<testbed::Link, String> {
    testbed::Link::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = testbed::Link::ALL.iter().map(|l| l.name()).collect();
        format!("`{text}` is not a link (one of {})", names.join(", "))
    })
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
    /// if missing; needs CAP_NET_ADMIN). In a testbed host it is `tap0`.
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
    #[error(transparent)]
    Testbed(#[from] testbed::TestbedError),
    #[error(transparent)]
    Chaos(#[from] chaos::ChaosError),
    #[error(transparent)]
    Metrics(#[from] replica::metrics::MetricsError),
    #[error(transparent)]
    Status(#[from] replica::status::StatusError),
    #[error("{what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("{0}")]
    Usage(String),
}

/// `error` and its causes on one line, as `main` prints them.
pub(crate) fn cli_error_chain(error: &CliError) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

fn main() -> ExitCode {
    // The matches too: they tell which flags the command line gave, which
    // override a config file.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    init_logging(cli.log_format);
    let sub = matches
        .subcommand()
        .map(|(_, sub)| sub.clone())
        .unwrap_or_default();
    match execute(cli.command, &sub) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let halted = matches!(error, CliError::Vmm(VmmError::Halted(_)));
            tracing::error!("lockstep: {}", cli_error_chain(&error));
            if halted {
                ExitCode::from(replica::failover::EXIT_HALTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn execute(command: Command, matches: &clap::ArgMatches) -> Result<(), CliError> {
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
            mut backup,
            mut backup_id,
            mut run,
            mut ft,
            mut digest_interval,
            mut stats,
            mut join_listen,
            supersede_generation,
            mut ops,
        } => {
            if let Some(path) = &ops.config {
                let loaded = config::load(path)?;
                loaded.check_role(config::Role::Primary)?;
                overrides::apply_replica(&loaded, matches, &mut ft);
                overrides::apply_primary(
                    &loaded,
                    matches,
                    &mut overrides::PrimaryFlags {
                        run: &mut run,
                        backup: &mut backup,
                        backup_id: &mut backup_id,
                        join_listen: &mut join_listen,
                        stats: &mut stats,
                        digest_interval: &mut digest_interval,
                        metrics: &mut ops.metrics,
                    },
                );
            }
            if let Some(address) = &ops.metrics {
                ft.board.update(|f| f.role = "primary");
                replica::metrics::serve(address, ft.board.clone())?;
            }
            ft::primary(
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
            )
        }
        Command::Backup {
            mut listen,
            mut tap,
            mut join,
            mut join_listen,
            mut ft,
            mut quiet,
            mut ops,
        } => {
            if let Some(path) = &ops.config {
                let loaded = config::load(path)?;
                loaded.check_role(config::Role::Backup)?;
                overrides::apply_replica(&loaded, matches, &mut ft);
                overrides::apply_backup(
                    &loaded,
                    matches,
                    &mut overrides::BackupFlags {
                        listen: &mut listen,
                        tap: &mut tap,
                        join: &mut join,
                        join_listen: &mut join_listen,
                        quiet: &mut quiet,
                        metrics: &mut ops.metrics,
                    },
                );
            }
            if let Some(address) = &ops.metrics {
                ft.board.update(|f| f.role = "backup");
                replica::metrics::serve(address, ft.board.clone())?;
            }
            match join {
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
            }
        }
        Command::Config {
            action: ConfigAction::Check { file },
        } => {
            let loaded = config::load(&file)?;
            let role = loaded.validate()?;
            println!(
                "{}: a valid config file for `lockstep {}`",
                file.display(),
                match role {
                    config::Role::Primary => "primary",
                    config::Role::Backup => "backup",
                }
            );
            Ok(())
        }
        Command::Status { dir, json } => {
            print!("{}", replica::status::report(&dir, json)?);
            Ok(())
        }
        Command::Chaos {
            trials,
            seed,
            reprotect,
            liveness,
            json,
        } => {
            liveness.check()?;
            let campaign =
                chaos::run(trials, seed, reprotect, &liveness.flags(), &this_program()?)?;
            let mut times = campaign.failover_ms.clone();
            let p50 = perf::median(&mut times);
            let max = times.last().copied().unwrap_or(f64::NAN);
            println!(
                "chaos: {} trials, {} failovers, {} split brains, {} lost acknowledged writes ({} INCRs acknowledged), {} linearizability violations ({} operations checked, {} undecided); \
                 client served again after the fault: p50 {p50:.0} ms, max {max:.0} ms",
                campaign.trials,
                campaign.failovers,
                campaign.split_brains,
                campaign.lost_writes,
                campaign.acknowledged,
                campaign.violations,
                campaign.operations,
                campaign.undecided
            );
            chaos::report(&campaign, json.as_deref())?;
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
            if campaign.split_brains > 0 || campaign.lost_writes > 0 || campaign.violations > 0 {
                return Err(CliError::Usage(
                    "the campaign found split brains, lost writes or a non-linearizable history"
                        .into(),
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
            tracing::info!(
                "lockstep keygen: wrote a new key to {} (mode 0600)",
                file.display()
            );
            Ok(())
        }
        Command::Up {
            transport,
            link,
            client_link,
            log_link,
            liveness,
            disk,
        } => {
            liveness.check()?;
            let options = chaos::deploy::UpOptions {
                transport,
                link,
                client_link,
                log_link,
                liveness: liveness.flags(),
                disk,
            };
            chaos::deploy::up(&this_program()?, &options, stop_flag())?;
            Ok(())
        }
        Command::Client { run, command } => client(run.as_deref(), &command),
        Command::Testbed { action } => testbed_command(action),
        Command::Bench {
            name,
            quick,
            json,
            check,
            plots,
            load,
            rounds,
        } => bench(name.as_deref(), quick, json, check, plots, &load, rounds),
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

/// The path of this executable, which the deployments run.
fn this_program() -> Result<PathBuf, CliError> {
    std::env::current_exe().map_err(|source| CliError::File {
        what: "cannot find this program",
        path: PathBuf::from("/proc/self/exe"),
        source,
    })
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

fn run(args: &RunArgs) -> Result<(), CliError> {
    let guest = GuestImage::resolve(&args.guest)?;
    let network = Network::open(args.tap.as_deref())?;
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
    tracing::info!(
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
    let network = Network::open(args.tap.as_deref())?;
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
    tracing::info!(
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

/// The testbed `run`, or the one `lockstep up` runs (`label`), or the only
/// one on this host.
fn pick_testbed(run: Option<&str>, label: Option<&str>) -> Result<testbed::Testbed, CliError> {
    if let Some(run) = run {
        return Ok(testbed::Testbed::attach(run)?);
    }
    let candidates: Vec<testbed::Record> = match label {
        Some(label) => testbed::Testbed::find(label)?,
        None => testbed::Testbed::list()?
            .into_iter()
            .filter(|(_, alive)| *alive)
            .map(|(record, _)| record)
            .collect(),
    };
    let what = label.map_or("testbed".to_string(), |l| format!("`lockstep {l}`"));
    match candidates.as_slice() {
        [one] => Ok(testbed::Testbed::attach(&one.run)?),
        [] => Err(CliError::Usage(format!(
            "no {what} is running on this host (pass --run ID; `lockstep testbed status` lists testbeds)"
        ))),
        many => Err(CliError::Usage(format!(
            "{} of {what} are running (runs {}): pass --run ID",
            many.len(),
            many.iter()
                .map(|r| r.run.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `lockstep client -- CMD…`: runs CMD in the deployment's client namespace
/// and exits with its status.
fn client(run: Option<&str>, command: &[String]) -> Result<(), CliError> {
    let bed = pick_testbed(run, if run.is_some() { None } else { Some("up") })?;
    let Some((program, args)) = command.split_first() else {
        return Err(CliError::Usage("lockstep client needs a command".into()));
    };
    let status = bed
        .command(testbed::Ns::Client, program)?
        .args(args)
        .env("LOCKSTEP_GUEST", bed.addresses().guest.to_string())
        .status()
        .map_err(|source| CliError::File {
            what: "cannot run",
            path: PathBuf::from(program),
            source,
        })?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// `lockstep testbed up|down|status|cut|restore|shape`.
fn testbed_command(action: TestbedAction) -> Result<(), CliError> {
    use testbed::{Ns, Testbed};
    match action {
        TestbedAction::Up {
            client_link,
            log_link,
            mgmt_link,
        } => {
            let bed = Testbed::up(&testbed::Config {
                client_link,
                log_link,
                mgmt_link,
                ..testbed::Config::new("manual")
            })?;
            let status = bed.status()?;
            let at = bed.addresses().clone();
            let (a, client) = (bed.netns(Ns::A), bed.netns(Ns::Client));
            let run = bed.keep()?.run;
            print!("{status}");
            println!(
                "testbed {run} stays until `lockstep testbed down {run}`. Try:\n  ip netns exec {a} lockstep run --guest net --tap {} --arg {}\n  ip netns exec {client} redis-cli -h {} ping      (or: lockstep client --run {run} -- redis-cli -h {} ping)",
                testbed::TAP,
                at.guest_arg(),
                at.guest,
                at.guest
            );
            Ok(())
        }
        TestbedAction::Down { run, all } => {
            let removed = Testbed::clean_stale()?;
            for run in &removed {
                println!("removed stale testbed {run}");
            }
            let runs: Vec<String> = match (run, all) {
                (Some(run), false) => vec![run],
                (None, true) => Testbed::list()?.into_iter().map(|(r, _)| r.run).collect(),
                (Some(_), true) => {
                    return Err(CliError::Usage("pass a run id or --all, not both".into()));
                }
                (None, false) if !removed.is_empty() => Vec::new(),
                (None, false) => {
                    return Err(CliError::Usage(
                        "which testbed? pass a run id (`lockstep testbed status`) or --all".into(),
                    ));
                }
            };
            for run in runs {
                Testbed::down(&run)?;
                println!("removed testbed {run}");
            }
            Ok(())
        }
        TestbedAction::Status { run } => {
            let records = Testbed::list()?;
            if records.is_empty() {
                println!("no testbeds on this host");
            }
            for (record, alive) in records {
                if run.as_deref().is_some_and(|run| run != record.run) {
                    continue;
                }
                if !alive {
                    println!(
                        "testbed {} ({}): STALE, owner pid {} is gone (removed at the next start or by `lockstep testbed down`)",
                        record.run, record.label, record.pid
                    );
                    continue;
                }
                print!("{}", Testbed::attach(&record.run)?.status()?);
            }
            Ok(())
        }
        TestbedAction::Cut { link, run } => {
            pick_testbed(run.as_deref(), None)?.cut(link)?;
            println!("cut {link}");
            Ok(())
        }
        TestbedAction::Restore { link, run } => {
            pick_testbed(run.as_deref(), None)?.restore(link)?;
            println!("restored {link}");
            Ok(())
        }
        TestbedAction::Shape { link, rate, run } => {
            pick_testbed(run.as_deref(), None)?.set_rate(link, rate)?;
            println!("{link} shaped: {rate}");
            Ok(())
        }
    }
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
    tracing::info!("lockstep demo: recording guest 'fold' to {}", log.display());
    let recorded = record(&args, &log, 250);
    let _ = std::fs::remove_file(&input);
    recorded?;
    tracing::info!("lockstep demo: replaying {} in a fresh VM", log.display());
    replay(&log, None, true)
}

fn bench(
    name: Option<&str>,
    quick: bool,
    json: Option<PathBuf>,
    check: Option<PathBuf>,
    plots: Option<PathBuf>,
    load: &str,
    rounds: Option<usize>,
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
        options.load = perf::table2::LoadKind::from_name(load)?;
        if let Some(rounds) = rounds {
            options.rounds = rounds.max(1);
        }
        let (report, rows) = perf::table2::run(&options)?;
        if let Some(path) = &check {
            let baseline = std::fs::read_to_string(path).map_err(|source| CliError::File {
                what: "cannot read the baseline",
                path: path.clone(),
                source,
            })?;
            let verdict = perf::table2::gate::judge(&rows, &baseline)?;
            eprintln!("table2 gate ({}):", path.display());
            for note in &verdict.notes {
                eprintln!("  {note}");
            }
            regressions = verdict.regressions;
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_testbed_knows_the_guests_mac() {
        // The testbed reports the switch port of this MAC; it keeps its own
        // copy to stay a leaf crate.
        assert_eq!(testbed::GUEST_MAC, vmm::DEFAULT_MAC);
    }
}
