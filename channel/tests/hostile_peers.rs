//! Hostile peers against the channel's listeners, over real sockets on
//! 127.0.0.1 and unix sockets: io_uring TCP ([`UringTcp::accept`]) and
//! shared memory ([`ShmListener::accept`]). RDMA sets up over the same
//! TCP handshake and is exercised only inside the soft-RoCE guests.
//!
//! A channel listener accepts one peer per call by design (the backup's
//! accept loop in `replica` calls it again, and runs handshakes side by
//! side): each hostile peer must get a clear error, bounded in time, never
//! a panic, and a legitimate peer that connects after it is then served.
//! The handshake itself is run for 100 slow peers at once next to a
//! legitimate one, which completes at once while the slow ones are cut
//! off at the handshake's overall deadline.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use channel::protocol::{
    HANDSHAKE_LEN, HANDSHAKE_TIMEOUT, HandshakeError, PROTOCOL_VERSION, Role, Session, handshake,
};
use channel::transport::shm::{ShmListener, ShmTransport};
use channel::transport::uring_tcp::UringTcp;
use channel::transport::{Transport, TransportError};

const KEY: &[u8] = b"hostile-peer test key, thirty-two bytes+";

fn session(role: Role) -> Session {
    Session {
        vm_id: 0x4057,
        generation: 7,
        role,
        key: KEY.to_vec(),
    }
}

/// What a hostile peer does once connected.
#[derive(Clone, Copy, Debug)]
enum Attack {
    /// 64 random bytes.
    Garbage,
    /// An HTTP request (shorter than a handshake message).
    Http,
    /// A legitimate primary's recorded Hello, Proof and Verdict, replayed.
    Replay,
    /// A Hello with VM id and generation 2^64-1, where a Nonce belongs.
    HugeValues,
    /// Connects and says nothing.
    Silent,
    /// One byte of a Hello every 300 ms.
    Drip,
}

const ATTACKS: [Attack; 6] = [
    Attack::Garbage,
    Attack::Http,
    Attack::Replay,
    Attack::HugeValues,
    Attack::Silent,
    Attack::Drip,
];

/// A stream that records what it reads.
struct Recorder<S> {
    inner: S,
    read: Vec<u8>,
}

