//! A guest's TAP interface, wired to its machine.
//!
//! ```text
//!  TAP ──reader thread──▶ RxQueue ──▶ Live (virtio-net rx)
//!  guest tx ──▶ OutputGate ──[OutputGuard, gated]──▶ TapWriter ──▶ TAP
//! ```
//!
//! Ungated (FT off, or a live replica alone) the gate is open and frames
//! leave at once; gated (a primary with a backup) the gate holds every
//! frame until the backup acknowledged the log up to it, and the guard lets
//! frames out only while the backup's acks are fresh (`crate::failover`).
//! Dropping the `Network` stops and joins the reader thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nic::NicError;
use nic::gate::OutputGate;
use nic::tap::{RxQueue, TapDevice};
use vmm::events::Live;
use vmm::{Machine, VmmError};

/// A TAP interface wired to the guest: its reader thread fills `queue`, and
/// `gate` (open: no backup to wait for) writes the guest's frames to it.
pub struct Network {
    /// The frames the TAP received, for the guest's virtio-net.
    pub queue: Arc<RxQueue>,
    /// Where the guest's frames go out.
    pub gate: Arc<OutputGate>,
    /// With `gated`: the guard between the gate and the TAP (frames leave
    /// only while the backup's acks are fresh; see `replica::failover`).
    pub guard: Option<crate::failover::OutputGuard>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Network {
    /// The TAP named `tap`, if any, its frames leaving at once (FT off).
    pub fn open(tap: Option<&str>) -> Result<Option<Self>, NicError> {
        Self::open_with(tap, false)
    }

    /// With `gated`, frames are held until acknowledged (a primary with a
    /// backup); otherwise they leave at once (FT off).
    pub fn open_with(tap: Option<&str>, gated: bool) -> Result<Option<Self>, NicError> {
        let Some(name) = tap else {
            return Ok(None);
        };
        let tap = TapDevice::open(name)?;
        let queue = Arc::new(RxQueue::default());
        let stop = Arc::new(AtomicBool::new(false));
        let reader = tap.spawn_reader(Arc::clone(&queue), Arc::clone(&stop))?;
        let out = Box::new(tap.writer()?);
        let (gate, guard) = if gated {
            let guard = crate::failover::OutputGuard::new(out);
            (OutputGate::new(Box::new(guard.clone())), Some(guard))
        } else {
            (OutputGate::open(out), None)
        };
        let gate = Arc::new(gate);
        Ok(Some(Self {
            queue,
            gate,
            guard,
            stop,
            reader: Some(reader),
        }))
    }

    /// `live` with the guest's received frames from `network`, if any.
    pub fn live<S: vmm::events::EventSink>(network: &Option<Self>, live: Live<S>) -> Live<S> {
        match network {
            Some(network) => live.with_network(Arc::clone(&network.queue)),
            None => live,
        }
    }

    /// Sends `machine`'s frames out through `network`'s gate, if any.
    pub fn attach<E: vmm::events::EventSource>(
        network: &Option<Self>,
        machine: &mut Machine<E>,
    ) -> Result<(), VmmError> {
        if let Some(network) = network {
            machine.set_net_output(Arc::clone(&network.gate))?;
        }
        Ok(())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
