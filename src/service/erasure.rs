//! The `fieldkey.v1.Erasures` service: erasure requests and restriction of processing,
//! as the erasure workflow and privacy tooling call them. The workflow itself is in
//! `crate::erasure`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::status::to_status;
use crate::erasure::{Erasures, receipt};
use crate::error::Error;
use crate::model::{ErasureRecord, ErasureState, KeyState};
use crate::policy::authz::Action;
use crate::proto::pb;

use super::gate::Gate;

/// The Erasures service.
#[derive(Debug, Clone)]
pub struct ErasuresService {
    erasures: Arc<Erasures>,
    gate: Arc<Gate>,
}

impl ErasuresService {
    /// A service over the erasure workflow, behind `gate`.
    pub fn new(erasures: Arc<Erasures>, gate: Arc<Gate>) -> Self {
        Self { erasures, gate }
    }
}

fn state_pb(s: ErasureState) -> pb::ErasureState {
    match s {
        ErasureState::Scheduled => pb::ErasureState::Scheduled,
        ErasureState::Executing => pb::ErasureState::Executing,
        ErasureState::Completed => pb::ErasureState::Completed,
        ErasureState::Cancelled => pb::ErasureState::Cancelled,
    }
}

fn erasure_pb(r: ErasureRecord) -> pb::Erasure {
    pb::Erasure {
        erasure_id: r.erasure_id,
        tenant_id: r.tenant_id,
        subject_id: r.subject_id.unwrap_or_default(),
        state: state_pb(r.state) as i32,
        requested_by: r.requested_by,
        requested_at_unix_ms: r.requested_at,
        execute_after_unix_ms: r.execute_after,
        started_at_unix_ms: r.started_at.unwrap_or(0),
        completed_at_unix_ms: r.completed_at.unwrap_or(0),
        cancelled_by: r.cancelled_by.unwrap_or_default(),
        cancelled_at_unix_ms: r.cancelled_at.unwrap_or(0),
        attempts: r.attempts,
        last_error: r.last_error.unwrap_or_default(),
        receipt: r.receipt.unwrap_or_default(),
        audit_seq: r.audit_seq.unwrap_or(0),
    }
}

fn reply(r: Result<ErasureRecord, Error>) -> Result<Response<pb::Erasure>, Status> {
    r.map(|r| Response::new(erasure_pb(r)))
        .map_err(|e| to_status(&e))
}

impl ErasuresService {
    /// Admits a shred (`action` on `tenant`) and runs it in its own task, so that a
    /// caller who disconnects or times out does not interrupt it half-way (it would
    /// finish on retry anyway).
    async fn shred<T>(
        &self,
        req: &Request<T>,
        action: Action,
        (tenant, subject): (&str, Option<&str>),
        grace_seconds: u32,
    ) -> Result<Response<pb::Erasure>, Status> {
        let call = self.gate.admit(req, action, Some(tenant)).await?;
        let actor = call.caller().actor();
        let erasures = self.erasures.clone();
        let (tenant, subject) = (tenant.to_owned(), subject.map(str::to_owned));
        let grace = Duration::from_secs(u64::from(grace_seconds));
        let task = tokio::spawn(async move {
            let subject = subject.as_deref();
            erasures.request(&actor, &tenant, subject, grace).await
        });
        match task.await {
            Ok(r) => reply(r),
            Err(e) => Err(to_status(&Error::Internal(format!(
                "erasure task failed: {e}"
            )))),
        }
    }

    /// The tenant of erasure `id`, to authorize against (review finding 5: a caller
    /// granted erasures of one tenant must not read or cancel another's). `None` when it
    /// cannot be read: the call is then authorized service-wide, and the handler's own
    /// lookup reports why (not found, store down).
    async fn tenant_of(&self, id: &str) -> Option<String> {
        self.erasures.get(id).await.ok().map(|e| e.tenant_id)
    }