impl<S: Read> Read for Recorder<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl<S: Write> Write for Recorder<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The bytes a legitimate primary sends in a complete handshake (recorded
/// by a backup of the same key).
fn recorded_primary() -> Vec<u8> {
    let (a, b) = UnixStream::pair().expect("pair");
    let primary = std::thread::spawn(move || {
        let mut a = a;
        handshake(&mut a, &session(Role::Primary), PROTOCOL_VERSION).expect("primary")
    });
    let mut rec = Recorder {
        inner: b,
        read: Vec::new(),
    };
    handshake(&mut rec, &session(Role::Backup), PROTOCOL_VERSION).expect("backup");
    primary.join().expect("primary thread");
    // Nonce, Proof, Hello, Verdict.
    assert_eq!(rec.read.len(), 4 * HANDSHAKE_LEN);
    rec.read
}

/// A handshake message of `msg_type` (1 Hello, 2 Proof, 4 Nonce) from a
/// peer of `role` on `side` (1 connecting, 2 accepting).
fn message(msg_type: u16, role: u16, side: u16, a: u64, b: u64, data: u8) -> Vec<u8> {
    let mut m = Vec::with_capacity(HANDSHAKE_LEN);
    m.extend_from_slice(b"LKSTPCHN");
    m.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    m.extend_from_slice(&msg_type.to_le_bytes());
    m.extend_from_slice(&role.to_le_bytes());
    m.extend_from_slice(&side.to_le_bytes());
    m.extend_from_slice(&a.to_le_bytes());
    m.extend_from_slice(&b.to_le_bytes());
    m.extend_from_slice(&[data; 32]);
    m
}

/// A primary's Hello naming `vm` and `generation` (with a made-up MAC).
fn hello(vm: u64, generation: u64) -> Vec<u8> {
    message(1, 1, 0, vm, generation, 0x42)
}

/// Plays `attack` on a connected stream, then holds it until the listener
/// hangs up (or 30 s pass).
fn play<S: Read + Write>(attack: Attack, mut s: S) {
    let _ = match attack {
        Attack::Garbage => {
            let mut junk = [0u8; 64];
            for (i, b) in junk.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(151).wrapping_add(17);
            }
            s.write_all(&junk)
        }
        Attack::Http => s.write_all(b"GET / HTTP/1.0\r\n\r\n"),
        Attack::Replay => s.write_all(&recorded_primary()),
        Attack::HugeValues => s.write_all(&hello(u64::MAX, u64::MAX)),
        Attack::Silent => Ok(()),
        Attack::Drip => {
            for b in hello(0x4057, 7) {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            Ok(())
        }
    };
    let mut sink = [0u8; 256];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

/// The error a listener must report for `attack`, as text to find in it.
fn expected(attack: Attack) -> &'static str {
    match attack {
        Attack::Garbage | Attack::Http => "another protocol",
        Attack::Replay => "wrong key",
        Attack::HugeValues => "unexpected handshake message: expected type 4, got 1",
        Attack::Silent | Attack::Drip => "did not complete the handshake",
    }
}

fn check(transport: &str, attack: Attack, result: Result<(), TransportError>, took: Duration) {
    let error = result
        .err()
        .unwrap_or_else(|| panic!("{transport}: {attack:?} was accepted"));
    let text = channel::testkit::error_chain(&error);
    assert!(
        text.contains(expected(attack)),
        "{transport}: {attack:?}: {text}"
    );
    assert!(
        matches!(error, TransportError::Handshake(_)),
        "{transport}: {attack:?}: {error:?}"
    );
    let bound = match attack {
        Attack::Silent | Attack::Drip => HANDSHAKE_TIMEOUT + Duration::from_secs(3),
        _ => Duration::from_secs(3),
    };
    assert!(
        took < bound,
        "{transport}: {attack:?} held the listener {took:?}"
    );
    eprintln!("{transport}: {attack:?} refused after {took:?}: {text}");
}

/// A legitimate primary, talking after the hostile one: it must be served.
fn legitimate<T: Transport>(mut t: T) {
    t.poll().expect("poll");
}

#[test]
fn uring_tcp_listener_refuses_each_hostile_peer_then_serves_the_primary() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    std::thread::scope(|scope| {
        for attack in ATTACKS {
            let hostile =
                scope.spawn(move || play(attack, TcpStream::connect(address).expect("c")));
            // The hostile peer is first in the backlog; the primary next
            // (after a silent or slow one is cut off, as its own handshake
            // bound equals ours: the replica's accept loop runs handshakes
            // side by side, see the 100-peer test).
            std::thread::sleep(Duration::from_millis(100));
            let connect = move || UringTcp::connect(address, &session(Role::Primary), 1 << 20);
            let slow = matches!(attack, Attack::Silent | Attack::Drip);
            let mut primary = (!slow).then(|| scope.spawn(connect));
            let start = Instant::now();
            let result = UringTcp::accept(&listener, &session(Role::Backup), 1 << 20).map(|_| ());
            check("uring-tcp", attack, result, start.elapsed());
            let primary = primary.take().unwrap_or_else(|| scope.spawn(connect));
            let backup = UringTcp::accept(&listener, &session(Role::Backup), 1 << 20)
                .expect("the legitimate primary is served after the hostile peer");
            legitimate(primary.join().expect("thread").expect("primary"));
            drop(backup);
            hostile.join().expect("hostile peer thread");
        }
    });
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "lockstep-hostile-{name}-{}.sock",
        std::process::id()
    ))
}

