//! The keys the local KMS makes (epoch keys) and the state of every key it has, kept
//! as files in a keys directory apart from the data directory (`docs/ERASURE.md` §6):
//! a managed key's material wrapped under the root key, its state (enabled, pending
//! deletion with a date) and its deletion when the waiting period ends. The root key's
//! own state (retired as the legacy epoch key) is a file without material.
//!
//! Does not: open the root key file or wrap data keys (the parent module does).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{LocalKms, rng_err, write_new_private_file};
use crate::crypto::{KEY_LEN, NONCE_LEN, SecretKey, TAG_LEN, Xaes256Gcm};
use crate::kms::{KeyDeletion, KeyStatus, KmsError};

impl LocalKms {
    /// Keeps the keys this KMS creates (epoch keys) and the state of its keys in
    /// `dir` (created, mode 0700). Keep it on other storage than the data directory.
    ///
    /// # Errors
    /// [`KmsError::Misconfigured`] if the directory cannot be created.
    pub fn with_keys_dir(mut self, dir: &Path) -> Result<Self, KmsError> {
        create_private_dir(dir)?;
        self.keys_dir = Some(dir.to_owned());
        self.sweep();
        Ok(self)
    }

    /// Deletes every key whose deletion window is over (at open, and whenever a key
    /// is created or scheduled for deletion: a sealed epoch key is not read again, so
    /// it would otherwise stay on disk, pending, past its date).
    pub(super) fn sweep(&self) {
        let Some(dir) = self.keys_dir.as_deref() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Err(e) = self.read_state(id) {
                tracing::warn!(key_id = id, error = %e, "local KMS: cannot check a key's deletion date");
            }
        }
    }

    /// The key-state directory, if any.
    pub fn keys_dir(&self) -> Option<&Path> {
        self.keys_dir.as_deref()
    }

    pub(super) fn keys_dir_or_err(&self) -> Result<&Path, KmsError> {
        self.keys_dir.as_deref().ok_or_else(|| {
            KmsError::Misconfigured(
                "the local KMS has no keys directory (kms.local_keys_dir)".into(),
            )
        })
    }

    /// The file of a managed key or of the root key's state, or `None` for an id this
    /// KMS cannot have made (no path tricks: ids are `[a-z0-9-]`).
    pub(super) fn key_file(&self, key_id: &str) -> Option<PathBuf> {
        let ok = !key_id.is_empty()
            && key_id.len() <= 128
            && key_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let dir = self.keys_dir.as_deref()?;
        ok.then(|| dir.join(format!("{key_id}.json")))
    }

    /// Reads a key's state file, applying a deletion whose waiting period is over.
    pub(super) fn read_state(&self, key_id: &str) -> Result<Option<KeyFile>, KmsError> {
        let Some(path) = self.key_file(key_id) else {
            return Ok(None);
        };
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(KmsError::Unavailable(std::sync::Arc::new(e)));
            }
        };
        let mut file: KeyFile = serde_json::from_slice(&raw).map_err(|e| {
            KmsError::Misconfigured(format!("local KMS key file {}: {e}", path.display()))
        })?;
        if file.format != KEY_FILE_FORMAT || file.key_id != key_id {
            return Err(KmsError::Misconfigured(format!(
                "local KMS key file {} is not for key {key_id}",
                path.display()
            )));
        }
        if file.state == LocalKeyState::PendingDeletion
            && file
                .deletion_date_unix_ms
                .is_some_and(|d| crate::model::now_ms() >= d)
        {
            // The waiting period is over: delete for good. A managed key's file goes
            // (and its material with it); the root key's state says deleted.
            if key_id == self.key_id {
                file.state = LocalKeyState::Deleted;
                write_replace_private_file(&path, &encode_json(&file)?)?;
            } else {
                remove_file_durably(&path)?;
                return Ok(None);
            }
        }
        Ok(Some(file))
    }

    /// The cipher that wraps under `key_id`, if the key is usable.
    pub(super) fn cipher(&self, key_id: &str) -> Result<KeyCipher<'_>, KmsError> {
        let not_found = || KmsError::KeyNotFound {
            key_id: key_id.to_owned(),
        };
        let state = self.read_state(key_id)?;
        match state.as_ref().map(|f| f.state) {
            Some(LocalKeyState::PendingDeletion) => {
                return Err(KmsError::KeyInvalidState {
                    key_id: key_id.to_owned(),
                });
            }
            Some(LocalKeyState::Deleted) => return Err(not_found()),
            Some(LocalKeyState::Enabled) | None => {}
        }
        if key_id == self.key_id {
            return Ok(KeyCipher::Root(&self.root));
        }
        let file = state.ok_or_else(not_found)?;
        let bad = || KmsError::Misconfigured(format!("local KMS key file of {key_id} is corrupt"));
        let nonce: [u8; NONCE_LEN] = STANDARD
            .decode(file.nonce.as_deref().unwrap_or_default())
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(bad)?;
        let body = STANDARD
            .decode(file.wrapped_key.as_deref().unwrap_or_default())
            .map_err(|_| bad())?;
        if body.len() != KEY_LEN + TAG_LEN {
            return Err(bad());
        }
        let (ct, tag) = body.split_at(KEY_LEN);
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| bad())?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(ct);
        self.root
            .decrypt_in_place_detached(&nonce, &managed_key_ad(key_id), key.as_mut(), &tag)
            .map_err(|_| bad())?;
        Ok(KeyCipher::Managed(Box::new(Xaes256Gcm::new(&key))))
    }

    pub(super) fn set_state(
        &self,
        key_id: &str,
        state: LocalKeyState,
        deletion_date_unix_ms: Option<i64>,
    ) -> Result<(), KmsError> {
        let path = self.key_file(key_id).ok_or_else(|| KmsError::KeyNotFound {
            key_id: key_id.to_owned(),
        })?;
        let mut file = match self.read_state(key_id)? {
            Some(f) => f,
            None if key_id == self.key_id => KeyFile::root_state(key_id),
            None => {
                return Err(KmsError::KeyNotFound {
                    key_id: key_id.to_owned(),
                });
            }
        };
        file.state = state;
        file.deletion_date_unix_ms = deletion_date_unix_ms;
        write_replace_private_file(&path, &encode_json(&file)?)
    }

    /// Like AWS: the key refuses every use at once and is deleted when the waiting
    /// period ends (0 days: now). The root key's deletion (it is also the legacy
    /// epoch key) stops it wrapping data; it still protects the keys this KMS made.
    pub(super) fn schedule_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        self.keys_dir_or_err()?;
        self.sweep();
        if pending_window_days > 30 {
            return Err(KmsError::Misconfigured(
                "local KMS key deletion window must be 0..=30 days".into(),
            ));
        }
        match self.read_state(key_id)? {
            Some(f) if f.state == LocalKeyState::PendingDeletion => {
                return Ok(KeyDeletion::AlreadyPending {
                    deletion_date_unix_ms: f.deletion_date_unix_ms,
                });
            }
            Some(f) if f.state == LocalKeyState::Deleted => {
                return Err(KmsError::KeyNotFound {
                    key_id: key_id.to_owned(),
                });
            }
            None if key_id != self.key_id => {
                return Err(KmsError::KeyNotFound {
                    key_id: key_id.to_owned(),
                });
            }
            _ => {}
        }
        let date = crate::model::now_ms()
            .saturating_add(i64::from(pending_window_days).saturating_mul(86_400_000));
        self.set_state(key_id, LocalKeyState::PendingDeletion, Some(date))?;
        if pending_window_days == 0 {
            // Applies the deletion now.
            self.read_state(key_id)?;
        }
        Ok(KeyDeletion::Scheduled {
            pending_window_days,
            deletion_date_unix_ms: Some(date),
        })
    }

    pub(super) fn create_managed_key(
        &self,
        epoch: u64,
        store_tag: &str,
    ) -> Result<String, KmsError> {
        let _ = store_tag;
        let dir = self.keys_dir_or_err()?;
        self.sweep();
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(rng_err)?;
        let key_id = format!("local-epoch-{epoch}-{}", hex::encode(id));
        let key = SecretKey::generate().map_err(rng_err)?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(rng_err)?;
        let mut body = Zeroizing::new(key.expose().to_vec());
        let tag = self
            .root
            .encrypt_in_place_detached(&nonce, &managed_key_ad(&key_id), body.as_mut_slice())
            .map_err(|_| KmsError::Misconfigured("cannot seal a local KMS key".into()))?;
        let mut wrapped = body.to_vec();
        wrapped.extend_from_slice(&tag);
        let file = KeyFile {
            format: KEY_FILE_FORMAT.into(),
            key_id: key_id.clone(),
            state: LocalKeyState::Enabled,
            deletion_date_unix_ms: None,
            created_at_unix_ms: crate::model::now_ms(),
            nonce: Some(STANDARD.encode(nonce)),
            wrapped_key: Some(STANDARD.encode(&wrapped)),
        };
        let path = dir.join(format!("{key_id}.json"));
        write_new_private_file(&path, &encode_json(&file)?)?;
        sync_parent(&path)?;
        tracing::info!(key_id, epoch, "local KMS: created an epoch key");
        Ok(key_id)
    }

    pub(super) fn managed_key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        Ok(match self.read_state(key_id)? {
            Some(f) => match f.state {
                LocalKeyState::Enabled => KeyStatus::Enabled,
                LocalKeyState::PendingDeletion => KeyStatus::PendingDeletion {
                    deletion_date_unix_ms: f.deletion_date_unix_ms,
                },
                LocalKeyState::Deleted => KeyStatus::Deleted,
            },
            None if key_id == self.key_id => KeyStatus::Enabled,
            None => KeyStatus::Deleted,
        })
    }

    pub(super) fn cancel_managed_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        match self.read_state(key_id)? {
            Some(f) if f.state == LocalKeyState::PendingDeletion => {
                self.set_state(key_id, LocalKeyState::Enabled, None)
            }
            Some(f) if f.state == LocalKeyState::Enabled => Ok(()),
            None if key_id == self.key_id => Ok(()),
            _ => Err(KmsError::KeyNotFound {
                key_id: key_id.to_owned(),
            }),
        }
    }
}

