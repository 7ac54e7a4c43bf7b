//! State transfer on real KVM guests: capture, stream, restore, replay.

mod common;

use common::Console;

use std::sync::Arc;
use std::time::Duration;

use channel::log::{LogMeta, LogReader, LogWriter};
use vmm::events::{Live, LogSink, Replay};
use vmm::state::{HEADER_LEN, StateError};
use vmm::{
    CaptureMemory, CaptureRequest, Captured, Machine, PrecopyPolicy, StateHeader, StateWriter,
    VmConfig, VmmError, receive, send_state,
};

type Recorder = Machine<Live<LogSink<Vec<u8>>>>;

fn recorder(guest: &str, config: &VmConfig, arg: u64, interval: u64) -> (Recorder, Console) {
    let image = guest_images::image(guest).expect("embedded guest");
    let meta = LogMeta {
        image_id: guest_images::image_id(image),
        mem_size: config.mem_size,
        guest_arg: arg,
        digest_interval: interval,
        vm_flags: config.flags(),
        guest_name: guest.into(),
    };
    let sink = LogSink::new(LogWriter::new(Vec::new(), &meta).expect("log header"));
    let input: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let events = Live::new(Box::new(std::io::Cursor::new(input)), sink);
    let console = Console::default();
    let machine = Machine::new(
        config,
        image,
        arg,
        events,
        Box::new(console.clone()),
        interval,
    )
    .expect("machine");
    (machine, console)
}

fn stream_of(captured: &Captured, header: &StateHeader) -> Vec<u8> {
    let mut out = StateWriter::new(Vec::new(), header).expect("header");
    captured.write_to(&mut out, 0).expect("state");
    out.finish().expect("finish")
}

/// Restores `stream` and replays the rest of `log` after the transfer point.
fn restore_and_replay(
    guest: &str,
    stream: &[u8],
    log: &[u8],
    interval: u64,
) -> Result<(vmm::digest::Digest, vmm::RunSummary, u64, String), VmmError> {
    let image = guest_images::image(guest).expect("embedded guest");
    let received = receive(stream, image, None)?;
    let position = received.state.events;
    let reader = LogReader::new(log)?;
    let console = Console::default();
    let mut machine = Machine::restore(
        received,
        Replay::resume(reader, &position),
        Box::new(console.clone()),
        interval,
    )?;
    let first = machine.digest()?;
    let summary = machine.run()?;
    let matched = machine.events().stats().digests_matched;
    Ok((first, summary, matched, console.text()))
}

#[test]
fn capture_at_exit_n_restore_and_replay_to_the_same_end() {
    let config = VmConfig::default();
    let (mut machine, console) = recorder("fold", &config, 1500, 100);
    let pause = machine.pause_handle();
    pause.request(CaptureRequest {
        memory: CaptureMemory::All,
        digest: true,
        at_exit: 1234,
    });
    let summary = machine.run().expect("record");
    let captured = pause
        .try_take()
        .expect("served at exit 1234")
        .expect("capture");
    assert_eq!(captured.state.exits, 1234);
    assert!(captured.state.events.log_position > 1000);
    assert!(captured.state.events.last_clock_ns > 0);
    let log = machine.into_events().into_sink().into_inner().expect("log");

    let image = guest_images::image("fold").expect("fold");
    let header = StateHeader::new(&config, image, 1500);
    let stream = stream_of(&captured, &header);
    let (first, replayed, matched, replay_console) =
        restore_and_replay("fold", &stream, &log, 100).expect("restore and replay");
    assert_eq!(
        Some(first),
        captured.state.digest,
        "the restored state is the captured state"
    );
    assert_eq!(replayed.exits, summary.exits);
    assert_eq!(replayed.final_digest, summary.final_digest);
    assert!(
        matched >= 10,
        "{matched} digests matched after the transfer"
    );
    let recorded = console.text();
    assert!(
        recorded.ends_with(replay_console.as_str()),
        "{replay_console}"
    );
    assert!(
        replay_console.contains("fold: 1500 rounds"),
        "{replay_console}"
    );
}

#[test]
fn clone_while_the_guest_scribbles_with_precopy_from_another_thread() {
    let config = VmConfig {
        mem_size: 64 << 20,
        ..VmConfig::default()
    };
    let arg = 30_000;
    let (mut machine, _console) = recorder("scribble", &config, arg, 0);
    let handle = machine.transfer_handle();
    let image = guest_images::image("scribble").expect("scribble");
    let header = StateHeader::new(&config, image, arg);
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        let out = StateWriter::new(Vec::new(), &header).expect("header");
        let policy = PrecopyPolicy {
            max_rounds: 4,
            converged_pages: 0,
            digest: true,
            pause_timeout: Duration::from_secs(20),
        };
        send_state(&handle, out, &policy).expect("transfer")
    });
    let summary = machine.run().expect("record");
    let (stream, report, captured) = sender.join().expect("sender thread");
    assert!(
        captured.state.exits < summary.exits,
        "the clone was taken while the guest ran (exit {} of {})",
        captured.state.exits,
        summary.exits
    );
    assert!(report.rounds.len() >= 2, "{report:?}");
    assert!(
        report.rounds[1].pages > 0,
        "the guest dirtied pages: {report:?}"
    );
    eprintln!("{report:?}");
    let log = machine.into_events().into_sink().into_inner().expect("log");
    let (first, replayed, _, console) =
        restore_and_replay("scribble", &stream, &log, 0).expect("restore and replay");
    assert_eq!(
        Some(first),
        captured.state.digest,
        "digest at the hand-over exit"
    );
    assert_eq!(replayed.final_digest, summary.final_digest);
    assert!(console.contains(&format!("{arg} rounds")), "{console}");
}

