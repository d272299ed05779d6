//! The HTTP client: one request to OpenBao within an operation's deadline, with an
//! attempt deadline, retries with jittered exponential back-off, the namespace header,
//! and bodies that hold key material in zeroizing buffers.
//!
//! Retried: connection failures, attempt timeouts, 5xx (a sealed server answers 503),
//! 412 (a standby without the needed state yet) and 429. Never retried: any other
//! answer; a refusal is the caller's to classify (`errors.rs`). A server certificate
//! that does not verify is [`KmsError::Misconfigured`] at once (retrying cannot help).
//!
//! What it does NOT protect: copies of request and response bytes inside hyper and
//! rustls (their buffers are not ours to zeroize), as with any HTTP client library.

use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::settings::Checked;
use crate::kms::KmsError;

/// Largest answer read (a Transit or KV answer is a few hundred bytes).
const MAX_BODY: usize = 1 << 20;
/// Longest back-off between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// An HTTP client for one OpenBao server.
pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    namespace: Option<HeaderValue>,
    attempt_timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
}

/// An answer that is not retried: its status and body (zeroized on drop: a decrypt or
/// login answer holds a secret).
pub(super) struct Reply {
    pub status: u16,
    pub body: Zeroizing<Vec<u8>>,
}

impl Reply {
    /// 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `errors` array of a refusal (empty if there is none).
    pub fn errors(&self) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct Errors {
            #[serde(default)]
            errors: Vec<String>,
        }
        serde_json::from_slice::<Errors>(&self.body)
            .map(|e| e.errors)
            .unwrap_or_default()
    }

    /// The body as `T` (borrowing from the zeroizing buffer where `T` borrows).
    pub fn json<'a, T: serde::Deserialize<'a>>(&'a self, what: &str) -> Result<T, KmsError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            tracing::warn!(what, error = %e, "OpenBao answer not understood");
            KmsError::Rejected {
                code: format!("openbao: unexpected answer to {what}"),
            }
        })
    }
}

/// A request body that zeroizes its bytes when the last clone (a retry's) is gone.
pub(super) fn secret_body(json: Zeroizing<Vec<u8>>) -> Bytes {
    Bytes::from_owner(json)
}

/// An HTTP status the server answered with, for logs (no text from the server: a 5xx
/// message may quote the request).
#[derive(Debug, thiserror::Error)]
#[error("OpenBao answered HTTP {status}{}", if *.sealed { " (sealed)" } else { "" })]
pub(super) struct ServerError {
    status: u16,
    sealed: bool,
}

enum Failure {
    /// Worth another attempt.
    Transient(KmsError),
    /// Final.
    Fatal(KmsError),
}

impl Client {
    /// The client for the validated settings, trusting only `ca_pem`'s roots if given.
    pub fn new(cfg: &Checked, ca_pem: Option<&[u8]>) -> Result<Self, KmsError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            // A redirect would take the token elsewhere; OpenBao does not need them for
            // the API (a standby forwards).
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("fieldkey/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                KmsError::Misconfigured(format!("kms.openbao.ca_file is not PEM: {e}"))
            })?;
            if certs.is_empty() {
                return Err(KmsError::Misconfigured(
                    "kms.openbao.ca_file holds no certificate".into(),
                ));
            }
            b = b.tls_certs_only(certs);
        }
        let namespace = cfg
            .namespace
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| KmsError::Misconfigured("kms.openbao.namespace is not a header".into()))?;
        Ok(Self {
            http: b.build().map_err(|e| {
                KmsError::Misconfigured(format!("cannot build the OpenBao HTTP client: {e}"))
            })?,
            base: cfg.base.clone(),
            namespace,
            attempt_timeout: cfg.attempt_timeout,
            max_attempts: cfg.max_attempts,
            initial_backoff: cfg.initial_backoff,
        })
    }

    /// `method` on `/v1/<path>` with `body` (JSON) and `token`, retried while worth it
    /// and `deadline` allows. The last failure is returned when the attempts are spent
    /// or the next back-off would pass the deadline: [`KmsError::Throttled`] (429),
    /// [`KmsError::Timeout`], or [`KmsError::Unavailable`].
    pub async fn send(
        &self,
        deadline: Instant,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        token: Option<&HeaderValue>,
    ) -> Result<Reply, KmsError> {
        let url = format!("{}{}", self.base, path);
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            let err = match self
                .attempt(deadline, &method, &url, body.clone(), token)
                .await
            {
                Ok(reply) => match reply.status {
                    429 => KmsError::Throttled,
                    412 | 500..=599 => KmsError::Unavailable(std::sync::Arc::new(ServerError {
                        status: reply.status,
                        sealed: reply.status == 503
                            && reply.errors().iter().any(|e| e.contains("sealed")),
                    })),
                    _ => return Ok(reply),
                },
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(e)) => e,
            };
            if attempt >= self.max_attempts {
                return Err(err);
            }
            let wait = backoff(self.initial_backoff, attempt);
            if Instant::now() + wait >= deadline {
                return Err(err);
            }
            tracing::debug!(path, attempt, error = %err, "OpenBao call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        deadline: Instant,
        method: &Method,
        url: &str,
        body: Option<Bytes>,
        token: Option<&HeaderValue>,
    ) -> Result<Reply, Failure> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Fatal(KmsError::Timeout));
        }
        let mut req = self
            .http
            .request(method.clone(), url)
            .timeout(self.attempt_timeout.min(left));
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t.clone());
        }
        if let Some(b) = body {
            req = req.header(CONTENT_TYPE, "application/json").body(b);
        }
        let resp = req.send().await.map_err(transport_failure)?;
        let status = resp.status().as_u16();
        let body = read_body(resp).await?;
        Ok(Reply { status, body })
    }
}

