//! The load: what drives bytes between the client and the guest and
//! measures them, behind one trait so that the benchmark switches from the
//! guest's own sink/source services to stock iperf3 in one place.
//!
//! - [`Builtin`]: a TCP client on a thread inside the client's namespace,
//!   writing incompressible bytes to the guest's sink (port 5001, receive)
//!   or reading its source (5002, transmit);
//! - [`Iperf3`]: Debian's `iperf3 -c GUEST [-R] -J` in the client's
//!   namespace against the guest's iperf3 server (port 5201), using
//!   iperf3's own per-interval figures.
//!
//! Both count only the window after the warm-up, and take the CPU
//! snapshots (see [`super::procfs`]) when the window opens and closes.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::hosts::Hosts;
use super::procfs;
use super::scenario::Direction;

/// What the client measured.
#[derive(Clone, Debug)]
pub struct ClientFigures {
    /// Payload Mbit/s in the window.
    pub mbit_s: f64,
    /// The window, s.
    pub window_s: f64,
    /// Payload bytes moved in all (warm-up and window).
    pub client_bytes: f64,
    /// Seconds the traffic flowed (warm-up and window).
    pub active_s: f64,
    /// CPU use in the window, cores.
    pub cpu: BTreeMap<String, f64>,
}

/// How long to drive traffic.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Seconds before the window opens (TCP slow start).
    pub warmup: f64,
    /// The window, s.
    pub seconds: f64,
}

/// Checks that the processes under test still run (`Err` names the one
/// that exited and its last words).
pub type Alive<'a> = dyn FnMut() -> Result<(), String> + Send + 'a;

/// A load generator.
pub trait Load: Sync {
    /// `builtin` or `iperf3`.
    fn name(&self) -> &'static str;
    /// The guest port that must answer before a measurement starts.
    fn ready_port(&self) -> u16;
    /// Drives `direction` for `timing` and measures it; `pids` are the
    /// processes whose CPU the window accounts.
    fn run(
        &self,
        hosts: &Hosts,
        direction: Direction,
        timing: Timing,
        pids: &[(&'static str, u32)],
        alive: &mut Alive<'_>,
    ) -> Result<ClientFigures, String>;
}

/// The guest's sink and source, driven by a client thread of ours.
pub struct Builtin;

/// The guest's sink port (receive).
pub const SINK_PORT: u16 = 5001;
/// The guest's source port (transmit).
pub const SOURCE_PORT: u16 = 5002;
/// The guest's iperf3 port.
pub const IPERF3_PORT: u16 = 5201;

/// 64 KiB of pseudo-random bytes (fixed seed): incompressible within a
/// frame, so no encoding of received frames can look better than it is.
fn incompressible() -> Vec<u8> {
    let mut bytes = vec![0; 1 << 16];
    fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15).fill(&mut bytes);
    bytes
}

impl Load for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn ready_port(&self) -> u16 {
        SINK_PORT
    }

