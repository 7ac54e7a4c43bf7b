//! `lockstep bench [NAME]`: runs one benchmark (or lists them), prints its
//! table, writes its JSON, and for table2 gates the ratios against a
//! committed baseline.
//!
//! ```text
//!  no NAME  → the list of BENCHMARKS
//!  table2   → table2::run(Options{exe, quick, plots, load, rounds})
//!             └─ --check FILE: gate::judge(rows, baseline) → notes on stderr,
//!                regressions → BenchError::Regression (exit 1)
//!  other    → crate::run(name, quick)
//!  --json F → the report's JSON written to F
//! ```

use std::path::{Path, PathBuf};

use clap::Args;

use crate::BenchError;

/// `lockstep bench`'s flags.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Which benchmark.
    pub name: Option<String>,
    /// Shorter runs, for CI.
    #[arg(long)]
    pub quick: bool,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// table2: fail (exit 1) when an FT/base ratio falls below this
    /// committed baseline by more than its tolerance.
    #[arg(long)]
    pub check: Option<PathBuf>,
    /// table2: write the SVG plots to this directory (default:
    /// target/table2 beside the executable's profile directory).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// table2: what drives the traffic: `iperf3` (stock iperf3 against
    /// the guest's port 5201) or `builtin` (the guest's sink and source).
    #[arg(long, default_value = "iperf3")]
    pub load: String,
    /// table2: rounds of every configuration (default: 5, or 3 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
}

/// Runs `lockstep bench`; `exe` is the `lockstep` binary table2 starts.
pub fn bench(args: &BenchArgs, exe: &Path) -> Result<(), BenchError> {
    let Some(name) = args.name.as_deref() else {
        println!("benchmarks (run one with `lockstep bench NAME [--quick] [--json FILE]`):");
        for (name, about) in crate::BENCHMARKS {
            println!("  {name:<10} {about}");
        }
        return Ok(());
    };
    let mut regressions = Vec::new();
    let report = if name == "table2" {
        let mut options = crate::table2::Options::new(exe.to_path_buf(), args.quick);
        if args.plots.is_some() {
            options.plots = args.plots.clone();
        }
        options.load = crate::table2::LoadKind::from_name(&args.load)?;
        if let Some(rounds) = args.rounds {
            options.rounds = rounds.max(1);
        }
        let (report, rows) = crate::table2::run(&options)?;
        if let Some(path) = &args.check {
            let baseline = std::fs::read_to_string(path).map_err(|source| BenchError::File {
                what: "cannot read the baseline",
                path: path.clone(),
                source,
            })?;
            let verdict = crate::table2::gate::judge(&rows, &baseline)?;
            eprintln!("table2 gate ({}):", path.display());
            for note in &verdict.notes {
                eprintln!("  {note}");
            }
            regressions = verdict.regressions;
        }
        report
    } else {
        crate::run(name, args.quick)?
    };
    println!("{}", report.text);
    if let Some(path) = &args.json {
        std::fs::write(path, report.json).map_err(|source| BenchError::File {
            what: "cannot write",
            path: path.clone(),
            source,
        })?;
    }
    if !regressions.is_empty() {
        return Err(BenchError::Regression(regressions.join("; ")));
    }
    Ok(())
}
