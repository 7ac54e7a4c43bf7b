//! Record and replay real KVM guests (needs /dev/kvm).

mod common;

use common::Console;

use channel::log::{
    ENTRY_HEADER_LEN, EntryKind, FILE_HEADER_LEN, LogError, LogMeta, LogReader, LogWriter,
    decode_entry, encode_entry,
};
use vmm::events::{Live, LogSink, Replay};
use vmm::{Machine, RunSummary, VmConfig, VmmError};

struct Recording {
    log: Vec<u8>,
    summary: RunSummary,
    console: String,
}

fn pseudo_random_input(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn record(
    guest: &str,
    config: &VmConfig,
    arg: u64,
    input: Vec<u8>,
    digest_interval: u64,
) -> Result<Recording, VmmError> {
    let image = guest_images::image(guest).expect("embedded guest");
    let meta = LogMeta {
        image_id: guest_images::image_id(image),
        mem_size: config.mem_size,
        guest_arg: arg,
        digest_interval,
        vm_flags: config.flags(),
        guest_name: guest.into(),
    };
    let sink = LogSink::new(LogWriter::new(Vec::new(), &meta)?);
    let events = Live::new(Box::new(std::io::Cursor::new(input)), sink);
    let console = Console::default();
    let mut machine = Machine::new(
        config,
        image,
        arg,
        events,
        Box::new(console.clone()),
        digest_interval,
    )?;
    let summary = machine.run()?;
    let log = machine.into_events().into_sink().into_inner()?;
    Ok(Recording {
        log,
        summary,
        console: console.text(),
    })
}

struct Replayed {
    summary: RunSummary,
    events: u64,
    digests_matched: u64,
    console: String,
}

fn replay(guest: &str, log: &[u8]) -> Result<Replayed, VmmError> {
    let reader = LogReader::new(log)?;
    let meta = reader.meta().clone();
    let image = guest_images::image(guest).expect("embedded guest");
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
    let summary = machine.run()?;
    let stats = machine.events().stats();
    Ok(Replayed {
        summary,
        events: stats.events,
        digests_matched: stats.digests_matched,
        console: console.text(),
    })
}

/// Byte offset of entry `index` (1-based) in a log file.
fn entry_offset(log: &[u8], index: u64) -> usize {
    let mut offset = FILE_HEADER_LEN;
    for i in 1..index {
        let (_, used) = decode_entry(&log[offset..], i, offset as u64)
            .expect("valid")
            .expect("present");
        offset += used;
    }
    offset
}

#[test]
fn record_then_replay_matches_every_digest() {
    let recording = record(
        "fold",
        &VmConfig::default(),
        2000,
        pseudo_random_input(1 << 20),
        200,
    )
    .expect("record");
    assert_eq!(recording.summary.exit_code, 0);
    assert!(
        recording.summary.exits > 4000,
        "{} exits",
        recording.summary.exits
    );
    let replayed = replay("fold", &recording.log).expect("replay");
    assert_eq!(replayed.summary.exits, recording.summary.exits);
    assert!(replayed.events > 4000, "{} events", replayed.events);
    assert_eq!(replayed.summary.digests, recording.summary.digests);
    assert_eq!(replayed.digests_matched, recording.summary.digests);
    assert!(
        replayed.digests_matched >= 20,
        "{} digests",
        replayed.digests_matched
    );
    assert_eq!(
        replayed.summary.final_digest,
        recording.summary.final_digest
    );
    assert!(
        recording.console.contains("1048576 input bytes"),
        "{}",
        recording.console
    );
    assert_eq!(
        replayed.console, recording.console,
        "the replica prints exactly what the primary printed"
    );
}

#[test]
fn two_live_runs_differ_so_the_check_is_not_vacuous() {
    let first = record("fold", &VmConfig::default(), 300, Vec::new(), 0).expect("first");
    let second = record("fold", &VmConfig::default(), 300, Vec::new(), 0).expect("second");
    assert_ne!(
        first.summary.final_digest, second.summary.final_digest,
        "entropy must reach the state"
    );
}

#[test]
fn flipped_byte_is_refused_naming_the_entry() {
    let recording = record(
        "fold",
        &VmConfig::default(),
        400,
        pseudo_random_input(64 << 10),
        100,
    )
    .expect("record");
    let mut damaged = recording.log.clone();
    let offset = entry_offset(&damaged, 300);
    damaged[offset + ENTRY_HEADER_LEN] ^= 0x01;
    let error = replay("fold", &damaged)
        .err()
        .expect("a flipped byte must stop the replay");
    match &error {
        VmmError::Log(LogError::Corrupt {
            index, offset: at, ..
        }) => {
            assert_eq!(*index, 300);
            assert_eq!(*at, offset as u64);
        }
        other => panic!("expected a corrupt-entry error, got: {other}"),
    }
    assert!(error.to_string().contains("log entry 300"), "{error}");
}

#[test]
fn truncated_log_is_a_clean_error() {
    let recording = record("fold", &VmConfig::default(), 400, Vec::new(), 100).expect("record");
    let offset = entry_offset(&recording.log, 200);
    let cut_inside = &recording.log[..offset + 10];
    let error = replay("fold", cut_inside)
        .err()
        .expect("cut inside an entry");
    assert!(
        matches!(error, VmmError::Log(LogError::Truncated { index: 200, .. })),
        "{error}"
    );
    let cut_between = &recording.log[..offset];
    let error = replay("fold", cut_between)
        .err()
        .expect("cut between entries");
    assert!(
        matches!(error, VmmError::LogIncomplete { entries: 199, .. }),
        "{error}"
    );
}

#[test]
fn a_well_formed_but_different_value_diverges() {
    // Change one clock value and fix the entry's checksum: only the state
    // digests can notice, and they must.
    let recording = record("fold", &VmConfig::default(), 400, Vec::new(), 50).expect("record");
    let mut log = recording.log.clone();
    let (entry, offset, used) = (100..)
        .map(|index| {
            let offset = entry_offset(&log, index);
            let (entry, used) = decode_entry(&log[offset..], index, offset as u64)
                .expect("valid")
                .expect("present");
            (entry, offset, used)
        })
        .find(|(entry, _, _)| entry.kind == EntryKind::Clock)
        .expect("the fold guest reads the clock every round");
    let mut forged = Vec::new();
    let value = entry.payload_u64().expect("clock value") + 1;
    encode_entry(
        entry.kind,
        entry.flags,
        entry.seq,
        entry.exit,
        &value.to_le_bytes(),
        &mut forged,
    );
    assert_eq!(forged.len(), used);
    log[offset..offset + used].copy_from_slice(&forged);
    let error = replay("fold", &log).err().expect("must diverge");
    let VmmError::Diverged { exit, detail } = &error else {
        panic!("expected divergence, got: {error}");
    };
    assert!(
        *exit >= entry.exit && *exit <= entry.exit + 50,
        "detected at exit {exit}, forged at {}",
        entry.exit
    );
    assert!(detail.contains("differ"), "{detail}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("diverged at exit {exit}: "))
    );
}

#[test]
fn rdtsc_guest_is_caught_by_replay() {
    let config = VmConfig {
        trap_rdtsc: false,
        ..VmConfig::default()
    };
    let recording = record("rdtsc", &config, 300, Vec::new(), 100).expect("record");
    let error = replay("rdtsc", &recording.log)
        .err()
        .expect("RDTSC must diverge");
    assert!(
        matches!(error, VmmError::Diverged { exit: 100, .. }),
        "the first digest (exit 100) must already differ: {error}"
    );
}

#[test]
fn rdtsc_never_replays_cleanly_with_the_default_config() {
    // With CR4.TSD honoured (ordinary KVM) the guest faults when it records;
    // where the host ignores TSD (nested PVM), the digests catch it instead.
    match record("rdtsc", &VmConfig::default(), 300, Vec::new(), 100) {
        Err(VmmError::Guest { detail, .. }) => assert!(detail.contains("triple fault"), "{detail}"),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(recording) => {
            let error = replay("rdtsc", &recording.log).err().expect("must diverge");
            assert!(matches!(error, VmmError::Diverged { .. }), "{error}");
        }
    }
}

#[test]
fn replay_against_the_wrong_guest_diverges_immediately() {
    // The CLI refuses this up front by image id; at the library level the
    // event stream itself disagrees with what the other guest asks for.
    let recording = record("fold", &VmConfig::default(), 100, Vec::new(), 0).expect("record");
    let error = replay("exits", &recording.log).err().expect("other guest");
    assert!(matches!(error, VmmError::Diverged { .. }), "{error}");
}
