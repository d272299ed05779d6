//! Configuration: a TOML file, overridden by environment variables and flags (the CLI
//! maps those), validated once at start.
//!
//! With no file at all, the defaults make a working development sidecar: SQLite store
//! and local KMS under `data_dir`, listening on 127.0.0.1:7450.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod blind_index;
mod limits;
mod listen;
pub use blind_index::{
    Argon2Settings, BlindIndexSettings, FieldIndexSettings, IndexAlgorithmName, NormalizeStep,
};
pub use limits::{CacheSettings, Limits};
pub use listen::ListenConfig;

/// Everything `fieldkey serve` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the embedded defaults (SQLite file, local KMS key file).
    pub data_dir: PathBuf,
    /// Listeners.
    pub listen: ListenConfig,
    /// Key store.
    pub store: StoreConfig,
    /// KMS.
    pub kms: KmsConfig,
    /// Key epochs.
    pub epochs: EpochsSettings,
    /// Request limits.
    pub limits: Limits,
    /// Cache and freshness.
    pub cache: CacheSettings,
    /// Policy files.
    pub policy: PolicyConfig,
    /// Erasure workflow.
    pub erasure: ErasureSettings,
    /// Authorization and caller identities.
    pub authz: AuthzSettings,
    /// Audit log.
    pub audit: AuditSettings,
    /// Blind-index profiles per field.
    pub blind_index: BlindIndexSettings,
    /// Metrics and health endpoints.
    pub metrics: MetricsSettings,
    /// Fields whose values must be bound to their row.
    pub row_binding: RowBindingSettings,
}

/// Fields whose Encrypt, Decrypt and Rewrap must carry a `context` (the row's primary
/// key, say): bound into the associated data, it stops a value from being copied into
/// another row of the same tenant (docs/FORMAT.md §3). `required = ["*"]`: every field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RowBindingSettings {
    /// Field names, or `"*"` for all.
    pub required: Vec<String>,
}

impl RowBindingSettings {
    /// Whether `field` must carry a context.
    pub fn requires(&self, field: &str) -> bool {
        self.required.iter().any(|f| f == "*" || f == field)
    }
}

/// Prometheus metrics and the health endpoints (docs/OPERATIONS.md §8).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// HTTP address of `/metrics`, `/healthz` and `/readyz` (e.g. `0.0.0.0:9464`);
    /// unset: not served.
    pub listen: Option<String>,
    /// How often key ages and job progress are re-read from the key store, seconds.
    pub refresh_secs: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: None,
            refresh_secs: 30,
        }
    }
}

/// Authorization (docs/AUDIT.md, policies/README.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthzSettings {
    /// Directory of Cedar policies (`*.cedar`) and `limits.toml`. Unset: authorization
    /// is OFF and every caller may call every RPC (development only; warned at start).
    pub policies: Option<PathBuf>,
    /// How often the directory is checked for changes, in seconds.
    pub reload_secs: u64,
    /// Identity of callers on the loopback and Unix-socket listeners (the pod's own).
    pub local_identity: String,
    /// Take the caller identity from Linkerd's `l5d-client-id` header, on the TCP
    /// listener declared behind the pod's Linkerd proxy (`listen.tcp_behind_linkerd`,
    /// required with this) and from peers inside the pod only; the other plaintext
    /// listeners then refuse requests carrying it (UNAUTHENTICATED).
    pub trust_linkerd_identity: bool,
}

impl Default for AuthzSettings {
    fn default() -> Self {
        Self {
            policies: None,
            reload_secs: 5,
            local_identity: "local".into(),
            trust_linkerd_identity: false,
        }
    }
}

/// Audit log settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Data operations are counted and written once per window, in seconds.
    pub window_secs: u64,
    /// A signed checkpoint is appended this often, in seconds.
    pub checkpoint_secs: u64,
    /// Trust anchors of the compliance report: files with the public keys that verify
    /// audit checkpoints (PEM blocks or one hex/base64 key per line). Empty: the report
    /// verifies with keys read from the key store, and the audit promise is never met.
    pub checkpoint_public_keys: Vec<PathBuf>,
    /// Trust anchors of erasure receipts and "backups sealed" statements, as above.
    pub receipt_public_keys: Vec<PathBuf>,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            window_secs: 10,
            checkpoint_secs: 60,
            checkpoint_public_keys: Vec::new(),
            receipt_public_keys: Vec::new(),
        }
    }
}

