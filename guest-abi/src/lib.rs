//! The paravirtual ABI between the lockstep VMM and its guest programs.
//!
//! Shared by the VMM (std) and the guest (`#![no_std]`), so both sides agree
//! on every address and register by construction.
//!
//! # Guest-physical layout
//!
//! ```text
//! 0x0000_0000 ┌──────────────────────────┐
//!             │ (unused, null page)      │
//! 0x0000_1000 │ PML4                     │  page tables: identity map of the
//! 0x0000_2000 │ PDPT                     │  first 4 GiB with 2 MiB pages, U=1
//! 0x0000_3000 │ PD × 4                   │  at every level (the guest runs at CPL3)
//! 0x0000_7000 │ GDT (+ TSS descriptor)   │
//! 0x0000_7800 │ TSS                      │
//! 0x0000_8000 │ mailbox (one page)       │  arguments of mailbox operations
//! 0x0000_9000 │ stack ↓ (to 0x1f_fff8)   │
//! 0x0020_0000 │ guest ELF image, heap →  │  up to the configured memory size
//!        ...  └──────────────────────────┘
//! 0xD000_0000 ┌──────────────────────────┐
//!             │ paravirtual device (MMIO)│  no memory slot: every access exits
//!             └──────────────────────────┘
//! ```
//!
//! # The paravirtual device
//!
//! Every register is 8 bytes wide and every access is one VM exit (about
//! 31 µs on nested KVM), so operations that move data take their buffer from
//! the [`Mailbox`] and cost one exit per batch, never one per byte.
//!
//! | offset | access | name | effect | deterministic? |
//! |---|---|---|---|---|
//! | 0x00 | read  | `CLOCK`        | host monotonic time, ns | no: logged |
//! | 0x08 | read  | `ENTROPY`      | 8 random bytes | no: logged |
//! | 0x10 | read  | `ENTROPY_FILL` | fills `mailbox.buf[..len]` with random bytes, returns `len` | no: logged |
//! | 0x18 | read  | `INPUT`        | copies up to `len` input bytes to `buf`, returns the count or [`INPUT_EOF`] | no: logged |
//! | 0x20 | write | `CONSOLE`      | writes `buf[..len]` to the VMM's console | yes (an output) |
//! | 0x28 | read  | `ARG`          | the guest argument from the VM configuration | yes |
//! | 0x30 | read  | `MEM_SIZE`     | guest memory size in bytes | yes |
//! | 0x38 | write | `DONE`         | the guest finished; the value is its exit code | yes |
//! | 0x40 | read  | `WAIT`         | waits up to `mailbox.wait_ns` for network input, delivers received frames into the NIC's RX queue, returns the clock | no: frames and clock logged |
//!
//! # The network device
//!
//! A virtio-net device (virtio-mmio, version 2) sits at [`NET_BASE`]; see
//! `nic::virtio` for its registers. There are no interrupts: the guest polls
//! its used rings after `WAIT` (which is where received frames arrive) and
//! after notifying the TX queue (where sent buffers are returned).

#![no_std]

/// Guest-physical base of the paravirtual MMIO device.
pub const PV_BASE: u64 = 0xD000_0000;
/// Size of the paravirtual MMIO window.
pub const PV_SIZE: u64 = 0x1000;

/// Register offsets inside the paravirtual window.
pub mod reg {
    /// Read: host monotonic clock in nanoseconds (non-deterministic, logged).
    pub const CLOCK: u64 = 0x00;
    /// Read: 8 random bytes (non-deterministic, logged).
    pub const ENTROPY: u64 = 0x08;
    /// Read: fill the mailbox buffer with random bytes; returns the length.
    pub const ENTROPY_FILL: u64 = 0x10;
    /// Read: copy up to `len` bytes of the input stream into the mailbox
    /// buffer; returns the count, or [`super::INPUT_EOF`] at end of input.
    pub const INPUT: u64 = 0x18;
    /// Write: print the mailbox buffer on the VMM's console.
    pub const CONSOLE: u64 = 0x20;
    /// Read: the guest argument (part of the VM configuration).
    pub const ARG: u64 = 0x28;
    /// Read: guest memory size in bytes.
    pub const MEM_SIZE: u64 = 0x30;
    /// Write: the guest is done; the written value is its exit code.
    pub const DONE: u64 = 0x38;
    /// Read: wait up to `Mailbox::wait_ns` for network input, deliver the
    /// received frames into the NIC's RX queue, return the clock (ns).
    pub const WAIT: u64 = 0x40;
}

/// Guest-physical base of the virtio-net device (virtio-mmio).
pub const NET_BASE: u64 = 0xD000_1000;
/// Size of the virtio-net MMIO window.
pub const NET_SIZE: u64 = 0x1000;

/// Guest-physical base of the virtio-blk device (virtio-mmio), present when
/// the VM has a disk. See `vmm::block` for its registers and requests; the
/// guest polls completions by reading InterruptStatus (0x060), the one exit
/// at which finished requests reach its used ring.
pub const BLK_BASE: u64 = 0xD000_2000;
/// Size of the virtio-blk MMIO window.
pub const BLK_SIZE: u64 = 0x1000;

/// Value returned by the `INPUT` register when the input stream has ended.
pub const INPUT_EOF: u64 = u64::MAX;

/// Guest-physical address of the mailbox page.
pub const MAILBOX_GPA: u64 = 0x8000;
/// Largest buffer one mailbox operation may name (the VMM refuses more).
pub const MAILBOX_MAX_LEN: u64 = 1 << 20;

/// Arguments of a mailbox operation, at [`MAILBOX_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Mailbox {
    /// Guest-physical address of the buffer.
    pub buf: u64,
    /// Length of the buffer in bytes.
    pub len: u64,
    /// `WAIT`: longest time to wait for network input, in ns (0: just poll).
    pub wait_ns: u64,
}

/// Guest-physical address at which guest images are linked.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Initial stack pointer (the stack grows down towards the mailbox).
pub const STACK_TOP: u64 = IMAGE_BASE - 8;
/// Page-table root.
pub const PML4_GPA: u64 = 0x1000;
/// Page-directory-pointer table.
pub const PDPT_GPA: u64 = 0x2000;
/// First of four page directories (identity map of 4 GiB with 2 MiB pages).
pub const PD_GPA: u64 = 0x3000;
/// Global descriptor table.
pub const GDT_GPA: u64 = 0x7000;
/// Task-state segment.
pub const TSS_GPA: u64 = 0x7800;
/// Smallest guest memory the layout fits in (image and a little heap).
pub const MIN_MEM_SIZE: u64 = 4 << 20;

/// User code selector (GDT index 6, RPL 3): the same as the Linux host's,
/// because on PVM CPL3 guest code runs on the host's GDT.
pub const USER_CS: u16 = 0x33;
/// User data selector (GDT index 5, RPL 3), as on the Linux host.
pub const USER_DS: u16 = 0x2b;
/// Task register selector (GDT index 8).
pub const TSS_SELECTOR: u16 = 0x40;

/// The `net` guest's IPv4 address and prefix length from its argument: 0
/// means 10.77.0.2/24; otherwise bits 0..32 are the address and bits 32..40
/// the prefix length (24 if out of range).
pub fn net_address_from_arg(arg: u64) -> ([u8; 4], u8) {
    if arg == 0 {
        return ([10, 77, 0, 2], 24);
    }
    let address = (arg as u32).to_be_bytes();
    let prefix = ((arg >> 32) & 0xff) as u8;
    (
        address,
        if prefix == 0 || prefix > 32 {
            24
        } else {
            prefix
        },
    )
}
