//! AWS KMS backend (aws-sdk-kms): GenerateDataKey, Encrypt and Decrypt with an
//! encryption context binding tenant and key version.
//!
//! Throttling is retried by the SDK's standard retry strategy (exponential backoff with
//! jitter, `max_attempts` in total); every call has an attempt and an operation deadline.
//! Each AWS failure becomes a distinct [`KmsError`] variant, chosen from the service's
//! error code or the SDK's error kind, never from a message string.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::{DataKey, EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};
use crate::crypto::SecretKey;

/// Static credentials, for emulators and tests only; production uses the default AWS
/// credential chain (workload identity).
pub struct StaticCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: SecretString,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[REDACTED]")
            .finish()
    }
}

/// Settings of the AWS KMS backend.
#[derive(Debug)]
pub struct AwsKmsConfig {
    /// KMS key id or ARN used for tenants without their own key.
    pub default_key_id: String,
    /// Region; `None` takes it from the environment.
    pub region: Option<String>,
    /// Endpoint override (an emulator, a VPC endpoint); `None` uses AWS's.
    pub endpoint_url: Option<String>,
    /// Deadline of a whole call including retries.
    pub operation_timeout: Duration,
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    /// TCP/TLS connect deadline.
    pub connect_timeout: Duration,
    /// Attempts in total (1 = no retry). Throttling and transient errors are retried.
    pub max_attempts: u32,
    /// First retry backoff (doubles per attempt, with jitter, capped at 2 s).
    pub initial_backoff: Duration,
    /// Explicit credentials; `None` uses the default chain.
    pub static_credentials: Option<StaticCredentials>,
}

impl AwsKmsConfig {
    /// Defaults for `default_key_id`: 5 s per call, 2 s per attempt, 1 s to connect,
    /// 4 attempts, 50 ms first backoff, region and credentials from the environment.
    pub fn new(default_key_id: impl Into<String>) -> Self {
        Self {
            default_key_id: default_key_id.into(),
            region: None,
            endpoint_url: None,
            operation_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            static_credentials: None,
        }
    }
}

/// AWS KMS through aws-sdk-kms.
#[derive(Debug, Clone)]
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    default_key_id: String,
}

