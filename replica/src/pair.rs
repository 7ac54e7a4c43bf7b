//! `lockstep primary`, `lockstep backup`, `lockstep arbiter`: the fault-tolerant
//! pair and its arbiter, wired from this crate's pieces.
//!
//! ```text
//!  run_primary(PrimaryArgs)                    run_backup(BackupArgs)
//!   arbiter: read, register (g, me, backup)     arbiter: read g at each connection
//!   PrimaryLink::connect ─── handshake(g) ───▶  LinkListener::accept_primary
//!   FailoverSink (Output Rule, liveness)        BackupSource (Replay, promotion)
//!   JoinService on --join-listen                --join: state transfer, then follow
//!   machine.run(); figures; --stats JSON        follow(): replay until end or halt
//! ```
//!
//! Every function returns [`CommandError`]; a fail-stop is
//! `VmmError::Halted` ([`CommandError::is_halted`], exit 4).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::backup::LinkListener;
use crate::failover::{BackupSource, CutoverOutput, FailoverSink, Membership, Promote};
use crate::link::{LinkSettings, TransportKind};
use crate::primary::PrimaryLink;
use arbiter::{Arbiter, EmbeddedArbiter, Key, Outcome, ReplicaId};
use clap::Args;
use nic::gate::OutputGate;
use vmm::events::{Live, Replay};
use vmm::{Machine, VmConfig, VmmError};

use crate::command::{CommandError, RunArgs, console, ending, open_input};
use crate::local::log_meta;
use crate::network::Network;
use guest_images::choice::GuestImage;

/// How a replica finds the arbiter and names itself.
#[derive(Args, Clone)]
pub struct FtArgs {
    /// The arbiter: `HOST:PORT` of `lockstep arbiter`, or
    /// `etcd://HOST:PORT[,HOST:PORT…]` for an etcd cluster (production: the
    /// authority itself replicated; `etcds://` for HTTPS, see --etcd-ca).
    /// Without one, a replica that loses its peer stops (fail-stop)
    /// instead of going live alone.
    #[arg(long)]
    pub arbiter: Option<String>,
    /// TLS and login for an etcd arbiter.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// File holding the embedded arbiter's pre-shared key.
    #[arg(long)]
    pub arbiter_key: Option<PathBuf>,
    /// The VM's identity at the arbiter.
    #[arg(long, default_value_t = 1)]
    pub vm_id: u64,
    /// This replica's name at the arbiter.
    #[arg(long)]
    pub id: Option<String>,
    /// Heartbeat interval and peer timeout of the logging channel.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// Where this replica publishes its status for `lockstep status`.
    #[arg(long, default_value = crate::status::DEFAULT_DIR)]
    pub status_dir: PathBuf,
    /// The logging channel's transport: `tcp` (io_uring; the backup's
    /// address is HOST:PORT), `shm` (shared memory, both replicas on this
    /// host; the address is a unix socket path) or `rdma` (a build with the
    /// `rdma` feature and an RDMA device; set up over TCP at HOST:PORT;
    /// falls back to tcp when either is missing).
    #[arg(long, default_value = "tcp")]
    pub transport: TransportKind,
    /// File holding the pre-shared key both replicas prove in the channel
    /// handshake, at least 32 bytes (default: the arbiter's key file; one
    /// of the two is required: make one with `lockstep keygen FILE`).
    #[arg(long)]
    pub link_key: Option<PathBuf>,
    /// The VM's disk image (virtio-blk), created zero-filled (64 MiB) when
    /// missing. Local mode: each replica has its own identical copy.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// `local`: each replica applies every write to its own image;
    /// `shared`: both replicas name the same image, only the primary
    /// writes it, each write held until the backup acknowledged the log
    /// that produced it, read data in the log.
    #[arg(long, default_value = "local")]
    pub disk_mode: crate::disk::DiskMode,
    /// Where this replica's figures go for `--metrics` (not a flag).
    #[arg(skip)]
    pub board: crate::status::Board,
}

