//! The paravirtual device and exit handling.
//!
//! [`handle_exit`] is a free function over a plain [`Exit`]: it is where
//! record and replay interpose (through the [`EventSource`]), and unit tests
//! drive it with synthetic exits and no guest at all. The register map is in
//! [`guest_abi`].

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use guest_abi::{
    BLK_BASE, BLK_SIZE, INPUT_EOF, MAILBOX_GPA, MAILBOX_MAX_LEN, Mailbox, NET_BASE, NET_SIZE,
    PV_BASE, PV_SIZE, reg,
};
use nic::gate::OutputGate;
use nic::virtio::GuestRam;
use nic::virtio::{VirtioNet, WriteEffect};
use vm_memory::{Bytes, GuestAddress};

use crate::VmmError;
use crate::block::VirtioBlk;
use crate::events::EventSource;
use crate::kvm::Exit;

/// What the exit loop does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Resume the guest; for an MMIO read, with this value.
    Resume(u64),
    /// The guest is done, with this exit code.
    Stop(u64),
}

/// The paravirtual device's state. It holds nothing non-deterministic:
/// everything in it follows from guest actions and logged events.
#[derive(Debug)]
pub struct PvDevice {
    /// The guest argument (`ARG`).
    pub arg: u64,
    /// Guest memory size (`MEM_SIZE`).
    pub mem_size: u64,
    /// The input stream has ended (a logged event said so).
    pub input_ended: bool,
    /// Bytes the guest wrote to the console.
    pub console_bytes: u64,
}

impl PvDevice {
    /// A device for a guest with `arg` and `mem_size` bytes of memory.
    pub fn new(arg: u64, mem_size: u64) -> Self {
        Self {
            arg,
            mem_size,
            input_ended: false,
            console_bytes: 0,
        }
    }
}

/// The network device and where its output goes.
pub struct NetState {
    /// The virtio-net device model.
    pub device: VirtioNet,
    /// The output gate (primary, or FT off); `None` on a backup or in
    /// replay, whose output is suppressed.
    pub output: Option<Arc<OutputGate>>,
    /// Frames produced but suppressed (no output gate).
    pub suppressed: u64,
}

/// Everything exit handling may touch.
pub struct ExitContext<'a, E: EventSource> {
    /// The paravirtual device.
    pub device: &'a mut PvDevice,
    /// Guest memory.
    pub memory: &'a GuestRam,
    /// Where non-deterministic values come from.
    pub events: &'a mut E,
    /// Where console output goes.
    pub console: &'a mut dyn Write,
    /// The network device, if the VM has one.
    pub net: Option<&'a mut NetState>,
    /// The disk, if the VM has one.
    pub blk: Option<&'a mut VirtioBlk>,
    /// Set by [`handle_exit`] when the exit is a sync point (the guest waits
    /// for input or produced output): the event source must flush.
    pub sync: bool,
}

