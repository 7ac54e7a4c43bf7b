//! What the `lockstep` commands share: the guest's flags ([`RunArgs`]),
//! the console and input of a run, and [`CommandError`], the one error
//! type that the commands built here ([`crate::local`], [`crate::pair`])
//! return. The binary renders its chain once, on one line, and exits 4
//! when [`CommandError::is_halted`] (fail-stop).
//!
//! ```text
//!  lockstep main ──args──▶ replica::local::{run, record, replay, demo}
//!                          replica::pair::{run_primary, run_backup, serve_arbiter}
//!        ▲                              │
//!        └──── CommandError (source chain: Vmm / Replica / Arbiter / File …)
//! ```

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use guest_images::choice::{self as guests, UnknownGuest};
use vmm::{VmConfig, VmmError};

/// The guest a command runs.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Guest program: an embedded guest's name (see --help) or a path to an ELF file.
    #[arg(long, default_value = "fold", long_help = guests::help())]
    pub guest: String,
    /// Guest memory, in MiB.
    #[arg(long, default_value_t = 16)]
    pub mem_mib: u64,
    /// The guest argument (fold: rounds; exits: clock reads; 0: the guest's default).
    #[arg(long, default_value_t = 0)]
    pub arg: u64,
    /// Feed this file to the guest's input stream (default: empty input).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Let the guest execute RDTSC (clears CR4.TSD): its runs then cannot be replayed.
    #[arg(long)]
    pub allow_rdtsc: bool,
    /// Do not print the guest's console output.
    #[arg(long)]
    pub quiet: bool,
    /// Give the guest a virtio-net NIC backed by this TAP interface (created
    /// if missing; needs CAP_NET_ADMIN). In a testbed host it is `tap0`.
    #[arg(long)]
    pub tap: Option<String>,
}

impl RunArgs {
    /// The VM these flags ask for.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            mem_size: self.mem_mib << 20,
            trap_rdtsc: !self.allow_rdtsc,
            mac: self.tap.as_ref().map(|_| vmm::DEFAULT_MAC),
        }
    }
}

/// Why a command failed: the library error it met, with what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The VM failed or halted.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A log could not be written or read.
    #[error(transparent)]
    Log(#[from] channel::log::LogError),
    /// The NIC or its TAP failed.
    #[error(transparent)]
    Nic(#[from] nic::NicError),
    /// The replication link failed.
    #[error(transparent)]
    Replica(#[from] crate::ReplicaError),
    /// A key file cannot be read or made.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// The guest named is not embedded and not a file.
    #[error(transparent)]
    Guest(#[from] UnknownGuest),
    /// The arbiter could not be reached, refused, or failed.
    #[error(transparent)]
    Arbiter(#[from] arbiter::ArbiterError),
    /// A replica name the arbiter cannot record.
    #[error(transparent)]
    ReplicaId(#[from] arbiter::model::InvalidReplicaId),
    /// The heartbeat settings do not fit together.
    #[error(transparent)]
    Liveness(#[from] crate::pair::LivenessError),
    /// `--supersede-generation` does not fit the arbiter's record.
    #[error(transparent)]
    Supersede(#[from] crate::primary::SupersedeError),
    /// The arbiter's key file cannot be used.
    #[error(transparent)]
    ArbiterKey(#[from] arbiter::protocol::KeyError),
    /// The embedded arbiter's server failed.
    #[error(transparent)]
    ArbiterServer(#[from] arbiter::server::ServerError),
    /// A file, socket or thread could not be used.
    #[error("{what} {}", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// The file (or address, or thread name).
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Flags that do not fit together.
    #[error("{0}")]
    Usage(String),
}

impl CommandError {
    /// The replica halted for good (fail-stop): `lockstep` exits with
    /// [`crate::failover::EXIT_HALTED`].
    pub fn is_halted(&self) -> bool {
        matches!(self, CommandError::Vmm(VmmError::Halted(_)))
    }

    /// An I/O error on `path`, saying what was being done.
    pub fn file(what: &'static str, path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        move |source| CommandError::File { what, path, source }
    }
}

/// The guest's console: stdout, or nowhere with `quiet`.
pub fn console(quiet: bool) -> Box<dyn Write + Send> {
    if quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(std::io::stdout())
    }
}

/// The guest's input stream: the file, or empty.
pub fn open_input(path: Option<&PathBuf>) -> Result<Box<dyn Read + Send>, CommandError> {
    match path {
        None => Ok(Box::new(std::io::empty())),
        Some(path) => {
            let file =
                File::open(path).map_err(CommandError::file("cannot open the input file", path))?;
            Ok(Box::new(BufReader::new(file)))
        }
    }
}

/// How a run ended, for the summary lines.
pub fn ending(summary: &vmm::RunSummary) -> String {
    if summary.stopped {
        "was stopped by the host".to_string()
    } else {
        format!("exited with code {}", summary.exit_code)
    }
}
