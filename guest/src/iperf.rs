//! An iperf3 server (TCP, port 5201) that stock `iperf3 -c` (3.x, checked
//! against 3.12's `iperf_api.c`, `iperf_server_api.c` and `iperf_tcp.c`)
//! runs against unmodified: receive (`-c`), transmit (`-R`), both (`--bidir`),
//! `-P` up to [`MAX_STREAMS`], `-t`/`-n`/`-k`, `-O`, `-b`, `-J`.
//!
//! # The protocol
//!
//! Every connection, control or data, goes to port 5201 and starts with the
//! client's 37-byte cookie (a NUL-terminated ASCII id). State changes are one
//! signed byte; JSON messages are a 4-byte big-endian length and the text.
//!
//! ```text
//!  client                                   guest (server)
//!  ── connect, cookie[37] ───────────────▶  no test running: this is its control
//!                     ◀──────────────────── PARAM_EXCHANGE (9)
//!  ── len:u32be, {"tcp":true,"time":10,...} ▶  (≤ 8 KiB)
//!                     ◀──────────────────── CREATE_STREAMS (10)
//!  ── connect, cookie[37] ───────────────▶  data stream 1 (ids 1, 3, 4, ...)
//!     ... one per stream (-P) ...
//!                     ◀──────────────────── TEST_START (1), TEST_RUNNING (2)
//!  ══ data ══════════════════════════════▶  receive (or ◀══ with -R)
//!  ── TEST_END (4) ──────────────────────▶  data streams closed
//!                     ◀──────────────────── EXCHANGE_RESULTS (13)
//!  ── len:u32be, client results JSON ────▶  (≤ 64 KiB)
//!                     ◀──────────────────── len:u32be, server results JSON
//!                     ◀──────────────────── DISPLAY_RESULTS (14)
//!  ── IPERF_DONE (16), close ────────────▶  ready for the next client
//! ```
//!
//! The server's results: `{"cpu_util_total":0,"cpu_util_user":0,
//! "cpu_util_system":0,"sender_has_retransmits":-1|0,"streams":[{"id":1,
//! "bytes":N,"retransmits":-1,"jitter":0,"errors":0,"packets":0,
//! "start_time":0,"end_time":T}]}`. The guest cannot measure its CPU use
//! without extra exits, so it reports 0; it has no retransmit counter.
//!
//! # One test at a time, and hostile clients
//!
//! Like the real server: a connection that arrives while a test runs is sent
//! ACCESS_DENIED (-1) and closed (during CREATE_STREAMS only after its cookie
//! shows it is not one of the test's streams). A control message that is too
//! long, not JSON, asks for something unsupported (UDP, SCTP, too many
//! streams) or is an unknown state byte gets SERVER_ERROR (-2) followed by
//! iperf3's error number and an errno (both i32 big-endian), and the test is
//! torn down; the server then serves the next client. Every wait is bounded
//! by the paravirtual clock (never RDTSC): a cookie or a control message
//! within [`HANDSHAKE_NS`], a timed test ends 40 s after its duration (the
//! real server's grace), an untimed one after [`IDLE_NS`] without data.
//!
//! # Memory
//!
//! Three small control-capable sockets listen all the time. Data sockets are
//! allocated when a test asks for its streams, out of [`DATA_BUDGET`] bytes
//! of socket buffers shared by the streams, and freed when it ends; an
//! allocation failure is a SERVER_ERROR, never a panic.

use alloc::collections::TryReserveError;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use crate::json::{self, Value};

/// The iperf3 port.
pub const PORT: u16 = 5201;
/// Most parallel streams of one test (iperf3's own limit is 128).
pub const MAX_STREAMS: usize = 8;
/// Bytes of socket buffers all data streams of a test share.
pub const DATA_BUDGET: usize = 3 << 20;
/// Longest a cookie or an expected control message may take.
pub const HANDSHAKE_NS: u64 = 10_000_000_000;
/// Longest an untimed test may go without data.
pub const IDLE_NS: u64 = 120_000_000_000;

/// Print one console line per test and per refused client. Off: the VMM
/// stops the guest when its console cannot be written (a harness that
/// closes lockstep's stdout after the banner), and a client must not be
/// able to stop the guest by misbehaving.
const LOG: bool = false;

