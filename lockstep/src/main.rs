//! `lockstep`: the command-line front end. Thin on purpose: it parses
//! arguments, calls one library function per command and prints; a
//! failure is rendered once, with its chain of causes, by [`render`].
//!
//! ```text
//!  run, record, replay, demo   → replica::local
//!  primary, backup, arbiter    → replica::pair      (a config file first: lockstep_config::overrides)
//!  status, keygen              → replica::{status, keys}
//!  chaos, up                   → chaos::cli
//!  testbed, client             → testbed::cli
//!  bench                       → perf::cli
//!  exit 0 ok · 1 error · 4 fail-stop (replica::failover::EXIT_HALTED)
//! ```

mod stop;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use lockstep_config as config;
use replica::command::{CommandError, RunArgs};
use replica::keys;
use replica::local;
use replica::pair::{BackupArgs, PrimaryArgs};

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
    Record(local::RecordArgs),
    /// Replay a log against a fresh guest and check every digest.
    Replay(local::ReplayArgs),
    /// Run a guest as the primary of a fault-tolerant pair: stream its log
    /// to the backup and hold every output until the backup has it.
    Primary {
        #[command(flatten)]
        primary: PrimaryArgs,
        #[command(flatten)]
        ops: OpsArgs,
    },
    /// Wait for a primary and replay its guest in lockstep, output suppressed.
    Backup {
        #[command(flatten)]
        backup: BackupArgs,
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
    Chaos(chaos::cli::ChaosArgs),
    /// The embedded arbiter: an atomic test-and-set on generations that
    /// decides which replica may go live alone.
    Arbiter(replica::pair::ArbiterArgs),
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
    Up(chaos::cli::UpArgs),
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
        action: testbed::cli::Action,
    },
    /// The embedded default: record the `fold` guest fed with 1 MiB of input,
    /// then replay the log in a fresh VM and check every digest.
    Demo {
        /// Where to keep the log (default: a file in the temporary directory).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Benchmarks: `lockstep bench` lists them.
    Bench(perf::cli::BenchArgs),
}

/// What an operator's deployment adds to a replica's flags: a config file
/// (flags given on the command line override it) and the metrics endpoint.
#[derive(Args, Default)]
struct OpsArgs {
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

/// Errors of the commands, from the library crates that run them.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Bench(#[from] perf::BenchError),
    #[error(transparent)]
    Testbed(#[from] testbed::TestbedError),
    #[error(transparent)]
    Chaos(#[from] chaos::ChaosError),
    #[error(transparent)]
    Metrics(#[from] replica::metrics::MetricsError),
    #[error(transparent)]
    Status(#[from] replica::status::StatusError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("cannot find this program (/proc/self/exe)")]
    ThisProgram(#[source] std::io::Error),
}

/// `error` and its causes on one line, `a: b: c` (`channel::error_chain`,
/// the workspace's one renderer).
use channel::error_chain as render;

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
            tracing::error!("lockstep: {}", render(&error));
            match error {
                CliError::Command(error) if error.is_halted() => {
                    ExitCode::from(replica::failover::EXIT_HALTED)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn execute(command: Command, matches: &clap::ArgMatches) -> Result<(), CliError> {
    match command {
        Command::Run(args) => local::run(&args, stop::flag())?,
        Command::Record(args) => {
            local::record(&args.run, &args.log, args.digest_interval, stop::flag())?;
        }
        Command::Replay(args) => {
            println!(
                "{}",
                local::replay(&args.log, args.guest.as_deref(), args.quiet)?
            );
        }
        Command::Demo { log } => println!("{}", local::demo(log, stop::flag())?),
        Command::Primary { primary, ops } => run_role(primary, ops, matches)?,
        Command::Backup { backup, ops } => run_role(backup, ops, matches)?,
        Command::Config {
            action: ConfigAction::Check { file },
        } => {
            let role = config::load(&file)?.validate()?;
            println!(
                "{}: a valid config file for `lockstep {}`",
                file.display(),
                match role {
                    config::Role::Primary => "primary",
                    config::Role::Backup => "backup",
                }
            );
        }
        Command::Status { dir, json } => print!("{}", replica::status::report(&dir, json)?),
        Command::Chaos(args) => chaos::cli::campaign(&args, &this_program()?)?,
        Command::Arbiter(args) => replica::pair::serve_arbiter(&args)?,
        Command::Keygen { file } => {
            keys::generate(&file)?;
            tracing::info!(
                "lockstep keygen: wrote a new key to {} (mode 0600)",
                file.display()
            );
        }
        Command::Up(args) => chaos::cli::up(&args, &this_program()?, stop::flag())?,
        Command::Client { run, command } => {
            let code = testbed::cli::client(run.as_deref(), &command)?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Command::Testbed { action } => testbed::cli::run(action)?,
        Command::Bench(args) => perf::cli::bench(&args, &this_program()?)?,
    }
    Ok(())
}

/// Runs a replica role: its config file over the flags, its metrics, the role.
fn run_role<R: config::overrides::Role>(
    mut args: R,
    ops: OpsArgs,
    matches: &clap::ArgMatches,
) -> Result<(), CliError> {
    let mut metrics = ops.metrics;
    if let Some(path) = &ops.config {
        let loaded = config::load(path)?;
        loaded.check_role(R::ROLE)?;
        config::overrides::apply(&loaded, matches, &mut args, &mut metrics);
    }
    if let Some(address) = &metrics {
        let board = args.ft().board.clone();
        board.update(|f| f.role = R::NAME);
        replica::metrics::serve(address, board)?;
    }
    Ok(args.run(stop::flag())?)
}

/// The path of this executable, which the deployments and benchmarks run.
fn this_program() -> Result<PathBuf, CliError> {
    std::env::current_exe().map_err(CliError::ThisProgram)
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
