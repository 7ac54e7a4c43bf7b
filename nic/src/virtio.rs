//! A virtio-net device (virtio 1.x) on the virtio-mmio transport, with split
//! virtqueues, driven by the guest in polling mode.
//!
//! # Determinism
//!
//! Everything this device does to guest memory happens on the vCPU thread
//! while the vCPU is stopped at an exit, and depends only on guest memory,
//! guest register writes and the frames it is handed:
//!
//! - **RX** ([`VirtioNet::deliver_rx`]): the frames come from the caller,
//!   which takes them from the TAP queue and logs them (primary) or from the
//!   log (backup), so both replicas write the same frames at the same exit.
//! - **TX** ([`VirtioNet::collect_tx`]): at the guest's `QueueNotify` exit,
//!   the frames are copied out of the TX queue and handed back to the caller,
//!   which tags them with the log position and puts them behind the output
//!   gate. The used ring is updated at that same exit.
//!
//! There are no interrupts: the driver polls its used rings after exits.
//!
//! # Register map (virtio-mmio, version 2; all accesses 32-bit)
//!
//! | offset | name | access |
//! |---|---|---|
//! | 0x000 | MagicValue ("virt") | R |
//! | 0x004 | Version (2) | R |
//! | 0x008 | DeviceID (1: net) | R |
//! | 0x00c | VendorID | R |
//! | 0x010 | DeviceFeatures (word selected by 0x014) | R |
//! | 0x014 | DeviceFeaturesSel | W |
//! | 0x020 | DriverFeatures (word selected by 0x024) | W |
//! | 0x024 | DriverFeaturesSel | W |
//! | 0x030 | QueueSel | W |
//! | 0x034 | QueueNumMax | R |
//! | 0x038 | QueueNum | W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify | W |
//! | 0x060 | InterruptStatus (always 0: no interrupts) | R |
//! | 0x064 | InterruptACK | W |
//! | 0x070 | Status | RW |
//! | 0x080/0x084 | QueueDescLow/High | W |
//! | 0x090/0x094 | QueueDriverLow/High (avail ring) | W |
//! | 0x0a0/0x0a4 | QueueDeviceLow/High (used ring) | W |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | config: MAC (6 bytes), status (u16) | R |
//!
//! Every frame in a queue buffer is preceded by the 12-byte
//! `virtio_net_hdr_v1` (all zero here: no offloads are offered).
//!
//! # Saved state ([`VirtioNetState`], for state transfer)
//!
//! [`VirtioNet::save`] and [`VirtioNet::restore`] move the whole device
//! (registers, negotiated features, both virtqueues' addresses and indices,
//! counters) between VMMs. The rings themselves live in guest memory, which
//! travels separately. [`VirtioNetState::to_bytes`] lays it out in
//! [`VIRTIO_NET_STATE_LEN`] little-endian bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | MAC address, then 2 zero bytes |
//! | 8 | 4 | status |
//! | 12 | 4 | DeviceFeaturesSel |
//! | 16 | 4 | DriverFeaturesSel |
//! | 20 | 4 | QueueSel |
//! | 24 | 8 | driver features |
//! | 32 | 32 | counters: rx frames, tx frames, rx dropped, malformed chains (u64 each) |
//! | 64 | 40 | RX queue, then at 104 the TX queue: max size, size, next avail, next used (u16 each), ready (u8), event idx (u8), 6 zero bytes, descriptor table, avail ring, used ring (u64 guest addresses) |
//!
//! Guest memory is [`GuestRam`]: its dirty bitmap records every write the
//! device makes (RX frames, used rings), which KVM's dirty-page log cannot
//! see, so that a state transfer copies those pages too.

use std::io::{Read, Write};

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;

use crate::NicError;

/// Size of `virtio_net_hdr_v1`, which precedes every frame in a buffer.
pub const NET_HDR_LEN: usize = 12;
/// Largest Ethernet frame accepted (no VLAN, no jumbo frames).
pub const MAX_FRAME_LEN: usize = 1514;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const DEVICE_ID_NET: u32 = 1;
const VENDOR_ID: u32 = 0x4c4b_5354; // "LKST"
/// VIRTIO_NET_F_MAC (bit 5) | VIRTIO_F_VERSION_1 (bit 32).
const DEVICE_FEATURES: u64 = (1 << 5) | (1 << 32);
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 128;

