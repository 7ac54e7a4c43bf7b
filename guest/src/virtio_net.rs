//! A polling virtio-net driver (virtio 1.x over MMIO, split queues) and its
//! smoltcp `Device`.
//!
//! There are no interrupts: frames arrive in the RX used ring during a `WAIT`
//! exit, and sent buffers come back in the TX used ring during the
//! `QueueNotify` exit that hands them over. Every register access is an
//! exit, so the data path touches registers only to notify a batch of TX
//! frames.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, compiler_fence};

use guest_abi::NET_BASE;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Descriptors per queue.
const QUEUE_SIZE: usize = 256;
/// Bytes per buffer: header plus a full Ethernet frame, rounded up.
const BUFFER_SIZE: usize = 2048;
const NET_HDR_LEN: usize = 12;
const DESC_F_WRITE: u16 = 2;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(2))]
struct AvailRing {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
struct UsedRing {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE],
    avail_event: u16,
}

/// One split virtqueue with its buffers, all in guest memory.
#[repr(C, align(4096))]
struct Virtqueue {
    desc: [Descriptor; QUEUE_SIZE],
    avail: AvailRing,
    used: UsedRing,
    buffers: [[u8; BUFFER_SIZE]; QUEUE_SIZE],
    /// Next used-ring index to look at.
    last_used: u16,
}

impl Virtqueue {
    const fn new() -> Self {
        Self {
            desc: [Descriptor {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }; QUEUE_SIZE],
            avail: AvailRing {
                flags: 0,
                idx: 0,
                ring: [0; QUEUE_SIZE],
                used_event: 0,
            },
            used: UsedRing {
                flags: 0,
                idx: 0,
                ring: [UsedElem { id: 0, len: 0 }; QUEUE_SIZE],
                avail_event: 0,
            },
            buffers: [[0; BUFFER_SIZE]; QUEUE_SIZE],
            last_used: 0,
        }
    }

    fn offer(&mut self, id: u16, len: u32, flags: u16) {
        let index = usize::from(id);
        self.desc[index] = Descriptor {
            addr: self.buffers[index].as_ptr() as u64,
            len,
            flags,
            next: 0,
        };
        let slot = usize::from(self.avail.idx) % QUEUE_SIZE;
        self.avail.ring[slot] = id;
        compiler_fence(Ordering::SeqCst);
        // The device reads `idx` at an exit; volatile so the store happens.
        // SAFETY: a valid, aligned field of a live struct.
        unsafe { write_volatile(&mut self.avail.idx, self.avail.idx.wrapping_add(1)) };
    }

    /// The next used element, if the device has returned one.
    fn take_used(&mut self) -> Option<UsedElem> {
        // SAFETY: a valid, aligned field of a live struct, written by the
        // device during an exit; volatile so it is re-read every time.
        let used_idx = unsafe { read_volatile(&self.used.idx) };
        if used_idx == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let element = self.used.ring[usize::from(self.last_used) % QUEUE_SIZE];
        self.last_used = self.last_used.wrapping_add(1);
        Some(element)
    }
}

fn reg_read(offset: u64) -> u32 {
    // SAFETY: the virtio-net window is identity-mapped and backed by no
    // memory: the access exits to the VMM, which emulates the register.
    unsafe { read_volatile((NET_BASE + offset) as *const u32) }
}

fn reg_write(offset: u64, value: u32) {
    // SAFETY: as in `reg_read`.
    unsafe { write_volatile((NET_BASE + offset) as *mut u32, value) }
}

/// Why the device could not be brought up.
#[derive(Debug)]
pub enum NetInitError {
    /// No virtio-net device at NET_BASE.
    NoDevice(u32),
    /// The device refused our features.
    FeaturesRefused,
}

/// The receive side: frames arrive in its used ring during `WAIT` exits.
pub struct RxHalf {
    queue: &'static mut Virtqueue,
    /// Frames received.
    pub frames: u64,
}

/// The transmit side.
pub struct TxHalf {
    queue: &'static mut Virtqueue,
    /// TX descriptors not in flight.
    free: [u16; QUEUE_SIZE],
    free_count: usize,
    /// Frames queued since the last notify.
    pending: usize,
    /// Frames sent.
    pub frames: u64,
    /// Notify exits taken.
    pub notifies: u64,
}

impl TxHalf {
    /// True if frames were queued since the last [`Self::flush`].
    pub fn has_pending(&self) -> bool {
        self.pending > 0
    }

    /// Hands queued frames to the device (one exit) and reclaims the
    /// buffers it returns during that exit.
    pub fn flush(&mut self) {
        if self.pending > 0 {
            reg_write(0x050, 1);
            self.pending = 0;
            self.notifies += 1;
        }
        while let Some(used) = self.queue.take_used() {
            self.free[self.free_count] = used.id as u16;
            self.free_count += 1;
        }
    }
}

/// The driver and smoltcp device.
pub struct NetDevice {
    /// Receive side.
    pub rx: RxHalf,
    /// Transmit side.
    pub tx: TxHalf,
    mac: [u8; 6],
}

