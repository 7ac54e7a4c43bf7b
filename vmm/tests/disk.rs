//! The virtio-blk disk through a real KVM guest (needs /dev/kvm): record a
//! run with a disk, replay it against a copy of the disk as it was, and
//! check that a differing image is caught at its first differing read and
//! that writes persist across runs.

mod common;

use std::path::{Path, PathBuf};

use common::Console;

use channel::log::{EntryKind, LogMeta, LogReader, LogWriter};
use vmm::block::Disk;
use vmm::events::{Live, LogSink, Replay};
use vmm::{Machine, RunSummary, VmConfig, VmmError};

const DISK_BYTES: u64 = 4 << 20;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lockstep-disk-test-{name}-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Which disk a test's replica has: its own copy, or the shared image.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Local,
    Shared,
}

impl Mode {
    /// Opens `disk` for a replica in this mode; `following` for a backup.
    fn open(self, disk: &Path, size: Option<u64>, following: bool) -> Result<Disk, VmmError> {
        let opened = Disk::open(disk, false, size)?;
        Ok(match self {
            Mode::Local => opened,
            Mode::Shared => opened.shared(following),
        })
    }
}

fn record(disk: &Path, arg: u64) -> Result<(Vec<u8>, RunSummary, String), VmmError> {
    record_in(Mode::Local, disk, arg)
}

fn record_shared(disk: &Path, arg: u64) -> Result<(Vec<u8>, RunSummary, String), VmmError> {
    record_in(Mode::Shared, disk, arg)
}

fn record_in(mode: Mode, disk: &Path, arg: u64) -> Result<(Vec<u8>, RunSummary, String), VmmError> {
    let image = guest_images::image("disk").expect("embedded guest");
    let config = VmConfig::default();
    let meta = LogMeta {
        image_id: guest_images::image_id(image),
        mem_size: config.mem_size,
        guest_arg: arg,
        digest_interval: 50,
        vm_flags: config.flags(),
        guest_name: "disk".into(),
    };
    let sink = LogSink::new(LogWriter::new(Vec::new(), &meta)?);
    let events = Live::new(Box::new(std::io::empty()), sink);
    let console = Console::default();
    let mut machine = Machine::new(&config, image, arg, events, Box::new(console.clone()), 50)?;
    machine.attach_disk(mode.open(disk, Some(DISK_BYTES), false)?)?;
    let summary = machine.run()?;
    let log = machine.into_events().into_sink().into_inner()?;
    Ok((log, summary, console.text()))
}

fn replay(disk: &Path, log: &[u8]) -> Result<(RunSummary, String), VmmError> {
    replay_then(disk, log, || {})
}

/// Replays `log` on `disk`, calling `after_attach` once the disk passed the
/// identity check and before the guest runs.
fn replay_then(
    disk: &Path,
    log: &[u8],
    after_attach: impl FnOnce(),
) -> Result<(RunSummary, String), VmmError> {
    replay_in(Mode::Local, disk, log, after_attach)
}

/// [`replay_then`] for a backup following on the shared image.
fn replay_shared_then(
    disk: &Path,
    log: &[u8],
    after_attach: impl FnOnce(),
) -> Result<(RunSummary, String), VmmError> {
    replay_in(Mode::Shared, disk, log, after_attach)
}

fn replay_in(
    mode: Mode,
    disk: &Path,
    log: &[u8],
    after_attach: impl FnOnce(),
) -> Result<(RunSummary, String), VmmError> {
    let reader = LogReader::new(log)?;
    let meta = reader.meta().clone();
    let image = guest_images::image("disk").expect("embedded guest");
    let config = VmConfig::with_flags(meta.mem_size, meta.vm_flags);
    let console = Console::default();
    let mut machine = Machine::new(
        &config,
        image,
        meta.guest_arg,
        Replay::new(reader),
        Box::new(console.clone()),
        meta.digest_interval,
    )?;
    machine.attach_disk(mode.open(disk, None, true)?)?;
    after_attach();
    let summary = machine.run()?;
    Ok((summary, console.text()))
}

