//! The two-process conformance tests of `two_process.rs`, over the RDMA
//! transport: this test process is the backup; the primary is this same
//! test binary re-run with only `peer_process` selected and its arguments in
//! `PEER_ENV`.
//!
//! They need an RDMA device (soft-RoCE in CI: `ci/softroce/run.sh` runs them
//! in a QEMU guest over `rdma_rxe`). Without one, each test checks that the
//! transport reports the missing device cleanly, says it skipped, and passes,
//! unless `LOCKSTEP_RDMA_REQUIRE=1`, which turns a missing device into a
//! failure (the CI guest sets it).
//!
//! Environment: `LOCKSTEP_RDMA_TEST_ADDR` (listen address, default
//! 127.0.0.1), `LOCKSTEP_RDMA_ENTRIES` (default 1 000 000), and the
//! `LOCKSTEP_RDMA_*` settings of `RdmaConfig::from_env`.
#![cfg(feature = "rdma")]

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use channel::endpoint::ChannelError;
use channel::protocol::{
    FRAME_HEADER_LEN, FrameKind, HandshakeError, PROTOCOL_VERSION, Role, Session, encode_control,
};
use channel::testkit::{BackupError, Content, RunSummary, error_chain, run_backup, run_primary};
use channel::transport::rdma::{AckMode, RdmaConfig, RdmaTransport, probe};
use channel::transport::{Transport, TransportError};
use tuning::Profile;

static SERIAL: Mutex<()> = Mutex::new(());

const GEN: u64 = 7;
const KEY: &str = "lockstep-test-key";
const PEER_ENV: &str = "LOCKSTEP_RDMA_TEST_PEER";

fn profile() -> Profile {
    // Soft-RoCE under TCG is slow and bursty: a longer peer timeout than the
    // two-core default, so only real failures trip it.
    let mut p = Profile::two_core();
    p.liveness.peer_timeout = Duration::from_secs(2);
    p.liveness.heartbeat = Duration::from_millis(20);
    p
}

fn max_frame() -> usize {
    profile().batch.max_bytes as usize + 4096
}

fn config(ack: AckMode) -> RdmaConfig {
    let mut c = RdmaConfig::from_env(max_frame()).expect("LOCKSTEP_RDMA_* settings");
    c.ack_mode = ack;
    c.setup_timeout = Duration::from_secs(20);
    c
}

