//! The state stream a new backup receives from a primary (`vmm::state`):
//! the header and every chunk through `StateReader`, each chunk's payload
//! through `parse_chunk` (memory runs, rounds, vCPU, paravirtual and
//! virtio-net device, machine record, end), exactly what `vmm::receive`
//! does before it touches the new VM. Bit 0 of the first byte fixes the
//! header's and every chunk's crc32c and index up; the other bits pick the
//! read size.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::MockStream;
use vmm::VmConfig;
use vmm::state::{CHUNK_HEADER_LEN, HEADER_LEN, StateReader, parse_chunk};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 && bytes.len() >= HEADER_LEN {
        let crc = crc32c::crc32c(&bytes[..48]);
        bytes[48..52].copy_from_slice(&crc.to_le_bytes());
        let (mut at, mut index) = (HEADER_LEN, 0u32);
        while bytes.len() - at >= CHUNK_HEADER_LEN {
            let len =
                u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
            bytes[at + 8..at + 12].copy_from_slice(&index.to_le_bytes());
            let end = (at + CHUNK_HEADER_LEN)
                .saturating_add(len as usize)
                .min(bytes.len());
            let crc = crc32c::crc32c_append(
                crc32c::crc32c(&bytes[at..at + 12]),
                &bytes[at + CHUNK_HEADER_LEN..end],
            );
            bytes[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
            at = end;
            index += 1;
        }
    }
    let Ok(mut reader) = StateReader::new(MockStream::new(&bytes, usize::from(mode >> 1))) else {
        return;
    };
    let header = *reader.header();
    let config = VmConfig::with_flags(header.mem_size, header.vm_flags);
    while let Ok(chunk) = reader.next_chunk() {
        match parse_chunk(&chunk, &header, &config) {
            Ok(vmm::state::ChunkRecord::End) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }
});
