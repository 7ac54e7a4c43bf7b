//! The exit loop: run the vCPU, number each exit, handle it, take digests.

use std::io::Write;
use std::time::{Duration, Instant};

use std::sync::Arc;

use nic::gate::OutputGate;
use nic::virtio::VirtioNet;

use crate::block::VirtioBlk;
use crate::device::{ExitAction, ExitContext, NetState, PvDevice, handle_exit};
use crate::digest::Digest;
use crate::events::EventSource;
use crate::snapshot::{
    CaptureMemory, CaptureRequest, Captured, PauseHandle, PauseShared, TransferHandle, copy_pages,
};
use crate::state::{MachineState, NetDeviceState, PvDeviceState, Received};
use crate::{Vm, VmConfig, VmmError};

/// A guest and where its non-determinism comes from.
pub struct Machine<E: EventSource> {
    vm: Vm,
    memory: nic::virtio::GuestRam,
    device: PvDevice,
    events: E,
    console: Box<dyn Write + Send>,
    net: Option<NetState>,
    blk: Option<VirtioBlk>,
    digest_interval: u64,
    exits: u64,
    digests: u64,
    pause: Arc<PauseShared>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunSummary {
    /// The guest's exit code (0 if the host stopped it).
    pub exit_code: u64,
    /// The host stopped the guest before it finished.
    pub stopped: bool,
    /// Guest-initiated exits handled (the last is the `DONE` write).
    pub exits: u64,
    /// Digests taken.
    pub digests: u64,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// The final digest.
    pub final_digest: Digest,
}

impl RunSummary {
    /// Exits per second of wall-clock time.
    pub fn exits_per_second(&self) -> f64 {
        self.exits as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl<E: EventSource> Machine<E> {
    /// Builds the VM for `image` and wires it to `events`. A digest is taken
    /// every `digest_interval` exits (0: only at the end).
    pub fn new(
        config: &VmConfig,
        image: &[u8],
        arg: u64,
        events: E,
        console: Box<dyn Write + Send>,
        digest_interval: u64,
    ) -> Result<Self, VmmError> {
        let vm = Vm::new(config, image)?;
        let memory = vm.memory().clone();
        let net = match config.mac {
            Some(mac) => Some(NetState {
                device: VirtioNet::new(mac)
                    .map_err(VmmError::nic("set up the virtio-net device"))?,
                output: None,
                suppressed: 0,
            }),
            None => None,
        };
        Ok(Self {
            vm,
            memory,
            device: PvDevice::new(arg, config.mem_size),
            events,
            console,
            net,
            blk: None,
            digest_interval,
            exits: 0,
            digests: 0,
            pause: Arc::default(),
        })
    }

    /// Rebuilds a machine from a received state transfer: the VM's memory
    /// and vCPU are loaded already; this restores the devices and counters
    /// and wires the machine to `events`, which must continue from
    /// `received.state.events` (for a backup,
    /// [`crate::events::Replay::resume`]). The next exit is
    /// `received.state.exits + 1`.
    pub fn restore(
        received: Received,
        events: E,
        console: Box<dyn Write + Send>,
        digest_interval: u64,
    ) -> Result<Self, VmmError> {
        let Received {
            vm,
            config,
            state,
            disk,
            ..
        } = received;
        let blk = match (state.blk.as_ref(), disk) {
            (Some(saved), Some(path)) => Some(VirtioBlk::restore(
                crate::block::Disk::open(&path, false, None)?,
                saved,
            )?),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(VmmError::Config(
                    "the state's disk does not match the received image".into(),
                ));
            }
        };
        let memory = vm.memory().clone();
        let net = match (config.mac, state.net) {
            (Some(_), Some(saved)) => Some(NetState {
                device: VirtioNet::restore(&saved.device)
                    .map_err(VmmError::nic("restore the virtio-net device"))?,
                output: None,
                suppressed: saved.suppressed,
            }),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(VmmError::Config(
                    "the state's network device does not match the VM configuration".into(),
                ));
            }
        };
        let saved = state.device;
        Ok(Self {
            vm,
            memory,
            device: PvDevice {
                arg: saved.arg,
                mem_size: saved.mem_size,
                input_ended: saved.input_ended,
                console_bytes: saved.console_bytes,
            },
            events,
            console,
            net,
            blk,
            digest_interval,
            exits: state.exits,
            digests: state.digests,
            pause: Arc::default(),
        })
    }