/// The cipher of one key: the root key's (borrowed) or a managed key's.
pub(super) enum KeyCipher<'a> {
    Root(&'a Xaes256Gcm),
    Managed(Box<Xaes256Gcm>),
}

impl KeyCipher<'_> {
    pub(super) fn get(&self) -> &Xaes256Gcm {
        match self {
            KeyCipher::Root(c) => c,
            KeyCipher::Managed(c) => c,
        }
    }
}

pub(super) const KEY_FILE_FORMAT: &str = "fieldkey-local-kms-key/v1";

pub(super) const MANAGED_KEY_AD_LABEL: &[u8] = b"fieldkey/v1 local-kms-key";

pub(super) fn managed_key_ad(key_id: &str) -> Vec<u8> {
    let mut ad = MANAGED_KEY_AD_LABEL.to_vec();
    ad.extend_from_slice(
        &u16::try_from(key_id.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    ad.extend_from_slice(key_id.as_bytes());
    ad
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum LocalKeyState {
    Enabled,
    PendingDeletion,
    Deleted,
}

/// A key made by this KMS (material wrapped under the root key), or the state of the
/// root key itself (no material).
#[derive(Serialize, Deserialize)]
pub(super) struct KeyFile {
    format: String,
    key_id: String,
    state: LocalKeyState,
    deletion_date_unix_ms: Option<i64>,
    created_at_unix_ms: i64,
    nonce: Option<String>,
    wrapped_key: Option<String>,
}

impl KeyFile {
    fn root_state(key_id: &str) -> Self {
        Self {
            format: KEY_FILE_FORMAT.into(),
            key_id: key_id.into(),
            state: LocalKeyState::Enabled,
            deletion_date_unix_ms: None,
            created_at_unix_ms: crate::model::now_ms(),
            nonce: None,
            wrapped_key: None,
        }
    }
}

pub(super) fn encode_json<T: Serialize>(v: &T) -> Result<Vec<u8>, KmsError> {
    serde_json::to_vec_pretty(v)
        .map_err(|e| KmsError::Misconfigured(format!("cannot encode key file: {e}")))
}

pub(super) fn create_private_dir(dir: &Path) -> Result<(), KmsError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| {
        KmsError::Misconfigured(format!(
            "cannot create local KMS keys directory {}: {e}",
            dir.display()
        ))
    })
}

/// Replaces `path` atomically (a temporary file renamed over it, then the directory
/// synced), mode 0600.
pub(super) fn write_replace_private_file(path: &Path, contents: &[u8]) -> Result<(), KmsError> {
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new_private_file(&tmp, contents)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| KmsError::Misconfigured(format!("cannot replace local KMS key file: {e}")))?;
    sync_parent(path)
}

pub(super) fn remove_file_durably(path: &Path) -> Result<(), KmsError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KmsError::Misconfigured(format!(
            "cannot delete local KMS key file {}: {e}",
            path.display()
        ))),
    }
}

pub(super) fn sync_parent(path: &Path) -> Result<(), KmsError> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| KmsError::Misconfigured(format!("cannot sync {}: {e}", dir.display())))?;
    }
    Ok(())
}
