//! The virtio-net device (`nic::virtio::VirtioNet`) driven by a hostile
//! guest: register reads and writes, descriptor chains posted through
//! `virtio-queue`'s mock driver (any address, length, flags and next
//! index), raw writes anywhere in guest memory (rings included), RX
//! delivery, TX collection, and save/restore of the device in the middle.
//! Bit 0 of the first byte starts from a driver that initialised the device
//! properly. A guest can make the device refuse or count a chain as
//! malformed, never panic or loop; a saved state must restore to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::Input;
use nic::virtio::{GuestRam, VirtioNet, VirtioNetState};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 0x20000;
const QSIZE: u16 = 16;

fn start(device: &mut VirtioNet, queues: [&MockSplitQueue<GuestRam>; 2]) {
    let _ = device.write(0x070, 4, 1 | 2);
    let _ = device.write(0x024, 4, 1);
    let _ = device.write(0x020, 4, 1);
    let _ = device.write(0x070, 4, 1 | 2 | 8);
    for (index, queue) in queues.into_iter().enumerate() {
        let _ = device.write(0x030, 4, index as u32);
        let _ = device.write(0x038, 4, u32::from(QSIZE));
        for (reg, addr) in [
            (0x080, queue.desc_table_addr().0),
            (0x090, queue.avail_addr().0),
            (0x0a0, queue.used_addr().0),
        ] {
            let _ = device.write(reg, 4, addr as u32);
            let _ = device.write(reg + 4, 4, (addr >> 32) as u32);
        }
        let _ = device.write(0x044, 4, 1);
    }
    let _ = device.write(0x070, 4, 1 | 2 | 8 | 4);
}

/// The driver posts one chain of up to four descriptors on `queue`.
fn post(queue: &MockSplitQueue<GuestRam>, input: &mut Input<'_>) {
    let count = 1 + input.u8() % 4;
    let head = u16::from(input.u8()) % QSIZE;
    let mut index = head;
    for _ in 0..count {
        let addr = 0x8000 + u64::from(input.u16()) * if input.u8() & 1 == 0 { 1 } else { 0x1_0000 };
        let len = u32::from(input.u16() % 4096);
        let flags = u16::from(input.u8() & 7);
        let next = u16::from(input.u8()) % QSIZE;
        let _ = queue.desc_table().store(
            index,
            RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
        );
        index = next;
    }
    let avail = queue.avail();
    let idx = avail.idx().load();
    if let Ok(slot) = avail.ring().ref_at(usize::from(idx % QSIZE)) {
        slot.store(head);
    }
    avail.idx().store(idx.wrapping_add(1));
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Ok(memory) = GuestRam::from_ranges(&[(GuestAddress(0), MEM as usize)]) else {
        return;
    };
    let rx = MockSplitQueue::create(&memory, GuestAddress(0x1000), QSIZE);
    let tx = MockSplitQueue::create(&memory, GuestAddress(0x4000), QSIZE);
    let Ok(mut device) = VirtioNet::new([2, 0, 0, 0, 0, 1]) else {
        return;
    };
    if input.u8() & 1 != 0 {
        start(&mut device, [&rx, &tx]);
    }
    let mut sent = Vec::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        match input.u8() % 8 {
            0 => {
                let offset = u64::from(input.u16() & 0x1ff);
                let len = [1, 2, 4, 8][usize::from(input.u8() & 3)];
                let _ = device.write(offset, len, input.u32());
            }
            1 => {
                let offset = u64::from(input.u16() & 0x1ff);
                let len = [1, 2, 4, 8][usize::from(input.u8() & 3)];
                let _ = device.read(offset, len);
            }
            2 => post(&rx, &mut input),
            3 => post(&tx, &mut input),
            4 => {
                let addr = u64::from(input.u16()) * 2 % MEM;
                let bytes = input.chunk();
                let _ = memory.write_slice(bytes, GuestAddress(addr));
            }
            5 => {
                let frames: Vec<Vec<u8>> = (0..input.u8() % 4)
                    .map(|_| vec![input.u8(); usize::from(input.u16() % 1600)])
                    .collect();
                let _ = device.rx_buffers(&memory);
                if let Ok(delivered) = device.deliver_rx(&memory, &frames) {
                    assert!(delivered <= frames.len());
                }
            }
            6 => {
                sent.clear();
                let _ = device.collect_tx(&memory, &mut sent);
                for frame in &sent {
                    assert!(frame.len() <= nic::virtio::MAX_FRAME_LEN);
                }
            }
            _ => {
                let saved = device.save();
                let bytes = saved.to_bytes();
                let parsed = VirtioNetState::from_bytes(&bytes);
                assert_eq!(
                    parsed.as_ref().ok(),
                    Some(&saved),
                    "saved state does not parse back"
                );
                match VirtioNet::restore(&saved) {
                    Ok(restored) => {
                        assert_eq!(restored.save(), saved, "restore changed the state");
                        device = restored;
                    }
                    Err(e) => panic!("a state the device saved does not restore: {e}"),
                }
            }
        }
    }
});