/// Erasure workflow settings (see docs/ERASURE.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErasureSettings {
    /// The erasure ledger, kept apart from the key store so a restored key-store backup
    /// cannot bring erased keys back: a SQLite file path, or a `postgres://` URL (a
    /// separate database, ideally on separate storage). Default: with the SQLite key
    /// store, `<data_dir>/erasure-ledger.db`; with PostgreSQL, a table in the key
    /// store's own database (a warning is logged: a restore of that database rolls
    /// both back).
    pub ledger: Option<String>,
    /// Longest grace period an erasure request may ask for, in days (with the key
    /// epochs' backup horizon it must fit in 30 days; see `[epochs]`).
    pub max_grace_days: u32,
    /// Waiting period of a tenant's own KMS key deletion, 7..=30 days.
    pub kms_key_deletion_days: u32,
    /// An erasure left `executing` this long (its executor crashed) is taken up again.
    pub retry_after_secs: u64,
    /// How often due erasures are looked for, in ms.
    pub poll_ms: u64,
    /// How often the key store is reconciled with the ledger, in seconds (also at start).
    pub reconcile_secs: u64,
}

impl Default for ErasureSettings {
    fn default() -> Self {
        Self {
            ledger: None,
            max_grace_days: 14,
            kms_key_deletion_days: 7,
            retry_after_secs: 30,
            poll_ms: 5000,
            reconcile_secs: 600,
        }
    }
}

/// Key epochs (see docs/ERASURE.md §6): how often the key store moves to a new KMS
/// key so that key-store backups cannot outlive an erasure by more than the horizon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpochsSettings {
    /// Length of an epoch, in days (fractions allowed).
    pub length_days: f64,
    /// KMS waiting period before an old epoch key is deleted, in days (AWS: 7..=30;
    /// the local development KMS also allows 0).
    pub kms_deletion_days: u32,
    /// Time allowed for a roll to finish (counted in the 30-day budget), in days.
    pub roll_time_days: f64,
    /// Roll automatically when an epoch is due (the sidecar's worker).
    pub auto_roll: bool,
    /// How often the worker checks whether a roll is due, in seconds.
    pub check_secs: u64,
    /// Schedule the deletion of the legacy key (`kms.aws_key_id`, the key that wrapped
    /// everything before the first roll) once nothing live needs it.
    pub retire_legacy_key: bool,
    /// Operator-created KMS keys to take epoch keys from (instead of `kms:CreateKey`).
    pub key_pool: Vec<String>,
    /// Names this key store in KMS tags and aliases (default `default`).
    pub store_tag: Option<String>,
    /// Local KMS: where epoch keys live (default: `<data_dir>-kms-keys`, beside the
    /// data directory, never inside it).
    pub local_keys_dir: Option<PathBuf>,
    /// The roll's lease, in seconds: a roller that died (a killed sidecar) is taken
    /// over by another after this.
    pub lease_secs: u64,
}

impl Default for EpochsSettings {
    fn default() -> Self {
        Self {
            length_days: 7.0,
            kms_deletion_days: 7,
            roll_time_days: 1.0,
            auto_roll: true,
            check_secs: 3600,
            retire_legacy_key: false,
            key_pool: Vec::new(),
            store_tag: None,
            local_keys_dir: None,
            lease_secs: 60,
        }
    }
}

impl EpochsSettings {
    /// Days from an erasure request to the deletion of the last KMS key that can open
    /// a key-store backup holding its keys, at worst: grace + epoch + roll + window.
    pub fn worst_case_days(&self, max_grace_days: u32) -> f64 {
        f64::from(max_grace_days)
            + self.length_days
            + self.roll_time_days
            + f64::from(self.kms_deletion_days)
    }
}

/// Policy files (see `policies/`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Rotation policy file (`policies/rotation.toml`); without one, keys are due after
    /// 365 days with a 30-day warning.
    pub rotation: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("fieldkey-data"),
            listen: ListenConfig::default(),
            store: StoreConfig::default(),
            kms: KmsConfig::default(),
            epochs: EpochsSettings::default(),
            limits: Limits::default(),
            cache: CacheSettings::default(),
            policy: PolicyConfig::default(),
            erasure: ErasureSettings::default(),
            authz: AuthzSettings::default(),
            audit: AuditSettings::default(),
            blind_index: BlindIndexSettings::default(),
            metrics: MetricsSettings::default(),
            row_binding: RowBindingSettings::default(),
        }
    }
}