/// What a register write asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing beyond the register update.
    None,
    /// The driver notified the TX queue: call [`VirtioNet::collect_tx`].
    TxNotify,
    /// The driver notified the RX queue (buffers were added).
    RxNotify,
    /// The driver reset the device.
    Reset,
}

/// Counters of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames written into RX buffers.
    pub rx_frames: u64,
    /// Frames taken from TX buffers.
    pub tx_frames: u64,
    /// Frames dropped because no RX buffer was posted or it was too small.
    pub rx_dropped: u64,
    /// Descriptor chains the device could not use (bad addresses, wrong
    /// direction, oversized): returned to the driver with length 0.
    pub malformed_chains: u64,
}

/// Guest memory as the device sees it: an mmap whose dirty bitmap records
/// every write made through it (one bit per 4 KiB page).
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Bytes of [`VirtioNetState::to_bytes`].
pub const VIRTIO_NET_STATE_LEN: usize = 144;

/// One virtqueue's saved state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Next avail-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// VIRTIO_F_RING_EVENT_IDX (never offered: always false).
    pub event_idx: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the avail ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

/// The device's complete state (see the module docs for its bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetState {
    /// MAC address.
    pub mac: [u8; 6],
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// RX and TX queues.
    pub queues: [QueueSnapshot; 2],
    /// Counters.
    pub stats: NetStats,
}

impl VirtioNetState {
    /// The state as [`VIRTIO_NET_STATE_LEN`] bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VIRTIO_NET_STATE_LEN);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&[0, 0]);
        for word in [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.driver_features.to_le_bytes());
        for counter in [
            self.stats.rx_frames,
            self.stats.tx_frames,
            self.stats.rx_dropped,
            self.stats.malformed_chains,
        ] {
            out.extend_from_slice(&counter.to_le_bytes());
        }
        for queue in &self.queues {
            for half in [
                queue.max_size,
                queue.size,
                queue.next_avail,
                queue.next_used,
            ] {
                out.extend_from_slice(&half.to_le_bytes());
            }
            out.push(u8::from(queue.ready));
            out.push(u8::from(queue.event_idx));
            out.extend_from_slice(&[0; 6]);
            for address in [queue.desc_table, queue.avail_ring, queue.used_ring] {
                out.extend_from_slice(&address.to_le_bytes());
            }
        }
        out
    }

    /// Parses [`Self::to_bytes`]; refuses a wrong length or a flag byte
    /// other than 0 or 1 (the state is checksummed by its container, so
    /// this is a version or programming error, not line noise).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NicError> {
        if bytes.len() != VIRTIO_NET_STATE_LEN {
            return Err(NicError::State(format!(
                "{} bytes of virtio-net state, expected {VIRTIO_NET_STATE_LEN}",
                bytes.len()
            )));
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let flag = |at: usize| match bytes[at] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(NicError::State(format!(
                "virtio-net state byte {at} is {other}, not a flag (0 or 1)"
            ))),
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes[..6]);
        let queue = |base: usize| -> Result<QueueSnapshot, NicError> {
            Ok(QueueSnapshot {
                max_size: u16_at(base),
                size: u16_at(base + 2),
                next_avail: u16_at(base + 4),
                next_used: u16_at(base + 6),
                ready: flag(base + 8)?,
                event_idx: flag(base + 9)?,
                desc_table: u64_at(base + 16),
                avail_ring: u64_at(base + 24),
                used_ring: u64_at(base + 32),
            })
        };
        Ok(Self {
            mac,
            status: u32_at(8),
            device_features_sel: u32_at(12),
            driver_features_sel: u32_at(16),
            queue_sel: u32_at(20),
            driver_features: u64_at(24),
            stats: NetStats {
                rx_frames: u64_at(32),
                tx_frames: u64_at(40),
                rx_dropped: u64_at(48),
                malformed_chains: u64_at(56),
            },
            queues: [queue(64)?, queue(104)?],
        })
    }
}

