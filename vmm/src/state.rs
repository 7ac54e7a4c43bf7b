//! The complete state of a machine, and the versioned, checksummed stream
//! that carries it from a running primary to a new backup.
//!
//! # What is in a [`MachineState`]
//!
//! Everything that is not guest memory: the vCPU ([`VcpuState`]: registers,
//! special registers, FPU and XSAVE, XCRs, debug registers, pending events,
//! run state, the MSRs of [`crate::kvm::TRANSFER_MSRS`]), the paravirtual
//! device ([`PvDeviceState`]), the virtio-net device
//! ([`NetDeviceState`]: registers, features, both virtqueues' addresses
//! and indices, counters), the exit and digest counters, and the log
//! position and last clock value the event source needs to continue
//! ([`EventPosition`]). Guest memory travels as pages beside it.
//!
//! # The stream (version 1)
//!
//! All integers little-endian. A 56-byte header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `LKSTATE\0` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | page size (4096) |
//! | 16 | 8 | image id (xxh3-64 of the guest ELF image) |
//! | 24 | 8 | guest memory size in bytes |
//! | 32 | 8 | VM flags ([`VmConfig::flags`]) |
//! | 40 | 8 | guest argument |
//! | 48 | 4 | crc32c of bytes 0..48 |
//! | 52 | 4 | zero |
//!
//! Then chunks, each a 16-byte header and a payload of at most
//! [`MAX_CHUNK_PAYLOAD`] bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 2 | kind ([`ChunkKind`]) |
//! | 2 | 2 | flags (memory: the pre-copy round, saturating at 0xffff) |
//! | 4 | 4 | payload length |
//! | 8 | 4 | chunk index (0, 1, 2, ...) |
//! | 12 | 4 | crc32c of header bytes 0..12 followed by the payload |
//!
//! | kind | payload |
//! |---|---|
//! | 1 `memory` | guest address (u64, 4 KiB-aligned), then whole 4 KiB pages (at most 1 MiB); a later chunk for the same page replaces it |
//! | 2 `round` | round number (u32), zero (u32), pages sent in the round (u64): informational |
//! | 3 `vcpu` | see below |
//! | 4 `pv-device` | arg, mem_size (u64), input_ended (u8), 7 zero bytes, console_bytes (u64) |
//! | 5 `virtio-net` | `nic::virtio::VirtioNetState` (144 bytes), frames suppressed (u64) |
//! | 6 `machine` | exits, digests, log position, last clock ns (u64 each), digest present (u8), 7 zero bytes, digest registers, memory, rip (u64 each) |
//! | 0x7fff `end` | chunks before it (u32), zero (u32), memory pages in all chunks (u64) |
//!
//! The `vcpu` payload is KVM's own structures, as the kernel ABI lays them
//! out: `kvm_regs` (144 bytes), `kvm_sregs` (312), `kvm_fpu` (416),
//! `kvm_xcrs` (392), `kvm_debugregs` (128), `kvm_vcpu_events` (64),
//! `kvm_mp_state` (4), then the MSR count (u32) and for each MSR its index
//! (u32), 4 zero bytes and its value (u64), then the XSAVE word count (u32)
//! and the words (u32 each).
//!
//! A stream is complete only with exactly one each of `vcpu`, `pv-device`,
//! `machine` (and `virtio-net` for a VM with a NIC) followed by `end`.
//! [`receive`] builds the new VM only from a complete, fully checked
//! stream: any error drops it, so a partially built VM is never used.

use std::io::{Read, Write};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use nic::virtio::{VIRTIO_NET_STATE_LEN, VirtioNetState};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{FromBytes, IntoBytes};

use crate::digest::Digest;
use crate::kvm::VcpuState;
use crate::{Vm, VmConfig, VmmError};

/// First bytes of a state stream.
pub const STATE_MAGIC: [u8; 8] = *b"LKSTATE\0";
/// The format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Bytes of the stream header.
pub const HEADER_LEN: usize = 56;
/// Bytes of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 16;
/// Guest page size of the stream.
pub const PAGE_SIZE: u64 = 4096;
/// Largest memory run in one chunk.
pub const MAX_MEMORY_RUN: usize = 1 << 20;
/// Largest run of disk bytes in one chunk.
pub const MAX_DISK_RUN: usize = 512 << 10;
/// Largest payload of any chunk (a memory run and its address).
pub const MAX_CHUNK_PAYLOAD: usize = MAX_MEMORY_RUN + 8;

/// What went wrong with a state stream. Each names where.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the stream failed.
    #[error("state stream: cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stream ended in the middle of something.
    #[error("state stream is truncated: it ends inside {what} at byte {offset}")]
    Truncated {
        /// Byte offset where the missing part starts.
        offset: u64,
        /// What was being read.
        what: String,
    },
    /// Not a state stream at all.
    #[error("not a lockstep state stream (its first bytes are {found:02x?})")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A version this build does not read.
    #[error("state stream version {found} is not understood: this build reads version {supported}")]
    UnknownVersion {
        /// Version in the stream.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The header's checksum does not match.
    #[error("state stream header (bytes 0..{HEADER_LEN}) is corrupt: {detail}")]
    CorruptHeader {
        /// What is wrong.
        detail: String,
    },
    /// A chunk's checksum (or framing) does not match.
    #[error("state chunk {index} ({kind}) at byte {offset} is corrupt: {detail}")]
    Corrupt {
        /// Chunk index.
        index: u32,
        /// Chunk kind as read.
        kind: String,
        /// Byte offset of the chunk header.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A well-formed chunk whose content cannot be right.
    #[error("state chunk {index} ({kind}) at byte {offset} is malformed: {detail}")]
    Malformed {
        /// Chunk index.
        index: u32,
        /// Chunk kind.
        kind: String,
        /// Byte offset of the chunk header.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The state is of another guest image.
    #[error(
        "state stream is of guest image {stream:016x}, but this guest image is {local:016x}: refusing to restore another program"
    )]
    ImageMismatch {
        /// Image id in the stream.
        stream: u64,
        /// Image id of the local image.
        local: u64,
    },
    /// The state is of a VM configured differently.
    #[error("state stream does not match this VM: {0}")]
    ConfigMismatch(String),
    /// The stream ended (with an `end` chunk or without one) missing parts.
    #[error("state stream is incomplete: {0}")]
    Incomplete(String),
    /// Building the new VM failed.
    #[error("cannot build the VM from the received state: {0}")]
    Vmm(#[source] Box<VmmError>),
}

impl From<VmmError> for StateError {
    fn from(error: VmmError) -> Self {
        Self::Vmm(Box::new(error))
    }
}

/// Kinds of chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ChunkKind {
    /// Guest pages.
    Memory = 1,
    /// End of a pre-copy round.
    Round = 2,
    /// vCPU state.
    Vcpu = 3,
    /// Paravirtual device state.
    PvDevice = 4,
    /// virtio-net device state.
    VirtioNet = 5,
    /// Counters and event position.
    Machine = 6,
    /// Disk image bytes.
    Disk = 7,
    /// virtio-blk device state.
    VirtioBlk = 8,
    /// The data of a read finished on the host, not yet delivered.
    DiskRead = 9,
    /// The end of the stream.
    End = 0x7fff,
}

