//! The one place that touches KVM: create the VM and its memory, load the
//! guest image, put the vCPU in 64-bit mode at CPL3, run it, read its state.
//!
//! Everything else in the crate sees [`Vm`], [`Exit`] and plain data.

use std::fs::OpenOptions;
use std::io::Cursor;

use guest_abi::{
    GDT_GPA, IMAGE_BASE, MIN_MEM_SIZE, PD_GPA, PDPT_GPA, PML4_GPA, STACK_TOP, TSS_GPA,
    TSS_SELECTOR, USER_CS, USER_DS,
};
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, kvm_fpu, kvm_regs, kvm_segment, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{KernelLoader, elf::Elf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::VmmError;

/// What a guest-initiated exit asks of the VMM, copied out of the kvm_run
/// area so that exit handling is plain code over plain data (and testable
/// without a guest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest read `len` bytes at guest-physical `addr`, which no memory
    /// backs; the VMM must supply the value.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Access size in bytes (1..=8).
        len: usize,
    },
    /// The guest wrote `len` bytes (`value`, little-endian) at `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Access size in bytes (1..=8).
        len: usize,
        /// The bytes written, zero-extended.
        value: u64,
    },
    /// A port I/O access (not part of the ABI: refused).
    Io {
        /// Port number.
        port: u16,
    },
    /// HLT (not part of the ABI at CPL3: refused).
    Hlt,
    /// The guest took an exception it cannot handle (triple fault).
    Shutdown,
    /// KVM could not continue the guest.
    Internal {
        /// What KVM reported.
        detail: String,
    },
}

/// Settings that shape the virtual machine. Everything here must be equal on
/// primary and backup, so [`VmConfig::flags`] travels in the log header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory in bytes (at least [`MIN_MEM_SIZE`], a multiple of 4 KiB).
    pub mem_size: u64,
    /// Set CR4.TSD so that RDTSC/RDTSCP at CPL3 fault (and end the VM)
    /// instead of leaking the host TSC into the guest.
    pub trap_rdtsc: bool,
    /// Give the VM a virtio-net device with this MAC address.
    pub mac: Option<[u8; 6]>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            mem_size: 16 << 20,
            trap_rdtsc: true,
            mac: None,
        }
    }
}

/// `VmConfig::flags` bit: CR4.TSD is set.
pub const FLAG_TRAP_RDTSC: u64 = 1;
/// `VmConfig::flags` bit: the VM has a virtio-net device, whose MAC address
/// is in bits 16..64.
pub const FLAG_NETWORK: u64 = 2;

/// The MAC address lockstep gives a guest unless told otherwise
/// (locally administered: 02:4c:4b:53:54:02, "LKST").
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x4c, 0x4b, 0x53, 0x54, 0x02];

impl VmConfig {
    /// The settings that affect determinism, as recorded in log headers:
    /// bit 0 trap RDTSC, bit 1 network, bits 16..64 the MAC address.
    pub fn flags(&self) -> u64 {
        let mut flags = if self.trap_rdtsc { FLAG_TRAP_RDTSC } else { 0 };
        if let Some(mac) = self.mac {
            let mut bytes = [0u8; 8];
            bytes[2..].copy_from_slice(&mac);
            flags |= FLAG_NETWORK | u64::from_be_bytes(bytes) << 16;
        }
        flags
    }

    /// Rebuilds the flag-carried settings from a log header.
    pub fn with_flags(mem_size: u64, flags: u64) -> Self {
        let mac = (flags & FLAG_NETWORK != 0).then(|| {
            let bytes = (flags >> 16).to_be_bytes();
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&bytes[2..]);
            mac
        });
        Self {
            mem_size,
            trap_rdtsc: flags & FLAG_TRAP_RDTSC != 0,
            mac,
        }
    }

    fn validate(&self) -> Result<(), VmmError> {
        if self.mem_size < MIN_MEM_SIZE
            || !self.mem_size.is_multiple_of(4096)
            || self.mem_size > (1 << 40)
        {
            return Err(VmmError::Config(format!(
                "guest memory must be a multiple of 4 KiB between {} MiB and 1 TiB, not {} bytes",
                MIN_MEM_SIZE >> 20,
                self.mem_size
            )));
        }
        if self.mem_size > guest_abi::PV_BASE {
            return Err(VmmError::Config(format!(
                "guest memory of {} bytes would overlap the paravirtual device at {:#x}",
                self.mem_size,
                guest_abi::PV_BASE
            )));
        }
        Ok(())
    }
}

/// A KVM virtual machine with one vCPU and its memory.
pub struct Vm {
    // Field order matters for drop: the vCPU before the VM before KVM.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    memory: GuestMemoryMmap,
    entry: u64,
}

// x86 control-register and page-table bits used below.
const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_TSD: u64 = 1 << 2;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT: u64 = 1;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

