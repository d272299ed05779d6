//! gRPC handlers: translate requests into keyring calls and errors into statuses.
//!
//! Owns: the `Crypto` and `Keys` services, the
//! health and reflection services, and the single error mapping ([`status`]). Must not:
//! hold keys, decide key use (the keyring does), or log plaintext.

pub mod audit;
pub mod erasure;
pub mod gate;
mod index;
mod jobs;
pub mod status;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroize as _;

use crate::config::Limits;
use crate::crypto::{Aad, to_text};
use crate::error::Error;
use crate::keyring::{Encryptor, Keyring, Rewrapped, TenantInfo};
use crate::policy::authz::Action;
use crate::policy::{RotationPolicy, RotationStatus};
use crate::store::{KeyState, now_ms};
use gate::{Caller, Gate};

/// The generated `fieldkey.v1` types, now in [`crate::proto`]; re-exported here only
/// for code written against the old path (everything in this crate uses `crate::proto`).
#[doc(hidden)]
pub use crate::proto::{echo_pb, pb};

use pb::{
    CiphertextFormat, CreateTenantRequest, DecryptBatchRequest, DecryptBatchResponse,
    DecryptRequest, DecryptResponse, DecryptResult, EncryptBatchRequest, EncryptBatchResponse,
    EncryptRequest, EncryptResponse, EncryptResult, GetTenantRequest, ItemError,
    RewrapBatchRequest, RewrapBatchResponse, RewrapRequest, RewrapResponse, RewrapResult,
    RotateTenantKeyRequest, decrypt_result, encrypt_result, rewrap_result,
};

/// (tenant, subject, field) of a batch item.
type BatchKey<'a> = (&'a str, &'a str, &'a str);

/// Distinct (tenant, subject, field) keys remembered per batch; beyond, items resolve
/// their key individually.
const MAX_RESOLVED_PER_BATCH: usize = 16;