const COOKIE_SIZE: usize = 37;
const POOL_SOCKETS: usize = 3;
const POOL_BUFFER: usize = 16 << 10;
const STREAM_BUFFER_MIN: usize = 64 << 10;
const STREAM_BUFFER_MAX: usize = 512 << 10;
/// Heap that must stay free after a test's sockets are allocated.
const HEAP_RESERVE: usize = 512 << 10;
const MAX_PARAMS_JSON: usize = 8 << 10;
const MAX_RESULTS_JSON: usize = 64 << 10;
/// The real server's grace after a timed test's duration (4 s × 10 states).
const GRACE_NS: u64 = 40_000_000_000;
/// Extra data listeners kept during CREATE_STREAMS, for strangers.
const SPARE_LISTENERS: usize = 1;
/// Most data sockets a test may allocate, strangers included.
const MAX_DATA_SOCKETS: usize = MAX_STREAMS + 4;
/// How often the loop must come back while a paced (`-b`) stream waits.
const PACING_WAIT_NS: u64 = 1_000_000;
const NS_PER_S: u64 = 1_000_000_000;

/// iperf3's state bytes (`iperf_api.h`).
mod state {
    pub const TEST_START: u8 = 1;
    pub const TEST_RUNNING: u8 = 2;
    pub const TEST_END: u8 = 4;
    pub const PARAM_EXCHANGE: u8 = 9;
    pub const CREATE_STREAMS: u8 = 10;
    pub const SERVER_TERMINATE: u8 = 11;
    pub const CLIENT_TERMINATE: u8 = 12;
    pub const EXCHANGE_RESULTS: u8 = 13;
    pub const DISPLAY_RESULTS: u8 = 14;
    pub const IPERF_DONE: u8 = 16;
    /// -1 as a signed byte.
    pub const ACCESS_DENIED: u8 = 0xff;
    /// -2 as a signed byte.
    pub const SERVER_ERROR: u8 = 0xfe;
}

/// iperf3's error numbers (`i_errno`) sent after SERVER_ERROR.
mod ie {
    pub const NUMSTREAMS: i32 = 6;
    pub const REVERSEBIDIR: i32 = 25;
    pub const MESSAGE: i32 = 110;
    pub const RECVPARAMS: i32 = 114;
    pub const RECVRESULTS: i32 = 117;
    pub const PROTOCOL: i32 = 131;
    pub const CREATESTREAM: i32 = 200;
}

/// Linux errno values sent after the iperf3 error number.
mod errno {
    pub const NONE: i32 = 0;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EMSGSIZE: i32 = 90;
    pub const ETIMEDOUT: i32 = 110;
}

/// What a socket on port 5201 is doing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Listening (or closed, waiting to listen again).
    Listen,
    /// Connected: reading the cookie.
    Cookie,
    /// The running test's control connection.
    Control,
    /// One of the running test's data streams.
    Stream,
    /// Sending its last bytes (ACCESS_DENIED, an error), then closing.
    Closing,
    /// A data socket of a finished test, freed once closed.
    Orphan,
}

struct Slot {
    handle: SocketHandle,
    /// A data socket (allocated for one test) rather than a pool socket.
    data: bool,
    role: Role,
    since_ns: u64,
    input: Vec<u8>,
    output: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Phase {
    /// Waiting for the client's parameters.
    Params,
    /// Waiting for the data streams to connect.
    CreateStreams,
    /// Data flowing until the client's TEST_END.
    Running,
    /// Waiting for the client's results.
    Results,
    /// Results sent; waiting for IPERF_DONE.
    Display,
}

/// The client's parameters that the server acts on.
#[derive(Clone, Copy, Default)]
struct Params {
    reverse: bool,
    bidirectional: bool,
    parallel: usize,
    time_s: u64,
    bytes: u64,
    blocks: u64,
    blksize: u64,
    omit_s: u64,
    rate_bps: u64,
}

struct Stream {
    handle: SocketHandle,
    id: u32,
    /// The guest sends on this stream.
    sender: bool,
    /// Bytes counted for the results (after the omitted seconds).
    bytes: u64,
    /// Bytes queued in all (for the `-n`/`-k`/`-b` limits).
    queued: u64,
}

struct Test {
    cookie: [u8; COOKIE_SIZE],
    control: SocketHandle,
    phase: Phase,
    since_ns: u64,
    params: Params,
    streams: Vec<Stream>,
    /// Receive streams the test still waits for, then send streams.
    wanted: (usize, usize),
    stream_buffer: usize,
    data_sockets: usize,
    start_ns: u64,
    end_ns: u64,
    last_data_ns: u64,
    paced: bool,
}

impl Test {
    fn remaining(&self) -> usize {
        self.wanted.0 + self.wanted.1
    }