#[test]
fn shm_listener_refuses_each_hostile_peer_then_serves_the_primary() {
    let path = socket_path("shm");
    let listener = ShmListener::bind(&path).expect("bind");
    std::thread::scope(|scope| {
        for attack in ATTACKS {
            let p = path.clone();
            let hostile = scope.spawn(move || play(attack, UnixStream::connect(&p).expect("c")));
            std::thread::sleep(Duration::from_millis(100));
            let p = path.clone();
            let connect = move || ShmTransport::connect(&p, &session(Role::Primary));
            let slow = matches!(attack, Attack::Silent | Attack::Drip);
            let mut primary = (!slow).then(|| scope.spawn(connect.clone()));
            let start = Instant::now();
            let result = listener
                .accept(&session(Role::Backup), 64 << 10)
                .map(|_| ());
            check("shm", attack, result, start.elapsed());
            let primary = primary.take().unwrap_or_else(|| scope.spawn(connect));
            let backup = listener
                .accept(&session(Role::Backup), 64 << 10)
                .expect("the legitimate primary is served after the hostile peer");
            legitimate(primary.join().expect("thread").expect("primary"));
            drop(backup);
            hostile.join().expect("hostile peer thread");
        }
    });
    let _ = std::fs::remove_file(&path);
}

/// 100 peers dripping bytes connect at once, then a legitimate primary; the
/// handshakes run side by side (as the backup's accept loop runs them): the
/// primary is served at once, every slow peer is cut off at the overall
/// handshake deadline with a clear error, and nothing panics.
#[test]
fn a_hundred_slow_peers_at_once_do_not_delay_a_legitimate_one() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    std::thread::scope(|scope| {
        for _ in 0..100 {
            scope.spawn(move || play(Attack::Drip, TcpStream::connect(address).expect("c")));
        }
        let mut slow = Vec::new();
        for _ in 0..100 {
            let (stream, _) = listener.accept().expect("accept");
            slow.push(scope.spawn(move || {
                let start = Instant::now();
                let r = UringTcp::establish_accepted(stream, &session(Role::Backup), 1 << 20);
                (r.map(|_| ()), start.elapsed())
            }));
        }
        let primary =
            scope.spawn(move || UringTcp::connect(address, &session(Role::Primary), 1 << 20));
        let (stream, _) = listener.accept().expect("accept the primary");
        let start = Instant::now();
        let backup = UringTcp::establish_accepted(stream, &session(Role::Backup), 1 << 20)
            .expect("the legitimate primary");
        let served = start.elapsed();
        legitimate(primary.join().expect("thread").expect("primary"));
        drop(backup);
        assert!(served < Duration::from_secs(3), "served after {served:?}");
        for handle in slow {
            let (result, took) = handle.join().expect("a slow peer's handshake panicked");
            check("uring-tcp x100", Attack::Drip, result, took);
        }
        eprintln!("the legitimate primary was served in {served:?} beside 100 slow peers");
    });
}

/// Authenticated frames are refused when forged by a peer that passed no
/// handshake with our key, and absurd lengths (2^32-1 announced) are a
/// clear error, not an allocation or a panic.
#[test]
fn absurd_frame_lengths_and_unauthenticated_frames_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    // The "primary" passes the handshake (it holds the key), then writes
    // raw bytes behind any transport.
    let primary = std::thread::spawn(move || {
        let mut raw = TcpStream::connect(address).expect("connect");
        handshake(&mut raw, &session(Role::Primary), PROTOCOL_VERSION).expect("handshake");
        raw
    });
    let (stream, _) = listener.accept().expect("accept");
    let mut backup =
        UringTcp::establish_accepted(stream, &session(Role::Backup), 1 << 20).expect("backup");
    let mut raw = primary.join().expect("thread");
    let mut header = [0u8; channel::protocol::FRAME_HEADER_LEN];
    header[..2].copy_from_slice(&1u16.to_le_bytes());
    header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    raw.write_all(&header).expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        assert!(Instant::now() < deadline, "no error for a 4 GiB frame");
        match backup
            .poll()
            .and_then(|_| backup.recv().map(|f| f.is_some()))
        {
            Err(e) => break e,
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    assert!(
        matches!(error, TransportError::FrameTooLarge { len, .. } if len == header.len() + u32::MAX as usize),
        "{error:?}"
    );
    let _ = HandshakeError::Closed; // the type is public for callers matching on it
}

