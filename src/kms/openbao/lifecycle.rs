//! Key lifecycle on OpenBao Transit: epoch keys, deletion with a waiting period, key
//! states, and the sweep that deletes keys whose window is over.
//!
//! Transit has a soft delete (`DELETE <mount>/keys/<key>/soft-delete`: every use is
//! refused with 400 "refusing to use soft-deleted key"; `POST .../soft-delete-restore`
//! undoes it) but keeps no deletion date. The date lives in a KV v2 record on the same
//! server (`<records mount>/data/<records path>/<mount>/<key>`), written after the soft
//! delete and removed before a restore, so a crash between the two steps leaves a key
//! refused (never one deleted early). When the date has passed, whoever looks first
//! (a use of the key, `key_status`, `cancel_key_deletion`, a deletion, an epoch-key
//! creation, `connect`, or the readiness check's periodic sweep) deletes the key for
//! good (`deletion_allowed`, then `DELETE <mount>/keys/<key>`). The sweep deletes only
//! keys that are soft-deleted: a record cannot destroy a key in use.
//!
//! What it does NOT protect against: anyone with the right to restore Transit keys
//! (a root token) can undo a soft delete within the window; anyone who can write the
//! KV records can move a date; OpenBao's storage snapshots hold the key material until
//! they expire, hard-deleted or not.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::errors::Refusal;
use super::settings::is_key_name;
use super::{Inner, KEY_TYPE, not_found};
use crate::kms::{KeyDeletion, KeyStatus, KmsError};
use crate::model::now_ms;

const RECORD_FORMAT: &str = "fieldkey-openbao-deletion/v1";
const MAX_WINDOW_DAYS: u32 = 30;
const DAY_MS: i64 = 86_400_000;

/// A key's deletion date, as kept in KV v2.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    format: String,
    mount: String,
    key: String,
    deletion_date_unix_ms: i64,
    scheduled_at_unix_ms: i64,
    pending_window_days: u32,
    /// Tells this writer's record from a concurrent writer's.
    write_id: String,
}

impl Record {
    fn due(&self) -> bool {
        now_ms() >= self.deletion_date_unix_ms
    }
}

/// A record read from KV v2 and the current version of its entry (for check-and-set).
struct Stored {
    record: Option<Record>,
    version: u64,
}

impl Inner {
    fn record_path(&self, key: &str) -> String {
        format!("{}/{}/{key}", self.records_path, self.mount)
    }

    async fn read_record(&self, key: &str) -> Result<Stored, KmsError> {
        #[derive(Deserialize)]
        struct Answer {
            data: Option<Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            data: Option<serde_json::Value>,
            metadata: Option<Meta>,
        }
        #[derive(Deserialize)]
        struct Meta {
            #[serde(default)]
            version: u64,
        }
        let path = format!("{}/data/{}", self.records_mount, self.record_path(key));
        let reply = self
            .call(self.deadline(), Method::GET, &path, None, key)
            .await?;
        if (!reply.ok() && reply.status != 404) || errors_say_no_route(&reply) {
            return Err(record_refusal(&reply, key, &path));
        }
        // A 404 may still carry the entry's metadata (its latest version deleted).
        let entry = serde_json::from_slice::<Answer>(&reply.body)
            .ok()
            .and_then(|a| a.data);
        let version = entry
            .as_ref()
            .and_then(|e| e.metadata.as_ref())
            .map_or(0, |m| m.version);
        let record = match entry.and_then(|e| e.data) {
            Some(v) if reply.ok() => {
                let r: Record = serde_json::from_value(v).map_err(|e| {
                    KmsError::Misconfigured(format!("OpenBao deletion record {path}: {e}"))
                })?;
                if r.format != RECORD_FORMAT || r.key != key || r.mount != self.mount {
                    return Err(KmsError::Misconfigured(format!(
                        "OpenBao deletion record {path} is not for key {key} of mount {}",
                        self.mount
                    )));
                }
                Some(r)
            }
            _ => None,
        };
        Ok(Stored { record, version })
    }