impl Vm {
    /// Opens `/dev/kvm`, creates the VM and its memory, loads `image` (an
    /// ELF executable linked at [`IMAGE_BASE`]) and prepares the vCPU.
    pub fn new(config: &VmConfig, image: &[u8]) -> Result<Self, VmmError> {
        config.validate()?;
        check_kvm_device()?;
        let kvm = Kvm::new().map_err(|e| VmmError::Kvm("open /dev/kvm", e))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::Kvm("create the VM", e))?;
        let mem_size = usize::try_from(config.mem_size)
            .map_err(|_| VmmError::Config("guest memory does not fit the address space".into()))?;
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)])
            .map_err(|e| VmmError::Memory(format!("allocate {mem_size} bytes: {e}")))?;
        let host = memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmmError::Memory(format!("host address of guest memory: {e}")))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: config.mem_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of an anonymous mapping of exactly
        // `mem_size` bytes owned by `memory`, which lives in the returned
        // `Vm` and so outlives the VM file descriptor that references it
        // (fields drop in declaration order: vcpu, vm, kvm, then memory).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmmError::Kvm("register guest memory", e))?;

        let entry = load_image(&memory, image)?;
        write_page_tables(&memory)?;
        write_gdt(&memory)?;

        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| VmmError::Kvm("create the vCPU", e))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("read supported CPUID", e))?;
        hide_nondeterministic_features(&mut cpuid);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmmError::Kvm("set CPUID", e))?;
        let built = Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            memory,
            entry,
        };
        built.reset_vcpu(config)?;
        Ok(built)
    }

    fn reset_vcpu(&self, config: &VmConfig) -> Result<(), VmmError> {
        let mut sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| VmmError::Kvm("read special registers", e))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: USER_CS,
            type_: 0b1011, // execute/read, accessed
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: USER_DS,
            type_: 0b0011, // read/write, accessed
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_GPA,
            limit: 0x67,
            selector: TSS_SELECTOR,
            type_: 0b1011, // 64-bit TSS, busy
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.ldt = kvm_segment {
            unusable: 1,
            ..sregs.ldt
        };
        sregs.gdt.base = GDT_GPA;
        sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
        // No IDT: the guest handles no exception, any fault ends the VM.
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = PML4_GPA;
        sregs.cr4 =
            CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | if config.trap_rdtsc { CR4_TSD } else { 0 };
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
        self.vcpu
            .set_sregs(&sregs)
            .map_err(|e| VmmError::Kvm("set special registers", e))?;

        let regs = kvm_regs {
            rip: self.entry,
            rsp: STACK_TOP,
            rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
            ..Default::default()
        };
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| VmmError::Kvm("set registers", e))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.vcpu
            .set_fpu(&fpu)
            .map_err(|e| VmmError::Kvm("set FPU state", e))?;
        Ok(())
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Runs the vCPU until its next exit to userspace. For an MMIO read,
    /// `read_value` is called with the exit and must return the value to
    /// complete the read with; it runs while KVM's exit data is borrowed, so
    /// the value lands before the guest resumes.
    pub fn run<F>(&mut self, mut read_value: F) -> Result<Exit, VmmError>
    where
        F: FnMut(Exit) -> Result<u64, VmmError>,
    {
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    let exit = Exit::MmioRead {
                        addr,
                        len: data.len(),
                    };
                    let value = read_value(exit.clone())?.to_le_bytes();
                    let len = data.len().min(8);
                    data[..len].copy_from_slice(&value[..len]);
                    return Ok(exit);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let mut bytes = [0u8; 8];
                    let len = data.len().min(8);
                    bytes[..len].copy_from_slice(&data[..len]);
                    return Ok(Exit::MmioWrite {
                        addr,
                        len: data.len(),
                        value: u64::from_le_bytes(bytes),
                    });
                }
                Ok(VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _)) => {
                    return Ok(Exit::Io { port });
                }
                Ok(VcpuExit::Hlt) => return Ok(Exit::Hlt),
                Ok(VcpuExit::Shutdown) => return Ok(Exit::Shutdown),
                Ok(VcpuExit::InternalError) => {
                    return Ok(Exit::Internal {
                        detail: "KVM_EXIT_INTERNAL_ERROR (an instruction KVM could not emulate)"
                            .into(),
                    });
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Ok(Exit::Internal {
                        detail: format!(
                            "VM entry failed on cpu {cpu}: hardware reason {reason:#x}"
                        ),
                    });
                }
                // Not guest-initiated: a signal interrupted KVM_RUN. Resume.
                Ok(VcpuExit::Intr) => continue,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Ok(other) => {
                    return Ok(Exit::Internal {
                        detail: format!("unexpected exit {other:?}"),
                    });
                }
                Err(e) => return Err(VmmError::Kvm("run the vCPU", e)),
            }
        }
    }

    /// General registers.
    pub fn regs(&self) -> Result<kvm_regs, VmmError> {
        self.vcpu
            .get_regs()
            .map_err(|e| VmmError::Kvm("read registers", e))
    }

    /// FPU and SSE registers.
    pub fn fpu(&self) -> Result<kvm_fpu, VmmError> {
        self.vcpu
            .get_fpu()
            .map_err(|e| VmmError::Kvm("read FPU state", e))
    }

    /// Calls `visit` with each contiguous host mapping of guest memory, in
    /// guest-physical order.
    pub fn for_each_memory_slice(&self, mut visit: impl FnMut(&[u8])) -> Result<(), VmmError> {
        for region in self.memory.iter() {
            let slice = vm_memory::GuestMemoryRegion::as_volatile_slice(region)
                .map_err(|e| VmmError::Memory(format!("map guest memory: {e}")))?;
            // SAFETY: the slice covers a live mapping owned by `self.memory`.
            // The vCPU is stopped (we are between exits and `&self` forbids a
            // concurrent `run`), so no one writes it while it is read; bytes
            // are plain u8 with no invalid values.
            let bytes =
                unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), slice.len()) };
            visit(bytes);
        }
        Ok(())
    }
}

