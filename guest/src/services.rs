//! The network guest's services over smoltcp: TCP echo (port 7), sink
//! (5001: reads and discards, for the receive benchmark), source (5002:
//! writes without end, for the transmit benchmark) and a Redis-protocol
//! store (6379, in [`crate::redis`]: its own sockets and connection limit);
//! an iperf3 server (5201, see [`crate::iperf`]).
//!
//! One loop, no interrupts: poll the stack, serve every socket, flush TX
//! (one notify exit), then `WAIT` (one exit that delivers received frames and
//! returns the clock) for as long as the stack has nothing to do.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::pv;
use crate::virtio_net::NetDevice;

/// Port of the echo service.
pub const ECHO_PORT: u16 = 7;
/// Port of the sink (receive benchmark).
pub const SINK_PORT: u16 = 5001;
/// Port of the source (transmit benchmark).
pub const SOURCE_PORT: u16 = 5002;
/// Port of the key-value store.
pub const REDIS_PORT: u16 = crate::redis::PORT;

/// Longest the loop sleeps in `WAIT` when the stack has no timer due.
const MAX_WAIT_NS: u64 = 50_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Service {
    Echo,
    Sink,
    Source,
}

impl Service {
    fn port(self) -> u16 {
        match self {
            Self::Echo => ECHO_PORT,
            Self::Sink => SINK_PORT,
            Self::Source => SOURCE_PORT,
        }
    }
}

struct Connection {
    handle: SocketHandle,
    service: Service,
    output: Vec<u8>,
}

/// Runs the services forever.
pub fn run() -> ! {
    crate::heap::init();
    let mut device = match NetDevice::init() {
        Ok(device) => device,
        Err(error) => {
            crate::println!("net: no usable virtio-net device: {error:?}");
            pv::done(2)
        }
    };
    let (address, prefix) = guest_abi::net_address_from_arg(pv::arg());
    let mac = device.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = pv::entropy();
    let mut now_ns = pv::wait(0);
    let mut iface = Interface::new(config, &mut device, instant(now_ns));
    iface.update_ip_addrs(|addresses| {
        let [a, b, c, d] = address;
        let _ = addresses.push(IpCidr::new(IpAddress::v4(a, b, c, d), prefix));
    });
    let mut sockets = SocketSet::new(vec![]);
    let mut connections = Vec::new();
    for (service, count, buffer) in [
        (Service::Echo, 4, 64 << 10),
        (Service::Sink, 2, 512 << 10),
        (Service::Source, 2, 512 << 10),
    ] {
        for _ in 0..count {
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; buffer]),
                tcp::SocketBuffer::new(vec![0; buffer]),
            );
            connections.push(Connection {
                handle: sockets.add(socket),
                service,
                output: Vec::new(),
            });
        }
    }
    let mut iperf = crate::iperf::Server::new(&mut sockets);
    // The Redis service last: its slot count depends on the memory left.
    let mut redis = crate::redis::Redis::new(&mut sockets);
    let (slots, maxmemory) = redis.start(now_ns / 1_000_000, pv::entropy());
    let [a, b, c, d] = address;
    crate::println!(
        "net: {a}.{b}.{c}.{d}/{prefix} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}; echo {ECHO_PORT}, sink {SINK_PORT}, source {SOURCE_PORT}, iperf3 {}, redis {REDIS_PORT} ({slots} connections, maxmemory {maxmemory} of a {} byte heap)",
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        crate::iperf::PORT,
        crate::heap::size()
    );
    if let Some((records, bytes)) = redis.aof_loaded() {
        crate::println!("net: redis append-only file: {records} records, {bytes} bytes loaded");
    }
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    loop {
        let now = instant(now_ns);
        iface.poll(now, &mut device, &mut sockets);
        for connection in connections.iter_mut() {
            serve(connection, &mut sockets, &pattern);
        }
        redis.poll(&mut sockets, now_ns / 1_000_000);
        iperf.serve(&mut sockets, now_ns);
        iface.poll(now, &mut device, &mut sockets);
        device.tx.flush();
        let wait_ns = match iface.poll_delay(now, &sockets) {
            Some(delay) => (delay.total_micros() * 1000).min(MAX_WAIT_NS),
            None => MAX_WAIT_NS,
        }
        .min(iperf.wait_limit_ns());
        now_ns = pv::wait(wait_ns);
    }
}

fn instant(ns: u64) -> Instant {
    Instant::from_micros((ns / 1000) as i64)
}

fn serve(connection: &mut Connection, sockets: &mut SocketSet<'_>, pattern: &[u8]) {
    let socket = sockets.get_mut::<tcp::Socket>(connection.handle);
    if !socket.is_open() {
        connection.output.clear();
        let _ = socket.listen(connection.service.port());
        return;
    }
    match connection.service {
        Service::Sink => {
            while socket.can_recv() {
                if socket.recv(|data| (data.len(), ())).is_err() {
                    break;
                }
            }
        }
        Service::Source => {
            while socket.can_send() {
                let sent = socket.send(|buffer| {
                    let len = buffer.len().min(pattern.len());
                    buffer[..len].copy_from_slice(&pattern[..len]);
                    (len, len)
                });
                if !matches!(sent, Ok(len) if len > 0) {
                    break;
                }
            }
        }
        Service::Echo => {
            if connection.output.is_empty() && socket.can_recv() {
                let _ = socket.recv(|data| {
                    connection.output.extend_from_slice(data);
                    (data.len(), ())
                });
            }
        }
    }
    if !connection.output.is_empty() && socket.can_send() {
        if let Ok(sent) = socket.send_slice(&connection.output) {
            connection.output.drain(..sent);
        }
    }
    let peer_done = !socket.may_recv() && socket.state() == tcp::State::CloseWait;
    if connection.output.is_empty() && peer_done {
        socket.close();
    }
}