/// The virtio-net device state.
pub struct VirtioNet {
    mac: [u8; 6],
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: [Queue; 2],
    stats: NetStats,
}

impl VirtioNet {
    /// A device with MAC address `mac`.
    pub fn new(mac: [u8; 6]) -> Result<Self, NicError> {
        let queue = || Queue::new(QUEUE_SIZE).map_err(NicError::queue("create a queue"));
        Ok(Self {
            mac,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: [queue()?, queue()?],
            stats: NetStats::default(),
        })
    }

    /// The device's complete state, for a state transfer.
    pub fn save(&self) -> VirtioNetState {
        let queue = |queue: &Queue| {
            let state = queue.state();
            QueueSnapshot {
                max_size: state.max_size,
                size: state.size,
                next_avail: state.next_avail,
                next_used: state.next_used,
                ready: state.ready,
                event_idx: state.event_idx_enabled,
                desc_table: state.desc_table,
                avail_ring: state.avail_ring,
                used_ring: state.used_ring,
            }
        };
        VirtioNetState {
            mac: self.mac,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: [queue(&self.queues[0]), queue(&self.queues[1])],
            stats: self.stats,
        }
    }

    /// Rebuilds a device from [`Self::save`]. Queue sizes and ring addresses
    /// are checked as a driver's writes would be.
    pub fn restore(state: &VirtioNetState) -> Result<Self, NicError> {
        let queue = |index: usize| -> Result<Queue, NicError> {
            let saved = state.queues[index];
            if saved.max_size != QUEUE_SIZE {
                return Err(NicError::State(format!(
                    "queue {index} has maximum size {}, this device offers {QUEUE_SIZE}",
                    saved.max_size
                )));
            }
            Queue::try_from(QueueState {
                max_size: saved.max_size,
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: saved.event_idx,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            })
            .map_err(NicError::queue(format!("restore queue {index}")))
        };
        Ok(Self {
            mac: state.mac,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queues: [queue(RX_QUEUE)?, queue(TX_QUEUE)?],
            stats: state.stats,
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// True once the driver has set DRIVER_OK and both queues are ready.
    pub fn is_running(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
            && self.status & STATUS_FAILED == 0
            && self.queues.iter().all(|queue| queue.ready())
    }

    /// Reads a register (`len` is 1, 2 or 4; config space allows byte reads).
    pub fn read(&self, offset: u64, len: usize) -> Result<u32, NicError> {
        if offset >= 0x100 {
            return self.read_config(offset - 0x100, len);
        }
        if len != 4 {
            return Err(NicError::Register(format!(
                "{len}-byte read of register {offset:#x}: virtio-mmio registers are 32-bit"
            )));
        }
        let queue = self.selected_queue();
        Ok(match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => DEVICE_ID_NET,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => DEVICE_FEATURES as u32,
                1 => (DEVICE_FEATURES >> 32) as u32,
                _ => 0,
            },
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => 0,
            0x070 => self.status,
            0x0fc => 0,
            other => {
                return Err(NicError::Register(format!(
                    "read of register {other:#x}, which is not readable"
                )));
            }
        })
    }

    fn read_config(&self, offset: u64, len: usize) -> Result<u32, NicError> {
        // Config space: MAC (6 bytes) then status (u16, bit 0: link up).
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6] = 1;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(len);
        if !matches!(len, 1 | 2 | 4) || end > config.len() {
            return Err(NicError::Register(format!(
                "{len}-byte read at config offset {offset:#x}, outside the 8-byte config space"
            )));
        }
        let mut value = [0u8; 4];
        value[..len].copy_from_slice(&config[start..end]);
        Ok(u32::from_le_bytes(value))
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn selected_queue_mut(&mut self, offset: u64) -> Result<&mut Queue, NicError> {
        let index = self.queue_sel;
        self.queues.get_mut(index as usize).ok_or_else(|| {
            NicError::Register(format!(
                "write to register {offset:#x} with queue {index} selected: there are 2 queues"
            ))
        })
    }

    /// Writes a register.
    pub fn write(&mut self, offset: u64, len: usize, value: u32) -> Result<WriteEffect, NicError> {
        if len != 4 {
            return Err(NicError::Register(format!(
                "{len}-byte write of register {offset:#x}: virtio-mmio registers are 32-bit"
            )));
        }
        let queue_setup_allowed = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_sel = value,
            0x024 => self.driver_features_sel = value,
            0x020 => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x030 => self.queue_sel = value,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if !queue_setup_allowed {
                    return Err(NicError::Register(format!(
                        "queue register {offset:#x} written after DRIVER_OK"
                    )));
                }
                let queue = self.selected_queue_mut(offset)?;
                match offset {
                    0x038 => {
                        let size = u16::try_from(value).unwrap_or(0);
                        if size == 0 || size > QUEUE_SIZE || !size.is_power_of_two() {
                            return Err(NicError::Register(format!(
                                "queue size {value}: must be a power of two up to {QUEUE_SIZE}"
                            )));
                        }
                        queue.set_size(size);
                    }
                    0x044 => queue.set_ready(value == 1),
                    0x080 => queue.set_desc_table_address(Some(value), None),
                    0x084 => queue.set_desc_table_address(None, Some(value)),
                    0x090 => queue.set_avail_ring_address(Some(value), None),
                    0x094 => queue.set_avail_ring_address(None, Some(value)),
                    0x0a0 => queue.set_used_ring_address(Some(value), None),
                    _ => queue.set_used_ring_address(None, Some(value)),
                }
            }
            0x050 => {
                return Ok(match value as usize {
                    TX_QUEUE => WriteEffect::TxNotify,
                    RX_QUEUE => WriteEffect::RxNotify,
                    other => {
                        return Err(NicError::Register(format!(
                            "notify of queue {other}: there are 2 queues"
                        )));
                    }
                });
            }
            0x064 => {}
            0x070 => {
                if value == 0 {
                    self.reset();
                    return Ok(WriteEffect::Reset);
                }
                if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
                    let unsupported = self.driver_features & !DEVICE_FEATURES;
                    if unsupported != 0 || self.driver_features & (1 << 32) == 0 {
                        // Refuse FEATURES_OK: the driver must see it unset.
                        self.status = value & !STATUS_FEATURES_OK;
                        return Ok(WriteEffect::None);
                    }
                }
                self.status = value;
            }
            other => {
                return Err(NicError::Register(format!(
                    "write of {value:#x} to register {other:#x}, which is not writable"
                )));
            }
        }
        Ok(WriteEffect::None)
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
    }

    /// How many RX buffers the driver has posted (an upper bound on the
    /// frames [`Self::deliver_rx`] can place now). Deterministic: read from
    /// guest memory.
    pub fn rx_buffers(&self, memory: &GuestRam) -> Result<usize, NicError> {
        if !self.is_running() {
            return Ok(0);
        }
        let queue = &self.queues[RX_QUEUE];
        let avail = queue
            .avail_idx(memory, std::sync::atomic::Ordering::Acquire)
            .map_err(NicError::queue("read the RX avail index"))?;
        Ok(usize::from(
            (avail - std::num::Wrapping(queue.next_avail())).0,
        ))
    }

    /// Writes `frames` into posted RX buffers, one frame per buffer, each
    /// behind a zeroed virtio-net header. Frames that find no buffer, or a
    /// buffer too small, are dropped (and counted). Returns frames delivered.
    pub fn deliver_rx(&mut self, memory: &GuestRam, frames: &[Vec<u8>]) -> Result<usize, NicError> {
        if !self.is_running() {
            self.stats.rx_dropped += frames.len() as u64;
            return Ok(0);
        }
        let mut delivered = 0;
        for frame in frames {
            let Some(chain) = self.queues[RX_QUEUE].pop_descriptor_chain(memory) else {
                self.stats.rx_dropped += 1;
                continue;
            };
            let head = chain.head_index();
            if is_cut_short(&chain) {
                self.stats.malformed_chains += 1;
                self.queues[RX_QUEUE]
                    .add_used(memory, head, 0)
                    .map_err(NicError::queue(format!("return RX buffer {head}")))?;
                self.stats.rx_dropped += 1;
                continue;
            }
            let written = match chain.writer(memory) {
                Ok(mut writer) if writer.available_bytes() >= NET_HDR_LEN + frame.len() => {
                    let ok = writer.write_all(&[0u8; NET_HDR_LEN]).is_ok()
                        && writer.write_all(frame).is_ok();
                    if ok {
                        Some(NET_HDR_LEN + frame.len())
                    } else {
                        None
                    }
                }
                Ok(_) => {
                    self.stats.rx_dropped += 1;
                    Some(0)
                }
                Err(_) => None,
            };
            let len = match written {
                Some(len) => len,
                None => {
                    self.stats.malformed_chains += 1;
                    0
                }
            };
            if len > 0 {
                delivered += 1;
                self.stats.rx_frames += 1;
            }
            self.queues[RX_QUEUE]
                .add_used(memory, head, len as u32)
                .map_err(NicError::queue(format!("return RX buffer {head}")))?;
        }
        Ok(delivered)
    }

    /// Takes every frame the driver has queued for transmission, returning
    /// the buffers to it. Malformed chains are returned with length 0 and
    /// counted, never transmitted.
    pub fn collect_tx(
        &mut self,
        memory: &GuestRam,
        frames: &mut Vec<Vec<u8>>,
    ) -> Result<(), NicError> {
        if !self.is_running() {
            return Ok(());
        }
        while let Some(chain) = self.queues[TX_QUEUE].pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let looped = is_cut_short(&chain);
            let frame = chain
                .reader(memory)
                .ok()
                .filter(|_| !looped)
                .and_then(|mut reader| {
                    let total = reader.available_bytes();
                    if !(NET_HDR_LEN..=NET_HDR_LEN + MAX_FRAME_LEN).contains(&total) {
                        return None;
                    }
                    let mut bytes = vec![0u8; total];
                    reader.read_exact(&mut bytes).ok()?;
                    Some(bytes.split_off(NET_HDR_LEN))
                });
            match frame {
                Some(frame) => {
                    self.stats.tx_frames += 1;
                    frames.push(frame);
                }
                None => self.stats.malformed_chains += 1,
            }
            self.queues[TX_QUEUE]
                .add_used(memory, head, 0)
                .map_err(NicError::queue(format!("return TX buffer {head}")))?;
        }
        Ok(())
    }
}

