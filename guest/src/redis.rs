//! The Redis service on port 6379: smoltcp sockets in front of the store in
//! the `guest-redis` crate (codec, data types, command table).
//!
//! ```text
//!  slot i: tcp::Socket (rx 4 KiB, tx 8 KiB) ─recv─▶ input ─Server::serve─▶ output ─send─▶ socket
//!          Listen ─▶ Established (Client i) ─▶ peer FIN, all sent ─▶ RST, Listen again
//! ```
//!
//! # Limits
//!
//! - **Connections**: one listening socket per slot; the slot count comes
//!   from guest memory (a third of the heap left after the other services,
//!   13 KiB a slot, between [`MIN_SLOTS`] and [`MAX_SLOTS`]: 512 at 32 MiB,
//!   214 at 16 MiB). A SYN that finds no listening slot is answered
//!   with RST (connection refused). When a peer has closed and every reply
//!   was acknowledged the slot resets at once, so a client that reconnects
//!   in a burst (redis-benchmark between tests) finds it listening again.
//! - **Memory**: `maxmemory` is the heap minus a reserve (an eighth of what
//!   is free once the sockets exist, at least 2 MiB). Above it write
//!   commands get `-OOM`; connection buffers may grow into the first half
//!   of the reserve and no further (a connection then stops reading:
//!   TCP back-pressure), and requests are parsed only below that line too,
//!   so the store's own small infallible allocations always find room.
//! - **Per connection**: unparsed input up to [`INPUT_LIMIT`] (one
//!   [`MAX_BULK_LEN`] argument and change), replies are produced only while
//!   less than [`OUTPUT_LIMIT`] is waiting to be sent (pipelines wait).
//!
//! Time is the clock returned by the last `WAIT` exit, in ms: logged, so
//! expiry replays exactly on the backup.
//!
//! # Persistence
//!
//! With a virtio-blk disk the store keeps an append-only file there
//! ([`crate::aof`]): loaded at start, then every successful write command
//! is appended and flushed before the replies of the same batch are sent
//! (`appendfsync always`: a reply means durable).

use alloc::vec;
use alloc::vec::Vec;

use guest_redis::resp::MAX_BULK_LEN;
use guest_redis::{After, Client, Config, Server};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use crate::aof::Aof;
use crate::heap;
use crate::virtio_blk::BlkDevice;

/// The service's port.
pub const PORT: u16 = 6379;
/// Receive buffer of each socket.
const RX_BUFFER: usize = 4 << 10;
/// Transmit buffer of each socket.
const TX_BUFFER: usize = 8 << 10;
/// Heap a slot costs: both buffers and smoltcp's socket (measured ~1 KiB).
const SLOT_COST: usize = RX_BUFFER + TX_BUFFER + (1 << 10);
/// Fewest connection slots.
pub const MIN_SLOTS: usize = 64;
/// Most connection slots.
pub const MAX_SLOTS: usize = 512;
/// Unparsed input a connection may hold.
pub const INPUT_LIMIT: usize = MAX_BULK_LEN + (64 << 10);
/// Replies waiting to be sent beyond which a connection's requests wait.
pub const OUTPUT_LIMIT: usize = 64 << 10;
/// Smallest memory reserve above `maxmemory`.
const MIN_RESERVE: usize = 2 << 20;
/// Output capacity kept once a connection's replies are all sent.
const OUTPUT_KEEP: usize = 16 << 10;

struct Slot {
    handle: SocketHandle,
    client: Option<Client>,
    input: Vec<u8>,
    output: Vec<u8>,
    closing: bool,
}

/// The Redis service: its sockets and the store.
pub struct Redis {
    slots: Vec<Slot>,
    server: Option<Server>,
    /// Heap use beyond which buffers stop growing and requests wait.
    buffer_limit: usize,
    aof: Option<Aof>,
    /// Records and bytes loaded from the append-only file at start.
    loaded: (usize, u64),
}

fn used_memory() -> usize {
    heap::used()
}

