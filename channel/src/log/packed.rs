//! Packed received frames: the payload of an `RxFramesPacked` log entry.
//!
//! A receive-heavy guest logs about 41 frames per RxFrames entry, nearly
//! all of one TCP flow, and each carried its own 54 to 66 header bytes and
//! a 4-byte length: 4 % of the log on top of the client's bytes (Table 2,
//! issue 12: 1.045 log bytes per client byte against a goal of 1.02). Here
//! each frame after the first of an entry codes its headers as the bytes
//! that differ from a prediction made from the frame before it, so a
//! full-sized TCP segment costs about a dozen bytes besides its payload.
//!
//! The prediction only decides how many bytes a frame takes: every byte
//! that differs from it is sent, so a frame the prediction gets wrong (a
//! retransmission, another flow, an ARP) is still reproduced exactly. Each
//! entry starts afresh (its first frame has no predecessor), so an entry
//! decodes on its own: after a join, a failover or in a log file.
//!
//! # Layout
//!
//! The payload is records back to back, one per frame:
//!
//! ```text
//! size            field
//! 1..3            length   the frame's length, LEB128 (1 ..= MAX_FRAME_LEN)
//! 1               span     0: the frame's bytes follow whole (raw)
//!                          1..=128: its first `span` bytes are coded against the
//!                          prediction (span <= length and <= the previous frame's length)
//! span > 0:
//!   ceil(g/8)     groups   bit i (LSB first) of byte i/8: group i (bytes 8i .. 8i+8)
//!                          holds a byte that differs; g = ceil(span/8)
//!   1 per group   bytes    for each set group: bit j = byte 8i+j differs (nonzero,
//!                          no bit at or past `span`)
//!   1 per bit     values   the differing bytes, in order
//! length - span   rest     the frame's bytes after the span (all of it when raw)
//! ```
//!
//! # The prediction
//!
//! The previous frame's first `span` bytes, and, when it is an Ethernet
//! IPv4 TCP frame whose headers lie inside the span:
//!
//! | bytes (IPv4 header at 14)   | predicted                                        |
//! |-----------------------------|--------------------------------------------------|
//! | 16..18 total length         | this frame's length - 14                         |
//! | 18..20 identification       | previous + 1                                     |
//! | 24..26 header checksum      | the checksum of the predicted IPv4 header        |
//! | TCP 4..8 sequence number    | previous + previous frame's TCP payload length   |
//!
//! What is left for a stream of segments is the TCP checksum and the
//! timestamp bytes that moved: 2 to 6 values, 1 to 3 byte masks, 2 group
//! bytes, the span and a 2-byte length.

/// Largest frame a record may hold (the length field's bound).
pub const MAX_FRAME_LEN: usize = 65_535;
/// Largest span coded against the prediction.
pub const MAX_SPAN: usize = 128;

/// Why a packed payload was refused: what was wrong, in which frame, at
/// which byte of the payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("packed rx-frames payload, frame {frame} at byte {offset}: {what}")]
pub struct PackedError {
    /// Index of the frame being decoded (0-based).
    pub frame: usize,
    /// Byte offset in the payload where decoding stopped.
    pub offset: usize,
    /// What was wrong.
    pub what: &'static str,
}

/// Appends the packed encoding of `frames` to `out`.
///
/// Frames longer than [`MAX_FRAME_LEN`] cannot be packed; the NIC never
/// delivers them (its limit is 1514 bytes), and they are refused here with
/// `Err(index)` before anything is appended.
pub fn encode(frames: &[Vec<u8>], out: &mut Vec<u8>) -> Result<(), usize> {
    if let Some(index) = frames
        .iter()
        .position(|frame| frame.is_empty() || frame.len() > MAX_FRAME_LEN)
    {
        return Err(index);
    }
    out.reserve(frames.iter().map(|frame| frame.len() + 3).sum());
    let mut previous: Option<&[u8]> = None;
    for frame in frames {
        push_length(frame.len(), out);
        let coded = previous.and_then(|prev| encode_delta(prev, frame, out));
        if coded.is_none() {
            out.push(0);
            out.extend_from_slice(frame);
        }
        previous = Some(frame);
    }
    Ok(())
}

/// The packed encoding of `frames` (see [`encode`]).
pub fn encode_vec(frames: &[Vec<u8>]) -> Result<Vec<u8>, usize> {
    let mut out = Vec::new();
    encode(frames, &mut out)?;
    Ok(out)
}

