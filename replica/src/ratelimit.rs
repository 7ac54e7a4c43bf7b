//! Rate-limited log lines, for messages anyone who can connect (or a
//! guest) can trigger at will: a stray or hostile peer must not be able to
//! flood the journal. Each call site has its own [`Limiter`]: at most
//! `burst` lines per `window`; the first line after a quiet spell says how
//! many were suppressed.
//!
//! ```text
//! window:   |<------ 10 s ------>|<------ 10 s ------>|
//! events:    x x x x x x x x x x   x
//! logged:    x x x x x             x (5 similar suppressed)
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A per-call-site budget of log lines.
pub struct Limiter {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Limiter {
    /// At most `burst` lines per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether to log now: `Some(n)` with the lines suppressed since the
    /// last one logged, or `None` (suppressed, and counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .start
            .is_none_or(|start| now.duration_since(start) >= self.window)
        {
            state.start = Some(now);
            state.logged = 0;
        }
        if state.logged < self.burst {
            state.logged += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

/// `tracing::warn!` through a call site's own [`Limiter`] (5 lines per
/// 10 s), adding `suppressed = N` when lines were dropped before it.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::Limiter =
            $crate::ratelimit::Limiter::new(5, ::std::time::Duration::from_secs(10));
        match LIMITER.allow() {
            Some(0) => ::tracing::warn!($($arg)+),
            Some(suppressed) => ::tracing::warn!(suppressed, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_the_count() {
        let limiter = Limiter::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let allowed: Vec<Option<u64>> = (0..10).map(|_| limiter.allow_at(start)).collect();
        assert_eq!(&allowed[..3], &[Some(0), Some(0), Some(0)]);
        assert!(allowed[3..].iter().all(Option::is_none));
        assert_eq!(
            limiter.allow_at(start + Duration::from_secs(11)),
            Some(7),
            "the next window's first line tells how many were dropped"
        );
        assert_eq!(limiter.allow_at(start + Duration::from_secs(11)), Some(0));
    }
}
