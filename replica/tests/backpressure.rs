//! A slow backup throttles its primary instead of looking dead to it.
//!
//! A real backup receiver (`replica::backup`, io_uring TCP on 127.0.0.1)
//! whose replay takes nothing for five peer timeouts, while a primary
//! (`channel`'s `LogSender` over io_uring TCP) pushes more entries than the
//! backup's 65,536-entry queue holds. Before the fix the receiver blocked
//! on the full queue inside its poll: acks and heartbeats stopped, and the
//! primary declared its healthy backup silent. Now the primary is slowed
//! (its transport stalls, its acks stop short of what it pushed) but hears
//! heartbeats throughout, and once the replay resumes every entry arrives
//! in order and is acked.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use channel::endpoint::{ChannelError, LogSender};
use channel::log::{EntryKind, LogMeta, encode_entry};
use channel::protocol::Role;
use channel::transport::Transport;
use channel::transport::shm::ShmTransport;
use channel::transport::uring_tcp::UringTcp;
use replica::backup::{LinkListener, QUEUE_ENTRIES};
use replica::link::{LinkSettings, MAX_FRAME, Profile, TransportKind};
use vmm::events::EntrySource;

/// More than the backup's queue, the pending batches it holds, its
/// transport's buffers and the primary's send buffers together.
const ENTRIES: u64 = QUEUE_ENTRIES as u64 + 100_000;
/// Bytes of input each entry carries.
const PAYLOAD: usize = 1024;

fn settings() -> LinkSettings {
    let mut profile = Profile::two_core();
    profile.liveness.heartbeat = Duration::from_millis(20);
    // Long enough that a loaded 2-core host cannot starve an end into a
    // false alarm; the replay stands still for five of these.
    profile.liveness.peer_timeout = Duration::from_millis(1000);
    LinkSettings {
        kind: TransportKind::Tcp,
        key: b"backpressure test key, at least 32 bytes".to_vec(),
        vm_id: 0x5107,
        profile,
    }
}

/// Runs the scenario with a backup listening on `link` and a primary
/// transport from `connect`; returns (lowest ack while the replay stood
/// still, transport stalls).
fn scenario<T: Transport>(
    link: LinkListener,
    kind: TransportKind,
    connect: impl FnOnce(&LinkSettings) -> T,
) -> (u64, u64) {
    let mut s = settings();
    s.kind = kind;
    let stall = s.profile.liveness.peer_timeout * 5;
    let backup_settings = s.clone();
    let backup = std::thread::spawn(move || {
        let incoming = link.accept().expect("accept");
        let mut accepted = incoming.establish(&backup_settings, 3).expect("establish");
        // The replay does nothing for five peer timeouts.
        std::thread::sleep(stall);
        assert!(
            accepted.source.lost().is_none(),
            "{:?}",
            accepted.source.lost()
        );
        let mut position = 0u64;
        while let Some(entry) = accepted.source.next_entry().expect("entry") {
            position += 1;
            assert_eq!(entry.seq, position);
            if entry.kind == EntryKind::Input {
                assert_eq!(entry.payload, vec![position as u8; PAYLOAD]);
            }
            if entry.kind == EntryKind::End {
                break;
            }
        }
        position
    });

    let t = connect(&s);
    let mut sender = LogSender::new(t, 3, 1, s.profile.batch, s.profile.liveness).expect("sender");
    let meta = LogMeta {
        image_id: 1,
        mem_size: 16 << 20,
        guest_arg: 0,
        digest_interval: 0,
        vm_flags: 0,
        guest_name: "backpressure".into(),
    };
    let fail = |e: ChannelError, start: Instant| -> ! {
        panic!(
            "{}: the primary gave up on a slow backup after {:?}: {}",
            kind.name(),
            start.elapsed(),
            channel::testkit::error_chain(&e)
        )
    };
    let mut entry = meta.header_bytes().to_vec();
    let start = Instant::now();
    let mut lowest_ack_while_stalled = None;
    for position in 0..=ENTRIES {
        if position > 0 {
            entry.clear();
            let (kind, payload) = if position == ENTRIES {
                (EntryKind::End, 0u64.to_le_bytes().to_vec())
            } else {
                (EntryKind::Input, vec![position as u8; PAYLOAD])
            };
            encode_entry(kind, 0, position, position, &payload, &mut entry);
        }
        loop {
            match sender.try_push(&entry) {
                Ok(Some(_)) => {
                    if position % 64 == 0
                        && let Err(e) = sender.poll_io()
                    {
                        fail(e, start)
                    }
                    break;
                }
                Ok(None) => {
                    // Throttled: the backup is not reading. Its heartbeats
                    // must keep this end from declaring it silent.
                    if let Err(e) = sender.poll() {
                        fail(e, start)
                    }
                    if start.elapsed() < stall / 2 {
                        lowest_ack_while_stalled = Some(sender.acked());
                    }
                }
                Err(e) => fail(e, start),
            }
        }
    }
    let acked = match sender.wait_all_acked(Duration::from_secs(30)) {
        Ok(acked) => acked,
        Err(e) => fail(e, start),
    };
    assert_eq!(acked, ENTRIES + 1, "every entry (and the header) acked");
    assert!(
        start.elapsed() >= stall,
        "{}: the primary finished in {:?}, before the replay resumed",
        kind.name(),
        start.elapsed()
    );
    assert!(sender.metrics().heartbeats_received > 0);
    assert_eq!(backup.join().expect("backup"), ENTRIES);
    let throttled = lowest_ack_while_stalled.unwrap_or(u64::MAX);
    eprintln!(
        "{}: throttled at ack {throttled}; transport stalls {}; heartbeats heard {}",
        kind.name(),
        sender.metrics().transport_stalls,
        sender.metrics().heartbeats_received
    );
    (throttled, sender.metrics().transport_stalls)
}

#[test]
fn a_backup_whose_replay_stalls_throttles_the_primary_and_is_not_declared_dead() {
    // Shared memory: a 16 MiB ring each way, so the primary must stall.
    let dir = std::env::temp_dir().join(format!("lockstep-backpressure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("link.sock");
    let address = path.to_str().expect("utf-8").to_string();
    let link = LinkListener::bind(TransportKind::Shm, &address).expect("bind");
    let (throttled, stalls) = scenario(link, TransportKind::Shm, |s| {
        ShmTransport::connect(&path, &s.session(Role::Primary, 3)).expect("connect")
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stalls > 0, "shm: the primary was never throttled");
    assert!(
        throttled < ENTRIES,
        "shm: acked {throttled} of {ENTRIES} while the replay stood still"
    );

    // io_uring TCP.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let link = LinkListener::Tcp(listener, TransportKind::Tcp);
    scenario(link, TransportKind::Tcp, |s| {
        UringTcp::connect(address, &s.session(Role::Primary, 3), MAX_FRAME).expect("connect")
    });
}
