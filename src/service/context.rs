//! What the services are built from ([`Context`]) and how they are put together
//! ([`routes`]): the one place that wires the handlers to their dependencies.
//!
//! Does NOT: handle calls (the service files do), read configuration (`cli/serve.rs`
//! builds the context) or choose the services' dependencies (`crate::wiring` does;
//! nothing here holds the store or the KMS).

use std::sync::Arc;

use tonic::service::interceptor::{InterceptedService, Interceptor};

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
use crate::transport::budget::MemoryBudget;

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
    /// The key epoch roller.
    pub epochs: Arc<crate::epochs::Epochs>,
    /// The audit log (export, head).
    pub audit: Arc<crate::audit::AuditLog>,
    /// Re-encryption jobs (show, list, control).
    pub jobs: crate::jobs::JobBoard,
    /// What the compliance report is built from.
    pub evidence: crate::report::Evidence,
    /// Identity, authorization, decrypt guard and audit for every handler.
    pub gate: Arc<Gate>,
    /// What the compliance report states about the configuration.
    pub report: Arc<audit::ReportFacts>,
    /// Fields that must carry a context (bound to their row).
    pub row_binding: Arc<crate::config::RowBindingSettings>,
    /// The memory budget of request bytes (shared with the metrics); `None`: one of
    /// `limits.memory_budget_bytes` is made for these routes.
    pub budget: Option<Arc<MemoryBudget>>,
}

impl Context {
    /// With these limits.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// With these fields bound to their rows.
    #[must_use]
    pub fn with_row_binding(mut self, row_binding: crate::config::RowBindingSettings) -> Self {
        self.row_binding = Arc::new(row_binding);
        self
    }

    /// With this gate.
    #[must_use]
    pub fn with_gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = gate;
        self
    }
}

/// The gate's identity screen as a tonic interceptor ([`Gate::screen`]).
#[derive(Debug, Clone)]
struct Screen(Arc<Gate>);

impl Interceptor for Screen {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.0.screen(&req).map(|()| req)
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
        epochs,
        audit,
        jobs,
        evidence,
        gate,
        report,
        row_binding,
        budget,
    } = ctx;
    let limits = &limits;
    let budget = budget.unwrap_or_else(|| MemoryBudget::new(limits.memory_budget_bytes));
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
    // Every call's identity is screened before its handler runs: a forged or misrouted
    // `l5d-client-id` refuses the whole call (a batch too), never one item at a time.
    let screen = Screen(gate.clone());
    let crypto = InterceptedService::new(
        pb::crypto_server::CryptoServer::new(CryptoService::new(
            keyring.clone(),
            guard.clone(),
            row_binding,
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes),
        screen.clone(),
    );
    let keys = InterceptedService::new(
        pb::keys_server::KeysServer::new(KeysService::new(
            keyring.clone(),
            guard,
            rotation,
            epochs,
        ))
        .max_decoding_message_size(limits.max_message_bytes),
        screen.clone(),
    );
    let jobs = InterceptedService::new(
        pb::jobs_server::JobsServer::new(JobsService::new(jobs, gate.clone()))
            .max_decoding_message_size(limits.max_message_bytes),
        screen.clone(),
    );
    let audit_svc = InterceptedService::new(
        pb::audit_server::AuditServer::new(AuditService::new(
            evidence,
            audit,
            gate.clone(),
            report,
        ))
        .max_decoding_message_size(limits.max_message_bytes),
        screen.clone(),
    );
    let erasures = InterceptedService::new(
        pb::erasures_server::ErasuresServer::new(ErasuresService::new(erasures, gate))
            .max_decoding_message_size(limits.max_message_bytes),
        screen,
    );
    let routes = tonic::service::Routes::new(crypto)
        .add_service(keys)
        .add_service(jobs)
        .add_service(erasures)
        .add_service(audit_svc)
        .add_service(health)
        .add_service(reflection);
    // Every request body is screened (framing, size, memory budget, arrival deadline)
    // before tonic buffers a byte of it.
    Ok(super::screen::screened(
        routes,
        budget,
        limits.max_message_bytes,
        limits.request_timeout(),
    ))
}
