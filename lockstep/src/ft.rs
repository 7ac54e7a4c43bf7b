//! `lockstep primary`, `lockstep backup`, `lockstep arbiter`: the fault-tolerant
//! pair and its arbiter, wired from the library crates.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arbiter::{Arbiter, EmbeddedArbiter, Key, Outcome, ReplicaId, error_chain};
use clap::Args;
use nic::gate::OutputGate;
use replica::backup::LinkListener;
use replica::failover::{BackupSource, CutoverOutput, FailoverSink, Membership, Promote};
use replica::link::{LinkSettings, TransportKind};
use replica::primary::PrimaryLink;
use vmm::events::{Live, Replay};
use vmm::{Machine, VmConfig, VmmError};

use replica::network::Network;

use crate::{CliError, RunArgs, console, ending, log_meta, open_input, vm_config};
use guest_images::choice::GuestImage;

/// How a replica finds the arbiter and names itself.
#[derive(Args, Clone)]
pub struct FtArgs {
    /// The arbiter: `HOST:PORT` of `lockstep arbiter`, or
    /// `etcd://HOST:PORT[,HOST:PORT…]` for an etcd cluster (production: the
    /// authority itself replicated). Without one, a replica that loses its
    /// peer stops (fail-stop) instead of going live alone.
    #[arg(long)]
    pub arbiter: Option<String>,
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
    #[arg(long, default_value = replica::status::DEFAULT_DIR)]
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
    /// `local`: each replica applies every write to its own image (shared
    /// is not built yet).
    #[arg(long, default_value = "local")]
    pub disk_mode: replica::disk::DiskMode,
    /// Where this replica's figures go for `--metrics` (not a flag).
    #[arg(skip)]
    pub board: replica::status::Board,
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
    pub fn check(&self) -> Result<(), CliError> {
        if self.heartbeat_ms == 0 {
            return Err(CliError::Usage("--heartbeat-ms must be at least 1".into()));
        }
        if self.peer_timeout_ms < 3 * self.heartbeat_ms {
            return Err(CliError::Usage(format!(
                "--peer-timeout-ms {} is shorter than three heartbeats (--heartbeat-ms {}): a late heartbeat would look like a dead peer",
                self.peer_timeout_ms, self.heartbeat_ms
            )));
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
    fn disk(&self) -> Option<replica::disk::DiskOptions> {
        let path = self.disk.as_ref()?;
        Some(replica::disk::DiskOptions {
            mode: self.disk_mode,
            ..replica::disk::DiskOptions::local(path)
        })
    }

    fn peer_timeout(&self) -> Duration {
        self.liveness.peer_timeout()
    }

    fn arbiter(&self) -> Result<Option<Arc<dyn Arbiter>>, CliError> {
        let Some(address) = &self.arbiter else {
            return Ok(None);
        };
        if let Some(endpoints) = address.strip_prefix("etcd://") {
            let endpoints: Vec<&str> = endpoints.split(',').collect();
            let etcd = arbiter::EtcdArbiter::new(&endpoints, Duration::from_secs(2))
                .map_err(|e| CliError::Usage(error_chain(&e)))?;
            return Ok(Some(Arc::new(etcd)));
        }
        let key_path = self
            .arbiter_key
            .as_ref()
            .ok_or_else(|| CliError::Usage("--arbiter needs --arbiter-key FILE".into()))?;
        let key = Key::from_file(key_path).map_err(|e| CliError::Usage(error_chain(&e)))?;
        let client = EmbeddedArbiter::connect(address.as_str(), key, Duration::from_secs(2))
            .map_err(|e| CliError::Usage(error_chain(&e)))?;
        Ok(Some(Arc::new(client)))
    }

    /// The channel settings: transport, key, VM id, and the two-core
    /// profile with this heartbeat interval and peer timeout.
    pub fn link_settings(&self) -> Result<LinkSettings, CliError> {
        self.liveness.check()?;
        let key = match self.link_key.as_ref().or(self.arbiter_key.as_ref()) {
            Some(path) => lockstep_config::keys::read(path, "link key")?,
            None => {
                return Err(CliError::Usage(
                    "no link key: both replicas must prove a pre-shared key; make one with `lockstep keygen FILE` and pass --link-key FILE (or --arbiter-key FILE) to both".into(),
                ));
            }
        };
        let mut profile = replica::link::Profile::two_core();
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

    fn me(&self, default: &str) -> Result<ReplicaId, CliError> {
        let name = self.id.clone().unwrap_or_else(|| default.to_string());
        ReplicaId::new(name).map_err(|e| CliError::Usage(e.to_string()))
    }
}

fn arbiter_error(error: arbiter::ArbiterError) -> CliError {
    CliError::Usage(error_chain(&error))
}

/// `lockstep arbiter`: the embedded arbiter server.
pub fn serve_arbiter(listen: &str, state: &Path, key_file: &Path) -> Result<(), CliError> {
    let key = Key::from_file(key_file).map_err(|e| CliError::Usage(error_chain(&e)))?;
    let listener = TcpListener::bind(listen).map_err(|source| CliError::File {
        what: "cannot listen on",
        path: PathBuf::from(listen),
        source,
    })?;
    tracing::info!(
        "lockstep arbiter: listening on {listen}, state in {}",
        state.display()
    );
    arbiter::server::serve(listener, state, key).map_err(|e| CliError::Usage(error_chain(&e)))
}

/// `lockstep primary`.
/// Where a primary's backup is, and where new backups may join it.
pub struct Peers<'a> {
    /// The backup's address.
    pub backup: &'a str,
    /// The backup's name at the arbiter.
    pub backup_id: &'a str,
    /// Where `lockstep backup --join` may connect while this primary runs alone.
    pub join_listen: Option<&'a str>,
    /// The generation the operator says to supersede (`--supersede-generation`).
    pub supersede_generation: Option<u64>,
}

pub fn primary(
    args: &RunArgs,
    peers: &Peers<'_>,
    ft: &FtArgs,
    digest_interval: u64,
    stop: Arc<AtomicBool>,
    stats_file: Option<&Path>,
) -> Result<(), CliError> {
    let (backup, backup_id, join_listen) = (peers.backup, peers.backup_id, peers.join_listen);
    let disk = ft.disk().map(|disk| disk.open()).transpose()?;
    let guest = GuestImage::resolve(&args.guest)?;
    let config = vm_config(args);
    let meta = log_meta(&guest, &config, args.arg, digest_interval);
    let me = ft.me("primary")?;
    let arbiter = ft.arbiter()?;
    let generation = match &arbiter {
        None => 0,
        Some(arbiter) => {
            let peer = ReplicaId::new(backup_id).map_err(|e| CliError::Usage(e.to_string()))?;
            let record = arbiter.read(ft.vm_id).map_err(arbiter_error)?;
            let expected = replica::primary::generation_to_supersede(
                ft.vm_id,
                &me,
                record.as_ref(),
                peers.supersede_generation,
            )
            .map_err(|error| match error {
                replica::primary::SupersedeError::Refused(why) => VmmError::Halted(why).into(),
                usage => CliError::Usage(usage.to_string()),
            })?;
            match arbiter
                .register(ft.vm_id, expected, &me, &peer)
                .map_err(arbiter_error)?
            {
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
    let join_port = Arc::new(replica::join::JoinPort::default());
    let join_arbiter = membership.as_ref().map(|m| Arc::clone(&m.arbiter));
    let mut sink = FailoverSink::new(link, Arc::clone(&gate), membership, ft.peer_timeout())
        .with_status(
            replica::status::StatusFile::new(&ft.status_dir, me.as_str())
                .with_board(ft.board.clone()),
        );
    if let Some(guard) = network.as_ref().and_then(|n| n.guard.clone()) {
        sink = sink.with_guard(guard);
    }
    let join_listener = match join_listen {
        None => None,
        Some(address) => {
            if join_arbiter.is_none() {
                return Err(CliError::Usage(
                    "--join-listen needs --arbiter (each new pair is recorded there)".into(),
                ));
            }
            sink = sink.with_joins(Arc::clone(&join_port));
            Some(TcpListener::bind(address).map_err(|source| CliError::File {
                what: "cannot listen for joining backups on",
                path: PathBuf::from(address),
                source,
            })?)
        }
    };
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
    replica::disk::DiskOptions::attach(disk, &mut machine)?;
    if let (Some(listener), Some(arbiter)) = (join_listener, join_arbiter) {
        let service = replica::join::JoinService {
            port: join_port,
            transfer: machine.transfer_handle(),
            gate: Arc::clone(&gate),
            settings: ft.link_settings()?,
            arbiter,
            me: me.clone(),
            meta: meta.clone(),
            header: vmm::StateHeader::new(&config, guest.bytes(), args.arg),
        };
        std::thread::Builder::new()
            .name("join-service".into())
            .spawn(move || replica::join::serve(listener, service))
            .map_err(|source| CliError::File {
                what: "cannot start the join service",
                path: PathBuf::from("join-service"),
                source,
            })?;
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
        let elapsed = summary.elapsed.as_secs_f64();
        let channel = match sink.metrics() {
            Some(m) => format!(
                ",\"batches\":{},\"ring_full\":{},\"transport_stalls\":{},\"heartbeats_sent\":{},\"ack_rtt_p50_ns\":{},\"ack_rtt_p99_ns\":{},\"ack_rtt_p999_ns\":{}",
                m.batches,
                m.ring_full_stalls,
                m.transport_stalls,
                m.heartbeats_sent,
                m.ack_rtt_ns.value_at_quantile(0.5),
                m.ack_rtt_ns.value_at_quantile(0.99),
                m.ack_rtt_ns.value_at_quantile(0.999)
            ),
            None => String::new(),
        };
        // Per-hop timing (`lockstep bench latency`): [p50, p99, count] ns.
        let hop = |h: &nic::gate::Histogram<u64>| {
            format!(
                "[{},{},{}]",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.len()
            )
        };
        let mut hops = vec![
            format!("\"gate_submit_wait\":{}", hop(&stats.submit_wait_ns)),
            format!("\"gate_tap_write\":{}", hop(&stats.tap_write_ns)),
            format!("\"gate_hold\":{}", hop(&stats.hold_ns)),
        ];
        if let Some(m) = sink.metrics() {
            hops.push(format!("\"sender_wake\":{}", hop(&m.wake_ns)));
            hops.push(format!("\"sender_batch_fill\":{}", hop(&m.batch_fill_ns)));
            hops.push(format!("\"ack_rtt\":{}", hop(&m.ack_rtt_ns)));
            hops.push(format!("\"ack_release\":{}", hop(&m.ack_hook_ns)));
        }
        let channel = format!("{channel},\"hops_ns\":{{{}}}", hops.join(","));
        let hold_quantiles = [
            0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0,
        ]
        .iter()
        .map(|q| format!("[{q},{}]", stats.hold_ns.value_at_quantile(*q)))
        .collect::<Vec<_>>()
        .join(",");
        let json = format!(
            "{{\"exits\":{},\"elapsed_s\":{elapsed:.3},\"entries\":{entries},\"log_bytes\":{},\"acks\":{},\"frames_released\":{},\"max_held\":{},\"hold_p50_ns\":{},\"hold_p99_ns\":{},\"hold_p999_ns\":{},\"hold_quantiles_ns\":[{hold_quantiles}],\"transport\":\"{}\",\"unprotected\":{}{channel}}}\n",
            summary.exits,
            sink.bytes(),
            sink.acks(),
            stats.released,
            stats.max_held,
            stats.hold_ns.value_at_quantile(0.5),
            stats.hold_ns.value_at_quantile(0.99),
            stats.hold_ns.value_at_quantile(0.999),
            sink.transport(),
            sink.unprotected().is_some()
        );
        std::fs::write(path, json).map_err(|source| CliError::File {
            what: "cannot write the statistics to",
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// `lockstep backup`.
pub fn backup(
    listen: &str,
    tap: Option<&str>,
    join_listen: Option<&str>,
    ft: &FtArgs,
    quiet: bool,
    stop: Arc<AtomicBool>,
) -> Result<(), CliError> {
    let me = ft.me("backup")?;
    let disk = ft.disk().map(|disk| disk.open()).transpose()?;
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
    let admit: Arc<dyn Fn() -> replica::backup::Admission + Send + Sync> = match &arbiter {
        None => Arc::new(|| Ok(0)),
        Some(arbiter) => {
            let (arbiter, vm) = (Arc::clone(arbiter), ft.vm_id);
            Arc::new(move || match arbiter.read(vm) {
                Ok(Some(record)) => Ok(record.generation),
                Ok(None) => Err(format!("the arbiter knows no pair for VM {vm} yet")),
                Err(error) => Err(format!(
                    "the arbiter cannot say which generation to expect: {}",
                    error_chain(&error)
                )),
            })
        }
    };
    let accepted = listener.accept_primary(&settings, admit)?;
    let generation = accepted.generation;
    let record = match &arbiter {
        None => None,
        Some(arbiter) => arbiter.read(ft.vm_id).map_err(arbiter_error)?,
    };
    if let Some(record) = record
        && (record.backup.as_ref() != Some(&me) || record.generation != generation)
    {
        return Err(replica::ReplicaError::Channel(format!(
            "refused the primary at {}: generation {generation} is not a pair with {me} as backup (arbiter: {record:?})",
            accepted.peer
        ))
        .into());
    }
    if accepted.base != 0 {
        return Err(replica::ReplicaError::Channel(format!(
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
    let status = replica::status::StatusFile::new(&ft.status_dir, me_name.as_str())
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
    replica::disk::DiskOptions::attach(disk, &mut machine)?;
    follow(machine, side, guest.name())
}

/// Runs a backup's machine until the guest ends or this replica halts, and
/// reports how it went.
fn follow(
    mut machine: Machine<BackupSource>,
    side: BackupSide,
    guest_name: &str,
) -> Result<(), CliError> {
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
        match source.replay().source().ack_delay_ns() {
            Some(h) => {
                break format!(
                    "; acks sent p50 {} µs, p99 {} µs after receipt",
                    h.value_at_quantile(0.5) / 1000,
                    h.value_at_quantile(0.99) / 1000
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
/// alone, cloned from it by state transfer (see `replica::join`).
pub fn join(
    primary: &str,
    tap: Option<&str>,
    join_listen: Option<&str>,
    ft: &FtArgs,
    quiet: bool,
    stop: Arc<AtomicBool>,
) -> Result<(), CliError> {
    use std::io::Write as _;
    let me = ft.me("backup")?;
    let arbiter = ft.arbiter()?.ok_or_else(|| {
        CliError::Usage("--join needs --arbiter (the new pair is recorded there)".into())
    })?;
    let settings = ft.link_settings()?;
    let record = arbiter
        .read(ft.vm_id)
        .map_err(arbiter_error)?
        .ok_or_else(|| CliError::Usage(format!("the arbiter knows no VM {}", ft.vm_id)))?;
    let (stream, generation) =
        replica::join::connect(primary, &settings, record.generation, me.as_str())?;
    let link_error = |what: &'static str| {
        move |source| replica::ReplicaError::Link {
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
        .write_all(&[replica::join::STATE_RECEIVED])
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
    let accepted = replica::backup::Incoming::from_tcp(stream, primary.to_string())
        .establish(&settings, generation)?;
    if accepted.base != position.log_position {
        return Err(replica::ReplicaError::Channel(format!(
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
    let status = replica::status::StatusFile::new(&ft.status_dir, me_name.as_str())
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
    port: Arc<replica::join::JoinPort>,
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
    ) -> Result<Self, CliError> {
        let membership = membership.ok_or_else(|| {
            CliError::Usage(
                "--join-listen needs --arbiter (each new pair is recorded there)".into(),
            )
        })?;
        let listener = TcpListener::bind(address).map_err(|source| CliError::File {
            what: "cannot listen for joining backups on",
            path: PathBuf::from(address),
            source,
        })?;
        Ok(Self {
            listener,
            port: Arc::new(replica::join::JoinPort::default()),
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
) -> Result<(), CliError> {
    let service = replica::join::JoinService {
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
        .spawn(move || replica::join::serve(listener, service))
        .map(|_| ())
        .map_err(|source| CliError::File {
            what: "cannot start the join service",
            path: PathBuf::from("join-service"),
            source,
        })
}

/// A backup's output side: suppressed until it goes live, then its TAP.
struct BackupSide {
    has_nic: bool,
    gate: Arc<OutputGate>,
    promotion: Option<replica::promotion::Promotion>,
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
    ) -> Result<Self, CliError> {
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
        let promotion = replica::promotion::Promotion {
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
    fn promote(&mut self) -> Result<Promote, CliError> {
        self.promotion
            .take()
            .map(replica::promotion::promotion)
            .ok_or_else(|| CliError::Usage("the promotion was already taken".into()))
    }
}
