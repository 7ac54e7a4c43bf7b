//! Measures the pause and total time of cloning a running guest (pre-copy
//! rounds from another thread, then stop-and-copy), for several guest
//! memory sizes, and prints a table.
//!
//! ```sh
//! cargo run --release -p vmm --example clone_bench -- [--guest scribble|fold] [--sizes 64,128,256,512,1024] [--trials 3] [--link tcp|none]
//! ```
//!
//! With `--link tcp` (the default) the stream crosses a loopback TCP
//! connection to a receiver that builds the new VM (`vmm::receive`), and
//! "join" is the time until that VM is complete and checked. With `--link
//! none` the stream goes to a byte counter, so "total" is the VMM-side cost
//! alone: reading guest memory and framing it with checksums.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vmm::events::{Discard, Live};
use vmm::{Machine, PrecopyPolicy, StateHeader, StateWriter, VmConfig, send_state};

/// A writer that counts what it passes on (to nowhere, or to a socket).
struct Counter(
    Arc<AtomicU64>,
    Option<std::io::BufWriter<std::net::TcpStream>>,
);

impl Write for Counter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = match self.1.as_mut() {
            Some(out) => out.write(bytes)?,
            None => bytes.len(),
        };
        self.0.fetch_add(written as u64, Ordering::Relaxed);
        Ok(written)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.1.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut guest = "scribble".to_string();
    let mut sizes = vec![64u64, 128, 256, 512, 1024];
    let mut trials = 3usize;
    let mut over_tcp = true;
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
            "--link" => over_tcp = value == "tcp",
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let image = guest_images::image(&guest).ok_or(format!("no guest {guest}"))?;
    println!(
        "guest {guest}: pre-copy (at most 8 rounds, stop at <= 256 pages) then stop-and-copy; {trials} trials per size"
    );
    println!(
        "| memory | rounds | pages per round (first trial) | final pages | pause p50 | pause max | total p50 | join p50 | stream MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for size in sizes {
        let mut pauses = Vec::new();
        let mut totals = Vec::new();
        let mut joins = Vec::new();
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
            let (socket, receiver) = if over_tcp {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                let socket = std::net::TcpStream::connect(listener.local_addr()?)?;
                let (incoming, _) = listener.accept()?;
                let expected = config.clone();
                let receiver = std::thread::spawn(move || {
                    let reader = std::io::BufReader::with_capacity(1 << 20, incoming);
                    vmm::receive(reader, image, Some(&expected))
                        .map(|received| (received.stats.pages, std::time::Instant::now()))
                });
                (
                    Some(std::io::BufWriter::with_capacity(1 << 20, socket)),
                    Some(receiver),
                )
            } else {
                (None, None)
            };
            let counter = Counter(bytes.clone(), socket);
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                let started = std::time::Instant::now();
                let result = StateWriter::new(counter, &header).and_then(|out| {
                    send_state(&handle, out, &PrecopyPolicy::default()).map(|(_, report, _)| report)
                });
                stop.store(true, Ordering::Relaxed);
                result.map(|report| (report, started))
            });
            let summary = machine.run()?;
            if std::env::var_os("CLONE_BENCH_DEBUG").is_some() {
                eprintln!("run: {summary:?}");
            }
            let (report, started) = sender.join().map_err(|_| "sender panicked")??;
            if let Some(receiver) = receiver {
                let (_, done) = receiver.join().map_err(|_| "receiver panicked")??;
                joins.push(done.duration_since(started));
            }
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
        joins.sort();
        let join = joins.get(joins.len() / 2).map_or("-".to_string(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1e3)
        });
        let (report, bytes) = first.ok_or("no trial")?;
        let per_round: Vec<String> = report
            .rounds
            .iter()
            .map(|round| round.pages.to_string())
            .collect();
        println!(
            "| {size} MiB | {} | {} | {} | {:.2} ms | {:.2} ms | {:.0} ms | {join} | {:.1} |",
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
