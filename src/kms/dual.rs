//! A second KMS for disaster recovery: every key fieldkey wraps is wrapped under a
//! primary KMS key and, where a secondary key is known for it, under a secondary KMS
//! key too (another AWS region, or AWS and OpenBao); the two wrapped forms are stored
//! together (`WrappedKey::dual`, docs/FORMAT.md §4.1).
//!
//! Unwrapping tries the primary. Only when the primary cannot answer (unavailable,
//! timed out, throttled, or its circuit breaker is open) does it try the secondary. A
//! primary that answers no (key disabled or pending deletion, access denied, wrong
//! context or altered bytes) is final: the secondary is never asked, so disabling or
//! deleting the primary key is not bypassed through the second wrapping.
//!
//! Which secondary key goes with a primary key: for the primary's default key, the
//! secondary's default key; for a key this KMS made ([`Kms::create_epoch_key`] makes
//! one on each side and names the pair `<primary>|dr=<secondary>`), the pair's own;
//! otherwise the configured `key_map`. A key with no secondary is wrapped under the
//! primary alone (a tenant's own key with no counterpart): the compliance report lists
//! which tenants have a second wrapping. Deletion, key states and cancellation apply to
//! both keys of a pair; a pair counts as gone only when both keys are.
//!
//! Does not: retry (each side has its own provider retries and breaker), or copy keys
//! wrapped before the secondary was configured (a KMS-key rewrap or the next epoch
//! roll wraps them under both).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::{DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};
use crate::crypto::SecretKey;

/// Separator of a key pair's id: `<primary>|dr=<secondary>`.
const PAIR_SEP: &str = "|dr=";

/// A primary KMS and its disaster-recovery secondary.
pub struct DualKms {
    primary: Arc<dyn Kms>,
    secondary: Arc<dyn Kms>,
    /// Primary key id -> secondary key id, besides the default keys and pairs.
    key_map: HashMap<String, String>,
    served_by_secondary: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for DualKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DualKms")
            .field("primary", &self.primary.provider())
            .field("secondary", &self.secondary.provider())
            .field("key_map", &self.key_map.len())
            .finish_non_exhaustive()
    }
}

/// The two halves of a pair id, if `key_id` is one.
pub fn split_pair(key_id: &str) -> Option<(&str, &str)> {
    key_id
        .split_once(PAIR_SEP)
        .filter(|(p, s)| !p.is_empty() && !s.is_empty())
}

/// The id of a key pair.
pub fn pair_id(primary: &str, secondary: &str) -> String {
    format!("{primary}{PAIR_SEP}{secondary}")
}

/// The more alive of two key states: a pair is only as gone as its more alive key.
fn more_alive(a: KeyStatus, b: KeyStatus) -> KeyStatus {
    let rank = |s: &KeyStatus| match s {
        KeyStatus::Enabled => 3,
        KeyStatus::Disabled => 2,
        KeyStatus::PendingDeletion { .. } => 1,
        KeyStatus::Deleted => 0,
    };
    match (&a, &b) {
        (
            KeyStatus::PendingDeletion {
                deletion_date_unix_ms: x,
            },
            KeyStatus::PendingDeletion {
                deletion_date_unix_ms: y,
            },
        ) => KeyStatus::PendingDeletion {
            // The later date: the pair is gone when both are.
            deletion_date_unix_ms: match (x, y) {
                (Some(x), Some(y)) => Some((*x).max(*y)),
                _ => None,
            },
        },
        _ if rank(&b) > rank(&a) => b,
        _ => a,
    }
}

