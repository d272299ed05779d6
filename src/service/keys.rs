//! The `fieldkey.v1.Keys` administration service: tenants, their key versions,
//! rotation and KMS-key rewrapping, and `WhoAmI`.
//!
//! Does NOT: decide key lifecycles (the keyring does) or write audit records other than
//! through the gate.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::guard::Guard;
use super::status;
use crate::error::Error;
use crate::keyring::{Keyring, TenantInfo};
use crate::policy::authz::Action;
use crate::policy::{RotationPolicy, RotationStatus};
use crate::proto::pb::{self, CreateTenantRequest, GetTenantRequest, RotateTenantKeyRequest};
use crate::store::{KeyState, now_ms};

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
