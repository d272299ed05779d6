//! OpenBao / HashiCorp Vault Transit backend: keys wrapped by a Transit key over the
//! HTTP API (`reqwest`, rustls).
//!
//! Wrapping: `POST /v1/<mount>/encrypt/<key>` with the 32-byte key as `plaintext`, and
//! `context` and `associated_data` both set to `"fieldkey/v1 openbao-transit" || 0x00
//! || EncryptionContext::canonical_bytes()` (base64). `context` selects the key derived
//! for this context, which binds only on a key created with `derived=true`: Transit
//! silently ignores the context of a non-derived key. So the provider reads a key's
//! configuration (`GET /v1/<mount>/keys/<key>`) before using it (before every wrap; once
//! per key for unwraps) and refuses a key that is not a derived `aes256-gcm96` key
//! ([`KmsError::Misconfigured`]). `associated_data` binds the context on any AEAD key as
//! well. The label keeps the context non-empty (a derived key requires one) and apart
//! from other users of the same key.
//!
//! The wrapped key is Transit's ciphertext string as it comes (`vault:v<N>:<base64>`,
//! ASCII bytes), so an operator can unwrap one by hand with `bao write
//! <mount>/decrypt/<key>` and the context above. Data keys are generated here
//! (`SecretKey::generate`, the OS CSPRNG) and wrapped, rather than by Transit's
//! `datakey` endpoint: that endpoint takes no `associated_data`, and one code path makes
//! generated and rewrapped keys alike. Plaintext key bytes live only in zeroizing
//! buffers on our side (request and response bodies included).
//!
//! A key's deletion (`lifecycle.rs`): soft delete at once (every use refused), its date
//! kept in a KV v2 record on the same server, and the hard delete when the window is
//! over, done lazily by whichever sidecar sweeps first. Authentication (`auth.rs`): a
//! token from a file or the environment, or an AppRole / Kubernetes login that is
//! repeated before the token expires and after the server says it is no longer valid.
//!
//! Must not: log or return key bytes, tokens or secret ids; adopt a key it did not make
//! (`create_epoch_key` picks a fresh name and checks it is free).

mod auth;
mod client;
mod errors;
mod lifecycle;
mod settings;

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use reqwest::Method;
use tokio::time::Instant;
use zeroize::Zeroizing;

pub use settings::{OpenBaoAuth, OpenBaoSettings};

use self::auth::{Auth, LoginError};
use self::client::{Client, Reply, extend_zeroizing, secret_body};
use self::errors::Refusal;
use self::settings::is_key_name;
use super::{DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};
use crate::crypto::{KEY_LEN, SecretKey};

/// Prefix of the Transit context and associated data of every wrap.
const CONTEXT_LABEL: &[u8] = b"fieldkey/v1 openbao-transit\0";
/// The only Transit key type used: AES-256-GCM with a 96-bit nonce.
const KEY_TYPE: &str = "aes256-gcm96";
/// Longest wrapped key accepted for unwrapping (a wrapped 32-byte key is ~90 bytes).
const MAX_WRAPPED: usize = 1024;

/// The OpenBao / Vault Transit KMS. Cheap to clone (shared state).
#[derive(Clone)]
pub struct OpenBaoKms {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    auth: Auth,
    address: String,
    mount: String,
    namespace: Option<String>,
    default_key: String,
    records_mount: String,
    records_path: String,
    operation_timeout: Duration,
    /// Keys whose configuration was checked (derived `aes256-gcm96`; neither can change
    /// after creation).
    verified: Mutex<HashSet<String>>,
    sweep_interval: Option<Duration>,
    last_sweep: Mutex<Option<Instant>>,
    sweeping: AtomicBool,
}

impl std::fmt::Debug for OpenBaoKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("OpenBaoKms")
            .field("address", &i.address)
            .field("namespace", &i.namespace)
            .field("mount", &i.mount)
            .field("default_key", &i.default_key)
            .field("auth", &i.auth.method())
            .finish_non_exhaustive()
    }
}

/// A Transit key's configuration, as `GET <mount>/keys/<key>` reports it.
#[derive(Debug, serde::Deserialize)]
struct KeyInfo {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    derived: bool,
    #[serde(default)]
    soft_deleted: bool,
}