/// How a replica reaches a TLS etcd and logs in (`[arbiter]` in a config
/// file).
#[derive(Args, Clone, Default)]
pub struct EtcdArgs {
    /// etcds:// only: the CA (PEM) that signed the etcd members'
    /// certificates; the only root trusted.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// This replica's client certificate (PEM) for etcd's
    /// --client-cert-auth (with --etcd-key).
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// The etcd user to log in as (etcd v3 auth; with --etcd-password-file).
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// A file (mode 0600) whose first line is the etcd user's password
    /// (never on the command line).
    #[arg(long)]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The settings for the etcd client.
    pub fn security(&self) -> arbiter::EtcdSecurity {
        arbiter::EtcdSecurity {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }
}

/// How fast a replica notices that its peer is gone.
///
/// Both ends of the logging channel send a heartbeat from the channel's own
/// threads (the primary's sender, the backup's receiver) whenever they have
/// sent nothing else for `--heartbeat-ms`, whatever the guest is doing; the
/// log batches and acks count as heartbeats too. An end that hears nothing
/// at all from its peer for `--peer-timeout-ms` counts it as lost and goes
/// to the arbiter. A peer that is slow but still talks (it heartbeats, or
/// its acks advance) is never declared dead.
///
/// The defaults (5 ms / 50 ms) suit both replicas on one host or a quiet
/// LAN: a failover is noticed within 50 ms. On a real network set the
/// timeout to several times the worst round trip plus the longest pause a
/// replica may see (a loaded host, a VM migration, GC of a neighbour), e.g.
/// `--heartbeat-ms 20 --peer-timeout-ms 500` across racks; it must be at
/// least three heartbeats. A longer timeout never risks split brain (the
/// arbiter decides); it only delays the failover.
#[derive(Args, Clone, Copy, Debug)]
pub struct LivenessArgs {
    /// Heartbeat interval of the logging channel, in ms (see above).
    #[arg(long, default_value_t = 5)]
    pub heartbeat_ms: u64,
    /// The peer counts as lost after this long without a word, in ms (at
    /// least 3 heartbeats).
    #[arg(long, default_value_t = 50)]
    pub peer_timeout_ms: u64,
}

/// Liveness settings under which a late heartbeat would look like a death.
#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    /// `--heartbeat-ms 0`.
    #[error("--heartbeat-ms must be at least 1")]
    ZeroHeartbeat,
    /// A timeout shorter than three heartbeats.
    #[error(
        "--peer-timeout-ms {peer_timeout_ms} is shorter than three heartbeats (--heartbeat-ms {heartbeat_ms}): a late heartbeat would look like a dead peer"
    )]
    ShortTimeout {
        /// The timeout given.
        peer_timeout_ms: u64,
        /// The heartbeat given.
        heartbeat_ms: u64,
    },
}

impl LivenessArgs {
    /// The peer timeout.
    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms.max(1))
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(1))
    }

    /// Refuses settings under which a late heartbeat looks like a death.
    pub fn check(&self) -> Result<(), LivenessError> {
        if self.heartbeat_ms == 0 {
            return Err(LivenessError::ZeroHeartbeat);
        }
        if self.peer_timeout_ms < 3 * self.heartbeat_ms {
            return Err(LivenessError::ShortTimeout {
                peer_timeout_ms: self.peer_timeout_ms,
                heartbeat_ms: self.heartbeat_ms,
            });
        }
        Ok(())
    }

    /// The same settings as command-line flags, for a replica started by
    /// `lockstep up` or `lockstep chaos`.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--heartbeat-ms".into(),
            self.heartbeat_ms.to_string(),
            "--peer-timeout-ms".into(),
            self.peer_timeout_ms.to_string(),
        ]
    }
}

impl FtArgs {
    fn disk(&self) -> Option<crate::disk::DiskOptions> {
        let path = self.disk.as_ref()?;
        Some(crate::disk::DiskOptions {
            mode: self.disk_mode,
            ..crate::disk::DiskOptions::local(path)
        })
    }

    fn peer_timeout(&self) -> Duration {
        self.liveness.peer_timeout()
    }

    fn arbiter(&self) -> Result<Option<Arc<dyn Arbiter>>, CommandError> {
        let Some(address) = &self.arbiter else {
            return Ok(None);
        };
        if address.starts_with("etcd://") || address.starts_with("etcds://") {
            let security = self.etcd.security();
            let etcd = arbiter::EtcdArbiter::from_url(address, &security, Duration::from_secs(2))?;
            return Ok(Some(Arc::new(etcd)));
        }
        if !self.etcd.security().is_empty() {
            return Err(CommandError::Usage(
                "--etcd-ca, --etcd-cert, --etcd-key, --etcd-user and --etcd-password-file are for an etcd:// or etcds:// --arbiter".into(),
            ));
        }
        let key_path = self
            .arbiter_key
            .as_ref()
            .ok_or_else(|| CommandError::Usage("--arbiter needs --arbiter-key FILE".into()))?;
        let key = Key::from_file(key_path)?;
        let client = EmbeddedArbiter::connect(address.as_str(), key, Duration::from_secs(2))?;
        Ok(Some(Arc::new(client)))
    }

