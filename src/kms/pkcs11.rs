//! PKCS#11 (HSM) backend through the `cryptoki` crate: keys are AES-256 secret keys on
//! a token, named by their `CKA_LABEL`; wrapping is `CKM_AES_GCM` encryption on the
//! token with the encryption context in the associated data.
//!
//! A wrapped key is `0x01 || iv(12) || ciphertext(32) || tag(16)` under the token key
//! labelled `key_id`, with associated data
//! `"fieldkey/v1 pkcs11-kms" || lp16(key_id) || canonical(context)` (the local KMS's
//! layout, with its own label). Not `C_WrapKey`: SoftHSM2 refuses GCM there, and
//! `CKM_AES_KEY_WRAP_PAD` cannot bind a context. A wrong key, context or altered bytes
//! fail the tag check on the token: [`KmsError::InvalidCiphertext`].
//!
//! Keys fieldkey uses must be AES-256 and unable to leave the token (`CKA_SENSITIVE`
//! true, `CKA_EXTRACTABLE` false); others are refused as [`KmsError::Misconfigured`].
//! Key deletion with a waiting period, which an HSM does not have, is built from a
//! deletion record on the token (`pkcs11/keys.rs`). Sessions, login and the mapping of
//! PKCS#11 return values to errors: `pkcs11/pool.rs`. Every PKCS#11 call runs in a
//! blocking task, within [`Pkcs11Settings::timeout_ms`].
//!
//! What it does NOT protect against: whoever holds the PIN can use, re-enable or
//! destroy the keys (including one pending deletion) with any PKCS#11 tool; HSM
//! backups and cloned tokens keep destroyed keys; SoftHSM2 is software, not an HSM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use secrecy::SecretString;
use zeroize::Zeroizing;

mod keys;
mod pool;

use super::{DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};
use crate::crypto::{KEY_LEN, SecretKey};
use keys::valid_label;
use pool::{Fail, Token};

/// The environment variable the PIN is read from when neither `pin_file` nor
/// `pin_env` is set.
pub const DEFAULT_PIN_ENV: &str = "FIELDKEY_PKCS11_PIN";

const WRAP_AD_LABEL: &[u8] = b"fieldkey/v1 pkcs11-kms";
const BLOB_VERSION: u8 = 0x01;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const TAG_BITS: u64 = 128;
const BLOB_LEN: usize = 1 + IV_LEN + KEY_LEN + TAG_LEN;
const MAX_SESSIONS: usize = 64;

/// The `[kms.pkcs11]` settings. The PIN itself is not here: it is read at
/// [`Pkcs11Kms::open`] from `pin_file` or the environment variable `pin_env`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 library (e.g. SoftHSM2's `libsofthsm2.so`, a vendor's).
    pub module: PathBuf,
    /// Label of the token (`CK_TOKEN_INFO.label`); exactly one token must carry it.
    pub token_label: String,
    /// `CKA_LABEL` of the default AES-256 key (the default key id).
    pub key_label: String,
    /// File holding the user PIN (one line; a trailing newline is ignored). Exclusive
    /// with `pin_env`.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN; default
    /// [`DEFAULT_PIN_ENV`] (`FIELDKEY_PKCS11_PIN`) when `pin_file` is not set.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Sessions in the pool, and so PKCS#11 calls in flight (1..=64; default 4).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Deadline of one call, waiting for a session included (ms; default 5000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_sessions() -> usize {
    4
}

fn default_timeout_ms() -> u64 {
    5000
}

impl Pkcs11Settings {
    /// Settings with the defaults: the PIN from [`DEFAULT_PIN_ENV`], 4 sessions, 5 s.
    pub fn new(
        module: impl Into<PathBuf>,
        token_label: impl Into<String>,
        key_label: impl Into<String>,
    ) -> Self {
        Self {
            module: module.into(),
            token_label: token_label.into(),
            key_label: key_label.into(),
            pin_file: None,
            pin_env: None,
            sessions: default_sessions(),
            timeout_ms: default_timeout_ms(),
        }
    }

