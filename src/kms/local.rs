//! Local development KMS: one root key in a file, protected by a passphrase (Argon2id).
//!
//! Not for production: the root key lives in this process's memory and the file's only
//! protection is the passphrase. Opening one logs a warning saying so.
//!
//! File format (JSON, written with mode 0600):
//! ```json
//! {"format":"fieldkey-local-kms/v1","key_id":"local-…",
//!  "argon2id":{"m_cost_kib":65536,"t_cost":3,"p_cost":1,"salt":"…"},
//!  "nonce":"…","wrapped_root_key":"…"}
//! ```
//! The root key is XAES-256-GCM-encrypted under Argon2id(passphrase, salt), with the
//! format and key id as associated data. Keys wrapped by the local KMS are
//! `0x01 || nonce(24) || ciphertext(32) || tag(16)` under the root key, with associated
//! data `"fieldkey/v1 local-kms" || lp16(key_id) || canonical(context)`.

use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};
use crate::crypto::{
    CryptoError, KEY_LEN, NONCE_LEN, SecretKey, TAG_LEN, Xaes256Gcm, open_key, seal_key,
};

const FILE_FORMAT: &str = "fieldkey-local-kms/v1";
const WRAP_AD_LABEL: &[u8] = b"fieldkey/v1 local-kms";

/// Argon2id cost parameters for the passphrase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Parallelism.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: OWASP's recommended Argon2id floor is 19 MiB / 2 passes.
    fn default() -> Self {
        Self {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Argon2Section {
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct RootKeyFile {
    format: String,
    key_id: String,
    argon2id: Argon2Section,
    nonce: String,
    wrapped_root_key: String,
}

/// The local development KMS.
pub struct LocalKms {
    key_id: String,
    root: Xaes256Gcm,
    path: PathBuf,
    /// Where keys made by [`Kms::create_epoch_key`] and key states live: apart from
    /// the data directory, so that restoring a backup of the data directory does not
    /// bring a deleted key back.
    keys_dir: Option<PathBuf>,
}

impl std::fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKms")
            .field("key_id", &self.key_id)
            .field("path", &self.path)
            .field("keys_dir", &self.keys_dir)
            .finish_non_exhaustive()
    }
}

fn kek(passphrase: &SecretString, salt: &[u8], p: KdfParams) -> Result<Xaes256Gcm, KmsError> {
    let params = Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(KEY_LEN))
        .map_err(|e| KmsError::Misconfigured(format!("invalid Argon2id parameters: {e}")))?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.expose_secret().as_bytes(), salt, out.as_mut())
        .map_err(|e| KmsError::Misconfigured(format!("Argon2id failed: {e}")))?;
    Ok(Xaes256Gcm::new(&out))
}

fn root_ad(key_id: &str) -> Vec<u8> {
    let mut ad = FILE_FORMAT.as_bytes().to_vec();
    ad.push(0);
    ad.extend_from_slice(key_id.as_bytes());
    ad
}

fn rng_err_msg() -> KmsError {
    KmsError::Misconfigured("system random number generator failed".into())
}

fn rng_err(_: getrandom::Error) -> KmsError {
    rng_err_msg()
}