impl ChunkKind {
    fn from_u16(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Memory,
            2 => Self::Round,
            3 => Self::Vcpu,
            4 => Self::PvDevice,
            5 => Self::VirtioNet,
            6 => Self::Machine,
            7 => Self::Disk,
            8 => Self::VirtioBlk,
            9 => Self::DiskRead,
            0x7fff => Self::End,
            _ => return None,
        })
    }

    fn name(raw: u16) -> String {
        match Self::from_u16(raw) {
            Some(Self::Memory) => "memory".into(),
            Some(Self::Round) => "round".into(),
            Some(Self::Vcpu) => "vcpu".into(),
            Some(Self::PvDevice) => "pv-device".into(),
            Some(Self::VirtioNet) => "virtio-net".into(),
            Some(Self::Machine) => "machine".into(),
            Some(Self::Disk) => "disk".into(),
            Some(Self::VirtioBlk) => "virtio-blk".into(),
            Some(Self::DiskRead) => "disk-read".into(),
            Some(Self::End) => "end".into(),
            None => format!("unknown kind {raw:#x}"),
        }
    }
}

/// The paravirtual device's state (`Persist`-style).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvDeviceState {
    /// The guest argument.
    pub arg: u64,
    /// Guest memory size.
    pub mem_size: u64,
    /// The input stream has ended.
    pub input_ended: bool,
    /// Bytes written to the console so far.
    pub console_bytes: u64,
}

/// The network device's state and its VMM-side counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDeviceState {
    /// The virtio-net device.
    pub device: VirtioNetState,
    /// Frames produced with no output gate (suppressed).
    pub suppressed: u64,
}

/// Where the event source stands at the transfer point: the log entries up
/// to `log_position` (sequence numbers 1..=`log_position`) are before the
/// transfer, every later one after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventPosition {
    /// Sequence number of the last log entry before the transfer.
    pub log_position: u64,
    /// The last clock value the guest read, in ns (a replica that later
    /// goes live continues its clock from here).
    pub last_clock_ns: u64,
}

/// A machine's complete state apart from guest memory.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineState {
    /// Exits handled (the state is right after exit `exits`).
    pub exits: u64,
    /// Digests taken so far.
    pub digests: u64,
    /// The event source's position.
    pub events: EventPosition,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// The paravirtual device.
    pub device: PvDeviceState,
    /// The virtio-net device, if the VM has one.
    pub net: Option<NetDeviceState>,
    /// The virtio-blk device, if the VM has a disk (its image travels in
    /// `disk` chunks).
    pub blk: Option<crate::block::BlkState>,
    /// The digest of the whole state (registers and memory) at this point,
    /// if the capture took one: the restored machine must match it.
    pub digest: Option<Digest>,
}

/// The identity fields of a stream header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateHeader {
    /// xxh3-64 of the guest image (the same id log headers carry).
    pub image_id: u64,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// [`VmConfig::flags`].
    pub vm_flags: u64,
    /// The guest argument.
    pub guest_arg: u64,
}

impl StateHeader {
    /// The header for a VM of `config` running `image` with `arg`.
    pub fn new(config: &VmConfig, image: &[u8], arg: u64) -> Self {
        Self {
            image_id: image_id(image),
            mem_size: config.mem_size,
            vm_flags: config.flags(),
            guest_arg: arg,
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&STATE_MAGIC);
        out[8..12].copy_from_slice(&STATE_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.image_id.to_le_bytes());
        out[24..32].copy_from_slice(&self.mem_size.to_le_bytes());
        out[32..40].copy_from_slice(&self.vm_flags.to_le_bytes());
        out[40..48].copy_from_slice(&self.guest_arg.to_le_bytes());
        let crc = crc32c::crc32c(&out[..48]);
        out[48..52].copy_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(raw: &[u8; HEADER_LEN]) -> Result<Self, StateError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&raw[..8]);
        if magic != STATE_MAGIC {
            return Err(StateError::BadMagic { found: magic });
        }
        let version = le_u32(&raw[8..12]);
        if version != STATE_VERSION {
            return Err(StateError::UnknownVersion {
                found: version,
                supported: STATE_VERSION,
            });
        }
        let stored = le_u32(&raw[48..52]);
        let computed = crc32c::crc32c(&raw[..48]);
        if stored != computed {
            return Err(StateError::CorruptHeader {
                detail: format!("crc32c is {computed:08x}, the header says {stored:08x}"),
            });
        }
        let page = le_u32(&raw[12..16]);
        if u64::from(page) != PAGE_SIZE || raw[52..56] != [0; 4] {
            return Err(StateError::CorruptHeader {
                detail: format!(
                    "page size {page} (must be {PAGE_SIZE}) or reserved bytes not zero"
                ),
            });
        }
        Ok(Self {
            image_id: le_u64(&raw[16..24]),
            mem_size: le_u64(&raw[24..32]),
            vm_flags: le_u64(&raw[32..40]),
            guest_arg: le_u64(&raw[40..48]),
        })
    }
}