    async fn restriction(
        &self,
        req: Request<pb::RestrictionRequest>,
        suspend: bool,
    ) -> Result<Response<pb::Restriction>, Status> {
        // A whole tenant is its own action (review finding 5): a grant to restrict
        // subjects does not stop a tenant.
        let whole_tenant = req.get_ref().subject_id.is_empty();
        let action = match (suspend, whole_tenant) {
            (true, false) => Action::SuspendSubject,
            (false, false) => Action::ResumeSubject,
            (true, true) => Action::SuspendTenant,
            (false, true) => Action::ResumeTenant,
        };
        let tenant = Some(req.get_ref().tenant_id.as_str());
        let actor = self
            .gate
            .admit(&req, action, tenant)
            .await?
            .caller()
            .actor();
        let r = req.into_inner();
        let erasures = self.erasures.clone();
        let (tenant, subject_id) = (r.tenant_id.clone(), r.subject_id.clone());
        // In its own task: a caller who disconnects must not cut the state change from
        // its audit record.
        let task = tokio::spawn(async move {
            let subject = (!subject_id.is_empty()).then_some(subject_id.as_str());
            if suspend {
                erasures.suspend(&actor, &tenant, subject).await?;
            } else {
                erasures.resume(&actor, &tenant, subject).await?;
            }
            let k = erasures.keyring();
            Ok::<_, Error>(match subject {
                Some(s) => k.subject(&tenant, s).await?.state,
                None => {
                    let t = k.tenant(&tenant).await?;
                    if t.versions.iter().any(|v| v.state == KeyState::Suspended) {
                        KeyState::Suspended
                    } else {
                        KeyState::Active
                    }
                }
            })
        });
        let result = match task.await {
            Ok(r) => r.map_err(|e| to_status(&e))?,
            Err(e) => {
                return Err(to_status(&Error::Internal(format!(
                    "restriction task failed: {e}"
                ))));
            }
        };
        Ok(Response::new(pb::Restriction {
            tenant_id: r.tenant_id.clone(),
            subject_id: r.subject_id.clone(),
            state: super::keys::key_state(result) as i32,
        }))
    }
}

#[tonic::async_trait]
impl pb::erasures_server::Erasures for ErasuresService {
    async fn shred_subject(
        &self,
        req: Request<pb::ShredSubjectRequest>,
    ) -> Result<Response<pb::Erasure>, Status> {
        let r = req.get_ref();
        let target = (r.tenant_id.as_str(), Some(r.subject_id.as_str()));
        (self.shred(&req, Action::ShredSubject, target, r.grace_seconds)).await
    }

    async fn shred_tenant(
        &self,
        req: Request<pb::ShredTenantRequest>,
    ) -> Result<Response<pb::Erasure>, Status> {
        let r = req.get_ref();
        let target = (r.tenant_id.as_str(), None);
        (self.shred(&req, Action::ShredTenant, target, r.grace_seconds)).await
    }

    async fn cancel_erasure(
        &self,
        req: Request<pb::ErasureIdRequest>,
    ) -> Result<Response<pb::Erasure>, Status> {
        let tenant = self.tenant_of(&req.get_ref().erasure_id).await;
        let call = (self.gate)
            .admit(&req, Action::CancelErasure, tenant.as_deref())
            .await?;
        let actor = call.caller().actor();
        let id = req.into_inner().erasure_id;
        reply(self.erasures.cancel(&actor, &id).await)
    }

    async fn get_erasure(
        &self,
        req: Request<pb::ErasureIdRequest>,
    ) -> Result<Response<pb::Erasure>, Status> {
        let tenant = self.tenant_of(&req.get_ref().erasure_id).await;
        (self.gate)
            .admit(&req, Action::GetErasure, tenant.as_deref())
            .await?;
        reply(self.erasures.get(&req.into_inner().erasure_id).await)
    }

    async fn list_erasures(
        &self,
        req: Request<pb::ListErasuresRequest>,
    ) -> Result<Response<pb::ListErasuresResponse>, Status> {
        let t = &req.get_ref().tenant_id;
        let tenant = (!t.is_empty()).then_some(t.as_str());
        self.gate.admit(&req, Action::ListErasures, tenant).await?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => 1000,
            n => n.min(1000),
        };
        let tenant = (!r.tenant_id.is_empty()).then_some(r.tenant_id.as_str());
        let list = self
            .erasures
            .list(tenant, &r.page_token, size)
            .await
            .map_err(|e| to_status(&e))?;
        let full = u32::try_from(list.len()).unwrap_or(u32::MAX) == size;
        let next_page_token = match (full, list.last()) {
            (true, Some(last)) => last.erasure_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListErasuresResponse {
            erasures: list.into_iter().map(erasure_pb).collect(),
            next_page_token,
        }))
    }

    async fn suspend_subject(
        &self,
        req: Request<pb::RestrictionRequest>,
    ) -> Result<Response<pb::Restriction>, Status> {
        self.restriction(req, true).await
    }

    async fn resume_subject(
        &self,
        req: Request<pb::RestrictionRequest>,
    ) -> Result<Response<pb::Restriction>, Status> {
        self.restriction(req, false).await
    }

    async fn get_receipt_key(
        &self,
        req: Request<pb::GetReceiptKeyRequest>,
    ) -> Result<Response<pb::ReceiptKey>, Status> {
        self.gate.admit(&req, Action::GetReceiptKey, None).await?;
        let (key_id, vk) = self
            .erasures
            .public_key()
            .await
            .map_err(|e| to_status(&e))?;
        let pem =
            receipt::public_key_pem(&vk).map_err(|e| to_status(&Error::Internal(e.to_string())))?;
        Ok(Response::new(pb::ReceiptKey {
            key_id,
            public_key_pem: pem,
            public_key: vk.to_bytes().to_vec(),
        }))
    }
}
