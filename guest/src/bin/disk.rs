//! Exercises the virtio-blk disk: the disk-replay workload.
//!
//! Sector 0 holds a boot record ("LKSTDISK", then a u64 boot count): each
//! run reads it, counts one more boot, writes it back and flushes, so a
//! second run on the same image proves the first one's writes were kept.
//! Then `arg` rounds (default 64) each write 8 sectors of data derived from
//! 8 random bytes (a logged event) at a random place, read them back and
//! compare, and read a random earlier place (so read data of every kind is
//! checked in replay). Finally it checks that a read beyond the end of the
//! disk gets an I/O error. Prints `disk: boot N ...`; exit code 0 if every
//! check passed.
#![no_std]
#![no_main]

lockstep_guest::entry!(main);

use lockstep_guest::pv;
use lockstep_guest::virtio_blk::{BlkDevice, BlkError, SECTOR};

const MAGIC: &[u8; 8] = b"LKSTDISK";
const CHUNK: usize = 8 * SECTOR;

static mut WRITE_BUF: [u8; CHUNK] = [0; CHUNK];
static mut READ_BUF: [u8; CHUNK] = [0; CHUNK];

fn main() -> u64 {
    let rounds = match pv::arg() {
        0 => 64,
        n => n,
    };
    let mut disk = match BlkDevice::init() {
        Ok(disk) => disk,
        Err(error) => {
            lockstep_guest::println!("disk: no disk: {error:?}");
            return 2;
        }
    };
    let id = disk.id().unwrap_or([0; 20]);
    let mut boot = [0u8; SECTOR];
    if let Err(error) = disk.read(0, &mut boot) {
        lockstep_guest::println!("disk: reading the boot record failed: {error:?}");
        return 3;
    }
    let mut count = 0u64;
    if &boot[..8] == MAGIC {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&boot[8..16]);
        count = u64::from_le_bytes(raw);
    }
    count += 1;
    boot[..8].copy_from_slice(MAGIC);
    boot[8..16].copy_from_slice(&count.to_le_bytes());
    if disk.write(0, &boot).and_then(|()| disk.flush()).is_err() {
        lockstep_guest::println!("disk: writing the boot record failed");
        return 4;
    }
    // SAFETY: single-threaded guest; these statics are used only here.
    let (write_buf, read_buf) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(WRITE_BUF),
            &mut *core::ptr::addr_of_mut!(READ_BUF),
        )
    };
    let chunks = (disk.sectors - 8) / 8;
    let mut mismatches = 0u64;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..rounds {
        let random = pv::entropy();
        let sector = 8 + (random % chunks) * 8;
        for (i, byte) in write_buf.iter_mut().enumerate() {
            *byte = (random >> ((i % 8) * 8)) as u8 ^ (i / 8) as u8 ^ count as u8;
        }
        if disk.write(sector, write_buf).is_err() || disk.read(sector, read_buf).is_err() {
            mismatches += 1;
            continue;
        }
        if read_buf[..] != write_buf[..] {
            mismatches += 1;
        }
        let other = 8 + (random >> 32) % chunks * 8;
        if disk.read(other, read_buf).is_err() {
            mismatches += 1;
        }
        for byte in read_buf.iter() {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3);
        }
    }
    let beyond = disk.read(disk.sectors - 4, read_buf);
    if beyond != Err(BlkError::Status(1)) {
        lockstep_guest::println!("disk: a read beyond the end gave {beyond:?}, not an I/O error");
        mismatches += 1;
    }
    if disk.flush().is_err() {
        mismatches += 1;
    }
    let name = core::str::from_utf8(&id)
        .unwrap_or("?")
        .trim_end_matches('\0');
    lockstep_guest::println!(
        "disk: boot {count} id {name} sectors {} rounds {rounds} mismatches {mismatches} polls {} state {hash:016x}",
        disk.sectors,
        disk.polls
    );
    u64::from(mismatches != 0)
}
