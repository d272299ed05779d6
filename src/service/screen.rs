//! The request screen: every request body passes through it before tonic buffers and
//! decodes it (issue 20, findings 1 and 2). Per gRPC message it reads the 5-byte frame
//! header (compressed flag, big-endian length) and:
//!
//! - refuses a compressed message (the server accepts no compression):
//!   INVALID_ARGUMENT, `COMPRESSED_MESSAGE`;
//! - refuses a message longer than `limits.max_message_bytes`: INVALID_ARGUMENT,
//!   `MESSAGE_TOO_LARGE`;
//! - charges the message's length to the [`MemoryBudget`], refusing at once when it
//!   does not fit (RESOURCE_EXHAUSTED, `MEMORY_BUDGET`; retry later; nothing was
//!   buffered). The charge is held until the call's response has been taken by
//!   the connection or dropped (the response is built from the request: its memory is
//!   what the charge stands for). Server-streaming calls (`WatchJob`, `ExportAudit`,
//!   health `Watch`) give their charge back when their response starts.
//!
//! A body must also arrive within the call's deadline (`limits.request_timeout_ms`,
//! DEADLINE_EXCEEDED, `REQUEST_BODY_TIMEOUT`), must hold a message (INVALID_ARGUMENT,
//! `MISSING_MESSAGE`) and must not end inside one (INVALID_ARGUMENT,
//! `TRUNCATED_MESSAGE`); gRPC reflection, whose requests are a stream, is exempt from
//! these three. Each refusal is a [`Status`] with its reason in the `fieldkey-error`
//! trailer, counted by the metrics layer under its code like any other call.
//!
//! Does NOT: look inside a message (the codec decodes, the handlers validate), bound
//! memory that is not a request message (see `transport::budget`), or stop a caller
//! that keeps its HTTP/2 window shut from holding its own calls' charges (and their
//! responses' memory) until its connection closes: per-connection shares are not built.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response};
use bytes::Bytes;
use http_body::Frame;
use tonic::{Code, Status};

use super::status::limit_status;
use crate::transport::budget::{Charge, MemoryBudget};

/// gRPC's message frame header: a compressed flag and a 4-byte length.
const HEADER: usize = 5;

/// Wraps `routes` so that every request body is screened.
pub fn screened(
    routes: tonic::service::Routes,
    budget: Arc<MemoryBudget>,
    max_message_bytes: usize,
    body_timeout: Duration,
) -> tonic::service::Routes {
    let router = routes.into_axum_router().layer(ScreenLayer {
        budget,
        max_message_bytes,
        body_timeout,
    });
    tonic::service::Routes::from(router)
}

#[derive(Clone)]
struct ScreenLayer {
    budget: Arc<MemoryBudget>,
    max_message_bytes: usize,
    body_timeout: Duration,
}

impl<S> tower::Layer<S> for ScreenLayer {
    type Service = Screening<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Screening {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
struct Screening<S> {
    inner: S,
    layer: ScreenLayer,
}

impl<S> tower::Service<Request<Body>> for Screening<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let charge = Charge::default();
        let l = &self.layer;
        let kind = CallKind::of(req.uri().path());
        let started = Instant::now();
        let req = req.map(|inner| {
            Body::new(Screened {
                inner,
                framing: Framing::default(),
                budget: l.budget.clone(),
                charge: charge.clone(),
                max_message_bytes: l.max_message_bytes,
                deadline: None,
                due: started + l.body_timeout,
                body_timeout: l.body_timeout,
                kind,
                messages: 0,
                done: false,
            })
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if kind != CallKind::Unary {
                // A stream lives as long as its caller wants: its small request gives its
                // charge back now.
                drop(charge);
                return Ok(res);
            }
            // The charge stays with the response (built from the request) until the
            // connection has taken its last frame.
            Ok(res.map(|inner| {
                Body::new(Holding {
                    inner,
                    _charge: charge,
                })
            }))
        })
    }
}

/// How a call's messages flow, from its path: what the screen may expect of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    /// One request, one response (every fieldkey RPC but those below).
    Unary,
    /// One request, a stream of responses (`WatchJob`, `ExportAudit`, health `Watch`).
    ServerStreaming,
    /// Streams both ways (gRPC reflection): no deadline on the request stream, and it
    /// may be empty.
    Bidirectional,
}

impl CallKind {
    fn of(path: &str) -> Self {
        const SERVER_STREAMING: [&str; 3] = [
            "/fieldkey.v1.Jobs/WatchJob",
            "/fieldkey.v1.Audit/ExportAudit",
            "/grpc.health.v1.Health/Watch",
        ];
        if path.starts_with("/grpc.reflection.") {
            Self::Bidirectional
        } else if SERVER_STREAMING.contains(&path) {
            Self::ServerStreaming
        } else {
            Self::Unary
        }
    }
}