/// Entries in the GDT: null, (unused) kernel entries, user data at index 5,
/// user code at 6, and the 16-byte TSS descriptor at 8..=9.
const GDT_ENTRIES: usize = 10;

fn check_kvm_device() -> Result<(), VmmError> {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VmmError::NoKvm(
            "/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd, or enable nested virtualisation)".into(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(VmmError::NoKvm(
            "/dev/kvm is not accessible: run as root or join the kvm group".into(),
        )),
        Err(e) => Err(VmmError::NoKvm(format!("/dev/kvm cannot be opened: {e}"))),
    }
}

fn load_image(memory: &GuestMemoryMmap, image: &[u8]) -> Result<u64, VmmError> {
    let mut cursor = Cursor::new(image);
    let loaded = Elf::load(memory, None, &mut cursor, Some(GuestAddress(IMAGE_BASE)))
        .map_err(|e| VmmError::Image(format!("{e}")))?;
    if loaded.kernel_end > memory.last_addr().0 {
        return Err(VmmError::Image(format!(
            "the image ends at {:#x}, past the end of guest memory",
            loaded.kernel_end
        )));
    }
    Ok(loaded.kernel_load.0)
}

fn write_u64s(memory: &GuestMemoryMmap, base: u64, values: &[u64]) -> Result<(), VmmError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    memory
        .write_slice(&bytes, GuestAddress(base))
        .map_err(|e| VmmError::Memory(format!("write boot structures at {base:#x}: {e}")))
}

/// Identity-maps the first 4 GiB with 2 MiB pages, user-accessible at every
/// level (the guest runs at CPL3). Addresses past the end of memory are
/// mapped too: that is how the paravirtual device is reached.
fn write_page_tables(memory: &GuestMemoryMmap) -> Result<(), VmmError> {
    let flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER;
    write_u64s(memory, PML4_GPA, &[PDPT_GPA | flags])?;
    let pdpt: Vec<u64> = (0..4).map(|i| (PD_GPA + i * 0x1000) | flags).collect();
    write_u64s(memory, PDPT_GPA, &pdpt)?;
    let pd: Vec<u64> = (0..4 * 512u64)
        .map(|i| (i << 21) | flags | PTE_HUGE)
        .collect();
    write_u64s(memory, PD_GPA, &pd)
}

/// A GDT laid out like the Linux host's for the user selectors (so that the
/// same selectors work under PVM, which runs CPL3 code on the host's GDT),
/// plus a TSS descriptor so that ordinary KVM accepts the state.
fn write_gdt(memory: &GuestMemoryMmap) -> Result<(), VmmError> {
    const USER_DATA: u64 = 0x00cf_f300_0000_ffff; // base 0, 4 GiB, DPL3, RW
    const USER_CODE64: u64 = 0x00af_fb00_0000_ffff; // base 0, DPL3, L=1, XR
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[5] = USER_DATA;
    gdt[6] = USER_CODE64;
    let base = TSS_GPA;
    let limit = 0x67u64;
    gdt[8] = limit
        | ((base & 0xff_ffff) << 16)
        | (0b1011 << 40) // 64-bit TSS (busy)
        | (1 << 47) // present
        | (((base >> 24) & 0xff) << 56);
    gdt[9] = base >> 32;
    write_u64s(memory, GDT_GPA, &gdt)
}

/// Clears CPUID bits of instructions whose results the VMM cannot control.
/// (Advisory: CPUID cannot stop a guest from executing them; CR4.TSD can for
/// RDTSC. A guest that ignores CPUID diverges, and digests catch it.)
fn hide_nondeterministic_features(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        match (entry.function, entry.index) {
            (1, _) => entry.ecx &= !(1 << 30),           // RDRAND
            (7, 0) => entry.ebx &= !(1 << 18),           // RDSEED
            (0x8000_0001, _) => entry.edx &= !(1 << 27), // RDTSCP
            _ => {}
        }
    }
}