/// Reads everything `s` sends until it hangs up (or 20 s pass).
fn drain<S: Read>(mut s: S) -> Vec<u8> {
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    answer
}

/// What a peer without the key got from an end, checked message by
/// message: only Nonces (protocol, role, side, random bytes), Proofs (a
/// MAC over nonces, from a connecting end only) and Verdicts whose values
/// carry no secret; never a Hello, never the VM id or the generation.
fn assert_learned_nothing(what: &str, answer: &[u8], proofs_allowed: bool) {
    assert!(!answer.is_empty(), "{what}: not even a Nonce");
    let secrets = [
        session(Role::Primary).vm_id.to_le_bytes(),
        session(Role::Primary).generation.to_le_bytes(),
    ];
    for (i, m) in answer.chunks(HANDSHAKE_LEN).enumerate() {
        assert_eq!(m.len(), HANDSHAKE_LEN, "{what}: message {i} cut: {m:?}");
        assert_eq!(&m[..8], b"LKSTPCHN", "{what}: message {i}: {m:?}");
        let msg_type = u16::from_le_bytes([m[10], m[11]]);
        match msg_type {
            4 => {}
            2 if proofs_allowed => {}
            3 => {}
            _ => panic!("{what}: message {i} is of type {msg_type} (1 = Hello): {m:?}"),
        }
        for secret in &secrets {
            assert!(
                m[16..32].chunks(8).all(|value| value != secret),
                "{what}: message {i} names the VM id or generation: {m:?}"
            );
        }
    }
    eprintln!("{what}: got {} bytes, none about the VM", answer.len());
}

/// Issue 13, item 7: a peer that knows the VM id and the generation (they
/// are guessable) but not the key gets nothing from a listening backup
/// but a Nonce and a refusal: neither by sending a primary's Hello first
/// (before protocol 3 the backup answered it with its own Hello), nor by
/// sending a well-formed Nonce and a made-up proof. On both listeners.
#[test]
fn a_listening_backup_tells_a_peer_without_the_key_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let path = socket_path("keyless");
    let shm = ShmListener::bind(&path).expect("bind");
    let attacks: [(&str, Vec<u8>, &str); 2] = [
        (
            "a Hello first",
            hello(0x4057, 7),
            "unexpected handshake message",
        ),
        (
            "a Nonce and a made-up proof",
            [message(4, 1, 1, 0, 0, 0x11), message(2, 0, 0, 0, 0, 0x22)].concat(),
            "wrong key",
        ),
    ];
    for (name, bytes, error) in attacks {
        let sent = bytes.clone();
        let peer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(address).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let _ = s.write_all(&sent);
            drain(s)
        });
        let refused = UringTcp::accept(&listener, &session(Role::Backup), 1 << 20)
            .err()
            .expect("a peer without the key was accepted");
        let answer = peer.join().expect("peer thread");
        assert_learned_nothing(&format!("uring-tcp backup, {name}"), &answer, false);
        assert!(
            channel::testkit::error_chain(&refused).contains(error),
            "{name}: {refused:?}"
        );

        let p = path.clone();
        let sent = bytes.clone();
        let peer = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&p).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let _ = s.write_all(&sent);
            drain(s)
        });
        let refused = shm
            .accept(&session(Role::Backup), 64 << 10)
            .err()
            .expect("a peer without the key was accepted");
        let answer = peer.join().expect("peer thread");
        assert_learned_nothing(&format!("shm backup, {name}"), &answer, false);
        assert!(
            channel::testkit::error_chain(&refused).contains(error),
            "{name}: {refused:?}"
        );
    }
    let _ = std::fs::remove_file(&path);
}