fn blk_entries(log: &[u8]) -> usize {
    let mut reader = LogReader::new(log).expect("log");
    let mut count = 0;
    while let Some(entry) = reader.next_entry().expect("entry") {
        if entry.kind == EntryKind::BlkDone {
            count += 1;
        }
    }
    count
}

#[test]
fn a_recorded_run_with_a_disk_replays_exactly_on_a_copy_of_its_disk() {
    let scratch = Scratch::new("replay");
    let primary = scratch.path("primary.img");
    let (log, summary, console) = record(&primary, 40).expect("record");
    assert_eq!(summary.exit_code, 0, "{console}");
    assert!(
        console.contains("disk: boot 1 id lockstep-disk"),
        "{console}"
    );
    assert!(console.contains("mismatches 0"), "{console}");
    // 1 boot read + write + flush, 40 × (write + 2 reads), 1 flush.
    assert!(
        blk_entries(&log) >= 124,
        "{} blk-done entries",
        blk_entries(&log)
    );

    // The backup's disk as the primary's was before the run: fresh.
    let backup = scratch.path("backup.img");
    std::fs::File::create(&backup)
        .and_then(|file| file.set_len(DISK_BYTES))
        .expect("backup image");
    let (replayed, replay_console) = replay(&backup, &log).expect("replay");
    assert_eq!(replayed.exits, summary.exits);
    assert_eq!(replayed.final_digest, summary.final_digest);
    assert_eq!(replay_console, console);
    // Both replicas applied the same writes to their own images.
    let a = std::fs::read(&primary).expect("primary image");
    let b = std::fs::read(&backup).expect("backup image");
    assert!(a == b, "the two images differ after the run");
}

#[test]
fn a_disk_that_differs_at_the_start_is_refused_before_the_guest_runs() {
    let scratch = Scratch::new("identity");
    let primary = scratch.path("primary.img");
    let (log, summary, console) = record(&primary, 2).expect("record");
    assert_eq!(summary.exit_code, 0, "{console}");
    // Another size.
    let small = scratch.path("small.img");
    std::fs::write(&small, vec![0u8; (DISK_BYTES / 2) as usize]).expect("small image");
    let text = replay(&small, &log).expect_err("size").to_string();
    assert!(
        text.contains("the disks differ") && text.contains(&format!("{} bytes", DISK_BYTES / 2)),
        "{text}"
    );
    // Same size, one byte different.
    let other = scratch.path("other.img");
    let mut bytes = vec![0u8; DISK_BYTES as usize];
    bytes[DISK_BYTES as usize - 1] = 1;
    std::fs::write(&other, &bytes).expect("other image");
    let text = replay(&other, &log).expect_err("content").to_string();
    assert!(text.contains("the disks differ"), "{text}");
    // No disk at all on the replaying side: the guest's first disk access
    // is refused (the log's first entry is the disk identity).
    let reader = LogReader::new(&log[..]).expect("log");
    let meta = reader.meta().clone();
    let image = guest_images::image("disk").expect("embedded guest");
    let mut machine = Machine::new(
        &VmConfig::with_flags(meta.mem_size, meta.vm_flags),
        image,
        meta.guest_arg,
        Replay::new(reader),
        Box::new(Console::default()),
        meta.digest_interval,
    )
    .expect("machine");
    assert!(
        machine.run().is_err(),
        "a replay without the disk must fail"
    );
}

