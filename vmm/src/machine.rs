//! The exit loop: run the vCPU, number each exit, handle it, take digests.

use std::io::Write;
use std::time::{Duration, Instant};

use std::sync::Arc;

use nic::gate::OutputGate;
use nic::virtio::VirtioNet;

use crate::device::{ExitAction, ExitContext, NetState, PvDevice, handle_exit};
use crate::digest::Digest;
use crate::events::EventSource;
use crate::{Vm, VmConfig, VmmError};

/// A guest and where its non-determinism comes from.
pub struct Machine<E: EventSource> {
    vm: Vm,
    memory: vm_memory::GuestMemoryMmap,
    device: PvDevice,
    events: E,
    console: Box<dyn Write + Send>,
    net: Option<NetState>,
    digest_interval: u64,
    exits: u64,
    digests: u64,
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
                device: VirtioNet::new(mac).map_err(|e| VmmError::Config(e.to_string()))?,
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
            digest_interval,
            exits: 0,
            digests: 0,
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

    /// The network device's state, if any.
    pub fn net(&self) -> Option<&NetState> {
        self.net.as_ref()
    }

    /// Runs the guest until it writes `DONE` or something stops it.
    pub fn run(&mut self) -> Result<RunSummary, VmmError> {
        let started = Instant::now();
        loop {
            let number = self.exits + 1;
            let mut context = ExitContext {
                device: &mut self.device,
                memory: &self.memory,
                events: &mut self.events,
                console: &mut self.console,
                net: self.net.as_mut(),
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
                        let final_digest = Digest::of(&self.vm)?;
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
        let digest = Digest::of(&self.vm)?;
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
