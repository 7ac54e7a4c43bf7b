//! A polling virtio-blk driver (virtio 1.x over MMIO, one split queue),
//! one request at a time.
//!
//! A request is a three-descriptor chain (header, data, status; flush has
//! no data) offered at avail slot `n`, one `QueueNotify` exit, then
//! InterruptStatus reads (one exit each) until the device returns it in the
//! used ring: finished requests enter the used ring only during those polls
//! (see `vmm::block`). Guest virtual addresses are guest-physical (identity
//! map), so data buffers are the caller's own.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, compiler_fence};

use guest_abi::BLK_BASE;

const QUEUE_SIZE: usize = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Bytes per sector.
pub const SECTOR: usize = 512;
/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(4096))]
struct Queue {
    desc: [Descriptor; QUEUE_SIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QUEUE_SIZE],
    used_event: u16,
    _pad: [u8; 2],
    used_flags: u16,
    used_idx: u16,
    used_ring: [[u32; 2]; QUEUE_SIZE],
    avail_event: u16,
    header: [u8; 16],
    status: u8,
}

static mut QUEUE: Queue = Queue {
    desc: [Descriptor {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QUEUE_SIZE],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; QUEUE_SIZE],
    used_event: 0,
    _pad: [0; 2],
    used_flags: 0,
    used_idx: 0,
    used_ring: [[0; 2]; QUEUE_SIZE],
    avail_event: 0,
    header: [0; 16],
    status: 0,
};

fn reg_read(offset: u64) -> u32 {
    // SAFETY: the virtio-blk window is identity-mapped and backed by no
    // memory: the access exits to the VMM, which emulates the register.
    unsafe { read_volatile((BLK_BASE + offset) as *const u32) }
}

fn reg_write(offset: u64, value: u32) {
    // SAFETY: as in `reg_read`.
    unsafe { write_volatile((BLK_BASE + offset) as *mut u32, value) }
}

/// Why a disk operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// No virtio-blk device at BLK_BASE.
    NoDevice(u32),
    /// The device refused our features.
    FeaturesRefused,
    /// The device answered with this virtio status (1 IOERR, 2 UNSUPP).
    Status(u8),
    /// The buffer is not a whole number of sectors.
    BadLength(usize),
}

/// The driver.
pub struct BlkDevice {
    queue: &'static mut Queue,
    last_used: u16,
    /// Capacity in sectors.
    pub sectors: u64,
    /// The device is read-only.
    pub read_only: bool,
    /// Poll exits taken.
    pub polls: u64,
}