#[test]
fn a_disk_that_changes_under_a_replica_is_caught_at_its_first_read() {
    let scratch = Scratch::new("differ");
    let primary = scratch.path("primary.img");
    let (log, summary, console) = record(&primary, 8).expect("record");
    assert_eq!(summary.exit_code, 0, "{console}");
    // The backup's image starts identical (fresh), then, after the identity
    // check, its boot record changes behind the VMM's back: the guest's
    // first read (sector 0) returns other data than the primary's did.
    let backup = scratch.path("backup.img");
    std::fs::write(&backup, vec![0u8; DISK_BYTES as usize]).expect("backup image");
    let error = replay_then(&backup, &log, || {
        let mut bytes = vec![0u8; DISK_BYTES as usize];
        bytes[..8].copy_from_slice(b"LKSTDISK");
        bytes[8] = 41;
        std::fs::write(&backup, &bytes).expect("tamper");
    })
    .expect_err("must diverge");
    let text = error.to_string();
    assert!(
        matches!(error, VmmError::Diverged { .. }) && text.contains("disk images differ"),
        "{text}"
    );
}

#[test]
fn writes_persist_across_runs_on_the_same_image() {
    let scratch = Scratch::new("persist");
    let image = scratch.path("disk.img");
    let (_, first, console) = record(&image, 4).expect("first run");
    assert_eq!(first.exit_code, 0, "{console}");
    assert!(console.contains("disk: boot 1 "), "{console}");
    let (_, second, console) = record(&image, 4).expect("second run");
    assert_eq!(second.exit_code, 0, "{console}");
    assert!(console.contains("disk: boot 2 "), "{console}");
}

#[test]
fn a_guest_without_a_disk_finds_no_device_there() {
    let image = guest_images::image("disk").expect("embedded guest");
    let events = Live::new(Box::new(std::io::empty()), vmm::events::Discard);
    let mut machine = Machine::new(
        &VmConfig::default(),
        image,
        1,
        events,
        Box::new(Console::default()),
        0,
    )
    .expect("machine");
    // The probe (MagicValue) reads 0: the guest sees no device and ends.
    let summary = machine.run().expect("no disk is not an error");
    assert_eq!(summary.exit_code, 2, "the disk guest's 'no disk' code");
}

/// Records the `disk` guest for `rounds` rounds on `disk` while another
/// thread clones the running machine (pre-copy, stop-and-copy, hand-over
/// digest); returns the log, the run, the state stream and its report.
fn record_while_cloning(
    disk: &Path,
    rounds: u64,
) -> (Vec<u8>, RunSummary, Vec<u8>, vmm::TransferReport, String) {
    let image = guest_images::image("disk").expect("embedded guest");
    let config = VmConfig::default();
    let meta = LogMeta {
        image_id: guest_images::image_id(image),
        mem_size: config.mem_size,
        guest_arg: rounds,
        digest_interval: 50,
        vm_flags: config.flags(),
        guest_name: "disk".into(),
    };
    let sink = LogSink::new(LogWriter::new(Vec::new(), &meta).expect("log"));
    let events = Live::new(Box::new(std::io::empty()), sink);
    let console = Console::default();
    let mut machine = Machine::new(
        &config,
        image,
        rounds,
        events,
        Box::new(console.clone()),
        50,
    )
    .expect("vm");
    machine
        .attach_disk(Disk::open(disk, false, Some(DISK_BYTES)).expect("disk"))
        .expect("attach");
    let handle = machine.transfer_handle();
    let header = vmm::StateHeader::new(&config, image, rounds);
    let sender = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let out = vmm::StateWriter::new(Vec::new(), &header).expect("header");
        let policy = vmm::PrecopyPolicy {
            max_rounds: 4,
            converged_pages: 0,
            digest: true,
            pause_timeout: std::time::Duration::from_secs(20),
        };
        vmm::send_state(&handle, out, &policy).expect("transfer")
    });
    let summary = machine.run().expect("record");
    let (stream, report, captured) = sender.join().expect("sender");
    assert!(
        captured.state.exits < summary.exits,
        "the clone was taken while the guest ran (exit {} of {})",
        captured.state.exits,
        summary.exits
    );
    assert!(captured.state.blk.is_some(), "the disk's device travels");
    let log = machine.into_events().into_sink().into_inner().expect("log");
    (log, summary, stream, report, console.text())
}

