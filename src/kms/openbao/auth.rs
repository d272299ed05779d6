//! The token the provider sends, and getting a new one: from a token file or the
//! environment, or by logging in (AppRole, Kubernetes). A client token's TTL must not
//! take the sidecar down: a login token is renewed by a new login at three quarters of
//! its TTL, and a 403 whose token `lookup-self` also refuses makes one new login (or
//! one re-read of the token file) and one more try. A 403 with a valid token is a
//! policy refusal: no login storm.
//!
//! Must not: log, print or return a token, secret id or JWT (they live in zeroizing
//! buffers; `Token`'s `Debug` is redacted).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use reqwest::Method;
use reqwest::header::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::client::{Client, extend_zeroizing, push_json_str, secret_body};
use super::settings::OpenBaoAuth;
use crate::kms::KmsError;

/// One client token, as a sensitive header value whose bytes zeroize when the last
/// request holding it is gone.
pub(super) struct Token {
    pub header: HeaderValue,
    generation: u64,
    /// When to log in again (three quarters into the TTL); `None`: never expires, or
    /// not ours to renew.
    renew_at: Option<Instant>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("header", &"[REDACTED]")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Why a login failed.
#[derive(Debug)]
pub(super) enum LoginError {
    /// The server refused it (bad role, secret id or JWT); the text is OpenBao's.
    Refused(String),
    /// It could not be made (unreachable, timeout, unreadable file).
    Kms(KmsError),
}

impl From<KmsError> for LoginError {
    fn from(e: KmsError) -> Self {
        Self::Kms(e)
    }
}

enum Source {
    /// A token file, re-read when the server refuses the token.
    File(PathBuf),
    /// The environment's token, read once.
    Fixed(SecretString),
    AppRole {
        role_id: String,
        secret_id_file: PathBuf,
        mount: String,
    },
    Kubernetes {
        role: String,
        jwt_file: PathBuf,
        mount: String,
    },
}

/// The provider's authentication state.
pub(super) struct Auth {
    source: Source,
    current: ArcSwapOption<Token>,
    login: tokio::sync::Mutex<()>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("method", &self.method())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// The source of tokens `settings` names (the environment is read now).
    pub fn new(settings: &OpenBaoAuth) -> Result<Self, KmsError> {
        let source = match settings {
            OpenBaoAuth::Token {
                token_file: Some(f),
            } => Source::File(f.clone()),
            OpenBaoAuth::Token { token_file: None } => {
                let token = ["BAO_TOKEN", "VAULT_TOKEN"]
                    .into_iter()
                    .find_map(|v| std::env::var(v).ok().filter(|t| !t.trim().is_empty()))
                    .ok_or_else(|| {
                        KmsError::Misconfigured(
                            "kms.openbao: no token (set auth.token_file, BAO_TOKEN or VAULT_TOKEN, or use approle / kubernetes)".into(),
                        )
                    })?;
                Source::Fixed(SecretString::from(token.trim().to_owned()))
            }
            OpenBaoAuth::AppRole {
                role_id,
                secret_id_file,
                mount,
            } => Source::AppRole {
                role_id: role_id.trim().to_owned(),
                secret_id_file: secret_id_file.clone(),
                mount: mount.trim_matches('/').to_owned(),
            },
            OpenBaoAuth::Kubernetes {
                role,
                jwt_file,
                mount,
            } => Source::Kubernetes {
                role: role.trim().to_owned(),
                jwt_file: jwt_file.clone(),
                mount: mount.trim_matches('/').to_owned(),
            },
        };
        Ok(Self {
            source,
            current: ArcSwapOption::empty(),
            login: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
        })
    }

    /// `token`, `approle` or `kubernetes`.
    pub fn method(&self) -> &'static str {
        match self.source {
            Source::File(_) | Source::Fixed(_) => "token",
            Source::AppRole { .. } => "approle",
            Source::Kubernetes { .. } => "kubernetes",
        }
    }

