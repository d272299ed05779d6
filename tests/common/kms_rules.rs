//! [`KmsRules`]: an HTTP proxy in front of moto_server that enforces AWS KMS's key-state
//! rules, which moto (5.2.5) does not: AWS refuses to use a key that is `Disabled`
//! (`DisabledException`) or `PendingDeletion` (`KMSInvalidStateException`); moto
//! encrypts and decrypts with it all the same.
//!
//! For `Encrypt`, `Decrypt`, `GenerateDataKey`, `GenerateDataKeyWithoutPlaintext` and
//! `ReEncrypt` (source and destination key), and for `ScheduleKeyDeletion` of a key already
//! pending deletion (which AWS refuses and moto schedules again), the proxy first asks moto (`DescribeKey`, which
//! takes a key id, key ARN, alias name or alias ARN) for the state of the key the request
//! uses, and answers as AWS would when that state forbids the operation. A `Decrypt` (or
//! `ReEncrypt`) without a key id uses the key its ciphertext names: a moto ciphertext
//! blob starts with the 36 ASCII characters of its key id (moto/kms/utils.py:
//! `key_id (36) | iv (12) | tag (16) | ciphertext`). Every other request, and every
//! request whose key moto cannot describe, goes to moto unchanged.
//!
//! What it does NOT do: check key usage, grants or policies, or rewrite moto's answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};

/// The operations whose key must be usable, with the request fields naming the keys.
const GUARDED: &[(&str, &[KeyField])] = &[
    ("TrentService.Encrypt", &[KeyField::Named("KeyId")]),
    ("TrentService.GenerateDataKey", &[KeyField::Named("KeyId")]),
    (
        "TrentService.GenerateDataKeyWithoutPlaintext",
        &[KeyField::Named("KeyId")],
    ),
    ("TrentService.Decrypt", &[KeyField::NamedOrBlob("KeyId")]),
    (
        "TrentService.ReEncrypt",
        &[
            KeyField::NamedOrBlob("SourceKeyId"),
            KeyField::Named("DestinationKeyId"),
        ],
    ),
    // A disabled key may be scheduled for deletion; one already pending may not
    // (AWS: KMSInvalidStateException; moto 5.2.5 schedules it again).
    (
        "TrentService.ScheduleKeyDeletion",
        &[KeyField::Named("KeyId")],
    ),
];

/// Where a request names a key.
#[derive(Clone, Copy, Debug)]
enum KeyField {
    /// This JSON field.
    Named(&'static str),
    /// This JSON field, else the key id at the start of `CiphertextBlob`.
    NamedOrBlob(&'static str),
}

/// Bytes of the key id at the start of a moto ciphertext blob.
const MOTO_BLOB_KEY_ID_LEN: usize = 36;

/// One request the proxy refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The operation, without the `TrentService.` prefix (`Decrypt`, ...).
    pub operation: String,
    /// The key as the request named it (or as the ciphertext named it).
    pub key_ref: String,
    /// The key's ARN, from DescribeKey.
    pub key_arn: String,
    /// The key's state: `Disabled` or `PendingDeletion`.
    pub key_state: String,
    /// The AWS error code answered.
    pub code: String,
}

/// The proxy. `url` is the endpoint to give the AWS SDK instead of moto's.
pub struct KmsRules {
    pub url: String,
    refusals: Arc<Mutex<Vec<Refusal>>>,
    refused: Arc<AtomicUsize>,
    stop: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl KmsRules {
    /// Listens on 127.0.0.1 (a free port) and forwards to moto_server at `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let refusals: Arc<Mutex<Vec<Refusal>>> = Default::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
        let (refusals2, refused2, stop2, conns2) = (
            refusals.clone(),
            refused.clone(),
            stop.clone(),
            conns.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop2.notified() => break,
                    acc = listener.accept() => {
                        let Ok((stream, _)) = acc else { continue };
                        let (refusals, refused) = (refusals2.clone(), refused2.clone());
                        let h = tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                                let (refusals, refused) = (refusals.clone(), refused.clone());
                                async move {
                                    let resp = handle(req, upstream, &refusals, &refused)
                                        .await
                                        .unwrap_or_else(|e| bad_gateway(&e));
                                    Ok::<_, Infallible>(resp)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                        if let Ok(mut c) = conns2.lock() {
                            c.retain(|h| !h.is_finished());
                            c.push(h.abort_handle());
                        }
                    }
                }
            }
        });
        Ok(Self {
            url,
            refusals,
            refused,
            stop,
            task: Some(task),
            conns,
        })
    }

    /// How many requests were refused so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// The refused requests so far, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops listening and cuts every open connection.
    pub async fn stop(mut self) {
        self.stop.notify_one();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.abort_conns();
    }

    fn abort_conns(&self) {
        if let Ok(mut c) = self.conns.lock() {
            for h in c.drain(..) {
                h.abort();
            }
        }
    }
}