fn entries() -> u64 {
    std::env::var("LOCKSTEP_RDMA_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn listen_addr() -> String {
    let ip = std::env::var("LOCKSTEP_RDMA_TEST_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    format!("{ip}:0")
}

/// True if an RDMA device is present; otherwise checks the clean error and
/// says the test is skipped (or fails under `LOCKSTEP_RDMA_REQUIRE=1`).
fn have_device(test: &str) -> bool {
    match probe() {
        Ok(devs) => {
            eprintln!("{test}: RDMA devices {devs:?}");
            true
        }
        Err(e) => {
            assert!(
                matches!(e, TransportError::NoRdmaDevice { .. }),
                "probe must report a missing device as NoRdmaDevice: {e:?}"
            );
            assert!(
                std::env::var("LOCKSTEP_RDMA_REQUIRE").as_deref() != Ok("1"),
                "{test}: LOCKSTEP_RDMA_REQUIRE=1 but {e}"
            );
            eprintln!("{test}: skipped: {e}");
            false
        }
    }
}

fn session(role: Role, generation: u64, key: &str) -> Session {
    Session {
        vm_id: 1,
        generation,
        role,
        key: key.as_bytes().to_vec(),
    }
}

/// Not a test when run normally: the body of the primary process.
#[test]
fn peer_process() {
    let Ok(args) = std::env::var(PEER_ENV) else {
        return;
    };
    let mut opt = std::collections::HashMap::new();
    for a in args.split_whitespace() {
        let (k, v) = a.split_once('=').unwrap_or((a, ""));
        opt.insert(k.to_string(), v.to_string());
    }
    let get = |k: &str| opt.get(k).cloned().unwrap_or_default();
    let num = |k: &str, d: u64| match opt.get(k).map(String::as_str) {
        Some("forever") => u64::MAX,
        Some(v) => v.parse().unwrap_or(d),
        None => d,
    };
    let ack = if get("ack") == "completion" {
        AckMode::SendCompletion
    } else {
        AckMode::BackupAck
    };
    let key = opt.get("key").cloned().unwrap_or_else(|| KEY.to_string());
    let s = session(Role::Primary, num("gen", GEN), &key);
    let version = num("version", u64::from(PROTOCOL_VERSION)) as u16;
    let corrupt_at = opt.get("corrupt_at").and_then(|v| v.parse().ok());
    let result = get("endpoint")
        .parse()
        .map_err(|e| format!("endpoint: {e}"))
        .and_then(|addr| {
            RdmaTransport::connect_with_version(addr, &s, &config(ack), version)
                .map_err(|e| error_chain(&e))
        })
        .and_then(|t| {
            run_primary(
                t,
                s.generation,
                &profile(),
                num("entries", 1000),
                num("size", 64) as usize,
                Content::Full,
                corrupt_at,
            )
            .map_err(|e| error_chain(&e))
        });
    let code = match result {
        Ok(sum) => {
            println!("OK entries={} digest={:08x}", sum.entries, sum.digest);
            0
        }
        Err(e) => {
            println!("ERR {e}");
            2
        }
    };
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code);
}

fn spawn_peer(endpoint: &str, extra: &[String]) -> Child {
    let mut args = vec![format!("endpoint={endpoint}")];
    args.extend_from_slice(extra);
    Command::new(std::env::current_exe().expect("own test binary"))
        .args(["--exact", "peer_process", "--nocapture", "--test-threads=1"])
        .env(PEER_ENV, args.join(" "))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the peer process")
}

fn peer_output(mut child: Child) -> String {
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(mut so) = child.stdout.take() {
        let _ = so.read_to_string(&mut out);
    }
    out.lines()
        .find_map(|l| {
            l.find("OK entries")
                .or_else(|| l.find("ERR "))
                .map(|i| l[i..].to_string())
        })
        .unwrap_or_default()
}

fn accept(extra: &[String], ack: AckMode) -> (Result<RdmaTransport, TransportError>, Child) {
    let l = TcpListener::bind(listen_addr()).expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let child = spawn_peer(&addr, extra);
    let t = RdmaTransport::accept(&l, &session(Role::Backup, GEN, KEY), &config(ack));
    (t, child)
}

fn backup(t: RdmaTransport, n: u64, progress: impl FnMut(u64)) -> Result<RunSummary, BackupError> {
    run_backup(t, GEN, &profile(), n, 64, Content::Full, progress)
}

fn stream(n: u64, ack: AckMode, label: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut extra = vec![format!("entries={n}"), "size=64".into()];
    if ack == AckMode::SendCompletion {
        extra.push("ack=completion".into());
    }
    let (t, child) = accept(&extra, ack);
    let t = t.expect("handshake and RDMA set-up");
    eprintln!(
        "{label}: device {}, peer qpn {}, peer ring {} KiB",
        t.device(),
        t.peer_info().qpn,
        t.peer_info().ring_bytes >> 10
    );
    let summary = backup(t, n, |_| {}).expect("all entries arrive, in order, verified");
    let out = peer_output(child);
    assert_eq!(summary.entries, n);
    assert!(
        out.contains(&format!("OK entries={n} digest={:08x}", summary.digest)),
        "peer: {out:?}, backup digest {:08x}",
        summary.digest
    );
    let m = &summary.metrics;
    eprintln!(
        "{label}: {} entries in {:?} ({:.0} entries/s), {} batches, {} acks, ack lag p50 {} ns",
        m.entries,
        summary.elapsed,
        m.entries as f64 / summary.elapsed.as_secs_f64().max(1e-9),
        m.batches,
        m.acks,
        m.ack_lag.value_at_quantile(0.5)
    );
}

#[test]
fn missing_device_is_a_clear_error() {
    let s = session(Role::Primary, GEN, KEY);
    let mut cfg = config(AckMode::BackupAck);
    cfg.device = Some("no-such-rdma-device".into());
    let start = Instant::now();
    // Nothing listens at this address: the device check must come first.
    let e = match RdmaTransport::connect("127.0.0.1:9".parse().expect("addr"), &s, &cfg) {
        Ok(_) => panic!("connected without a device"),
        Err(e) => e,
    };
    assert!(start.elapsed() < Duration::from_secs(5));
    let TransportError::NoRdmaDevice { detail } = &e else {
        panic!("unexpected {e:?}")
    };
    assert!(e.to_string().starts_with("no RDMA device found"), "{e}");
    eprintln!("missing device reported as: {e} ({detail})");
}

#[test]
fn million_entries_over_rdma() {
    if have_device("million_entries_over_rdma") {
        stream(entries(), AckMode::BackupAck, "rdma backup-ack");
    }
}

#[test]
fn entries_acked_on_send_completion() {
    if have_device("entries_acked_on_send_completion") {
        stream(
            entries() / 10,
            AckMode::SendCompletion,
            "rdma send-completion",
        );
    }
}

fn handshake_failure(extra: &[String]) -> (TransportError, String) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = vec!["entries=10".to_string()];
    args.extend_from_slice(extra);
    let (t, child) = accept(&args, AckMode::BackupAck);
    let err = match t {
        Ok(_) => panic!("handshake with {extra:?} should fail"),
        Err(e) => e,
    };
    (err, peer_output(child))
}