fn small_stream() -> (Vec<u8>, Captured) {
    let config = VmConfig::default();
    let (mut machine, _) = recorder("fold", &config, 300, 0);
    let pause = machine.pause_handle();
    pause.request(CaptureRequest {
        memory: CaptureMemory::All,
        digest: false,
        at_exit: 200,
    });
    machine.run().expect("record");
    let captured = pause.try_take().expect("served").expect("capture");
    let image = guest_images::image("fold").expect("fold");
    let stream = stream_of(&captured, &StateHeader::new(&config, image, 300));
    (stream, captured)
}

#[test]
fn bad_streams_are_refused_each_with_its_own_error() {
    let (stream, _) = small_stream();
    let image = guest_images::image("fold").expect("fold");
    assert!(receive(&stream[..], image, Some(&VmConfig::default())).is_ok());

    // Truncated: inside the header, inside a chunk, and between chunks.
    for cut in [10, HEADER_LEN + 5, stream.len() / 2, stream.len() - 1] {
        match receive(&stream[..cut], image, None) {
            Err(StateError::Truncated { offset, .. }) => assert!(offset <= cut as u64),
            Err(other) => panic!("cut at {cut}: {other}"),
            Ok(_) => panic!("cut at {cut} accepted"),
        }
    }

    // A flipped byte in a memory chunk: corrupt, naming the chunk and offset.
    let mut flipped = stream.clone();
    let at = HEADER_LEN + 16 + 8 + 100;
    flipped[at] ^= 0x40;
    match receive(&flipped[..], image, None) {
        Err(
            error @ StateError::Corrupt {
                index: 0, offset, ..
            },
        ) => {
            assert_eq!(offset, HEADER_LEN as u64);
            let text = error.to_string();
            assert!(text.contains("chunk 0 (memory) at byte 56"), "{text}");
        }
        Err(other) => panic!("flipped byte: {other}"),
        Ok(_) => panic!("flipped byte accepted"),
    }
    // A flipped byte in the header.
    let mut header = stream.clone();
    header[20] ^= 1;
    assert!(matches!(
        receive(&header[..], image, None),
        Err(StateError::CorruptHeader { .. })
    ));

    // An unknown version.
    let mut version = stream.clone();
    version[8] = 9;
    match receive(&version[..], image, None) {
        Err(StateError::UnknownVersion {
            found: 9,
            supported: 1,
        }) => {}
        Err(other) => panic!("version: {other}"),
        Ok(_) => panic!("version 9 accepted"),
    }

    // Another guest image.
    let other = guest_images::image("exits").expect("exits");
    assert!(matches!(
        receive(&stream[..], other, None),
        Err(StateError::ImageMismatch { .. })
    ));
    // Another memory size.
    let bigger = VmConfig {
        mem_size: 32 << 20,
        ..VmConfig::default()
    };
    assert!(matches!(
        receive(&stream[..], image, Some(&bigger)),
        Err(StateError::ConfigMismatch(_))
    ));
    // Not a state stream.
    assert!(matches!(
        receive(
            &b"hello, this is not a state stream at all, not even close....."[..],
            image,
            None
        ),
        Err(StateError::BadMagic { .. })
    ));
}

#[test]
fn a_stream_without_its_state_is_incomplete() {
    let (_, captured) = small_stream();
    let config = VmConfig::default();
    let image = guest_images::image("fold").expect("fold");
    let mut out =
        StateWriter::new(Vec::new(), &StateHeader::new(&config, image, 300)).expect("header");
    for (addr, bytes) in &captured.pages {
        out.memory(0, *addr, bytes).expect("pages");
    }
    let stream = out.finish().expect("finish");
    assert!(matches!(
        receive(&stream[..], image, None),
        Err(StateError::Incomplete(_))
    ));
}

#[test]
fn a_network_guest_clones_with_its_virtio_queues() {
    let config = VmConfig {
        mac: Some(vmm::DEFAULT_MAC),
        ..VmConfig::default()
    };
    let image = guest_images::image("net").expect("net");
    let meta = LogMeta {
        image_id: guest_images::image_id(image),
        mem_size: config.mem_size,
        guest_arg: 0,
        digest_interval: 50,
        vm_flags: config.flags(),
        guest_name: "net".into(),
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = LogSink::new(LogWriter::new(Vec::new(), &meta).expect("log header"));
    let events = Live::new(Box::new(std::io::empty()), sink).with_stop(stop.clone());
    let mut machine =
        Machine::new(&config, image, 0, events, Box::new(Console::default()), 50).expect("machine");
    let pause = machine.pause_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let captured = pause.capture(
            CaptureRequest {
                memory: CaptureMemory::All,
                digest: true,
                at_exit: 0,
            },
            Duration::from_secs(10),
        );
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        captured
    });
    let summary = machine.run().expect("record");
    let captured = stopper.join().expect("thread").expect("capture");
    let net = captured.state.net.expect("the NIC's state is captured");
    assert!(net.device.queues.iter().all(|queue| queue.ready), "{net:?}");
    assert!(summary.stopped && captured.state.exits < summary.exits);
    let log = machine.into_events().into_sink().into_inner().expect("log");
    let stream = stream_of(&captured, &StateHeader::new(&config, image, 0));
    let (first, replayed, _, _) =
        restore_and_replay("net", &stream, &log, 50).expect("restore and replay");
    assert_eq!(Some(first), captured.state.digest);
    assert_eq!(replayed.final_digest, summary.final_digest);
    assert!(replayed.stopped);
}