    /// The PIN from its one source. Never part of an error message.
    fn read_pin(&self) -> Result<SecretString, KmsError> {
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(_), Some(_)) => {
                return Err(KmsError::Misconfigured(
                    "kms.pkcs11: set pin_file or pin_env, not both".into(),
                ));
            }
            (Some(path), None) => {
                warn_if_readable_by_others(path);
                let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    KmsError::Misconfigured(format!(
                        "cannot read the PKCS#11 PIN file {}: {e}",
                        path.display()
                    ))
                })?);
                let line = raw.strip_suffix('\n').unwrap_or(&raw);
                let line = line.strip_suffix('\r').unwrap_or(line);
                SecretString::from(line.to_owned())
            }
            (None, env) => {
                let name = env.as_deref().unwrap_or(DEFAULT_PIN_ENV);
                let value = Zeroizing::new(std::env::var(name).map_err(|_| {
                    KmsError::Misconfigured(format!(
                        "the PKCS#11 PIN is not in the environment variable {name} (set it, or kms.pkcs11.pin_file)"
                    ))
                })?);
                SecretString::from(value.as_str().to_owned())
            }
        };
        if secrecy::ExposeSecret::expose_secret(&pin).is_empty() {
            return Err(KmsError::Misconfigured("the PKCS#11 PIN is empty".into()));
        }
        Ok(pin)
    }

    fn validate(&self) -> Result<(), KmsError> {
        if self.token_label.is_empty() || self.token_label.len() > 32 {
            return Err(KmsError::Misconfigured(
                "kms.pkcs11.token_label must be 1..=32 bytes (a PKCS#11 token label)".into(),
            ));
        }
        if !valid_label(&self.key_label) {
            return Err(KmsError::Misconfigured(format!(
                "kms.pkcs11.key_label must be 1..={} bytes without control characters",
                keys::MAX_LABEL_LEN
            )));
        }
        if !(1..=MAX_SESSIONS).contains(&self.sessions) {
            return Err(KmsError::Misconfigured(format!(
                "kms.pkcs11.sessions must be 1..={MAX_SESSIONS}"
            )));
        }
        if self.timeout_ms == 0 {
            return Err(KmsError::Misconfigured(
                "kms.pkcs11.timeout_ms must be > 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the PKCS#11 PIN file is readable by group or others; make it 0600 or 0400");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &std::path::Path) {}

/// A token of a PKCS#11 module as fieldkey's KMS.
pub struct Pkcs11Kms {
    token: Arc<Token>,
    default_key: String,
}

impl std::fmt::Debug for Pkcs11Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Kms")
            .field("module", &self.token.module_path())
            .field("token_label", &self.token.label())
            .field("default_key", &self.default_key)
            .field("sessions", &self.token.pool_size())
            .finish_non_exhaustive()
    }
}

impl Pkcs11Kms {
    /// Loads the module, finds the token by its label, logs in with the PIN, checks
    /// the default key (if present: AES-256, sensitive, not extractable) and applies
    /// deletions whose waiting period is over.
    ///
    /// # Errors
    /// [`KmsError::Misconfigured`] for bad settings, an unreadable PIN source, a module
    /// that does not load, no token (or several) with the label, a PIN the token
    /// refuses (never offered twice: wrong attempts lock a token), a default key that
    /// breaks the rule above; [`KmsError::Unavailable`] / [`KmsError::Timeout`] when the
    /// token does not answer.
    pub async fn open(settings: &Pkcs11Settings) -> Result<Pkcs11Kms, KmsError> {
        settings.validate()?;
        let pin = settings.read_pin()?;
        let module_path = settings.module.clone();
        let label = settings.token_label.clone();
        let sessions = settings.sessions;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let token = tokio::time::timeout(
            timeout,
            tokio::task::spawn_blocking(move || {
                let module = pool::load_module(&module_path)?;
                Token::open(module, module_path, label, pin, sessions, timeout)
            }),
        )
        .await
        .map_err(|_| KmsError::Timeout)?
        .map_err(|e| KmsError::Unavailable(Arc::new(e)))??;
        let default_key = settings.key_label.clone();
        let key = default_key.clone();
        token
            .run(&default_key, move |t, s| {
                keys::check_default_key(t, s, &key)?;
                keys::sweep(t, s);
                Ok(())
            })
            .await?;
        Ok(Pkcs11Kms { token, default_key })
    }