/// Issue 13, item 7, the other way: a primary that connects to a listener
/// without the key (an impostor at the backup's address) sends it its
/// Nonce and its proof, then refuses the impostor's made-up proof: never
/// its Hello, the VM id or the generation (before protocol 3 its Hello
/// was its first message). Over TCP and the shm socket.
#[test]
fn a_connecting_primary_tells_an_impostor_backup_nothing() {
    let impostor = |mut s: Box<dyn ReadWrite + Send>| {
        let _ = s.write_all(&message(4, 2, 2, 0, 0, 0x33));
        let mut first = vec![0u8; 2 * HANDSHAKE_LEN];
        // The primary's Nonce and proof; the impostor can't check it.
        let _ = s.read_exact(&mut first);
        let _ = s.write_all(&message(2, 0, 0, 0, 0, 0x44));
        let mut rest = drain(s);
        first.append(&mut rest);
        first
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let peer = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        impostor(Box::new(s))
    });
    let refused = UringTcp::connect(address, &session(Role::Primary), 1 << 20)
        .err()
        .expect("the primary accepted an impostor");
    assert_learned_nothing("uring-tcp primary", &peer.join().expect("impostor"), true);
    assert!(
        channel::testkit::error_chain(&refused).contains("wrong key"),
        "{refused:?}"
    );

    let path = socket_path("impostor");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let peer = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        impostor(Box::new(s))
    });
    let refused = ShmTransport::connect(&path, &session(Role::Primary))
        .err()
        .expect("the primary accepted an impostor");
    assert_learned_nothing("shm primary", &peer.join().expect("impostor"), true);
    assert!(
        channel::testkit::error_chain(&refused).contains("wrong key"),
        "{refused:?}"
    );
    let _ = std::fs::remove_file(&path);
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Receives the memfd a listener shares, with the transport's own code.
fn recv_fd(sock: &UnixStream) -> std::os::fd::OwnedFd {
    channel::transport::shm::recv_fd(sock).expect("the listener's memfd")
}

/// Shares `fd` over `sock`, as a listener does.
fn send_fd(sock: &UnixStream, fd: i32) {
    channel::transport::shm::send_fd(sock, fd).expect("share the memfd");
}

/// A shared mapping of a whole memfd.
struct Shared {
    ptr: *mut u8,
    len: usize,
}

