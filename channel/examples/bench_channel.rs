//! `lockstep bench channel` with chosen sizes, volume and rounds, without
//! building the whole `lockstep` binary:
//!
//! ```text
//! cargo run --release -p channel --example bench_channel -- [MIB_PER_CASE] [ROUNDS] [SIZE...]
//! ```

use channel::bench::{BenchOpts, run};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = BenchOpts::default();
    let parse = |i: usize, what: &str| -> Option<u64> {
        let a = args.get(i)?;
        match a.parse() {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("bench_channel: argument {} ({what}) '{a}': {e}", i + 1);
                std::process::exit(2)
            }
        }
    };
    if let Some(mib) = parse(0, "MiB per case") {
        opts.bytes_per_case = mib << 20;
    }
    if let Some(rounds) = parse(1, "rounds") {
        opts.rounds = u32::try_from(rounds).unwrap_or(u32::MAX);
    }
    let sizes: Vec<usize> = (2..args.len())
        .filter_map(|i| parse(i, "entry size"))
        .map(|s| s as usize)
        .collect();
    if !sizes.is_empty() {
        opts.sizes = sizes;
    }
    opts.rtt_samples = 2000;
    match run(&opts) {
        Ok(r) => print!("{r}"),
        Err(e) => {
            let mut msg = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cur = c.source();
            }
            eprintln!("bench_channel: {msg}");
            std::process::exit(1)
        }
    }
}
