//! The backup's ack leaves the process in the poll that received the batch,
//! not at its next poll: the backup hands the entries to its vCPU (and
//! wakes it) right after that poll, and on a 2-core host the woken vCPU
//! thread can hold the core for the guest's whole run. Over io_uring TCP
//! a committed frame is only submitted when the ring is entered, so an ack
//! merely committed would wait for the receiver's next poll.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use channel::endpoint::{LogReceiver, LogSender};
use channel::protocol::{Role, Session};
use channel::testkit::fill_entry;
use channel::transport::uring_tcp::UringTcp;
use tuning::Profile;

fn session(role: Role) -> Session {
    Session {
        vm_id: 7,
        generation: 1,
        role,
        key: b"ack-leaves".to_vec(),
    }
}

#[test]
fn uring_ack_is_submitted_by_the_poll_that_received_the_batch() {
    let mut profile = Profile::two_core();
    // Nothing here tests liveness: neither end may give up on a loaded host.
    profile.liveness.peer_timeout = Duration::from_secs(10);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepting =
        std::thread::spawn(move || UringTcp::accept(&listener, &session(Role::Backup), 1 << 20));
    let primary = UringTcp::connect(addr, &session(Role::Primary), 1 << 20).unwrap();
    let backup = accepting.join().unwrap().unwrap();

    let mut sender = LogSender::new(primary, 1, 1, profile.batch, profile.liveness).unwrap();
    let mut receiver = LogReceiver::new(backup, 1, 1, profile.ack, profile.liveness).unwrap();
    let mut entry = vec![0u8; 128];
    fill_entry(1, &mut entry);
    assert_eq!(sender.try_push(&entry).unwrap(), Some(1));
    sender.flush().unwrap();

    // The backup polls until the batch is delivered, and then never again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut delivered = Vec::new();
    while delivered.is_empty() {
        sender.poll().unwrap(); // submits the batch
        receiver
            .poll(|seq, bytes| delivered.push((seq, bytes.len())))
            .unwrap();
        assert!(Instant::now() < deadline, "the batch never arrived");
    }
    assert_eq!(delivered, vec![(1, 128)]);

    // The primary reads the ack without the backup polling again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sender.poll().unwrap() < 1 {
        assert!(
            Instant::now() < deadline,
            "the ack stayed in the backup's io_uring queue after the poll that acked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
