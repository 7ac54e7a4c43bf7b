//! One replica alone: `lockstep run`, `record`, `replay` and `demo`.
//!
//! ```text
//!  run     guest ──events──▶ Discard
//!  record  guest ──events──▶ LogSink ──▶ FILE  (or stdout with `--log -`:
//!                                              Progress marks, a flush at
//!                                              every sync point; console → stderr)
//!  replay  FILE (or stdin) ──▶ Replay ──▶ fresh guest, every digest checked
//!  demo    record `fold` fed 1 MiB, then replay it
//! ```

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use channel::log::{LogMeta, LogReader, LogWriter};
use guest_images::choice::GuestImage;
use vmm::events::{Discard, Live, LogSink, Replay};
use vmm::{Machine, VmConfig, VmmError};

use crate::command::{CommandError, RunArgs, console, ending, open_input};
use crate::network::Network;

/// `lockstep record`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct RecordArgs {
    /// The log file to write; `-` streams it to stdout for a live backup.
    #[arg(long)]
    pub log: PathBuf,
    /// The guest.
    #[command(flatten)]
    pub run: RunArgs,
    /// Take a state digest every this many exits (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    pub digest_interval: u64,
}

/// `lockstep replay`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ReplayArgs {
    /// The log file to replay; `-` reads a live stream from stdin.
    #[arg(long)]
    pub log: PathBuf,
    /// The guest the log was recorded from (default: the one it names).
    #[arg(long)]
    pub guest: Option<String>,
    /// Do not print the guest's console output.
    #[arg(long)]
    pub quiet: bool,
}

/// The log header of a recording of `guest` under `config`.
pub fn log_meta(guest: &GuestImage, config: &VmConfig, arg: u64, digest_interval: u64) -> LogMeta {
    LogMeta {
        image_id: guest.id(),
        mem_size: config.mem_size,
        guest_arg: arg,
        digest_interval,
        vm_flags: config.flags(),
        guest_name: guest.name().to_string(),
    }
}

/// `lockstep run`: the guest once, logging nothing.
pub fn run(args: &RunArgs, stop: Arc<AtomicBool>) -> Result<(), CommandError> {
    let guest = GuestImage::resolve(&args.guest)?;
    let network = Network::open(args.tap.as_deref())?;
    let events = Network::live(
        &network,
        Live::new(open_input(args.input.as_ref())?, Discard),
    )
    .with_stop(stop);
    let mut machine = Machine::new(
        &args.vm_config(),
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

/// `lockstep record`: the guest, its events written to `log` (`-`: stdout).
pub fn record(
    args: &RunArgs,
    log: &Path,
    digest_interval: u64,
    stop: Arc<AtomicBool>,
) -> Result<(), CommandError> {
    let guest = GuestImage::resolve(&args.guest)?;
    let config = args.vm_config();
    let meta = log_meta(&guest, &config, args.arg, digest_interval);
    // `--log -` streams to stdout for a live backup (`lockstep replay --log -`
    // at the other end of a pipe): Progress marks and a flush at every sync
    // point, and the guest's console moves to stderr.
    let streaming = log.as_os_str() == "-";
    let (out, file): (Box<dyn Write + Send>, Option<File>) = if streaming {
        (Box::new(std::io::stdout()), None)
    } else {
        let file =
            File::create(log).map_err(CommandError::file("cannot create the log file", log))?;
        let handle = file
            .try_clone()
            .map_err(CommandError::file("cannot use the log file", log))?;
        (Box::new(file), Some(handle))
    };
    let sink = LogSink::new(LogWriter::new(
        BufWriter::with_capacity(1 << 16, out),
        &meta,
    )?);
    let network = Network::open(args.tap.as_deref())?;
    let mut events =
        Network::live(&network, Live::new(open_input(args.input.as_ref())?, sink)).with_stop(stop);
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
        .map_err(CommandError::file("cannot write the log file", log))?;
    if let Some(file) = file {
        file.sync_all()
            .map_err(CommandError::file("cannot sync the log file", log))?;
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

/// `lockstep replay`: `log` (`-`: stdin) against a fresh guest, every
/// digest checked; returns the summary line.
pub fn replay(log: &Path, guest: Option<&str>, quiet: bool) -> Result<String, CommandError> {
    let input: Box<dyn Read + Send> = if log.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(log).map_err(CommandError::file("cannot open the log file", log))?)
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
    let mut machine = Machine::new(
        &config,
        guest.bytes(),
        meta.guest_arg,
        Replay::new(reader),
        console(quiet),
        meta.digest_interval,
    )?;
    let summary = machine.run()?;
    let stats = machine.events().stats();
    Ok(format!(
        "replayed {} exits and {} events; {} of {} digests matched; guest {} {}",
        summary.exits,
        stats.events,
        stats.digests_matched,
        summary.digests,
        guest.name(),
        ending(&summary)
    ))
}

/// `lockstep demo`: records the `fold` guest fed with 1 MiB of input to
/// `log` (default: a file in the temporary directory), then replays it in a
/// fresh VM; returns the replay's summary line.
pub fn demo(log: Option<PathBuf>, stop: Arc<AtomicBool>) -> Result<String, CommandError> {
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
    std::fs::write(&input, &bytes)
        .map_err(CommandError::file("cannot write the demo input", &input))?;
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
    let recorded = record(&args, &log, 250, stop);
    let _ = std::fs::remove_file(&input);
    recorded?;
    tracing::info!("lockstep demo: replaying {} in a fresh VM", log.display());
    replay(&log, None, true)
}
