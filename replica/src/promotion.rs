//! Promotion: what a backup does when it wins the arbiter.
//!
//! ```text
//!  arbiter grants generation G ──▶ Promote(GoLive { clock, G, stream_ended })
//!     │ FailoverSink::alone (the gate open, joins taken on with --join-listen)
//!     │ no NIC: live at once
//!     ▼ with a NIC:
//!  TapDevice::open_when_free (the old primary may hold the TAP: EBUSY, retry ≤ 60 s)
//!  reader thread → RxQueue ; wait for IFF_RUNNING (≤ 2 s)
//!  gratuitous ARP now and at +50, 150, 300, 500, 1000 ms (switches learn the port)
//!  CutoverOutput::go_live: resend the frames the old primary may not have released
//! ```

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use nic::gate::{FrameOut, OutputGate};
use nic::tap::{RxQueue, TapDevice};
use vmm::VmmError;
use vmm::events::Live;

use crate::failover::{CutoverOutput, FailoverSink, GoLive, Membership, Promote};

/// What a backup needs to go live and, once live, to take a new backup on.
pub struct Promotion {
    pub tap: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub guest_arg: u64,
    pub output: CutoverOutput,
    pub stop: Arc<AtomicBool>,
    /// The backup's output gate (open; it holds again while a backup joins).
    pub gate: Arc<OutputGate>,
    /// Who this replica is at the arbiter.
    pub membership: Option<Membership>,
    /// Where new backups join once this one is live (`--join-listen`).
    pub joins: Option<Arc<crate::join::JoinPort>>,
    pub peer_timeout: Duration,
    /// Where the live sink counts its events (the backup's figures).
    pub board: crate::status::Board,
}

/// What a backup does when it wins the arbiter: attach the NIC to the TAP,
/// announce the guest, and hand back live event sources whose sink runs
/// alone (and takes a joining backup on, with `--join-listen`).
pub fn promotion(promotion: Promotion) -> Promote {
    let Promotion {
        tap,
        mac,
        guest_arg,
        output,
        stop,
        gate,
        membership,
        joins,
        peer_timeout,
        board,
    } = promotion;
    Box::new(move |go: GoLive| {
        let GoLive {
            clock_ns: clock,
            generation,
            stream_ended,
        } = go;
        let mut membership = membership.clone().ok_or_else(|| {
            VmmError::Halted("a backup without an arbiter never goes live".into())
        })?;
        membership.generation = generation;
        // The backup's own status file keeps reporting (role: live).
        let mut sink = FailoverSink::alone(Arc::clone(&gate), membership, peer_timeout)
            .with_board(board.clone());
        if let Some(port) = &joins {
            sink = sink.with_joins(Arc::clone(port));
        }
        let live = Live::new(Box::new(std::io::empty()), sink)
            .streaming()
            .with_clock_base(clock)
            .with_stop(Arc::clone(&stop));
        let (Some(mac), Some(name)) = (mac, tap.as_deref()) else {
            return Ok(live);
        };
        // The old primary may still hold the TAP until it learns it lost the
        // arbiter and halts: wait for it to let go.
        let device = TapDevice::open_when_free(name, Duration::from_secs(60))
            .map_err(VmmError::nic("take the TAP over from the old primary"))?;
        let queue = Arc::new(RxQueue::default());
        // The reader thread serves the live guest until the process ends.
        let _reader = device
            .spawn_reader(Arc::clone(&queue), Arc::new(AtomicBool::new(false)))
            .map_err(VmmError::nic("start the TAP's reader"))?;
        let mut writer = device
            .writer()
            .map_err(VmmError::nic("open the TAP's writer"))?;
        // Frames written before the kernel processed the TAP's carrier are
        // dropped by the bridge: wait for it (a few ms), so the resent
        // frames below reach the client.
        let carrier = nic::tap::wait_until_running(name, Duration::from_secs(2));
        let (ip, _) = guest_abi::net_address_from_arg(guest_arg);
        let announcement = nic::tap::gratuitous_arp(mac, ip);
        let _ = writer.send(&announcement);
        // Announce again a few times, as QEMU's self-announce does: a
        // bridge port may start forwarding only once the kernel has
        // processed the TAP's carrier (deferred work), and a switch that
        // missed the first announcement would keep sending the guest's
        // frames to the dead host's port. Only the host sees these frames.
        if let Ok(mut again) = device.writer() {
            let _ = std::thread::Builder::new()
                .name("announce".into())
                .spawn(move || {
                    for delay_ms in [50, 150, 300, 500, 1000] {
                        std::thread::sleep(Duration::from_millis(delay_ms));
                        let _ = again.send(&announcement);
                    }
                });
        }
        // The frames the old primary may never have released, then live.
        let resent = output.go_live(Box::new(writer), stream_ended);
        tracing::info!(
            "lockstep backup: NIC attached to {name} ({}); gratuitous ARP sent for {}.{}.{}.{}; resent {} frames ({} bytes) the old primary may not have released ({} older replay frames not resent; {} ms after the stream ended)",
            carrier.map_or("carrier not seen within 2 s".to_string(), |d| format!(
                "running after {} µs",
                d.as_micros()
            )),
            ip[0],
            ip[1],
            ip[2],
            ip[3],
            resent.frames,
            resent.bytes,
            resent.older,
            stream_ended.elapsed().as_millis()
        );
        Ok(live.with_network(queue))
    })
}
