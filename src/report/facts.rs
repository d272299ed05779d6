//! The facts a report is judged on. The configuration in force ([`Configuration`]: the
//! envelope, the key store, the KMS, the rotation policy, transport security,
//! authorization, audit settings and where the erasure ledger lives, read from the
//! [`Config`]), and what the collectors gathered from the store for the verdict rules:
//! what the audit chain says about erasures and restrictions ([`AuditIndex`]) and a
//! tenant's suspended subjects ([`SuspendedSubjects`]).
//!
//! Does not: read the key store (the collectors do) or judge a fact (the verdict rules
//! do); it states what is there, nothing more.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::policy::RotationPolicy;
use crate::policy::authz::PolicyStatus;

use super::model::RestrictedSubject;

/// Configuration facts that matter to the promises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    /// The ciphertext envelope and its cipher.
    pub envelope: String,
    /// Key store backend (`sqlite`, `postgres`).
    pub key_store: String,
    /// KMS in use.
    pub kms: KmsFacts,
    /// The rotation policy in force.
    pub rotation_policy: RotationFacts,
    /// Transport security.
    pub tls: TlsFacts,
    /// Authorization.
    pub authorization: AuthzFacts,
    /// Audit aggregation and checkpoints.
    pub audit: AuditFacts,
    /// Where the erasure ledger lives (`separate` from the key store, or `shared`).
    pub erasure_ledger: String,
}

/// The KMS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsFacts {
    /// `aws` or `local` (development only).
    pub provider: String,
    /// The default KMS key (tenants may bring their own).
    pub default_key_id: Option<String>,
    /// AWS region, if set.
    pub region: Option<String>,
}

/// The rotation policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationFacts {
    /// Maximum age of a tenant's active key version, days.
    pub max_key_age_days: u32,
    /// Warning window, days.
    pub warn_days: u32,
    /// Policy file name, or `default`.
    pub source: String,
}

/// Transport security.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFacts {
    /// The mTLS listener for remote callers, if configured.
    pub mtls_listener: Option<String>,
    /// Protocol versions the mTLS listener accepts.
    pub versions: Vec<String>,
    /// Its preferred cipher suite.
    pub preferred_cipher_suite: String,
    /// Whether a client certificate is required (always, when mTLS is on).
    pub client_certificate_required: bool,
    /// Local (plaintext, in-pod) listeners: loopback TCP and Unix socket.
    pub local_listeners: Vec<String>,
    /// Whether Linkerd's `l5d-client-id` is trusted as the caller identity.
    pub trust_linkerd_identity: bool,
}

/// Authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzFacts {
    /// Whether a policy set is enforced (off = every caller may do everything).
    pub enabled: bool,
    /// Policy files of the set in force.
    pub files: Vec<String>,
    /// Policies in it.
    pub policies: usize,
    /// SHA-256 of the set (names and contents).
    pub digest: Option<String>,
    /// Why the policy directory does not load (or its newest change was refused).
    pub error: Option<String>,
}

/// Audit settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFacts {
    /// Data operations are counted per window of this many seconds.
    pub window_secs: u64,
    /// A signed checkpoint is appended this often, seconds.
    pub checkpoint_secs: u64,
}

impl Configuration {
    /// The authorization facts of a policy state (`None`: off; `Some(Err)`: the
    /// directory does not load).
    pub fn authorization_of(
        authz: Option<std::result::Result<PolicyStatus, String>>,
    ) -> AuthzFacts {
        match authz {
            None => AuthzFacts {
                enabled: false,
                files: Vec::new(),
                policies: 0,
                digest: None,
                error: None,
            },
            Some(Ok(st)) => AuthzFacts {
                enabled: true,
                files: st.files,
                policies: st.policies,
                digest: Some(st.digest),
                error: st.last_error,
            },
            Some(Err(e)) => AuthzFacts {
                enabled: false,
                files: Vec::new(),
                policies: 0,
                digest: None,
                error: Some(e),
            },
        }
    }