/// True if the chain was cut short by the queue's length limit: its last
/// descriptor still says another follows (a loop, or a chain longer than the
/// queue). virtio-queue stops following such a chain, so it cannot hang the
/// VMM; the device refuses it rather than use part of it.
fn is_cut_short<M>(chain: &virtio_queue::DescriptorChain<M>) -> bool
where
    M: Clone + std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    chain
        .clone()
        .last()
        .is_some_and(|descriptor| descriptor.has_next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    /// Drives the device through the driver's initialisation sequence with
    /// the mock queues' addresses.
    fn start(device: &mut VirtioNet, rx: &MockSplitQueue<GuestRam>, tx: &MockSplitQueue<GuestRam>) {
        assert_eq!(device.read(0x000, 4).expect("magic"), MAGIC);
        device.write(0x070, 4, 1 | 2).expect("ack+driver");
        device.write(0x024, 4, 1).expect("sel");
        device.write(0x020, 4, 1).expect("VERSION_1");
        device.write(0x070, 4, 1 | 2 | 8).expect("features ok");
        assert_ne!(device.read(0x070, 4).expect("status") & 8, 0);
        for (index, queue) in [(0u32, rx), (1, tx)] {
            device.write(0x030, 4, index).expect("sel");
            device.write(0x038, 4, 16).expect("size");
            let desc = queue.desc_table_addr().0;
            let avail = queue.avail_addr().0;
            let used = queue.used_addr().0;
            device.write(0x080, 4, desc as u32).expect("desc");
            device.write(0x084, 4, (desc >> 32) as u32).expect("desc");
            device.write(0x090, 4, avail as u32).expect("avail");
            device.write(0x094, 4, (avail >> 32) as u32).expect("avail");
            device.write(0x0a0, 4, used as u32).expect("used");
            device.write(0x0a4, 4, (used >> 32) as u32).expect("used");
            device.write(0x044, 4, 1).expect("ready");
        }
        device.write(0x070, 4, 1 | 2 | 8 | 4).expect("driver ok");
        assert!(device.is_running());
    }

    #[test]
    fn frames_round_trip_through_both_queues() {
        let memory = memory();
        let rx = MockSplitQueue::create(&memory, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&memory, GuestAddress(0x8000), 16);
        let mut device = VirtioNet::new([2, 0, 0, 0, 0, 1]).expect("device");
        start(&mut device, &rx, &tx);

        // The driver posts two RX buffers of 2 KiB.
        let buffers: Vec<RawDescriptor> = (0..2)
            .map(|i| RawDescriptor::from(Descriptor::new(0x20000 + i * 0x1000, 2048, F_WRITE, 0)))
            .collect();
        rx.build_multiple_desc_chains(&buffers).expect("rx chains");
        assert_eq!(device.rx_buffers(&memory).expect("count"), 2);
        let frames = vec![vec![0xaa; 60], vec![0xbb; 1514], vec![0xcc; 60]];
        assert_eq!(device.deliver_rx(&memory, &frames).expect("deliver"), 2);
        assert_eq!(
            device.stats().rx_dropped,
            1,
            "the third frame found no buffer"
        );
        let mut got = vec![0u8; 60];
        memory
            .read_slice(&mut got, GuestAddress(0x20000 + NET_HDR_LEN as u64))
            .expect("read");
        assert_eq!(got, vec![0xaa; 60]);

        // The driver queues one frame for transmission.
        let frame: Vec<u8> = (0..100u8).collect();
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(&frame);
        memory
            .write_slice(&bytes, GuestAddress(0x30000))
            .expect("write");
        tx.build_desc_chain(&[RawDescriptor::from(Descriptor::new(
            0x30000,
            bytes.len() as u32,
            0,
            0,
        ))])
        .expect("tx chain");
        let mut out = Vec::new();
        device.collect_tx(&memory, &mut out).expect("collect");
        assert_eq!(out, vec![frame]);
    }

    #[test]
    fn saved_state_round_trips_and_the_restored_device_carries_on() {
        let memory = memory();
        let rx = MockSplitQueue::create(&memory, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&memory, GuestAddress(0x8000), 16);
        let mut device = VirtioNet::new([2, 0, 0, 0, 0, 1]).expect("device");
        start(&mut device, &rx, &tx);
        let buffers: Vec<RawDescriptor> = (0..4)
            .map(|i| RawDescriptor::from(Descriptor::new(0x20000 + i * 0x1000, 2048, F_WRITE, 0)))
            .collect();
        rx.build_multiple_desc_chains(&buffers).expect("rx chains");
        assert_eq!(device.deliver_rx(&memory, &[vec![1; 60]]).expect("one"), 1);

        let saved = device.save();
        let bytes = saved.to_bytes();
        assert_eq!(bytes.len(), VIRTIO_NET_STATE_LEN);
        let parsed = VirtioNetState::from_bytes(&bytes).expect("parse");
        assert_eq!(parsed, saved);
        let mut restored = VirtioNet::restore(&parsed).expect("restore");
        assert_eq!(restored.save(), saved);
        assert!(restored.is_running());
        assert_eq!(restored.rx_buffers(&memory).expect("count"), 3);
        // Both continue identically from the same memory.
        let frames = [vec![2; 70], vec![3; 80]];
        let copy = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut all = vec![0u8; 1 << 20];
        memory.read_slice(&mut all, GuestAddress(0)).expect("read");
        copy.write_slice(&all, GuestAddress(0)).expect("write");
        assert_eq!(device.deliver_rx(&memory, &frames).expect("original"), 2);
        assert_eq!(restored.deliver_rx(&copy, &frames).expect("restored"), 2);
        assert_eq!(restored.save(), device.save());
        let mut other = vec![0u8; 1 << 20];
        memory.read_slice(&mut all, GuestAddress(0)).expect("read");
        copy.read_slice(&mut other, GuestAddress(0)).expect("read");
        assert!(all == other, "both wrote the same bytes");

        let mut bad = bytes.clone();
        bad[72] = 7;
        assert!(VirtioNetState::from_bytes(&bad).is_err(), "a flag of 7");
        assert!(VirtioNetState::from_bytes(&bytes[..100]).is_err(), "short");
        let mut odd = saved;
        odd.queues[0].size = 3;
        assert!(VirtioNet::restore(&odd).is_err(), "size 3 is no queue size");
    }

    #[test]
    fn malformed_chains_are_counted_not_transmitted() {
        let memory = memory();
        let rx = MockSplitQueue::create(&memory, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&memory, GuestAddress(0x8000), 16);
        let mut device = VirtioNet::new([2, 0, 0, 0, 0, 1]).expect("device");
        start(&mut device, &rx, &tx);
        // A buffer outside guest memory, and an oversized frame.
        tx.build_multiple_desc_chains(&[
            RawDescriptor::from(Descriptor::new(0x4000_0000, 100, 0, 0)),
            RawDescriptor::from(Descriptor::new(0x30000, 4000, 0, 0)),
        ])
        .expect("tx chains");
        let mut out = Vec::new();
        device
            .collect_tx(&memory, &mut out)
            .expect("collect survives bad chains");
        assert!(out.is_empty());
        assert_eq!(device.stats().malformed_chains, 2);
    }

    #[test]
    fn a_descriptor_loop_is_refused_not_followed_forever() {
        const F_NEXT: u16 = 1;
        let memory = memory();
        let rx = MockSplitQueue::create(&memory, GuestAddress(0x1000), 16);
        let tx = MockSplitQueue::create(&memory, GuestAddress(0x8000), 16);
        let mut device = VirtioNet::new([2, 0, 0, 0, 0, 1]).expect("device");
        start(&mut device, &rx, &tx);
        // Two descriptors pointing at each other: 0 -> 1 -> 0 -> ...
        let table = tx.desc_table();
        table
            .store(
                0,
                RawDescriptor::from(Descriptor::new(0x30000, 64, F_NEXT, 1)),
            )
            .expect("descriptor 0");
        table
            .store(
                1,
                RawDescriptor::from(Descriptor::new(0x30040, 64, F_NEXT, 0)),
            )
            .expect("descriptor 1");
        tx.avail().ring().ref_at(0).expect("avail ring").store(0);
        tx.avail().idx().store(1);
        let mut out = Vec::new();
        device
            .collect_tx(&memory, &mut out)
            .expect("a loop is the guest's error, not the VMM's");
        assert!(
            out.is_empty(),
            "nothing from a looping chain is transmitted"
        );
        assert_eq!(device.stats().malformed_chains, 1);
    }

    #[test]
    fn bad_register_accesses_are_refused() {
        let mut device = VirtioNet::new([2, 0, 0, 0, 0, 1]).expect("device");
        assert!(device.read(0x000, 8).is_err());
        assert!(device.read(0x0f0, 4).is_err());
        assert!(device.read(0x106, 4).is_err(), "past the config space");
        assert_eq!(device.read(0x100, 1).expect("mac byte"), 2);
        device.write(0x030, 4, 7).expect("select queue 7");
        let error = device.write(0x038, 4, 16).expect_err("no queue 7");
        assert!(error.to_string().contains("queue 7"), "{error}");
        device.write(0x030, 4, 0).expect("select queue 0");
        assert!(device.write(0x038, 4, 3).is_err(), "not a power of two");
        assert!(device.write(0x050, 4, 5).is_err(), "no queue 5");
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut device = VirtioNet::new([2, 0, 0, 0, 0, 1]).expect("device");
        device.write(0x070, 4, 1 | 2).expect("ack");
        device.write(0x070, 4, 1 | 2 | 8).expect("features ok");
        assert_eq!(
            device.read(0x070, 4).expect("status") & 8,
            0,
            "legacy drivers are refused"
        );
    }
}