/// Where the reader is in the stream of length-prefixed messages.
#[derive(Default)]
struct Framing {
    header: [u8; HEADER],
    /// Header bytes read of the next message.
    have: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
}

/// A request body read through the screen.
struct Screened {
    inner: Body,
    framing: Framing,
    budget: Arc<MemoryBudget>,
    charge: Charge,
    max_message_bytes: usize,
    /// The arrival deadline's timer, made the first time the body is not ready.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    due: Instant,
    body_timeout: Duration,
    kind: CallKind,
    /// Messages whose header has been read.
    messages: u64,
    /// A refusal was returned (or the body ended): nothing more is read.
    done: bool,
}

impl Screened {
    /// Walks the frame headers in `data`, checking and charging each message whose
    /// header completes in it.
    fn screen(&mut self, data: &[u8]) -> Result<(), Status> {
        let f = &mut self.framing;
        let mut rest = data;
        while !rest.is_empty() {
            if f.remaining > 0 {
                let n = f.remaining.min(rest.len());
                f.remaining -= n;
                rest = rest.get(n..).unwrap_or_default();
                continue;
            }
            let n = (HEADER - f.have).min(rest.len());
            if let (Some(dst), Some(src)) = (f.header.get_mut(f.have..f.have + n), rest.get(..n)) {
                dst.copy_from_slice(src);
            }
            f.have += n;
            rest = rest.get(n..).unwrap_or_default();
            if f.have < HEADER {
                break;
            }
            f.have = 0;
            self.messages += 1;
            let [flag, l0, l1, l2, l3] = f.header;
            let len = usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).unwrap_or(usize::MAX);
            if flag != 0 {
                return Err(limit_status(
                    Code::InvalidArgument,
                    "COMPRESSED_MESSAGE",
                    "compressed messages are not accepted; send them uncompressed".into(),
                ));
            }
            if len > self.max_message_bytes {
                return Err(limit_status(
                    Code::InvalidArgument,
                    "MESSAGE_TOO_LARGE",
                    format!(
                        "the message is {len} bytes; the limit is {} (limits.max_message_bytes)",
                        self.max_message_bytes
                    ),
                ));
            }
            // The whole message is charged now: tonic reserves its buffer for the
            // declared length as soon as it reads this header, so that is the memory it
            // takes (charging bytes only as they arrive let 160 callers past this point
            // at once: 395 MiB).
            if !self
                .budget
                .try_charge(&self.charge, len.saturating_add(HEADER))
            {
                return Err(self.over_budget());
            }
            f.remaining = len;
        }
        Ok(())
    }

    fn over_budget(&self) -> Status {
        limit_status(
            Code::ResourceExhausted,
            "MEMORY_BUDGET",
            format!(
                "{} bytes of requests are already in memory (limits.memory_budget_bytes); retry later",
                self.budget.in_flight()
            ),
        )
    }

    fn refuse(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        Poll::Ready(Some(Err(status)))
    }
}

impl http_body::Body for Screened {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let Poll::Ready(frame) = polled else {
            if self.kind != CallKind::Bidirectional {
                let due = self.due;
                let timer = self
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.into())));
                if timer.as_mut().poll(cx).is_ready() {
                    let ms = self.body_timeout.as_millis();
                    return self.refuse(limit_status(
                        Code::DeadlineExceeded,
                        "REQUEST_BODY_TIMEOUT",
                        format!("the request did not arrive within the server deadline of {ms} ms"),
                    ));
                }
            }
            return Poll::Pending;
        };
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    if let Err(status) = self.screen(&data) {
                        return self.refuse(status);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.done = true;
                // The caller's stream failed (reset, protocol error): tonic maps it.
                Poll::Ready(Some(Err(Status::from_error(e.into()))))
            }
            None => {
                self.done = true;
                if self.framing.have > 0 || self.framing.remaining > 0 {
                    return self.refuse(limit_status(
                        Code::InvalidArgument,
                        "TRUNCATED_MESSAGE",
                        "the request ended inside a message".into(),
                    ));
                }
                if self.messages == 0 && self.kind != CallKind::Bidirectional {
                    return self.refuse(limit_status(
                        Code::InvalidArgument,
                        "MISSING_MESSAGE",
                        "the request holds no message".into(),
                    ));
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not while a message is incomplete or none came: the end is where those are
        // refused.
        self.done
            || (self.inner.is_end_stream()
                && self.framing.have == 0
                && self.framing.remaining == 0
                && (self.messages > 0 || self.kind == CallKind::Bidirectional))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A unary response body holding its call's charge until its last frame has been taken
/// by the connection or it is dropped.
struct Holding {
    inner: Body,
    _charge: Charge,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