impl LocalKms {
    /// Creates a new root key file at `path` (refusing to overwrite one) and opens it.
    ///
    /// # Errors
    /// [`KmsError::Misconfigured`] if the file exists, cannot be written, or the
    /// parameters are invalid.
    pub fn create(
        path: &Path,
        passphrase: &SecretString,
        params: KdfParams,
    ) -> Result<Self, KmsError> {
        if passphrase.expose_secret().len() < 12 {
            return Err(KmsError::Misconfigured(
                "local KMS passphrase must be at least 12 characters".into(),
            ));
        }
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; NONCE_LEN];
        let mut id = [0u8; 8];
        getrandom::fill(&mut salt).map_err(rng_err)?;
        getrandom::fill(&mut nonce).map_err(rng_err)?;
        getrandom::fill(&mut id).map_err(rng_err)?;
        let key_id = format!("local-{}", hex::encode(id));
        let root = SecretKey::generate().map_err(rng_err)?;
        let mut body = Zeroizing::new(root.expose().to_vec());
        let tag = kek(passphrase, &salt, params)?
            .encrypt_in_place_detached(&nonce, &root_ad(&key_id), body.as_mut_slice())
            .map_err(|_| KmsError::Misconfigured("cannot seal root key".into()))?;
        let mut wrapped = body.to_vec();
        wrapped.extend_from_slice(&tag);
        let file = RootKeyFile {
            format: FILE_FORMAT.into(),
            key_id: key_id.clone(),
            argon2id: Argon2Section {
                m_cost_kib: params.m_cost_kib,
                t_cost: params.t_cost,
                p_cost: params.p_cost,
                salt: STANDARD.encode(salt),
            },
            nonce: STANDARD.encode(nonce),
            wrapped_root_key: STANDARD.encode(&wrapped),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| KmsError::Misconfigured(format!("cannot encode key file: {e}")))?;
        write_new_private_file(path, &json)?;
        tracing::warn!(path = %path.display(), key_id, "created a LOCAL development KMS root key; do not use in production");
        Ok(Self {
            key_id,
            root: Xaes256Gcm::new(root.expose()),
            path: path.into(),
            keys_dir: None,
        })
    }

    /// Opens an existing root key file with its passphrase.
    ///
    /// # Errors
    /// [`KmsError::Misconfigured`] if the file is missing, malformed, or the passphrase
    /// is wrong.
    pub fn open(path: &Path, passphrase: &SecretString) -> Result<Self, KmsError> {
        let raw = std::fs::read(path).map_err(|e| {
            KmsError::Misconfigured(format!(
                "cannot read local KMS file {}: {e}",
                path.display()
            ))
        })?;
        let file: RootKeyFile = serde_json::from_slice(&raw)
            .map_err(|e| KmsError::Misconfigured(format!("local KMS file is not valid: {e}")))?;
        if file.format != FILE_FORMAT {
            return Err(KmsError::Misconfigured(format!(
                "unsupported local KMS file format {:?}",
                file.format
            )));
        }
        let bad = |what: &str| KmsError::Misconfigured(format!("local KMS file: bad {what}"));
        let salt = STANDARD
            .decode(&file.argon2id.salt)
            .map_err(|_| bad("salt"))?;
        let nonce: [u8; NONCE_LEN] = STANDARD
            .decode(&file.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| bad("nonce"))?;
        let wrapped = STANDARD
            .decode(&file.wrapped_root_key)
            .map_err(|_| bad("wrapped_root_key"))?;
        if wrapped.len() != KEY_LEN + TAG_LEN {
            return Err(bad("wrapped_root_key length"));
        }
        let (ct, tag) = wrapped.split_at(KEY_LEN);
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| bad("tag"))?;
        let params = KdfParams {
            m_cost_kib: file.argon2id.m_cost_kib,
            t_cost: file.argon2id.t_cost,
            p_cost: file.argon2id.p_cost,
        };
        let mut root = Zeroizing::new([0u8; KEY_LEN]);
        root.copy_from_slice(ct);
        kek(passphrase, &salt, params)?
            .decrypt_in_place_detached(&nonce, &root_ad(&file.key_id), root.as_mut(), &tag)
            .map_err(|_| {
                KmsError::Misconfigured("wrong passphrase or corrupted local KMS file".into())
            })?;
        tracing::warn!(path = %path.display(), key_id = %file.key_id, "using the LOCAL development KMS: the root key is protected only by a passphrase; use AWS KMS in production");
        Ok(Self {
            key_id: file.key_id,
            root: Xaes256Gcm::new(&root),
            path: path.into(),
            keys_dir: None,
        })
    }

    /// Opens `path`, creating it first if it does not exist.
    ///
    /// # Errors
    /// As [`LocalKms::create`] and [`LocalKms::open`].
    pub fn open_or_create(
        path: &Path,
        passphrase: &SecretString,
        params: KdfParams,
    ) -> Result<Self, KmsError> {
        if path.exists() {
            Self::open(path, passphrase)
        } else {
            Self::create(path, passphrase, params)
        }
    }

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
    fn sweep(&self) {
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

    fn keys_dir_or_err(&self) -> Result<&Path, KmsError> {
        self.keys_dir.as_deref().ok_or_else(|| {
            KmsError::Misconfigured(
                "the local KMS has no keys directory (kms.local_keys_dir)".into(),
            )
        })
    }

    /// The file of a managed key or of the root key's state, or `None` for an id this
    /// KMS cannot have made (no path tricks: ids are `[a-z0-9-]`).
    fn key_file(&self, key_id: &str) -> Option<PathBuf> {
        let ok = !key_id.is_empty()
            && key_id.len() <= 128
            && key_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let dir = self.keys_dir.as_deref()?;
        ok.then(|| dir.join(format!("{key_id}.json")))
    }

    /// Reads a key's state file, applying a deletion whose waiting period is over.
    fn read_state(&self, key_id: &str) -> Result<Option<KeyFile>, KmsError> {
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
    fn cipher(&self, key_id: &str) -> Result<KeyCipher<'_>, KmsError> {
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

    fn wrap_ad(&self, key_id: &str, ctx: &EncryptionContext) -> Vec<u8> {
        let mut ad = WRAP_AD_LABEL.to_vec();
        ad.extend_from_slice(
            &u16::try_from(key_id.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        ad.extend_from_slice(key_id.as_bytes());
        ad.extend_from_slice(&ctx.canonical_bytes());
        ad
    }

    fn wrap_now(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let cipher = self.cipher(key_id)?;
        seal_key(cipher.get(), &self.wrap_ad(key_id, ctx), key)
            .map(WrappedKey::new)
            .map_err(|e| match e {
                CryptoError::Rng => rng_err_msg(),
                _ => KmsError::InvalidCiphertext,
            })
    }

    fn set_state(
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
}

/// The cipher of one key: the root key's (borrowed) or a managed key's.
enum KeyCipher<'a> {
    Root(&'a Xaes256Gcm),
    Managed(Box<Xaes256Gcm>),
}

impl KeyCipher<'_> {
    fn get(&self) -> &Xaes256Gcm {
        match self {
            KeyCipher::Root(c) => c,
            KeyCipher::Managed(c) => c,
        }
    }
}

const KEY_FILE_FORMAT: &str = "fieldkey-local-kms-key/v1";
const MANAGED_KEY_AD_LABEL: &[u8] = b"fieldkey/v1 local-kms-key";

fn managed_key_ad(key_id: &str) -> Vec<u8> {
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
enum LocalKeyState {
    Enabled,
    PendingDeletion,
    Deleted,
}

/// A key made by this KMS (material wrapped under the root key), or the state of the
/// root key itself (no material).
#[derive(Serialize, Deserialize)]
struct KeyFile {
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

fn encode_json<T: Serialize>(v: &T) -> Result<Vec<u8>, KmsError> {
    serde_json::to_vec_pretty(v)
        .map_err(|e| KmsError::Misconfigured(format!("cannot encode key file: {e}")))
}

fn create_private_dir(dir: &Path) -> Result<(), KmsError> {
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
fn write_replace_private_file(path: &Path, contents: &[u8]) -> Result<(), KmsError> {
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new_private_file(&tmp, contents)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| KmsError::Misconfigured(format!("cannot replace local KMS key file: {e}")))?;
    sync_parent(path)
}

fn remove_file_durably(path: &Path) -> Result<(), KmsError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KmsError::Misconfigured(format!(
            "cannot delete local KMS key file {}: {e}",
            path.display()
        ))),
    }
}

fn sync_parent(path: &Path) -> Result<(), KmsError> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| KmsError::Misconfigured(format!("cannot sync {}: {e}", dir.display())))?;
    }
    Ok(())
}