impl OpenBaoKms {
    /// Checks `settings`, reads the CA and token / secret files, and logs in (AppRole,
    /// Kubernetes). A server that cannot be reached now is not an error (the provider
    /// logs in at first use, and the readiness check reports it); a refused login, a
    /// missing file or a bad setting is. Then deletes keys whose deletion window is
    /// over (best effort, logged).
    ///
    /// # Errors
    /// [`KmsError::Misconfigured`] for bad settings, unreadable files or a refused login.
    pub async fn connect(settings: &OpenBaoSettings) -> Result<OpenBaoKms, KmsError> {
        let cfg = settings.validate()?;
        let ca = match &settings.ca_file {
            Some(path) => Some(Zeroizing::new(std::fs::read(path).map_err(|e| {
                KmsError::Misconfigured(format!("kms.openbao.ca_file {}: {e}", path.display()))
            })?)),
            None => None,
        };
        let client = Client::new(&cfg, ca.as_deref().map(Vec::as_slice))?;
        let auth = Auth::new(&settings.auth)?;
        let inner = Arc::new(Inner {
            client,
            auth,
            address: settings.address.trim().to_owned(),
            mount: cfg.mount,
            namespace: cfg.namespace,
            default_key: settings.key.clone(),
            records_mount: cfg.records_mount,
            records_path: cfg.records_path,
            operation_timeout: cfg.operation_timeout,
            verified: Mutex::new(HashSet::new()),
            sweep_interval: cfg.sweep_interval,
            last_sweep: Mutex::new(None),
            sweeping: AtomicBool::new(false),
        });
        match inner.auth.token(&inner.client, inner.deadline()).await {
            Ok(_) => inner.sweep_logged().await,
            Err(LoginError::Refused(msg)) => return Err(KmsError::Misconfigured(msg)),
            Err(LoginError::Kms(e @ KmsError::Misconfigured(_))) => return Err(e),
            Err(LoginError::Kms(e)) => {
                tracing::warn!(address = %inner.address, error = %e,
                    "OpenBao not reachable at start; logging in at first use");
            }
        }
        Ok(OpenBaoKms { inner })
    }
}

impl Inner {
    fn deadline(&self) -> Instant {
        Instant::now() + self.operation_timeout
    }

    /// `method` on `path` with the current token, within `deadline`. After a 403, one
    /// recovery (a new login or token file) and one more try if the token was the
    /// problem. Any answer that is not retried is returned, refusals included.
    async fn call(
        &self,
        deadline: Instant,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        key_id: &str,
    ) -> Result<Reply, KmsError> {
        let work = async {
            let token = self
                .auth
                .token(&self.client, deadline)
                .await
                .map_err(|e| login_failed(e, key_id))?;
            let reply = self
                .client
                .send(
                    deadline,
                    method.clone(),
                    path,
                    body.clone(),
                    Some(&token.header),
                )
                .await?;
            if reply.status != 403 {
                return Ok(reply);
            }
            match self
                .auth
                .recover(&self.client, deadline, &token)
                .await
                .map_err(|e| login_failed(e, key_id))?
            {
                Some(fresh) => {
                    self.client
                        .send(deadline, method, path, body, Some(&fresh.header))
                        .await
                }
                None => Ok(reply),
            }
        };
        tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or(Err(KmsError::Timeout))
    }

    /// What a refusal means (logged with OpenBao's text, which never enters the error).
    fn refusal(reply: &Reply, key_id: &str, path: &str) -> (Refusal, KmsError) {
        let texts = reply.errors();
        let r = errors::classify(reply.status, &texts);
        let said = errors::sentences(&texts).join("; ");
        match r {
            Refusal::Other(_) | Refusal::NoRoute => {
                tracing::warn!(
                    key_id,
                    path,
                    status = reply.status,
                    said,
                    "OpenBao refused a call"
                );
            }
            _ => {
                tracing::debug!(
                    key_id,
                    path,
                    status = reply.status,
                    said,
                    "OpenBao refused a call"
                );
            }
        }
        (r, r.into_error(key_id, path))
    }

