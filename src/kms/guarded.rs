//! Back-off towards a KMS that is down (issue 20, finding 4): a circuit breaker per KMS
//! key in front of any provider. While a key's breaker is open, calls with it fail at
//! once as [`KmsError::Unavailable`] ("circuit open") instead of each making its own
//! attempt; one probe at a time finds out when the KMS is back, after a jittered back-off
//! that doubles up to 10 s, so replicas' backlogs do not arrive in step.
//!
//! Counts as a failure: unavailability, timeouts and throttling (after the provider's
//! own retries). A refusal (disabled key, access denied, bad ciphertext) is an answer:
//! it never opens the breaker and is never hidden behind it. Guarded: data-key
//! generation, wrap, unwrap and the readiness check; the administrative calls (key
//! deletion, states, epoch keys) pass straight through with their own retries.
//!
//! Concurrent misses of one key version already share a single unwrap (the cache's
//! `OnceCell`); the breaker adds the sharing across versions and tenants on one key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};
use crate::breaker::{Breaker, BreakerConfig, Open};
use crate::crypto::SecretKey;

/// The error of a call refused while its key's breaker is open.
#[derive(Debug, thiserror::Error)]
#[error(
    "circuit open: the KMS failed repeatedly for this key; next attempt in {retry_after_ms} ms"
)]
pub struct CircuitOpen {
    /// Until the next probe, milliseconds (0: a probe is under way).
    pub retry_after_ms: u128,
}

/// A KMS behind per-key circuit breakers.
pub struct GuardedKms {
    inner: Arc<dyn Kms>,
    cfg: BreakerConfig,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl std::fmt::Debug for GuardedKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedKms")
            .field("provider", &self.inner.provider())
            .finish_non_exhaustive()
    }
}

/// Whether a KMS error says the KMS is unavailable (rather than answering no).
fn counts(e: &KmsError) -> bool {
    e.is_unavailable()
}

impl GuardedKms {
    /// `inner` behind breakers with the default settings.
    pub fn new(inner: Arc<dyn Kms>) -> Self {
        Self::with_config(inner, BreakerConfig::default())
    }

    /// `inner` behind breakers with `cfg`.
    pub fn with_config(inner: Arc<dyn Kms>, cfg: BreakerConfig) -> Self {
        Self {
            inner,
            cfg,
            breakers: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Breaker>>> {
        self.breakers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn breaker(&self, key_id: &str) -> Arc<Breaker> {
        let mut m = self.map();
        if let Some(b) = m.get(key_id) {
            return b.clone();
        }
        let b = Arc::new(Breaker::new(self.cfg));
        m.insert(key_id.to_owned(), b.clone());
        b
    }

    /// Runs `call` through `key_id`'s breaker.
    async fn guarded<T>(
        &self,
        key_id: &str,
        call: impl Future<Output = Result<T, KmsError>>,
    ) -> Result<T, KmsError> {
        let breaker = self.breaker(key_id);
        let ticket = breaker.admit().map_err(|Open { retry_after }| {
            KmsError::Unavailable(Arc::new(CircuitOpen {
                retry_after_ms: retry_after.as_millis(),
            }))
        })?;
        let out = call.await;
        match &out {
            Err(e) if counts(e) => ticket.failed(),
            _ => ticket.succeeded(),
        }
        out
    }
}

#[async_trait]
impl Kms for GuardedKms {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }

    fn default_key_id(&self) -> &str {
        self.inner.default_key_id()
    }

    fn open_breakers(&self) -> usize {
        self.map().values().filter(|b| b.is_open()).count()
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        self.guarded(key_id, self.inner.generate_data_key(key_id, ctx))
            .await
    }

    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.guarded(key_id, self.inner.wrap(key_id, key, ctx))
            .await
    }

    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.guarded(key_id, self.inner.unwrap(key_id, wrapped, ctx))
            .await
    }

    async fn check(&self) -> Result<(), KmsError> {
        self.guarded(self.inner.default_key_id(), self.inner.check())
            .await
    }

    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        self.inner.canonical_key_id(key_id).await
    }

    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        self.inner
            .schedule_key_deletion(key_id, pending_window_days)
            .await
    }

    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        self.inner.create_epoch_key(epoch, store_tag).await
    }

    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        self.inner.key_status(key_id).await
    }

    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        self.inner.cancel_key_deletion(key_id).await
    }
}