    fn counting_from_ns(&self) -> u64 {
        self.start_ns + self.params.omit_s.saturating_mul(NS_PER_S)
    }
}

/// Why the test ends.
enum End {
    /// A SERVER_ERROR with iperf3's error number and an errno.
    Error(i32, i32, &'static str),
    /// The client is gone or done, or a timeout hit: close quietly.
    Quiet(&'static str),
    /// The test outlived its duration: SERVER_TERMINATE.
    Terminate,
}

/// The iperf3 service: its sockets and the test being run.
pub struct Server {
    slots: Vec<Slot>,
    test: Option<Test>,
    pattern: Vec<u8>,
    tests_done: u64,
}

impl Server {
    /// Adds the listening sockets to `sockets`.
    pub fn new(sockets: &mut SocketSet<'_>) -> Self {
        let mut slots = Vec::new();
        for _ in 0..POOL_SOCKETS {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; POOL_BUFFER]),
                tcp::SocketBuffer::new(vec![0; POOL_BUFFER]),
            );
            socket.set_nagle_enabled(false);
            let _ = socket.listen(PORT);
            slots.push(Slot {
                handle: sockets.add(socket),
                data: false,
                role: Role::Listen,
                since_ns: 0,
                input: Vec::new(),
                output: Vec::new(),
            });
        }
        let pattern = (0..16384u32)
            .map(|i| (i.wrapping_mul(7) % 251) as u8)
            .collect();
        Self {
            slots,
            test: None,
            pattern,
            tests_done: 0,
        }
    }

    /// Tests completed through IPERF_DONE since the guest started.
    pub fn tests_done(&self) -> u64 {
        self.tests_done
    }

    /// How long the main loop may wait at most (a paced stream needs it back
    /// soon).
    pub fn wait_limit_ns(&self) -> u64 {
        match &self.test {
            Some(test) if test.phase == Phase::Running && test.paced => PACING_WAIT_NS,
            _ => u64::MAX,
        }
    }

    /// Serves every connection once: call after each poll of the stack.
    pub fn serve(&mut self, sockets: &mut SocketSet<'_>, now_ns: u64) {
        self.serve_slots(sockets, now_ns);
        if let Some(end) = self.serve_test(sockets, now_ns) {
            self.end_test(sockets, now_ns, end);
        }
        if self
            .test
            .as_ref()
            .is_some_and(|test| test.phase == Phase::CreateStreams)
        {
            // Pool sockets stay out of the way while the test's streams
            // connect (from the very pass that sent CREATE_STREAMS), so that
            // each stream lands on a data socket with large buffers.
            for slot in self.slots.iter().filter(|slot| !slot.data) {
                let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
                if slot.role == Role::Listen && socket.is_listening() {
                    socket.abort();
                }
            }
        }
        // Free the data sockets that are done with.
        let idle = self.test.is_none();
        let mut index = 0;
        while index < self.slots.len() {
            let slot = &mut self.slots[index];
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            let free = slot.data
                && match slot.role {
                    Role::Orphan => {
                        if now_ns.saturating_sub(slot.since_ns) > HANDSHAKE_NS {
                            socket.abort();
                        }
                        !socket.is_open()
                    }
                    Role::Listen => idle,
                    _ => false,
                };
            if free {
                sockets.remove(slot.handle);
                self.slots.swap_remove(index);
            } else {
                index += 1;
            }
        }
    }