/// The image id of a guest image (xxh3-64 of its bytes; equal to
/// `guest_images::image_id`).
pub fn image_id(image: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(image)
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

/// Writes a state stream to any [`Write`].
pub struct StateWriter<W: Write> {
    out: W,
    chunks: u32,
    pages: u64,
    bytes: u64,
}

impl<W: Write> StateWriter<W> {
    /// Starts a stream: writes the header.
    pub fn new(mut out: W, header: &StateHeader) -> Result<Self, StateError> {
        out.write_all(&header.encode())
            .map_err(|source| StateError::Io {
                what: "write the header".into(),
                source,
            })?;
        Ok(Self {
            out,
            chunks: 0,
            pages: 0,
            bytes: HEADER_LEN as u64,
        })
    }

    fn chunk(&mut self, kind: ChunkKind, flags: u16, parts: &[&[u8]]) -> Result<(), StateError> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let mut header = [0u8; CHUNK_HEADER_LEN];
        header[..2].copy_from_slice(&(kind as u16).to_le_bytes());
        header[2..4].copy_from_slice(&flags.to_le_bytes());
        header[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        header[8..12].copy_from_slice(&self.chunks.to_le_bytes());
        let mut crc = crc32c::crc32c(&header[..12]);
        for part in parts {
            crc = crc32c::crc32c_append(crc, part);
        }
        header[12..16].copy_from_slice(&crc.to_le_bytes());
        let index = self.chunks;
        let io = |source| StateError::Io {
            what: format!("write chunk {index}"),
            source,
        };
        self.out.write_all(&header).map_err(io)?;
        for part in parts {
            self.out.write_all(part).map_err(io)?;
        }
        self.chunks += 1;
        self.bytes += (CHUNK_HEADER_LEN + len) as u64;
        Ok(())
    }

    /// Writes guest pages starting at `addr` (4 KiB-aligned; `bytes` whole
    /// pages), split into chunks of at most 1 MiB.
    pub fn memory(&mut self, round: u32, addr: u64, bytes: &[u8]) -> Result<(), StateError> {
        let flags = u16::try_from(round).unwrap_or(u16::MAX);
        for (i, run) in bytes.chunks(MAX_MEMORY_RUN).enumerate() {
            let at = addr + (i * MAX_MEMORY_RUN) as u64;
            self.chunk(ChunkKind::Memory, flags, &[&at.to_le_bytes(), run])?;
            self.pages += run.len() as u64 / PAGE_SIZE;
        }
        Ok(())
    }

    /// Writes disk image bytes at `offset` of a disk of `capacity` bytes
    /// (whole sectors), split into chunks of at most [`MAX_DISK_RUN`].
    pub fn disk(
        &mut self,
        round: u32,
        capacity: u64,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), StateError> {
        let flags = u16::try_from(round).unwrap_or(u16::MAX);
        for (i, run) in bytes.chunks(MAX_DISK_RUN).enumerate() {
            let at = offset + (i * MAX_DISK_RUN) as u64;
            self.chunk(
                ChunkKind::Disk,
                flags,
                &[&capacity.to_le_bytes(), &at.to_le_bytes(), run],
            )?;
        }
        Ok(())
    }

    /// Marks the end of pre-copy round `round`, which sent `pages` pages.
    pub fn round_end(&mut self, round: u32, pages: u64) -> Result<(), StateError> {
        let mut payload = [0u8; 16];
        payload[..4].copy_from_slice(&round.to_le_bytes());
        payload[8..].copy_from_slice(&pages.to_le_bytes());
        self.chunk(ChunkKind::Round, 0, &[&payload])
    }

    /// Writes the machine state (vCPU, devices, counters).
    pub fn machine(&mut self, state: &MachineState) -> Result<(), StateError> {
        self.chunk(ChunkKind::Vcpu, 0, &[&encode_vcpu(&state.vcpu)])?;
        let device = &state.device;
        let mut pv = Vec::with_capacity(32);
        pv.extend_from_slice(&device.arg.to_le_bytes());
        pv.extend_from_slice(&device.mem_size.to_le_bytes());
        pv.push(u8::from(device.input_ended));
        pv.extend_from_slice(&[0; 7]);
        pv.extend_from_slice(&device.console_bytes.to_le_bytes());
        self.chunk(ChunkKind::PvDevice, 0, &[&pv])?;
        if let Some(net) = &state.net {
            let mut payload = net.device.to_bytes();
            payload.extend_from_slice(&net.suppressed.to_le_bytes());
            self.chunk(ChunkKind::VirtioNet, 0, &[&payload])?;
        }
        if let Some(blk) = &state.blk {
            for request in blk.pending.iter().filter(|p| !p.data.is_empty()) {
                self.chunk(
                    ChunkKind::DiskRead,
                    0,
                    &[&request.tag.to_le_bytes(), &request.data],
                )?;
            }
            self.chunk(ChunkKind::VirtioBlk, 0, &[&blk.to_bytes()])?;
        }
        let mut machine = Vec::with_capacity(64);
        for word in [
            state.exits,
            state.digests,
            state.events.log_position,
            state.events.last_clock_ns,
        ] {
            machine.extend_from_slice(&word.to_le_bytes());
        }
        machine.push(u8::from(state.digest.is_some()));
        machine.extend_from_slice(&[0; 7]);
        let digest = state.digest.unwrap_or(Digest {
            registers: 0,
            memory: 0,
            rip: 0,
        });
        for word in [digest.registers, digest.memory, digest.rip] {
            machine.extend_from_slice(&word.to_le_bytes());
        }
        self.chunk(ChunkKind::Machine, 0, &[&machine])
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Memory pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.pages
    }

    /// Writes the `end` chunk, flushes, and returns the writer.
    pub fn finish(mut self) -> Result<W, StateError> {
        let mut payload = [0u8; 16];
        payload[..4].copy_from_slice(&self.chunks.to_le_bytes());
        payload[8..].copy_from_slice(&self.pages.to_le_bytes());
        self.chunk(ChunkKind::End, 0, &[&payload])?;
        self.out.flush().map_err(|source| StateError::Io {
            what: "flush the stream".into(),
            source,
        })?;
        Ok(self.out)
    }
}

fn encode_vcpu(vcpu: &VcpuState) -> Vec<u8> {
    let mut out = Vec::with_capacity(2048 + vcpu.xsave.len() * 4);
    out.extend_from_slice(vcpu.regs.as_bytes());
    out.extend_from_slice(vcpu.sregs.as_bytes());
    let fpu = &vcpu.fpu;
    for register in &fpu.fpr {
        out.extend_from_slice(register);
    }
    out.extend_from_slice(&fpu.fcw.to_le_bytes());
    out.extend_from_slice(&fpu.fsw.to_le_bytes());
    out.push(fpu.ftwx);
    out.push(fpu.pad1);
    out.extend_from_slice(&fpu.last_opcode.to_le_bytes());
    out.extend_from_slice(&fpu.last_ip.to_le_bytes());
    out.extend_from_slice(&fpu.last_dp.to_le_bytes());
    for register in &fpu.xmm {
        out.extend_from_slice(register);
    }
    out.extend_from_slice(&fpu.mxcsr.to_le_bytes());
    out.extend_from_slice(&fpu.pad2.to_le_bytes());
    out.extend_from_slice(vcpu.xcrs.as_bytes());
    out.extend_from_slice(vcpu.debugregs.as_bytes());
    out.extend_from_slice(vcpu.events.as_bytes());
    out.extend_from_slice(vcpu.mp_state.as_bytes());
    out.extend_from_slice(&(vcpu.msrs.len() as u32).to_le_bytes());
    for &(index, value) in &vcpu.msrs {
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(&(vcpu.xsave.len() as u32).to_le_bytes());
    for word in &vcpu.xsave {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// A cursor over a chunk payload whose every short read is an error.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "{what} needs {len} bytes at payload offset {}, only {} remain",
                self.at,
                self.bytes.len() - self.at
            ));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let raw = self.take(2, what)?;
        Ok(u16::from_le_bytes([raw[0], raw[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(le_u32(self.take(4, what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(le_u64(self.take(8, what)?))
    }

    fn flag(&mut self, what: &str) -> Result<bool, String> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{what} is {other}, not 0 or 1")),
        }
    }

    fn kvm<T: FromBytes>(&mut self, what: &str) -> Result<T, String> {
        let raw = self.take(size_of::<T>(), what)?;
        T::read_from_bytes(raw).map_err(|_| format!("{what}: {} bytes do not parse", raw.len()))
    }

    fn done(&self, what: &str) -> Result<(), String> {
        if self.at != self.bytes.len() {
            return Err(format!(
                "{} bytes left over after the {what}",
                self.bytes.len() - self.at
            ));
        }
        Ok(())
    }
}

fn decode_vcpu(payload: &[u8]) -> Result<VcpuState, String> {
    let mut c = Cursor {
        bytes: payload,
        at: 0,
    };
    let regs: kvm_regs = c.kvm("kvm_regs")?;
    let sregs: kvm_sregs = c.kvm("kvm_sregs")?;
    let mut fpu = kvm_fpu::default();
    for register in &mut fpu.fpr {
        register.copy_from_slice(c.take(16, "x87 register")?);
    }
    fpu.fcw = c.u16("fcw")?;
    fpu.fsw = c.u16("fsw")?;
    fpu.ftwx = c.u8("ftwx")?;
    fpu.pad1 = c.u8("fpu padding")?;
    fpu.last_opcode = c.u16("last opcode")?;
    fpu.last_ip = c.u64("last ip")?;
    fpu.last_dp = c.u64("last dp")?;
    for register in &mut fpu.xmm {
        register.copy_from_slice(c.take(16, "xmm register")?);
    }
    fpu.mxcsr = c.u32("mxcsr")?;
    fpu.pad2 = c.u32("fpu padding")?;
    let xcrs: kvm_xcrs = c.kvm("kvm_xcrs")?;
    if xcrs.nr_xcrs as usize > xcrs.xcrs.len() {
        return Err(format!(
            "{} XCRs, at most {}",
            xcrs.nr_xcrs,
            xcrs.xcrs.len()
        ));
    }
    let debugregs: kvm_debugregs = c.kvm("kvm_debugregs")?;
    let events: kvm_vcpu_events = c.kvm("kvm_vcpu_events")?;
    let mp_state: kvm_mp_state = c.kvm("kvm_mp_state")?;
    let count = c.u32("MSR count")?;
    if count as usize > crate::kvm::TRANSFER_MSRS.len() {
        return Err(format!(
            "{count} MSRs, at most {}",
            crate::kvm::TRANSFER_MSRS.len()
        ));
    }
    let mut msrs = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let index = c.u32("MSR index")?;
        c.take(4, "MSR padding")?;
        let value = c.u64("MSR value")?;
        if !crate::kvm::TRANSFER_MSRS.contains(&index) {
            return Err(format!("MSR {index:#x} is not one a transfer carries"));
        }
        msrs.push((index, value));
    }
    let words = c.u32("XSAVE word count")? as usize;
    if !(1024..=(1 << 16)).contains(&words) {
        return Err(format!("an XSAVE area of {words} words"));
    }
    let raw = c.take(words * 4, "XSAVE area")?;
    let xsave = raw.chunks_exact(4).map(le_u32).collect();
    c.done("vCPU state")?;
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        events,
        mp_state,
        msrs,
    })
}

/// One chunk as read.
#[derive(Debug)]
pub struct Chunk {
    /// Kind (known: unknown kinds are refused as corrupt).
    pub kind: ChunkKind,
    /// Flags.
    pub flags: u16,
    /// Index in the stream.
    pub index: u32,
    /// Byte offset of its header.
    pub offset: u64,
    /// Payload (checksum verified).
    pub payload: Vec<u8>,
}

/// Reads a state stream from any [`Read`], verifying every checksum.
pub struct StateReader<R: Read> {
    input: R,
    header: StateHeader,
    offset: u64,
    index: u32,
}

impl<R: Read> StateReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, StateError> {
        let mut raw = [0u8; HEADER_LEN];
        read_exact(&mut input, &mut raw, 0, "the stream header")?;
        let header = StateHeader::decode(&raw)?;
        Ok(Self {
            input,
            header,
            offset: HEADER_LEN as u64,
            index: 0,
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &StateHeader {
        &self.header
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// The next chunk. The end of the input before an `end` chunk is
    /// [`StateError::Truncated`].
    pub fn next_chunk(&mut self) -> Result<Chunk, StateError> {
        let offset = self.offset;
        let index = self.index;
        let mut header = [0u8; CHUNK_HEADER_LEN];
        read_exact(
            &mut self.input,
            &mut header,
            offset,
            &format!("the header of chunk {index} (no end chunk yet)"),
        )?;
        let raw_kind = u16::from_le_bytes([header[0], header[1]]);
        let flags = u16::from_le_bytes([header[2], header[3]]);
        let len = le_u32(&header[4..8]) as usize;
        let stored_index = le_u32(&header[8..12]);
        let stored_crc = le_u32(&header[12..16]);
        let corrupt = |detail: String| StateError::Corrupt {
            index,
            kind: ChunkKind::name(raw_kind),
            offset,
            detail,
        };
        if len > MAX_CHUNK_PAYLOAD {
            return Err(corrupt(format!(
                "a payload of {len} bytes, more than the {MAX_CHUNK_PAYLOAD} any chunk has"
            )));
        }
        let mut payload = vec![0u8; len];
        read_exact(
            &mut self.input,
            &mut payload,
            offset + CHUNK_HEADER_LEN as u64,
            &format!(
                "the payload of chunk {index} ({})",
                ChunkKind::name(raw_kind)
            ),
        )?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..12]), &payload);
        if crc != stored_crc {
            return Err(corrupt(format!(
                "crc32c is {crc:08x}, the chunk says {stored_crc:08x}"
            )));
        }
        if stored_index != index {
            return Err(corrupt(format!(
                "it says it is chunk {stored_index}: chunks are missing or out of order"
            )));
        }
        let kind = ChunkKind::from_u16(raw_kind)
            .ok_or_else(|| corrupt("a kind this version does not define".into()))?;
        self.offset += (CHUNK_HEADER_LEN + len) as u64;
        self.index += 1;
        Ok(Chunk {
            kind,
            flags,
            index,
            offset,
            payload,
        })
    }
}

fn read_exact<R: Read>(
    input: &mut R,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), StateError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(StateError::Truncated {
                    offset: offset + filled as u64,
                    what: what.into(),
                });
            }
            Ok(count) => filled += count,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(StateError::Io {
                    what: format!("read {what} at byte {}", offset + filled as u64),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// One chunk's payload, parsed and checked on its own: what [`receive`]
/// applies to the new VM. Whole-stream rules (one of each state, the `end`
/// last) are [`receive`]'s.
#[derive(Debug)]
pub enum ChunkRecord<'a> {
    /// Whole 4 KiB pages at a page-aligned guest address inside guest memory.
    Memory {
        /// Guest-physical address of the first page.
        addr: u64,
        /// The pages.
        bytes: &'a [u8],
    },
    /// The end of a pre-copy round (informational).
    Round,
    /// The vCPU state.
    Vcpu(Box<VcpuState>),
    /// The paravirtual device.
    PvDevice(PvDeviceState),
    /// The virtio-net device.
    VirtioNet(NetDeviceState),
    /// Counters and the event position.
    Machine {
        /// Exits handled.
        exits: u64,
        /// Digests taken.
        digests: u64,
        /// The event source's position.
        events: EventPosition,
        /// The digest at the capture, if one was taken.
        digest: Option<Digest>,
    },
    /// Disk image bytes at `offset` of a disk of `capacity` bytes.
    Disk {
        /// Size of the disk.
        capacity: u64,
        /// Byte offset.
        offset: u64,
        /// The bytes (whole sectors).
        bytes: &'a [u8],
    },
    /// The virtio-blk device.
    VirtioBlk(Box<crate::block::BlkState>),
    /// A finished read's data.
    DiskRead {
        /// The request's tag.
        tag: u64,
        /// The data.
        bytes: &'a [u8],
    },
    /// The end of the stream (its chunk count checked).
    End,
}

/// Parses and checks the payload of `chunk` (read by [`StateReader`]) of a
/// stream with `header`, for a VM of `config` (the stream header's, as
/// [`receive`] builds it). Pure: it touches no VM, so it is also the entry
/// point of the state-stream fuzz target. Errors are
/// [`StateError::Malformed`], naming the chunk.
pub fn parse_chunk<'a>(
    chunk: &'a Chunk,
    header: &StateHeader,
    config: &VmConfig,
) -> Result<ChunkRecord<'a>, StateError> {
    let malformed = |detail: String| StateError::Malformed {
        index: chunk.index,
        kind: ChunkKind::name(chunk.kind as u16),
        offset: chunk.offset,
        detail,
    };
    let mut c = Cursor {
        bytes: &chunk.payload,
        at: 0,
    };
    Ok(match chunk.kind {
        ChunkKind::Memory => {
            let addr = c.u64("guest address").map_err(malformed)?;
            let bytes = &chunk.payload[8..];
            if !addr.is_multiple_of(PAGE_SIZE)
                || !(bytes.len() as u64).is_multiple_of(PAGE_SIZE)
                || bytes.is_empty()
            {
                return Err(malformed(format!(
                    "{} bytes at {addr:#x}: memory travels in whole, aligned 4 KiB pages",
                    bytes.len()
                )));
            }
            if addr
                .checked_add(bytes.len() as u64)
                .is_none_or(|end| end > header.mem_size)
            {
                return Err(malformed(format!(
                    "{} bytes at {addr:#x} lie outside guest memory (0..{:#x})",
                    bytes.len(),
                    header.mem_size
                )));
            }
            ChunkRecord::Memory { addr, bytes }
        }
        ChunkKind::Round => {
            c.take(16, "round record").map_err(malformed)?;
            c.done("round record").map_err(malformed)?;
            ChunkRecord::Round
        }
        ChunkKind::Vcpu => {
            ChunkRecord::Vcpu(Box::new(decode_vcpu(&chunk.payload).map_err(malformed)?))
        }
        ChunkKind::PvDevice => {
            let parse = |c: &mut Cursor<'_>| -> Result<PvDeviceState, String> {
                let arg = c.u64("arg")?;
                let mem_size = c.u64("mem_size")?;
                let input_ended = c.flag("input_ended")?;
                c.take(7, "padding")?;
                let console_bytes = c.u64("console_bytes")?;
                c.done("device state")?;
                Ok(PvDeviceState {
                    arg,
                    mem_size,
                    input_ended,
                    console_bytes,
                })
            };
            let state = parse(&mut c).map_err(malformed)?;
            if state.mem_size != header.mem_size {
                return Err(malformed(format!(
                    "the device reports {} bytes of memory, the header {}",
                    state.mem_size, header.mem_size
                )));
            }
            ChunkRecord::PvDevice(state)
        }
        ChunkKind::VirtioNet => {
            if chunk.payload.len() != VIRTIO_NET_STATE_LEN + 8 {
                return Err(malformed(format!(
                    "{} bytes, expected {}",
                    chunk.payload.len(),
                    VIRTIO_NET_STATE_LEN + 8
                )));
            }
            let state = VirtioNetState::from_bytes(&chunk.payload[..VIRTIO_NET_STATE_LEN])
                .map_err(|e| malformed(e.to_string()))?;
            if Some(state.mac) != config.mac {
                return Err(malformed(format!(
                    "the device has MAC {:02x?}, the VM's configuration {:02x?}",
                    state.mac, config.mac
                )));
            }
            ChunkRecord::VirtioNet(NetDeviceState {
                device: state,
                suppressed: le_u64(&chunk.payload[VIRTIO_NET_STATE_LEN..]),
            })
        }
        ChunkKind::Machine => {
            let parse = |c: &mut Cursor<'_>| -> Result<ChunkRecord<'a>, String> {
                let exits = c.u64("exits")?;
                let digests = c.u64("digests")?;
                let log_position = c.u64("log position")?;
                let last_clock_ns = c.u64("last clock")?;
                let has_digest = c.flag("digest present")?;
                c.take(7, "padding")?;
                let digest = Digest {
                    registers: c.u64("digest registers")?,
                    memory: c.u64("digest memory")?,
                    rip: c.u64("digest rip")?,
                };
                c.done("machine record")?;
                Ok(ChunkRecord::Machine {
                    exits,
                    digests,
                    events: EventPosition {
                        log_position,
                        last_clock_ns,
                    },
                    digest: has_digest.then_some(digest),
                })
            };
            parse(&mut c).map_err(malformed)?
        }
        ChunkKind::Disk => {
            let capacity = c.u64("disk capacity").map_err(malformed)?;
            let offset = c.u64("disk offset").map_err(malformed)?;
            let bytes = &chunk.payload[16..];
            if bytes.is_empty()
                || bytes.len() > MAX_DISK_RUN
                || !offset.is_multiple_of(crate::block::SECTOR)
                || !(bytes.len() as u64).is_multiple_of(crate::block::SECTOR)
                || capacity == 0
                || !capacity.is_multiple_of(crate::block::SECTOR)
            {
                return Err(malformed(format!(
                    "{} bytes at offset {offset} of a {capacity}-byte disk: the disk travels in whole 512-byte sectors, at most {MAX_DISK_RUN} bytes a chunk",
                    bytes.len()
                )));
            }
            if offset
                .checked_add(bytes.len() as u64)
                .is_none_or(|end| end > capacity)
            {
                return Err(malformed(format!(
                    "{} bytes at offset {offset} lie beyond the end of the {capacity}-byte disk",
                    bytes.len()
                )));
            }
            ChunkRecord::Disk {
                capacity,
                offset,
                bytes,
            }
        }
        ChunkKind::VirtioBlk => ChunkRecord::VirtioBlk(Box::new(
            crate::block::BlkState::from_bytes(&chunk.payload).map_err(malformed)?,
        )),
        ChunkKind::DiskRead => {
            let tag = c.u64("read tag").map_err(malformed)?;
            let bytes = &chunk.payload[8..];
            if bytes.len() as u64 > crate::block::MAX_REQUEST_BYTES {
                return Err(malformed(format!(
                    "{} bytes of read data, more than a request carries",
                    bytes.len()
                )));
            }
            ChunkRecord::DiskRead { tag, bytes }
        }
        ChunkKind::End => {
            c.take(16, "end record").map_err(malformed)?;
            c.done("end record").map_err(malformed)?;
            let announced = le_u32(&chunk.payload[..4]);
            if announced != chunk.index {
                return Err(malformed(format!(
                    "it counts {announced} chunks before it, there were {}",
                    chunk.index
                )));
            }
            ChunkRecord::End
        }
    })
}