impl BlkDevice {
    /// Initialises the device. Call once.
    pub fn init() -> Result<Self, BlkError> {
        let magic = reg_read(0x000);
        if magic != 0x7472_6976 || reg_read(0x008) != 2 {
            return Err(BlkError::NoDevice(magic));
        }
        reg_write(0x070, 0);
        reg_write(0x070, 1 | 2);
        reg_write(0x014, 0);
        let features = reg_read(0x010);
        let read_only = features & (1 << 5) != 0;
        reg_write(0x024, 1);
        reg_write(0x020, 1); // VIRTIO_F_VERSION_1
        reg_write(0x024, 0);
        reg_write(0x020, (1 << 9) | (features & (1 << 5))); // FLUSH (+ RO)
        reg_write(0x070, 1 | 2 | 8);
        if reg_read(0x070) & 8 == 0 {
            return Err(BlkError::FeaturesRefused);
        }
        // SAFETY: init runs once (single vCPU), so this is the only
        // reference ever made to the queue static.
        let queue = unsafe { &mut *core::ptr::addr_of_mut!(QUEUE) };
        reg_write(0x030, 0);
        reg_write(0x038, QUEUE_SIZE as u32);
        let desc = queue.desc.as_ptr() as u64;
        let avail = &queue.avail_flags as *const u16 as u64;
        let used = &queue.used_flags as *const u16 as u64;
        reg_write(0x080, desc as u32);
        reg_write(0x084, (desc >> 32) as u32);
        reg_write(0x090, avail as u32);
        reg_write(0x094, (avail >> 32) as u32);
        reg_write(0x0a0, used as u32);
        reg_write(0x0a4, (used >> 32) as u32);
        reg_write(0x044, 1);
        reg_write(0x070, 1 | 2 | 8 | 4);
        let sectors = u64::from(reg_read(0x100)) | (u64::from(reg_read(0x104)) << 32);
        Ok(Self {
            queue,
            last_used: 0,
            sectors,
            read_only,
            polls: 0,
        })
    }

    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(u64, usize, bool)>,
    ) -> Result<usize, BlkError> {
        let queue = &mut *self.queue;
        queue.header[..4].copy_from_slice(&kind.to_le_bytes());
        queue.header[4..8].fill(0);
        queue.header[8..].copy_from_slice(&sector.to_le_bytes());
        queue.status = 0xff;
        let status_index = if data.is_some() { 2 } else { 1 };
        queue.desc[0] = Descriptor {
            addr: queue.header.as_ptr() as u64,
            len: 16,
            flags: F_NEXT,
            next: 1,
        };
        if let Some((addr, len, device_writes)) = data {
            queue.desc[1] = Descriptor {
                addr,
                len: len as u32,
                flags: F_NEXT | if device_writes { F_WRITE } else { 0 },
                next: 2,
            };
        }
        queue.desc[status_index] = Descriptor {
            addr: &queue.status as *const u8 as u64,
            len: 1,
            flags: F_WRITE,
            next: 0,
        };
        let slot = usize::from(queue.avail_idx) % QUEUE_SIZE;
        queue.avail_ring[slot] = 0;
        compiler_fence(Ordering::SeqCst);
        // SAFETY: a valid, aligned field of a live struct; volatile so the
        // store happens before the notify exit.
        unsafe { write_volatile(&mut queue.avail_idx, queue.avail_idx.wrapping_add(1)) };
        reg_write(0x050, 0);
        loop {
            // SAFETY: a valid field, written by the device during exits.
            let used = unsafe { read_volatile(&queue.used_idx) };
            if used != self.last_used {
                break;
            }
            reg_read(0x060);
            self.polls += 1;
        }
        compiler_fence(Ordering::SeqCst);
        let element = queue.used_ring[usize::from(self.last_used) % QUEUE_SIZE];
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: as above.
        let status = unsafe { read_volatile(&queue.status) };
        if status != 0 {
            return Err(BlkError::Status(status));
        }
        Ok((element[1] as usize).saturating_sub(1))
    }

    /// Reads `buf.len()` bytes (whole sectors) from `sector`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        if buf.is_empty() || buf.len() % SECTOR != 0 {
            return Err(BlkError::BadLength(buf.len()));
        }
        self.request(
            T_IN,
            sector,
            Some((buf.as_mut_ptr() as u64, buf.len(), true)),
        )?;
        compiler_fence(Ordering::SeqCst);
        Ok(())
    }

    /// Writes `buf` (whole sectors) at `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        if buf.is_empty() || buf.len() % SECTOR != 0 {
            return Err(BlkError::BadLength(buf.len()));
        }
        self.request(T_OUT, sector, Some((buf.as_ptr() as u64, buf.len(), false)))
            .map(|_| ())
    }

    /// Makes every write before it durable on the host.
    pub fn flush(&mut self) -> Result<(), BlkError> {
        self.request(T_FLUSH, 0, None).map(|_| ())
    }

    /// The disk's 20-byte serial.
    pub fn id(&mut self) -> Result<[u8; 20], BlkError> {
        let mut id = [0u8; 20];
        self.request(T_GET_ID, 0, Some((id.as_mut_ptr() as u64, id.len(), true)))?;
        compiler_fence(Ordering::SeqCst);
        Ok(id)
    }
}
