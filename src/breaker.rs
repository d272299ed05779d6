//! Circuit breakers towards a dependency that can go down (the KMS, the key store):
//! after `threshold` consecutive failures the breaker opens and every call fails at
//! once for a back-off that doubles up to `max` (jittered, so replicas do not come
//! back in step); when it has passed, ONE call goes through as a probe while the others
//! keep failing at once; the probe's success closes the breaker, its failure opens it
//! again for twice as long. A call admitted before the breaker opened that succeeds
//! closes it too (the dependency answered).
//!
//! What counts as a failure is the caller's decision: unavailability, timeouts and
//! throttling are; a refusal (a disabled key, a missing row) is an answer and is not.
//! Does NOT: retry (callers fail fast and their clients retry), or know what it guards.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngExt as _;

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub threshold: u32,
    /// First back-off once open.
    pub base: Duration,
    /// Longest back-off.
    pub max: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 3,
            base: Duration::from_millis(250),
            max: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        backoff: Duration,
    },
    /// `probe` names the ticket probing, so that an older, abandoned one cannot end it.
    Probing {
        backoff: Duration,
        probe: u64,
    },
}

/// One breaker.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<State>,
    /// Probes handed out so far (each probe's number).
    probes: std::sync::atomic::AtomicU64,
}

/// The breaker is open: fail at once; the next probe is allowed after `retry_after`.
#[derive(Debug, Clone, Copy)]
pub struct Open {
    /// Until the next probe may go (zero while a probe is under way).
    pub retry_after: Duration,
}

/// A call the breaker let through; report how it went with [`Ticket::succeeded`] or
/// [`Ticket::failed`]. Dropped unreported (the call was cancelled), a probe lets the
/// next caller probe instead.
#[derive(Debug)]
pub struct Ticket<'a> {
    breaker: &'a Breaker,
    /// The probe's number, if this call is the probe.
    probe: Option<u64>,
    reported: bool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(State::Closed { failures: 0 }),
            probes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether it is open or probing now (for metrics and readiness).
    pub fn is_open(&self) -> bool {
        !matches!(*self.state(), State::Closed { .. })
    }

    /// Lets a call through, or says why not.
    ///
    /// # Errors
    /// [`Open`] while the breaker is open, or while another call is probing.
    pub fn admit(&self) -> Result<Ticket<'_>, Open> {
        let mut s = self.state();
        match *s {
            State::Closed { .. } => Ok(self.ticket(None)),
            State::Open { until, backoff } => {
                let now = Instant::now();
                if now < until {
                    return Err(Open {
                        retry_after: until - now,
                    });
                }
                let probe = self
                    .probes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *s = State::Probing { backoff, probe };
                Ok(self.ticket(Some(probe)))
            }
            State::Probing { .. } => Err(Open {
                retry_after: Duration::ZERO,
            }),
        }
    }

    fn ticket(&self, probe: Option<u64>) -> Ticket<'_> {
        Ticket {
            breaker: self,
            probe,
            reported: false,
        }
    }

    /// `backoff`, less up to half of it at random.
    fn jittered(backoff: Duration) -> Duration {
        backoff.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn open(&self, s: &mut State, backoff: Duration) {
        let backoff = backoff.min(self.cfg.max);
        *s = State::Open {
            until: Instant::now() + Self::jittered(backoff),
            backoff,
        };
    }
}

impl Ticket<'_> {
    /// The call got an answer: the breaker closes.
    pub fn succeeded(mut self) {
        self.reported = true;
        *self.breaker.state() = State::Closed { failures: 0 };
    }

    /// The call failed in a way that counts (unavailable, timed out, throttled).
    pub fn failed(mut self) {
        self.reported = true;
        let b = self.breaker;
        let mut s = b.state();
        match *s {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures >= b.cfg.threshold {
                    b.open(&mut s, b.cfg.base);
                } else {
                    *s = State::Closed { failures };
                }
            }
            State::Probing { backoff, probe } if self.probe == Some(probe) => {
                b.open(&mut s, backoff.saturating_mul(2));
            }
            // A call admitted before the breaker opened: the breaker already knows.
            State::Open { .. } | State::Probing { .. } => {}
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let (Some(mine), false) = (self.probe, self.reported) {
            let mut s = self.breaker.state();
            if let State::Probing { backoff, probe } = *s
                && probe == mine
            {
                *s = State::Open {
                    until: Instant::now(),
                    backoff,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Breaker {
        Breaker::new(BreakerConfig {
            threshold: 2,
            base: Duration::from_millis(40),
            max: Duration::from_millis(100),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_and_lets_one_probe_through() {
        let b = quick();
        b.admit().unwrap().failed();
        b.admit().unwrap().succeeded();
        b.admit().unwrap().failed();
        assert!(!b.is_open(), "a success in between resets the count");
        b.admit().unwrap().failed();
        assert!(b.is_open());
        let open = b.admit().unwrap_err();
        assert!(open.retry_after <= Duration::from_millis(40));
        std::thread::sleep(Duration::from_millis(45));
        let probe = b.admit().unwrap();
        assert!(b.admit().is_err(), "one probe at a time");
        probe.failed();
        let open = b.admit().unwrap_err();
        assert!(
            open.retry_after > Duration::from_millis(20),
            "the back-off doubled (jittered down by at most half): {open:?}"
        );
        std::thread::sleep(Duration::from_millis(85));
        b.admit().unwrap().succeeded();
        assert!(!b.is_open());
        b.admit().unwrap().succeeded();
    }

    #[test]
    fn a_cancelled_probe_lets_the_next_caller_probe() {
        let b = quick();
        b.admit().unwrap().failed();
        b.admit().unwrap().failed();
        std::thread::sleep(Duration::from_millis(45));
        drop(b.admit().unwrap());
        b.admit().unwrap().succeeded();
        assert!(!b.is_open());
    }

    #[test]
    fn the_back_off_stops_growing_at_max() {
        let b = quick();
        b.admit().unwrap().failed();
        b.admit().unwrap().failed();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(105));
            b.admit().unwrap().failed();
        }
        assert!(b.admit().unwrap_err().retry_after <= Duration::from_millis(100));
    }
}
