//! Where the log's bytes go in receive: the primary's log of a receive run,
//! recorded to a file (`lockstep record --log FILE` in host a, under the
//! same load over the same 1 Gbit/s client link) and taken apart entry by
//! entry, frame by frame.
//!
//! ```text
//!  log bytes = entry headers (32 B each) + padding (to 8 B)
//!            + RxFramesPacked payloads: the TCP payload (the client's bytes)
//!                                  + everything else, packed (lengths, span, the
//!                                    header bytes the prediction missed; first
//!                                    frame of each entry whole)
//!            + RxFrames payloads (older logs):  per frame  u32 length (4 B)
//!                                           + Ethernet header (14 B)
//!                                           + IPv4 header (20 B + options)
//!                                           + TCP header (20 B + options: 12 B of timestamps)
//!                                           + TCP payload           <- the client's bytes
//!                                  other frames (ARP, ...) whole
//!            + other entries' payloads (clock reads, digests, progress, end)
//! ```
//!
//! Every part divided by the TCP payload bytes gives the log bytes per
//! client byte and what each part adds to it.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use channel::log::packed::tcp_split;
use channel::log::{ENTRY_HEADER_LEN, EntryKind, LogReader};
use serde_json::{Value, json};

/// Byte counts of one log, by part.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Anatomy {
    /// Entries of every kind.
    pub entries: u64,
    /// RxFrames entries.
    pub rx_entries: u64,
    /// Frames in them.
    pub frames: u64,
    /// Entry headers.
    pub entry_headers: u64,
    /// Zero padding of payloads.
    pub padding: u64,
    /// The u32 length before each frame.
    pub frame_lengths: u64,
    /// Ethernet headers of IPv4 TCP frames.
    pub ethernet: u64,
    /// IPv4 headers of TCP frames (options included).
    pub ip: u64,
    /// TCP headers (options included).
    pub tcp: u64,
    /// TCP payload: the client's bytes.
    pub payload: u64,
    /// Frames that are not IPv4 TCP, whole.
    pub other_frames: u64,
    /// Payloads of entries other than RxFrames.
    pub other_entries: u64,
    /// RxFramesPacked entries: every byte but the TCP payload (lengths,
    /// spans, header bytes the prediction missed, whole frames).
    pub packed_coding: u64,
}

impl Anatomy {
    /// All bytes after the file header.
    pub fn total(self) -> u64 {
        self.entry_headers
            + self.padding
            + self.frame_lengths
            + self.ethernet
            + self.ip
            + self.tcp
            + self.payload
            + self.other_frames
            + self.other_entries
            + self.packed_coding
    }

    /// Adds one frame.
    pub fn add_frame(&mut self, frame: &[u8]) {
        self.frames += 1;
        self.frame_lengths += 4;
        match tcp_split(frame) {
            Some((ip, tcp)) => {
                self.ethernet += 14;
                self.ip += ip as u64;
                self.tcp += tcp as u64;
                self.payload += (frame.len() - 14 - ip - tcp) as u64;
            }
            None => self.other_frames += frame.len() as u64,
        }
    }

