//! SIGINT and SIGTERM set one stop flag (through `signal-hook`): the run
//! stops at the guest's next exit, and a recording ends with a stop record
//! (so that its replay ends there too).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// The process's stop flag, its handlers installed on first use.
pub(crate) fn flag() -> Arc<AtomicBool> {
    let flag = STOP.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            if let Err(error) = signal_hook::flag::register(signal, Arc::clone(&flag)) {
                tracing::warn!(
                    "lockstep: cannot handle signal {signal} ({error}); it will kill the run"
                );
            }
        }
        flag
    });
    Arc::clone(flag)
}
