//! The tower layer that counts every gRPC call by RPC and status code and times it.
//!
//! Owns: the bounded set of RPC labels (a caller cannot mint one), the per-RPC series
//! handles, reading the `grpc-status` of a response's headers or trailers, and
//! recording a call dropped early as `Cancelled`. Does not: register the families
//! (`mod.rs` does) or look into a call's messages.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;

use super::Metrics;
use super::histogram::AtomicHistogram;
use crate::policy::authz::Action;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RpcCode {
    rpc: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Rpc {
    rpc: String,
}

/// gRPC status codes 0..=16 by name, as labels.
const CODE_NAMES: [&str; 17] = [
    "Ok",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// Batch RPCs of `Crypto`: their own labels (their action is the single-item one).
const BATCH_RPCS: [&str; 9] = [
    "EncryptBatch",
    "DecryptBatch",
    "RewrapBatch",
    "BlindIndexBatch",
    "PseudonymizeBatch",
    "EncryptColumn",
    "DecryptColumn",
    "RewrapColumn",
    "BlindIndexColumn",
];

/// One RPC's label and its lazily created series.
#[derive(Debug)]
pub(super) struct RpcSlot {
    label: String,
    latency: std::sync::OnceLock<AtomicHistogram>,
    codes: [std::sync::OnceLock<Counter>; 17],
}

impl RpcSlot {
    fn new(label: String) -> Self {
        Self {
            label,
            latency: std::sync::OnceLock::new(),
            codes: std::array::from_fn(|_| std::sync::OnceLock::new()),
        }
    }
}

/// Every label a call can get: each action's single RPC, the batch RPCs, health,
/// reflection, and `unknown` (a caller cannot mint labels).
pub(super) fn all_slots() -> Box<[RpcSlot]> {
    Action::ALL
        .iter()
        .map(|a| format!("{}/{}", a.service(), a.method()))
        .chain(BATCH_RPCS.iter().map(|m| format!("Crypto/{m}")))
        .chain(["grpc.health", "grpc.reflection", "unknown"].map(String::from))
        .map(RpcSlot::new)
        .collect()
}

/// The slot of a request path (see [`all_slots`] for the order).
pub(super) fn slot_of(path: &str) -> usize {
    let n = Action::ALL.len();
    if let Some((service, method)) = path
        .strip_prefix("/fieldkey.v1.")
        .and_then(|p| p.split_once('/'))
    {
        if service == "Crypto"
            && let Some(i) = BATCH_RPCS.iter().position(|b| *b == method)
        {
            return n + i;
        }
        if let Some(a) = Action::from_rpc(service, method)
            && a.method() == method
        {
            return a.index();
        }
    } else if path.starts_with("/grpc.health.v1.Health/") {
        return n + BATCH_RPCS.len();
    } else if path.starts_with("/grpc.reflection.") {
        return n + BATCH_RPCS.len() + 1;
    }
    n + BATCH_RPCS.len() + 2
}

impl Metrics {
    /// Counts one call of `slot` ending with `code` and records its latency.
    pub(super) fn record(&self, slot: usize, code: usize, elapsed: Duration) {
        let Some(s) = self.slots.get(slot) else {
            return;
        };
        let code = code.min(CODE_NAMES.len() - 1);
        if let (Some(cell), Some(name)) = (s.codes.get(code), CODE_NAMES.get(code)) {
            cell.get_or_init(|| {
                self.requests
                    .get_or_create(&RpcCode {
                        rpc: s.label.clone(),
                        code: (*name).to_owned(),
                    })
                    .clone()
            })
            .inc();
        }
        s.latency
            .get_or_init(|| {
                self.latency
                    .get_or_create(&Rpc {
                        rpc: s.label.clone(),
                    })
                    .clone()
            })
            .observe(elapsed);
    }

    /// Wraps `routes` so that every call is counted and timed.
    pub fn instrument(self: &Arc<Self>, routes: tonic::service::Routes) -> tonic::service::Routes {
        let router = routes.into_axum_router().layer(Instrument {
            metrics: self.clone(),
        });
        tonic::service::Routes::from(router)
    }
}

/// The status code of a response's headers or trailers, as an index into
/// [`CODE_NAMES`] (out-of-range codes count as `Unknown`).
fn grpc_status(h: &HeaderMap) -> Option<usize> {
    let v = h.get("grpc-status")?;
    let code = std::str::from_utf8(v.as_bytes())
        .ok()?
        .parse::<usize>()
        .ok()?;
    Some(if code < CODE_NAMES.len() {
        code
    } else {
        UNKNOWN
    })
}

/// The tower layer of [`Metrics::instrument`].
#[derive(Clone)]
struct Instrument {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for Instrument {
    type Service = Instrumented<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Instrumented {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
struct Instrumented<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Request<Body>> for Instrumented<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Armed before the call: a call dropped before its response headers (client
        // reset, deadline) is recorded as `Cancelled` when the future is dropped.
        let mut pending = Watched {
            inner: Body::empty(),
            done: Some(Done {
                metrics: self.metrics.clone(),
                slot: slot_of(req.uri().path()),
                started: Instant::now(),
            }),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = match fut.await {
                Ok(res) => res,
                Err(e) => {
                    pending.finish(UNKNOWN);
                    return Err(e);
                }
            };
            if let Some(code) = grpc_status(res.headers()) {
                // Trailers-only response (an error before any message).
                pending.finish(code);
                return Ok(res);
            }
            let done = pending.done.take();
            Ok(res.map(|body| Body::new(Watched { inner: body, done })))
        })
    }
}

/// Recorded once, when the response body ends (trailers), or when it is dropped early
/// (the client went away: `Cancelled`).
struct Done {
    metrics: Arc<Metrics>,
    slot: usize,
    started: Instant,
}

struct Watched {
    inner: Body,
    done: Option<Done>,
}

impl Watched {
    fn finish(&mut self, code: usize) {
        if let Some(d) = self.done.take() {
            d.metrics.record(d.slot, code, d.started.elapsed());
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(UNKNOWN),
            // A body that ends without trailers: gRPC would have sent a status.
            Poll::Ready(None) => self.finish(UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_labels_are_bounded() {
        let slots = all_slots();
        let label = |p: &str| slots[slot_of(p)].label.clone();
        assert_eq!(label("/fieldkey.v1.Crypto/Encrypt"), "Crypto/Encrypt");
        assert_eq!(
            label("/fieldkey.v1.Crypto/BlindIndexBatch"),
            "Crypto/BlindIndexBatch"
        );
        assert_eq!(
            label("/fieldkey.v1.Keys/RotateTenantKey"),
            "Keys/RotateTenantKey"
        );
        assert_eq!(
            label("/fieldkey.v1.Audit/GetComplianceReport"),
            "Audit/GetComplianceReport"
        );
        assert_eq!(label("/fieldkey.v1.Crypto/Nope"), "unknown");
        assert_eq!(label("/fieldkey.v1.Keys/EncryptBatch"), "unknown");
        assert_eq!(label("/evil/../x"), "unknown");
        assert_eq!(label("/grpc.health.v1.Health/Check"), "grpc.health");
        assert_eq!(
            label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "grpc.reflection"
        );
        // every label is distinct
        let mut all: Vec<&str> = slots.iter().map(|s| s.label.as_str()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), slots.len());
    }
}
