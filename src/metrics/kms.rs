//! The KMS decorator that counts and times every KMS call by operation and outcome.
//!
//! Owns: [`MeteredKms`] and the mapping of a KMS result to an outcome label. Does not:
//! change a call's arguments or result, retry, or time out (the KMS client does).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;

use super::Metrics;
use crate::crypto::SecretKey;
use crate::kms::{DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct KmsOpOutcome {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct KmsOp {
    op: &'static str,
}

/// A KMS that counts and times every call of the one it wraps.
pub struct MeteredKms {
    inner: Arc<dyn Kms>,
    metrics: Arc<Metrics>,
}

impl MeteredKms {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Kms>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, KmsError>>,
    ) -> Result<T, KmsError> {
        let started = Instant::now();
        let r = f.await;
        let outcome = match &r {
            Ok(_) => "ok",
            Err(KmsError::Unavailable(_) | KmsError::Timeout) => "unavailable",
            Err(KmsError::Throttled) => "throttled",
            Err(_) => "error",
        };
        self.metrics
            .kms_calls
            .get_or_create(&KmsOpOutcome { op, outcome })
            .inc();
        self.metrics
            .kms_latency
            .get_or_create(&KmsOp { op })
            .observe(started.elapsed());
        r
    }
}

#[async_trait]
impl Kms for MeteredKms {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
    fn default_key_id(&self) -> &str {
        self.inner.default_key_id()
    }
    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        self.timed(
            "generate_data_key",
            self.inner.generate_data_key(key_id, ctx),
        )
        .await
    }
    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.timed("wrap", self.inner.wrap(key_id, key, ctx)).await
    }
    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.timed("unwrap", self.inner.unwrap(key_id, wrapped, ctx))
            .await
    }
    async fn check(&self) -> Result<(), KmsError> {
        self.timed("check", self.inner.check()).await
    }
    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        self.timed("describe", self.inner.canonical_key_id(key_id))
            .await
    }
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        self.timed(
            "schedule_key_deletion",
            self.inner
                .schedule_key_deletion(key_id, pending_window_days),
        )
        .await
    }
    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        self.timed("create_key", self.inner.create_epoch_key(epoch, store_tag))
            .await
    }
    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        self.timed("describe", self.inner.key_status(key_id)).await
    }
    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        self.timed(
            "cancel_key_deletion",
            self.inner.cancel_key_deletion(key_id),
        )
        .await
    }
}