/// Decodes a packed payload into its frames.
pub fn decode(payload: &[u8]) -> Result<Vec<Vec<u8>>, PackedError> {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let index = frames.len();
        let fail = |offset: usize, what: &'static str| PackedError {
            frame: index,
            offset,
            what,
        };
        let (length, used) = read_length(&payload[at..]).ok_or_else(|| {
            fail(
                at,
                "the length is not a LEB128 number in 1 ..= 65535 (or is cut short)",
            )
        })?;
        at += used;
        let span = usize::from(
            *payload
                .get(at)
                .ok_or_else(|| fail(at, "the payload ends before the span byte"))?,
        );
        at += 1;
        let mut frame = Vec::with_capacity(length);
        if span > 0 {
            let prev = frames
                .last()
                .ok_or_else(|| fail(at - 1, "the first frame of an entry is coded as a delta"))?;
            if span > MAX_SPAN || span > length || span > prev.len() {
                return Err(fail(
                    at - 1,
                    "the span is above 128, this frame's length or the previous frame's length",
                ));
            }
            let mut predicted = [0u8; MAX_SPAN];
            predict(prev, length, &mut predicted[..span]);
            let groups = span.div_ceil(8);
            let group_bytes = payload
                .get(at..at + groups.div_ceil(8))
                .ok_or_else(|| fail(at, "the payload ends inside the group bitmap"))?;
            let mut masks = [0u8; MAX_SPAN / 8];
            let mut mask_at = at + group_bytes.len();
            for group in 0..groups.div_ceil(8) * 8 {
                if group_bytes[group / 8] >> (group % 8) & 1 == 0 {
                    continue;
                }
                if group >= groups {
                    return Err(fail(at + group / 8, "a group bit is set past the span"));
                }
                let mask = *payload
                    .get(mask_at)
                    .ok_or_else(|| fail(mask_at, "the payload ends inside the byte masks"))?;
                let valid = span - group * 8;
                if mask == 0 || (valid < 8 && mask >> valid != 0) {
                    return Err(fail(
                        mask_at,
                        "a byte mask is zero or has a bit set past the span",
                    ));
                }
                masks[group] = mask;
                mask_at += 1;
            }
            at = mask_at;
            for (position, &guess) in predicted[..span].iter().enumerate() {
                if masks[position / 8] >> (position % 8) & 1 == 1 {
                    let value = *payload
                        .get(at)
                        .ok_or_else(|| fail(at, "the payload ends inside the differing bytes"))?;
                    frame.push(value);
                    at += 1;
                } else {
                    frame.push(guess);
                }
            }
        }
        let rest = length - span;
        let tail = payload
            .get(at..at + rest)
            .ok_or_else(|| fail(at, "the payload ends inside the frame's bytes"))?;
        frame.extend_from_slice(tail);
        at += rest;
        frames.push(frame);
    }
    Ok(frames)
}

/// Codes `frame` against the prediction from `prev` into `out` (span byte
/// included); `None`, with nothing appended, when raw is no longer.
fn encode_delta(prev: &[u8], frame: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let span = header_len(frame)
        .unwrap_or(64)
        .min(MAX_SPAN)
        .min(frame.len())
        .min(prev.len());
    if span == 0 {
        return None;
    }
    let mut predicted = [0u8; MAX_SPAN];
    predict(prev, frame.len(), &mut predicted[..span]);
    let groups = span.div_ceil(8);
    let mut group_bits = [0u8; MAX_SPAN / 64];
    let mut masks = [0u8; MAX_SPAN / 8];
    let mut differing = 0;
    for (position, (&byte, &guess)) in frame[..span].iter().zip(&predicted[..span]).enumerate() {
        if byte != guess {
            masks[position / 8] |= 1 << (position % 8);
            group_bits[position / 64] |= 1 << (position / 8 % 8);
            differing += 1;
        }
    }
    let set_groups = masks[..groups].iter().filter(|&&mask| mask != 0).count();
    let coded = groups.div_ceil(8) + set_groups + differing;
    if coded >= span {
        return None;
    }
    // `span` is at most MAX_SPAN (128): it fits the byte.
    out.push(span as u8);
    out.extend_from_slice(&group_bits[..groups.div_ceil(8)]);
    out.extend(masks[..groups].iter().copied().filter(|&mask| mask != 0));
    out.extend(
        frame[..span]
            .iter()
            .zip(&predicted[..span])
            .filter(|(byte, guess)| byte != guess)
            .map(|(&byte, _)| byte),
    );
    out.extend_from_slice(&frame[span..]);
    Some(())
}

