//! The composition root: the store, the KMS and the keyring over them, and the narrow
//! handle each room above gets from them.
//!
//! Owns: [`Parts`] and the defaults a sidecar is built with when nothing is configured
//! (tests, benchmarks). `cli/serve.rs` builds its `Parts` from the configuration and
//! wires the same handles with configured settings. This is the only room besides the
//! CLI that holds the whole store and the KMS next to the keyring; every room below
//! gets only what it needs (the erasure workflow its erasure store, the audit log its
//! audit store, the Jobs service a [`JobBoard`], the Audit service the report's
//! [`Evidence`], signers their [`SigningKeys`]).
//!
//! Does not: read configuration or files, start tasks or listeners.

use std::sync::Arc;

use tokio::sync::watch;

use crate::audit::{AuditConfig, AuditLog};
use crate::erasure::{ErasureConfig, Erasures};
use crate::jobs::{JobBoard, JobSpec, Runner, RunnerConfig};
use crate::keyring::Keyring;
use crate::kms::Kms;
use crate::model::JobProgress;
use crate::policy::RotationPolicy;
use crate::report::Evidence;
use crate::service::Context;
use crate::service::audit::ReportFacts;
use crate::service::gate::Gate;
use crate::signing::SigningKeys;
use crate::store::KeyStore;

/// The lower floor of a sidecar: the keyring, and the store and KMS it is built on.
#[derive(Clone)]
pub struct Parts {
    /// The keyring over `store` and `kms`.
    pub keyring: Arc<Keyring>,
    /// The key store the keyring uses.
    pub store: Arc<dyn KeyStore>,
    /// The KMS the keyring uses.
    pub kms: Arc<dyn Kms>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("store", &self.store.backend())
            .field("kms", &self.kms.provider())
            .finish_non_exhaustive()
    }
}

impl Parts {
    /// The parts of a sidecar whose `keyring` was built over `store` and `kms`.
    pub fn new(keyring: Arc<Keyring>, store: Arc<dyn KeyStore>, kms: Arc<dyn Kms>) -> Self {
        Self {
            keyring,
            store,
            kms,
        }
    }

    /// fieldkey's own signing keys: kept in the store, wrapped by the KMS.
    pub fn signing_keys(&self) -> SigningKeys {
        SigningKeys::new(self.store.clone(), self.store.clone(), self.kms.clone())
    }

    /// The erasure workflow with `cfg`.
    pub fn erasures(&self, cfg: ErasureConfig) -> Erasures {
        Erasures::new(
            self.keyring.clone(),
            self.store.clone(),
            self.kms.clone(),
            &self.signing_keys(),
            cfg,
        )
    }

    /// The key epoch roller with `cfg` (it signs with the receipts' key).
    pub fn epochs(&self, cfg: crate::epochs::EpochSettings) -> crate::epochs::Epochs {
        let actor = cfg.owner.clone();
        crate::epochs::Epochs::new(
            self.keyring.clone(),
            self.store.clone(),
            self.kms.clone(),
            self.signing_keys().signer("erasure-receipt", actor),
            cfg,
        )
    }

    /// The audit log with `cfg`.
    pub fn audit_log(&self, cfg: AuditConfig) -> AuditLog {
        AuditLog::new(self.store.clone(), &self.signing_keys(), cfg)
    }

    /// The operators' handle on re-encryption jobs.
    pub fn jobs(&self) -> JobBoard {
        JobBoard::new(self.store.clone())
    }

    /// What a compliance report is built from.
    pub fn evidence(&self) -> Evidence {
        Evidence::new(self.store.clone())
    }

    /// A re-encryption runner for `spec` over the application database `db`.
    pub fn runner(
        &self,
        db: sqlx::PgPool,
        spec: JobSpec,
        cfg: RunnerConfig,
    ) -> (Runner, watch::Receiver<JobProgress>) {
        Runner::new(self.keyring.clone(), self.store.clone(), db, spec, cfg)
    }

    /// The services' context with defaults: default limits and rotation policy, no
    /// authorization and no audit records (tests, benchmarks' "off" case).
    pub fn context(&self) -> Context {
        let rotation = RotationPolicy::default();
        Context {
            keyring: self.keyring.clone(),
            limits: crate::config::Limits::default(),
            rotation,
            erasures: Arc::new(self.erasures(ErasureConfig::default())),
            epochs: Arc::new(self.epochs(crate::epochs::EpochSettings::default())),
            audit: Arc::new(self.audit_log(AuditConfig::default())),
            jobs: self.jobs(),
            evidence: self.evidence(),
            gate: Arc::new(Gate::open()),
            report: Arc::new(ReportFacts {
                configuration: crate::report::Configuration::from_config(
                    &crate::config::Config::default(),
                    &rotation,
                    None,
                ),
                rotation,
                anchors: crate::service::audit::Anchors::default(),
            }),
            row_binding: Arc::default(),
            budget: None,
        }
    }
}