fn write_new_private_file(path: &Path, contents: &[u8]) -> Result<(), KmsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        KmsError::Misconfigured(format!(
            "cannot create local KMS file {}: {e}",
            path.display()
        ))
    })?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| KmsError::Misconfigured(format!("cannot write local KMS file: {e}")))
}

#[async_trait]
impl Kms for LocalKms {
    fn provider(&self) -> &'static str {
        "local"
    }

    fn default_key_id(&self) -> &str {
        &self.key_id
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        let secret = SecretKey::generate().map_err(rng_err)?;
        let wrapped = self.wrap_now(key_id, &secret, ctx)?;
        Ok(DataKey { secret, wrapped })
    }

    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.wrap_now(key_id, key, ctx)
    }

    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        let cipher = self.cipher(key_id)?;
        open_key(cipher.get(), &self.wrap_ad(key_id, ctx), wrapped.as_bytes())
            .map_err(|_| KmsError::InvalidCiphertext)
    }

    async fn check(&self) -> Result<(), KmsError> {
        Ok(())
    }

    /// Like AWS: the key refuses every use at once and is deleted when the waiting
    /// period ends (0 days: now). The root key's deletion (it is also the legacy
    /// epoch key) stops it wrapping data; it still protects the keys this KMS made.
    async fn schedule_key_deletion(
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

    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
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

    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
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

    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Small Argon2id costs so unit tests stay fast; production defaults are larger.
    const FAST: KdfParams = KdfParams {
        m_cost_kib: 256,
        t_cost: 1,
        p_cost: 1,
    };

    fn pass(s: &str) -> SecretString {
        SecretString::from(s.to_owned())
    }

    #[tokio::test]
    async fn round_trip_and_context_binding() -> Result<(), KmsError> {
        let dir = tempfile::tempdir().map_err(|e| KmsError::Misconfigured(e.to_string()))?;
        let path = dir.path().join("root.json");
        let kms = LocalKms::create(&path, &pass("correct horse battery"), FAST)?;
        let id = kms.default_key_id().to_owned();
        let ctx = EncryptionContext::tenant_key("t1", 1);
        let dk = kms.generate_data_key(&id, &ctx).await?;
        let back = kms.unwrap(&id, &dk.wrapped, &ctx).await?;
        assert!(back.ct_eq(&dk.secret));
        // wrong context
        let other = EncryptionContext::tenant_key("t1", 2);
        assert!(matches!(
            kms.unwrap(&id, &dk.wrapped, &other).await,
            Err(KmsError::InvalidCiphertext)
        ));
        // unknown key id
        assert!(matches!(
            kms.unwrap("local-nope", &dk.wrapped, &ctx).await,
            Err(KmsError::KeyNotFound { .. })
        ));
        // reopen from file with the passphrase: same root key
        let again = LocalKms::open(&path, &pass("correct horse battery"))?;
        assert!(
            again
                .unwrap(&id, &dk.wrapped, &ctx)
                .await?
                .ct_eq(&dk.secret)
        );
        Ok(())
    }

    #[test]
    fn wrong_passphrase_and_existing_file_are_refused() -> Result<(), KmsError> {
        let dir = tempfile::tempdir().map_err(|e| KmsError::Misconfigured(e.to_string()))?;
        let path = dir.path().join("root.json");
        LocalKms::create(&path, &pass("correct horse battery"), FAST)?;
        let Err(KmsError::Misconfigured(msg)) = LocalKms::open(&path, &pass("wrong horse battery"))
        else {
            panic!("wrong passphrase accepted");
        };
        assert!(msg.contains("wrong passphrase"));
        assert!(LocalKms::create(&path, &pass("correct horse battery"), FAST).is_err());
        assert!(LocalKms::create(&dir.path().join("x"), &pass("short"), FAST).is_err());
        Ok(())
    }

    #[tokio::test]
    async fn an_epoch_key_pending_deletion_refuses_at_once_and_is_gone_after_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let kms = LocalKms::create(
            &dir.path().join("root.json"),
            &pass("correct horse battery"),
            FAST,
        )
        .unwrap()
        .with_keys_dir(&keys)
        .unwrap();
        let id = kms.create_epoch_key(1, "t").await.unwrap();
        let ctx = EncryptionContext::tenant_key("t1", 1);
        let dk = kms.generate_data_key(&id, &ctx).await.unwrap();
        kms.schedule_key_deletion(&id, 7).await.unwrap();
        assert!(matches!(
            kms.unwrap(&id, &dk.wrapped, &ctx).await,
            Err(KmsError::KeyInvalidState { .. })
        ));
        // Cancellable inside the window.
        kms.cancel_key_deletion(&id).await.unwrap();
        assert!(kms.unwrap(&id, &dk.wrapped, &ctx).await.is_ok());
        // The window ends (the date moved into the past): the next open sweeps it away.
        kms.schedule_key_deletion(&id, 7).await.unwrap();
        let path = keys.join(format!("{id}.json"));
        let mut f: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f["deletion_date_unix_ms"] = serde_json::json!(1);
        std::fs::write(&path, serde_json::to_vec(&f).unwrap()).unwrap();
        let again = LocalKms::open(
            &dir.path().join("root.json"),
            &pass("correct horse battery"),
        )
        .unwrap()
        .with_keys_dir(&keys)
        .unwrap();
        assert!(!path.exists(), "the key file outlived its deletion date");
        assert_eq!(again.key_status(&id).await.unwrap(), KeyStatus::Deleted);
        assert!(matches!(
            again.unwrap(&id, &dk.wrapped, &ctx).await,
            Err(KmsError::KeyNotFound { .. })
        ));
        // No path tricks through key ids.
        assert!(matches!(
            again.unwrap("../root", &dk.wrapped, &ctx).await,
            Err(KmsError::KeyNotFound { .. })
        ));
    }
}