/// Which key store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// PostgreSQL DSN; when set, PostgreSQL is used instead of SQLite.
    pub postgres_url: Option<String>,
    /// SQLite file; default `<data_dir>/keys.db`.
    pub sqlite_path: Option<PathBuf>,
    /// PostgreSQL: the change feed's (`LISTEN`) connection is pinged this often, ms.
    pub change_feed_ping_ms: u64,
    /// PostgreSQL: a ping unanswered after this long counts as a lost connection, ms.
    pub change_feed_timeout_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            postgres_url: None,
            sqlite_path: None,
            change_feed_ping_ms: 250,
            change_feed_timeout_ms: 500,
        }
    }
}

/// A KMS provider (`docs/OPERATIONS.md` §3).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KmsProvider {
    /// The local development KMS (a passphrase-protected key file). Not a KMS.
    Local,
    /// AWS KMS.
    Aws,
    /// OpenBao or HashiCorp Vault, Transit secrets engine.
    Openbao,
    /// A PKCS#11 token (an HSM).
    Pkcs11,
}

impl KmsProvider {
    /// The provider's name, as in the configuration and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Aws => "aws",
            Self::Openbao => "openbao",
            Self::Pkcs11 => "pkcs11",
        }
    }

    /// The deletion windows, in days, the provider accepts (AWS: 7..=30).
    pub fn deletion_window_days(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Self::Aws => 7..=30,
            Self::Local | Self::Openbao | Self::Pkcs11 => 0..=30,
        }
    }
}

/// Which KMS.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KmsConfig {
    /// The provider; unset: `aws` when `aws_key_id` is set, else `local`.
    pub provider: Option<KmsProvider>,
    /// AWS KMS key id/ARN; when set, AWS KMS is used instead of the local KMS.
    pub aws_key_id: Option<String>,
    /// AWS region (else from the environment).
    pub aws_region: Option<String>,
    /// AWS endpoint override (VPC endpoint, emulator).
    pub aws_endpoint_url: Option<String>,
    /// Local KMS key file; default `<data_dir>/local-kms.json`.
    pub local_key_file: Option<PathBuf>,
    /// KMS keys a tenant may name (CreateTenant, RewrapKmsKey `kms_key_id`) besides
    /// the default key: exact key ids/ARNs/aliases, or prefixes ending in `*`. Empty
    /// (the default): tenants use the default key only. A caller could otherwise put a
    /// tenant on an unrelated key, whose deletion `ShredTenant` would then schedule.
    pub tenant_keys: Vec<String>,
    /// OpenBao / Vault Transit (`[kms.openbao]`): address, key, auth, TLS.
    pub openbao: Option<crate::kms::openbao::OpenBaoSettings>,
    /// PKCS#11 (`[kms.pkcs11]`): the module, token, default key and PIN source.
    pub pkcs11: Option<crate::kms::pkcs11::Pkcs11Settings>,
    /// A second KMS for disaster recovery (`[kms.dr]`): every key is also wrapped
    /// under it, and a cache miss goes to it when this one is unavailable.
    pub dr: Option<DrKmsConfig>,
}

impl KmsConfig {
    /// The provider in effect.
    pub fn provider(&self) -> KmsProvider {
        self.provider.unwrap_or(if self.aws_key_id.is_some() {
            KmsProvider::Aws
        } else {
            KmsProvider::Local
        })
    }
}

/// The disaster-recovery KMS (`[kms.dr]`, docs/OPERATIONS.md §3.5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrKmsConfig {
    /// Its provider: `aws` (another region or account), `openbao` or `pkcs11`.
    pub provider: KmsProvider,
    /// AWS: the secondary's default key (the counterpart of the primary's default).
    #[serde(default)]
    pub aws_key_id: Option<String>,
    /// AWS: its region.
    #[serde(default)]
    pub aws_region: Option<String>,
    /// AWS: endpoint override.
    #[serde(default)]
    pub aws_endpoint_url: Option<String>,
    /// OpenBao: the secondary server (`[kms.dr.openbao]`).
    #[serde(default)]
    pub openbao: Option<crate::kms::openbao::OpenBaoSettings>,
    /// PKCS#11: the secondary token (`[kms.dr.pkcs11]`).
    #[serde(default)]
    pub pkcs11: Option<crate::kms::pkcs11::Pkcs11Settings>,
    /// The secondary counterparts of tenants' own primary keys (primary key id as the
    /// tenant names it -> secondary key id). A tenant key with none is wrapped under
    /// the primary only, and the compliance report says so.
    #[serde(default)]
    pub key_map: std::collections::BTreeMap<String, String>,
}