    /// The configuration of `key`, `None` if OpenBao has no such key.
    async fn key_info(&self, key: &str, deadline: Instant) -> Result<Option<KeyInfo>, KmsError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            data: KeyInfo,
        }
        let path = format!("{}/keys/{key}", self.mount);
        let reply = self.call(deadline, Method::GET, &path, None, key).await?;
        if reply.ok() {
            return Ok(Some(reply.json::<Answer>("key read")?.data));
        }
        match Self::refusal(&reply, key, &path) {
            (Refusal::KeyNotFound, _) => Ok(None),
            (_, e) => Err(e),
        }
    }

    /// Refuses a key that is soft-deleted or not a derived `aes256-gcm96` key; records
    /// a good one as checked.
    async fn usable(&self, key: &str, info: &KeyInfo) -> Result<(), KmsError> {
        if info.soft_deleted {
            return Err(self.soft_deleted(key).await);
        }
        if info.kind != KEY_TYPE || !info.derived {
            return Err(KmsError::Misconfigured(format!(
                "OpenBao Transit key {key} is a {}{} key; fieldkey needs a derived {KEY_TYPE} key (Transit ignores the context of a key that is not derived)",
                if info.derived {
                    "derived "
                } else {
                    "non-derived "
                },
                info.kind
            )));
        }
        if let Ok(mut v) = self.verified.lock() {
            v.insert(key.to_owned());
        }
        Ok(())
    }

    fn is_verified(&self, key: &str) -> bool {
        self.verified.lock().is_ok_and(|v| v.contains(key))
    }

    fn forget(&self, key: &str) {
        if let Ok(mut v) = self.verified.lock() {
            v.remove(key);
        }
    }

    /// `key` exists and is usable now, checked with a fresh read.
    async fn check_key(&self, key: &str, deadline: Instant) -> Result<(), KmsError> {
        match self.key_info(key, deadline).await? {
            Some(info) => self.usable(key, &info).await,
            None => {
                self.forget(key);
                Err(KmsError::KeyNotFound {
                    key_id: key.to_owned(),
                })
            }
        }
    }

    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        if !is_key_name(key_id) {
            return Err(not_found(key_id));
        }
        let deadline = self.deadline();
        // Always a fresh read: with a token allowed to create keys, encrypting under a
        // key deleted since would silently make a new one of that name.
        self.check_key(key_id, deadline).await?;
        let ctx = context_b64(ctx);
        let mut body = Zeroizing::new(Vec::with_capacity(128 + 2 * ctx.len()));
        let mut b64 = Zeroizing::new([0u8; 64]);
        let n = STANDARD
            .encode_slice(key.expose(), &mut b64[..])
            .map_err(|_| KmsError::Misconfigured("cannot encode a key".into()))?;
        extend_zeroizing(&mut body, b"{\"plaintext\":\"");
        extend_zeroizing(&mut body, b64.get(..n).unwrap_or_default());
        push_context(&mut body, &ctx);
        let path = format!("{}/encrypt/{key_id}", self.mount);
        let reply = self
            .call(
                deadline,
                Method::POST,
                &path,
                Some(secret_body(body)),
                key_id,
            )
            .await?;
        if !reply.ok() {
            return Err(self.refused(&reply, key_id, &path).await);
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            data: Ciphertext,
        }
        #[derive(serde::Deserialize)]
        struct Ciphertext {
            ciphertext: String,
        }
        let ct = reply.json::<Answer>("encrypt")?.data.ciphertext;
        if !is_transit_ciphertext(ct.as_bytes()) {
            return Err(KmsError::Rejected {
                code: "openbao: encrypt returned no Transit ciphertext".into(),
            });
        }
        Ok(WrappedKey::new(ct.into_bytes()))
    }

    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        if !is_key_name(key_id) {
            return Err(not_found(key_id));
        }
        // Not Transit's form (another provider's, or damaged): no call.
        let ct = wrapped.as_bytes();
        if !is_transit_ciphertext(ct) {
            return Err(KmsError::InvalidCiphertext);
        }
        let deadline = self.deadline();
        if !self.is_verified(key_id) {
            self.check_key(key_id, deadline).await?;
        }
        let ctx = context_b64(ctx);
        let mut body = Zeroizing::new(Vec::with_capacity(128 + ct.len() + 2 * ctx.len()));
        extend_zeroizing(&mut body, b"{\"ciphertext\":\"");
        extend_zeroizing(&mut body, ct);
        push_context(&mut body, &ctx);
        let path = format!("{}/decrypt/{key_id}", self.mount);
        let reply = self
            .call(
                deadline,
                Method::POST,
                &path,
                Some(secret_body(body)),
                key_id,
            )
            .await?;
        if !reply.ok() {
            return Err(self.refused(&reply, key_id, &path).await);
        }
        #[derive(serde::Deserialize)]
        struct Answer<'a> {
            #[serde(borrow)]
            data: Plain<'a>,
        }
        #[derive(serde::Deserialize)]
        struct Plain<'a> {
            plaintext: &'a str,
        }
        let answer: Answer<'_> = reply.json("decrypt")?;
        let mut out = Zeroizing::new([0u8; 48]);
        let n = STANDARD
            .decode_slice(answer.data.plaintext, &mut out[..])
            .map_err(|_| unexpected_plaintext())?;
        if n != KEY_LEN {
            return Err(unexpected_plaintext());
        }
        SecretKey::try_from_slice(out.get(..KEY_LEN).unwrap_or_default())
            .ok_or_else(unexpected_plaintext)
    }

    /// The error of a refused encrypt or decrypt (a soft-deleted key's window checked).
    async fn refused(&self, reply: &Reply, key_id: &str, path: &str) -> KmsError {
        match Self::refusal(reply, key_id, path) {
            (Refusal::SoftDeleted, _) => self.soft_deleted(key_id).await,
            (Refusal::KeyNotFound, e) => {
                self.forget(key_id);
                e
            }
            (_, e) => e,
        }
    }
}

