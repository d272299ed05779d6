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

mod keys;

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
    /// period ends (0 days: now); see `keys.rs`.
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        self.schedule_deletion(key_id, pending_window_days)
    }

    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        self.create_managed_key(epoch, store_tag)
    }

    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        self.managed_key_status(key_id)
    }

    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        self.cancel_managed_deletion(key_id)
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
