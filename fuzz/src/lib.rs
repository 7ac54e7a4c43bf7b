//! Helpers shared by the fuzz targets (`fuzz_targets/*.rs`).
//!
//! Each target is a thin wrapper around a crate's public decoder: the
//! helpers only turn the fuzzer's bytes into the shapes those decoders take
//! (a stream, a list of operations, a checksum fixed up so that the fuzzer
//! gets past it and into the logic behind it).

use std::io::{self, Read, Write};

/// Reads values off the front of the fuzzer's input; past the end every
/// read gives zeros (so every input is a valid program of operations).
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// True once every byte was taken.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes not yet taken.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.bytes.len());
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        head
    }

    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.bytes(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.bytes(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }

    /// A length-prefixed (u16) slice.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }
}

/// A peer on the other end of a connection: reads come from the fuzzer's
/// bytes (in pieces of varying size, as a socket delivers them), writes are
/// kept (and ignored). Reading past the end is a clean EOF.
pub struct MockStream<'a> {
    input: &'a [u8],
    /// Largest read returned at once (1.. ; 0 means unlimited).
    pub max_read: usize,
    /// Everything written to the stream.
    pub written: Vec<u8>,
}

impl<'a> MockStream<'a> {
    /// A stream that yields `input`.
    pub fn new(input: &'a [u8], max_read: usize) -> Self {
        Self {
            input,
            max_read,
            written: Vec::new(),
        }
    }
}

impl Read for MockStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = buf.len().min(self.input.len());
        if self.max_read > 0 {
            n = n.min(self.max_read);
        }
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for MockStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// HMAC-SHA256(key, label ‖ bytes): how the arbiter protocol and the
/// channel seal their messages. Targets use it to build inputs that pass
/// authentication, so the decoding behind it is fuzzed too (a peer that
/// holds the key but sends garbage).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key) else {
        return [0; 32];
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}