impl Shared {
    fn map(fd: &std::os::fd::OwnedFd, len: usize) -> Self {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of `len` bytes of a file we hold
        // open; nothing else in this process uses that address range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    /// Writes `bytes` at `offset`, volatile (the other process reads it).
    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: in bounds (checked above) of a live mapping.
            unsafe { self.ptr.add(offset + i).write_volatile(b) };
        }
    }

    /// Stores a ring index at `offset` as the peer's ring code does.
    fn store_index(&self, offset: usize, value: u64) {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len);
        // SAFETY: 8-aligned (the mapping is page-aligned), in bounds, and
        // only ever accessed atomically by either process.
        let word = unsafe { &*self.ptr.add(offset).cast::<std::sync::atomic::AtomicU64>() };
        word.store(value, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned; no reference into it
        // outlives this value.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Region layout (channel/src/transport/shm.rs): ring 0 (primary to
/// backup) has its tail at 256 and its data at 4096.
const RING0_TAIL: usize = 256;
const RING0_DATA: usize = 4096;
const SHM_RING: usize = 64 << 10;

/// Issue 13: a primary that passed the handshake on the shm transport (it
/// holds the key) and then writes what it likes into the shared ring:
/// garbage and torn record headers, lengths of 2^32-16, a wrap marker
/// where none belongs, indices outside the ring, a frame under another
/// connection's key, a frame header announcing more than its record. The
/// backup's end reports each as a clear error on the bytes it copied out,
/// and never panics or reads outside the region.
#[test]
fn a_hostile_shm_primary_writing_the_ring_gets_clear_errors() {
    use channel::protocol::{
        FRAME_HEADER_LEN, FrameError, FrameKind, decode_frame, decode_frame_prehashed, seal,
    };
    let path = socket_path("ring");
    let listener = ShmListener::bind(&path).expect("bind");
    // What the peer writes, and the error the backup must give.
    type Write = fn(&Shared, &channel::protocol::FrameKeys);
    let cases: [(&str, Write, &str); 8] = [
        (
            "a record length of 2^32-16",
            |m, _| {
                m.write(RING0_DATA, &(u32::MAX - 15).to_le_bytes());
                m.store_index(RING0_TAIL, 16);
            },
            "record runs past the peer's tail",
        ),
        (
            "a tail 2^40 bytes ahead",
            |m, _| m.store_index(RING0_TAIL, 1 << 40),
            "peer's tail is outside the ring",
        ),
        (
            "a tail inside a record prefix",
            |m, _| m.store_index(RING0_TAIL, 4),
            "peer's tail is outside the ring",
        ),
        (
            "a tail of 2^64-1",
            |m, _| m.store_index(RING0_TAIL, u64::MAX),
            "peer's tail is outside the ring",
        ),
        (
            "a wrap marker at the start",
            |m, _| {
                m.write(RING0_DATA, &u32::MAX.to_le_bytes());
                m.store_index(RING0_TAIL, 16);
            },
            "peer's tail is outside the ring",
        ),
        (
            "garbage in a well-formed record",
            |m, _| {
                m.write(RING0_DATA, &64u32.to_le_bytes());
                m.write(RING0_DATA + 8, &[0xab; 64]);
                m.store_index(RING0_TAIL, 72);
            },
            "truncated frame",
        ),
        (
            "a frame sealed under another connection's keys",
            |m, _| {
                let other = channel::protocol::FrameKeys::derive(KEY, &[3; 64], 0x4057, 7);
                let mut frame = vec![0u8; FRAME_HEADER_LEN + 8];
                let mut sealer = other.sealer(Role::Primary);
                seal(&mut frame, FrameKind::Batch, 7, 1, 0, 8, &mut sealer).expect("seal");
                m.write(RING0_DATA, &(frame.len() as u32).to_le_bytes());
                m.write(RING0_DATA + 8, &frame);
                m.store_index(RING0_TAIL, 8 + frame.len() as u64);
            },
            "authentication tag does not verify",
        ),
        (
            "a frame header announcing 100 bytes in a 56-byte record",
            |m, keys| {
                let mut frame = vec![0u8; FRAME_HEADER_LEN + 100];
                let mut sealer = keys.sealer(Role::Primary);
                seal(&mut frame, FrameKind::Batch, 7, 1, 0, 100, &mut sealer).expect("seal");
                m.write(RING0_DATA, &(FRAME_HEADER_LEN as u32).to_le_bytes());
                m.write(RING0_DATA + 8, &frame[..FRAME_HEADER_LEN]);
                m.store_index(RING0_TAIL, 8 + FRAME_HEADER_LEN as u64);
            },
            "truncated frame",
        ),
    ];
    // Each case twice: through `recv` and `decode_frame`, and through the
    // path the receiver takes, where the ring end hashes the frame as it
    // copies it (`recv_prehashed`, `decode_frame_prehashed`).
    for ((what, write, expected), prehashed) in
        cases.into_iter().flat_map(|c| [(c, false), (c, true)])
    {
        let p = path.clone();
        let peer = std::thread::spawn(move || {
            let mut sock = UnixStream::connect(&p).expect("connect");
            let established =
                handshake(&mut sock, &session(Role::Primary), PROTOCOL_VERSION).expect("hs");
            let fd = recv_fd(&sock);
            (sock, fd, established.keys)
        });
        let mut backup = listener
            .accept(&session(Role::Backup), SHM_RING)
            .expect("the peer holds the key");
        let (sock, fd, keys) = peer.join().expect("peer");
        let region = Shared::map(&fd, 4096 + 2 * SHM_RING);
        write(&region, &keys);
        let mut opener = backup.frame_keys().opener(Role::Backup);
        let received = if prehashed {
            backup.recv_prehashed(&opener)
        } else {
            backup.recv().map(|f| f.map(|f| (f, None)))
        };
        let error = match received {
            Err(e) => channel::testkit::error_chain(&e),
            Ok(Some((frame, pre))) => {
                let e = if prehashed {
                    decode_frame_prehashed(frame, 7, 1, &mut opener, pre)
                } else {
                    decode_frame(frame, 7, 1, &mut opener)
                }
                .expect_err("a hostile frame was accepted");
                assert!(
                    matches!(e, FrameError::Corrupt { .. } | FrameError::Truncated { .. }),
                    "{what}: {e:?}"
                );
                e.to_string()
            }
            Ok(None) => panic!("{what}: nothing seen"),
        };
        assert!(
            error.contains(expected),
            "{what} (prehashed {prehashed}): {error}"
        );
        eprintln!("shm ring, {what} (prehashed {prehashed}): {error}");
        drop((sock, region));
    }
    let _ = std::fs::remove_file(&path);
}

/// Issue 13: an impostor listener that holds the key (so the handshake
/// passes) shares a sealed memfd of the wrong size or layout: smaller
/// than its header, a bad magic, ring sizes of 2^64-1, 48 KiB (not a
/// power of two) or one the file does not hold. The connecting primary
/// refuses each before it uses the region.
#[test]
fn a_region_of_the_wrong_size_or_layout_is_refused() {
    use std::os::fd::{AsRawFd, FromRawFd};
    let cases: [(&str, usize, &[u8; 8], u64, &str); 5] = [
        (
            "a memfd of 1 KiB",
            1024,
            b"LKSTPSHM",
            64 << 10,
            "smaller than its header",
        ),
        (
            "a bad magic",
            4096 + (128 << 10),
            b"LKSTPSHX",
            64 << 10,
            "bad magic",
        ),
        (
            "a ring of 2^64-1",
            4096 + (128 << 10),
            b"LKSTPSHM",
            u64::MAX,
            "does not match",
        ),
        (
            "a ring of 48 KiB",
            4096 + (96 << 10),
            b"LKSTPSHM",
            48 << 10,
            "does not match",
        ),
        (
            "a ring larger than the file",
            4096 + (128 << 10),
            b"LKSTPSHM",
            1 << 20,
            "does not match",
        ),
    ];
    for (what, total, magic, ring_bytes, expected) in cases {
        let path = socket_path("size");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let impostor = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().expect("accept");
            handshake(&mut sock, &session(Role::Backup), PROTOCOL_VERSION).expect("hs");
            // SAFETY: a NUL-terminated literal name.
            let raw = unsafe {
                libc::memfd_create(
                    c"hostile".as_ptr(),
                    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                )
            };
            assert!(raw >= 0);
            // SAFETY: raw is a fresh fd nothing else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
            // SAFETY: ftruncate on an fd we own.
            assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), total as i64) }, 0);
            {
                let map = Shared::map(&fd, total);
                let mut header = [0u8; 24];
                header[..8].copy_from_slice(magic);
                header[8..12].copy_from_slice(&u32::from(PROTOCOL_VERSION).to_le_bytes());
                header[16..24].copy_from_slice(&ring_bytes.to_le_bytes());
                map.write(0, &header[..header.len().min(total)]);
            }
            let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: fcntl(F_ADD_SEALS) on an fd we own.
            let sealed = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(sealed, 0);
            send_fd(&sock, fd.as_raw_fd());
            drain(sock)
        });
        let result = ShmTransport::connect(&path, &session(Role::Primary));
        let error = result.err().expect("a bad region was accepted");
        let text = channel::testkit::error_chain(&error);
        assert!(text.contains(expected), "{what}: {text}");
        eprintln!("shm region, {what}: {text}");
        impostor.join().expect("impostor");
        let _ = std::fs::remove_file(&path);
    }
}
