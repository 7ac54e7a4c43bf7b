//! `lockstep chaos` and `lockstep up`: their flags and what they print.
//!
//! ```text
//!  lockstep chaos --trials N --seed S [--reprotect] [--json FILE]
//!    crate::run(…) → one summary line; exit 1 on any split brain, lost
//!    acknowledged write or non-linearizable history (and, with
//!    --reprotect, a joined backup that did not take over)
//!  lockstep up [--transport tcp|shm] [--disk FILE] …
//!    deploy::up(UpOptions) until SIGINT/SIGTERM
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Args;
use replica::pair::LivenessArgs;
use testbed::cli::parse_rate;

use crate::ChaosError;

/// `lockstep chaos`'s flags.
#[derive(Args, Clone, Debug)]
pub struct ChaosArgs {
    /// Trials to run.
    #[arg(long, default_value_t = 20)]
    pub trials: u64,
    /// Seed of the campaign's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// After each failover, join a new backup to the survivor by state
    /// transfer, then kill the survivor: the joined backup must take over.
    #[arg(long)]
    pub reprotect: bool,
    /// The replicas' heartbeat interval and peer timeout.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// Write every trial (fault, its time, who went live, generation,
    /// recovery, operations, verdict) and the summary to FILE as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `lockstep up`'s flags.
#[derive(Args, Clone, Debug)]
pub struct UpArgs {
    /// The logging channel's transport: `tcp` (io_uring TCP over the
    /// logging link between host a and host b) or `shm` (shared memory:
    /// both hosts are on this machine, and a unix socket path works
    /// across network namespaces).
    #[arg(long, default_value = "tcp")]
    pub transport: replica::link::TransportKind,
    /// Link address between primary and backup (default: host b's end
    /// of the logging link, port 7700, for tcp; a unix socket in the
    /// deployment's directory for shm).
    #[arg(long)]
    pub link: Option<String>,
    /// Both hosts' client links: a rate (`1gbit`, `100mbit`) or `unshaped`.
    #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
    pub client_link: testbed::Rate,
    /// The logging link between the hosts: a rate or `unshaped`.
    #[arg(long, default_value = "unshaped", value_parser = parse_rate)]
    pub log_link: testbed::Rate,
    /// The replicas' heartbeat interval and peer timeout.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// Give the guest a disk: the primary's image is FILE, the
    /// backup's FILE.backup (local disks; both created when missing).
    /// The Redis store keeps an append-only file there and reloads it
    /// at boot.
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
}

/// `lockstep up`: the default deployment until `stop` is set; `exe` is the
/// `lockstep` binary it runs.
pub fn up(args: &UpArgs, exe: &Path, stop: Arc<AtomicBool>) -> Result<(), ChaosError> {
    args.liveness.check()?;
    let options = crate::deploy::UpOptions {
        transport: args.transport,
        link: args.link.clone(),
        client_link: args.client_link,
        log_link: args.log_link,
        liveness: args.liveness.flags(),
        disk: args.disk.clone(),
    };
    crate::deploy::up(exe, &options, stop)
}

/// `lockstep chaos`: the campaign, its summary on stdout, its verdict.
pub fn campaign(args: &ChaosArgs, exe: &Path) -> Result<(), ChaosError> {
    args.liveness.check()?;
    let flags = args.liveness.flags();
    let campaign = crate::run(args.trials, args.seed, args.reprotect, &flags, exe)?;
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
    crate::report(&campaign, args.json.as_deref())?;
    if args.reprotect {
        println!(
            "chaos: {} re-protections by state transfer; {} joined backups went live when the survivor was killed in turn",
            campaign.joins, campaign.second_failovers
        );
        if campaign.second_failovers < campaign.joins {
            return Err(ChaosError::Verdict(
                "a joined backup did not take over from its dead primary".into(),
            ));
        }
    }
    if campaign.split_brains > 0 || campaign.lost_writes > 0 || campaign.violations > 0 {
        return Err(ChaosError::Verdict(
            "the campaign found split brains, lost writes or a non-linearizable history".into(),
        ));
    }
    Ok(())
}