    /// The token to send: the current one unless it is due for renewal (then a new
    /// login, shared by concurrent callers).
    pub async fn token(
        &self,
        client: &Client,
        deadline: Instant,
    ) -> Result<Arc<Token>, LoginError> {
        if let Some(t) = self.current.load_full()
            && t.renew_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok(t);
        }
        self.refresh(client, deadline, None).await
    }

    /// After a 403 with `refused`: `Some(new token)` if the token itself was the
    /// problem and a new one could be had, `None` if the token is valid (a policy
    /// refusal) or nothing can replace it.
    pub async fn recover(
        &self,
        client: &Client,
        deadline: Instant,
        refused: &Token,
    ) -> Result<Option<Arc<Token>>, LoginError> {
        let probe = client
            .send(
                deadline,
                Method::GET,
                "auth/token/lookup-self",
                None,
                Some(&refused.header),
            )
            .await?;
        if probe.status != 403 {
            // Valid (or the probe itself is not allowed: then trust the refusal).
            return Ok(None);
        }
        if matches!(self.source, Source::Fixed(_)) {
            return Ok(None);
        }
        let fresh = self.refresh(client, deadline, Some(refused)).await?;
        let same: bool = fresh
            .header
            .as_bytes()
            .ct_eq(refused.header.as_bytes())
            .into();
        Ok((!same).then_some(fresh))
    }

    /// A new token, unless another caller got one since `stale` (or since the current
    /// one became due).
    async fn refresh(
        &self,
        client: &Client,
        deadline: Instant,
        stale: Option<&Token>,
    ) -> Result<Arc<Token>, LoginError> {
        let _one_at_a_time = self.login.lock().await;
        if let Some(t) = self.current.load_full() {
            let fresh = match stale {
                Some(s) => t.generation != s.generation,
                None => t.renew_at.is_none_or(|at| Instant::now() < at),
            };
            if fresh {
                return Ok(t);
            }
        }
        let (secret, ttl_s) = match &self.source {
            Source::Fixed(t) => (Zeroizing::new(t.expose_secret().as_bytes().to_vec()), None),
            Source::File(path) => (read_secret_file(path, "auth.token_file")?, None),
            Source::AppRole {
                role_id,
                secret_id_file,
                mount,
            } => {
                let secret_id = read_secret_file(secret_id_file, "auth.secret_id_file")?;
                let body =
                    login_body(&[("role_id", role_id.as_bytes()), ("secret_id", &secret_id)])?;
                login(client, deadline, mount, body).await?
            }
            Source::Kubernetes {
                role,
                jwt_file,
                mount,
            } => {
                let jwt = read_secret_file(jwt_file, "auth.jwt_file")?;
                let body = login_body(&[("role", role.as_bytes()), ("jwt", &jwt)])?;
                login(client, deadline, mount, body).await?
            }
        };
        let mut header =
            HeaderValue::from_maybe_shared(Bytes::from_owner(secret)).map_err(|_| {
                LoginError::Kms(KmsError::Misconfigured(
                    "the OpenBao token has characters a header cannot carry".into(),
                ))
            })?;
        header.set_sensitive(true);
        let token = Arc::new(Token {
            header,
            generation: self
                .generation
                .fetch_add(1, Ordering::SeqCst)
                .saturating_add(1),
            renew_at: ttl_s
                .filter(|s| *s > 0)
                .map(|s| Instant::now() + std::time::Duration::from_millis(s.saturating_mul(750))),
        });
        self.current.store(Some(token.clone()));
        Ok(token)
    }
}

/// A file's contents without surrounding whitespace, in a zeroizing buffer.
fn read_secret_file(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, LoginError> {
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| {
        LoginError::Kms(KmsError::Misconfigured(format!(
            "kms.openbao.{what} {}: {e}",
            path.display()
        )))
    })?);
    let trimmed = raw.trim_ascii();
    if trimmed.is_empty() {
        return Err(LoginError::Kms(KmsError::Misconfigured(format!(
            "kms.openbao.{what} {} is empty",
            path.display()
        ))));
    }
    Ok(Zeroizing::new(trimmed.to_vec()))
}

/// `{"name": "value", ...}` built in a zeroizing buffer.
fn login_body(fields: &[(&str, &[u8])]) -> Result<Bytes, LoginError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(1024));
    extend_zeroizing(&mut buf, b"{");
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            extend_zeroizing(&mut buf, b",");
        }
        push_json_str(&mut buf, name);
        extend_zeroizing(&mut buf, b":");
        let value = std::str::from_utf8(value).map_err(|_| {
            LoginError::Kms(KmsError::Misconfigured(format!(
                "kms.openbao: the {name} is not UTF-8"
            )))
        })?;
        push_json_str(&mut buf, value);
    }
    extend_zeroizing(&mut buf, b"}");
    Ok(secret_body(buf))
}

/// `POST auth/<mount>/login`: the client token and its TTL in seconds.
async fn login(
    client: &Client,
    deadline: Instant,
    mount: &str,
    body: Bytes,
) -> Result<(Zeroizing<Vec<u8>>, Option<u64>), LoginError> {
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        auth: AuthPart<'a>,
    }
    #[derive(serde::Deserialize)]
    struct AuthPart<'a> {
        client_token: &'a str,
        #[serde(default)]
        lease_duration: u64,
    }
    let path = format!("auth/{mount}/login");
    let reply = client
        .send(deadline, Method::POST, &path, Some(body), None)
        .await?;
    if !reply.ok() {
        let texts = reply.errors();
        let why = super::errors::sentences(&texts).join("; ");
        return Err(LoginError::Refused(format!(
            "OpenBao refused the login at auth/{mount} (HTTP {}): {why}",
            reply.status
        )));
    }
    let answer: Answer<'_> = reply.json("login")?;
    let token = Zeroizing::new(answer.auth.client_token.as_bytes().to_vec());
    Ok((token, Some(answer.auth.lease_duration)))
}
