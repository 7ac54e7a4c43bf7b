//! Entering network namespaces: a child process (setns in `pre_exec`), a
//! scoped thread (setns, run a closure, end), and the processes found
//! inside one.
//!
//! A socket belongs to the namespace of the thread that created it, for its
//! whole life: a `TcpStream` connected from a thread inside the client
//! namespace can be used from any thread afterwards. Named namespaces are
//! the files `/run/netns/NAME` that `ip netns add` bind-mounts.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use crate::TestbedError;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The file of the named namespace `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Opens the named namespace `name`.
pub fn open(name: &str) -> Result<File, TestbedError> {
    File::open(path(name)).map_err(|source| TestbedError::Enter {
        name: name.to_string(),
        source,
    })
}

/// Moves the calling thread into the namespace open at `file`.
pub fn enter(file: &File, name: &str) -> Result<(), TestbedError> {
    // SAFETY: setns takes a file descriptor and a namespace type; `file` is
    // an open descriptor for the duration of the call, and the call changes
    // only the calling thread's network namespace.
    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if result != 0 {
        return Err(TestbedError::Enter {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A command for `program` that runs inside the named namespace `name`.
pub fn command(name: &str, program: &std::ffi::OsStr) -> Result<Command, TestbedError> {
    let file = open(name)?;
    let mut command = Command::new(program);
    // SAFETY: the closure runs in the forked child before exec. It makes one
    // system call (setns, async-signal-safe) on a descriptor the closure owns
    // (so it is open: the Command keeps the closure, and the descriptor is
    // close-on-exec, so the program does not inherit it), and builds an
    // io::Error from errno, which allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

/// Runs `f` on a new thread inside the named namespace `name` and returns
/// what it returns. The caller's own thread never changes namespace.
pub fn run_in<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> Result<T, TestbedError> {
    let file = open(name)?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn_scoped(scope, || {
                enter(&file, name)?;
                Ok(f())
            })
            .map_err(|source| TestbedError::Enter {
                name: name.to_string(),
                source,
            })?;
        handle.join().map_err(|_| TestbedError::Thread {
            name: name.to_string(),
        })?
    })
}

/// The processes whose main thread is inside the named namespace `name`
/// (as `ip netns pids` finds them), never this process itself.
pub fn pids_in(name: &str) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(path(name)) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|ns| ns.dev() == target.dev() && ns.ino() == target.ino())
        })
        .collect()
}

/// SIGKILLs every process inside the named namespace `name` (see
/// [`pids_in`]): what is left of a run that is being removed.
pub fn kill_all_in(name: &str) {
    for pid in pids_in(name) {
        // SAFETY: kill(2) with a pid read from /proc and a valid signal
        // number; it touches no memory of ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
