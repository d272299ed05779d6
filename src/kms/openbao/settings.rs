//! `[kms.openbao]`: the settings of the OpenBao / Vault Transit provider, their defaults
//! and their validation (one place that turns them into checked values).
//!
//! Must not: read files or talk to the server (the parent module does). The settings
//! hold no secret: tokens, secret ids and JWTs are read from files or the environment.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::kms::KmsError;

/// Settings of the OpenBao / HashiCorp Vault Transit provider (the `[kms.openbao]`
/// section). Every field but `address` and `key` has a default.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenBaoSettings {
    /// Server address, `https://host[:port]`. Plain `http://` is accepted only for a
    /// loopback host (a local agent or a test server); anything else is
    /// [`KmsError::Misconfigured`].
    pub address: String,
    /// Mount path of the Transit secrets engine. Default `transit`.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Transit key used for tenants without their own key (`Kms::default_key_id`).
    /// Must be a derived `aes256-gcm96` key.
    pub key: String,
    /// Namespace, sent as `X-Vault-Namespace` on every request (login included).
    #[serde(default)]
    pub namespace: Option<String>,
    /// PEM file with the CA certificate(s) that sign the server's certificate. When
    /// set, only these roots are trusted (as `BAO_CACERT` does); otherwise the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How the sidecar authenticates. Default: a token from the environment.
    #[serde(default)]
    pub auth: OpenBaoAuth,
    /// Deadline of one KMS operation, retries and re-login included, in ms. Default 5000.
    #[serde(default = "default_operation_timeout_ms")]
    pub operation_timeout_ms: u64,
    /// Deadline of one HTTP attempt, in ms. Default 2000.
    #[serde(default = "default_attempt_timeout_ms")]
    pub attempt_timeout_ms: u64,
    /// TCP and TLS connect deadline, in ms. Default 1000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Attempts in total (1 = no retry). Connection failures, timeouts, 5xx (a sealed
    /// server answers 503) and 429 are retried; a 4xx refusal never is. Default 4.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry back-off in ms; it doubles per attempt (capped at 2 s), with jitter.
    /// Default 50.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Mount of the KV version 2 engine that keeps the deletion dates of keys
    /// scheduled for deletion (Transit keeps none). Default `secret`.
    #[serde(default = "default_records_mount")]
    pub deletion_records_mount: String,
    /// Path under `deletion_records_mount` of those records; a record is at
    /// `<path>/<mount>/<key>`. Default `fieldkey/transit-deletions`.
    #[serde(default = "default_records_path")]
    pub deletion_records_path: String,
    /// How often, at most, the readiness check starts a sweep that deletes keys whose
    /// deletion window is over (in the background), in seconds; 0 = never from the
    /// check (deletions, epoch-key creation and key-state reads still sweep). Default
    /// 600.
    #[serde(default = "default_sweep_interval_s")]
    pub deletion_sweep_interval_s: u64,
}

/// How the provider authenticates to OpenBao (`[kms.openbao.auth]`, tagged by
/// `method`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum OpenBaoAuth {
    /// A token: from `token_file` (re-read whenever the server refuses the token, so
    /// an OpenBao Agent sink that renews it works), else from the environment variable
    /// `BAO_TOKEN`, else `VAULT_TOKEN` (read once, at connect).
    Token {
        /// File holding the token (surrounding whitespace ignored).
        #[serde(default)]
        token_file: Option<PathBuf>,
    },
    /// AppRole login; the secret id is read from its file at every login.
    #[serde(rename = "approle")]
    AppRole {
        /// The role id (an identifier, not a secret on its own).
        role_id: String,
        /// File holding the secret id.
        secret_id_file: PathBuf,
        /// Mount path of the AppRole auth method. Default `approle`.
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
    /// Kubernetes login with the pod's service-account token, read from its file at
    /// every login (projected tokens rotate).
    Kubernetes {
        /// The OpenBao role.
        role: String,
        /// File holding the service-account JWT. Default
        /// `/var/run/secrets/kubernetes.io/serviceaccount/token`.
        #[serde(default = "default_jwt_file")]
        jwt_file: PathBuf,
        /// Mount path of the Kubernetes auth method. Default `kubernetes`.
        #[serde(default = "default_kubernetes_mount")]
        mount: String,
    },
}

impl Default for OpenBaoAuth {
    fn default() -> Self {
        Self::Token { token_file: None }
    }
}

fn default_mount() -> String {
    "transit".into()
}
fn default_operation_timeout_ms() -> u64 {
    5000
}
fn default_attempt_timeout_ms() -> u64 {
    2000
}
fn default_connect_timeout_ms() -> u64 {
    1000
}
fn default_max_attempts() -> u32 {
    4
}
fn default_initial_backoff_ms() -> u64 {
    50
}
fn default_records_mount() -> String {
    "secret".into()
}
fn default_records_path() -> String {
    "fieldkey/transit-deletions".into()
}
fn default_sweep_interval_s() -> u64 {
    600
}
fn default_approle_mount() -> String {
    "approle".into()
}
fn default_kubernetes_mount() -> String {
    "kubernetes".into()
}
fn default_jwt_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}

