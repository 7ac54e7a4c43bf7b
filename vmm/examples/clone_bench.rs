//! Measures the pause and total time of cloning a running guest (pre-copy
//! rounds from another thread, then stop-and-copy), for several guest
//! memory sizes, and prints a table.
//!
//! ```sh
//! cargo run --release -p vmm --example clone_bench -- [--guest scribble|fold] [--sizes 64,128,256,512,1024] [--trials 3]
//! ```
//!
//! The stream goes to a byte counter (no network), so "total" is the
//! VMM-side cost: reading guest memory and framing it with checksums.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vmm::events::{Discard, Live};
use vmm::{Machine, PrecopyPolicy, StateHeader, StateWriter, VmConfig, send_state};

/// A writer that only counts.
struct Counter(Arc<AtomicU64>);

impl Write for Counter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut guest = "scribble".to_string();
    let mut sizes = vec![64u64, 128, 256, 512, 1024];
    let mut trials = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--guest" => guest = value,
            "--sizes" => {
                sizes = value
                    .split(',')
                    .map(|size| size.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--trials" => trials = value.parse()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let image = guest_images::image(&guest).ok_or(format!("no guest {guest}"))?;
    println!(
        "guest {guest}: pre-copy (at most 8 rounds, stop at <= 256 pages) then stop-and-copy; {trials} trials per size"
    );
    println!(
        "| memory | rounds | pages per round (first trial) | final pages | pause p50 | pause max | total p50 | stream MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for size in sizes {
        let mut pauses = Vec::new();
        let mut totals = Vec::new();
        let mut first = None;
        for _ in 0..trials {
            let config = VmConfig {
                mem_size: size << 20,
                ..VmConfig::default()
            };
            let stop = Arc::new(AtomicBool::new(false));
            let events = Live::new(Box::new(std::io::empty()), Discard).with_stop(stop.clone());
            let mut machine = Machine::new(
                &config,
                image,
                u64::MAX >> 1,
                events,
                Box::new(std::io::sink()),
                0,
            )?;
            let handle = machine.transfer_handle();
            let header = StateHeader::new(&config, image, u64::MAX >> 1);
            let bytes = Arc::new(AtomicU64::new(0));
            let counter = Counter(bytes.clone());
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let result = StateWriter::new(counter, &header).and_then(|out| {
                    send_state(&handle, out, &PrecopyPolicy::default()).map(|(_, report, _)| report)
                });
                stop.store(true, Ordering::Relaxed);
                result
            });
            let summary = machine.run()?;
            if std::env::var_os("CLONE_BENCH_DEBUG").is_some() {
                eprintln!("run: {summary:?}");
            }
            let report = sender.join().map_err(|_| "sender panicked")??;
            if std::env::var_os("CLONE_BENCH_DEBUG").is_some() {
                eprintln!("{report:?}");
            }
            pauses.push(report.pause);
            totals.push(report.total);
            if first.is_none() {
                first = Some((report, bytes.load(Ordering::Relaxed)));
            }
        }
        pauses.sort();
        totals.sort();
        let (report, bytes) = first.ok_or("no trial")?;
        let per_round: Vec<String> = report
            .rounds
            .iter()
            .map(|round| round.pages.to_string())
            .collect();
        println!(
            "| {size} MiB | {} | {} | {} | {:.2} ms | {:.2} ms | {:.0} ms | {:.1} |",
            report.rounds.len(),
            per_round.join(" / "),
            report.final_pages,
            pauses[pauses.len() / 2].as_secs_f64() * 1e3,
            pauses[pauses.len() - 1].as_secs_f64() * 1e3,
            totals[totals.len() / 2].as_secs_f64() * 1e3,
            bytes as f64 / (1 << 20) as f64,
        );
    }
    Ok(())
}