static mut RX_QUEUE: Virtqueue = Virtqueue::new();
static mut TX_QUEUE: Virtqueue = Virtqueue::new();

impl NetDevice {
    /// Initialises the device. Call once.
    pub fn init() -> Result<Self, NetInitError> {
        let magic = reg_read(0x000);
        if magic != 0x7472_6976 || reg_read(0x008) != 1 {
            return Err(NetInitError::NoDevice(magic));
        }
        reg_write(0x070, 0); // reset
        reg_write(0x070, 1 | 2); // ACKNOWLEDGE | DRIVER
        reg_write(0x024, 1);
        reg_write(0x020, 1); // VIRTIO_F_VERSION_1 (bit 32)
        reg_write(0x024, 0);
        reg_write(0x020, 1 << 5); // VIRTIO_NET_F_MAC
        reg_write(0x070, 1 | 2 | 8); // FEATURES_OK
        if reg_read(0x070) & 8 == 0 {
            return Err(NetInitError::FeaturesRefused);
        }
        // SAFETY: init runs once (single vCPU, called from main), so these
        // are the only references ever made to the queue statics.
        let (rx, tx) = unsafe {
            (
                &mut *core::ptr::addr_of_mut!(RX_QUEUE),
                &mut *core::ptr::addr_of_mut!(TX_QUEUE),
            )
        };
        for (index, queue) in [(0u32, &*rx), (1, &*tx)] {
            reg_write(0x030, index);
            reg_write(0x038, QUEUE_SIZE as u32);
            let desc = queue.desc.as_ptr() as u64;
            let avail = &queue.avail as *const AvailRing as u64;
            let used = &queue.used as *const UsedRing as u64;
            reg_write(0x080, desc as u32);
            reg_write(0x084, (desc >> 32) as u32);
            reg_write(0x090, avail as u32);
            reg_write(0x094, (avail >> 32) as u32);
            reg_write(0x0a0, used as u32);
            reg_write(0x0a4, (used >> 32) as u32);
            reg_write(0x044, 1);
        }
        let low = reg_read(0x100).to_le_bytes();
        let high = reg_read(0x104).to_le_bytes();
        let mac = [low[0], low[1], low[2], low[3], high[0], high[1]];
        for id in 0..QUEUE_SIZE as u16 {
            rx.offer(id, BUFFER_SIZE as u32, DESC_F_WRITE);
        }
        let mut free = [0u16; QUEUE_SIZE];
        for (index, slot) in free.iter_mut().enumerate() {
            *slot = index as u16;
        }
        reg_write(0x070, 1 | 2 | 8 | 4); // DRIVER_OK
        Ok(Self {
            rx: RxHalf {
                queue: rx,
                frames: 0,
            },
            tx: TxHalf {
                queue: tx,
                free,
                free_count: QUEUE_SIZE,
                pending: 0,
                frames: 0,
                notifies: 0,
            },
            mac,
        })
    }

    /// The device's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

/// Receives one frame.
pub struct RxToken<'a> {
    rx: &'a mut RxHalf,
    id: u16,
    len: usize,
}

/// Sends one frame.
pub struct TxToken<'a> {
    tx: &'a mut TxHalf,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let index = usize::from(self.id) % QUEUE_SIZE;
        let end = self.len.clamp(NET_HDR_LEN, BUFFER_SIZE);
        let result = f(&self.rx.queue.buffers[index][NET_HDR_LEN..end]);
        self.rx
            .queue
            .offer(index as u16, BUFFER_SIZE as u32, DESC_F_WRITE);
        result
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let tx = self.tx;
        if tx.free_count == 0 {
            tx.flush();
        }
        let len = len.min(BUFFER_SIZE - NET_HDR_LEN);
        if tx.free_count == 0 {
            // Cannot happen: the device returns TX buffers during the notify
            // exit. Keep smoltcp's contract with a scratch buffer.
            let mut scratch = [0u8; BUFFER_SIZE];
            return f(&mut scratch[..len]);
        }
        tx.free_count -= 1;
        let id = tx.free[tx.free_count];
        let buffer = &mut tx.queue.buffers[usize::from(id)];
        buffer[..NET_HDR_LEN].fill(0);
        let result = f(&mut buffer[NET_HDR_LEN..NET_HDR_LEN + len]);
        tx.queue.offer(id, (NET_HDR_LEN + len) as u32, 0);
        tx.pending += 1;
        tx.frames += 1;
        if tx.pending >= QUEUE_SIZE / 2 {
            tx.flush();
        }
        result
    }
}

impl phy::Device for NetDevice {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let used = self.rx.queue.take_used()?;
        self.rx.frames += 1;
        Some((
            RxToken {
                rx: &mut self.rx,
                id: used.id as u16,
                len: used.len as usize,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        capabilities.max_transmission_unit = 1514;
        capabilities.max_burst_size = Some(QUEUE_SIZE / 2);
        capabilities
    }
}