impl OpenBaoSettings {
    /// Settings for `address` and default key `key`, every other field at its default.
    pub fn new(address: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            mount: default_mount(),
            key: key.into(),
            namespace: None,
            ca_file: None,
            auth: OpenBaoAuth::default(),
            operation_timeout_ms: default_operation_timeout_ms(),
            attempt_timeout_ms: default_attempt_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            deletion_records_mount: default_records_mount(),
            deletion_records_path: default_records_path(),
            deletion_sweep_interval_s: default_sweep_interval_s(),
        }
    }

    /// Checks every field and returns the values the provider works with.
    pub(super) fn validate(&self) -> Result<Checked, KmsError> {
        let bad = |msg: String| KmsError::Misconfigured(format!("kms.openbao: {msg}"));
        let base = base_url(&self.address).map_err(bad)?;
        let mount = path_setting("mount", &self.mount).map_err(bad)?;
        if !is_key_name(&self.key) {
            return Err(bad(format!(
                "key {:?} is not a Transit key name (letters, digits, '_', '-', '.')",
                self.key
            )));
        }
        let namespace = match &self.namespace {
            Some(ns) if !ns.trim_matches('/').is_empty() => {
                Some(path_setting("namespace", ns).map_err(bad)?)
            }
            _ => None,
        };
        let records_mount =
            path_setting("deletion_records_mount", &self.deletion_records_mount).map_err(bad)?;
        let records_path =
            path_setting("deletion_records_path", &self.deletion_records_path).map_err(bad)?;
        match &self.auth {
            OpenBaoAuth::Token { .. } => {}
            OpenBaoAuth::AppRole { role_id, mount, .. } => {
                if role_id.trim().is_empty() {
                    return Err(bad("auth.role_id is empty".into()));
                }
                path_setting("auth.mount", mount).map_err(bad)?;
            }
            OpenBaoAuth::Kubernetes { role, mount, .. } => {
                if role.trim().is_empty() {
                    return Err(bad("auth.role is empty".into()));
                }
                path_setting("auth.mount", mount).map_err(bad)?;
            }
        }
        let ms = |name: &str, v: u64| {
            if v == 0 {
                Err(bad(format!("{name} must be above 0")))
            } else {
                Ok(Duration::from_millis(v))
            }
        };
        Ok(Checked {
            base,
            mount,
            namespace,
            records_mount,
            records_path,
            operation_timeout: ms("operation_timeout_ms", self.operation_timeout_ms)?,
            attempt_timeout: ms("attempt_timeout_ms", self.attempt_timeout_ms)?,
            connect_timeout: ms("connect_timeout_ms", self.connect_timeout_ms)?,
            max_attempts: self.max_attempts.max(1),
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            sweep_interval: (self.deletion_sweep_interval_s > 0)
                .then(|| Duration::from_secs(self.deletion_sweep_interval_s)),
        })
    }
}

/// Validated settings.
#[derive(Debug)]
pub(super) struct Checked {
    /// `scheme://host[:port]/v1/`.
    pub base: String,
    pub mount: String,
    pub namespace: Option<String>,
    pub records_mount: String,
    pub records_path: String,
    pub operation_timeout: Duration,
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub sweep_interval: Option<Duration>,
}

/// The API base of `address`: https, or http for a loopback host; no credentials,
/// path, query or fragment.
fn base_url(address: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(address.trim())
        .map_err(|e| format!("address {address:?} is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("address must not contain credentials".into());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "address {address:?} must be scheme://host[:port] without a path"
        ));
    }
    let Some(host) = url.host_str() else {
        return Err(format!("address {address:?} has no host"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(format!(
                "address {address:?}: plain http is allowed only for a loopback host; use https"
            ));
        }
        other => return Err(format!("address scheme {other:?} is not https")),
    }
    let mut base = url.as_str().trim_end_matches('/').to_owned();
    base.push_str("/v1/");
    Ok(base)
}

/// A mount path or namespace: segments of `[A-Za-z0-9_.-]` (not `.` or `..`) joined
/// by `/`; surrounding slashes dropped.
fn path_setting(name: &str, value: &str) -> Result<String, String> {
    let v = value.trim().trim_matches('/');
    let ok = !v.is_empty()
        && v.len() <= 256
        && v.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        });
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "{name} {value:?} is not a path of letters, digits, '_', '-', '.' segments"
        ))
    }
}