impl DrKmsConfig {
    /// A disaster-recovery KMS of `provider` with nothing else set.
    pub fn new(provider: KmsProvider) -> Self {
        Self {
            provider,
            aws_key_id: None,
            aws_region: None,
            aws_endpoint_url: None,
            openbao: None,
            pkcs11: None,
            key_map: std::collections::BTreeMap::new(),
        }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// Path.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file (missing keys take their defaults).
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Checks ranges and that at least one listener is configured.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.row_binding.required.iter().any(String::is_empty) {
            return Err(ConfigError::Invalid(
                "row_binding.required: a field name must not be empty".into(),
            ));
        }
        self.limits.validate()?;
        if self.authz.reload_secs == 0
            || self.audit.window_secs == 0
            || self.audit.checkpoint_secs == 0
        {
            return Err(ConfigError::Invalid(
                "authz.reload_secs, audit.window_secs and audit.checkpoint_secs must be > 0".into(),
            ));
        }
        if self.authz.local_identity.is_empty() {
            return Err(ConfigError::Invalid(
                "authz.local_identity must not be empty".into(),
            ));
        }
        let e = &self.erasure;
        if !(7..=30).contains(&e.kms_key_deletion_days) {
            return Err(ConfigError::Invalid(
                "erasure.kms_key_deletion_days must be 7..=30".into(),
            ));
        }
        let ep = &self.epochs;
        if !(ep.length_days > 0.0 && ep.roll_time_days >= 0.0)
            || ep.check_secs == 0
            || ep.lease_secs == 0
        {
            return Err(ConfigError::Invalid(
                "epochs.length_days must be > 0, epochs.roll_time_days >= 0, epochs.check_secs and epochs.lease_secs > 0"
                    .into(),
            ));
        }
        self.validate_kms()?;
        let worst = ep.worst_case_days(e.max_grace_days);
        if worst > 30.0 {
            return Err(ConfigError::Invalid(format!(
                "erasure would not reach key-store backups within 30 days: erasure.max_grace_days                  ({}) + epochs.length_days ({}) + epochs.roll_time_days ({}) +                  epochs.kms_deletion_days ({}) = {worst} days; shorten one of them",
                e.max_grace_days, ep.length_days, ep.roll_time_days, ep.kms_deletion_days
            )));
        }
        if self.kms.provider() == KmsProvider::Local
            && normalized(&self.local_keys_dir()).starts_with(normalized(&self.data_dir))
        {
            return Err(ConfigError::Invalid(
                "epochs.local_keys_dir must not be inside data_dir: a restored backup of the \
                 data directory would bring deleted epoch keys back"
                    .into(),
            ));
        }
        if e.poll_ms < 10 || e.retry_after_secs == 0 || e.reconcile_secs == 0 {
            return Err(ConfigError::Invalid(
                "erasure.poll_ms must be >= 10; retry_after_secs and reconcile_secs > 0".into(),
            ));
        }
        if self.store.change_feed_ping_ms < 10 || self.store.change_feed_timeout_ms < 10 {
            return Err(ConfigError::Invalid(
                "store.change_feed_ping_ms and change_feed_timeout_ms must be >= 10".into(),
            ));
        }
        if self.metrics.refresh_secs == 0 {
            return Err(ConfigError::Invalid(
                "metrics.refresh_secs must be > 0".into(),
            ));
        }
        if self.blind_index.argon2_concurrency == Some(0) {
            return Err(ConfigError::Invalid(
                "blind_index.argon2_concurrency must be > 0".into(),
            ));
        }
        self.index_profiles()?;
        self.listen.validate(&self.authz)
    }

