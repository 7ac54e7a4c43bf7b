//! State digests: a fast hash of the vCPU's registers and of all guest
//! memory, taken at the same exit on every replica and compared.
//!
//! The hash is xxh3-64: not cryptographic (the replicas trust each other),
//! but it sees every bit and runs at memory bandwidth, about 2 ms for 16 MiB.

use channel::log::DigestRecord;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};
use zerocopy::little_endian::U64;

use crate::{Vm, VmmError};

/// A state digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    /// Hash of the general registers, RIP, RFLAGS and the FPU/SSE state.
    pub registers: u64,
    /// Hash of all guest memory.
    pub memory: u64,
    /// The instruction pointer, for messages.
    pub rip: u64,
}

impl Digest {
    /// Takes the digest of a stopped VM.
    pub fn of(vm: &Vm) -> Result<Self, VmmError> {
        let regs = vm.regs()?;
        let fpu = vm.fpu()?;
        let mut words = vec![
            regs.rax,
            regs.rbx,
            regs.rcx,
            regs.rdx,
            regs.rsi,
            regs.rdi,
            regs.rsp,
            regs.rbp,
            regs.r8,
            regs.r9,
            regs.r10,
            regs.r11,
            regs.r12,
            regs.r13,
            regs.r14,
            regs.r15,
            regs.rip,
            regs.rflags,
        ];
        words.push(u64::from(fpu.mxcsr));
        words.push(u64::from(fpu.fcw) | (u64::from(fpu.fsw) << 16) | (u64::from(fpu.ftwx) << 32));
        let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for register in fpu.xmm.iter().chain(fpu.fpr.iter()) {
            bytes.extend_from_slice(register);
        }
        let registers = xxh3_64(&bytes);
        let mut memory = Xxh3::new();
        vm.for_each_memory_slice(|slice| memory.update(slice))?;
        Ok(Self {
            registers,
            memory: memory.digest(),
            rip: regs.rip,
        })
    }

    /// Folds a disk's running digest ([`crate::block::VirtioBlk::settle_digest`])
    /// into the memory word, so the log's digest record (registers, memory,
    /// rip) also covers the disk: for a VM with a disk, "memory differs"
    /// means guest memory or the written disk blocks.
    pub fn with_disk(mut self, disk: u64) -> Self {
        let mut words = [0u8; 16];
        words[..8].copy_from_slice(&self.memory.to_le_bytes());
        words[8..].copy_from_slice(&disk.to_le_bytes());
        self.memory = xxh3_64(&words);
        self
    }

    /// The digest as a log payload.
    pub fn record(&self) -> DigestRecord {
        DigestRecord {
            registers: U64::new(self.registers),
            memory: U64::new(self.memory),
            rip: U64::new(self.rip),
        }
    }

    /// Compares with a recorded digest; `None` if equal, else what differs.
    pub fn compare(&self, recorded: &DigestRecord) -> Option<String> {
        let registers_differ = self.registers != recorded.registers.get();
        let memory_differs = self.memory != recorded.memory.get();
        let what = match (registers_differ, memory_differs) {
            (false, false) => return None,
            (true, false) => "registers differ",
            (false, true) => "memory differs",
            (true, true) => "registers and memory differ",
        };
        Some(format!(
            "{what} (recorded: rip {:#x}, registers {:016x}, memory {:016x}; replayed: rip {:#x}, registers {:016x}, memory {:016x})",
            recorded.rip.get(),
            recorded.registers.get(),
            recorded.memory.get(),
            self.rip,
            self.registers,
            self.memory
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_names_what_differs() {
        let digest = Digest {
            registers: 1,
            memory: 2,
            rip: 0x20_0000,
        };
        assert_eq!(digest.compare(&digest.record()), None);
        let mut other = digest.record();
        other.memory = U64::new(3);
        let text = digest.compare(&other).expect("memory differs");
        assert!(text.starts_with("memory differs"), "{text}");
        other.registers = U64::new(9);
        let text = digest.compare(&other).expect("both differ");
        assert!(text.starts_with("registers and memory differ"), "{text}");
    }
}