    /// The channel settings: transport, key, VM id, and the two-core
    /// profile with this heartbeat interval and peer timeout.
    pub fn link_settings(&self) -> Result<LinkSettings, CommandError> {
        self.liveness.check()?;
        let key = match self.link_key.as_ref().or(self.arbiter_key.as_ref()) {
            Some(path) => crate::keys::read(path, "link key")?,
            None => {
                return Err(CommandError::Usage(
                    "no link key: both replicas must prove a pre-shared key; make one with `lockstep keygen FILE` and pass --link-key FILE (or --arbiter-key FILE) to both".into(),
                ));
            }
        };
        let mut profile = crate::link::Profile::two_core();
        profile.liveness.peer_timeout = self.peer_timeout();
        profile.liveness.heartbeat = self.liveness.heartbeat();
        Ok(LinkSettings {
            kind: self.transport,
            key,
            vm_id: self.vm_id,
            profile,
        }
        .usable())
    }

    fn me(&self, default: &str) -> Result<ReplicaId, CommandError> {
        let name = self.id.clone().unwrap_or_else(|| default.to_string());
        Ok(ReplicaId::new(name)?)
    }
}

/// `lockstep arbiter`'s flags.
#[derive(Args, Clone, Debug)]
pub struct ArbiterArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: String,
    /// State file (fsync'ed before every grant).
    #[arg(long)]
    pub state: PathBuf,
    /// File holding the pre-shared key.
    #[arg(long)]
    pub key_file: PathBuf,
}

/// `lockstep arbiter`: the embedded arbiter server.
pub fn serve_arbiter(args: &ArbiterArgs) -> Result<(), CommandError> {
    let (listen, state) = (args.listen.as_str(), args.state.as_path());
    let key = Key::from_file(&args.key_file)?;
    let listener =
        TcpListener::bind(listen).map_err(CommandError::file("cannot listen on", listen))?;
    tracing::info!(
        "lockstep arbiter: listening on {listen}, state in {}",
        state.display()
    );
    Ok(arbiter::server::serve(listener, state, key)?)
}