impl Drop for KmsRules {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.abort_conns();
    }
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    refusals: &Mutex<Vec<Refusal>>,
    refused: &AtomicUsize,
) -> Result<Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if let Some((_, fields)) = GUARDED.iter().find(|(op, _)| *op == target) {
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        for field in *fields {
            let Some(key_ref) = key_ref(&json, *field) else {
                continue;
            };
            let Some((arn, state)) = describe(&parts.headers, upstream, &key_ref).await? else {
                continue; // moto does not know the key: let moto answer the request
            };
            let scheduling = target == "TrentService.ScheduleKeyDeletion";
            let refusal = match state.as_str() {
                "Disabled" if !scheduling => {
                    Some(("DisabledException", format!("{arn} is disabled.")))
                }
                "PendingDeletion" => Some((
                    "KMSInvalidStateException",
                    format!("{arn} is pending deletion."),
                )),
                _ => None,
            };
            if let Some((code, message)) = refusal {
                refused.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut r) = refusals.lock() {
                    r.push(Refusal {
                        operation: target.trim_start_matches("TrentService.").to_owned(),
                        key_ref,
                        key_arn: arn,
                        key_state: state,
                        code: code.to_owned(),
                    });
                }
                return aws_error(code, &message);
            }
        }
    }
    forward(Request::from_parts(parts, Full::new(body)), upstream).await
}

/// The key a request names in `field`.
fn key_ref(json: &serde_json::Value, field: KeyField) -> Option<String> {
    let named = |name: &str| {
        json.get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    match field {
        KeyField::Named(name) => named(name),
        KeyField::NamedOrBlob(name) => named(name).or_else(|| {
            let blob = json.get("CiphertextBlob")?.as_str()?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(blob)
                .ok()?;
            let id = bytes.get(..MOTO_BLOB_KEY_ID_LEN)?;
            id.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                .then(|| String::from_utf8_lossy(id).into_owned())
        }),
    }
}

/// `(ARN, KeyState)` of `key_ref` from moto's DescribeKey; `None` when moto refuses to
/// describe it (unknown key or alias). The call carries the original request's
/// `Authorization` (moto takes service, region and account from it; it does not check
/// signatures) and `User-Agent`, `Host`, `x-moto-account-id`.
async fn describe(
    headers: &hyper::HeaderMap,
    upstream: SocketAddr,
    key_ref: &str,
) -> Result<Option<(String, String)>> {
    let mut req = Request::builder()
        .method("POST")
        .uri("/")
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "TrentService.DescribeKey");
    for name in ["authorization", "user-agent", "host", "x-moto-account-id"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    let body = serde_json::to_vec(&serde_json::json!({ "KeyId": key_ref }))?;
    let resp = forward(req.body(Full::new(Bytes::from(body)))?, upstream).await?;
    if !resp.status().is_success() {
        return Ok(None);
    }
    let bytes = resp.into_body().collect().await?.to_bytes();
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).context("DescribeKey answer is not JSON")?;
    let meta = json
        .get("KeyMetadata")
        .context("DescribeKey: no KeyMetadata")?;
    let field = |name: &str| {
        meta.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .with_context(|| format!("DescribeKey: no {name}"))
    };
    Ok(Some((field("Arn")?, field("KeyState")?)))
}

async fn forward(req: Request<Full<Bytes>>, upstream: SocketAddr) -> Result<Response<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(upstream).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        Full::new(body.collect().await?.to_bytes()),
    ))
}

/// An AWS JSON 1.1 error answer, as AWS KMS sends it.
fn aws_error(code: &str, message: &str) -> Result<Response<Full<Bytes>>> {
    let body = serde_json::to_vec(&serde_json::json!({ "__type": code, "message": message }))?;
    Ok(Response::builder()
        .status(400)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-ErrorType", code)
        .header("x-amzn-requestid", request_id())
        .body(Full::new(Bytes::from(body)))?)
}

fn request_id() -> String {
    use super::rand_bytes;
    format!(
        "{}-{}-{}-{}-{}",
        hex::encode(rand_bytes::<4>()),
        hex::encode(rand_bytes::<2>()),
        hex::encode(rand_bytes::<2>()),
        hex::encode(rand_bytes::<2>()),
        hex::encode(rand_bytes::<6>())
    )
}

fn bad_gateway(e: &anyhow::Error) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("kms_rules proxy: {e:#}"))));
    *resp.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    resp
}