fn subject(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Encrypts one request's value with a resolved key, in the requested form.
fn seal_response(enc: &Encryptor<'_>, r: &EncryptRequest) -> Result<EncryptResponse, Error> {
    let env = enc.seal(&r.context, &r.plaintext)?;
    let ciphertext = if r.format == CiphertextFormat::Text as i32 {
        to_text(&env).into_bytes()
    } else {
        env
    };
    Ok(EncryptResponse {
        ciphertext,
        key_version: enc.key_version(),
    })
}

fn item_error(e: &Error) -> ItemError {
    let (code, reason) = status::classify(e);
    ItemError {
        code: code as i32,
        reason: reason.to_owned(),
        message: status::public_message(e, code),
    }
}

/// Limits shared by every handler: calls in flight and the per-call deadline.
#[derive(Debug, Clone)]
pub struct Guard {
    limits: Limits,
    inflight: Arc<Semaphore>,
    gate: Arc<Gate>,
}

impl Guard {
    /// A guard enforcing `limits`, with no authorization and no audit (tests).
    pub fn new(limits: Limits) -> Self {
        Self::with_gate(limits, Arc::new(Gate::open()))
    }

    /// A guard enforcing `limits` and `gate` (identity, authorization, audit).
    pub fn with_gate(limits: Limits, gate: Arc<Gate>) -> Self {
        let inflight = Arc::new(Semaphore::new(limits.max_concurrent_requests));
        Self {
            limits,
            inflight,
            gate,
        }
    }

    /// Runs a handler under the concurrency limit (refusing at once when full) and the
    /// deadline.
    async fn run<T>(&self, fut: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let _permit = self.inflight.clone().try_acquire_owned().map_err(|_| {
            status::limit_status(
                Code::ResourceExhausted,
                "TOO_MANY_REQUESTS",
                format!(
                    "{} calls already in flight; retry later",
                    self.limits.max_concurrent_requests
                ),
            )
        })?;
        tokio::time::timeout(self.limits.request_timeout(), fut)
            .await
            .map_err(|_| {
                status::limit_status(
                    Code::DeadlineExceeded,
                    "DEADLINE_EXCEEDED",
                    format!(
                        "call exceeded the server deadline of {} ms",
                        self.limits.request_timeout_ms
                    ),
                )
            })?
    }

    fn check_batch(&self, n: usize) -> Result<(), Status> {
        if n > self.limits.max_batch_items {
            return Err(status::limit_status(
                Code::InvalidArgument,
                "BATCH_TOO_LARGE",
                format!(
                    "batch has {n} items; the limit is {}",
                    self.limits.max_batch_items
                ),
            ));
        }
        Ok(())
    }

    fn check_field(&self, what: &str, len: usize) -> Result<(), Error> {
        if len > self.limits.max_field_bytes {
            return Err(Error::TooLarge(format!(
                "{what} is {len} bytes; the limit is {}",
                self.limits.max_field_bytes
            )));
        }
        Ok(())
    }
}

/// The `fieldkey.v1.Crypto` service.
#[derive(Debug, Clone)]
pub struct CryptoService {
    keyring: Arc<Keyring>,
    guard: Guard,
}

impl CryptoService {
    /// A service over `keyring`, enforcing `guard`'s limits.
    pub fn new(keyring: Arc<Keyring>, guard: Guard) -> Self {
        Self { keyring, guard }
    }

    async fn encrypt_one(
        &self,
        c: &Caller,
        mut r: EncryptRequest,
    ) -> Result<EncryptResponse, Error> {
        let gate = &self.guard.gate;
        let result = async {
            gate.data(c, Action::Encrypt, &r.tenant_id, &r.field)?;
            self.guard.check_field("plaintext", r.plaintext.len())?;
            let enc = self
                .keyring
                .encryptor(&r.tenant_id, subject(&r.subject_id), &r.field)
                .await?;
            seal_response(&enc, &r)
        }
        .await;
        r.plaintext.zeroize();
        gate.data_done(c, Action::Encrypt, &r.tenant_id, &r.field, &result);
        result
    }

    async fn encrypt_batch_item<'a>(
        &self,
        c: &Caller,
        r: &'a EncryptRequest,
        resolved: &mut Vec<(BatchKey<'a>, Result<Encryptor<'a>, Error>)>,
    ) -> Result<EncryptResponse, Error> {
        let result = self.encrypt_batch_item_inner(c, r, resolved).await;
        self.guard
            .gate
            .data_done(c, Action::Encrypt, &r.tenant_id, &r.field, &result);
        result
    }

    async fn encrypt_batch_item_inner<'a>(
        &self,
        c: &Caller,
        r: &'a EncryptRequest,
        resolved: &mut Vec<(BatchKey<'a>, Result<Encryptor<'a>, Error>)>,
    ) -> Result<EncryptResponse, Error> {
        self.guard
            .gate
            .data(c, Action::Encrypt, &r.tenant_id, &r.field)?;
        self.guard.check_field("plaintext", r.plaintext.len())?;
        let key = (
            r.tenant_id.as_str(),
            r.subject_id.as_str(),
            r.field.as_str(),
        );
        let enc = match resolved.iter().find(|(k, _)| *k == key) {
            Some((_, found)) => found.clone()?,
            None => {
                let fresh = self.keyring.encryptor(key.0, subject(key.1), key.2).await;
                if resolved.len() < MAX_RESOLVED_PER_BATCH {
                    resolved.push((key, fresh.clone()));
                }
                fresh?
            }
        };
        seal_response(&enc, r)
    }

    async fn rewrap_one(&self, c: &Caller, r: &RewrapRequest) -> Result<RewrapResponse, Error> {
        let result = self.rewrap_inner(c, r).await;
        self.guard
            .gate
            .data_done(c, Action::Rewrap, &r.tenant_id, &r.field, &result);
        result
    }

    async fn rewrap_inner(&self, c: &Caller, r: &RewrapRequest) -> Result<RewrapResponse, Error> {
        self.guard
            .gate
            .data(c, Action::Rewrap, &r.tenant_id, &r.field)?;
        self.guard.check_field("ciphertext", r.ciphertext.len())?;
        let aad = Aad {
            tenant: &r.tenant_id,
            subject: subject(&r.subject_id),
            field: &r.field,
            context: &r.context,
        };
        let rw: Rewrapped = self.keyring.rewrap(&aad, &r.ciphertext).await?;
        Ok(RewrapResponse {
            changed: rw.changed(),
            key_version: rw.to_version,
            previous_key_version: rw.from_version,
            ciphertext: rw.ciphertext,
        })
    }

    async fn decrypt_one(&self, c: &Caller, r: DecryptRequest) -> Result<DecryptResponse, Error> {
        let result = self.decrypt_inner(c, &r).await;
        self.guard
            .gate
            .data_done(c, Action::Decrypt, &r.tenant_id, &r.field, &result);
        result
    }

    async fn decrypt_inner(
        &self,
        c: &Caller,
        r: &DecryptRequest,
    ) -> Result<DecryptResponse, Error> {
        let gate = &self.guard.gate;
        gate.data(c, Action::Decrypt, &r.tenant_id, &r.field)?;
        gate.decrypt_quota(c, &r.tenant_id, 1).await?;
        self.guard.check_field("ciphertext", r.ciphertext.len())?;
        let aad = Aad {
            tenant: &r.tenant_id,
            subject: subject(&r.subject_id),
            field: &r.field,
            context: &r.context,
        };
        let (pt, key_version) = self.keyring.decrypt_versioned(&aad, &r.ciphertext).await?;
        Ok(DecryptResponse {
            plaintext: pt.to_vec(),
            key_version,
        })
    }
}