    fn run(
        &self,
        hosts: &Hosts,
        direction: Direction,
        timing: Timing,
        pids: &[(&'static str, u32)],
        alive: &mut Alive<'_>,
    ) -> Result<ClientFigures, String> {
        let guest = hosts.guest();
        hosts.in_client(|| builtin(guest.into(), direction, timing, pids, alive))?
    }
}

fn builtin(
    guest: std::net::IpAddr,
    direction: Direction,
    timing: Timing,
    pids: &[(&'static str, u32)],
    alive: &mut Alive<'_>,
) -> Result<ClientFigures, String> {
    let port = match direction {
        Direction::Receive => SINK_PORT,
        Direction::Transmit => SOURCE_PORT,
    };
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::new(guest, port), Duration::from_secs(2))
            .map_err(|e| format!("connect to the guest's port {port}: {e}"))?;
    let _ = stream.set_write_timeout(Some(Duration::from_millis(250)));
    let _ = stream.set_read_timeout(Some(Duration::from_millis(250)));
    let mut buffer = incompressible();
    let began = Instant::now();
    let warmup_end = began + Duration::from_secs_f64(timing.warmup);
    let window = Duration::from_secs_f64(timing.seconds);
    let mut opened: Option<(Instant, procfs::Snapshot)> = None;
    let (mut bytes, mut all_bytes) = (0u64, 0u64);
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        if opened.is_none() && now >= warmup_end {
            opened = Some((now, procfs::snapshot(pids)));
        }
        if let Some((from, _)) = &opened
            && now.duration_since(*from) >= window
        {
            break;
        }
        // Only operations that start inside the window count.
        let counted = opened.is_some();
        let moved = match direction {
            Direction::Receive => stream.write(&buffer),
            Direction::Transmit => stream.read(&mut buffer),
        };
        match moved {
            Ok(0) => {
                alive()?;
                return Err(format!("the guest closed the {} stream", direction.name()));
            }
            Ok(n) => {
                all_bytes += n as u64;
                if counted {
                    bytes += n as u64;
                }
                last_progress = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                alive()?;
                if last_progress.elapsed() > Duration::from_secs(3) {
                    return Err(format!(
                        "the {} stream made no progress for 3 s",
                        direction.name()
                    ));
                }
            }
            Err(e) => {
                alive()?;
                return Err(format!("{} stream: {e}", direction.name()));
            }
        }
    }
    let end = Instant::now();
    let after = procfs::snapshot(pids);
    if direction == Direction::Receive {
        // What the guest has acknowledged, not what sits in our socket
        // buffer: wait (up to 2 s) for the bytes in flight to be acked, so
        // the count matches what the guest received (and the log holds).
        let deadline = Instant::now() + Duration::from_secs(2);
        while bytes_acked(&stream).is_some_and(|acked| acked < all_bytes)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(acked) = bytes_acked(&stream) {
            all_bytes = acked.min(all_bytes);
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    let Some((from, before)) = opened else {
        return Err("the window never opened".into());
    };
    let seconds = end.duration_since(from).as_secs_f64();
    alive()?;
    Ok(ClientFigures {
        mbit_s: bytes as f64 * 8.0 / seconds / 1e6,
        window_s: seconds,
        client_bytes: all_bytes as f64,
        active_s: end.duration_since(began).as_secs_f64(),
        cpu: procfs::usage(&before, &after, seconds),
    })
}

/// The bytes the peer has acknowledged on `stream` (Linux `TCP_INFO`'s
/// `tcpi_bytes_acked`; the SYN's sequence number not counted).
fn bytes_acked(stream: &TcpStream) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data (integers only): all zeroes is a
    // valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a live,
    // exclusively borrowed tcp_info of that size, and stores the length it
    // wrote into `len`; the fd is the open socket `stream` owns.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    // Kernels older than 4.1 return a shorter struct without the field.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + size_of::<u64>();
    (result == 0 && usize::try_from(len).ok()? >= needed)
        .then_some(info.tcpi_bytes_acked.saturating_sub(1))
}

/// Stock iperf3 in the client's namespace.
pub struct Iperf3;

/// iperf3's report interval: fine enough to cut the warm-up off.
const IPERF3_INTERVAL_S: f64 = 0.1;

impl Load for Iperf3 {
    fn name(&self) -> &'static str {
        "iperf3"
    }

    fn ready_port(&self) -> u16 {
        IPERF3_PORT
    }

    fn run(
        &self,
        hosts: &Hosts,
        direction: Direction,
        timing: Timing,
        pids: &[(&'static str, u32)],
        alive: &mut Alive<'_>,
    ) -> Result<ClientFigures, String> {
        // iperf3 3.12 takes whole seconds for -t.
        let total = (timing.warmup + timing.seconds).ceil().max(1.0);
        let mut command = hosts.command(testbed::Ns::Client, std::path::Path::new("iperf3"))?;
        command
            .args(["-c", &hosts.guest().to_string(), "-p"])
            .arg(IPERF3_PORT.to_string())
            .args(["-t", &format!("{total:.0}"), "-i"])
            .arg(IPERF3_INTERVAL_S.to_string())
            .arg("-J")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if direction == Direction::Transmit {
            command.arg("-R");
        }
        let began = Instant::now();
        let child = command.spawn().map_err(|e| {
            format!("cannot start iperf3 (install it: apt-get install iperf3): {e}")
        })?;
        let client = ("iperf3", child.id());
        let mut watched: Vec<(&'static str, u32)> = pids.to_vec();
        watched.push(client);
        // The window: from the warm-up's end until just before iperf3's
        // last interval ends (a snapshot after its exit would miss it).
        let wait_until = |at: Instant, alive: &mut Alive<'_>| -> Result<(), String> {
            while Instant::now() < at {
                alive()?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        };
        wait_until(began + Duration::from_secs_f64(timing.warmup), alive)?;
        let (from, before) = (Instant::now(), procfs::snapshot(&watched));
        wait_until(began + Duration::from_secs_f64(total - 0.02), alive)?;
        let (to, after) = (Instant::now(), procfs::snapshot(&watched));
        let output = child
            .wait_with_output()
            .map_err(|e| format!("iperf3: {e}"))?;
        alive()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let report: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "iperf3 ({}) printed no JSON report ({e}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
        if let Some(error) = report.get("error").and_then(Value::as_str) {
            return Err(format!("iperf3: {error}"));
        }
        if !output.status.success() {
            return Err(format!("iperf3 exited with {}", output.status));
        }
        let figures = iperf3_figures(&report, timing.warmup)?;
        let mut cpu = procfs::usage(&before, &after, to.duration_since(from).as_secs_f64());
        // Account the client as `client`, as for the builtin load.
        if let Some(cores) = cpu.remove("iperf3") {
            cpu.insert("client".into(), cores);
        }
        Ok(ClientFigures { cpu, ..figures })
    }
}

/// The window's rate (intervals starting at or after `warmup`) and the
/// totals of an `iperf3 -J` report.
pub fn iperf3_figures(report: &Value, warmup: f64) -> Result<ClientFigures, String> {
    let intervals = report
        .get("intervals")
        .and_then(Value::as_array)
        .ok_or("the iperf3 report has no intervals")?;
    let (mut bytes, mut seconds) = (0.0, 0.0);
    for interval in intervals {
        let sum = interval.get("sum").ok_or("an iperf3 interval has no sum")?;
        let number = |key: &str| {
            sum.get(key)
                .and_then(Value::as_f64)
                .ok_or(format!("an iperf3 interval has no {key}"))
        };
        if number("start")? + 1e-6 >= warmup {
            bytes += number("bytes")?;
            seconds += number("seconds")?;
        }
    }
    if seconds <= 0.0 {
        return Err(format!(
            "iperf3 reported no interval after the {warmup} s warm-up"
        ));
    }
    let end = report.get("end").ok_or("the iperf3 report has no end")?;
    let total = |key: &str| {
        end.get(key)
            .and_then(|sum| Some((sum.get("bytes")?.as_f64()?, sum.get("seconds")?.as_f64()?)))
    };
    let (client_bytes, active_s) = total("sum_received")
        .or_else(|| total("sum_sent"))
        .ok_or("the iperf3 report has no end.sum_received")?;
    Ok(ClientFigures {
        mbit_s: bytes * 8.0 / seconds / 1e6,
        window_s: seconds,
        client_bytes,
        active_s,
        cpu: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_window_skips_the_warm_up() {
        let report: Value = serde_json::from_str(
            r#"{"intervals":[
                {"sum":{"start":0.0,"end":0.5,"seconds":0.5,"bytes":10000000}},
                {"sum":{"start":0.5,"end":1.0,"seconds":0.5,"bytes":60000000}},
                {"sum":{"start":1.0,"end":1.5,"seconds":0.5,"bytes":60000000}}],
              "end":{"sum_sent":{"bytes":130000000,"seconds":1.5},
                     "sum_received":{"bytes":129000000,"seconds":1.5}}}"#,
        )
        .expect("json");
        let figures = iperf3_figures(&report, 0.5).expect("figures");
        assert_eq!(figures.mbit_s, 960.0);
        assert_eq!(figures.window_s, 1.0);
        assert_eq!(figures.client_bytes, 129e6);
        assert!(iperf3_figures(&report, 2.0).is_err());
        let broken: Value = serde_json::from_str(r#"{"intervals":[]}"#).expect("json");
        assert!(iperf3_figures(&broken, 0.0).is_err());
    }

    #[test]
    fn bytes_acked_counts_what_the_peer_received() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let reader = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().expect("accept");
            let mut sink = Vec::new();
            peer.read_to_end(&mut sink).expect("read");
            sink.len()
        });
        let mut stream = TcpStream::connect(address).expect("connect");
        assert_eq!(bytes_acked(&stream), Some(0));
        stream.write_all(&incompressible()).expect("write");
        let deadline = Instant::now() + Duration::from_secs(10);
        while bytes_acked(&stream) != Some(1 << 16) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(bytes_acked(&stream), Some(1 << 16));
        stream.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(reader.join().expect("reader"), 1 << 16);
    }

    #[test]
    fn payload_is_not_a_repeated_byte() {
        let bytes = incompressible();
        let mut seen = [false; 256];
        for b in &bytes[..1500] {
            seen[usize::from(*b)] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 200);
    }
}