    /// Writes `record` if the entry is still at `version` (KV check-and-set). `Err` of
    /// the record that won a race otherwise.
    async fn write_record(
        &self,
        record: &Record,
        version: u64,
    ) -> Result<Result<(), Record>, KmsError> {
        let key = record.key.as_str();
        let path = format!("{}/data/{}", self.records_mount, self.record_path(key));
        let body = serde_json::to_vec(&serde_json::json!({
            "options": { "cas": version },
            "data": record,
        }))
        .map_err(|e| KmsError::Misconfigured(format!("cannot encode a deletion record: {e}")))?;
        let reply = self
            .call(self.deadline(), Method::POST, &path, Some(body.into()), key)
            .await?;
        if reply.ok() {
            return Ok(Ok(()));
        }
        match Self::refusal(&reply, key, &path) {
            (Refusal::CasMismatch, e) => match self.read_record(key).await?.record {
                // Our own write, answered late and retried.
                Some(r) if r.write_id == record.write_id => Ok(Ok(())),
                Some(r) => Ok(Err(r)),
                None => Err(e),
            },
            _ => Err(record_refusal(&reply, key, &path)),
        }
    }

    async fn remove_record(&self, key: &str) -> Result<(), KmsError> {
        let path = format!("{}/metadata/{}", self.records_mount, self.record_path(key));
        let reply = self
            .call(self.deadline(), Method::DELETE, &path, None, key)
            .await?;
        if reply.ok() || (reply.status == 404 && !errors_say_no_route(&reply)) {
            return Ok(());
        }
        Err(record_refusal(&reply, key, &path))
    }

