//! The TAP backend: a real kernel network interface the guest's frames go
//! out of and come in through, and the queue between its reader thread and
//! the vCPU.
//!
//! Set-up (needs CAP_NET_ADMIN): `TapDevice::open("tap0")` creates the
//! interface or attaches to an existing one; addresses and routes are the
//! caller's (the `testbed` crate bridges a persistent `tap0` in each host
//! namespace).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::NicError;
use crate::gate::FrameOut;
use crate::virtio::MAX_FRAME_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface.
pub struct TapDevice {
    file: File,
    name: String,
}

impl TapDevice {
    /// Creates (or attaches to) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Self, NicError> {
        let error = |what: &str, source: std::io::Error| NicError::Tap {
            name: name.to_string(),
            what: what.to_string(),
            source,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(error(
                "invalid interface name",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "1 to 15 bytes"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| error("cannot open /dev/net/tun (is the tun module loaded?)", e))?;
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which IfReq
        // mirrors (16-byte name, flags, padding to 40 bytes); `request` is a
        // live, exclusively borrowed value for the duration of the call, and
        // the fd is an open /dev/net/tun descriptor.
        let result =
            unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request as *mut IfReq) };
        if result < 0 {
            let cause = std::io::Error::last_os_error();
            let what = if cause.raw_os_error() == Some(libc::EPERM) {
                "creating a TAP device needs CAP_NET_ADMIN (run as root)"
            } else {
                "TUNSETIFF failed"
            };
            return Err(error(what, cause));
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A writer for released frames (shares the interface).
    pub fn writer(&self) -> Result<TapWriter, NicError> {
        Ok(TapWriter {
            file: self.file.try_clone().map_err(|source| NicError::Tap {
                name: self.name.clone(),
                what: "duplicate the TAP descriptor".into(),
                source,
            })?,
        })
    }

    /// Starts the reader thread, which moves every frame the host sends to
    /// the guest into `queue` until `stop` is set.
    pub fn spawn_reader(
        &self,
        queue: Arc<RxQueue>,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>, NicError> {
        let mut file = self.file.try_clone().map_err(|source| NicError::Tap {
            name: self.name.clone(),
            what: "duplicate the TAP descriptor".into(),
            source,
        })?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("tap-rx-{name}"))
            .spawn(move || {
                let mut buffer = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let mut poll = libc::pollfd {
                        fd: file.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, count 1, for the duration of the call.
                    let ready = unsafe { libc::poll(&mut poll, 1, 100) };
                    if ready <= 0 {
                        continue;
                    }
                    match file.read(&mut buffer) {
                        Ok(len) if (14..=MAX_FRAME_LEN).contains(&len) => {
                            queue.push(buffer[..len].to_vec())
                        }
                        Ok(_) => queue.count_oversized(),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
            .map_err(|source| NicError::Tap {
                name: self.name.clone(),
                what: "start the reader thread".into(),
                source,
            })
    }
}

/// Writes released frames to the TAP interface.
pub struct TapWriter {
    file: File,
}

impl FrameOut for TapWriter {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write_all(frame)
    }
}

/// Frames from the host waiting to be delivered to the guest at an exit.
#[derive(Default)]
pub struct RxQueue {
    frames: Mutex<RxFrames>,
    arrived: Condvar,
}

#[derive(Default)]
struct RxFrames {
    queue: VecDeque<Vec<u8>>,
    oversized: u64,
    dropped: u64,
}

/// Frames queued beyond this are dropped (the guest is not keeping up; TCP
/// recovers), so host memory stays bounded.
pub const RX_QUEUE_LIMIT: usize = 4096;

impl RxQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, RxFrames> {
        self.frames
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame for the guest.
    pub fn push(&self, frame: Vec<u8>) {
        let mut frames = self.lock();
        if frames.queue.len() >= RX_QUEUE_LIMIT {
            frames.dropped += 1;
            return;
        }
        frames.queue.push_back(frame);
        drop(frames);
        self.arrived.notify_one();
    }

    fn count_oversized(&self) {
        self.lock().oversized += 1;
    }

    /// Takes up to `max` frames, waiting up to `wait` for the first one.
    pub fn take(&self, max: usize, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut frames = self.lock();
        while frames.queue.is_empty() && max > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            frames = match self.arrived.wait_timeout(frames, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        let count = max.min(frames.queue.len());
        frames.queue.drain(..count).collect()
    }

    /// Frames dropped because the queue was full, and frames too large.
    pub fn drops(&self) -> (u64, u64) {
        let frames = self.lock();
        (frames.dropped, frames.oversized)
    }
}

impl TapDevice {
    /// Opens TAP `name` as [`TapDevice::open`] does, retrying every 50 ms
    /// until `timeout` while another process still holds it (`EBUSY`): a
    /// promoted backup waits for the old primary to learn it lost the
    /// arbiter and halt.
    pub fn open_when_free(name: &str, timeout: Duration) -> Result<Self, NicError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::open(name) {
                Ok(device) => return Ok(device),
                Err(NicError::Tap { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// Waits until the kernel reports interface `name` running (`IFF_RUNNING`:
/// its carrier was processed, so a bridge it belongs to forwards its
/// frames), for at most `timeout`. Returns how long it waited, or `None` if
/// it never did (or the flags cannot be read: the caller goes on anyway).
pub fn wait_until_running(name: &str, timeout: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `ifreq` is plain data for which all-zero bytes are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *slot = byte as libc::c_char;
    }
    let running = loop {
        // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name in `request`
        // and writes only its flags field; `fd` is an open socket.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) };
        if rc < 0 {
            break None;
        }
        // SAFETY: SIOCGIFFLAGS filled the union's flags member.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        if flags & libc::IFF_RUNNING as libc::c_short != 0 {
            break Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            break None;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    running
}

/// A gratuitous ARP announcing `ip` at `mac`, so switches and neighbours
/// learn the guest's new port.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip);
    frame.resize(60, 0);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_at_most_max_in_order() {
        let queue = RxQueue::default();
        for i in 0..5u8 {
            queue.push(vec![i; 60]);
        }
        let taken = queue.take(3, Duration::ZERO);
        assert_eq!(
            taken.iter().map(|f| f[0]).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(queue.take(10, Duration::ZERO).len(), 2);
        assert!(
            queue.take(0, Duration::from_secs(5)).is_empty(),
            "max 0 never waits"
        );
    }

    #[test]
    fn take_wakes_when_a_frame_arrives() {
        let queue = Arc::new(RxQueue::default());
        let pusher = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                queue.push(vec![7; 60]);
            })
        };
        let taken = queue.take(4, Duration::from_secs(10));
        pusher.join().expect("pusher");
        assert_eq!(taken.len(), 1);
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let queue = RxQueue::default();
        for _ in 0..RX_QUEUE_LIMIT + 3 {
            queue.push(vec![0; 60]);
        }
        assert_eq!(queue.drops().0, 3);
    }

    #[test]
    fn tap_name_too_long_is_refused() {
        let error = TapDevice::open("a-name-that-is-far-too-long")
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains("invalid interface name"),
            "{error}"
        );
    }

    #[test]
    fn gratuitous_arp_announces_the_guest() {
        let frame = gratuitous_arp([2, 0, 0, 0, 0, 9], [10, 77, 0, 2]);
        assert_eq!(frame.len(), 60);
        assert_eq!(&frame[..6], &[0xff; 6]);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        assert_eq!(&frame[28..32], &[10, 77, 0, 2], "sender IP");
        assert_eq!(&frame[38..42], &[10, 77, 0, 2], "target IP");
    }
}