/// Handles exit number `exit` of kind `kind`.
pub fn handle_exit<E: EventSource>(
    kind: Exit,
    exit: u64,
    context: &mut ExitContext<'_, E>,
) -> Result<ExitAction, VmmError> {
    let guest_error = |detail: String| VmmError::Guest { exit, detail };
    match kind {
        Exit::MmioRead { addr, len } if (NET_BASE..NET_BASE + NET_SIZE).contains(&addr) => {
            let net = context.net.as_deref_mut().ok_or_else(|| guest_error(format!("access to {addr:#x}: this VM has no network device")))?;
            let value = net.device.read(addr - NET_BASE, len).map_err(|e| guest_error(e.to_string()))?;
            Ok(ExitAction::Resume(u64::from(value)))
        }
        Exit::MmioWrite { addr, len, value } if (NET_BASE..NET_BASE + NET_SIZE).contains(&addr) => {
            let position = context.events.log_position();
            let net = context.net.as_deref_mut().ok_or_else(|| guest_error(format!("access to {addr:#x}: this VM has no network device")))?;
            let effect = net
                .device
                .write(addr - NET_BASE, len, value as u32)
                .map_err(|e| guest_error(e.to_string()))?;
            if effect == WriteEffect::TxNotify {
                context.sync = true;
                let mut frames = Vec::new();
                net.device
                    .collect_tx(context.memory, &mut frames)
                    .map_err(|e| guest_error(e.to_string()))?;
                match &net.output {
                    Some(gate) => frames.into_iter().for_each(|frame| gate.submit(position, frame)),
                    None => net.suppressed += frames.len() as u64,
                }
            }
            Ok(ExitAction::Resume(0))
        }
        Exit::MmioRead { addr, len } if (BLK_BASE..BLK_BASE + BLK_SIZE).contains(&addr) => {
            // Without a disk, MagicValue reads 0 (virtio-mmio: no device
            // here), so a guest can probe; anything else is refused.
            if context.blk.is_none() && addr == BLK_BASE && len == 4 {
                return Ok(ExitAction::Resume(0));
            }
            let blk = context.blk.as_deref_mut().ok_or_else(|| guest_error(format!("access to {addr:#x}: this VM has no disk")))?;
            let offset = addr - BLK_BASE;
            if offset == 0x060 && len == 4 {
                return blk.poll(context.memory, context.events, exit).map(|v| ExitAction::Resume(u64::from(v)));
            }
            let value = blk.read(offset, len).map_err(guest_error)?;
            Ok(ExitAction::Resume(u64::from(value)))
        }
        Exit::MmioWrite { addr, len, value } if (BLK_BASE..BLK_BASE + BLK_SIZE).contains(&addr) => {
            let position = context.events.log_position();
            let blk = context.blk.as_deref_mut().ok_or_else(|| guest_error(format!("access to {addr:#x}: this VM has no disk")))?;
            if blk.write(addr - BLK_BASE, len, value as u32).map_err(guest_error)? {
                blk.notify(context.memory, position)?;
                // Shared disk: held writes wait for the backup's ack of
                // the entries so far; let it hear of them now.
                if blk.disk().held() > 0 {
                    context.sync = true;
                }
            }
            Ok(ExitAction::Resume(0))
        }
        Exit::MmioRead { addr, len } => {
            let offset = pv_offset(addr, len).map_err(guest_error)?;
            read_register(offset, exit, context).map(ExitAction::Resume)
        }
        Exit::MmioWrite { addr, len, value } => {
            let offset = pv_offset(addr, len).map_err(guest_error)?;
            match offset {
                reg::CONSOLE => {
                    let bytes = mailbox_read(context.memory, exit)?;
                    context.device.console_bytes += bytes.len() as u64;
                    context
                        .console
                        .write_all(&bytes)
                        .map_err(|source| VmmError::Io {
                            what: format!("write guest console output at exit {exit}"),
                            source,
                        })?;
                    Ok(ExitAction::Resume(0))
                }
                reg::DONE => Ok(ExitAction::Stop(value)),
                other => Err(guest_error(format!(
                    "write of {value:#x} to register {other:#x}, which is not writable"
                ))),
            }
        }
        Exit::Io { port } => Err(guest_error(format!(
            "port I/O to port {port:#x}: not part of the ABI (use the paravirtual MMIO device)"
        ))),
        Exit::Hlt => Err(guest_error("HLT: not part of the ABI".into())),
        Exit::Shutdown => Err(guest_error(
            "the guest took an exception it cannot handle (triple fault); with CR4.TSD set, RDTSC is one such cause".into(),
        )),
        Exit::Internal { detail } => Err(guest_error(detail)),
    }
}

fn pv_offset(addr: u64, len: usize) -> Result<u64, String> {
    if !(PV_BASE..PV_BASE + PV_SIZE).contains(&addr) {
        return Err(format!(
            "access to {addr:#x}, where there is neither memory nor a device"
        ));
    }
    let offset = addr - PV_BASE;
    if len != 8 || !offset.is_multiple_of(8) {
        return Err(format!(
            "{len}-byte access at register offset {offset:#x}: registers are 8 bytes, 8-aligned"
        ));
    }
    Ok(offset)
}

