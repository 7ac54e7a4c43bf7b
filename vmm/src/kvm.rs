//! The one place that touches KVM: create the VM and its memory, load the
//! guest image, put the vCPU in 64-bit mode at CPL3, run it, read its state.
//!
//! Everything else in the crate sees [`Vm`], [`Exit`] and plain data.

use std::fs::OpenOptions;
use std::io::Cursor;
use std::sync::Arc;

use guest_abi::{
    GDT_GPA, IMAGE_BASE, MIN_MEM_SIZE, PD_GPA, PDPT_GPA, PML4_GPA, STACK_TOP, TSS_GPA,
    TSS_SELECTOR, USER_CS, USER_DS,
};
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, Msrs, Xsave, kvm_debugregs, kvm_fpu,
    kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{KernelLoader, elf::Elf};
use nic::virtio::GuestRam;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
    vm: Arc<VmFd>,
    _kvm: Kvm,
    memory: GuestRam,
    entry: u64,
    mem_size: u64,
    host_addr: u64,
    xsave_bytes: usize,
}

/// The MSRs a state transfer carries: the syscall and segment-base MSRs a
/// 64-bit guest may touch, SYSENTER, PAT, the TSC and its aux value. Each is
/// read and written one at a time (without an irqchip, `KVM_SET_MSRS` stops
/// at the first MSR it refuses); one the host cannot read is left out.
pub const TRANSFER_MSRS: &[u32] = &[
    0x0000_0010, // IA32_TSC
    0x0000_0174, // SYSENTER_CS
    0x0000_0175, // SYSENTER_ESP
    0x0000_0176, // SYSENTER_EIP
    0x0000_0277, // PAT
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Everything KVM holds about the vCPU, read at an exit boundary after
/// [`Vm::complete_pending_io`] (so the last MMIO instruction is retired).
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuState {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87 and SSE registers.
    pub fpu: kvm_fpu,
    /// The XSAVE area as `KVM_GET_XSAVE(2)` returns it (4 KiB or larger).
    pub xsave: Vec<u32>,
    /// Extended control registers (empty if the host has no XCRs).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMI and SMI state, shadows.
    pub events: kvm_vcpu_events,
    /// Run state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
    /// `(index, value)` of each of [`TRANSFER_MSRS`] the host could read.
    pub msrs: Vec<(u32, u64)>,
}

/// A handle on a VM's dirty-page log, usable from any thread while the vCPU
/// runs (it holds the VM file descriptor and a clone of guest memory, so it
/// stays valid after the [`Vm`] itself is gone).
///
/// Two logs are kept, because neither sees everything:
/// - **KVM's** (`KVM_MEM_LOG_DIRTY_PAGES`, read and cleared by
///   `KVM_GET_DIRTY_LOG`): every page the *guest* wrote since the last read.
/// - **The VMM's** (the [`GuestRam`] bitmap): every page the VMM wrote
///   through `vm-memory` (mailbox buffers, virtio RX frames and used rings).
///   KVM does not see these writes: they go through the host mapping.
///
/// Reading either log clears it atomically (KVM write-protects the pages
/// again; the bitmap is swapped word by word), and pages are copied *after*
/// the read, so a page written during a copy is always in a later read.
#[derive(Clone)]
pub struct DirtyLog {
    vm: Arc<VmFd>,
    memory: GuestRam,
    mem_size: u64,
    host_addr: u64,
}

impl DirtyLog {
    /// Turns KVM's dirty-page logging on or off for guest memory. Turning it
    /// on starts a clean log (every page write-protected).
    pub fn set_logging(&self, on: bool) -> Result<(), VmmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: self.mem_size,
            userspace_addr: self.host_addr,
        };
        // SAFETY: the same slot, address and size as registered by
        // `Vm::create`; only the flags change. `host_addr` is the start of
        // the mapping owned by `self.memory` (a clone sharing the same
        // mapping), which this handle keeps alive at least as long as its
        // reference to the VM (fields drop in order: vm, then memory).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| {
            VmmError::Kvm(
                if on {
                    "enable dirty-page logging"
                } else {
                    "disable dirty-page logging"
                },
                e,
            )
        })
    }

    /// Reads and clears KVM's log: one bit per 4 KiB page, bit `i % 64` of
    /// word `i / 64` for page `i`.
    pub fn take_guest_dirty(&self) -> Result<Vec<u64>, VmmError> {
        let size = usize::try_from(self.mem_size)
            .map_err(|_| VmmError::Config("guest memory does not fit the address space".into()))?;
        self.vm
            .get_dirty_log(0, size)
            .map_err(|e| VmmError::Kvm("read the dirty-page log", e))
    }

    /// Reads and clears the VMM's own write log (same layout).
    pub fn take_host_dirty(&self) -> Vec<u64> {
        let mut words = Vec::new();
        for region in self.memory.iter() {
            let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
            words.extend(mapping.bitmap().get_and_reset());
        }
        words
    }

    /// Guest memory (for copying pages out).
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }
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
        let mut built = Self::blank(config)?;
        built.entry = load_image(&built.memory, image)?;
        write_page_tables(&built.memory)?;
        write_gdt(&built.memory)?;
        built.reset_vcpu(config)?;
        Ok(built)
    }

    /// A VM with zeroed memory and a vCPU in KVM's reset state, to be filled
    /// from a state transfer ([`Self::set_vcpu_state`], [`Self::memory`]).
    pub fn blank(config: &VmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        check_kvm_device()?;
        let kvm = Kvm::new().map_err(|e| VmmError::Kvm("open /dev/kvm", e))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VmmError::Kvm("create the VM", e))?;
        let mem_size = usize::try_from(config.mem_size)
            .map_err(|_| VmmError::Config("guest memory does not fit the address space".into()))?;
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), mem_size)])
            .map_err(VmmError::memory(format!("allocate {mem_size} bytes")))?;
        let host = memory
            .get_host_address(GuestAddress(0))
            .map_err(VmmError::memory("host address of guest memory"))?;
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
        // (fields drop in declaration order: vcpu, vm, kvm, then memory;
        // a `DirtyLog` holding the VM holds a clone of the memory too).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmmError::Kvm("register guest memory", e))?;

        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| VmmError::Kvm("create the vCPU", e))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmmError::Kvm("read supported CPUID", e))?;
        hide_nondeterministic_features(&mut cpuid);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmmError::Kvm("set CPUID", e))?;
        let xsave_bytes = usize::try_from(vm.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(4096);
        Ok(Self {
            vcpu,
            vm: Arc::new(vm),
            _kvm: kvm,
            memory,
            entry: 0,
            mem_size: config.mem_size,
            host_addr: host as u64,
            xsave_bytes,
        })
    }

    /// A handle on the dirty-page logs, for another thread.
    pub fn dirty_log(&self) -> DirtyLog {
        DirtyLog {
            vm: Arc::clone(&self.vm),
            memory: self.memory.clone(),
            mem_size: self.mem_size,
            host_addr: self.host_addr,
        }
    }

    /// Retires the instruction of the last exit without running the guest:
    /// KVM completes an MMIO read or write (loads the value, advances RIP)
    /// only on the next `KVM_RUN`, so a `KVM_RUN` with `immediate_exit` set
    /// does just that and returns. After it, the vCPU state is complete and
    /// can be saved; resuming later runs the next instruction as usual.
    pub fn complete_pending_io(&mut self) -> Result<(), VmmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let result = self.vcpu.run().map(|exit| format!("{exit:?}"));
        self.vcpu.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VmmError::Kvm("complete the pending MMIO access", e)),
            Ok(exit) => Err(VmmError::Memory(format!(
                "KVM ran the guest (exit {exit}) when asked only to complete its last access"
            ))),
        }
    }

    /// Reads the whole vCPU state (call [`Self::complete_pending_io`] first).
    pub fn vcpu_state(&self) -> Result<VcpuState, VmmError> {
        let vcpu = &self.vcpu;
        let xsave = if self.xsave_bytes > 4096 {
            let extra = (self.xsave_bytes - 4096).div_ceil(4);
            let mut area =
                Xsave::new(extra).map_err(|e| VmmError::Memory(format!("XSAVE area: {e:?}")))?;
            // SAFETY: `area` was sized from KVM_CAP_XSAVE2, the number of
            // bytes KVM_GET_XSAVE2 writes, so KVM stays inside it.
            unsafe { vcpu.get_xsave2(&mut area) }
                .map_err(|e| VmmError::Kvm("read the XSAVE area", e))?;
            let mut words = area.as_fam_struct_ref().xsave.region.to_vec();
            words.extend_from_slice(area.as_slice());
            words
        } else {
            vcpu.get_xsave()
                .map_err(|e| VmmError::Kvm("read the XSAVE area", e))?
                .region
                .to_vec()
        };
        let mut msrs = Vec::new();
        for &index in TRANSFER_MSRS {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|e| VmmError::Memory(format!("MSR list: {e:?}")))?;
            if let Ok(1) = vcpu.get_msrs(&mut one)
                && let Some(entry) = one.as_slice().first()
            {
                msrs.push((index, entry.data));
            }
        }
        Ok(VcpuState {
            regs: self.regs()?,
            sregs: vcpu
                .get_sregs()
                .map_err(|e| VmmError::Kvm("read special registers", e))?,
            fpu: self.fpu()?,
            xsave,
            xcrs: vcpu
                .get_xcrs()
                .map_err(|e| VmmError::Kvm("read extended control registers", e))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(|e| VmmError::Kvm("read debug registers", e))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(|e| VmmError::Kvm("read pending vCPU events", e))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(|e| VmmError::Kvm("read the run state", e))?,
            msrs,
        })
    }

    /// Loads a vCPU state read by [`Self::vcpu_state`] (on this host or one
    /// with the same CPU features).
    pub fn set_vcpu_state(&self, state: &VcpuState) -> Result<(), VmmError> {
        let vcpu = &self.vcpu;
        let words = if self.xsave_bytes > 4096 {
            1024 + (self.xsave_bytes - 4096).div_ceil(4)
        } else {
            1024
        };
        if state.xsave.len() != words {
            return Err(VmmError::Config(format!(
                "the saved XSAVE area has {} bytes, this host's has {}: state moves only between hosts with the same CPU features",
                state.xsave.len() * 4,
                words * 4
            )));
        }
        vcpu.set_mp_state(state.mp_state)
            .map_err(|e| VmmError::Kvm("set the run state", e))?;
        vcpu.set_sregs(&state.sregs)
            .map_err(|e| VmmError::Kvm("set special registers", e))?;
        vcpu.set_regs(&state.regs)
            .map_err(|e| VmmError::Kvm("set registers", e))?;
        vcpu.set_fpu(&state.fpu)
            .map_err(|e| VmmError::Kvm("set FPU state", e))?;
        if self.xsave_bytes > 4096 {
            let extra = (self.xsave_bytes - 4096).div_ceil(4);
            let mut area =
                Xsave::new(extra).map_err(|e| VmmError::Memory(format!("XSAVE area: {e:?}")))?;
            let (region, rest) = state.xsave.split_at(state.xsave.len().min(1024));
            // SAFETY: only plain u32 words of the FAM struct are written.
            unsafe { area.as_mut_fam_struct() }.xsave.region[..region.len()]
                .copy_from_slice(region);
            let slice = area.as_mut_slice();
            let take = rest.len().min(slice.len());
            slice[..take].copy_from_slice(&rest[..take]);
            // SAFETY: `area` holds KVM_CAP_XSAVE2 bytes, all KVM_SET_XSAVE reads.
            unsafe { vcpu.set_xsave2(&area) }
                .map_err(|e| VmmError::Kvm("set the XSAVE area", e))?;
        } else {
            let mut area = kvm_bindings::kvm_xsave::default();
            let take = state.xsave.len().min(1024);
            area.region[..take].copy_from_slice(&state.xsave[..take]);
            // SAFETY: KVM's XSAVE area is at most 4096 bytes here (no
            // KVM_CAP_XSAVE2 beyond it), exactly the size of `kvm_xsave`.
            unsafe { vcpu.set_xsave(&area) }.map_err(|e| VmmError::Kvm("set the XSAVE area", e))?;
        }
        if state.xcrs.nr_xcrs > 0 {
            vcpu.set_xcrs(&state.xcrs)
                .map_err(|e| VmmError::Kvm("set extended control registers", e))?;
        }
        vcpu.set_debug_regs(&state.debugregs)
            .map_err(|e| VmmError::Kvm("set debug registers", e))?;
        for &(index, data) in &state.msrs {
            let one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }])
            .map_err(|e| VmmError::Memory(format!("MSR list: {e:?}")))?;
            match vcpu.set_msrs(&one) {
                Ok(1) => {}
                Ok(_) => {
                    return Err(VmmError::Config(format!(
                        "KVM refused to set MSR {index:#x} to {data:#x}"
                    )));
                }
                Err(e) => return Err(VmmError::Kvm("set an MSR", e)),
            }
        }
        vcpu.set_vcpu_events(&state.events)
            .map_err(|e| VmmError::Kvm("set pending vCPU events", e))?;
        Ok(())
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
    pub fn memory(&self) -> &GuestRam {
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
                .map_err(VmmError::memory("map guest memory"))?;
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

fn load_image(memory: &GuestRam, image: &[u8]) -> Result<u64, VmmError> {
    let mut cursor = Cursor::new(image);
    let loaded = Elf::load(memory, None, &mut cursor, Some(GuestAddress(IMAGE_BASE)))
        .map_err(VmmError::Elf)?;
    if loaded.kernel_end > memory.last_addr().0 {
        return Err(VmmError::Image(format!(
            "the image ends at {:#x}, past the end of guest memory",
            loaded.kernel_end
        )));
    }
    Ok(loaded.kernel_load.0)
}

fn write_u64s(memory: &GuestRam, base: u64, values: &[u64]) -> Result<(), VmmError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    memory
        .write_slice(&bytes, GuestAddress(base))
        .map_err(VmmError::memory(format!(
            "write boot structures at {base:#x}"
        )))
}

/// Identity-maps the first 4 GiB with 2 MiB pages, user-accessible at every
/// level (the guest runs at CPL3). Addresses past the end of memory are
/// mapped too: that is how the paravirtual device is reached.
fn write_page_tables(memory: &GuestRam) -> Result<(), VmmError> {
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
fn write_gdt(memory: &GuestRam) -> Result<(), VmmError> {
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