/// Fills `predicted` (the span) with what the frame after `prev`, of
/// `length` bytes, most likely holds there (see the module docs).
fn predict(prev: &[u8], length: usize, predicted: &mut [u8]) {
    let span = predicted.len();
    predicted.copy_from_slice(&prev[..span]);
    let Some((ihl, offset)) = tcp_split(prev) else {
        return;
    };
    if span < 14 + ihl {
        return;
    }
    let be16 = |at: usize| u16::from_be_bytes([prev[at], prev[at + 1]]);
    let total = usize::from(be16(16));
    let total_now = u16::try_from(length.saturating_sub(14)).unwrap_or(u16::MAX);
    predicted[16..18].copy_from_slice(&total_now.to_be_bytes());
    predicted[18..20].copy_from_slice(&be16(18).wrapping_add(1).to_be_bytes());
    predicted[24..26].fill(0);
    let checksum = ip_checksum(&predicted[14..14 + ihl]);
    predicted[24..26].copy_from_slice(&checksum.to_be_bytes());
    let seq_at = 14 + ihl + 4;
    if span >= seq_at + 4 {
        let seq = u32::from_be_bytes([
            prev[seq_at],
            prev[seq_at + 1],
            prev[seq_at + 2],
            prev[seq_at + 3],
        ]);
        let carried = total.saturating_sub(ihl + offset);
        // Sequence numbers wrap at 2^32; carried is below 2^16.
        let next = seq.wrapping_add(carried as u32);
        predicted[seq_at..seq_at + 4].copy_from_slice(&next.to_be_bytes());
    }
}

/// The one's-complement sum of an IPv4 header whose checksum field is zero.
fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The fold leaves a 16-bit value.
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP header length of an Ethernet IPv4 TCP frame.
fn header_len(frame: &[u8]) -> Option<usize> {
    tcp_split(frame).map(|(ihl, offset)| 14 + ihl + offset)
}

/// (IPv4 header length, TCP header length) of an Ethernet IPv4 TCP frame
/// whose headers are all there, else `None`.
pub fn tcp_split(frame: &[u8]) -> Option<(usize, usize)> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tcp = ip.get(ihl..)?;
    let offset = usize::from(*tcp.get(12)? >> 4) * 4;
    (ihl >= 20 && offset >= 20 && tcp.len() >= offset).then_some((ihl, offset))
}

fn push_length(mut length: usize, out: &mut Vec<u8>) {
    while length >= 0x80 {
        out.push((length & 0x7f) as u8 | 0x80);
        length >>= 7;
    }
    out.push(length as u8);
}

