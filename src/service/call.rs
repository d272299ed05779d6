//! The audited call: the one walk through the gate that every handler takes.
//!
//! An administration RPC is [`Gate::admit`]ted (a refusal is audited by the gate), runs,
//! and on success writes its audit records with [`Admitted::audited`]; a failed call
//! writes none. A data operation runs through [`Gate::data_call`] (authorize, run, count
//! the outcome in the audit window, whatever it was) or [`Gate::counted`] when the
//! operation authorizes itself. Does NOT: decide (the gate's policies do), hold limits
//! (`guard`), or map errors other than through `status`.

use std::borrow::Cow;
use std::future::Future;

use tonic::{Request, Status};

use super::gate::{Caller, Gate};
use super::status::to_status;
use crate::error::Error;
use crate::policy::authz::Action;

/// One audit record of a finished administration call.
#[derive(Debug)]
pub(super) struct Record {
    action: Cow<'static, str>,
    resource_type: &'static str,
    resource_id: String,
    tenant: Option<String>,
    details: serde_json::Value,
}

impl Record {
    /// A record of `action` on `resource_type` `resource_id` (of `tenant`, if any).
    pub(super) fn new(
        action: impl Into<Cow<'static, str>>,
        resource_type: &'static str,
        resource_id: &str,
        tenant: Option<&str>,
        details: serde_json::Value,
    ) -> Self {
        Self {
            action: action.into(),
            resource_type,
            resource_id: resource_id.to_owned(),
            tenant: tenant.map(str::to_owned),
            details,
        }
    }

    /// A record of `action` on tenant `id` (the resource and the tenant both).
    pub(super) fn tenant(action: &'static str, id: &str, details: serde_json::Value) -> Self {
        Self::new(action, "tenant", id, Some(id), details)
    }
}

/// An administration call the gate has let in.
#[derive(Debug)]
pub(super) struct Admitted<'g> {
    gate: &'g Gate,
    caller: Caller,
}

impl Admitted<'_> {
    /// Who is calling.
    pub(super) fn caller(&self) -> &Caller {
        &self.caller
    }

    /// `result`, after writing the records `record` makes of its value, in order, when
    /// it succeeded (a failed call is not audited here).
    ///
    /// # Errors
    /// `result`'s own.
    pub(super) async fn audited<T, R>(
        &self,
        result: Result<T, Status>,
        record: impl FnOnce(&T) -> R,
    ) -> Result<T, Status>
    where
        R: IntoIterator<Item = Record>,
    {
        let value = result?;
        for r in record(&value) {
            self.record(r).await;
        }
        Ok(value)
    }

    /// Writes one record of this call now (for a call audited before it streams).
    pub(super) async fn record(&self, r: Record) {
        self.gate
            .admin_done(
                &self.caller,
                &r.action,
                r.resource_type,
                &r.resource_id,
                r.tenant.as_deref(),
                r.details,
            )
            .await;
    }
}

impl Gate {
    /// The caller of `req`, once they may call administration RPC `action` (on
    /// `tenant`, if it names one). A refusal is one audit record ([`Gate::admin`]).
    ///
    /// # Errors
    /// The refusal's status (`PERMISSION_DENIED`, or `INVALID_ARGUMENT` for an
    /// oversized tenant id).
    pub(super) async fn admit<T>(
        &self,
        req: &Request<T>,
        action: Action,
        tenant: Option<&str>,
    ) -> Result<Admitted<'_>, Status> {
        let caller = self.caller(req);
        self.admin(&caller, action, tenant)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Admitted { gate: self, caller })
    }

    /// Runs data operation `op` once `c` may do `action` on `tenant`/`field`, and
    /// counts the outcome (a refusal too) in the audit window.
    ///
    /// # Errors
    /// The refusal, or `op`'s error.
    pub(super) async fn data_call<T>(
        &self,
        c: &Caller,
        action: Action,
        tenant: &str,
        field: &str,
        op: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let authorized_op = async {
            self.data(c, action, tenant, field)?;
            op.await
        };
        self.counted(c, action, tenant, field, authorized_op).await
    }

    /// Runs data operation `op`, which authorizes itself, and counts its outcome in the
    /// audit window.
    ///
    /// # Errors
    /// `op`'s.
    pub(super) async fn counted<T>(
        &self,
        c: &Caller,
        action: Action,
        tenant: &str,
        field: &str,
        op: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let result = op.await;
        self.data_done(c, action, tenant, field, &result);
        result
    }
}