/// The body, at most [`MAX_BODY`] bytes, in a buffer that never leaves an unzeroized
/// copy behind when it grows.
async fn read_body(mut resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let hint = usize::try_from(resp.content_length().unwrap_or(0))
        .unwrap_or(MAX_BODY)
        .min(MAX_BODY);
    let mut buf = Zeroizing::new(Vec::with_capacity(hint.max(512)));
    while let Some(chunk) = resp.chunk().await.map_err(transport_failure)? {
        if buf.len().saturating_add(chunk.len()) > MAX_BODY {
            return Err(Failure::Fatal(KmsError::Rejected {
                code: "openbao: answer too large".into(),
            }));
        }
        extend_zeroizing(&mut buf, &chunk);
    }
    Ok(buf)
}

/// Appends `more`, moving to a larger zeroizing buffer first if needed (a `Vec` that
/// grows in place would leave the old allocation's bytes behind).
pub(super) fn extend_zeroizing(buf: &mut Zeroizing<Vec<u8>>, more: &[u8]) {
    if buf.capacity() - buf.len() < more.len() {
        let want = buf
            .len()
            .saturating_add(more.len())
            .max(buf.capacity().saturating_mul(2));
        let mut bigger = Zeroizing::new(Vec::with_capacity(want));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(more);
}

fn transport_failure(e: reqwest::Error) -> Failure {
    if let Some(why) = untrusted_certificate(&e) {
        return Failure::Fatal(KmsError::Misconfigured(format!(
            "the OpenBao server's TLS certificate does not verify ({why}); set kms.openbao.ca_file to the CA that signs it"
        )));
    }
    if e.is_timeout() {
        Failure::Transient(KmsError::Timeout)
    } else {
        Failure::Transient(KmsError::Unavailable(std::sync::Arc::new(e)))
    }
}

/// The rustls verdict if the error chain holds a certificate rejection. An
/// `io::Error` hides its inner error from `source()` (hyper-util nests two), so the
/// walk looks inside those too; it is bounded.
fn untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut todo: Vec<&(dyn std::error::Error + 'static)> = vec![e];
    let mut steps = 0;
    while let Some(err) = todo.pop() {
        steps += 1;
        if steps > 32 {
            break;
        }
        if let Some(r @ rustls::Error::InvalidCertificate(_)) = err.downcast_ref::<rustls::Error>()
        {
            return Some(r.to_string());
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            todo.push(inner);
        }
        if let Some(next) = err.source() {
            todo.push(next);
        }
    }
    None
}

/// `initial * 2^(attempt-1)`, capped, with jitter: uniform in [half, full].
fn backoff(initial: Duration, attempt: u32) -> Duration {
    let full = initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let half = full / 2;
    let frac = f64::from(getrandom::u32().unwrap_or(u32::MAX / 2)) / f64::from(u32::MAX);
    half + half.mul_f64(frac)
}

/// A JSON string value's characters, escaped (for bodies built by hand).
pub(super) fn push_json_str(buf: &mut Zeroizing<Vec<u8>>, s: &str) {
    extend_zeroizing(buf, b"\"");
    for c in s.chars() {
        match c {
            '"' => extend_zeroizing(buf, b"\\\""),
            '\\' => extend_zeroizing(buf, b"\\\\"),
            c if (c as u32) < 0x20 => {
                extend_zeroizing(buf, format!("\\u{:04x}", c as u32).as_bytes())
            }
            c => {
                let mut tmp = [0u8; 4];
                extend_zeroizing(buf, c.encode_utf8(&mut tmp).as_bytes());
            }
        }
    }
    extend_zeroizing(buf, b"\"");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let i = Duration::from_millis(100);
        for attempt in 1..=3u32 {
            let full = i * (1 << (attempt - 1));
            let b = backoff(i, attempt);
            assert!(b >= full / 2 && b <= full, "{attempt}: {b:?}");
        }
        assert!(backoff(i, 30) <= MAX_BACKOFF);
    }

    #[test]
    fn growing_a_zeroizing_buffer_keeps_its_bytes() {
        let mut b = Zeroizing::new(Vec::with_capacity(2));
        extend_zeroizing(&mut b, b"ab");
        extend_zeroizing(&mut b, b"cdef");
        assert_eq!(b.as_slice(), b"abcdef");
        let mut j = Zeroizing::new(Vec::new());
        push_json_str(&mut j, "a\"b\\c\n");
        assert_eq!(
            serde_json::from_slice::<String>(&j).ok().as_deref(),
            Some("a\"b\\c\n")
        );
    }
}
