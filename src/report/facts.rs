//! The facts a report is judged on: the configuration in force, read from the
//! [`Config`] into [`Configuration`] (the envelope, the key store, the KMS, the rotation
//! policy, transport security, authorization, audit settings and where the erasure
//! ledger lives), and what the collectors gather from the store for the verdict rules:
//! what the audit chain says about erasures, restrictions and sealed key epochs
//! ([`AuditIndex`]), a tenant's suspended subjects ([`SuspendedSubjects`]) and the key
//! epochs with their signed statements ([`EpochFacts`]).
//!
//! Does not: read the key store (the collectors do) or judge a fact (the verdict rules
//! do); it states what is there, nothing more. The facts' serialized types are in
//! `model`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::config::Config;
use crate::model::EpochRecord;
use crate::policy::RotationPolicy;
use crate::policy::authz::PolicyStatus;

use super::model::{
    AuditFacts, AuthzFacts, Configuration, KmsFacts, RestrictedSubject, RotationFacts, TlsFacts,
};

impl Configuration {
    /// The authorization facts of a policy state (`None`: off; `Some(Err)`: the
    /// directory does not load).
    pub fn authorization_of(
        authz: Option<std::result::Result<PolicyStatus, String>>,
    ) -> AuthzFacts {
        match authz {
            Some(Ok(st)) => AuthzFacts {
                enabled: true,
                files: st.files,
                policies: st.policies,
                digest: Some(st.digest),
                error: st.last_error,
            },
            // Off, or a directory that does not load (and says why).
            off => AuthzFacts {
                enabled: false,
                files: Vec::new(),
                policies: 0,
                digest: None,
                error: off.and_then(std::result::Result::err),
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
                provider: cfg.kms.provider().name().into(),
                default_key_id: cfg.kms.aws_key_id.clone(),
                region: cfg.kms.aws_region.clone(),
                dr_provider: cfg.kms.dr.as_ref().map(|d| d.provider.name().into()),
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

/// What the audit chain says about erasures, restrictions and sealed key epochs.
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
    /// key epoch -> (seq, statement digest) of its `epoch.sealed` record.
    pub(super) sealed: HashMap<u64, (u64, String)>,
    /// Records written in the period.
    pub(super) in_period: u64,
    /// (tenant, field) -> values encrypted without a row context in the period.
    pub(super) unbound: std::collections::BTreeMap<(String, String), u64>,
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

/// A key epoch as the store keeps it, with its signed "backups sealed" statement (read
/// for sealed epochs whose key is not kept).
pub(super) struct EpochFacts {
    /// The record.
    pub(super) record: EpochRecord,
    /// The statement (JSON), if stored.
    pub(super) statement: Option<String>,
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