    /// The facts of `cfg`, with the authorization state `authz` (`None`: off;
    /// `Some(Err)`: the directory does not load).
    pub fn from_config(
        cfg: &Config,
        rotation: &RotationPolicy,
        authz: Option<std::result::Result<PolicyStatus, String>>,
    ) -> Self {
        let file_name = |p: &Path| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        };
        let mut local = Vec::new();
        if let Some(t) = &cfg.listen.tcp {
            local.push(format!("tcp {t}"));
        }
        if let Some(u) = &cfg.listen.unix {
            local.push(format!("unix {}", u.display()));
        }
        let authorization = Self::authorization_of(authz);
        Self {
            envelope: "fk1: XAES-256-GCM (AES-256-GCM under a per-message key derived from \
                       the tenant or subject key; docs/FORMAT.md)"
                .into(),
            key_store: if cfg.store.postgres_url.is_some() {
                "postgres".into()
            } else {
                "sqlite".into()
            },
            kms: KmsFacts {
                provider: if cfg.kms.aws_key_id.is_some() {
                    "aws".into()
                } else {
                    "local".into()
                },
                default_key_id: cfg.kms.aws_key_id.clone(),
                region: cfg.kms.aws_region.clone(),
            },
            rotation_policy: RotationFacts {
                max_key_age_days: rotation.max_key_age_days,
                warn_days: rotation.warn_days,
                source: cfg
                    .policy
                    .rotation
                    .as_deref()
                    .map_or_else(|| "default".into(), file_name),
            },
            tls: TlsFacts {
                mtls_listener: cfg.listen.mtls.as_ref().map(|m| m.listen.clone()),
                versions: vec!["TLS 1.3".into()],
                preferred_cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
                client_certificate_required: cfg.listen.mtls.is_some(),
                local_listeners: local,
                trust_linkerd_identity: cfg.authz.trust_linkerd_identity,
            },
            authorization,
            audit: AuditFacts {
                window_secs: cfg.audit.window_secs,
                checkpoint_secs: cfg.audit.checkpoint_secs,
            },
            erasure_ledger: match (&cfg.erasure.ledger, &cfg.store.postgres_url) {
                (None, Some(_)) => "shared".into(),
                (Some(l), Some(pg)) if l == pg => "shared".into(),
                _ => "separate".into(),
            },
        }
    }
}

/// What the audit chain says about erasures and restrictions.
#[derive(Default)]
pub(super) struct AuditIndex {
    /// erasure id -> (seq, receipt digest) of its `erasure.completed` record.
    pub(super) completed: HashMap<String, (u64, String)>,
    /// erasure id -> (time, tenant, subject) of its `erasure.requested` record.
    pub(super) requested: HashMap<String, (i64, String, Option<String>)>,
    /// erasure ids with an `erasure.cancelled` record.
    pub(super) cancelled: HashSet<String>,
    /// erasure ids re-created from the erasure ledger after a restore
    /// (`erasure.restored`): their `erasure.requested` record may be gone with the backup.
    pub(super) restored: HashSet<String>,
    /// (tenant, resource type, resource id) -> seq of the latest suspension record.
    pub(super) suspended: HashMap<(String, String, String), u64>,
    /// Records written in the period.
    pub(super) in_period: u64,
}

impl AuditIndex {
    /// The seq of the suspension record of `resource_type`/`resource_id` in `tenant`.
    pub(super) fn suspension(
        &self,
        tenant: &str,
        resource_type: &str,
        resource_id: &str,
    ) -> Option<u64> {
        self.suspended
            .get(&(
                tenant.to_owned(),
                resource_type.to_owned(),
                resource_id.to_owned(),
            ))
            .copied()
    }
}

/// A tenant's suspended subjects, read from the store and matched to the audit chain.
pub(super) struct SuspendedSubjects {
    /// All of them.
    pub(super) count: u64,
    /// Those with no suspension record in the audit chain.
    pub(super) unrecorded: u64,
    /// The first [`super::MAX_LISTED_SUBJECTS`], by id.
    pub(super) listed: Vec<RestrictedSubject>,
}