    /// New connections, cookies, denials and closing sockets.
    fn serve_slots(&mut self, sockets: &mut SocketSet<'_>, now_ns: u64) {
        let creating = self
            .test
            .as_ref()
            .is_some_and(|test| test.phase == Phase::CreateStreams);
        for slot in self.slots.iter_mut() {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            if slot.role == Role::Listen {
                if socket.is_active() && socket.state() != tcp::State::SynReceived {
                    slot.role = Role::Cookie;
                    slot.since_ns = now_ns;
                    slot.input.clear();
                    slot.output.clear();
                } else {
                    if !slot.data && !creating && !socket.is_open() {
                        let _ = socket.listen(PORT);
                    }
                    continue;
                }
            }
            match slot.role {
                Role::Cookie => {
                    if let Some(test) = &self.test
                        && test.phase != Phase::CreateStreams
                    {
                        // Busy: the real server does not even read the cookie.
                        deny(slot, now_ns);
                    } else {
                        read_into(socket, &mut slot.input, COOKIE_SIZE);
                        if slot.input.len() == COOKIE_SIZE {
                            let mut cookie = [0; COOKIE_SIZE];
                            cookie.copy_from_slice(&slot.input);
                            slot.input.clear();
                            match &mut self.test {
                                None => {
                                    slot.role = Role::Control;
                                    slot.since_ns = now_ns;
                                    slot.output.push(state::PARAM_EXCHANGE);
                                    self.test = Some(Test {
                                        cookie,
                                        control: slot.handle,
                                        phase: Phase::Params,
                                        since_ns: now_ns,
                                        params: Params::default(),
                                        streams: Vec::new(),
                                        wanted: (0, 0),
                                        stream_buffer: 0,
                                        data_sockets: 0,
                                        start_ns: 0,
                                        end_ns: 0,
                                        last_data_ns: 0,
                                        paced: false,
                                    });
                                }
                                Some(test) if test.cookie == cookie && test.remaining() > 0 => {
                                    let sender = if test.wanted.0 > 0 {
                                        test.wanted.0 -= 1;
                                        false
                                    } else {
                                        test.wanted.1 -= 1;
                                        true
                                    };
                                    // Stream ids are 1, 3, 4, ... (iperf_add_stream).
                                    let id = if test.streams.is_empty() {
                                        1
                                    } else {
                                        test.streams.len() as u32 + 2
                                    };
                                    test.streams.push(Stream {
                                        handle: slot.handle,
                                        id,
                                        sender,
                                        bytes: 0,
                                        queued: 0,
                                    });
                                    slot.role = Role::Stream;
                                }
                                Some(_) => deny(slot, now_ns),
                            }
                        } else if !socket.may_recv()
                            || now_ns.saturating_sub(slot.since_ns) > HANDSHAKE_NS
                        {
                            socket.abort();
                            slot.role = if slot.data {
                                Role::Orphan
                            } else {
                                Role::Listen
                            };
                            slot.since_ns = now_ns;
                        }
                    }
                }
                Role::Closing => {
                    flush(socket, &mut slot.output);
                    if slot.output.is_empty() {
                        socket.close();
                    }
                    // Drain what the peer still sends, so that it sees a
                    // clean close rather than a full window.
                    discard(socket);
                    if !socket.is_open() {
                        slot.role = if slot.data {
                            Role::Orphan
                        } else {
                            Role::Listen
                        };
                        slot.since_ns = now_ns;
                    } else if now_ns.saturating_sub(slot.since_ns) > HANDSHAKE_NS {
                        socket.abort();
                    }
                }
                Role::Orphan => {
                    discard(socket);
                    if now_ns.saturating_sub(slot.since_ns) > HANDSHAKE_NS {
                        socket.abort();
                    }
                    if !slot.data && !socket.is_open() {
                        slot.role = Role::Listen;
                    }
                }
                Role::Listen | Role::Control | Role::Stream => {}
            }
        }
    }

    /// The running test's control connection and data streams.
    fn serve_test(&mut self, sockets: &mut SocketSet<'_>, now_ns: u64) -> Option<End> {
        let test = self.test.as_mut()?;
        let slots = &mut self.slots;
        let control = slots.iter().position(|slot| slot.handle == test.control)?;
        // Data first, so that counting stops at the TEST_END read below.
        if test.phase >= Phase::Running {
            serve_streams(test, sockets, now_ns, &self.pattern);
        }
        let slot = &mut slots[control];
        let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
        let limit = match test.phase {
            Phase::Params => 4 + MAX_PARAMS_JSON,
            Phase::Results => 4 + MAX_RESULTS_JSON,
            _ => 1,
        };
        read_into(socket, &mut slot.input, limit);
        let end = self::step(test, slot, now_ns, &mut self.tests_done);
        let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
        flush(socket, &mut slot.output);
        if end.is_some() {
            return end;
        }
        if slot.input.is_empty() && !socket.may_recv() {
            return Some(End::Quiet("the client closed its control connection"));
        }
        if test.phase == Phase::CreateStreams {
            if test.remaining() > 0 {
                if let Err(end) = add_listeners(test, slots, sockets, now_ns) {
                    return Some(end);
                }
            } else {
                let slot = &mut slots[control];
                slot.output.push(state::TEST_START);
                slot.output.push(state::TEST_RUNNING);
                flush(
                    sockets.get_mut::<tcp::Socket>(slot.handle),
                    &mut slot.output,
                );
                test.phase = Phase::Running;
                test.start_ns = now_ns;
                test.last_data_ns = now_ns;
                test.since_ns = now_ns;
            }
        }
        None
    }