    /// The blind-index profiles, checked.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field and the problem.
    pub fn index_profiles(&self) -> Result<crate::keyring::IndexProfiles, ConfigError> {
        let mut fields = std::collections::HashMap::new();
        for (name, f) in &self.blind_index.fields {
            fields.insert(name.clone(), f.profile(name)?);
        }
        let slow = self.blind_index.argon2_concurrency.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        Ok(crate::keyring::IndexProfiles::new(fields, slow))
    }

    /// The `[kms]` section: each provider has its settings, and the epoch deletion
    /// window fits every KMS that holds epoch keys.
    fn validate_kms(&self) -> Result<(), ConfigError> {
        let k = &self.kms;
        let primary = k.provider();
        if primary == KmsProvider::Aws && k.aws_key_id.is_none() {
            return Err(ConfigError::Invalid(
                "kms.provider is aws but kms.aws_key_id is not set".into(),
            ));
        }
        for (p, set) in [
            (KmsProvider::Openbao, k.openbao.is_some()),
            (KmsProvider::Pkcs11, k.pkcs11.is_some()),
        ] {
            if primary == p && !set {
                return Err(ConfigError::Invalid(format!(
                    "kms.provider is {0} but [kms.{0}] is not set",
                    p.name()
                )));
            }
            if set && primary != p {
                return Err(ConfigError::Invalid(format!(
                    "[kms.{}] is set but kms.provider is {}",
                    p.name(),
                    primary.name()
                )));
            }
        }
        let mut sides = vec![primary];
        if let Some(dr) = &k.dr {
            match dr.provider {
                KmsProvider::Local => {
                    return Err(ConfigError::Invalid(
                        "kms.dr.provider must be aws, openbao or pkcs11: the local development KMS is no disaster-recovery KMS".into(),
                    ));
                }
                KmsProvider::Aws if dr.aws_key_id.is_none() => {
                    return Err(ConfigError::Invalid(
                        "kms.dr.provider is aws but kms.dr.aws_key_id is not set".into(),
                    ));
                }
                KmsProvider::Pkcs11 if dr.pkcs11.is_none() => {
                    return Err(ConfigError::Invalid(
                        "kms.dr.provider is pkcs11 but [kms.dr.pkcs11] is not set".into(),
                    ));
                }
                KmsProvider::Openbao if dr.openbao.is_none() => {
                    return Err(ConfigError::Invalid(
                        "kms.dr.provider is openbao but [kms.dr.openbao] is not set".into(),
                    ));
                }
                _ => {}
            }
            if primary == KmsProvider::Local {
                return Err(ConfigError::Invalid(
                    "kms.dr needs a real primary KMS (kms.provider aws, openbao or pkcs11)".into(),
                ));
            }
            sides.push(dr.provider);
        }
        let days = self.epochs.kms_deletion_days;
        if let Some(p) = sides
            .iter()
            .find(|p| !p.deletion_window_days().contains(&days))
        {
            let r = p.deletion_window_days();
            return Err(ConfigError::Invalid(format!(
                "epochs.kms_deletion_days must be {}..={} with the {} KMS (it is {days})",
                r.start(),
                r.end(),
                p.name()
            )));
        }
        Ok(())
    }

    /// SQLite path in effect.
    pub fn sqlite_path(&self) -> PathBuf {
        self.store
            .sqlite_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys.db"))
    }

    /// Local KMS epoch-key directory in effect: beside the data directory, not in it
    /// (`<data_dir>-kms-keys` by default).
    pub fn local_keys_dir(&self) -> PathBuf {
        self.epochs.local_keys_dir.clone().unwrap_or_else(|| {
            let data = normalized(&self.data_dir);
            let mut name = data
                .file_name()
                .map(std::ffi::OsStr::to_os_string)
                .unwrap_or_else(|| "fieldkey-data".into());
            name.push("-kms-keys");
            data.with_file_name(name)
        })
    }

    /// Local KMS key file in effect.
    pub fn local_key_file(&self) -> PathBuf {
        self.kms
            .local_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("local-kms.json"))
    }
}

