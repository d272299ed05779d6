//! The memory budget: how many bytes of request messages may be held in memory at
//! once, across every listener and connection (issue 20, finding 1).
//!
//! A byte-weighted semaphore: a request's messages are charged before any of their
//! bytes are buffered (the service's request screen reads each message's length from
//! its gRPC frame header and charges it whole: tonic reserves that much as soon as it
//! reads the header), and the charge is given back when the call's response has been
//! sent or dropped. A charge that does not fit is refused at
//! once, never queued: waiting would hold the connection's buffers and the caller's
//! deadline for memory that may not come.
//!
//! Does NOT: bound what is not a request message (HTTP/2 buffers below the flow-control
//! window, response bytes beyond what the charge stands for, the caches: those have
//! their own bounds), or decide what to answer (the service does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of request messages in flight, bounded.
#[derive(Debug)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total: usize,
    refused: AtomicU64,
}

/// What one call holds of the budget; shared by its request and response bodies and
/// given back when the last holder is dropped.
#[derive(Debug, Clone, Default)]
pub struct Charge(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl MemoryBudget {
    /// A budget of `total` bytes (capped at the semaphore's maximum).
    pub fn new(total: usize) -> Arc<Self> {
        let total = total.min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(total)),
            total,
            refused: AtomicU64::new(0),
        })
    }

    /// The budget, bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes charged now.
    pub fn in_flight(&self) -> usize {
        self.total.saturating_sub(self.permits.available_permits())
    }

    /// Charges refused since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Adds `bytes` to `charge` if they fit now; `false` (and a refusal counted) if not.
    pub fn try_charge(&self, charge: &Charge, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let got = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.permits.clone().try_acquire_many_owned(n).ok());
        let Some(permit) = got else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let mut held = charge.0.lock().unwrap_or_else(|p| p.into_inner());
        match held.as_mut() {
            Some(p) => p.merge(permit),
            None => *held = Some(permit),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_refuse_past_the_budget_and_come_back_when_dropped() {
        let b = MemoryBudget::new(100);
        let (c1, c2) = (Charge::default(), Charge::default());
        assert!(b.try_charge(&c1, 60));
        assert!(b.try_charge(&c1, 30));
        assert_eq!(b.in_flight(), 90);
        assert!(!b.try_charge(&c2, 11), "past the budget");
        assert_eq!(b.refused(), 1);
        assert!(b.try_charge(&c2, 10));
        let c1_response = c1.clone();
        drop(c1);
        assert_eq!(b.in_flight(), 100, "held while the response holds it");
        drop(c1_response);
        assert_eq!(b.in_flight(), 10);
        drop(c2);
        assert_eq!(b.in_flight(), 0);
        assert!(
            !b.try_charge(&Charge::default(), usize::MAX),
            "too large for any budget"
        );
    }
}