#[test]
fn wrong_key_is_rejected_and_named() {
    if !have_device("wrong_key_is_rejected_and_named") {
        return;
    }
    let (e, peer) = handshake_failure(&["key=not-the-key".into(), format!("gen={GEN}")]);
    assert!(
        matches!(e, TransportError::Handshake(HandshakeError::WrongKey)),
        "{e:?}"
    );
    assert!(peer.contains("wrong key"), "peer: {peer}");
}

#[test]
fn stale_generation_is_rejected_with_both_numbers() {
    if !have_device("stale_generation_is_rejected_with_both_numbers") {
        return;
    }
    let (e, peer) = handshake_failure(&[format!("gen={}", GEN - 1)]);
    assert!(
        matches!(e, TransportError::Handshake(HandshakeError::StaleGeneration { ours: GEN, theirs }) if theirs == GEN - 1),
        "{e:?}"
    );
    assert!(
        peer.contains("we are stale: we are at generation 6, the peer is at 7"),
        "peer: {peer}"
    );
}

#[test]
fn other_protocol_version_is_rejected_with_both_versions() {
    if !have_device("other_protocol_version_is_rejected_with_both_versions") {
        return;
    }
    let v = PROTOCOL_VERSION + 1;
    let (e, peer) = handshake_failure(&[format!("version={v}"), format!("gen={GEN}")]);
    assert!(
        matches!(e, TransportError::Handshake(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs }) if theirs == v),
        "{e:?}"
    );
    assert!(
        peer.contains(&format!("we speak {v}, the peer speaks {PROTOCOL_VERSION}")),
        "peer: {peer}"
    );
}