    /// A handle to pause this machine at an exit boundary and capture its
    /// state, from another thread, while [`Self::run`] runs.
    pub fn pause_handle(&self) -> PauseHandle {
        PauseHandle {
            shared: Arc::clone(&self.pause),
        }
    }

    /// The dirty logs and the pause handle, for a transfer thread
    /// ([`crate::snapshot::send_state`]).
    pub fn transfer_handle(&self) -> TransferHandle {
        TransferHandle {
            dirty: self.vm.dirty_log(),
            pause: self.pause_handle(),
            disk: self.blk.as_ref().map(|blk| blk.disk().copier()),
        }
    }

    /// Captures the state now (the machine is between runs, so between
    /// exits). The same as a pause served inside [`Self::run`].
    pub fn capture(&mut self, request: CaptureRequest) -> Result<Captured, VmmError> {
        self.serve_capture(request)
    }

    /// The digest of the current state (for a VM with a disk, its
    /// running digest as of the last digest exit folded in).
    pub fn digest(&self) -> Result<Digest, VmmError> {
        let digest = Digest::of(&self.vm)?;
        Ok(match &self.blk {
            Some(blk) => digest.with_disk(blk.disk_digest()),
            None => digest,
        })
    }

    /// The digest at a digest exit: the disk's written blocks are folded
    /// into its running digest first (the same exits on every replica).
    fn settled_digest(&mut self) -> Result<Digest, VmmError> {
        if let Some(blk) = self.blk.as_mut() {
            blk.settle_digest()?;
        }
        self.digest()
    }

    fn serve_capture(&mut self, request: CaptureRequest) -> Result<Captured, VmmError> {
        let started = Instant::now();
        self.vm.complete_pending_io()?;
        let (blk, disk_blocks) = match self.blk.as_mut() {
            Some(blk) => {
                let (state, blocks) = blk.capture(request.digest)?;
                (Some(state), blocks)
            }
            None => (None, Vec::new()),
        };
        let dirty = self.vm.dirty_log();
        let pages = copy_pages(&dirty, request.memory)?;
        if request.memory == CaptureMemory::Dirty {
            dirty.set_logging(false)?;
        }
        let vcpu = self.vm.vcpu_state()?;
        let digest = if request.digest {
            Some(self.digest()?)
        } else {
            None
        };
        let state = MachineState {
            exits: self.exits,
            digests: self.digests,
            events: self.events.position(),
            vcpu,
            device: PvDeviceState {
                arg: self.device.arg,
                mem_size: self.device.mem_size,
                input_ended: self.device.input_ended,
                console_bytes: self.device.console_bytes,
            },
            net: self.net.as_ref().map(|net| NetDeviceState {
                device: net.device.save(),
                suppressed: net.suppressed,
            }),
            blk,
            digest,
        };
        Ok(Captured {
            state,
            pages,
            disk_blocks,
            pause: started.elapsed(),
        })
    }

    /// Sends the network device's output through `gate` (primary, FT off).
    /// Without a gate (backup, replay) output is produced but suppressed.
    pub fn set_net_output(&mut self, gate: Arc<OutputGate>) -> Result<(), VmmError> {
        let net = self.net.as_mut().ok_or_else(|| {
            VmmError::Config("this VM has no network device (no MAC configured)".into())
        })?;
        net.output = Some(gate);
        Ok(())
    }