/// `path` made absolute (against the working directory) with `.` and `..` resolved
/// lexically, for comparing directories that may not exist yet (symbolic links are not
/// followed). `std::path::absolute` keeps `..`, and a `..` left in either path let a
/// keys directory inside the data directory pass the check (found with the `config`
/// fuzz target's property, docs/FUZZING.md).
fn normalized(path: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_keys_cannot_sit_inside_the_data_directory_behind_dot_dot() {
        for (data, keys) in [
            ("a/../fieldkey-data", "fieldkey-data/keys"),
            ("fieldkey-data", "x/../fieldkey-data/keys"),
            ("./fieldkey-data/", "fieldkey-data/sub/../keys"),
        ] {
            let c: Config = toml::from_str(&format!(
                "data_dir = {data:?}\n[epochs]\nlocal_keys_dir = {keys:?}\n"
            ))
            .unwrap();
            let e = c.validate().map(|()| "accepted".to_owned());
            assert!(
                e.as_ref()
                    .is_err_and(|e| e.to_string().contains("inside data_dir")),
                "data_dir {data:?}, local_keys_dir {keys:?}: {e:?}"
            );
        }
    }

    #[test]
    fn epochs_must_fit_30_days_and_keep_local_keys_out_of_the_data_directory() {
        let c: Config = toml::from_str("[epochs]\nlength_days = 10\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("within 30 days") && e.contains("max_grace_days"),
            "{e}"
        );
        let c: Config =
            toml::from_str("[epochs]\nlocal_keys_dir = \"fieldkey-data/keys\"\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("inside data_dir")
        );
        let c: Config = toml::from_str("data_dir = \".\"\n").unwrap();
        c.validate().unwrap();
        assert!(
            !c.local_keys_dir()
                .starts_with(std::path::absolute(".").unwrap())
        );
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c: Config = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.tcp.as_deref(), Some("127.0.0.1:7450"));
        assert_eq!(c.sqlite_path(), PathBuf::from("fieldkey-data/keys.db"));
    }

    #[test]
    fn blind_index_profiles_parse_with_defaults_and_bad_ones_are_refused() {
        use crate::crypto::{Argon2Cost, IndexAlgorithm, UnicodeForm};
        let c: Config = toml::from_str(
            r#"
            [blind_index]
            argon2_concurrency = 3
            [blind_index.fields.email]
            normalize = ["trim", "casefold", "nfc"]
            [blind_index.fields.birth_date]
            algorithm = "argon2id"
            bits = 32
            [blind_index.fields.postcode]
            algorithm = "argon2id"
            argon2 = { memory_kib = 65536, iterations = 3 }
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let p = c.index_profiles().unwrap();
        let email = p.get("email").unwrap();
        assert_eq!(email.bits, 64);
        assert_eq!(email.algorithm, IndexAlgorithm::HmacSha256);
        assert_eq!(email.normalization.form, Some(UnicodeForm::Nfc));
        assert!(email.normalization.casefold && email.normalization.trim);
        assert_eq!(
            p.get("birth_date").unwrap().algorithm,
            IndexAlgorithm::Argon2id(Argon2Cost::DEFAULT)
        );
        assert_eq!(
            p.get("postcode").unwrap().algorithm,
            IndexAlgorithm::Argon2id(Argon2Cost {
                memory_kib: 65536,
                iterations: 3,
                parallelism: 1
            })
        );
        assert!(p.get("name").is_err());
        for bad in [
            "[blind_index.fields.x]\nbits = 12",
            "[blind_index.fields.x]\nnormalize = [\"nfc\", \"nfkc\"]",
            "[blind_index.fields.x]\nargon2 = { memory_kib = 65536 }",
            "[blind_index.fields.x]\nalgorithm = \"argon2id\"\nargon2 = { memory_kib = 1 }",
            "[blind_index]\nargon2_concurrency = 0",
            "[blind_index.fields.\"a b\"]\nbits = 64",
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        for unparsable in [
            "[blind_index.fields.x]\nalgorithm = \"md5\"",
            "[blind_index.fields.x]\nnormalize = [\"upper\"]",
            "[blind_index.fields.x]\nsurprise = 1",
        ] {
            assert!(
                toml::from_str::<Config>(unparsable).is_err(),
                "{unparsable}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_bad_limits_are_refused() {
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
        let c: Config = toml::from_str("[limits]\nmax_batch_items = 0").unwrap();
        assert!(c.validate().is_err());
        let c: Config = toml::from_str("[store]\nchange_feed_ping_ms = 0").unwrap();
        assert!(c.validate().is_err());
    }
}