    /// Tears the test down and frees its sockets.
    fn end_test(&mut self, sockets: &mut SocketSet<'_>, now_ns: u64, end: End) {
        let Some(test) = self.test.take() else {
            return;
        };
        for slot in self.slots.iter_mut() {
            let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
            if slot.handle == test.control {
                match end {
                    End::Error(number, errno, why) => {
                        slot.output.clear();
                        slot.output.push(state::SERVER_ERROR);
                        slot.output.extend_from_slice(&number.to_be_bytes());
                        slot.output.extend_from_slice(&errno.to_be_bytes());
                        if LOG {
                            crate::println!("iperf: error {number} sent to the client: {why}");
                        }
                    }
                    End::Terminate => {
                        slot.output.push(state::SERVER_TERMINATE);
                        if LOG {
                            crate::println!("iperf: test outlived its duration; terminated");
                        }
                    }
                    End::Quiet(why) => {
                        if LOG && test.phase != Phase::Display {
                            crate::println!("iperf: test ended in {:?}: {why}", test.phase);
                        }
                    }
                }
                slot.role = Role::Closing;
                slot.since_ns = now_ns;
                slot.input.clear();
            } else if slot.role == Role::Stream {
                // Closed gracefully at TEST_END; cut off otherwise.
                if test.phase < Phase::Results {
                    socket.abort();
                }
                slot.role = Role::Orphan;
                slot.since_ns = now_ns;
            }
        }
    }
}

/// Advances the control protocol with the bytes in `slot.input`.
fn step(test: &mut Test, slot: &mut Slot, now_ns: u64, tests_done: &mut u64) -> Option<End> {
    match test.phase {
        Phase::Params => {
            let text = match message(&slot.input, MAX_PARAMS_JSON) {
                Err(()) => {
                    return Some(End::Error(
                        ie::RECVPARAMS,
                        errno::EMSGSIZE,
                        "parameters longer than 8 KiB",
                    ));
                }
                Ok(None) => return timeout(test, now_ns, ie::RECVPARAMS, "parameters"),
                Ok(Some(text)) => text,
            };
            let used = 4 + text.len();
            let params = match parse_params(text) {
                Ok(params) => params,
                Err(end) => return Some(end),
            };
            // Whatever follows the message is the next message.
            slot.input.drain(..used);
            test.params = params;
            test.wanted = if params.bidirectional {
                (params.parallel, params.parallel)
            } else if params.reverse {
                (0, params.parallel)
            } else {
                (params.parallel, 0)
            };
            let sockets = test.remaining() + SPARE_LISTENERS;
            test.stream_buffer =
                (DATA_BUDGET / 2 / sockets).clamp(STREAM_BUFFER_MIN, STREAM_BUFFER_MAX);
            test.paced = params.rate_bps > 0 && test.wanted.1 > 0;
            test.phase = Phase::CreateStreams;
            test.since_ns = now_ns;
            slot.output.push(state::CREATE_STREAMS);
            None
        }
        Phase::CreateStreams | Phase::Running | Phase::Display => {
            let Some(&byte) = slot.input.first() else {
                return match test.phase {
                    Phase::CreateStreams => {
                        timeout(test, now_ns, ie::CREATESTREAM, "the data streams")
                    }
                    Phase::Running => running_timeout(test, now_ns),
                    _ => {
                        if now_ns.saturating_sub(test.since_ns) > HANDSHAKE_NS {
                            Some(End::Quiet("no IPERF_DONE from the client"))
                        } else {
                            None
                        }
                    }
                };
            };
            slot.input.remove(0);
            match byte {
                state::TEST_START => None,
                state::TEST_END if test.phase == Phase::Running => {
                    test.end_ns = now_ns;
                    test.phase = Phase::Results;
                    test.since_ns = now_ns;
                    slot.output.push(state::EXCHANGE_RESULTS);
                    None
                }
                state::IPERF_DONE => {
                    if test.phase == Phase::Display {
                        *tests_done += 1;
                    }
                    Some(End::Quiet("IPERF_DONE before the results"))
                }
                state::CLIENT_TERMINATE => Some(End::Quiet("the client terminated the test")),
                _ => Some(End::Error(
                    ie::MESSAGE,
                    errno::NONE,
                    "unknown control message",
                )),
            }
        }
        Phase::Results => {
            let text = match message(&slot.input, MAX_RESULTS_JSON) {
                Err(()) => {
                    return Some(End::Error(
                        ie::RECVRESULTS,
                        errno::EMSGSIZE,
                        "results longer than 64 KiB",
                    ));
                }
                Ok(None) => return timeout(test, now_ns, ie::RECVRESULTS, "results"),
                Ok(Some(text)) => text,
            };
            if !client_results_valid(text) {
                return Some(End::Error(
                    ie::RECVRESULTS,
                    errno::EINVAL,
                    "client results are not iperf3 results",
                ));
            }
            let used = 4 + text.len();
            slot.input.drain(..used);
            let results = server_results(test);
            slot.output
                .extend_from_slice(&(results.len() as u32).to_be_bytes());
            slot.output.extend_from_slice(results.as_bytes());
            slot.output.push(state::DISPLAY_RESULTS);
            test.phase = Phase::Display;
            test.since_ns = now_ns;
            report(test);
            None
        }
    }
}