fn read_register<E: EventSource>(
    offset: u64,
    exit: u64,
    context: &mut ExitContext<'_, E>,
) -> Result<u64, VmmError> {
    match offset {
        reg::CLOCK => context.events.clock(exit),
        reg::ENTROPY => {
            let mut bytes = [0u8; 8];
            context.events.entropy(exit, &mut bytes)?;
            Ok(u64::from_le_bytes(bytes))
        }
        reg::ENTROPY_FILL => {
            let (buf, len) = mailbox(context.memory, exit)?;
            let mut bytes = vec![0u8; len];
            context.events.entropy(exit, &mut bytes)?;
            write_guest(context.memory, buf, &bytes, exit)?;
            Ok(len as u64)
        }
        reg::INPUT => {
            let (buf, len) = mailbox(context.memory, exit)?;
            if context.device.input_ended {
                return Ok(INPUT_EOF);
            }
            let mut bytes = vec![0u8; len];
            match context.events.input(exit, &mut bytes)? {
                Some(count) => {
                    write_guest(context.memory, buf, &bytes[..count], exit)?;
                    Ok(count as u64)
                }
                None => {
                    context.device.input_ended = true;
                    Ok(INPUT_EOF)
                }
            }
        }
        reg::WAIT => {
            context.sync = true;
            let mut raw = [0u8; 8];
            context
                .memory
                .read_slice(&mut raw, GuestAddress(MAILBOX_GPA + 16))
                .map_err(VmmError::memory(format!("read the mailbox at exit {exit}")))?;
            let wait = Duration::from_nanos(u64::from_le_bytes(raw).min(1_000_000_000));
            let buffers = match context.net.as_deref() {
                Some(net) => {
                    net.device
                        .rx_buffers(context.memory)
                        .map_err(|e| VmmError::Guest {
                            exit,
                            detail: e.to_string(),
                        })?
                }
                None => 0,
            };
            if !wait.is_zero() {
                // The guest may sleep here: let the backup catch up first.
                context.events.sync(exit - 1)?;
            }
            let frames = context.events.net_rx(exit, buffers, wait)?;
            if let Some(net) = context.net.as_deref_mut() {
                net.device
                    .deliver_rx(context.memory, &frames)
                    .map_err(|e| VmmError::Guest {
                        exit,
                        detail: e.to_string(),
                    })?;
            }
            context.events.clock(exit)
        }
        reg::ARG => Ok(context.device.arg),
        reg::MEM_SIZE => Ok(context.device.mem_size),
        other => Err(VmmError::Guest {
            exit,
            detail: format!("read of register {other:#x}, which is not readable"),
        }),
    }
}

/// Reads and checks the mailbox: the buffer must lie inside guest memory and
/// be at most [`MAILBOX_MAX_LEN`] bytes.
fn mailbox(memory: &GuestRam, exit: u64) -> Result<(u64, usize), VmmError> {
    let mut raw = [0u8; size_of::<Mailbox>()];
    memory
        .read_slice(&mut raw, GuestAddress(MAILBOX_GPA))
        .map_err(VmmError::memory(format!("read the mailbox at exit {exit}")))?;
    let buf = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
    if len > MAILBOX_MAX_LEN {
        return Err(VmmError::Guest {
            exit,
            detail: format!("mailbox buffer of {len} bytes exceeds the limit of {MAILBOX_MAX_LEN}"),
        });
    }
    let end = buf.checked_add(len);
    let last = memory_end(memory);
    if end.is_none_or(|end| end > last) {
        return Err(VmmError::Guest {
            exit,
            detail: format!(
                "mailbox buffer {buf:#x}+{len:#x} lies outside guest memory (0..{last:#x})"
            ),
        });
    }
    Ok((buf, len as usize))
}

fn mailbox_read(memory: &GuestRam, exit: u64) -> Result<Vec<u8>, VmmError> {
    let (buf, len) = mailbox(memory, exit)?;
    let mut bytes = vec![0u8; len];
    memory
        .read_slice(&mut bytes, GuestAddress(buf))
        .map_err(VmmError::memory(format!(
            "read guest buffer at exit {exit}"
        )))?;
    Ok(bytes)
}

fn write_guest(memory: &GuestRam, addr: u64, bytes: &[u8], exit: u64) -> Result<(), VmmError> {
    memory
        .write_slice(bytes, GuestAddress(addr))
        .map_err(VmmError::memory(format!(
            "write guest buffer at exit {exit}"
        )))
}