    /// Reads a log file.
    pub fn of_file(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut reader = LogReader::new(BufReader::with_capacity(1 << 20, file))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut anatomy = Self::default();
        while let Some(entry) = reader
            .next_entry()
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            anatomy.entries += 1;
            anatomy.entry_headers += ENTRY_HEADER_LEN as u64;
            anatomy.padding +=
                (entry.encoded_len() - ENTRY_HEADER_LEN - entry.payload.len()) as u64;
            match entry.rx_frames() {
                Some(frames) => {
                    let frames = frames.map_err(|error| {
                        format!("{}: entry {}: {error}", path.display(), entry.seq)
                    })?;
                    anatomy.rx_entries += 1;
                    if entry.kind == EntryKind::RxFramesPacked {
                        let payload: u64 = frames.iter().map(|frame| tcp_payload(frame)).sum();
                        anatomy.frames += frames.len() as u64;
                        anatomy.payload += payload;
                        anatomy.packed_coding += entry.payload.len() as u64 - payload;
                    } else {
                        for frame in &frames {
                            anatomy.add_frame(frame);
                        }
                    }
                }
                None => anatomy.other_entries += entry.payload.len() as u64,
            }
        }
        Ok(anatomy)
    }

    /// Each part per client (TCP payload) byte: (name, bytes, per byte).
    pub fn parts(self) -> Vec<(&'static str, u64, f64)> {
        let per = |bytes: u64| bytes as f64 / (self.payload.max(1)) as f64;
        [
            ("TCP payload (the client's bytes)", self.payload),
            ("TCP headers", self.tcp),
            ("IPv4 headers", self.ip),
            ("Ethernet headers", self.ethernet),
            ("frame length words", self.frame_lengths),
            ("entry headers", self.entry_headers),
            ("entry padding", self.padding),
            ("other frames (ARP, ...)", self.other_frames),
            ("other entries (clock, digest, ...)", self.other_entries),
            ("packed frames' headers and lengths", self.packed_coding),
        ]
        .into_iter()
        .map(|(name, bytes)| (name, bytes, per(bytes)))
        .collect()
    }

    /// The report's text.
    pub fn text(self) -> String {
        let mut text = format!(
            "\nWhere the log's bytes go in receive (a recorded log: {} entries, {} of them RxFrames with {} frames, {:.1} frames per entry; {:.0} payload bytes per frame):\n",
            self.entries,
            self.rx_entries,
            self.frames,
            self.frames as f64 / self.rx_entries.max(1) as f64,
            self.payload as f64 / self.frames.max(1) as f64,
        );
        for (name, bytes, per) in self.parts() {
            text.push_str(&format!(
                "  {name:<36} {bytes:>12} B  {per:>7.4} per client byte\n"
            ));
        }
        text.push_str(&format!(
            "  {:<36} {:>12} B  {:>7.4} per client byte (goal <= {})\n",
            "all",
            self.total(),
            self.total() as f64 / self.payload.max(1) as f64,
            super::scenario::GOAL_LOG_PER_CLIENT_BYTE
        ));
        text
    }

    /// The report's JSON.
    pub fn to_json(self) -> Value {
        json!({
            "entries": self.entries,
            "rx_entries": self.rx_entries,
            "frames": self.frames,
            "total_bytes": self.total(),
            "log_bytes_per_client_byte": self.total() as f64 / self.payload.max(1) as f64,
            "parts": self.parts().iter().map(|(name, bytes, per)| json!({
                "part": name, "bytes": bytes, "per_client_byte": per,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The TCP payload bytes of an Ethernet IPv4 TCP frame (0 for others).
fn tcp_payload(frame: &[u8]) -> u64 {
    tcp_split(frame).map_or(0, |(ip, tcp)| (frame.len() - 14 - ip - tcp) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame(payload: usize) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20 + 32 + payload];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45; // IPv4, 20-byte header
        frame[14 + 9] = 6; // TCP
        frame[14 + 20 + 12] = 8 << 4; // 32-byte TCP header (timestamps)
        frame
    }

    #[test]
    fn frames_split_into_headers_and_payload() {
        let mut anatomy = Anatomy::default();
        anatomy.add_frame(&tcp_frame(1448));
        anatomy.add_frame(&[0u8; 42]); // an ARP-sized frame
        assert_eq!(
            (
                anatomy.ethernet,
                anatomy.ip,
                anatomy.tcp,
                anatomy.payload,
                anatomy.other_frames
            ),
            (14, 20, 32, 1448, 42)
        );
        assert_eq!(anatomy.frame_lengths, 8);
        let truncated = &tcp_frame(0)[..40];
        assert_eq!(tcp_split(truncated), None);
    }

    #[test]
    fn a_recorded_log_is_taken_apart() {
        use channel::log::{LogMeta, LogWriter, encode_frames};
        let path = std::env::temp_dir().join(format!("anatomy-{}.log", std::process::id()));
        let meta = LogMeta {
            image_id: 1,
            mem_size: 1 << 20,
            guest_arg: 0,
            digest_interval: 0,
            vm_flags: 0,
            guest_name: "net".into(),
        };
        let file = File::create(&path).expect("create");
        let mut writer = LogWriter::new(file, &meta).expect("writer");
        let frames = vec![tcp_frame(1448), tcp_frame(1448)];
        writer
            .append(EntryKind::RxFrames, 0, 1, 5, &encode_frames(&frames))
            .expect("append");
        writer
            .append(EntryKind::Clock, 0, 2, 6, &7u64.to_le_bytes())
            .expect("append");
        let packed = channel::log::packed::encode_vec(&frames).expect("packable");
        writer
            .append(EntryKind::RxFramesPacked, 0, 3, 7, &packed)
            .expect("append");
        writer.flush().expect("flush");
        drop(writer);
        let anatomy = Anatomy::of_file(&path).expect("anatomy");
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            (anatomy.entries, anatomy.rx_entries, anatomy.frames),
            (3, 2, 4)
        );
        assert_eq!(anatomy.payload, 4 * 1448);
        assert_eq!(anatomy.other_entries, 8);
        assert_eq!(anatomy.packed_coding, packed.len() as u64 - 2 * 1448);
        // The first frame whole (69 bytes with its length and span); the
        // second, a copy whose zero length, identification and checksum
        // the prediction gets wrong, in a dozen.
        assert!(anatomy.packed_coding < 69 + 16, "{anatomy:?}");
        // Two 1514-byte frames + 2 length words = 3036 bytes, padded to 3040.
        let packed_padding = packed.len().div_ceil(8) * 8 - packed.len();
        assert_eq!(anatomy.padding, 4 + packed_padding as u64);
        assert_eq!(
            anatomy.total(),
            3 * 32 + 3040 + 8 + (packed.len() + packed_padding) as u64
        );
    }
}