/// A complete length-prefixed message in `input`: `Ok(None)` while
/// incomplete, `Err` when it announces more than `max` bytes.
fn message(input: &[u8], max: usize) -> Result<Option<&[u8]>, ()> {
    let Some(header) = input.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(());
    }
    Ok(input.get(4..4 + len))
}

fn timeout(test: &Test, now_ns: u64, number: i32, what: &'static str) -> Option<End> {
    if now_ns.saturating_sub(test.since_ns) > HANDSHAKE_NS {
        let why = match what {
            "parameters" => "no parameters within 10 s",
            "results" => "no results within 10 s",
            _ => "the data streams did not connect within 10 s",
        };
        Some(End::Error(number, errno::ETIMEDOUT, why))
    } else {
        None
    }
}

fn running_timeout(test: &Test, now_ns: u64) -> Option<End> {
    let elapsed = now_ns.saturating_sub(test.start_ns);
    let params = &test.params;
    if params.time_s > 0 {
        let limit = (params.time_s.saturating_add(params.omit_s))
            .saturating_mul(NS_PER_S)
            .saturating_add(GRACE_NS);
        if elapsed > limit {
            return Some(End::Terminate);
        }
    } else if now_ns.saturating_sub(test.last_data_ns) > IDLE_NS {
        return Some(End::Quiet("no data for 120 s"));
    }
    None
}

/// The client's parameters, or the SERVER_ERROR that refuses them.
fn parse_params(text: &[u8]) -> Result<Params, End> {
    let members = json::object_members(text).map_err(|_| {
        End::Error(
            ie::RECVPARAMS,
            errno::EINVAL,
            "parameters are not a JSON object",
        )
    })?;
    let number = |key: &str| match json::get(&members, key) {
        Some(Value::Number(value)) => Ok(Some(value)),
        None => Ok(None),
        Some(_) => Err(End::Error(
            ie::RECVPARAMS,
            errno::EINVAL,
            "a numeric parameter is not a number",
        )),
    };
    let unsigned = |key: &str| number(key).map(|value| value.unwrap_or(0).max(0) as u64);
    if json::get(&members, "udp").is_some() || json::get(&members, "sctp").is_some() {
        return Err(End::Error(
            ie::PROTOCOL,
            errno::NONE,
            "only TCP tests are served",
        ));
    }
    let reverse = json::get(&members, "reverse").is_some();
    let bidirectional = json::get(&members, "bidirectional").is_some();
    if reverse && bidirectional {
        return Err(End::Error(
            ie::REVERSEBIDIR,
            errno::NONE,
            "reverse and bidirectional at once",
        ));
    }
    let parallel = number("parallel")?.unwrap_or(1);
    if parallel < 1 || parallel > MAX_STREAMS as i64 {
        return Err(End::Error(
            ie::NUMSTREAMS,
            errno::NONE,
            "more parallel streams than the guest serves (8)",
        ));
    }
    Ok(Params {
        reverse,
        bidirectional,
        parallel: parallel as usize,
        time_s: unsigned("time")?,
        bytes: unsigned("num")?,
        blocks: unsigned("blockcount")?,
        blksize: unsigned("len")?,
        omit_s: unsigned("omit")?,
        rate_bps: unsigned("bandwidth")?,
    })
}