#[tonic::async_trait]
impl pb::crypto_server::Crypto for CryptoService {
    async fn encrypt(
        &self,
        req: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = async {
            self.encrypt_one(&c, req.into_inner())
                .await
                .map_err(|e| status::to_status(&e))
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn decrypt(
        &self,
        req: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = async {
            self.decrypt_one(&c, req.into_inner())
                .await
                .map_err(|e| status::to_status(&e))
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn encrypt_batch(
        &self,
        req: Request<EncryptBatchRequest>,
    ) -> Result<Response<EncryptBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let mut items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async {
            let mut results = Vec::with_capacity(items.len());
            {
                // Items of one batch usually share (tenant, subject, field): resolve
                // each distinct key once (a few per batch), not once per item.
                let mut resolved: Vec<(BatchKey<'_>, Result<Encryptor<'_>, Error>)> = Vec::new();
                for item in &items {
                    let result = match self.encrypt_batch_item(&c, item, &mut resolved).await {
                        Ok(ok) => encrypt_result::Result::Ok(ok),
                        Err(e) => encrypt_result::Result::Error(item_error(&e)),
                    };
                    results.push(EncryptResult {
                        result: Some(result),
                    });
                }
            }
            for item in &mut items {
                item.plaintext.zeroize();
            }
            Ok(EncryptBatchResponse { results })
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn rewrap(
        &self,
        req: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = async {
            self.rewrap_one(&c, &req.into_inner())
                .await
                .map_err(|e| status::to_status(&e))
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn rewrap_batch(
        &self,
        req: Request<RewrapBatchRequest>,
    ) -> Result<Response<RewrapBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async {
            let mut results = Vec::with_capacity(items.len());
            for item in &items {
                let result = match self.rewrap_one(&c, item).await {
                    Ok(ok) => rewrap_result::Result::Ok(ok),
                    Err(e) => rewrap_result::Result::Error(item_error(&e)),
                };
                results.push(RewrapResult {
                    result: Some(result),
                });
            }
            Ok(RewrapBatchResponse { results })
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn blind_index(
        &self,
        req: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = async {
            self.blind_index_one(&c, req.into_inner())
                .await
                .map_err(|e| status::to_status(&e))
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn blind_index_batch(
        &self,
        req: Request<pb::BlindIndexBatchRequest>,
    ) -> Result<Response<pb::BlindIndexBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async { Ok(self.blind_index_batch(&c, items).await) };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn pseudonymize(
        &self,
        req: Request<pb::PseudonymizeRequest>,
    ) -> Result<Response<pb::PseudonymizeResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = async {
            self.pseudonymize_one(&c, req.get_ref())
                .await
                .map_err(|e| status::to_status(&e))
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn pseudonymize_batch(
        &self,
        req: Request<pb::PseudonymizeBatchRequest>,
    ) -> Result<Response<pb::PseudonymizeBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async { Ok(self.pseudonymize_batch(&c, &items).await) };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn decrypt_batch(
        &self,
        req: Request<DecryptBatchRequest>,
    ) -> Result<Response<DecryptBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async {
            let mut results = Vec::with_capacity(items.len());
            for item in items {
                let result = match self.decrypt_one(&c, item).await {
                    Ok(ok) => decrypt_result::Result::Ok(ok),
                    Err(e) => decrypt_result::Result::Error(item_error(&e)),
                };
                results.push(DecryptResult {
                    result: Some(result),
                });
            }
            Ok(DecryptBatchResponse { results })
        };
        self.guard.run(fut).await.map(Response::new)
    }
}

/// The `fieldkey.v1.Keys` administration service.
#[derive(Debug, Clone)]
pub struct KeysService {
    keyring: Arc<Keyring>,
    guard: Guard,
    rotation: RotationPolicy,
}

impl KeysService {
    /// A service over `keyring`, enforcing `guard`'s limits and judging key ages by
    /// `rotation`.
    pub fn new(keyring: Arc<Keyring>, guard: Guard, rotation: RotationPolicy) -> Self {
        Self {
            keyring,
            guard,
            rotation,
        }
    }
}

fn rotation_status(s: RotationStatus) -> pb::RotationStatus {
    match s {
        RotationStatus::Ok => pb::RotationStatus::Ok,
        RotationStatus::DueSoon => pb::RotationStatus::DueSoon,
        RotationStatus::Overdue => pb::RotationStatus::Overdue,
        RotationStatus::NoActiveKey => pb::RotationStatus::NoActiveKey,
    }
}

fn tenant_reply(r: Result<TenantInfo, Error>) -> Result<pb::Tenant, Status> {
    r.map(tenant_pb).map_err(|e| status::to_status(&e))
}

fn key_state(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Active => pb::KeyState::Active,
        KeyState::DecryptOnly => pb::KeyState::DecryptOnly,
        KeyState::Suspended => pb::KeyState::Suspended,
        KeyState::Destroyed => pb::KeyState::Destroyed,
        KeyState::Retired => pb::KeyState::Retired,
    }
}

fn tenant_pb(t: TenantInfo) -> pb::Tenant {
    pb::Tenant {
        active_version: t.active_version().unwrap_or(0),
        tenant_id: t.tenant_id,
        kms_key_id: t.kms_key_id,
        created_at_unix_ms: t.created_at,
        versions: t
            .versions
            .into_iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                state: key_state(v.state) as i32,
                kms_key_id: v.kms_key_id,
                fingerprint: v.fingerprint.to_string(),
                created_at_unix_ms: v.created_at,
                updated_at_unix_ms: v.updated_at,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::keys_server::Keys for KeysService {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        self.guard
            .gate
            .admin(&c, Action::WhoAmI, None)
            .await
            .map_err(|e| status::to_status(&e))?;
        Ok(Response::new(pb::WhoAmIResponse {
            identity: c.identity.to_string(),
            transport: c.transport.into(),
        }))
    }

    async fn create_tenant(
        &self,
        req: Request<CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let c = self.guard.gate.caller(&req);
        let tenant = Some(req.get_ref().tenant_id.clone());
        self.guard
            .gate
            .admin(&c, Action::CreateTenant, tenant.as_deref())
            .await
            .map_err(|e| status::to_status(&e))?;
        let r = req.into_inner();
        let kms_key = (!r.kms_key_id.is_empty()).then_some(r.kms_key_id.as_str());
        let fut = async { tenant_reply(self.keyring.create_tenant(&r.tenant_id, kms_key).await) };
        let t = self.guard.run(fut).await?;
        self.guard
            .gate
            .admin_done(
                &c,
                "tenant.created",
                "tenant",
                &r.tenant_id,
                Some(&r.tenant_id),
                serde_json::json!({ "kms_key_id": t.kms_key_id }),
            )
            .await;
        Ok(Response::new(t))
    }

    async fn get_tenant(
        &self,
        req: Request<GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let c = self.guard.gate.caller(&req);
        let tenant = Some(req.get_ref().tenant_id.clone());
        self.guard
            .gate
            .admin(&c, Action::GetTenant, tenant.as_deref())
            .await
            .map_err(|e| status::to_status(&e))?;
        let fut = async { tenant_reply(self.keyring.tenant(&req.into_inner().tenant_id).await) };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let tenant = None::<String>;
        self.guard
            .gate
            .admin(&c, Action::ListTenants, tenant.as_deref())
            .await
            .map_err(|e| status::to_status(&e))?;
        let fut = async {
            self.keyring
                .list_tenants()
                .await
                .map(|tenant_ids| pb::ListTenantsResponse { tenant_ids })
                .map_err(|e| status::to_status(&e))
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn check_rotation(
        &self,
        req: Request<pb::CheckRotationRequest>,
    ) -> Result<Response<pb::CheckRotationResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let tenant = None::<String>;
        self.guard
            .gate
            .admin(&c, Action::CheckRotation, tenant.as_deref())
            .await
            .map_err(|e| status::to_status(&e))?;
        let dry_run = req.into_inner().dry_run;
        // Rotating many tenants can outlast the per-call deadline; it is not run under
        // the guard's timeout (each rotation is short and idempotent).
        let checks = self
            .keyring
            .rotate_due(&self.rotation, now_ms(), dry_run)
            .await
            .map_err(|e| status::to_status(&e))?;
        for ch in checks.iter().filter(|ch| ch.rotated_to.is_some()) {
            self.guard
                .gate
                .admin_done(
                    &c,
                    "tenant.rotated",
                    "tenant",
                    &ch.age.tenant_id,
                    Some(&ch.age.tenant_id),
                    serde_json::json!({ "version": ch.rotated_to, "by": "rotation policy" }),
                )
                .await;
        }
        Ok(Response::new(pb::CheckRotationResponse {
            max_key_age_days: self.rotation.max_key_age_days,
            warn_days: self.rotation.warn_days,
            tenants: checks
                .into_iter()
                .map(|c| pb::TenantKeyAge {
                    tenant_id: c.age.tenant_id,
                    active_version: c.age.active_version.unwrap_or(0),
                    active_since_unix_ms: c.age.active_since,
                    age_ms: c.age.age_ms,
                    status: rotation_status(c.age.status) as i32,
                    rotated_to: c.rotated_to.unwrap_or(0),
                    error: c.error.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn rewrap_kms_key(
        &self,
        req: Request<pb::RewrapKmsKeyRequest>,
    ) -> Result<Response<pb::RewrapKmsKeyResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let tenant = Some(req.get_ref().tenant_id.clone());
        self.guard
            .gate
            .admin(&c, Action::RewrapKmsKey, tenant.as_deref())
            .await
            .map_err(|e| status::to_status(&e))?;
        let r = req.into_inner();
        let out = self
            .keyring
            .rewrap_kms_key(&r.tenant_id, &r.kms_key_id)
            .await
            .map_err(|e| status::to_status(&e))?;
        self.guard
            .gate
            .admin_done(
                &c,
                "tenant.kms-key-rewrapped",
                "tenant",
                &r.tenant_id,
                Some(&r.tenant_id),
                serde_json::json!({ "kms_key_id": out.kms_key_id, "rewrapped": out.rewrapped }),
            )
            .await;
        Ok(Response::new(pb::RewrapKmsKeyResponse {
            tenant_id: out.tenant_id,
            kms_key_id: out.kms_key_id,
            rewrapped: out.rewrapped,
            already: out.already,
            without_material: out.without_material,
        }))
    }

    async fn retire_key_version(
        &self,
        req: Request<pb::RetireKeyVersionRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let c = self.guard.gate.caller(&req);
        let tenant = Some(req.get_ref().tenant_id.clone());
        self.guard
            .gate
            .admin(&c, Action::RetireKeyVersion, tenant.as_deref())
            .await
            .map_err(|e| status::to_status(&e))?;
        let r = req.into_inner();
        let t = tenant_reply(
            self.keyring
                .retire_key_version(&r.tenant_id, r.version)
                .await,
        )?;
        self.guard
            .gate
            .admin_done(
                &c,
                "tenant.version-retired",
                "tenant",
                &r.tenant_id,
                Some(&r.tenant_id),
                serde_json::json!({ "version": r.version }),
            )
            .await;
        Ok(Response::new(t))
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let c = self.guard.gate.caller(&req);
        let tenant = Some(req.get_ref().tenant_id.clone());
        self.guard
            .gate
            .admin(&c, Action::RotateTenantKey, tenant.as_deref())
            .await
            .map_err(|e| status::to_status(&e))?;
        let id = req.into_inner().tenant_id;
        let fut = async { tenant_reply(self.keyring.rotate_tenant(&id).await) };
        let t = self.guard.run(fut).await?;
        self.guard
            .gate
            .admin_done(
                &c,
                "tenant.rotated",
                "tenant",
                &id,
                Some(&id),
                serde_json::json!({ "version": t.active_version }),
            )
            .await;
        Ok(Response::new(t))
    }
}

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
    reporter
        .set_serving::<pb::crypto_server::CryptoServer<CryptoService>>()
        .await;
    reporter
        .set_serving::<pb::keys_server::KeysServer<KeysService>>()
        .await;
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
    let jobs =
        pb::jobs_server::JobsServer::new(jobs::JobsService::new(keyring.clone(), gate.clone()));
    let audit_svc = pb::audit_server::AuditServer::new(audit::AuditService::new(
        keyring,
        audit,
        gate.clone(),
        report,
    ));
    reporter
        .set_serving::<pb::audit_server::AuditServer<audit::AuditService>>()
        .await;
    reporter
        .set_serving::<pb::jobs_server::JobsServer<jobs::JobsService>>()
        .await;
    let erasures =
        pb::erasures_server::ErasuresServer::new(erasure::ErasuresService::new(erasures, gate));
    reporter
        .set_serving::<pb::erasures_server::ErasuresServer<erasure::ErasuresService>>()
        .await;
    Ok(tonic::service::Routes::new(crypto)
        .add_service(keys)
        .add_service(jobs)
        .add_service(erasures)
        .add_service(audit_svc)
        .add_service(health)
        .add_service(reflection))
}