/// Decodes a `vcpu` chunk's payload (see the module docs for its layout):
/// the pure decoder [`receive`] uses, exposed for the fuzz targets.
pub fn decode_vcpu_state(payload: &[u8]) -> Result<VcpuState, StateError> {
    decode_vcpu(payload).map_err(|detail| StateError::Malformed {
        index: 0,
        kind: ChunkKind::name(ChunkKind::Vcpu as u16),
        offset: 0,
        detail,
    })
}

/// Counters of a received stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Chunks read (the end chunk included).
    pub chunks: u64,
    /// Memory pages received (a page sent twice counts twice).
    pub pages: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Pre-copy rounds announced.
    pub rounds: u64,
    /// Disk chunks received (a block sent twice counts twice).
    pub disk_chunks: u64,
}

/// A complete, checked state, loaded into a new VM that has not run yet:
/// give it to [`crate::Machine::restore`].
pub struct Received {
    pub(crate) vm: Vm,
    /// The VM configuration (from the stream header).
    pub config: VmConfig,
    /// The stream header.
    pub header: StateHeader,
    /// The machine state.
    pub state: MachineState,
    /// Counters.
    pub stats: ReceiveStats,
    /// The image the transferred disk was written to (a VM with a disk).
    pub disk: Option<std::path::PathBuf>,
}

