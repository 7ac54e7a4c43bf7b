//! Access to the paravirtual device: each call is one MMIO exit.

use guest_abi::{INPUT_EOF, MAILBOX_GPA, Mailbox, PV_BASE, reg};

fn read(register: u64) -> u64 {
    // SAFETY: PV_BASE..PV_BASE+PV_SIZE is identity-mapped by the VMM's page
    // tables and backed by no memory slot, so the access exits to the VMM,
    // which supplies the value. Volatile: every access must happen.
    unsafe { core::ptr::read_volatile((PV_BASE + register) as *const u64) }
}

fn write(register: u64, value: u64) {
    // SAFETY: as in `read`; the VMM consumes the written value.
    unsafe { core::ptr::write_volatile((PV_BASE + register) as *mut u64, value) }
}

fn set_mailbox(buf: *const u8, len: usize) {
    let mailbox = Mailbox {
        buf: buf as u64,
        len: len as u64,
        wait_ns: 0,
    };
    // SAFETY: the mailbox page is guest RAM reserved for this purpose by the
    // layout in guest_abi; nothing else lives there. Volatile so the write is
    // not elided before the exit that reads it.
    unsafe { core::ptr::write_volatile(MAILBOX_GPA as *mut Mailbox, mailbox) }
}

/// Host monotonic time in nanoseconds.
pub fn clock() -> u64 {
    read(reg::CLOCK)
}

/// Eight random bytes.
pub fn entropy() -> u64 {
    read(reg::ENTROPY)
}

/// Fills `buf` with random bytes (one exit).
pub fn entropy_fill(buf: &mut [u8]) {
    set_mailbox(buf.as_ptr(), buf.len());
    read(reg::ENTROPY_FILL);
    // The VMM wrote into `buf` behind the compiler's back: make sure the
    // reads that follow are not hoisted above the exit.
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}

/// Reads up to `buf.len()` bytes of the input stream; `None` at its end.
pub fn input(buf: &mut [u8]) -> Option<usize> {
    set_mailbox(buf.as_ptr(), buf.len());
    let count = read(reg::INPUT);
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    if count == INPUT_EOF {
        None
    } else {
        Some(count as usize)
    }
}

/// Writes `bytes` to the VMM's console.
pub fn console(bytes: &[u8]) {
    set_mailbox(bytes.as_ptr(), bytes.len());
    write(reg::CONSOLE, bytes.len() as u64);
}

/// The guest argument from the VM configuration.
pub fn arg() -> u64 {
    read(reg::ARG)
}

/// Guest memory size in bytes.
pub fn mem_size() -> u64 {
    read(reg::MEM_SIZE)
}

/// Waits up to `wait_ns` for network input (which the VMM delivers into the
/// NIC's RX queue at this exit) and returns the clock in ns.
pub fn wait(wait_ns: u64) -> u64 {
    let mailbox = Mailbox {
        buf: 0,
        len: 0,
        wait_ns,
    };
    // SAFETY: as in `set_mailbox`.
    unsafe { core::ptr::write_volatile(MAILBOX_GPA as *mut Mailbox, mailbox) }
    let now = read(reg::WAIT);
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    now
}

/// Ends the guest with `code`.
pub fn done(code: u64) -> ! {
    loop {
        write(reg::DONE, code);
    }
}
