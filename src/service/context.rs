//! What the services are built from ([`Context`]) and how they are put together
//! ([`routes`]): the one place that wires the handlers to their dependencies.
//!
//! Does NOT: handle calls (the service files do) or read configuration (`cli/serve.rs`
//! builds the context).

use std::sync::Arc;

use super::audit::{self, AuditService};
use super::crypto::CryptoService;
use super::erasure::ErasuresService;
use super::gate::Gate;
use super::guard::Guard;
use super::jobs::JobsService;
use super::keys::KeysService;
use crate::config::Limits;
use crate::error::Error;
use crate::keyring::Keyring;
use crate::policy::RotationPolicy;
use crate::proto::pb;

/// Everything the services are built from.
#[derive(Debug, Clone)]
pub struct Context {
    /// The keyring.
    pub keyring: Arc<Keyring>,
    /// Request limits.
    pub limits: Limits,
    /// Rotation policy (for `CheckRotation`).
    pub rotation: RotationPolicy,
    /// The erasure workflow.
    pub erasures: Arc<crate::erasure::Erasures>,
    /// The audit log (export, head).
    pub audit: Arc<crate::audit::AuditLog>,
    /// Identity, authorization, decrypt guard and audit for every handler.
    pub gate: Arc<Gate>,
    /// What the compliance report states about the configuration.
    pub report: Arc<audit::ReportFacts>,
}

impl Context {
    /// Defaults around `keyring`: default limits and rotation policy, no
    /// authorization and no audit records (tests, benchmarks' "off" case).
    pub fn new(keyring: Arc<Keyring>) -> Self {
        Self {
            erasures: Arc::new(crate::erasure::Erasures::new(
                keyring.clone(),
                Default::default(),
            )),
            audit: Arc::new(crate::audit::AuditLog::new(
                keyring.clone(),
                Default::default(),
            )),
            keyring,
            limits: Limits::default(),
            rotation: RotationPolicy::default(),
            gate: Arc::new(Gate::open()),
            report: Arc::new(audit::ReportFacts {
                configuration: crate::report::Configuration::from_config(
                    &crate::config::Config::default(),
                    &RotationPolicy::default(),
                    None,
                ),
                rotation: RotationPolicy::default(),
            }),
        }
    }

    /// With these limits.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// With this gate.
    #[must_use]
    pub fn with_gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = gate;
        self
    }
}

/// The full set of gRPC services: Crypto, Keys, Jobs, Erasures, Audit, standard
/// health and reflection.
///
/// # Errors
/// Only if the embedded descriptor set is invalid (a build error).
pub async fn routes(ctx: Context) -> Result<tonic::service::Routes, Error> {
    let Context {
        keyring,
        limits,
        rotation,
        erasures,
        audit,
        gate,
        report,
    } = ctx;
    let limits = &limits;
    let guard = Guard::with_gate(limits.clone(), gate.clone());
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in [
        pb::crypto_server::SERVICE_NAME,
        pb::keys_server::SERVICE_NAME,
        pb::audit_server::SERVICE_NAME,
        pb::jobs_server::SERVICE_NAME,
        pb::erasures_server::SERVICE_NAME,
    ] {
        (reporter.set_service_status(name, tonic_health::ServingStatus::Serving)).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection descriptor: {e}")))?;
    let crypto =
        pb::crypto_server::CryptoServer::new(CryptoService::new(keyring.clone(), guard.clone()))
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes);
    let keys = pb::keys_server::KeysServer::new(KeysService::new(keyring.clone(), guard, rotation))
        .max_decoding_message_size(limits.max_message_bytes);
    let jobs = pb::jobs_server::JobsServer::new(JobsService::new(keyring.clone(), gate.clone()));
    let audit_svc =
        pb::audit_server::AuditServer::new(AuditService::new(keyring, audit, gate.clone(), report));
    let erasures = pb::erasures_server::ErasuresServer::new(ErasuresService::new(erasures, gate));
    Ok(tonic::service::Routes::new(crypto)
        .add_service(keys)
        .add_service(jobs)
        .add_service(erasures)
        .add_service(audit_svc)
        .add_service(health)
        .add_service(reflection))
}