fn memory_end(memory: &GuestRam) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory
        .iter()
        .map(|region| region.start_addr().0 + region.len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Discard, Live};

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    fn set_mailbox(memory: &GuestRam, buf: u64, len: u64) {
        let mut raw = buf.to_le_bytes().to_vec();
        raw.extend_from_slice(&len.to_le_bytes());
        memory
            .write_slice(&raw, GuestAddress(MAILBOX_GPA))
            .expect("mailbox");
    }

    struct Fixture {
        device: PvDevice,
        memory: GuestRam,
        events: Live<Discard>,
        console: Vec<u8>,
    }

    impl Fixture {
        fn new(input: &'static [u8]) -> Self {
            Self {
                device: PvDevice::new(42, 1 << 20),
                memory: memory(),
                events: Live::new(Box::new(input), Discard),
                console: Vec::new(),
            }
        }

        fn exit(&mut self, kind: Exit) -> Result<ExitAction, VmmError> {
            let mut context = ExitContext {
                device: &mut self.device,
                memory: &self.memory,
                events: &mut self.events,
                console: &mut self.console,
                net: None,
                blk: None,
                sync: false,
            };
            handle_exit(kind, 7, &mut context)
        }
    }

    fn read(offset: u64) -> Exit {
        Exit::MmioRead {
            addr: PV_BASE + offset,
            len: 8,
        }
    }

    #[test]
    fn deterministic_registers_answer_from_configuration() {
        let mut fixture = Fixture::new(b"");
        assert_eq!(
            fixture.exit(read(reg::ARG)).expect("arg"),
            ExitAction::Resume(42)
        );
        assert_eq!(
            fixture.exit(read(reg::MEM_SIZE)).expect("size"),
            ExitAction::Resume(1 << 20)
        );
        assert_eq!(fixture.events.stats().events, 0, "nothing logged for them");
    }

    #[test]
    fn input_is_copied_into_the_mailbox_buffer_then_ends() {
        let mut fixture = Fixture::new(b"hello");
        set_mailbox(&fixture.memory, 0x9000, 16);
        assert_eq!(
            fixture.exit(read(reg::INPUT)).expect("input"),
            ExitAction::Resume(5)
        );
        let mut got = [0u8; 5];
        fixture
            .memory
            .read_slice(&mut got, GuestAddress(0x9000))
            .expect("read back");
        assert_eq!(&got, b"hello");
        assert_eq!(
            fixture.exit(read(reg::INPUT)).expect("eof"),
            ExitAction::Resume(INPUT_EOF)
        );
        assert!(fixture.device.input_ended);
        assert_eq!(fixture.events.stats().events, 2);
    }

    #[test]
    fn console_and_done() {
        let mut fixture = Fixture::new(b"");
        fixture
            .memory
            .write_slice(b"hi\n", GuestAddress(0xa000))
            .expect("write");
        set_mailbox(&fixture.memory, 0xa000, 3);
        let console = Exit::MmioWrite {
            addr: PV_BASE + reg::CONSOLE,
            len: 8,
            value: 3,
        };
        assert_eq!(
            fixture.exit(console).expect("console"),
            ExitAction::Resume(0)
        );
        assert_eq!(fixture.console, b"hi\n");
        let done = Exit::MmioWrite {
            addr: PV_BASE + reg::DONE,
            len: 8,
            value: 3,
        };
        assert_eq!(fixture.exit(done).expect("done"), ExitAction::Stop(3));
    }

    #[test]
    fn malformed_guest_requests_are_clear_errors() {
        let mut fixture = Fixture::new(b"");
        let cases: Vec<(Exit, &str)> = vec![
            (
                Exit::MmioRead {
                    addr: 0xE000_0000,
                    len: 8,
                },
                "neither memory nor a device",
            ),
            (
                Exit::MmioRead {
                    addr: PV_BASE,
                    len: 4,
                },
                "4-byte access",
            ),
            (read(0x800), "not readable"),
            (Exit::Io { port: 0x3f8 }, "port I/O"),
            (Exit::Shutdown, "triple fault"),
        ];
        for (exit, expected) in cases {
            let error = fixture.exit(exit).expect_err("must be refused");
            let text = error.to_string();
            assert!(text.contains(expected) && text.contains("exit 7"), "{text}");
        }
        set_mailbox(&fixture.memory, (1 << 20) - 4, 16);
        let text = fixture
            .exit(read(reg::ENTROPY_FILL))
            .expect_err("outside")
            .to_string();
        assert!(text.contains("outside guest memory"), "{text}");
        set_mailbox(&fixture.memory, 0, MAILBOX_MAX_LEN + 1);
        let text = fixture
            .exit(read(reg::INPUT))
            .expect_err("too long")
            .to_string();
        assert!(text.contains("exceeds the limit"), "{text}");
        set_mailbox(&fixture.memory, u64::MAX - 2, 8);
        let text = fixture
            .exit(read(reg::INPUT))
            .expect_err("wraps")
            .to_string();
        assert!(text.contains("outside guest memory"), "{text}");
    }
}