    /// Gives the VM a virtio-blk disk (at `guest_abi::BLK_BASE`). Every
    /// replica of a run, and its replay, must attach the same image.
    /// The disk's identity (size, content hash) goes into the log first, so
    /// a replica whose disk differs refuses to start.
    pub fn attach_disk(&mut self, disk: crate::block::Disk) -> Result<(), VmmError> {
        if self.exits != 0 || self.blk.is_some() {
            return Err(VmmError::Config(
                "a disk is attached once, before the guest runs".into(),
            ));
        }
        self.events
            .disk_identity(disk.capacity(), disk.identity()?, disk.is_shared())?;
        self.blk = Some(VirtioBlk::new(disk)?);
        Ok(())
    }

    /// The disk device, if any.
    pub fn blk(&self) -> Option<&VirtioBlk> {
        self.blk.as_ref()
    }

    /// The network device's state, if any.
    pub fn net(&self) -> Option<&NetState> {
        self.net.as_ref()
    }

    /// Runs the guest until it writes `DONE` or something stops it.
    ///
    /// Between the end of one exit's handling and the next `KVM_RUN`, it
    /// serves a pending [`PauseHandle`] request (a state capture); the
    /// guest resumes as soon as the capture is in memory.
    pub fn run(&mut self) -> Result<RunSummary, VmmError> {
        self.pause.reopen();
        let result = self.run_exits();
        self.pause.close(match &result {
            Ok(summary) if summary.stopped => "the host stopped it",
            Ok(_) => "the guest finished",
            Err(_) => "it failed",
        });
        result
    }

    fn run_exits(&mut self) -> Result<RunSummary, VmmError> {
        let started = Instant::now();
        loop {
            let number = self.exits + 1;
            let mut context = ExitContext {
                device: &mut self.device,
                memory: &self.memory,
                events: &mut self.events,
                console: &mut self.console,
                net: self.net.as_mut(),
                blk: self.blk.as_mut(),
                sync: false,
            };
            let mut read_action = None;
            let exit = self.vm.run(|exit| {
                let action = handle_exit(exit, number, &mut context)?;
                read_action = Some(action);
                Ok(match action {
                    ExitAction::Resume(value) => value,
                    ExitAction::Stop(_) => 0,
                })
            })?;
            self.exits = number;
            let action = match read_action {
                Some(action) => action,
                None => handle_exit(exit, number, &mut context)?,
            };
            let sync = context.sync;
            match action {
                ExitAction::Resume(_) => {
                    let digest_due =
                        self.digest_interval != 0 && number.is_multiple_of(self.digest_interval);
                    if self.events.stop_requested(number)? {
                        let final_digest = self.settled_digest()?;
                        self.digests += 1;
                        self.events.stopped(number, &final_digest)?;
                        return self.finish(number, 0, true, final_digest, started);
                    }
                    if digest_due {
                        self.take_digest(number)?;
                    }
                    if sync {
                        self.events.sync(number)?;
                    }
                    if let Some(request) = self.pause.due(number) {
                        let result = self.serve_capture(request);
                        self.pause.deliver(result);
                    }
                }
                ExitAction::Stop(exit_code) => {
                    let final_digest = self.take_digest(number)?;
                    self.events.end(number, exit_code)?;
                    return self.finish(number, exit_code, false, final_digest, started);
                }
            }
        }
    }

    fn finish(
        &mut self,
        exits: u64,
        exit_code: u64,
        stopped: bool,
        final_digest: Digest,
        started: Instant,
    ) -> Result<RunSummary, VmmError> {
        self.console.flush().map_err(|source| VmmError::Io {
            what: "flush guest console output".into(),
            source,
        })?;
        Ok(RunSummary {
            exit_code,
            stopped,
            exits,
            digests: self.digests,
            elapsed: started.elapsed(),
            final_digest,
        })
    }

    fn take_digest(&mut self, exit: u64) -> Result<Digest, VmmError> {
        let digest = self.settled_digest()?;
        self.events.digest(exit, &digest)?;
        self.digests += 1;
        Ok(digest)
    }

    /// Exits handled so far.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// The event source (for its statistics).
    pub fn events(&self) -> &E {
        &self.events
    }

    /// Takes the event source back (to finish a log file).
    pub fn into_events(self) -> E {
        self.events
    }
}