/// A Transit key name as OpenBao accepts it in a path (`framework.GenericNameRegex`:
/// `\w(([\w-.]+)?\w)?`), at most 128 bytes. Anything else cannot name a key, so no
/// request is made with it (no path tricks through key ids).
pub(super) fn is_key_name(name: &str) -> bool {
    let b = name.as_bytes();
    let word = |c: &u8| c.is_ascii_alphanumeric() || *c == b'_';
    !b.is_empty()
        && b.len() <= 128
        && b.first().is_some_and(word)
        && b.last().is_some_and(word)
        && b.iter().all(|c| word(c) || *c == b'-' || *c == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<OpenBaoSettings, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn defaults_fill_everything_but_address_and_key() {
        let s = parse("address = \"https://bao.internal:8200\"\nkey = \"fieldkey\"").unwrap();
        assert_eq!(s.mount, "transit");
        assert_eq!(s.auth, OpenBaoAuth::Token { token_file: None });
        assert_eq!(
            (
                s.operation_timeout_ms,
                s.attempt_timeout_ms,
                s.connect_timeout_ms
            ),
            (5000, 2000, 1000)
        );
        assert_eq!((s.max_attempts, s.initial_backoff_ms), (4, 50));
        assert_eq!(s.deletion_records_mount, "secret");
        let c = s.validate().unwrap();
        assert_eq!(c.base, "https://bao.internal:8200/v1/");
        assert!(parse("address = \"https://x\"").is_err(), "key is required");
    }

    #[test]
    fn auth_methods_parse_with_their_defaults_and_unknown_fields_are_refused() {
        let s = parse(
            "address = \"https://x\"\nkey = \"k\"\n[auth]\nmethod = \"approle\"\nrole_id = \"r\"\nsecret_id_file = \"/run/s\"",
        )
        .unwrap();
        assert_eq!(
            s.auth,
            OpenBaoAuth::AppRole {
                role_id: "r".into(),
                secret_id_file: "/run/s".into(),
                mount: "approle".into()
            }
        );
        let s = parse(
            "address = \"https://x\"\nkey = \"k\"\n[auth]\nmethod = \"kubernetes\"\nrole = \"fieldkey\"",
        )
        .unwrap();
        assert_eq!(
            s.auth,
            OpenBaoAuth::Kubernetes {
                role: "fieldkey".into(),
                jwt_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
                mount: "kubernetes".into()
            }
        );
        assert!(parse("address = \"https://x\"\nkey = \"k\"\ntoken = \"s.x\"").is_err());
        assert!(
            parse(
                "address = \"https://x\"\nkey = \"k\"\n[auth]\nmethod = \"token\"\ntoken = \"s.x\""
            )
            .is_err(),
            "an inline token is not a field"
        );
        assert!(parse("address = \"https://x\"\nkey = \"k\"\n[auth]\nmethod = \"ldap\"").is_err());
    }

    #[test]
    fn the_documented_example_parses() {
        let s = parse(
            r#"
address = "https://openbao.vault.svc:8200"
key = "fieldkey-default"
mount = "transit"
namespace = "team-a"
ca_file = "/etc/fieldkey/openbao-ca.pem"
operation_timeout_ms = 5000
attempt_timeout_ms = 2000
connect_timeout_ms = 1000
max_attempts = 4
initial_backoff_ms = 50
deletion_records_mount = "secret"
deletion_records_path = "fieldkey/transit-deletions"
deletion_sweep_interval_s = 600

[auth]
method = "kubernetes"
role = "fieldkey"
"#,
        )
        .unwrap();
        let c = s.validate().unwrap();
        assert_eq!(c.namespace.as_deref(), Some("team-a"));
        assert_eq!(c.sweep_interval, Some(Duration::from_secs(600)));
    }

    #[test]
    fn plain_http_only_for_loopback() {
        for ok in [
            "http://127.0.0.1:8200",
            "http://localhost:8200/",
            "http://[::1]:8200",
            "https://bao.example:443",
        ] {
            assert!(OpenBaoSettings::new(ok, "k").validate().is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.5:8200",
            "http://bao.example",
            "ftp://127.0.0.1",
            "https://u:p@bao.example",
            "https://bao.example/v1",
            "bao.example:8200",
        ] {
            assert!(
                matches!(
                    OpenBaoSettings::new(bad, "k").validate(),
                    Err(KmsError::Misconfigured(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_and_paths_are_checked() {
        assert!(is_key_name("fieldkey-s1-epoch-3-0a1b"));
        assert!(is_key_name("a"));
        for bad in ["", "-a", "a-", "../x", "a/b", "a b", ".a"] {
            assert!(!is_key_name(bad), "{bad:?}");
        }
        let mut s = OpenBaoSettings::new("https://x", "k");
        s.mount = "/kms/transit/".into();
        assert_eq!(s.validate().unwrap().mount, "kms/transit");
        s.mount = "kms/../sys".into();
        assert!(s.validate().is_err());
        let mut s = OpenBaoSettings::new("https://x", "k");
        s.operation_timeout_ms = 0;
        assert!(s.validate().is_err());
    }
}