/// Reads a whole state stream for `image` and builds the VM it describes.
/// Memory pages go straight into the new VM's memory as they arrive; the
/// VM is returned only if the stream is complete and every chunk checks,
/// and it is dropped on any error. With `expected`, the stream's VM
/// configuration must equal it.
pub fn receive<R: Read>(
    input: R,
    image: &[u8],
    expected: Option<&VmConfig>,
) -> Result<Received, StateError> {
    receive_from(StateReader::new(input)?, image, expected)
}

/// [`receive`] from a reader whose header the caller has already looked at
/// (to find the guest image it names).
pub fn receive_from<R: Read>(
    reader: StateReader<R>,
    image: &[u8],
    expected: Option<&VmConfig>,
) -> Result<Received, StateError> {
    receive_with_disk(reader, image, expected, None)
}

/// The receiving end of a transferred disk: the local image, emptied and
/// written block by block as `disk` chunks arrive.
struct DiskSink {
    path: std::path::PathBuf,
    file: Option<(std::fs::File, u64)>,
    blocks: u64,
}

impl DiskSink {
    fn io(&self, what: &str, source: std::io::Error) -> StateError {
        StateError::Io {
            what: format!("{what} disk image {}", self.path.display()),
            source,
        }
    }

    /// The image, emptied to `capacity` zero bytes on first use.
    fn file(&mut self, capacity: u64) -> Result<&std::fs::File, StateError> {
        if self.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)
                .map_err(|e| self.io("open (to receive it)", e))?;
            file.set_len(capacity)
                .map_err(|e| self.io(&format!("size to {capacity} bytes"), e))?;
            self.file = Some((file, capacity));
        }
        match &self.file {
            Some((file, size)) if *size == capacity => Ok(file),
            Some((_, size)) => Err(StateError::ConfigMismatch(format!(
                "the stream's disk chunks name a {capacity}-byte disk after a {size}-byte one"
            ))),
            None => Err(StateError::Incomplete("the disk image is not open".into())),
        }
    }
}