/// A LEB128 length in 1 ..= MAX_FRAME_LEN, in its shortest form, and the
/// bytes it took.
fn read_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (index, &byte) in bytes.iter().enumerate().take(3) {
        value |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            let shortest = index == 0 || byte != 0;
            return (shortest && (1..=MAX_FRAME_LEN).contains(&value))
                .then_some((value, index + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet IPv4 TCP segment with timestamps, as iperf3's client sends.
    fn segment(seq: u32, id: u16, tsval: u32, payload: usize, fill: u8) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 20 + 32 + payload];
        frame[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + 32 + payload) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
        let checksum = ip_checksum(ip);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        let tcp = &mut frame[34..66];
        tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&77u32.to_be_bytes());
        tcp[12] = 8 << 4;
        tcp[13] = 0x10;
        tcp[14..16].copy_from_slice(&502u16.to_be_bytes());
        tcp[16..18].copy_from_slice(&(seq as u16 ^ 0x5a5a).to_be_bytes());
        tcp[20..22].copy_from_slice(&[1, 1]);
        tcp[22..24].copy_from_slice(&[8, 10]);
        tcp[24..28].copy_from_slice(&tsval.to_be_bytes());
        tcp[28..32].copy_from_slice(&99u32.to_be_bytes());
        for (index, byte) in frame[66..].iter_mut().enumerate() {
            *byte = fill.wrapping_add(index as u8);
        }
        frame
    }

    fn stream(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| {
                let i = i as u32;
                segment(1_000 + i * 1448, 7 + i as u16, 500 + i / 4, 1448, i as u8)
            })
            .collect()
    }

    #[test]
    fn a_tcp_stream_round_trips_at_a_dozen_bytes_a_segment() {
        let frames = stream(41);
        let packed = encode_vec(&frames).expect("packable");
        assert_eq!(decode(&packed).expect("valid"), frames);
        let payload: usize = frames.iter().map(|frame| frame.len() - 66).sum();
        let overhead = packed.len() - payload;
        // The first frame whole (66 + 3), the other 40 at 3 + about 10.
        // Measured: 409 bytes (8.5 a segment after the first).
        assert!(overhead < 69 + 40 * 12, "overhead {overhead} bytes");
        // Against 4 + 66 bytes a frame unpacked.
        assert!(overhead * 4 < 41 * 70, "overhead {overhead} bytes");
    }

    #[test]
    fn frames_the_prediction_misses_still_round_trip() {
        let arp = {
            let mut frame = vec![0xffu8; 42];
            frame[12..14].copy_from_slice(&[0x08, 0x06]);
            frame
        };
        let mut frames = vec![
            arp.clone(),
            segment(5, 1, 1, 0, 0),
            arp,
            segment(5, 1, 1, 1448, 3),
            // A retransmission: the sequence number goes back.
            segment(5, 2, 1, 1448, 3),
            segment(u32::MAX - 10, 65_535, 9, 100, 1),
            // Sequence and identification wrap.
            segment(89, 0, 9, 60, 1),
            vec![1],
            segment(0, 0, 0, 0, 0)[..30].to_vec(),
        ];
        frames.push(vec![0xab; MAX_FRAME_LEN]);
        let packed = encode_vec(&frames).expect("packable");
        assert_eq!(decode(&packed).expect("valid"), frames);
        assert_eq!(encode_vec(&[Vec::new()]), Err(0));
        assert_eq!(encode_vec(&[vec![1], vec![0; MAX_FRAME_LEN + 1]]), Err(1));
        assert_eq!(decode(&[]).expect("empty"), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn malformed_payloads_say_what_and_where() {
        let frames = stream(3);
        let packed = encode_vec(&frames).expect("packable");
        // Every cut inside a record is refused; a cut at a record boundary
        // is the payload of the frames before it.
        let mut boundaries = 0;
        for cut in 1..packed.len() {
            match decode(&packed[..cut]) {
                Ok(decoded) => {
                    assert_eq!(decoded[..], frames[..decoded.len()], "cut {cut}");
                    assert_eq!(encode_vec(&decoded).expect("packable"), packed[..cut]);
                    boundaries += 1;
                }
                Err(error) => assert!(error.offset <= cut, "{error}"),
            }
        }
        assert_eq!(boundaries, 2);
        let refuse = |payload: &[u8], what: &str| {
            let error = decode(payload).expect_err("malformed");
            assert!(error.to_string().contains(what), "{error}");
            error
        };
        refuse(&[0x00, 0x00], "LEB128");
        refuse(&[0x80, 0x00, 0x00], "LEB128");
        refuse(&[0xff, 0xff, 0x7f, 0x00], "LEB128");
        refuse(&[0x05], "before the span byte");
        let error = refuse(&[0x05, 0x01, 0, 0, 0, 0, 0], "first frame of an entry");
        assert_eq!((error.frame, error.offset), (0, 1));
        // A second frame whose span exceeds the first's length.
        let error = refuse(&[0x01, 0x00, 0xaa, 0x02, 0x02, 0x01, 0x03], "span is above");
        assert_eq!((error.frame, error.offset), (1, 4));
        // A byte mask with a bit past a 1-byte span.
        refuse(&[0x02, 0x00, 1, 2, 0x02, 0x01, 0x01, 0x02], "past the span");
        refuse(&[0x02, 0x00, 1, 2, 0x02, 0x02, 0x01, 0x00], "zero");
        refuse(
            &[0x02, 0x00, 1, 2, 0x02, 0x02, 0x02],
            "group bit is set past",
        );
        refuse(
            &[0x02, 0x00, 1, 2, 0x02, 0x02, 0x01, 0x01],
            "differing bytes",
        );
        refuse(&[0x02, 0x00, 1, 2, 0x03, 0x02, 0x00], "frame's bytes");
    }
}