    async fn wrap_now(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        if !valid_label(key_id) {
            return Err(KmsError::KeyNotFound {
                key_id: key_id.to_owned(),
            });
        }
        let ad = wrap_ad(key_id, ctx);
        let label = key_id.to_owned();
        let plaintext = Zeroizing::new(*key.expose());
        self.token
            .run(key_id, move |t, s| {
                let handle = keys::usable_key(t, s, &label)?;
                // A random 96-bit IV per wrap from the OS's CSPRNG. NIST SP 800-38D
                // allows 2^32 random IVs per key; a key here wraps one tenant key
                // version or one subject-wrapping key per tenant and epoch, orders of
                // magnitude fewer. A token that generates GCM IVs itself (FIPS mode)
                // writes its IV into this buffer, which is what gets stored.
                let mut iv = [0u8; IV_LEN];
                getrandom::fill(&mut iv).map_err(|_| {
                    KmsError::Misconfigured("system random number generator failed".into())
                })?;
                let out = {
                    let mech = Mechanism::AesGcm(GcmParams::new(&mut iv, &ad, TAG_BITS.into())?);
                    s.encrypt(&mech, handle, plaintext.as_slice())?
                };
                if out.len() != KEY_LEN + TAG_LEN {
                    return Err(KmsError::Rejected {
                        code: format!(
                            "PKCS#11 AES-GCM returned {} bytes for a 32-byte key",
                            out.len()
                        ),
                    }
                    .into());
                }
                let mut blob = Vec::with_capacity(BLOB_LEN);
                blob.push(BLOB_VERSION);
                blob.extend_from_slice(&iv);
                blob.extend_from_slice(&out);
                Ok(WrappedKey::new(blob))
            })
            .await
    }
}

/// The associated data of a wrap: fixed label, length-prefixed key label, context.
fn wrap_ad(key_id: &str, ctx: &EncryptionContext) -> Vec<u8> {
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

/// Whether a failed `C_Decrypt` (the data step, after `C_DecryptInit` accepted key and
/// mechanism) says the ciphertext did not authenticate. PKCS#11 3.0 names it
/// `CKR_AEAD_DECRYPT_FAILED` (0x35, unknown to cryptoki 0.12); 2.40 tokens answer
/// `CKR_ENCRYPTED_DATA_INVALID`; SoftHSM2 answers `CKR_GENERAL_ERROR` (checked with the
/// session still alive before it counts, see `unwrap`).
fn is_auth_failure(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::GeneralError
            | RvError::UnknownErrorCode(0x35)
    )
}