/// What the real server checks of the client's results: the CPU figures,
/// the retransmit flag and a stream list.
fn client_results_valid(text: &[u8]) -> bool {
    let Ok(members) = json::object_members(text) else {
        return false;
    };
    [
        "cpu_util_total",
        "cpu_util_user",
        "cpu_util_system",
        "sender_has_retransmits",
    ]
    .iter()
    .all(|key| matches!(json::get(&members, key), Some(Value::Number(_))))
        && matches!(json::get(&members, "streams"), Some(Value::Array))
}

fn server_results(test: &Test) -> String {
    let receiver_only = !test.params.reverse && !test.params.bidirectional;
    // `sender_has_retransmits` is -1 when the server only receives; 0 (no
    // counter) when it sends.
    let retransmits_flag = if receiver_only { -1 } else { 0 };
    let ns = test
        .end_ns
        .saturating_sub(test.counting_from_ns().min(test.end_ns));
    let mut text = String::new();
    let _ = write!(
        text,
        "{{\"cpu_util_total\":0,\"cpu_util_user\":0,\"cpu_util_system\":0,\"sender_has_retransmits\":{retransmits_flag},\"streams\":["
    );
    for (index, stream) in test.streams.iter().enumerate() {
        if index > 0 {
            text.push(',');
        }
        let _ = write!(
            text,
            "{{\"id\":{},\"bytes\":{},\"retransmits\":-1,\"jitter\":0,\"errors\":0,\"packets\":0,\"start_time\":0,\"end_time\":{}.{:09}}}",
            stream.id,
            stream.bytes,
            ns / NS_PER_S,
            ns % NS_PER_S
        );
    }
    text.push_str("]}");
    text
}

/// One console line per completed test (when [`LOG`] is on).
fn report(test: &Test) {
    if !LOG {
        return;
    }
    let ns = test
        .end_ns
        .saturating_sub(test.counting_from_ns().min(test.end_ns))
        .max(1);
    let received: u64 = test
        .streams
        .iter()
        .filter(|s| !s.sender)
        .map(|s| s.bytes)
        .sum();
    let sent: u64 = test
        .streams
        .iter()
        .filter(|s| s.sender)
        .map(|s| s.bytes)
        .sum();
    let mbit = |bytes: u64| (u128::from(bytes) * 8 * 1000 / u128::from(ns)) as u64;
    crate::println!(
        "iperf: {} stream(s), received {received} bytes ({} Mbit/s), sent {sent} bytes ({} Mbit/s) in {}.{:03} s",
        test.streams.len(),
        mbit(received),
        mbit(sent),
        ns / NS_PER_S,
        (ns % NS_PER_S) / 1_000_000
    );
}

/// Moves data on every stream of a running test; after TEST_END, closes
/// them and keeps draining what still arrives.
fn serve_streams(test: &mut Test, sockets: &mut SocketSet<'_>, now_ns: u64, pattern: &[u8]) {
    let running = test.phase == Phase::Running;
    let counting = now_ns >= test.counting_from_ns();
    let elapsed = now_ns.saturating_sub(test.start_ns);
    let params = test.params;
    let mut moved = false;
    for stream in test.streams.iter_mut() {
        let socket = sockets.get_mut::<tcp::Socket>(stream.handle);
        if !running {
            if socket.may_send() {
                socket.close();
            }
            discard(socket);
            continue;
        }
        if stream.sender {
            let mut limit = u64::MAX;
            if params.bytes > 0 {
                limit = limit.min(params.bytes);
            }
            if params.blocks > 0 {
                limit = limit.min(params.blocks.saturating_mul(params.blksize.max(1)));
            }
            if params.rate_bps > 0 {
                let allowed =
                    u128::from(params.rate_bps) * u128::from(elapsed) / (8 * u128::from(NS_PER_S));
                limit = limit.min(u64::try_from(allowed).unwrap_or(u64::MAX));
            }
            while socket.can_send() && stream.queued < limit {
                let room = (limit - stream.queued).min(usize::MAX as u64) as usize;
                let sent = socket.send(|buffer| {
                    let len = buffer.len().min(room);
                    for chunk in buffer[..len].chunks_mut(pattern.len()) {
                        chunk.copy_from_slice(&pattern[..chunk.len()]);
                    }
                    (len, len)
                });
                match sent {
                    Ok(len) if len > 0 => {
                        stream.queued += len as u64;
                        if counting {
                            stream.bytes += len as u64;
                        }
                        moved = true;
                    }
                    _ => break,
                }
            }
        } else {
            let received = discard(socket);
            if received > 0 {
                moved = true;
                if counting {
                    stream.bytes += received;
                }
            }
        }
    }
    if moved {
        test.last_data_ns = now_ns;
    }
}