impl DualKms {
    /// `primary` and `secondary`, each already behind its own metering and breakers.
    /// `key_map`: primary key ids (as stored) to their secondary counterparts.
    pub fn new(
        primary: Arc<dyn Kms>,
        secondary: Arc<dyn Kms>,
        key_map: HashMap<String, String>,
    ) -> Self {
        Self {
            primary,
            secondary,
            key_map,
            served_by_secondary: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Unwraps served by the secondary because the primary could not answer.
    pub fn served_by_secondary(&self) -> u64 {
        self.served_by_secondary
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `(primary key, secondary key if any)` for a key id as stored.
    fn keys<'a>(&'a self, key_id: &'a str) -> (&'a str, Option<&'a str>) {
        if let Some((p, s)) = split_pair(key_id) {
            return (p, Some(s));
        }
        if key_id == self.primary.default_key_id() {
            return (key_id, Some(self.secondary.default_key_id()));
        }
        (key_id, self.key_map.get(key_id).map(String::as_str))
    }

    /// The secondary's wrapped form of `key` beside the primary's.
    async fn pair_wrapped(
        &self,
        primary: WrappedKey,
        secondary_key: Option<&str>,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let Some(sk) = secondary_key else {
            return Ok(primary);
        };
        // Both or neither: a key that only the primary wraps would be lost with the
        // primary region, which is what the second wrapping promises against.
        let second = self.secondary.wrap(sk, key, ctx).await?;
        WrappedKey::dual(primary.as_bytes(), sk, second.as_bytes()).ok_or(KmsError::Rejected {
            code: "wrapped key too long to pair".into(),
        })
    }
}

#[async_trait]
impl Kms for DualKms {
    fn provider(&self) -> &'static str {
        self.primary.provider()
    }

    fn default_key_id(&self) -> &str {
        self.primary.default_key_id()
    }

    fn open_breakers(&self) -> usize {
        self.primary.open_breakers() + self.secondary.open_breakers()
    }

    fn dr_unwraps(&self) -> u64 {
        self.served_by_secondary()
    }

    fn wraps_twice(&self, key_id: &str) -> bool {
        self.keys(key_id).1.is_some()
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        let (pk, sk) = self.keys(key_id);
        let dk = self.primary.generate_data_key(pk, ctx).await?;
        let wrapped = self.pair_wrapped(dk.wrapped, sk, &dk.secret, ctx).await?;
        Ok(DataKey {
            secret: dk.secret,
            wrapped,
        })
    }

    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let (pk, sk) = self.keys(key_id);
        let first = self.primary.wrap(pk, key, ctx).await?;
        self.pair_wrapped(first, sk, key, ctx).await
    }

    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        let (pk, expected) = self.keys(key_id);
        let Some(parts) = wrapped.split_dual() else {
            return self.primary.unwrap(pk, wrapped, ctx).await;
        };
        let first = WrappedKey::new(parts.primary.to_vec());
        match self.primary.unwrap(pk, &first, ctx).await {
            // Only to the secondary key this primary key pairs with: the key id in the
            // stored bytes is not trusted to choose one (a writer of the key store could
            // otherwise point failovers at any key the secondary identity may use).
            Err(e) if e.is_unavailable() && expected != Some(parts.secondary_key_id) => {
                tracing::warn!(
                    kms_key_id = pk,
                    stored_secondary = parts.secondary_key_id,
                    "primary KMS unavailable; the stored second wrapping names another secondary key than this key's counterpart: not used"
                );
                Err(e)
            }
            Err(e) if e.is_unavailable() => {
                let second = WrappedKey::new(parts.secondary.to_vec());
                match self
                    .secondary
                    .unwrap(parts.secondary_key_id, &second, ctx)
                    .await
                {
                    Ok(key) => {
                        self.served_by_secondary
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(kms_key_id = pk, secondary_key_id = parts.secondary_key_id, error = %e,
                            "primary KMS unavailable: key unwrapped by the disaster-recovery KMS");
                        Ok(key)
                    }
                    Err(e2) => {
                        tracing::warn!(kms_key_id = pk, secondary_key_id = parts.secondary_key_id, error = %e2,
                            "primary KMS unavailable and the disaster-recovery KMS failed too");
                        Err(e)
                    }
                }
            }
            other => other,
        }
    }

    /// Ready when either side can serve: with the primary down, cache misses go to the
    /// secondary (the metrics and logs say so).
    async fn check(&self) -> Result<(), KmsError> {
        match self.primary.check().await {
            Err(e) if e.is_unavailable() => {
                self.secondary.check().await.map_err(|_| e)?;
                tracing::warn!("primary KMS unavailable; the disaster-recovery KMS answers");
                Ok(())
            }
            other => other,
        }
    }

    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        match split_pair(key_id) {
            Some((p, s)) => Ok(pair_id(
                &self.primary.canonical_key_id(p).await?,
                &self.secondary.canonical_key_id(s).await?,
            )),
            None => self.primary.canonical_key_id(key_id).await,
        }
    }

    /// Both keys of the pair (the secondary first only matters for the result: the
    /// primary's answer is reported). Idempotent on each side, so a retry after a
    /// partial failure completes it.
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        let (pk, sk) = self.keys(key_id);
        // A primary key already deleted (an earlier attempt's window ended before the
        // secondary could be scheduled) must not stop the secondary's deletion.
        let first = match self
            .primary
            .schedule_key_deletion(pk, pending_window_days)
            .await
        {
            Ok(d) => Some(d),
            Err(KmsError::KeyNotFound { .. }) if sk.is_some() => None,
            Err(e) => return Err(e),
        };
        let second = match sk {
            Some(sk) => match self
                .secondary
                .schedule_key_deletion(sk, pending_window_days)
                .await
            {
                Ok(d) => Some(d),
                Err(KmsError::KeyNotFound { .. }) => None,
                Err(e) => return Err(e),
            },
            None => None,
        };
        first.or(second).ok_or_else(|| KmsError::KeyNotFound {
            key_id: key_id.to_owned(),
        })
    }

    /// A key on each side, named as a pair. If the secondary cannot make one, the
    /// primary's new key is scheduled for deletion at once (best effort) and the call
    /// fails: the roll tries again.
    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        let p = self.primary.create_epoch_key(epoch, store_tag).await?;
        match self.secondary.create_epoch_key(epoch, store_tag).await {
            Ok(s) => Ok(pair_id(&p, &s)),
            Err(e) => {
                if let Err(e2) = self.primary.schedule_key_deletion(&p, 7).await {
                    tracing::warn!(kms_key_id = %p, error = %e2, "could not delete an unpaired epoch key");
                }
                Err(e)
            }
        }
    }

    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        let (pk, sk) = self.keys(key_id);
        let first = self.primary.key_status(pk).await?;
        match sk {
            Some(sk) => Ok(more_alive(first, self.secondary.key_status(sk).await?)),
            None => Ok(first),
        }
    }

    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        let (pk, sk) = self.keys(key_id);
        self.primary.cancel_key_deletion(pk).await?;
        if let Some(sk) = sk {
            self.secondary.cancel_key_deletion(sk).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ids_and_framing_round_trip() {
        assert_eq!(
            split_pair(&pair_id("arn:a/b", "k-2")),
            Some(("arn:a/b", "k-2"))
        );
        assert_eq!(split_pair("plain"), None);
        assert_eq!(split_pair("|dr=x"), None);
        let w = WrappedKey::dual(b"first", "dr-key", b"second")
            .unwrap_or_else(|| WrappedKey::new(vec![]));
        let parts = w.split_dual();
        assert_eq!(
            parts,
            Some(crate::model::DualWrap {
                primary: b"first",
                secondary_key_id: "dr-key",
                secondary: b"second",
            })
        );
        // Truncated anywhere: not a pair (so the primary refuses the bytes).
        for n in 0..w.as_bytes().len() - b"second".len() {
            let cut = WrappedKey::new(w.as_bytes()[..n].to_vec());
            assert!(cut.split_dual().is_none(), "{n}");
        }
        assert!(!WrappedKey::new(b"vault:v1:abc".to_vec()).has_second_wrapping());
    }

    #[test]
    fn a_pair_is_as_alive_as_its_more_alive_key() {
        let pending = |d| KeyStatus::PendingDeletion {
            deletion_date_unix_ms: Some(d),
        };
        assert_eq!(
            more_alive(KeyStatus::Deleted, KeyStatus::Enabled),
            KeyStatus::Enabled
        );
        assert_eq!(more_alive(pending(5), KeyStatus::Deleted), pending(5));
        assert_eq!(more_alive(pending(5), pending(9)), pending(9));
        assert_eq!(
            more_alive(KeyStatus::Deleted, KeyStatus::Deleted),
            KeyStatus::Deleted
        );
    }
}
