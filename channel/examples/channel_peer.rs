//! One channel end in its own process, for trying the channel by hand on one
//! host (the two-process tests run the same code by re-running their own
//! test binary):
//!
//! ```text
//! cargo run --release -p channel --example channel_peer -- \
//!     transport=uring|shm role=primary|backup endpoint=127.0.0.1:7000|/tmp/sock
//!     [listen] [entries=N|forever] [size=BYTES] [gen=G] [vm=ID] [key=K]
//!     [version=V] [corrupt_at=SEQ]
//! ```
//!
//! Prints `OK entries=N digest=HEX` or `ERR <error and its causes>` and exits
//! 0 or 2.

use std::process::ExitCode;

use channel::testkit::{error_chain, peer_main};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match peer_main(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("ERR {}", error_chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}
