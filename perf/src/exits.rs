//! `lockstep bench exits`: exit rate and the cost of recording.
//!
//! The `exits` guest reads the paravirtual clock in a tight loop, so each
//! iteration is one MMIO exit and one logged event. Two cases run
//! alternately, several rounds each, from fresh VMs:
//!
//! - **baseline**: events go to a sink that keeps nothing;
//! - **record**: every event is encoded (header, crc32c) and written to a log
//!   in memory, and a digest of 16 MiB of memory is taken every 1000 exits.
//!
//! The figure of merit is record/baseline exits per second.

use channel::log::{LogMeta, LogWriter};
use vmm::events::{Discard, Live, LogSink};
use vmm::{Machine, VmConfig};

use crate::{BenchError, Report, git_revision, median};

const DIGEST_INTERVAL: u64 = 1000;

fn image() -> Result<&'static [u8], BenchError> {
    guest_images::image("exits")
        .ok_or_else(|| BenchError::Setup("the exits guest is not embedded".into()))
}

fn baseline(exits: u64) -> Result<f64, BenchError> {
    let events = Live::new(Box::new(std::io::empty()), Discard);
    let mut machine = Machine::new(
        &VmConfig::default(),
        image()?,
        exits,
        events,
        Box::new(std::io::sink()),
        0,
    )?;
    Ok(machine.run()?.exits_per_second())
}

fn recorded(exits: u64) -> Result<(f64, u64), BenchError> {
    let bytes = image()?;
    let meta = LogMeta {
        image_id: guest_images::image_id(bytes),
        mem_size: VmConfig::default().mem_size,
        guest_arg: exits,
        digest_interval: DIGEST_INTERVAL,
        vm_flags: VmConfig::default().flags(),
        guest_name: "exits".into(),
    };
    let sink = LogSink::new(
        LogWriter::new(Vec::with_capacity(64 << 20), &meta).map_err(vmm::VmmError::from)?,
    );
    let events = Live::new(Box::new(std::io::empty()), sink);
    let mut machine = Machine::new(
        &VmConfig::default(),
        bytes,
        exits,
        events,
        Box::new(std::io::sink()),
        DIGEST_INTERVAL,
    )?;
    let summary = machine.run()?;
    let log_bytes = machine.into_events().into_sink().bytes();
    Ok((summary.exits_per_second(), log_bytes))
}

/// Runs the benchmark.
pub fn run(quick: bool) -> Result<Report, BenchError> {
    let (rounds, exits) = if quick { (3, 5_000) } else { (7, 30_000) };
    let mut base = Vec::new();
    let mut record = Vec::new();
    let mut log_bytes = 0;
    for _ in 0..rounds {
        base.push(baseline(exits)?);
        let (rate, bytes) = recorded(exits)?;
        record.push(rate);
        log_bytes = bytes;
    }
    let (base_min, base_max) = spread(&base);
    let (record_min, record_max) = spread(&record);
    let base_median = median(&mut base);
    let record_median = median(&mut record);
    let ratio = record_median / base_median;
    let text = format!(
        "exits: {rounds} rounds of {exits} clock-read exits each, interleaved\n\
         case        exits/s (median)   min..max\n\
         baseline    {base_median:>16.0}   {base_min:.0}..{base_max:.0}\n\
         record      {record_median:>16.0}   {record_min:.0}..{record_max:.0}\n\
         record/baseline = {ratio:.3}   (cost of recording {:.1} %), {:.1} µs per exit, log {} bytes ({:.1} bytes/exit)",
        (1.0 - ratio) * 100.0,
        1e6 / base_median,
        log_bytes,
        log_bytes as f64 / exits as f64,
    );
    let json = format!(
        "{{\"benchmark\":\"exits\",\"git_revision\":\"{}\",\"rounds\":{rounds},\"exits_per_round\":{exits},\
         \"baseline_exits_per_s\":{base_median:.1},\"record_exits_per_s\":{record_median:.1},\
         \"record_over_baseline\":{ratio:.4},\"log_bytes\":{log_bytes}}}\n",
        git_revision()
    );
    Ok(Report { text, json })
}

fn spread(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}