#[async_trait]
impl Kms for Pkcs11Kms {
    fn provider(&self) -> &'static str {
        "pkcs11"
    }

    fn default_key_id(&self) -> &str {
        &self.default_key
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        let secret = SecretKey::generate()
            .map_err(|_| KmsError::Misconfigured("system random number generator failed".into()))?;
        let wrapped = self.wrap_now(key_id, &secret, ctx).await?;
        Ok(DataKey { secret, wrapped })
    }

    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.wrap_now(key_id, key, ctx).await
    }

    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        if !valid_label(key_id) {
            return Err(KmsError::KeyNotFound {
                key_id: key_id.to_owned(),
            });
        }
        let ad = wrap_ad(key_id, ctx);
        let label = key_id.to_owned();
        let blob = wrapped.as_bytes().to_vec();
        self.token
            .run(key_id, move |t, s| {
                let handle = keys::usable_key(t, s, &label)?;
                let (version, rest) = blob.split_first().ok_or(KmsError::InvalidCiphertext)?;
                if *version != BLOB_VERSION || blob.len() != BLOB_LEN {
                    return Err(KmsError::InvalidCiphertext.into());
                }
                let (iv, sealed) = rest.split_at(IV_LEN);
                let mut iv: [u8; IV_LEN] =
                    iv.try_into().map_err(|_| KmsError::InvalidCiphertext)?;
                let mech = Mechanism::AesGcm(GcmParams::new(&mut iv, &ad, TAG_BITS.into())?);
                let plain = match s.decrypt(&mech, handle, sealed) {
                    Ok(p) => Zeroizing::new(p),
                    Err(P11Error::Pkcs11(rv, cryptoki::context::Function::Decrypt))
                        if is_auth_failure(rv) =>
                    {
                        // GENERAL_ERROR also means a broken session or token: only a
                        // session that still answers makes it the ciphertext's fault.
                        s.get_session_info()?;
                        return Err(KmsError::InvalidCiphertext.into());
                    }
                    Err(e) => return Err(e.into()),
                };
                SecretKey::try_from_slice(&plain).ok_or(Fail::Kms(KmsError::InvalidCiphertext))
            })
            .await
    }

    /// The default key exists, obeys the key rule, is enabled and not pending
    /// deletion.
    async fn check(&self) -> Result<(), KmsError> {
        let label = self.default_key.clone();
        self.token
            .run(&self.default_key, move |t, s| {
                keys::usable_key(t, s, &label).map(|_| ())
            })
            .await
    }

    /// Key ids are key labels, unique on the token: the id itself.
    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        Ok(key_id.to_owned())
    }

    /// The key refuses every use through fieldkey at once (and through other
    /// applications of the token where it lets fieldkey turn `CKA_ENCRYPT` and
    /// `CKA_DECRYPT` off), and is destroyed when the waiting period ends (0 days: now).
    /// 0..=30 days.
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        if pending_window_days > keys::MAX_WINDOW_DAYS {
            return Err(KmsError::Misconfigured(format!(
                "PKCS#11 key deletion window must be 0..={} days",
                keys::MAX_WINDOW_DAYS
            )));
        }
        if !valid_label(key_id) {
            return Err(KmsError::KeyNotFound {
                key_id: key_id.to_owned(),
            });
        }
        let label = key_id.to_owned();
        self.token
            .run(key_id, move |t, s| {
                keys::schedule_deletion(t, s, &label, pending_window_days)
            })
            .await
    }

    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        let tag = store_tag.to_owned();
        self.token
            .run("(new key)", move |t, s| {
                keys::create_epoch_key(t, s, epoch, &tag)
            })
            .await
    }

    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        if !valid_label(key_id) {
            return Ok(KeyStatus::Deleted);
        }
        let label = key_id.to_owned();
        self.token
            .run(key_id, move |t, s| keys::status(t, s, &label))
            .await
    }

    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        if !valid_label(key_id) {
            return Err(KmsError::KeyNotFound {
                key_id: key_id.to_owned(),
            });
        }
        let label = key_id.to_owned();
        self.token
            .run(key_id, move |t, s| keys::cancel_deletion(t, s, &label))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn associated_data_binds_key_label_and_context_unambiguously() {
        let ctx = EncryptionContext::tenant_key("t1", 1);
        assert_ne!(wrap_ad("ab", &ctx), wrap_ad("a", &ctx));
        assert_ne!(
            wrap_ad("k", &ctx),
            wrap_ad("k", &EncryptionContext::tenant_key("t1", 2))
        );
        assert!(wrap_ad("k", &ctx).starts_with(WRAP_AD_LABEL));
    }

    #[test]
    fn settings_parse_with_defaults_and_refuse_unknown_fields() {
        let s: Pkcs11Settings = toml::from_str(
            "module = \"/x.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin_file = \"/p\"\n",
        )
        .unwrap();
        assert_eq!((s.sessions, s.timeout_ms), (4, 5000));
        assert!(s.pin_env.is_none());
        assert!(
            toml::from_str::<Pkcs11Settings>(
                "module = \"/x.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\npin = \"1234\"\n"
            )
            .is_err()
        );
    }

    #[test]
    fn one_pin_source_only() {
        let mut s = Pkcs11Settings::new("/x.so", "t", "k");
        s.pin_file = Some("/p".into());
        s.pin_env = Some("X".into());
        assert!(matches!(s.read_pin(), Err(KmsError::Misconfigured(_))));
        s.sessions = 0;
        assert!(s.validate().is_err());
    }
}
