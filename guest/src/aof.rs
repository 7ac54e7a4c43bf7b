//! The Redis store's append-only file on the virtio-blk disk.
//!
//! The disk holds records back to back from sector 0, each
//! `u32 len | u32 check | len bytes` (little-endian; `check` is an FNV-1a
//! hash of the bytes folded to 32 bits), then zeros: loading stops at the
//! first record whose length is 0 or whose check fails (a torn last
//! append, never acknowledged). An append rewrites the partial last
//! sector with the new bytes after the old, writes the sectors that
//! follow, and flushes: the replies it covers leave only after that
//! (`appendfsync always`).

use alloc::vec;
use alloc::vec::Vec;

use crate::virtio_blk::{BlkDevice, BlkError, SECTOR};

const CHUNK: usize = 64 << 10;

fn check(bytes: &[u8]) -> u32 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in bytes {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
    }
    (hash ^ (hash >> 32)) as u32
}

/// The append-only file.
pub struct Aof {
    disk: BlkDevice,
    /// Bytes of records on the disk.
    end: u64,
    /// The sector holding `end` (its bytes before `end`).
    tail: [u8; SECTOR],
    /// Appends that failed (the replies still go: logged on the console).
    pub errors: u64,
    /// Bytes appended since boot.
    pub appended: u64,
}

impl Aof {
    /// Opens the disk's append-only file and returns it with every
    /// record's bytes, in order.
    pub fn open(mut disk: BlkDevice) -> Result<(Self, Vec<Vec<u8>>), BlkError> {
        let capacity = disk.sectors * SECTOR as u64;
        let mut records = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        let mut read_to = 0u64;
        let mut at = 0usize;
        let end = loop {
            // Make sure the next header (and then its body) is in `data`.
            let need = |data: &Vec<u8>, at: usize, more: usize| data.len() < at + more;
            while need(&data, at, 8) && read_to < capacity {
                read_to = read_more(&mut disk, &mut data, read_to, capacity)?;
            }
            if need(&data, at, 8) {
                break at as u64;
            }
            let len =
                u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
            let sum = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
            if len == 0 {
                break at as u64;
            }
            while need(&data, at, 8 + len) && read_to < capacity {
                read_to = read_more(&mut disk, &mut data, read_to, capacity)?;
            }
            if need(&data, at, 8 + len) || check(&data[at + 8..at + 8 + len]) != sum {
                break at as u64;
            }
            records.push(data[at + 8..at + 8 + len].to_vec());
            at += 8 + len;
        };
        let mut tail = [0u8; SECTOR];
        let start = (end as usize / SECTOR) * SECTOR;
        let used = end as usize - start;
        tail[..used].copy_from_slice(&data[start..start + used]);
        Ok((
            Self {
                disk,
                end,
                tail,
                errors: 0,
                appended: 0,
            },
            records,
        ))
    }

    /// Bytes of records on the disk.
    pub fn len(&self) -> u64 {
        self.end
    }

    /// True if no record was ever appended.
    pub fn is_empty(&self) -> bool {
        self.end == 0
    }

    /// Appends one record holding `bytes` and makes it durable.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), BlkError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let in_tail = self.end as usize % SECTOR;
        let mut buf = Vec::with_capacity(in_tail + 8 + bytes.len() + SECTOR);
        buf.extend_from_slice(&self.tail[..in_tail]);
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(&check(bytes).to_le_bytes());
        buf.extend_from_slice(bytes);
        let new_end = self.end + 8 + bytes.len() as u64;
        if new_end + 8 > self.disk.sectors * SECTOR as u64 {
            self.errors += 1;
            return Err(BlkError::Status(1));
        }
        let padded = buf.len().div_ceil(SECTOR) * SECTOR;
        buf.resize(padded, 0);
        let first = self.end / SECTOR as u64;
        for (index, chunk) in buf.chunks(CHUNK).enumerate() {
            self.disk
                .write(first + (index * CHUNK / SECTOR) as u64, chunk)
                .inspect_err(|_| self.errors += 1)?;
        }
        self.disk.flush().inspect_err(|_| self.errors += 1)?;
        let tail_start = (new_end as usize / SECTOR) * SECTOR - first as usize * SECTOR;
        let used = new_end as usize % SECTOR;
        self.tail = [0; SECTOR];
        self.tail[..used].copy_from_slice(&buf[tail_start..tail_start + used]);
        self.end = new_end;
        self.appended += bytes.len() as u64;
        Ok(())
    }
}

fn read_more(
    disk: &mut BlkDevice,
    data: &mut Vec<u8>,
    from: u64,
    capacity: u64,
) -> Result<u64, BlkError> {
    let len = (CHUNK as u64).min(capacity - from) as usize;
    let mut chunk = vec![0u8; len];
    disk.read(from / SECTOR as u64, &mut chunk)?;
    data.extend_from_slice(&chunk);
    Ok(from + len as u64)
}