/// [`receive_from`] for a VM that may have a disk: its blocks are written
/// to the image at `disk` (emptied first: the stream carries every
/// non-zero block), which is then flushed and, if the capture hashed the
/// primary's image, checked against that hash (the disk's part of the
/// hand-over digest). A stream with a disk needs `disk`, and `disk` needs
/// a stream with one.
pub fn receive_with_disk<R: Read>(
    mut reader: StateReader<R>,
    image: &[u8],
    expected: Option<&VmConfig>,
    disk: Option<&std::path::Path>,
) -> Result<Received, StateError> {
    let mut sink = disk.map(|path| DiskSink {
        path: path.to_path_buf(),
        file: None,
        blocks: 0,
    });
    let mut blk: Option<crate::block::BlkState> = None;
    let mut reads: std::collections::HashMap<u64, Vec<u8>> = std::collections::HashMap::new();
    let header = *reader.header();
    let local = image_id(image);
    if header.image_id != local {
        return Err(StateError::ImageMismatch {
            stream: header.image_id,
            local,
        });
    }
    let config = VmConfig::with_flags(header.mem_size, header.vm_flags);
    if let Some(expected) = expected
        && *expected != config
    {
        return Err(StateError::ConfigMismatch(format!(
            "the stream's VM has {} bytes of memory and flags {:#x}, this one {} and {:#x}",
            config.mem_size,
            config.flags(),
            expected.mem_size,
            expected.flags()
        )));
    }
    let vm = Vm::blank(&config)?;
    let mut stats = ReceiveStats::default();
    let mut vcpu = None;
    let mut device = None;
    let mut net = None;
    let mut machine: Option<(u64, u64, EventPosition, Option<Digest>)> = None;
    loop {
        let chunk = reader.next_chunk()?;
        stats.chunks += 1;
        let malformed = |detail: String| StateError::Malformed {
            index: chunk.index,
            kind: ChunkKind::name(chunk.kind as u16),
            offset: chunk.offset,
            detail,
        };
        match parse_chunk(&chunk, &header, &config)? {
            ChunkRecord::Memory { addr, bytes } => {
                vm.memory()
                    .write_slice(bytes, GuestAddress(addr))
                    .map_err(|e| malformed(format!("write guest memory at {addr:#x}: {e}")))?;
                stats.pages += bytes.len() as u64 / PAGE_SIZE;
            }
            ChunkRecord::Round => stats.rounds += 1,
            ChunkRecord::Vcpu(state) => {
                if vcpu.is_some() {
                    return Err(malformed("a second vCPU state".into()));
                }
                vcpu = Some(*state);
            }
            ChunkRecord::PvDevice(state) => {
                if device.is_some() {
                    return Err(malformed("a second paravirtual device state".into()));
                }
                device = Some(state);
            }
            ChunkRecord::VirtioNet(state) => {
                if net.is_some() {
                    return Err(malformed("a second virtio-net state".into()));
                }
                net = Some(state);
            }
            ChunkRecord::Machine {
                exits,
                digests,
                events,
                digest,
            } => {
                if machine.is_some() {
                    return Err(malformed("a second machine record".into()));
                }
                machine = Some((exits, digests, events, digest));
            }
            ChunkRecord::Disk {
                capacity,
                offset,
                bytes,
            } => {
                let Some(sink) = sink.as_mut() else {
                    return Err(StateError::ConfigMismatch(
                        "the primary's VM has a disk, this replica has none: give it --disk FILE (its contents are replaced by the primary's)".into(),
                    ));
                };
                use std::os::unix::fs::FileExt;
                let file = sink.file(capacity)?;
                file.write_all_at(bytes, offset).map_err(|e| {
                    malformed(format!(
                        "write {} bytes at offset {offset} of the disk image: {e}",
                        bytes.len()
                    ))
                })?;
                sink.blocks += 1;
            }
            ChunkRecord::DiskRead { tag, bytes } => {
                if reads.insert(tag, bytes.to_vec()).is_some() {
                    return Err(malformed(format!(
                        "a second read data chunk for request {tag}"
                    )));
                }
            }
            ChunkRecord::VirtioBlk(state) => {
                if blk.is_some() {
                    return Err(malformed("a second virtio-blk state".into()));
                }
                blk = Some(*state);
            }
            ChunkRecord::End => {
                stats.bytes = reader.bytes_read();
                break;
            }
        }
    }
    let disk = match (&mut sink, &mut blk) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(StateError::ConfigMismatch(
                "the primary's VM has a disk, this replica has none: give it --disk FILE (its contents are replaced by the primary's)".into(),
            ));
        }
        (Some(sink), None) => {
            return Err(StateError::ConfigMismatch(format!(
                "this replica has a disk ({}), the primary's VM has none",
                sink.path.display()
            )));
        }
        (Some(sink), Some(blk)) => {
            for request in &mut blk.pending {
                if let Some(data) = reads.remove(&request.tag) {
                    request.data = data;
                }
                if request.kind == crate::block::T_IN
                    && request.done.status == crate::block::S_OK
                    && request.data.len() as u64 + 1 != u64::from(request.done.len)
                {
                    return Err(StateError::Incomplete(format!(
                        "disk read {} finished with {} bytes, the stream carries {} of its data",
                        request.tag,
                        request.done.len.saturating_sub(1),
                        request.data.len()
                    )));
                }
            }
            if let Some(tag) = reads.keys().next() {
                return Err(StateError::ConfigMismatch(format!(
                    "the stream carries read data for disk request {tag}, which is not outstanding"
                )));
            }
            let file = sink.file(blk.capacity)?;
            file.sync_data().map_err(|e| StateError::Io {
                what: "flush the received disk image".into(),
                source: e,
            })?;
            if let Some(expected) = blk.content_hash {
                let copied = crate::block::Disk::open(&sink.path, true, None)?.content_hash()?;
                if copied != expected {
                    return Err(StateError::ConfigMismatch(format!(
                        "the copied disk image {} hashes to {copied:016x}, the primary's was {expected:016x} at the hand-over",
                        sink.path.display()
                    )));
                }
            }
            stats.disk_chunks = sink.blocks;
            Some(sink.path.clone())
        }
    };
    let missing = |what: &str| StateError::Incomplete(format!("the stream has no {what} state"));
    let vcpu = vcpu.ok_or_else(|| missing("vCPU"))?;
    let device = device.ok_or_else(|| missing("paravirtual device"))?;
    let (exits, digests, events, digest) = machine.ok_or_else(|| missing("machine"))?;
    if config.mac.is_some() && net.is_none() {
        return Err(missing("virtio-net"));
    }
    if config.mac.is_none() && net.is_some() {
        return Err(StateError::ConfigMismatch(
            "the stream has a virtio-net device, the VM has none".into(),
        ));
    }
    vm.set_vcpu_state(&vcpu)?;
    // The pages just written are not the guest's doing: start a clean log.
    vm.dirty_log().take_host_dirty();
    Ok(Received {
        vm,
        config,
        header,
        state: MachineState {
            exits,
            digests,
            events,
            vcpu,
            device,
            net,
            blk,
            digest,
        },
        stats,
        disk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StateHeader {
        StateHeader {
            image_id: 0x1234_5678_9abc_def0,
            mem_size: 16 << 20,
            vm_flags: 1,
            guest_arg: 7,
        }
    }

    #[test]
    fn header_and_chunks_round_trip() {
        let mut out = StateWriter::new(Vec::new(), &header()).expect("header");
        out.memory(3, 0x20_0000, &vec![0xab; 3 * 4096])
            .expect("memory");
        out.round_end(3, 3).expect("round");
        let bytes = out.finish().expect("finish");
        assert_eq!(bytes.len(), HEADER_LEN + 16 + 8 + 3 * 4096 + 2 * (16 + 16));
        let mut reader = StateReader::new(&bytes[..]).expect("reader");
        assert_eq!(*reader.header(), header());
        let memory = reader.next_chunk().expect("memory chunk");
        assert_eq!(memory.kind, ChunkKind::Memory);
        assert_eq!(memory.flags, 3);
        assert_eq!(le_u64(&memory.payload), 0x20_0000);
        assert_eq!(reader.next_chunk().expect("round").kind, ChunkKind::Round);
        let end = reader.next_chunk().expect("end");
        assert_eq!((end.kind, end.index), (ChunkKind::End, 2));
        assert!(matches!(
            reader.next_chunk(),
            Err(StateError::Truncated { .. })
        ));
    }

    #[test]
    fn large_runs_split_into_chunks_of_one_mib() {
        let mut out = StateWriter::new(Vec::new(), &header()).expect("header");
        out.memory(0, 0, &vec![1; MAX_MEMORY_RUN + 4096])
            .expect("memory");
        assert_eq!(out.pages_written(), 257);
        let bytes = out.finish().expect("finish");
        let mut reader = StateReader::new(&bytes[..]).expect("reader");
        assert_eq!(
            reader.next_chunk().expect("first").payload.len(),
            MAX_CHUNK_PAYLOAD
        );
        let second = reader.next_chunk().expect("second");
        assert_eq!(le_u64(&second.payload), MAX_MEMORY_RUN as u64);
        assert_eq!(second.payload.len(), 8 + 4096);
    }

    #[test]
    fn an_unknown_chunk_kind_with_a_good_checksum_is_refused() {
        let mut bytes = StateWriter::new(Vec::new(), &header())
            .expect("header")
            .finish()
            .expect("finish");
        // Turn the end chunk into kind 0x99 and fix its checksum.
        bytes[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&0x99u16.to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&bytes[HEADER_LEN..HEADER_LEN + 12]),
            &bytes[HEADER_LEN + 16..],
        );
        bytes[HEADER_LEN + 12..HEADER_LEN + 16].copy_from_slice(&crc.to_le_bytes());
        let mut reader = StateReader::new(&bytes[..]).expect("reader");
        let error = reader.next_chunk().expect_err("unknown kind");
        assert!(error.to_string().contains("unknown kind 0x99"), "{error}");
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let mut bytes = StateWriter::new(Vec::new(), &header())
            .expect("header")
            .finish()
            .expect("finish");
        bytes[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut reader = StateReader::new(&bytes[..]).expect("reader");
        let error = reader.next_chunk().expect_err("huge");
        assert!(
            matches!(error, StateError::Corrupt { index: 0, .. }),
            "{error}"
        );
    }
}