impl Redis {
    /// Creates the listening sockets (as many as memory allows, see the
    /// module docs). Call after the other services' sockets exist.
    pub fn new(sockets: &mut SocketSet<'_>) -> Self {
        let free = heap::size().saturating_sub(heap::used());
        let count = (free / 3 / SLOT_COST).clamp(MIN_SLOTS, MAX_SLOTS);
        let mut slots = Vec::with_capacity(count);
        for _ in 0..count {
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
                tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
            );
            // Replies go out at once, as Redis sets TCP_NODELAY.
            socket.set_nagle_enabled(false);
            slots.push(Slot {
                handle: sockets.add(socket),
                client: None,
                input: Vec::new(),
                output: Vec::new(),
                closing: false,
            });
        }
        let free = heap::size().saturating_sub(heap::used());
        let reserve = (free / 8).max(MIN_RESERVE).min(free / 2);
        Self {
            slots,
            server: None,
            buffer_limit: heap::size().saturating_sub(reserve / 2),
            aof: None,
            loaded: (0, 0),
        }
    }

    /// Connection slots (the connection limit).
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Starts the store at `now_ms` with the random `seed` (SPOP picks).
    pub fn start(&mut self, now_ms: u64, seed: u64) -> (usize, usize) {
        let reserve = 2 * (heap::size() - self.buffer_limit);
        let maxmemory = heap::size().saturating_sub(reserve);
        self.server = Some(Server::new(
            Config {
                maxmemory,
                used_memory,
                maxclients: self.slots.len(),
                port: PORT,
                seed,
            },
            now_ms,
        ));
        if let (Some(server), Ok(disk)) = (self.server.as_mut(), BlkDevice::init()) {
            match Aof::open(disk) {
                Ok((aof, records)) => {
                    let mut loader = server.connect(now_ms);
                    let mut ignored = Vec::new();
                    for record in &records {
                        server.serve(&mut loader, record, now_ms, &mut ignored, usize::MAX);
                        ignored.clear();
                    }
                    server.disconnect(loader);
                    server.set_aof(true);
                    self.loaded = (records.len(), aof.len());
                    self.aof = Some(aof);
                }
                Err(error) => {
                    crate::println!("redis: cannot read the append-only file: {error:?}")
                }
            }
        }
        (self.slots.len(), maxmemory)
    }

    /// With a disk: the records and bytes loaded from the append-only file.
    pub fn aof_loaded(&self) -> Option<(usize, u64)> {
        self.aof.as_ref().map(|_| self.loaded)
    }

    /// Serves every connection once at `now_ms`; removes due keys.
    pub fn poll(&mut self, sockets: &mut SocketSet<'_>, now_ms: u64) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        for slot in &mut self.slots {
            serve(
                slot,
                sockets,
                server,
                now_ms,
                self.buffer_limit,
                &mut self.aof,
            );
        }
        server.sweep_expired(now_ms);
    }
}

fn reset(slot: &mut Slot, server: &mut Server) {
    if let Some(client) = slot.client.take() {
        server.disconnect(client);
    }
    slot.input = Vec::new();
    slot.output = Vec::new();
    slot.closing = false;
}

/// Makes room for `more` input bytes if the heap stays under `limit`:
/// amortized growth when that fits, exact growth when only that does.
fn reserve_input(input: &mut Vec<u8>, more: usize, limit: usize) -> bool {
    let spare = input.capacity() - input.len();
    if spare >= more {
        return true;
    }
    let used = heap::used();
    let doubled = (input.capacity() * 2).max(input.len() + more);
    if used + doubled <= limit && input.try_reserve(more).is_ok() {
        return true;
    }
    used + input.len() + more <= limit && input.try_reserve_exact(more).is_ok()
}

fn serve(
    slot: &mut Slot,
    sockets: &mut SocketSet<'_>,
    server: &mut Server,
    now_ms: u64,
    buffer_limit: usize,
    aof: &mut Option<Aof>,
) {
    let socket = sockets.get_mut::<tcp::Socket>(slot.handle);
    if !socket.is_open() {
        reset(slot, server);
        let _ = socket.listen(PORT);
        return;
    }
    if !socket.is_active() {
        // Listening; or back to listening after a reset handshake, whose
        // client (made at SYN-RECEIVED) is gone.
        if slot.client.is_some() {
            reset(slot, server);
        }
        return;
    }
    if slot.client.is_none() {
        slot.client = Some(server.connect(now_ms));
    }
    // Read what fits, as long as memory allows (otherwise TCP holds it).
    let waiting = socket.recv_queue();
    let room = INPUT_LIMIT.saturating_sub(slot.input.len()).min(waiting);
    if room > 0 && !slot.closing && reserve_input(&mut slot.input, room, buffer_limit) {
        let _ = socket.recv(|data| {
            let take = data.len().min(room);
            slot.input.extend_from_slice(&data[..take]);
            (take, ())
        });
    }
    if !slot.closing
        && !slot.input.is_empty()
        && heap::used() <= buffer_limit
        && let Some(client) = slot.client.as_mut()
    {
        let (used, after) =
            server.serve(client, &slot.input, now_ms, &mut slot.output, OUTPUT_LIMIT);
        slot.input.drain(..used);
        if after == After::Close {
            slot.closing = true;
        }
        // Durable before any reply of this batch leaves.
        let writes = server.take_aof();
        if let Some(aof) = aof.as_mut()
            && let Err(error) = aof.append(&writes)
        {
            crate::println!("redis: append-only file write failed: {error:?}");
        }
    }
    if !slot.output.is_empty()
        && socket.can_send()
        && let Ok(sent) = socket.send_slice(&slot.output)
    {
        slot.output.drain(..sent);
        if slot.output.is_empty() && slot.output.capacity() > OUTPUT_KEEP {
            slot.output = Vec::new();
        }
    }
    if slot.input.capacity() > INPUT_LIMIT / 4 && slot.input.len() < OUTPUT_KEEP {
        slot.input.shrink_to(OUTPUT_KEEP);
    }
    let peer_done = !socket.may_recv() && socket.state() == tcp::State::CloseWait;
    if slot.output.is_empty() {
        if peer_done && socket.send_queue() == 0 {
            // The peer has closed and acknowledged every reply: free the
            // slot now (RST) rather than after a FIN round trip.
            socket.abort();
        } else if slot.closing || peer_done {
            socket.close();
        }
    }
}