    /// A call that must succeed (or find the key gone, if `gone_ok`).
    async fn key_call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        key: &str,
        gone_ok: bool,
    ) -> Result<(), KmsError> {
        let body = body.map(|b| bytes::Bytes::from(b.to_string()));
        let reply = self.call(self.deadline(), method, path, body, key).await?;
        if reply.ok() {
            return Ok(());
        }
        match Self::refusal(&reply, key, path) {
            (Refusal::KeyNotFound, _) if gone_ok => Ok(()),
            (_, e) => Err(e),
        }
    }

    async fn soft_delete(&self, key: &str) -> Result<(), KmsError> {
        let path = format!("{}/keys/{key}/soft-delete", self.mount);
        self.key_call(Method::DELETE, &path, None, key, false).await
    }

    async fn restore(&self, key: &str) -> Result<(), KmsError> {
        let path = format!("{}/keys/{key}/soft-delete-restore", self.mount);
        self.key_call(Method::POST, &path, None, key, false).await
    }

    /// Deletes a soft-deleted `key` for good, then its record.
    async fn hard_delete(&self, key: &str) -> Result<(), KmsError> {
        let config = format!("{}/keys/{key}/config", self.mount);
        self.key_call(
            Method::POST,
            &config,
            Some(serde_json::json!({ "deletion_allowed": true })),
            key,
            true,
        )
        .await?;
        let path = format!("{}/keys/{key}", self.mount);
        self.key_call(Method::DELETE, &path, None, key, true)
            .await?;
        self.forget(key);
        self.remove_record(key).await?;
        tracing::info!(key_id = key, mount = %self.mount, "OpenBao Transit key deleted for good (its deletion window is over)");
        Ok(())
    }

    /// The error for a use of soft-deleted `key`: [`KmsError::KeyNotFound`] once its
    /// window is over (it is deleted now), else [`KmsError::KeyInvalidState`].
    pub(super) async fn soft_deleted(&self, key: &str) -> KmsError {
        self.forget(key);
        match self.read_record(key).await {
            Ok(Stored {
                record: Some(r), ..
            }) if r.due() => match self.hard_delete(key).await {
                Ok(()) => not_found(key),
                Err(e) => {
                    tracing::warn!(key_id = key, error = %e, "OpenBao: cannot delete a key past its deletion date");
                    invalid_state(key)
                }
            },
            Ok(_) => invalid_state(key),
            Err(e) => {
                tracing::warn!(key_id = key, error = %e, "OpenBao: cannot read a key's deletion record");
                invalid_state(key)
            }
        }
    }

    /// Like AWS: the key refuses every use at once and is deleted when the window ends
    /// (0 days: now). Idempotent: a key already pending reports its date.
    pub(super) async fn schedule_deletion(
        &self,
        key: &str,
        days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        if days > MAX_WINDOW_DAYS {
            return Err(KmsError::Misconfigured(format!(
                "OpenBao key deletion window must be 0..={MAX_WINDOW_DAYS} days"
            )));
        }
        if !is_key_name(key) {
            return Err(not_found(key));
        }
        self.sweep_logged().await;
        let info = self
            .key_info(key, self.deadline())
            .await?
            .ok_or_else(|| not_found(key))?;
        let stored = self.read_record(key).await?;
        if info.soft_deleted {
            if let Some(r) = stored.record {
                if r.due() {
                    self.hard_delete(key).await?;
                    return Err(not_found(key));
                }
                return Ok(KeyDeletion::AlreadyPending {
                    deletion_date_unix_ms: Some(r.deletion_date_unix_ms),
                });
            }
            // Soft-deleted by hand, or a crash before the record: give it its date.
        } else {
            self.soft_delete(key).await?;
        }
        self.forget(key);
        let now = now_ms();
        let record = Record {
            format: RECORD_FORMAT.into(),
            mount: self.mount.clone(),
            key: key.to_owned(),
            deletion_date_unix_ms: now.saturating_add(i64::from(days).saturating_mul(DAY_MS)),
            scheduled_at_unix_ms: now,
            pending_window_days: days,
            write_id: hex::encode(random::<12>()?),
        };
        if let Err(theirs) = self.write_record(&record, stored.version).await? {
            return Ok(KeyDeletion::AlreadyPending {
                deletion_date_unix_ms: Some(theirs.deletion_date_unix_ms),
            });
        }
        tracing::info!(key_id = key, mount = %self.mount, days, "OpenBao Transit key soft-deleted; deletion scheduled");
        if days == 0 {
            self.hard_delete(key).await?;
        }
        Ok(KeyDeletion::Scheduled {
            pending_window_days: days,
            deletion_date_unix_ms: Some(record.deletion_date_unix_ms),
        })
    }

    pub(super) async fn status(&self, key: &str) -> Result<KeyStatus, KmsError> {
        if !is_key_name(key) {
            return Ok(KeyStatus::Deleted);
        }
        let Some(info) = self.key_info(key, self.deadline()).await? else {
            return Ok(KeyStatus::Deleted);
        };
        if !info.soft_deleted {
            return Ok(KeyStatus::Enabled);
        }
        Ok(match self.read_record(key).await?.record {
            Some(r) if r.due() => {
                self.hard_delete(key).await?;
                KeyStatus::Deleted
            }
            Some(r) => KeyStatus::PendingDeletion {
                deletion_date_unix_ms: Some(r.deletion_date_unix_ms),
            },
            None => KeyStatus::PendingDeletion {
                deletion_date_unix_ms: None,
            },
        })
    }

    /// Restores a key pending deletion (its record goes first: a crash in between
    /// leaves it refused, never deleted later).
    pub(super) async fn cancel_deletion(&self, key: &str) -> Result<(), KmsError> {
        if !is_key_name(key) {
            return Err(not_found(key));
        }
        let info = self
            .key_info(key, self.deadline())
            .await?
            .ok_or_else(|| not_found(key))?;
        if !info.soft_deleted {
            return Ok(());
        }
        if let Some(r) = self.read_record(key).await?.record {
            if r.due() {
                self.hard_delete(key).await?;
                return Err(not_found(key));
            }
            self.remove_record(key).await?;
        }
        self.restore(key).await?;
        tracing::info!(key_id = key, mount = %self.mount, "OpenBao Transit key deletion cancelled; key restored");
        Ok(())
    }

    /// A new derived `aes256-gcm96` key named `fieldkey-<store>-epoch-<n>-<random>`,
    /// checked to be free first: an existing key is never adopted (it could be another
    /// store's, whose deletion this store would then schedule).
    pub(super) async fn create_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        self.sweep_logged().await;
        let tag = sanitize_tag(store_tag);
        for _ in 0..3 {
            let name = format!(
                "fieldkey-{tag}-epoch-{epoch}-{}",
                hex::encode(random::<8>()?)
            );
            if self.key_info(&name, self.deadline()).await?.is_some() {
                continue;
            }
            let path = format!("{}/keys/{name}", self.mount);
            self.key_call(
                Method::POST,
                &path,
                Some(serde_json::json!({
                    "type": KEY_TYPE,
                    "derived": true,
                    "exportable": false,
                    "allow_plaintext_backup": false,
                })),
                &name,
                false,
            )
            .await?;
            let info = self
                .key_info(&name, self.deadline())
                .await?
                .ok_or_else(|| not_found(&name))?;
            self.usable(&name, &info).await?;
            tracing::info!(key_id = %name, epoch, mount = %self.mount, "OpenBao: created an epoch key");
            return Ok(name);
        }
        Err(KmsError::Rejected {
            code: "openbao: no free epoch key name after 3 tries".into(),
        })
    }

    /// Deletes every soft-deleted key whose record's date has passed; removes records
    /// of keys that are gone or were restored by hand. Returns how many keys it deleted.
    pub(super) async fn sweep(&self) -> Result<usize, KmsError> {
        #[derive(Deserialize)]
        struct Answer {
            data: Keys,
        }
        #[derive(Deserialize)]
        struct Keys {
            #[serde(default)]
            keys: Vec<String>,
        }
        let path = format!(
            "{}/metadata/{}/{}?list=true",
            self.records_mount, self.records_path, self.mount
        );
        let reply = self
            .call(
                self.deadline(),
                Method::GET,
                &path,
                None,
                "(deletion records)",
            )
            .await?;
        if reply.status == 404 && !errors_say_no_route(&reply) {
            return Ok(0);
        }
        if !reply.ok() {
            return Err(record_refusal(&reply, "(deletion records)", &path));
        }
        let mut deleted = 0;
        for key in reply.json::<Answer>("record list")?.data.keys {
            if !is_key_name(&key) {
                continue; // a folder (another mount's records below this one) or junk
            }
            match self.sweep_one(&key).await {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(key_id = %key, error = %e, "OpenBao: sweep could not settle a key's deletion");
                }
            }
        }
        Ok(deleted)
    }

    async fn sweep_one(&self, key: &str) -> Result<bool, KmsError> {
        let Some(r) = self.read_record(key).await?.record else {
            return Ok(false);
        };
        if !r.due() {
            return Ok(false);
        }
        match self.key_info(key, self.deadline()).await? {
            None => {
                self.remove_record(key).await?;
                Ok(false)
            }
            Some(i) if i.soft_deleted => {
                self.hard_delete(key).await?;
                Ok(true)
            }
            Some(_) => {
                tracing::warn!(
                    key_id = key,
                    "OpenBao: a key past its deletion date was restored outside fieldkey; its deletion record is dropped"
                );
                self.remove_record(key).await?;
                Ok(false)
            }
        }
    }

    /// [`Inner::sweep`], its failure logged (the sweep is never a caller's failure).
    pub(super) async fn sweep_logged(&self) {
        if let Ok(mut last) = self.last_sweep.lock() {
            *last = Some(Instant::now());
        }
        match self.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deleted = n,
                "OpenBao: keys past their deletion date deleted"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "OpenBao: cannot sweep keys past their deletion date")
            }
        }
    }

    /// Starts a background sweep if the last one is older than the sweep interval and
    /// none is running.
    pub(super) fn maybe_sweep(this: &Arc<Inner>) {
        let Some(every) = this.sweep_interval else {
            return;
        };
        let due = this
            .last_sweep
            .lock()
            .map(|l| l.is_none_or(|t| t.elapsed() >= every))
            .unwrap_or(false);
        if !due || this.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = this.clone();
        tokio::spawn(async move {
            inner.sweep_logged().await;
            inner.sweeping.store(false, Ordering::SeqCst);
        });
    }
}