fn not_found(key_id: &str) -> KmsError {
    KmsError::KeyNotFound {
        key_id: key_id.to_owned(),
    }
}

fn unexpected_plaintext() -> KmsError {
    KmsError::Rejected {
        code: "unexpected plaintext key length".into(),
    }
}

fn login_failed(e: LoginError, key_id: &str) -> KmsError {
    match e {
        LoginError::Kms(e) => e,
        LoginError::Refused(msg) => {
            tracing::warn!(key_id, "{msg}");
            KmsError::AccessDenied {
                key_id: key_id.to_owned(),
            }
        }
    }
}

/// Base64 of the label and the context's canonical bytes.
fn context_b64(ctx: &EncryptionContext) -> String {
    let mut raw = CONTEXT_LABEL.to_vec();
    raw.extend_from_slice(&ctx.canonical_bytes());
    STANDARD.encode(raw)
}

/// `","context":"<ctx>","associated_data":"<ctx>"}` (closes the string opened before).
fn push_context(body: &mut Zeroizing<Vec<u8>>, ctx: &str) {
    extend_zeroizing(body, b"\",\"context\":\"");
    extend_zeroizing(body, ctx.as_bytes());
    extend_zeroizing(body, b"\",\"associated_data\":\"");
    extend_zeroizing(body, ctx.as_bytes());
    extend_zeroizing(body, b"\"}");
}

/// `vault:v<digits>:<base64>`, short enough, nothing a JSON string would need escaped.
fn is_transit_ciphertext(b: &[u8]) -> bool {
    let Some(rest) = b.strip_prefix(b"vault:v") else {
        return false;
    };
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    b.len() <= MAX_WRAPPED
        && digits > 0
        && rest.get(digits) == Some(&b':')
        && rest.get(digits + 1..).is_some_and(|t| {
            !t.is_empty()
                && t.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='))
        })
}

#[async_trait]
impl Kms for OpenBaoKms {
    fn provider(&self) -> &'static str {
        "openbao"
    }

    fn default_key_id(&self) -> &str {
        &self.inner.default_key
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        let secret = SecretKey::generate()
            .map_err(|_| KmsError::Misconfigured("system random number generator failed".into()))?;
        let wrapped = self.inner.wrap(key_id, &secret, ctx).await?;
        Ok(DataKey { secret, wrapped })
    }

    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.inner.wrap(key_id, key, ctx).await
    }

    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.inner.unwrap(key_id, wrapped, ctx).await
    }

    /// The server answers, the token works, and the default key exists, is a derived
    /// `aes256-gcm96` key and is not pending deletion. Also starts a background sweep
    /// of keys past their deletion date when one is due (`deletion_sweep_interval_s`).
    async fn check(&self) -> Result<(), KmsError> {
        let key = self.inner.default_key.clone();
        let deadline = self.inner.deadline();
        let out = self.inner.check_key(&key, deadline).await;
        if out.is_ok() {
            Inner::maybe_sweep(&self.inner);
        }
        out
    }

    /// The key name itself, once OpenBao confirms the key exists: every key this
    /// provider names lives in its one mount and namespace, so the name tells them apart.
    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        if !is_key_name(key_id) {
            return Err(not_found(key_id));
        }
        match self.inner.key_info(key_id, self.inner.deadline()).await? {
            Some(_) => Ok(key_id.to_owned()),
            None => Err(not_found(key_id)),
        }
    }

    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        self.inner
            .schedule_deletion(key_id, pending_window_days)
            .await
    }

    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        self.inner.create_key(epoch, store_tag).await
    }

    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        self.inner.status(key_id).await
    }

    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        self.inner.cancel_deletion(key_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transit_ciphertexts_are_sent_for_unwrapping() {
        assert!(is_transit_ciphertext(b"vault:v1:AAAA+/=="));
        assert!(is_transit_ciphertext(b"vault:v12:abc"));
        for bad in [
            &b""[..],
            b"vault:v1:",
            b"vault:v:abc",
            b"vault:vx:abc",
            b"vault:v1:ab\"c",
            b"vault:v1:ab\\c",
            b"\x01local-bytes",
        ] {
            assert!(!is_transit_ciphertext(bad), "{bad:?}");
        }
        let long = [b"vault:v1:".as_slice(), &[b'A'; MAX_WRAPPED]].concat();
        assert!(!is_transit_ciphertext(&long));
    }

    #[test]
    fn the_context_is_labelled_and_never_empty() {
        let empty = context_b64(&EncryptionContext::default());
        assert_eq!(STANDARD.decode(&empty).ok().as_deref(), Some(CONTEXT_LABEL));
        let a = context_b64(&EncryptionContext::tenant_key("t1", 1));
        let b = context_b64(&EncryptionContext::tenant_key("t1", 2));
        assert_ne!(a, b);
    }
}