#[test]
fn a_clone_of_a_running_vm_carries_its_disk_and_replays_to_an_identical_image() {
    let scratch = Scratch::new("clone");
    let primary = scratch.path("primary.img");
    // Data the guest never touches (past its 4 MiB... no: inside the disk,
    // but written before the run): round 0 must copy it.
    let mut seed = vec![0u8; DISK_BYTES as usize];
    seed[DISK_BYTES as usize - 4096..].fill(0xa5);
    std::fs::write(&primary, &seed).expect("seed");
    let (log, summary, stream, report, console) = record_while_cloning(&primary, 3000);
    assert_eq!(summary.exit_code, 0, "{console}");
    eprintln!("{report:?}");
    assert!(
        report.rounds[0].disk_blocks >= 2,
        "round 0 copies the non-zero blocks: {report:?}"
    );
    assert!(
        report.rounds[1..].iter().any(|round| round.disk_blocks > 0),
        "the guest wrote the disk during the pre-copy: {report:?}"
    );

    // The joiner's image holds stale bytes: they must all be replaced.
    let joined = scratch.path("joined.img");
    std::fs::write(&joined, vec![0x3cu8; DISK_BYTES as usize / 2]).expect("stale");
    let received = vmm::receive_with_disk(
        vmm::StateReader::new(&stream[..]).expect("reader"),
        guest_images::image("disk").expect("guest"),
        None,
        Some(&joined),
    )
    .expect("receive");
    assert!(received.stats.disk_chunks > 0);
    let expected = received.state.digest;
    let position = received.state.events;
    let replay_console = Console::default();
    let mut machine = Machine::restore(
        received,
        Replay::resume(LogReader::new(&log[..]).expect("log"), &position),
        Box::new(replay_console.clone()),
        50,
    )
    .expect("restore");
    assert_eq!(
        Some(machine.digest().expect("digest")),
        expected,
        "hand-over digest"
    );
    let replayed = machine.run().expect("replay after the clone");
    assert_eq!(replayed.final_digest, summary.final_digest);
    assert!(
        machine.events().stats().digests_matched >= 5,
        "digests (memory and disk) matched after the hand-over"
    );
    assert!(
        console.ends_with(&replay_console.text()),
        "{}",
        replay_console.text()
    );
    let a = std::fs::read(&primary).expect("primary image");
    let b = std::fs::read(&joined).expect("joined image");
    assert!(
        a == b,
        "the joined replica's image differs from the primary's"
    );
}

#[test]
fn a_disk_stream_needs_a_disk_on_the_receiver_and_only_then() {
    let scratch = Scratch::new("clone-refused");
    let primary = scratch.path("primary.img");
    let (_, _, stream, _, _) = record_while_cloning(&primary, 1500);
    let image = guest_images::image("disk").expect("guest");
    let text = vmm::receive_from(
        vmm::StateReader::new(&stream[..]).expect("reader"),
        image,
        None,
    )
    .err()
    .expect("no disk here")
    .to_string();
    assert!(text.contains("give it --disk FILE"), "{text}");
    // And a stream of a VM without a disk, to a replica with one.
    let plain = guest_images::image("fold").expect("fold");
    let config = VmConfig::default();
    let mut machine = Machine::new(
        &config,
        plain,
        50,
        Live::new(Box::new(std::io::empty()), vmm::events::Discard),
        Box::new(Console::default()),
        0,
    )
    .expect("vm");
    let captured = machine
        .capture(vmm::CaptureRequest {
            memory: vmm::CaptureMemory::All,
            digest: false,
            at_exit: 0,
        })
        .expect("capture");
    let mut out =
        vmm::StateWriter::new(Vec::new(), &vmm::StateHeader::new(&config, plain, 50)).expect("h");
    captured.write_to(&mut out, 0).expect("state");
    let plain_stream = out.finish().expect("finish");
    let text = vmm::receive_with_disk(
        vmm::StateReader::new(&plain_stream[..]).expect("reader"),
        plain,
        None,
        Some(&scratch.path("unused.img")),
    )
    .err()
    .expect("a disk for a VM without one")
    .to_string();
    assert!(text.contains("the primary's VM has none"), "{text}");
}