impl AwsKms {
    /// Builds the client. Makes no network call.
    ///
    /// # Errors
    /// [`KmsError::Misconfigured`] when no region can be determined.
    pub async fn new(cfg: AwsKmsConfig) -> Result<Self, KmsError> {
        let timeouts = TimeoutConfig::builder()
            .operation_timeout(cfg.operation_timeout)
            .operation_attempt_timeout(cfg.attempt_timeout)
            .connect_timeout(cfg.connect_timeout)
            .build();
        let retry = RetryConfig::standard()
            .with_max_attempts(cfg.max_attempts.max(1))
            .with_initial_backoff(cfg.initial_backoff)
            .with_max_backoff(Duration::from_secs(2));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(region) = cfg.region {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(url) = cfg.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(c) = cfg.static_credentials {
            loader = loader.credentials_provider(aws_sdk_kms::config::Credentials::new(
                c.access_key_id,
                c.secret_access_key.expose_secret().to_owned(),
                None,
                None,
                "fieldkey-static",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(KmsError::Misconfigured(
                "AWS region not set (configure it or set AWS_REGION)".into(),
            ));
        }
        Ok(Self {
            client: aws_sdk_kms::Client::new(&sdk),
            default_key_id: cfg.default_key_id,
        })
    }

    /// DescribeKey: the metadata of a key named by id, ARN or alias (every lookup of a
    /// key's id, ARN or state goes through here).
    async fn describe(&self, key_id: &str) -> Result<aws_sdk_kms::types::KeyMetadata, KmsError> {
        self.client
            .describe_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| map_sdk_err(key_id, e))?
            .key_metadata
            .ok_or(KmsError::Rejected {
                code: "DescribeKey returned no key metadata".into(),
            })
    }

    /// The key id behind an id, ARN or alias (ScheduleKeyDeletion and
    /// CancelKeyDeletion take an id or ARN, not an alias).
    async fn key_id_of(&self, key_id: &str) -> Result<String, KmsError> {
        Ok(self.describe(key_id).await?.key_id)
    }

    /// The underlying SDK client (for administrative tooling and tests).
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }
}

fn ctx_map(ctx: &EncryptionContext) -> HashMap<String, String> {
    ctx.pairs()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn map_sdk_err<E, R>(key_id: &str, err: SdkError<E, R>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let key_id = key_id.to_owned();
    match &err {
        SdkError::ServiceError(ctx) => match ctx.err().code() {
            Some("DisabledException") => KmsError::KeyDisabled { key_id },
            Some("KMSInvalidStateException") => KmsError::KeyInvalidState { key_id },
            Some("NotFoundException") => KmsError::KeyNotFound { key_id },
            Some("AccessDeniedException") => KmsError::AccessDenied { key_id },
            Some("ThrottlingException") | Some("ThrottledException") => KmsError::Throttled,
            Some("InvalidCiphertextException") | Some("IncorrectKeyException") => {
                KmsError::InvalidCiphertext
            }
            Some("KMSInternalException")
            | Some("DependencyTimeoutException")
            | Some("KeyUnavailableException")
            | Some("InternalFailure")
            | Some("ServiceUnavailable") => KmsError::Unavailable(std::sync::Arc::new(err)),
            Some(code) => KmsError::Rejected {
                code: code.to_owned(),
            },
            None => KmsError::Unavailable(std::sync::Arc::new(err)),
        },
        SdkError::TimeoutError(_) => KmsError::Timeout,
        SdkError::DispatchFailure(df) if df.is_timeout() => KmsError::Timeout,
        SdkError::ConstructionFailure(_) => KmsError::Misconfigured(format!(
            "cannot build KMS request: {}",
            aws_sdk_kms::error::DisplayErrorContext(&err)
        )),
        _ => KmsError::Unavailable(std::sync::Arc::new(err)),
    }
}

fn take_key(blob: Option<Blob>) -> Result<SecretKey, KmsError> {
    let bytes = Zeroizing::new(blob.map(Blob::into_inner).unwrap_or_default());
    SecretKey::try_from_slice(&bytes).ok_or(KmsError::Rejected {
        code: "unexpected plaintext key length".into(),
    })
}

#[async_trait]
impl Kms for AwsKms {
    fn provider(&self) -> &'static str {
        "aws"
    }

    fn default_key_id(&self) -> &str {
        &self.default_key_id
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        let mut out = self
            .client
            .generate_data_key()
            .key_id(key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(ctx_map(ctx)))
            .send()
            .await
            .map_err(|e| map_sdk_err(key_id, e))?;
        let secret = take_key(out.plaintext.take())?;
        let wrapped = out
            .ciphertext_blob
            .take()
            .map(|b| WrappedKey::new(b.into_inner()))
            .ok_or(KmsError::Rejected {
                code: "no CiphertextBlob in response".into(),
            })?;
        Ok(DataKey { secret, wrapped })
    }

    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let mut out = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(key.expose().to_vec()))
            .set_encryption_context(Some(ctx_map(ctx)))
            .send()
            .await
            .map_err(|e| map_sdk_err(key_id, e))?;
        out.ciphertext_blob
            .take()
            .map(|b| WrappedKey::new(b.into_inner()))
            .ok_or(KmsError::Rejected {
                code: "no CiphertextBlob in response".into(),
            })
    }

    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        let mut out = self
            .client
            .decrypt()
            .key_id(key_id)
            .ciphertext_blob(Blob::new(wrapped.as_bytes().to_vec()))
            .set_encryption_context(Some(ctx_map(ctx)))
            .send()
            .await
            .map_err(|e| map_sdk_err(key_id, e))?;
        take_key(out.plaintext.take())
    }

    async fn check(&self) -> Result<(), KmsError> {
        self.describe(&self.default_key_id).await.map(|_| ())
    }

    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        self.describe(key_id).await?.arn.ok_or(KmsError::Rejected {
            code: "DescribeKey returned no ARN".into(),
        })
    }

    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        let days = i32::try_from(pending_window_days)
            .ok()
            .filter(|d| (7..=30).contains(d))
            .ok_or_else(|| {
                KmsError::Misconfigured("AWS KMS key deletion window must be 7..=30 days".into())
            })?;
        // ScheduleKeyDeletion takes a key id or ARN, not an alias: resolve it first.
        let resolved = self.key_id_of(key_id).await?;
        match self
            .client
            .schedule_key_deletion()
            .key_id(&resolved)
            .pending_window_in_days(days)
            .send()
            .await
        {
            Ok(out) => Ok(KeyDeletion::Scheduled {
                pending_window_days: out
                    .pending_window_in_days
                    .and_then(|d| u32::try_from(d).ok())
                    .unwrap_or(pending_window_days),
                deletion_date_unix_ms: out.deletion_date.map(|d| d.to_millis().unwrap_or(i64::MAX)),
            }),
            Err(e) => match map_sdk_err(key_id, e) {
                // Already pending deletion (or another non-deletable state): look.
                KmsError::KeyInvalidState { .. } => match self.describe(&resolved).await? {
                    m if m.key_state == Some(aws_sdk_kms::types::KeyState::PendingDeletion) => {
                        Ok(KeyDeletion::AlreadyPending {
                            deletion_date_unix_ms: m
                                .deletion_date
                                .map(|d| d.to_millis().unwrap_or(i64::MAX)),
                        })
                    }
                    _ => Err(KmsError::KeyInvalidState {
                        key_id: key_id.to_owned(),
                    }),
                },
                other => Err(other),
            },
        }
    }

    /// `CreateKey` (symmetric, tagged `fieldkey:managed=true`, `fieldkey:store`,
    /// `fieldkey:epoch`), then the alias `alias/fieldkey/<store>/epoch-<n>` as a label
    /// for operators. The caller records the key id at once; an existing alias (a
    /// store cloned from another with the same tag, or a restored store behind its
    /// original) is left alone, never adopted: adopting another store's key would let
    /// this store schedule its deletion. The IAM policy in `docs/OPERATIONS.md` §3.1
    /// lets the sidecar create and use only keys so tagged.
    async fn create_epoch_key(&self, epoch: u64, store_tag: &str) -> Result<String, KmsError> {
        use aws_sdk_kms::types::Tag;
        let alias = epoch_alias(store_tag, epoch);
        let tag = |k: &str, v: &str| Tag::builder().tag_key(k).tag_value(v).build();
        let tags = [
            tag("fieldkey:managed", "true"),
            tag("fieldkey:store", store_tag),
            tag("fieldkey:epoch", &epoch.to_string()),
        ]
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KmsError::Misconfigured(format!("cannot build key tags: {e}")))?;
        let meta = self
            .client
            .create_key()
            .description(format!("fieldkey key epoch {epoch} of store {store_tag}"))
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| map_sdk_err("(new key)", e))?
            .key_metadata
            .ok_or(KmsError::Rejected {
                code: "CreateKey returned no key metadata".into(),
            })?;
        let arn = meta.arn.clone().unwrap_or_else(|| meta.key_id.clone());
        if let Err(e) = self
            .client
            .create_alias()
            .alias_name(&alias)
            .target_key_id(&meta.key_id)
            .send()
            .await
        {
            tracing::warn!(alias, kms_key_id = %arn, error = %map_sdk_err(&alias, e),
                "epoch key created, but its alias could not be set (another store with the same epochs.store_tag?); the key is recorded by id");
        }
        Ok(arn)
    }

    async fn key_status(&self, key_id: &str) -> Result<KeyStatus, KmsError> {
        use aws_sdk_kms::types::KeyState;
        match self.describe(key_id).await {
            Ok(m) => Ok(match m.key_state {
                Some(KeyState::Enabled) => KeyStatus::Enabled,
                Some(KeyState::PendingDeletion) => KeyStatus::PendingDeletion {
                    deletion_date_unix_ms: m
                        .deletion_date
                        .map(|d| d.to_millis().unwrap_or(i64::MAX)),
                },
                _ => KeyStatus::Disabled,
            }),
            Err(KmsError::KeyNotFound { .. }) => Ok(KeyStatus::Deleted),
            Err(e) => Err(e),
        }
    }

    /// `CancelKeyDeletion` leaves the key disabled (AWS's rule); it is enabled again.
    async fn cancel_key_deletion(&self, key_id: &str) -> Result<(), KmsError> {
        let resolved = self.key_id_of(key_id).await?;
        let key_id = resolved.as_str();
        self.client
            .cancel_key_deletion()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| map_sdk_err(key_id, e))?;
        self.client
            .enable_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| map_sdk_err(key_id, e))?;
        Ok(())
    }
}

/// The alias of a store's epoch key.
pub fn epoch_alias(store_tag: &str, epoch: u64) -> String {
    format!("alias/fieldkey/{store_tag}/epoch-{epoch}")
}