/// Keeps enough data sockets listening for the streams still to come.
fn add_listeners(
    test: &mut Test,
    slots: &mut Vec<Slot>,
    sockets: &mut SocketSet<'_>,
    now_ns: u64,
) -> Result<(), End> {
    if test.data_sockets == 0 {
        // A new test's streams need the memory more than the last test's
        // closing handshakes do: cut those off now.
        slots.retain(|slot| {
            let done = slot.data && slot.role == Role::Orphan;
            if done {
                sockets.remove(slot.handle);
            }
            !done
        });
    }
    let listening = slots
        .iter()
        .filter(|slot| {
            slot.data
                && slot.role == Role::Listen
                && sockets.get::<tcp::Socket>(slot.handle).is_listening()
        })
        .count();
    let needed = test.remaining() + SPARE_LISTENERS;
    for _ in listening..needed {
        if test.data_sockets == MAX_DATA_SOCKETS {
            return Err(End::Error(
                ie::CREATESTREAM,
                errno::ENOMEM,
                "too many connections while the streams connect",
            ));
        }
        let socket = data_socket(test.stream_buffer).map_err(|_| {
            End::Error(
                ie::CREATESTREAM,
                errno::ENOMEM,
                "no memory for a data stream's buffers",
            )
        })?;
        if crate::heap::free_bytes() < HEAP_RESERVE {
            return Err(End::Error(
                ie::CREATESTREAM,
                errno::ENOMEM,
                "no memory for a data stream's buffers",
            ));
        }
        test.data_sockets += 1;
        slots.push(Slot {
            handle: sockets.add(socket),
            data: true,
            role: Role::Listen,
            since_ns: now_ns,
            input: Vec::new(),
            output: Vec::new(),
        });
    }
    Ok(())
}

/// A listening data socket with `size`-byte buffers each way.
fn data_socket(size: usize) -> Result<tcp::Socket<'static>, TryReserveError> {
    let mut rx = Vec::new();
    rx.try_reserve_exact(size)?;
    rx.resize(size, 0);
    let mut tx = Vec::new();
    tx.try_reserve_exact(size)?;
    tx.resize(size, 0);
    let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
    let _ = socket.listen(PORT);
    Ok(socket)
}

fn deny(slot: &mut Slot, now_ns: u64) {
    slot.output.clear();
    slot.output.push(state::ACCESS_DENIED);
    slot.input.clear();
    slot.role = Role::Closing;
    slot.since_ns = now_ns;
}

/// Reads from `socket` until `input` holds `limit` bytes.
fn read_into(socket: &mut tcp::Socket<'_>, input: &mut Vec<u8>, limit: usize) {
    while socket.can_recv() && input.len() < limit {
        let room = limit - input.len();
        let read = socket.recv(|data| {
            let take = data.len().min(room);
            input.extend_from_slice(&data[..take]);
            (take, take)
        });
        if !matches!(read, Ok(len) if len > 0) {
            break;
        }
    }
}

/// Drops everything received; returns how many bytes.
fn discard(socket: &mut tcp::Socket<'_>) -> u64 {
    let mut total = 0;
    while socket.can_recv() {
        match socket.recv(|data| (data.len(), data.len())) {
            Ok(len) if len > 0 => total += len as u64,
            _ => break,
        }
    }
    total
}

fn flush(socket: &mut tcp::Socket<'_>, output: &mut Vec<u8>) {
    if !output.is_empty()
        && socket.can_send()
        && let Ok(sent) = socket.send_slice(output)
    {
        output.drain(..sent);
    }
}