/// The error of a refused call on the deletion records: a 403 there is the policy's
/// gap, not a refusal of the key.
fn record_refusal(reply: &super::client::Reply, key: &str, path: &str) -> KmsError {
    match Inner::refusal(reply, key, path) {
        (Refusal::AccessDenied, _) => KmsError::Misconfigured(format!(
            "the OpenBao token may not use the deletion records at {path} (kms.openbao.deletion_records_*; see the policy)"
        )),
        (_, e) => e,
    }
}

fn invalid_state(key: &str) -> KmsError {
    KmsError::KeyInvalidState {
        key_id: key.to_owned(),
    }
}

fn errors_say_no_route(reply: &super::client::Reply) -> bool {
    super::errors::classify(reply.status, &reply.errors()) == Refusal::NoRoute
}

fn random<const N: usize>() -> Result<[u8; N], KmsError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|_| KmsError::Misconfigured("system random number generator failed".into()))?;
    Ok(b)
}

/// A store tag as a key-name part: `[A-Za-z0-9_-]`, other characters as `-`, at most
/// 48 characters, `store` if nothing is left.
fn sanitize_tag(tag: &str) -> String {
    let t: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let t = t.trim_matches('-');
    if t.is_empty() {
        "store".into()
    } else {
        t.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_tags_become_name_parts() {
        assert_eq!(sanitize_tag("prod-eu_1"), "prod-eu_1");
        assert_eq!(sanitize_tag("a/b c"), "a-b-c");
        assert_eq!(sanitize_tag("../"), "store");
        assert_eq!(sanitize_tag(""), "store");
        assert_eq!(sanitize_tag(&"x".repeat(100)).len(), 48);
        assert!(is_key_name(&format!(
            "fieldkey-{}-epoch-7-00ff",
            sanitize_tag("ünïcode")
        )));
    }
}