#[test]
fn the_periodic_digests_catch_a_written_block_that_differs_without_a_read() {
    let scratch = Scratch::new("digest");
    let primary = scratch.path("primary.img");
    let (log, summary, console) = record(&primary, 60).expect("record");
    assert_eq!(summary.exit_code, 0, "{console}");
    // The backup's image starts identical, then, after the identity check,
    // sector 1 changes behind the VMM's back. The guest never reads sector
    // 1, but it writes sector 0 (its boot record), in the same 64 KiB
    // block: the first digest after that write reads the block back on
    // each replica, and the digests differ (without the disk in the
    // digests this replay would run to the end).
    let backup = scratch.path("backup.img");
    std::fs::write(&backup, vec![0u8; DISK_BYTES as usize]).expect("backup image");
    let error = replay_then(&backup, &log, || {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&backup)
            .expect("tamper");
        file.write_all_at(&[0xee], 600).expect("tamper");
    })
    .expect_err("the digests must differ");
    let text = error.to_string();
    assert!(
        matches!(error, VmmError::Diverged { exit: 50, .. }) && text.contains("memory differs"),
        "{text}"
    );
}

#[test]
fn shared_mode_a_following_replica_never_reads_or_writes_its_image_and_replays_exactly() {
    let scratch = Scratch::new("shared");
    let primary = scratch.path("shared.img");
    std::fs::write(&primary, vec![0u8; DISK_BYTES as usize]).expect("image");
    let before = std::fs::read(&primary).expect("before");
    // The follower's copy of the image as it was at the start (the same
    // identity), overwritten with garbage once the identity is checked:
    // a replica that read it would diverge, one that wrote it would
    // change it.
    let follower = scratch.path("follower.img");
    std::fs::write(&follower, &before).expect("copy");
    let (log, summary, console) = record_shared(&primary, 30).expect("record");
    assert_eq!(summary.exit_code, 0, "{console}");
    assert!(console.contains("mismatches 0"), "{console}");
    assert_ne!(
        std::fs::read(&primary).expect("after"),
        before,
        "the primary wrote the image"
    );
    // Every completion entry carries the read data (shared flag).
    let mut reader = LogReader::new(&log[..]).expect("log");
    let (mut data_entries, mut plain) = (0, 0);
    while let Some(entry) = reader.next_entry().expect("entry") {
        if entry.kind == EntryKind::BlkDone && entry.exit != 0 {
            if entry.flags == vmm::events::FLAG_BLK_SHARED {
                data_entries += 1;
            } else {
                plain += 1;
            }
        }
    }
    assert!(
        data_entries > 30 && plain == 0,
        "{data_entries} data entries, {plain} plain"
    );
    let garbage = vec![0x5au8; DISK_BYTES as usize];
    let (replayed, replay_console) = replay_shared_then(&follower, &log, || {
        std::fs::write(&follower, &garbage).expect("garbage");
    })
    .expect("replay");
    assert_eq!(replayed.final_digest, summary.final_digest);
    assert_eq!(replay_console, console);
    assert!(
        std::fs::read(&follower).expect("follower") == garbage,
        "the following replica wrote its image"
    );
}

#[test]
fn shared_mode_is_refused_against_a_local_recording_and_the_reverse() {
    let scratch = Scratch::new("modes");
    let image = scratch.path("a.img");
    let (log, _, _) = record(&image, 2).expect("record local");
    let Err(error) = replay_shared_then(&image, &log, || {}) else {
        panic!("a shared replica followed a local-disks log");
    };
    assert!(
        error.to_string().contains("the disk modes differ"),
        "{error}"
    );
    let shared = scratch.path("b.img");
    let (log, _, _) = record_shared(&shared, 2).expect("record shared");
    let Err(error) = replay(&shared, &log) else {
        panic!("a local replica followed a shared-disk log");
    };
    assert!(
        error.to_string().contains("the disk modes differ"),
        "{error}"
    );
}
