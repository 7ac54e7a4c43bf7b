//! Writes the seed corpora (`fuzz/seeds/<target>/`) from real artefacts:
//! a log recorded by `lockstep record`, state streams captured from real
//! KVM guests, a handshake captured between two real endpoints, the state
//! file of a real embedded arbiter, and the encoders' own output for the
//! rest. Run once by hand (see the README's fuzzing section):
//!
//! ```text
//! seedgen LOG GUEST_DIR OUT_DIR
//! ```
//!
//! LOG: a log file (`lockstep record --guest fold ...`); GUEST_DIR: the
//! directory holding the built guest ELFs (`fold`, `net`); OUT_DIR: where
//! the seed directories go.

// Links libFuzzer's runtime, which the coverage instrumentation of every
// crate here calls into (this program itself fuzzes nothing).
use libfuzzer_sys as _;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel::log::{EntryKind, LogMeta, LogReader, encode_entry, encode_frames};
use channel::protocol::{
    FRAME_HEADER_LEN, FrameKeys, FrameKind, PROTOCOL_VERSION, Role, Session, entry_space,
    put_entry, seal,
};
use vmm::events::{Live, LogSink};
use vmm::state::{CHUNK_HEADER_LEN, HEADER_LEN};
use vmm::{CaptureMemory, CaptureRequest, Machine, StateHeader, StateWriter, VmConfig};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Seeds {
    out: PathBuf,
}

impl Seeds {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.out.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
        Ok(())
    }
    fn put_mode(&self, target: &str, name: &str, mode: u8, bytes: &[u8]) -> Result<()> {
        let mut b = vec![mode];
        b.extend_from_slice(bytes);
        self.put(target, name, &b)
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("lock"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stream that records every byte read through it.
struct Recorder<S> {
    inner: S,
    seen: Vec<u8>,
}
impl<S: Read> Read for Recorder<S> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        self.seen.extend_from_slice(&b[..n]);
        Ok(n)
    }
}
impl<S: Write> Write for Recorder<S> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.inner.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Captures a state stream of `guest` at exit `at`, keeping `pages` pages.
fn capture(
    guest_dir: &Path,
    guest: &str,
    config: &VmConfig,
    arg: u64,
    at: u64,
    pages: usize,
) -> Result<Vec<u8>> {
    let image = fs::read(guest_dir.join(guest))?;
    let meta = LogMeta {
        image_id: vmm::state::image_id(&image),
        mem_size: config.mem_size,
        guest_arg: arg,
        digest_interval: 0,
        vm_flags: config.flags(),
        guest_name: guest.into(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sink = LogSink::new(channel::log::LogWriter::new(Vec::new(), &meta)?);
    let input: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let events = Live::new(Box::new(std::io::Cursor::new(input)), sink).with_stop(stop.clone());
    let mut machine = Machine::new(config, &image, arg, events, Box::new(Sink::default()), 0)?;
    let pause = machine.pause_handle();
    pause.request(CaptureRequest {
        memory: CaptureMemory::All,
        digest: true,
        at_exit: at,
    });
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, Ordering::SeqCst);
        })
    };
    let _ = machine.run();
    let _ = stopper.join();
    let captured = pause.try_take().ok_or("no capture")??;
    let header = StateHeader::new(config, &image, arg);
    let mut out = StateWriter::new(Vec::new(), &header)?;
    let mut kept = 0;
    for (addr, bytes) in &captured.pages {
        for (i, page) in bytes.chunks(4096).enumerate() {
            if kept < pages {
                out.memory(0, addr + i as u64 * 4096, page)?;
                kept += 1;
            }
        }
    }
    out.round_end(0, kept as u64)?;
    out.machine(&captured.state)?;
    Ok(out.finish()?)
}