/// `lockstep primary`'s flags.
#[derive(Args, Clone)]
pub struct PrimaryArgs {
    /// The backup's address (`lockstep backup --listen`).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub backup: String,
    /// The backup's name at the arbiter.
    #[arg(long, default_value = "backup")]
    pub backup_id: String,
    /// The guest.
    #[command(flatten)]
    pub run: RunArgs,
    /// The arbiter, the link and this replica's name.
    #[command(flatten)]
    pub ft: FtArgs,
    /// Write the primary's figures (log bytes, acks, hold times) as JSON here at exit.
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Take a state digest every this many exits (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    pub digest_interval: u64,
    /// Accept new backups here (`lockstep backup --join`) whenever this
    /// primary runs alone: re-protection by state transfer.
    #[arg(long)]
    pub join_listen: Option<String>,
    /// Start a new pair even though the arbiter records generation G
    /// for this VM (with this replica as its primary): the operator's
    /// word that the pair of generation G is gone for good. Without it,
    /// a primary starts only a VM the arbiter has never seen, and
    /// refuses to supersede a running (or failing-over) pair.
    #[arg(long, value_name = "G")]
    pub supersede_generation: Option<u64>,
}

/// `lockstep backup`'s flags.
#[derive(Args, Clone)]
pub struct BackupArgs {
    /// Address to listen on for the primary.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: String,
    /// The TAP interface to serve on if this backup goes live.
    #[arg(long)]
    pub tap: Option<String>,
    /// Join a running primary that lost its backup (its `--join-listen`
    /// address): clone it by state transfer, then follow it.
    #[arg(long)]
    pub join: Option<String>,
    /// Once this backup has gone live, accept a new backup of its own
    /// here (`lockstep backup --join`).
    #[arg(long)]
    pub join_listen: Option<String>,
    /// The arbiter, the link and this replica's name.
    #[command(flatten)]
    pub ft: FtArgs,
    /// Do not print the guest's console output.
    #[arg(long)]
    pub quiet: bool,
}

/// `lockstep backup`: waits for a primary (or, with `--join`, clones a
/// running one) and follows it.
pub fn run_backup(options: &BackupArgs, stop: Arc<AtomicBool>) -> Result<(), CommandError> {
    let (tap, join_listen) = (options.tap.as_deref(), options.join_listen.as_deref());
    match &options.join {
        Some(primary) => join(primary, tap, join_listen, &options.ft, options.quiet, stop),
        None => backup(
            &options.listen,
            tap,
            join_listen,
            &options.ft,
            options.quiet,
            stop,
        ),
    }
}

/// `lockstep primary`: registers the pair at the arbiter, runs the guest
/// and streams its log to the backup, every output held until the backup
/// has what produced it.
pub fn run_primary(options: &PrimaryArgs, stop: Arc<AtomicBool>) -> Result<(), CommandError> {
    let (args, ft, digest_interval) = (&options.run, &options.ft, options.digest_interval);
    let stats_file = options.stats.as_deref();
    let (backup, backup_id) = (options.backup.as_str(), options.backup_id.as_str());
    let join_listen = options.join_listen.as_deref();
    if join_listen.is_some() && ft.disk.is_some() && ft.disk_mode == crate::disk::DiskMode::Shared {
        return Err(CommandError::Usage(
            "--join-listen with --disk-mode shared: re-protection of a shared-disk pair is not built yet (issue 19); use --disk-mode local to re-protect".into(),
        ));
    }
    let disk = ft.disk().map(|disk| disk.open(false)).transpose()?;
    let guest = GuestImage::resolve(&args.guest)?;
    let config = args.vm_config();
    let meta = log_meta(&guest, &config, args.arg, digest_interval);
    let me = ft.me("primary")?;
    let arbiter = ft.arbiter()?;
    let generation = match &arbiter {
        None => 0,
        Some(arbiter) => {
            let peer = ReplicaId::new(backup_id)?;
            let record = arbiter.read(ft.vm_id)?;
            let expected = crate::primary::generation_to_supersede(
                ft.vm_id,
                &me,
                record.as_ref(),
                options.supersede_generation,
            )
            .map_err(|error| match error {
                crate::primary::SupersedeError::Refused(why) => VmmError::Halted(why).into(),
                usage => CommandError::from(usage),
            })?;
            match arbiter.register(ft.vm_id, expected, &me, &peer)? {
                Outcome::Won(record) => record.generation,
                Outcome::Lost { reason, current } => {
                    return Err(VmmError::Halted(format!(
                        "the arbiter refused to start a pair with {me} as primary ({}; current: {current:?})",
                        reason.describe()
                    ))
                    .into());
                }
            }
        }
    };
    let membership = arbiter.map(|arbiter| Membership {
        arbiter,
        vm: ft.vm_id,
        me: me.clone(),
        generation,
    });
    // Joining backups are taken on by the same service as a live backup's.
    let joins = match join_listen {
        Some(address) => Some(JoinSetup::new(
            address,
            membership.as_ref(),
            ft,
            &meta,
            vmm::StateHeader::new(&config, guest.bytes(), args.arg),
        )?),
        None => None,
    };
    let network = Network::open_with(args.tap.as_deref(), true)?;
    let gate = match &network {
        Some(network) => Arc::clone(&network.gate),
        None => Arc::new(OutputGate::new(Box::new(nic::gate::Dropped))),
    };
    let settings = ft.link_settings()?;
    let link = PrimaryLink::connect(
        backup,
        &settings,
        generation,
        &meta,
        Arc::clone(&gate),
        Duration::from_secs(30),
    )?;
    tracing::info!(
        "lockstep primary: {me}, generation {generation}, streaming to the backup at {backup} over {}",
        link.transport()
    );
    let mut sink = FailoverSink::new(link, Arc::clone(&gate), membership, ft.peer_timeout())
        .with_status(
            crate::status::StatusFile::new(&ft.status_dir, me.as_str())
                .with_board(ft.board.clone()),
        );
    if let Some(guard) = network.as_ref().and_then(|n| n.guard.clone()) {
        sink = sink.with_guard(guard);
    }
    if let Some(setup) = &joins {
        sink = sink.with_joins(Arc::clone(&setup.port));
    }
    let events = Network::live(&network, Live::new(open_input(args.input.as_ref())?, sink))
        .streaming()
        .with_stop(stop);
    let mut machine = Machine::new(
        &config,
        guest.bytes(),
        args.arg,
        events,
        console(args.quiet),
        digest_interval,
    )?;
    Network::attach(&network, &mut machine)?;
    crate::disk::DiskOptions::attach(disk, &mut machine, &gate)?;
    if let Some(setup) = joins {
        spawn_join_service(setup, machine.transfer_handle(), Arc::clone(&gate))?;
    }
    let summary = machine.run()?;
    let mut sink = machine.into_events().into_sink();
    let all_acked = sink.finish()?;
    let entries = sink.entries();
    let protection = match sink.unprotected() {
        Some(generation) => {
            format!("running unprotected in generation {generation} since its backup was lost")
        }
        None => format!(
            "backup acknowledged {} of {entries} entries ({})",
            sink.acked(),
            if all_acked {
                "everything"
            } else {
                "NOT everything"
            }
        ),
    };
    let channel = match sink.metrics() {
        Some(metrics) => format!(
            "; channel {}: {} batches, ack round trip p50 {} µs, p99 {} µs, {} heartbeats sent",
            sink.transport(),
            metrics.batches,
            metrics.ack_rtt_ns.value_at_quantile(0.5) / 1000,
            metrics.ack_rtt_ns.value_at_quantile(0.99) / 1000,
            metrics.heartbeats_sent
        ),
        None => String::new(),
    };
    tracing::info!(
        "lockstep primary: guest {} {} after {} exits; {} acks; {protection}{channel}",
        guest.name(),
        ending(&summary),
        summary.exits,
        sink.acks(),
    );
    let stats = gate.stats();
    tracing::info!(
        "lockstep primary: output gate released {} frames, held at most {}; hold time p50 {} µs, p99 {} µs, p99.9 {} µs",
        stats.released,
        stats.max_held,
        stats.hold_ns.value_at_quantile(0.5) / 1000,
        stats.hold_ns.value_at_quantile(0.99) / 1000,
        stats.hold_ns.value_at_quantile(0.999) / 1000
    );
    if let Some(path) = stats_file {
        use crate::stats::{ChannelStats, HOLD_QUANTILES, Hop, PrimaryStats};
        // Per-hop timing (`lockstep bench latency`): [p50, p99, count] ns.
        let hop = |h: &nic::gate::Histogram<u64>| -> Hop {
            [h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.len()]
        };
        let mut hops_ns = std::collections::BTreeMap::from([
            ("gate_submit_wait".to_string(), hop(&stats.submit_wait_ns)),
            ("gate_tap_write".to_string(), hop(&stats.tap_write_ns)),
            ("gate_hold".to_string(), hop(&stats.hold_ns)),
        ]);
        if let Some(m) = sink.metrics() {
            hops_ns.insert("sender_wake".into(), hop(&m.wake_ns));
            hops_ns.insert("sender_batch_fill".into(), hop(&m.batch_fill_ns));
            hops_ns.insert("ack_rtt".into(), hop(&m.ack_rtt_ns));
            hops_ns.insert("ack_rtt_sender_slept".into(), hop(&m.ack_rtt_slept_ns));
            hops_ns.insert("ack_rtt_sender_awake".into(), hop(&m.ack_rtt_awake_ns));
            hops_ns.insert("ack_release".into(), hop(&m.ack_hook_ns));
        }
        let figures = PrimaryStats {
            exits: summary.exits,
            elapsed_s: (summary.elapsed.as_secs_f64() * 1e3).round() / 1e3,
            entries,
            log_bytes: sink.bytes(),
            acks: sink.acks(),
            frames_released: stats.released,
            max_held: u64::try_from(stats.max_held).unwrap_or(u64::MAX),
            hold_p50_ns: stats.hold_ns.value_at_quantile(0.5),
            hold_p99_ns: stats.hold_ns.value_at_quantile(0.99),
            hold_p999_ns: stats.hold_ns.value_at_quantile(0.999),
            hold_quantiles_ns: HOLD_QUANTILES
                .iter()
                .map(|q| (*q, stats.hold_ns.value_at_quantile(*q)))
                .collect(),
            transport: sink.transport().to_string(),
            unprotected: sink.unprotected().is_some(),
            channel: sink.metrics().map(|m| ChannelStats {
                batches: m.batches,
                ring_full: m.ring_full_stalls,
                transport_stalls: m.transport_stalls,
                heartbeats_sent: m.heartbeats_sent,
                ack_rtt_p50_ns: m.ack_rtt_ns.value_at_quantile(0.5),
                ack_rtt_p99_ns: m.ack_rtt_ns.value_at_quantile(0.99),
                ack_rtt_p999_ns: m.ack_rtt_ns.value_at_quantile(0.999),
            }),
            hops_ns,
        };
        let json = figures.to_json();
        std::fs::write(path, json).map_err(|source| CommandError::File {
            what: "cannot write the statistics to",
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// `lockstep backup` without `--join`.
fn backup(
    listen: &str,
    tap: Option<&str>,
    join_listen: Option<&str>,
    ft: &FtArgs,
    quiet: bool,
    stop: Arc<AtomicBool>,
) -> Result<(), CommandError> {
    let me = ft.me("backup")?;
    if join_listen.is_some() && ft.disk.is_some() && ft.disk_mode == crate::disk::DiskMode::Shared {
        return Err(CommandError::Usage(
            "--join-listen with --disk-mode shared: re-protection of a shared-disk pair is not built yet (issue 19); use --disk-mode local to re-protect".into(),
        ));
    }
    let disk = ft.disk().map(|disk| disk.open(true)).transpose()?;
    let arbiter = ft.arbiter()?;
    let settings = ft.link_settings()?;
    let listener = LinkListener::bind(settings.kind, listen)?;
    tracing::info!(
        "lockstep backup: {me}, listening on {listen} ({})",
        settings.kind.name()
    );
    // Every connection is authenticated at the arbiter's current
    // generation, read when it connects (the primary registers the pair
    // before it connects): the handshake refuses a primary of any other
    // generation, and tells it why. A connection that fails (a stray
    // request, a wrong key, nobody registered yet) is refused and the
    // backup keeps listening; only a peer that passes the handshake counts.
    let admit: Arc<dyn Fn() -> crate::backup::Admission + Send + Sync> = match &arbiter {
        None => Arc::new(|| Ok(0)),
        Some(arbiter) => {
            let (arbiter, vm) = (Arc::clone(arbiter), ft.vm_id);
            Arc::new(move || match arbiter.read(vm) {
                Ok(Some(record)) => Ok(record.generation),
                Ok(None) => Err(format!("the arbiter knows no pair for VM {vm} yet")),
                Err(error) => Err(format!(
                    "the arbiter cannot say which generation to expect: {}",
                    arbiter::error_chain(&error)
                )),
            })
        }
    };
    let accepted = listener.accept_primary(&settings, admit)?;
    let generation = accepted.generation;
    let record = match &arbiter {
        None => None,
        Some(arbiter) => arbiter.read(ft.vm_id)?,
    };
    if let Some(record) = record
        && (record.backup.as_ref() != Some(&me) || record.generation != generation)
    {
        return Err(crate::ReplicaError::Channel(format!(
            "refused the primary at {}: generation {generation} is not a pair with {me} as backup (arbiter: {record:?})",
            accepted.peer
        ))
        .into());
    }
    if accepted.base != 0 {
        return Err(crate::ReplicaError::Channel(format!(
            "the primary at {} streams from log entry {}: only a joining backup (--join) starts mid-log",
            accepted.peer,
            accepted.base + 1
        ))
        .into());
    }
    let meta = accepted.meta;
    let guest = GuestImage::resolve(&meta.guest_name)?;
    if guest.id() != meta.image_id {
        return Err(VmmError::LogMismatch(format!(
            "the primary at {} runs guest '{}' (image {:016x}), but this backup's '{}' is image {:016x}",
            accepted.peer,
            meta.guest_name,
            meta.image_id,
            guest.name(),
            guest.id()
        ))
        .into());
    }
    tracing::info!(
        "lockstep backup: primary {} (generation {}) connected over {}, replaying guest {} in lockstep",
        accepted.peer,
        accepted.generation,
        accepted.transport,
        guest.name()
    );
    let config = VmConfig::with_flags(meta.mem_size, meta.vm_flags);
    let me_name = me.to_string();
    let membership = arbiter.map(|arbiter| Membership {
        arbiter,
        vm: ft.vm_id,
        me,
        generation: accepted.generation,
    });
    let mut side = BackupSide::new(
        tap,
        &config,
        &meta,
        guest.bytes(),
        membership.clone(),
        join_listen,
        ft,
        stop,
    )?;
    let status = crate::status::StatusFile::new(&ft.status_dir, me_name.as_str())
        .with_board(ft.board.clone());
    let source = BackupSource::new(Replay::new(accepted.source), membership, side.promote()?)
        .with_status(status);
    let mut machine = Machine::new(
        &config,
        guest.bytes(),
        meta.guest_arg,
        source,
        console(quiet),
        meta.digest_interval,
    )?;
    crate::disk::DiskOptions::attach(disk, &mut machine, &side.gate)?;
    follow(machine, side, guest.name())
}

/// Runs a backup's machine until the guest ends or this replica halts, and
/// reports how it went.
fn follow(
    mut machine: Machine<BackupSource>,
    side: BackupSide,
    guest_name: &str,
) -> Result<(), CommandError> {
    if side.has_nic {
        machine.set_net_output(Arc::clone(&side.gate))?;
    }
    if let Some(setup) = side.joins {
        spawn_join_service(setup, machine.transfer_handle(), Arc::clone(&side.gate))?;
    }
    let result = machine.run();
    let source = machine.events();
    let stats = source.replay().stats();
    let lag = source.replay().source().lag().clone();
    // The receiver thread ends just after the replay (the primary closes
    // the link): wait a little for its receipt-to-ack figures.
    let deadline = std::time::Instant::now() + Duration::from_millis(300);
    let ack_delay = loop {
        match source.replay().source().receiver_metrics() {
            Some(m) => {
                break format!(
                    "; acks sent p50 {} µs, p99 {} µs after receipt; {} of {} batches arrived after the receiver slept",
                    m.ack_lag.value_at_quantile(0.5) / 1000,
                    m.ack_lag.value_at_quantile(0.99) / 1000,
                    m.batches_after_sleep,
                    m.batches
                );
            }
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            None => break String::new(),
        }
    };
    let lag_line = format!(
        "lag: at most {} exits behind; entries waited p50 {} µs, p99 {} µs, max {} µs{ack_delay}",
        lag.max_exits,
        lag.queue_us.value_at_quantile(0.5),
        lag.queue_us.value_at_quantile(0.99),
        lag.queue_us.max()
    );
    let role = match source.promoted() {
        Some((exit, generation)) => {
            format!("; live as primary of generation {generation} since exit {exit}")
        }
        None => String::new(),
    };
    match result {
        Ok(summary) => {
            let digests = match source.promoted() {
                // After going live there is nothing left to compare with.
                Some(_) => format!(
                    "{} digests matched while following the primary",
                    stats.digests_matched
                ),
                None => format!(
                    "{} of {} digests matched",
                    stats.digests_matched, summary.digests
                ),
            };
            println!(
                "backup: replayed {} exits and {} events; {digests}; guest {} {}{role}; {lag_line}",
                summary.exits,
                stats.events,
                guest_name,
                ending(&summary)
            );
            Ok(())
        }
        Err(VmmError::LogIncomplete { exit, entries }) => {
            let why = source
                .replay()
                .source()
                .lost()
                .unwrap_or_else(|| "the stream ended".into());
            tracing::info!(
                "lockstep backup: the primary is gone ({why}) at exit {exit} after {entries} entries; {lag_line}"
            );
            Err(VmmError::Halted(
                "primary lost and no arbiter is configured to let this backup go live (fail-stop)"
                    .into(),
            )
            .into())
        }
        Err(other) => Err(other.into()),
    }
}

/// `lockstep backup --join PRIMARY`: a new backup for a primary that runs
/// alone, cloned from it by state transfer (see `crate::join`).
fn join(
    primary: &str,
    tap: Option<&str>,
    join_listen: Option<&str>,
    ft: &FtArgs,
    quiet: bool,
    stop: Arc<AtomicBool>,
) -> Result<(), CommandError> {
    use std::io::Write as _;
    let me = ft.me("backup")?;
    if ft.disk.is_some() && ft.disk_mode == crate::disk::DiskMode::Shared {
        return Err(CommandError::Usage(
            "--join with --disk-mode shared: re-protection of a shared-disk pair is not built yet (issue 19; the joined backup would need no disk copy, but the state transfer of a shared-disk VM is not built); use --disk-mode local to re-protect".into(),
        ));
    }
    let arbiter = ft.arbiter()?.ok_or_else(|| {
        CommandError::Usage("--join needs --arbiter (the new pair is recorded there)".into())
    })?;
    let settings = ft.link_settings()?;
    let record = arbiter
        .read(ft.vm_id)?
        .ok_or_else(|| CommandError::Usage(format!("the arbiter knows no VM {}", ft.vm_id)))?;
    let (stream, generation) =
        crate::join::connect(primary, &settings, record.generation, me.as_str())?;
    let link_error = |what: &'static str| {
        move |source| crate::ReplicaError::Link {
            what: what.into(),
            source,
        }
    };
    if generation == 0 {
        return Err(VmmError::Halted(format!(
            "the primary at {primary} refused {me} as its new backup (see its log)"
        ))
        .into());
    }
    tracing::info!(
        "lockstep backup: {me} joining the primary at {primary} as generation {generation}; receiving its state"
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(link_error("set the transfer timeout"))?;
    let started = std::time::Instant::now();
    let (received, guest) = {
        let reader = vmm::StateReader::new(std::io::BufReader::with_capacity(1 << 20, &stream))
            .map_err(VmmError::from)?;
        let image_id = reader.header().image_id;
        let guest = guest_images::names()
            .filter_map(|name| GuestImage::resolve(name).ok())
            .find(|guest| guest.id() == image_id)
            .ok_or_else(|| {
                VmmError::LogMismatch(format!(
                    "the primary runs guest image {image_id:016x}, which this build does not embed"
                ))
            })?;
        let disk = ft.disk().map(|disk| disk.path);
        let received = vmm::receive_with_disk(reader, guest.bytes(), None, disk.as_deref())
            .map_err(VmmError::from)?;
        (received, guest)
    };
    (&stream)
        .write_all(&[crate::join::STATE_RECEIVED])
        .map_err(link_error("confirm the state"))?;
    stream
        .set_read_timeout(None)
        .map_err(link_error("clear the transfer timeout"))?;
    let position = received.state.events;
    let expected_digest = received.state.digest;
    let config = received.config.clone();
    tracing::info!(
        "lockstep backup: state received in {} ms ({} pages, exit {}, log position {})",
        started.elapsed().as_millis(),
        received.stats.pages,
        received.state.exits,
        position.log_position
    );
    let accepted = crate::backup::Incoming::from_tcp(stream, primary.to_string())
        .establish(&settings, generation)?;
    if accepted.base != position.log_position {
        return Err(crate::ReplicaError::Channel(format!(
            "the primary streams from log entry {} but the state ends at {}",
            accepted.base + 1,
            position.log_position
        ))
        .into());
    }
    let meta = accepted.meta;
    let me_name = me.to_string();
    let membership = Membership {
        arbiter,
        vm: ft.vm_id,
        me,
        generation,
    };
    let mut side = BackupSide::new(
        tap,
        &config,
        &meta,
        guest.bytes(),
        Some(membership.clone()),
        join_listen,
        ft,
        stop,
    )?;
    let status = crate::status::StatusFile::new(&ft.status_dir, me_name.as_str())
        .with_board(ft.board.clone());
    let source = BackupSource::new(
        Replay::resume(accepted.source, &position),
        Some(membership),
        side.promote()?,
    )
    .with_status(status);
    let machine = Machine::restore(received, source, console(quiet), meta.digest_interval)?;
    if let Some(expected) = expected_digest {
        let digest = machine.digest()?;
        if digest != expected {
            return Err(VmmError::Diverged {
                exit: machine.exits(),
                detail: format!(
                    "the cloned state's digest {digest:?} differs from the primary's {expected:?} at the hand-over"
                ),
            }
            .into());
        }
        tracing::info!(
            "lockstep backup: clone verified: digest at the hand-over (exit {}) matches the primary's",
            machine.exits()
        );
    }
    follow(machine, side, guest.name())
}

/// Where a live replica takes a joining backup on, before the machine exists.
struct JoinSetup {
    listener: TcpListener,
    port: Arc<crate::join::JoinPort>,
    settings: LinkSettings,
    arbiter: Arc<dyn Arbiter>,
    me: ReplicaId,
    meta: channel::log::LogMeta,
    header: vmm::StateHeader,
}

impl JoinSetup {
    /// Listens on `address` for joining backups; `membership` must name the arbiter.
    fn new(
        address: &str,
        membership: Option<&Membership>,
        ft: &FtArgs,
        meta: &channel::log::LogMeta,
        header: vmm::StateHeader,
    ) -> Result<Self, CommandError> {
        let membership = membership.ok_or_else(|| {
            CommandError::Usage(
                "--join-listen needs --arbiter (each new pair is recorded there)".into(),
            )
        })?;
        let listener = TcpListener::bind(address).map_err(|source| CommandError::File {
            what: "cannot listen for joining backups on",
            path: PathBuf::from(address),
            source,
        })?;
        Ok(Self {
            listener,
            port: Arc::new(crate::join::JoinPort::default()),
            settings: ft.link_settings()?,
            arbiter: Arc::clone(&membership.arbiter),
            me: membership.me.clone(),
            meta: meta.clone(),
            header,
        })
    }
}

fn spawn_join_service(
    setup: JoinSetup,
    transfer: vmm::TransferHandle,
    gate: Arc<OutputGate>,
) -> Result<(), CommandError> {
    let service = crate::join::JoinService {
        port: setup.port,
        transfer,
        gate,
        settings: setup.settings,
        arbiter: setup.arbiter,
        me: setup.me,
        meta: setup.meta,
        header: setup.header,
    };
    let listener = setup.listener;
    std::thread::Builder::new()
        .name("join-service".into())
        .spawn(move || crate::join::serve(listener, service))
        .map(|_| ())
        .map_err(|source| CommandError::File {
            what: "cannot start the join service",
            path: PathBuf::from("join-service"),
            source,
        })
}

/// A backup's output side: suppressed until it goes live, then its TAP.
struct BackupSide {
    has_nic: bool,
    gate: Arc<OutputGate>,
    promotion: Option<crate::promotion::Promotion>,
    joins: Option<JoinSetup>,
}

impl BackupSide {
    #[allow(clippy::too_many_arguments)]
    fn new(
        tap: Option<&str>,
        config: &VmConfig,
        meta: &channel::log::LogMeta,
        image: &[u8],
        membership: Option<Membership>,
        join_listen: Option<&str>,
        ft: &FtArgs,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, CommandError> {
        let output = CutoverOutput::new(CutoverOutput::window_for(ft.peer_timeout()));
        let gate = Arc::new(OutputGate::open(Box::new(output.clone())));
        let joins = match join_listen {
            Some(address) => Some(JoinSetup::new(
                address,
                membership.as_ref(),
                ft,
                meta,
                vmm::StateHeader::new(config, image, meta.guest_arg),
            )?),
            None => None,
        };
        let promotion = crate::promotion::Promotion {
            tap: tap.map(str::to_string),
            mac: config.mac,
            guest_arg: meta.guest_arg,
            output,
            stop,
            gate: Arc::clone(&gate),
            membership,
            joins: joins.as_ref().map(|setup| Arc::clone(&setup.port)),
            peer_timeout: ft.peer_timeout(),
            board: ft.board.clone(),
        };
        Ok(Self {
            has_nic: config.mac.is_some(),
            gate,
            promotion: Some(promotion),
            joins,
        })
    }

    /// The promotion closure (it can be taken once).
    fn promote(&mut self) -> Result<Promote, CommandError> {
        self.promotion
            .take()
            .map(crate::promotion::promotion)
            .ok_or_else(|| CommandError::Usage("the promotion was already taken".into()))
    }
}
