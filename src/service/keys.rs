//! The `fieldkey.v1.Keys` administration service: tenants, their key versions,
//! rotation and KMS-key rewrapping, and `WhoAmI`.
//!
//! Does NOT: decide key lifecycles (the keyring does) or write audit records other than
//! through the gate.

use std::sync::Arc;

use serde_json::json;
use tonic::{Request, Response, Status};

use super::call::Record;
use super::guard::Guard;
use super::status;
use crate::error::Error;
use crate::keyring::{Keyring, TenantInfo};
use crate::model::{KeyState, now_ms};
use crate::policy::authz::Action;
use crate::policy::{RotationPolicy, RotationStatus};
use crate::proto::pb::{self, CreateTenantRequest, GetTenantRequest, RotateTenantKeyRequest};

/// The `fieldkey.v1.Keys` administration service.
#[derive(Debug, Clone)]
pub struct KeysService {
    keyring: Arc<Keyring>,
    guard: Guard,
    rotation: RotationPolicy,
    epochs: Arc<crate::epochs::Epochs>,
}

impl KeysService {
    /// A service over `keyring`, enforcing `guard`'s limits and judging key ages by
    /// `rotation`.
    pub fn new(
        keyring: Arc<Keyring>,
        guard: Guard,
        rotation: RotationPolicy,
        epochs: Arc<crate::epochs::Epochs>,
    ) -> Self {
        Self {
            keyring,
            guard,
            rotation,
            epochs,
        }
    }

    async fn epoch_status(&self) -> Result<pb::EpochStatus, Error> {
        let st = self.epochs.status().await?;
        Ok(pb::EpochStatus {
            active_epoch: st.active.unwrap_or(0),
            restorable_backups_since_unix_ms: st.restorable_backups_since_unix_ms.unwrap_or(0),
            rolling: st.rolling_here,
            last_error: st.last_error.clone().unwrap_or_default(),
            roll_overdue: st.roll_overdue,
            status_json: serde_json::to_string(&st)
                .map_err(|e| Error::Internal(format!("epoch status: {e}")))?,
        })
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

pub(super) fn key_state(s: KeyState) -> pb::KeyState {
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
        let call = self.guard.gate.admit(&req, Action::WhoAmI, None).await?;
        let c = call.caller();
        Ok(Response::new(pb::WhoAmIResponse {
            identity: c.identity.to_string(),
            transport: c.transport.into(),
        }))
    }

    async fn create_tenant(
        &self,
        req: Request<CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = req.get_ref();
        let call = (self.guard.gate)
            .admit(&req, Action::CreateTenant, Some(&r.tenant_id))
            .await?;
        let kms_key = (!r.kms_key_id.is_empty()).then_some(r.kms_key_id.as_str());
        let fut = async { tenant_reply(self.keyring.create_tenant(&r.tenant_id, kms_key).await) };
        call.audited(self.guard.run(fut).await, |t| {
            let details = json!({ "kms_key_id": t.kms_key_id });
            [Record::tenant("tenant.created", &r.tenant_id, details)]
        })
        .await
        .map(Response::new)
    }

    async fn get_tenant(
        &self,
        req: Request<GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = &req.get_ref().tenant_id;
        (self.guard.gate)
            .admit(&req, Action::GetTenant, Some(id))
            .await?;
        let fut = async { tenant_reply(self.keyring.tenant(id).await) };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn roll_epoch(
        &self,
        req: Request<pb::RollEpochRequest>,
    ) -> Result<Response<pb::EpochStatus>, Status> {
        let call = (self.guard.gate)
            .admit(&req, Action::RollEpoch, None)
            .await?;
        let finish_only = req.get_ref().finish_only;
        let out = async {
            let lease = self.epochs.status().await?;
            if !self.epochs.rolling_here()
                && let Some(owner) = lease.roll_owner
            {
                return Err(Error::RollInProgress { owner });
            }
            self.epochs.start_roll(!finish_only);
            self.epoch_status().await
        }
        .await
        .map_err(|e| status::to_status(&e));
        let out = call
            .audited(out, |st| {
                [Record::new(
                    "epoch.roll-started",
                    "key-epoch",
                    &st.active_epoch.to_string(),
                    None,
                    json!({ "finish_only": finish_only }),
                )]
            })
            .await?;
        Ok(Response::new(out))
    }

    async fn get_epoch_status(
        &self,
        req: Request<pb::GetEpochStatusRequest>,
    ) -> Result<Response<pb::EpochStatus>, Status> {
        (self.guard.gate)
            .admit(&req, Action::GetEpochStatus, None)
            .await?;
        self.guard.run(self.epoch_status()).await.map(Response::new)
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        (self.guard.gate)
            .admit(&req, Action::ListTenants, None)
            .await?;
        let fut = async {
            let tenant_ids = self.keyring.list_tenants().await?;
            Ok::<_, Error>(pb::ListTenantsResponse { tenant_ids })
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn check_rotation(
        &self,
        req: Request<pb::CheckRotationRequest>,
    ) -> Result<Response<pb::CheckRotationResponse>, Status> {
        let call = (self.guard.gate)
            .admit(&req, Action::CheckRotation, None)
            .await?;
        let dry_run = req.get_ref().dry_run;
        // Rotating many tenants can outlast the per-call deadline; it is not run under
        // the guard's timeout (each rotation is short and idempotent).
        let checks = self
            .keyring
            .rotate_due(&self.rotation, now_ms(), dry_run)
            .await
            .map_err(|e| status::to_status(&e));
        let checks = call
            .audited(checks, |checks| {
                let rotated = checks.iter().filter(|ch| ch.rotated_to.is_some());
                let record = |id: &str, version: Option<u32>| {
                    let details = json!({ "version": version, "by": "rotation policy" });
                    Record::tenant("tenant.rotated", id, details)
                };
                rotated
                    .map(|ch| record(&ch.age.tenant_id, ch.rotated_to))
                    .collect::<Vec<_>>()
            })
            .await?;
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
        let r = req.get_ref();
        let call = (self.guard.gate)
            .admit(&req, Action::RewrapKmsKey, Some(&r.tenant_id))
            .await?;
        let out = self
            .keyring
            .rewrap_kms_key(&r.tenant_id, &r.kms_key_id)
            .await
            .map_err(|e| status::to_status(&e));
        let out = call
            .audited(out, |out| {
                let details = json!({ "kms_key_id": out.kms_key_id, "rewrapped": out.rewrapped });
                [Record::tenant(
                    "tenant.kms-key-rewrapped",
                    &r.tenant_id,
                    details,
                )]
            })
            .await?;
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
        let r = req.get_ref();
        let call = (self.guard.gate)
            .admit(&req, Action::RetireKeyVersion, Some(&r.tenant_id))
            .await?;
        let t = tenant_reply(
            self.keyring
                .retire_key_version(&r.tenant_id, r.version)
                .await,
        );
        call.audited(t, |_| {
            let details = json!({ "version": r.version });
            [Record::tenant(
                "tenant.version-retired",
                &r.tenant_id,
                details,
            )]
        })
        .await
        .map(Response::new)
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let id = &req.get_ref().tenant_id;
        let call = (self.guard.gate)
            .admit(&req, Action::RotateTenantKey, Some(id))
            .await?;
        let fut = async { tenant_reply(self.keyring.rotate_tenant(id).await) };
        call.audited(self.guard.run(fut).await, |t| {
            let details = json!({ "version": t.active_version });
            [Record::tenant("tenant.rotated", id, details)]
        })
        .await
        .map(Response::new)
    }
}