/// The chunk payloads of a state stream, by kind.
fn chunks(stream: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut at = HEADER_LEN;
    let mut out = Vec::new();
    while stream.len() - at >= CHUNK_HEADER_LEN {
        let kind = u16::from_le_bytes([stream[at], stream[at + 1]]);
        let len = u32::from_le_bytes([
            stream[at + 4],
            stream[at + 5],
            stream[at + 6],
            stream[at + 7],
        ]) as usize;
        out.push((
            kind,
            stream[at + CHUNK_HEADER_LEN..at + CHUNK_HEADER_LEN + len].to_vec(),
        ));
        at += CHUNK_HEADER_LEN + len;
    }
    out
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, log, guests, out] = &args[..] else {
        return Err("usage: seedgen LOG GUEST_DIR OUT_DIR".into());
    };
    let seeds = Seeds { out: out.into() };
    let guests = Path::new(guests);

    // A recorded log: the log targets, and its entries for frames and replay.
    let log = fs::read(log)?;
    seeds.put_mode("log_reader", "fold", 0, &log)?;
    seeds.put_mode(
        "log_entry",
        "fold-entries",
        0,
        &log[channel::log::FILE_HEADER_LEN..],
    )?;
    let mut requests = Vec::new();
    let mut entries = Vec::new();
    let mut reader = LogReader::new(&log[..])?;
    let mut exit = 1u64;
    while let Some(entry) = reader.next_entry()? {
        let op: u8 = match entry.kind {
            EntryKind::Clock => 0,
            EntryKind::Entropy => 1,
            EntryKind::Input => 2 | 8,
            EntryKind::Digest => 4,
            EntryKind::End => 7,
            _ => 5,
        };
        let advance = entry.exit.saturating_sub(exit).min(15) as u8;
        exit += u64::from(advance);
        requests.push(op | advance << 4);
        let mut bytes = Vec::new();
        entry.encode_into(&mut bytes);
        entries.push(bytes);
    }
    let mut replay = vec![requests.len().min(255) as u8];
    replay.extend_from_slice(&requests[..requests.len().min(255)]);
    replay.extend_from_slice(&log);
    seeds.put("replay", "fold", &replay)?;

    // Batches of real entries, as the sender frames them.
    for (name, range) in [("batch-first", 0..8), ("batch-all", 0..entries.len())] {
        let chosen = &entries[range];
        let payload: usize = chosen.iter().map(|e| entry_space(e.len())).sum();
        let mut buf = vec![0u8; channel::protocol::FRAME_HEADER_LEN + payload];
        let mut at = channel::protocol::FRAME_HEADER_LEN;
        for e in chosen {
            at = put_entry(&mut buf, at, e);
        }
        // Sealed as the primary's first frame (the target opens it as the
        // backup, with the same test keys).
        let mut sealer = FrameKeys::for_tests().sealer(Role::Primary);
        let len = seal(
            &mut buf,
            FrameKind::Batch,
            1,
            1,
            chosen.len() as u32,
            payload,
            &mut sealer,
        )?;
        seeds.put_mode("frame", name, 2, &buf[..len])?;
    }
    let mut ack = [0u8; FRAME_HEADER_LEN];
    let mut sealer = FrameKeys::for_tests().sealer(Role::Primary);
    channel::protocol::encode_control(&mut ack, FrameKind::Ack, 1, 5, &mut sealer)?;
    seeds.put_mode("frame", "ack", 2, &ack)?;

    // RxFrames: an ARP request and a TCP SYN as the guest receives them.
    let arp: Vec<u8> = [
        &[0xff; 6][..],
        &[0x02, 0, 0, 0, 0, 1],
        &[0x08, 0x06],
        &[0, 1, 8, 0, 6, 4, 0, 1],
        &[0x02, 0, 0, 0, 0, 1],
        &[10, 77, 0, 1],
        &[0; 6],
        &[10, 77, 0, 2],
    ]
    .concat();
    let syn: Vec<u8> = [
        &[0x02, 0x4c, 0x4b, 0x53, 0x54, 0x02][..],
        &[0x02, 0, 0, 0, 0, 1],
        &[0x08, 0x00],
        &[
            0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2,
        ],
        &[
            0x9c, 0x40, 0x18, 0xeb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ],
    ]
    .concat();
    let frames = encode_frames(&[arp.clone(), syn.clone()]);
    seeds.put("rx_frames", "arp-syn", &frames)?;
    // Packed: the ARP, the SYN, then the next segment of the same flow
    // (identification + 1, sequence + 1) so that a delta record is there.
    let mut next = syn.clone();
    next[19] = 2;
    next[41] = 2;
    let packed = channel::log::packed::encode_vec(&[arp, syn, next])
        .map_err(|index| std::io::Error::other(format!("frame {index} does not pack")))?;
    seeds.put("rx_frames_packed", "arp-syn-next", &packed)?;
    let mut packed_entry = Vec::new();
    encode_entry(
        EntryKind::RxFramesPacked,
        0,
        9,
        40,
        &packed,
        &mut packed_entry,
    );
    seeds.put_mode("log_entry", "rx-frames-packed", 0, &packed_entry)?;
    let mut rx_entry = Vec::new();
    encode_entry(EntryKind::RxFrames, 0, 9, 40, &frames, &mut rx_entry);
    seeds.put_mode("log_entry", "rx-frames", 0, &rx_entry)?;

    // The handshake: what a real backup endpoint sends a primary.
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    let session = |role| Session {
        vm_id: 7,
        generation: 3,
        role,
        key: b"fuzzing key, 32 bytes long......".to_vec(),
    };
    let backup = std::thread::spawn(move || {
        let mut b = b;
        let _ = channel::protocol::handshake(&mut b, &session(Role::Backup), PROTOCOL_VERSION);
    });
    let mut recorder = Recorder {
        inner: a,
        seen: Vec::new(),
    };
    let _ = channel::protocol::handshake(&mut recorder, &session(Role::Primary), PROTOCOL_VERSION);
    let _ = backup.join();
    seeds.put_mode("handshake", "backup-peer", 0, &recorder.seen)?;

    // State streams captured from real guests.
    let fold = capture(guests, "fold", &VmConfig::default(), 200, 40, 2)?;
    seeds.put_mode("state_stream", "fold", 0, &fold)?;
    let net_config = VmConfig {
        mac: Some(vmm::DEFAULT_MAC),
        mem_size: 32 << 20,
        ..VmConfig::default()
    };
    let net = capture(guests, "net", &net_config, 0, 30, 1)?;
    seeds.put_mode("state_stream", "net", 0, &net)?;
    for (kind, payload) in chunks(&net) {
        match kind {
            3 => seeds.put("vcpu_state", "net", &payload)?,
            5 => seeds.put(
                "virtio_net_state",
                "net",
                &payload[..nic::virtio::VIRTIO_NET_STATE_LEN],
            )?,
            _ => {}
        }
    }

    // The arbiter: requests and replies as the encoders write them, and the
    // state file of a real embedded arbiter after a register and a failover.
    let key = arbiter::Key::new(b"fuzzing key, 32 bytes long......")?;
    let id = |s: &str| arbiter::ReplicaId::new(s);
    let nonce = [7u8; 16];
    use arbiter::protocol::{Answer, Command, Status, encode_reply, encode_request};
    for (name, command) in [
        ("read", Command::Read { vm: 7 }),
        (
            "tas",
            Command::TestAndSet {
                vm: 7,
                expected: 1,
                candidate: id("b")?,
            },
        ),
        (
            "register",
            Command::Register {
                vm: 7,
                expected: 0,
                primary: id("a")?,
                backup: id("b")?,
            },
        ),
    ] {
        seeds.put_mode(
            "arbiter_request",
            name,
            0,
            &encode_request(&key, &nonce, &command),
        )?;
    }
    let record = arbiter::VmRecord {
        generation: 2,
        primary: id("a")?,
        backup: Some(id("b")?),
    };
    for (name, status, answer) in [
        ("won", Status::Ok, Some(Answer::Won(record.clone()))),
        ("absent", Status::Ok, Some(Answer::Absent)),
        (
            "lost",
            Status::Ok,
            Some(Answer::Lost {
                reason: arbiter::Loss::Superseded,
                current: Some(record.clone()),
            }),
        ),
        ("bad-mac", Status::AuthenticationFailed, None),
    ] {
        seeds.put_mode(
            "arbiter_reply",
            name,
            0,
            &encode_reply(&key, status, &nonce, answer.as_ref()),
        )?;
    }
    let dir = std::env::temp_dir().join(format!("seedgen-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let state = dir.join("arbiter.state");
    let server = arbiter::server::spawn(
        std::net::TcpListener::bind("127.0.0.1:0")?,
        &state,
        key.clone(),
    )?;
    {
        use arbiter::Arbiter as _;
        let client =
            arbiter::EmbeddedArbiter::connect(server.local_addr(), key, Duration::from_secs(5))?;
        client.register(7, 0, &id("a")?, &id("b")?)?;
        client.register(9, 0, &id("primary-9")?, &id("backup-9")?)?;
        client.test_and_set(7, 1, &id("b")?)?;
    }
    server.shutdown();
    seeds.put_mode("arbiter_state", "two-vms", 0, &fs::read(&state)?)?;
    let _ = fs::remove_dir_all(&dir);

    // etcd: a range response and its value, as etcd's v3 JSON gateway sends them.
    let value = arbiter::etcd::format_value(&record);
    let json = format!(
        "{{\"header\":{{\"cluster_id\":\"14841639068965178418\",\"member_id\":\"10276657743932975437\",\"revision\":\"5\",\"raft_term\":\"2\"}},\"kvs\":[{{\"key\":\"L2xvY2tzdGVwL3ZtLzc=\",\"create_revision\":\"4\",\"mod_revision\":\"5\",\"version\":\"2\",\"value\":\"{}\"}}],\"count\":\"1\"}}",
        base64_encode(value.as_bytes())
    );
    let http = format!(
        "HTTP/1.1 200 OK\r\nAccess-Control-Allow-Headers: accept, content-type, authorization\r\nContent-Type: application/json\r\nGrpc-Metadata-Content-Type: application/grpc\r\nDate: Tue, 01 Dec 2026 19:00:00 GMT\r\nContent-Length: {}\r\n\r\n{json}",
        json.len()
    );
    seeds.put_mode("etcd_response", "range", 0, http.as_bytes())?;
    let chunked = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{json}\r\n0\r\n\r\n",
        json.len()
    );
    seeds.put_mode("etcd_response", "range-chunked", 0, chunked.as_bytes())?;
    seeds.put_mode("etcd_response", "value", 1, value.as_bytes())?;

    // The join request.
    let mut join = b"LKJN".to_vec();
    join.extend_from_slice(&7u16.to_le_bytes());
    join.extend_from_slice(b"joiner1");
    seeds.put_mode("join_request", "joiner", 0, &join)?;

    // RDMA: an info block as an endpoint encodes it, and a status block.
    use channel::transport::rdma::PeerInfo;
    let info = PeerInfo {
        qpn: 0x11,
        psn: 0x2345,
        gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1],
        lid: 0,
        mtu: 3,
        ring_rkey: 0x77,
        ring_addr: 0x7f00_0000_0000,
        ring_bytes: 1 << 22,
        status_rkey: 0x78,
        recv_depth: 256,
        status_addr: 0x7f00_1000_0000,
        max_frame: 1 << 20,
    };
    let block = info.encode(
        b"fuzzing key, 32 bytes long......",
        Role::Primary,
        &[0x5a; 64],
    )?;
    seeds.put_mode("rdma_info", "primary", 0, &block)?;

    // Operation lists: a well-behaved driver or peer, for the fuzzer to mutate.
    let mut virtio = vec![1u8];
    virtio.extend_from_slice(&[4, 0x00, 0x40, 72, 0]);
    virtio.extend_from_slice(&[0; 12]);
    virtio.extend((0..60u8).map(|i| i.wrapping_mul(3)));
    virtio.extend_from_slice(&[3, 0, 0, 0, 0, 0, 72, 0, 0, 0, 6]);
    virtio.extend_from_slice(&[2, 0, 0, 0x00, 0x10, 0, 0x00, 0x08, 2, 0]);
    virtio.extend_from_slice(&[5, 1, 0xaa, 60, 0, 7, 6, 5, 0]);
    seeds.put("virtio_net", "tx-rx-save", &virtio)?;
    let mut shm = vec![2u8];
    for len in [10u8, 100, 3, 60] {
        shm.extend_from_slice(&[0, len, 0, len, 2]);
    }
    shm.extend_from_slice(&[0, 120, 0, 9, 0, 120, 0, 9, 2, 2, 2]);
    seeds.put("shm_ring", "honest", &shm)?;
    let mut frame = [0u8; FRAME_HEADER_LEN];
    let mut sealer = FrameKeys::for_tests().sealer(Role::Primary);
    channel::protocol::encode_control(&mut frame, FrameKind::Heartbeat, 1, 3, &mut sealer)?;
    let mut rdma = vec![0u8, 0, 4, 0, 0, 0, 32, 0];
    rdma.extend_from_slice(&frame);
    rdma.extend_from_slice(&[
        1, 32, 0, 0, 0, 0, 3, 3, 4, 40, 0, 0, 0, 5, 0, 6, 40, 0, 0, 0, 0, 0, 0, 0, 7,
    ]);
    seeds.put("rdma_ring", "one-frame", &rdma)?;

    // RESP: what redis-cli and redis-benchmark send.
    seeds.put_mode("resp", "benchmark", 128, b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$16\r\nkey:__rand_int__\r\n$3\r\nxxx\r\n*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n")?;
    seeds.put_mode("resp", "cli", 200, b"*2\r\n$7\r\nCOMMAND\r\n$4\r\nDOCS\r\nPING\r\n*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$20\r\n-9223372036854775808\r\n")?;
    Ok(())
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