#[test]
fn corrupted_batch_is_rejected_naming_the_sequence() {
    if !have_device("corrupted_batch_is_rejected_naming_the_sequence") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (t, mut child) = accept(
        &[
            "entries=100000".into(),
            "corrupt_at=50000".into(),
            format!("gen={GEN}"),
        ],
        AckMode::BackupAck,
    );
    let t = t.expect("handshake");
    let e = backup(t, 100_000, |_| {}).expect_err("corruption must be caught");
    let BackupError::Channel { received, source } = &e else {
        panic!("{e:?}")
    };
    assert!(
        *received < 50_000 + 300,
        "received {received} past the corruption"
    );
    let ChannelError::Frame(f) = source else {
        panic!("{source:?}")
    };
    let msg = f.to_string();
    assert!(
        msg.contains("corrupt frame")
            && msg.contains(&format!("expected sequence number {}", received + 1)),
        "{msg}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn killed_peer_is_reported_within_the_timeout() {
    if !have_device("killed_peer_is_reported_within_the_timeout") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (t, mut child) = accept(
        &["entries=forever".into(), format!("gen={GEN}")],
        AckMode::BackupAck,
    );
    let t = t.expect("handshake");
    let mut killed_at = None;
    let e = backup(t, u64::MAX, |n| {
        if n > 100_000 && killed_at.is_none() {
            child.kill().expect("SIGKILL the peer");
            killed_at = Some(Instant::now());
        }
    })
    .expect_err("the channel must fail when the peer dies");
    let detected = killed_at.expect("killed").elapsed();
    let _ = child.wait();
    let timeout = profile().liveness.peer_timeout;
    let BackupError::Channel { source, .. } = &e else {
        panic!("{e:?}")
    };
    match source {
        ChannelError::PeerSilent { .. }
        | ChannelError::Transport(TransportError::Closed)
        | ChannelError::Transport(TransportError::PeerFailed { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        detected <= timeout + Duration::from_millis(500),
        "detected after {detected:?}: {}",
        error_chain(&e)
    );
    eprintln!(
        "peer death reported after {detected:?}: {}",
        error_chain(source)
    );
}

/// Issue 13: a peer without the key at the RDMA backup's TCP set-up port
/// (an HTTP request; a primary's Hello naming the right VM and generation)
/// is refused by the handshake that runs before any verbs, and gets
/// nothing but the backup's Nonce and a Verdict: never its Hello, VM id or
/// generation, never its RDMA info. Short: no queue pair is ever made.
#[test]
fn keyless_peers_at_the_rdma_set_up_port_learn_nothing() {
    if !have_device("keyless_peers_at_the_rdma_set_up_port_learn_nothing") {
        return;
    }
    use std::io::Write;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut hello = Vec::new();
    hello.extend_from_slice(b"LKSTPCHN");
    hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello.extend_from_slice(&1u16.to_le_bytes()); // Hello
    hello.extend_from_slice(&1u16.to_le_bytes()); // primary
    hello.extend_from_slice(&0u16.to_le_bytes());
    hello.extend_from_slice(&1u64.to_le_bytes()); // the VM id
    hello.extend_from_slice(&GEN.to_le_bytes());
    hello.extend_from_slice(&[0x42; 32]);
    for (what, bytes, expected) in [
        (
            "an HTTP request",
            b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            "another protocol",
        ),
        ("a primary's Hello", hello, "unexpected handshake message"),
    ] {
        let listener = TcpListener::bind(listen_addr()).expect("bind");
        let address = listener.local_addr().expect("address");
        let peer = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(address).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let _ = s.write_all(&bytes);
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            answer
        });
        let error = match RdmaTransport::accept(
            &listener,
            &session(Role::Backup, GEN, KEY),
            &config(AckMode::BackupAck),
        ) {
            Ok(_) => panic!("{what}: accepted without the key"),
            Err(e) => error_chain(&e),
        };
        let answer = peer.join().expect("peer");
        assert!(error.contains(expected), "{what}: {error}");
        assert!(answer.len() <= 128, "{what}: {} bytes", answer.len());
        for m in answer.chunks(64) {
            assert!(m.len() == 64 && m[..8] == *b"LKSTPCHN", "{what}: {m:?}");
            let kind = u16::from_le_bytes([m[10], m[11]]);
            assert!(kind == 4 || kind == 3, "{what}: message of type {kind}");
            assert!(
                m[16..32].chunks(8).all(|v| v != GEN.to_le_bytes()),
                "{what}: the generation was sent: {m:?}"
            );
        }
        eprintln!(
            "{what}: refused ({error}); the peer got {} bytes",
            answer.len()
        );
    }
}

/// Both ends in this process: an idle end sleeps in `wait` (on its
/// completion channel) instead of napping and polling again, and the
/// peer's write wakes it. Counts `wait` calls, not times: half a second of
/// silence may take a handful (early returns are allowed), never the
/// thousands of 50 µs naps it took before the ends had an event to sleep on.
#[test]
fn idle_end_sleeps_until_the_peer_writes() {
    if !have_device("idle_end_sleeps_until_the_peer_writes") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let l = TcpListener::bind(listen_addr()).expect("bind");
    let addr = l.local_addr().expect("addr");
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    let primary = std::thread::spawn(move || {
        let cfg = config(AckMode::BackupAck);
        let mut t =
            RdmaTransport::connect(addr, &session(Role::Primary, GEN, KEY), &cfg).expect("connect");
        go_rx.recv().expect("go");
        let mut sealer = t.frame_keys().sealer(Role::Primary);
        let len = loop {
            if let Some(buf) = t.reserve(FRAME_HEADER_LEN).expect("reserve") {
                break encode_control(buf, FrameKind::Heartbeat, GEN, 0, &mut sealer)
                    .expect("a heartbeat frame");
            }
            t.poll().expect("poll");
        };
        t.commit(len).expect("commit");
        // Alive until the backup has the frame (its close would wake it).
        while done_rx.try_recv().is_err() {
            t.poll().expect("poll");
            t.wait(None, Duration::from_millis(20)).expect("wait");
        }
    });
    let mut t = RdmaTransport::accept(
        &l,
        &session(Role::Backup, GEN, KEY),
        &config(AckMode::BackupAck),
    )
    .expect("accept");
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < Duration::from_millis(500) {
        t.poll().expect("poll");
        assert!(t.recv().expect("recv").is_none(), "nothing was sent yet");
        t.wait(None, Duration::from_millis(500)).expect("wait");
        calls += 1;
    }
    eprintln!("idle: {calls} wait calls in {:?}", start.elapsed());
    assert!(
        calls < 50,
        "{calls} wait calls in half a second of silence: the idle end naps instead of sleeping"
    );
    go.send(()).expect("primary thread");
    let woken = Instant::now();
    let mut calls = 0u32;
    let got = loop {
        t.poll().expect("poll");
        if let Some(frame) = t.recv().expect("recv") {
            break frame.len();
        }
        assert!(
            woken.elapsed() < Duration::from_secs(20),
            "the peer's write did not arrive"
        );
        t.wait(None, Duration::from_secs(10)).expect("wait");
        calls += 1;
    };
    eprintln!(
        "woken: a {got}-byte frame {:?} after the peer was told to write, {calls} wait calls",
        woken.elapsed()
    );
    assert_eq!(got, FRAME_HEADER_LEN);
    assert!(
        woken.elapsed() < Duration::from_secs(5),
        "wait(10 s) was not woken by the peer's write"
    );
    done.send(()).expect("primary thread");
    primary.join().expect("primary thread");
}
