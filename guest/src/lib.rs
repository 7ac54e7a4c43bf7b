//! Runtime for lockstep guest programs: entry point, paravirtual device
//! access, console, and the `mem*` functions a freestanding binary needs.
//!
//! A guest runs at CPL3 in 64-bit mode with no interrupt or exception
//! handlers: any fault ends the VM. It talks to the VMM only through the
//! paravirtual MMIO device described in [`guest_abi`]; each access is one
//! guest-initiated VM exit, the only points where anything non-deterministic
//! enters the guest. It must never execute RDTSC, RDTSCP, RDRAND or RDSEED
//! (the `rdtsc` guest does so on purpose, to prove replay catches it).

#![no_std]

extern crate alloc;

pub mod aof;
pub mod fold;
pub mod heap;
pub mod iperf;
pub mod json;
pub mod pv;
pub mod redis;
pub mod services;
pub mod virtio_blk;
pub mod virtio_net;

use core::fmt::{self, Write};

/// Defines the image entry point `_start`, which calls `$main` and reports its
/// return value as the guest's exit code.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        #[unsafe(link_section = ".text.entry")]
        pub extern "C" fn _start() -> ! {
            let code: u64 = $main();
            $crate::pv::done(code)
        }
    };
}

/// Prints to the VMM's console (one exit per call).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// A fixed buffer that collects one formatted message.
struct LineBuffer {
    bytes: [u8; 512],
    len: usize,
}

impl Write for LineBuffer {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        let take = text.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// Formats `args` and writes it to the console in one exit.
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut line = LineBuffer {
        bytes: [0; 512],
        len: 0,
    };
    let _ = line.write_fmt(args);
    pv::console(&line.bytes[..line.len]);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    print_fmt(format_args!("guest panic: {info}\n"));
    pv::done(101)
}

// The freestanding target has no libc: these are the memory primitives the
// compiler emits calls to. `rep movsb`/`rep stosb` cannot be turned back into
// calls to themselves by the optimizer, unlike a plain loop.

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes;
    // `rep movsb` copies exactly `n` bytes forwards (DF is clear by ABI).
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dest is below src or the
        // ranges do not overlap; validity is the caller's guarantee.
        unsafe { memcpy(dest, src, n) };
    } else if n > 0 {
        // SAFETY: overlapping with dest above src: copy backwards from the
        // last byte with DF set, then clear DF again as the ABI requires.
        unsafe {
            core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                options(nostack));
        }
    }
    dest
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _,
            in("al") value as u8, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and both ranges are valid for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
