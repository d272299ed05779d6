//! The limits every handler runs under: calls in flight, the per-call deadline, batch
//! sizes and field sizes, and the [`Gate`] the handlers reach through it.
//!
//! Does NOT: decide who may call (the gate does) or map errors to statuses beyond the
//! limit refusals themselves (`status` does).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Code, Status};

use super::gate::Gate;
use super::status::{self, IntoStatus};
use crate::config::Limits;
use crate::error::Error;

/// Limits shared by every handler: calls in flight and the per-call deadline.
#[derive(Debug, Clone)]
pub struct Guard {
    limits: Limits,
    inflight: Arc<Semaphore>,
    pub(super) gate: Arc<Gate>,
}

impl Guard {
    /// A guard enforcing `limits`, with no authorization and no audit (tests).
    pub fn new(limits: Limits) -> Self {
        Self::with_gate(limits, Arc::new(Gate::open()))
    }

    /// A guard enforcing `limits` and `gate` (identity, authorization, audit).
    pub fn with_gate(limits: Limits, gate: Arc<Gate>) -> Self {
        let inflight = Arc::new(Semaphore::new(limits.max_concurrent_requests));
        Self {
            limits,
            inflight,
            gate,
        }
    }

    /// Runs a handler under the concurrency limit (refusing at once when full) and the
    /// deadline; its error becomes the call's status through the one mapping.
    ///
    /// Not an `async fn`: one would keep `fut` twice in its state (as its argument
    /// and inside the timeout), doubling the size of every call's future, which is
    /// copied as it moves.
    pub(super) fn run<T, E: IntoStatus>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
    ) -> impl Future<Output = Result<T, Status>> {
        let permit = self.inflight.clone().try_acquire_owned();
        let max_in_flight = self.limits.max_concurrent_requests;
        let timeout_ms = self.limits.request_timeout_ms;
        let call = tokio::time::timeout(self.limits.request_timeout(), fut);
        async move {
            let _permit = permit.map_err(|_| {
                status::limit_status(
                    Code::ResourceExhausted,
                    "TOO_MANY_REQUESTS",
                    format!("{max_in_flight} calls already in flight; retry later"),
                )
            })?;
            call.await
                .map_err(|_| {
                    status::limit_status(
                        Code::DeadlineExceeded,
                        "DEADLINE_EXCEEDED",
                        format!("call exceeded the server deadline of {timeout_ms} ms"),
                    )
                })?
                .map_err(IntoStatus::into_status)
        }
    }

    pub(super) fn check_batch(&self, n: usize) -> Result<(), Status> {
        if n > self.limits.max_batch_items {
            return Err(status::limit_status(
                Code::InvalidArgument,
                "BATCH_TOO_LARGE",
                format!(
                    "batch has {n} items; the limit is {}",
                    self.limits.max_batch_items
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn check_field(&self, what: &str, len: usize) -> Result<(), Error> {
        if len > self.limits.max_field_bytes {
            return Err(Error::TooLarge(format!(
                "{what} is {len} bytes; the limit is {}",
                self.limits.max_field_bytes
            )));
        }
        Ok(())
    }
}
