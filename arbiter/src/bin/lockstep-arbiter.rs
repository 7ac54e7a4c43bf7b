//! A stand-alone embedded arbiter server, until `lockstep arbiter` wraps
//! [`arbiter::server::serve`]:
//!
//! ```text
//! lockstep-arbiter --listen 127.0.0.1:7400 --state /var/lib/lockstep/arbiter.state --key-file /etc/lockstep/arbiter.key
//! ```
//!
//! Prints `listening on ADDR` once it accepts (so `--listen 127.0.0.1:0`
//! works), then serves until killed. Exit code 2 on bad usage, 1 when the
//! server cannot start.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use arbiter::{Key, error_chain, server};

const USAGE: &str = "usage: lockstep-arbiter --listen ADDR --state FILE --key-file FILE";

fn main() -> ExitCode {
    let mut listen = None;
    let mut state = None;
    let mut key_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--listen" => &mut listen,
            "--state" => &mut state,
            "--key-file" => &mut key_file,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("lockstep-arbiter: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        *slot = args.next();
    }
    let (Some(listen), Some(state), Some(key_file)) = (listen, state, key_file) else {
        eprintln!("lockstep-arbiter: missing argument\n{USAGE}");
        return ExitCode::from(2);
    };
    let key = match Key::from_file(&PathBuf::from(key_file)) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("lockstep-arbiter: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lockstep-arbiter: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or(listen);
    // Load the state before saying we listen, so that a corrupt file fails fast.
    let handle = match server::spawn(listener, &PathBuf::from(state), key) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("lockstep-arbiter: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    // The accept thread lives in `_serving`; serve until killed.
    let _serving = handle;
    loop {
        std::thread::park();
    }
}
