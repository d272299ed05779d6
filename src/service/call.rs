//! The audited call: the one walk through the gate that every handler takes.
//!
//! An administration RPC is [`Gate::admit`]ted (a refusal is audited by the gate), runs,
//! and on success writes its audit records with [`Admitted::audited`]; a failed call
//! writes none. A data operation is a [`Gate::data_call`]: authorized first, and its
//! outcome, whatever it was, counted in the audit window. Does NOT: decide (the gate's policies do), hold limits
//! (`guard`), or map errors other than through `status`.

use std::borrow::Cow;

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

    /// Data operation `action` by `c` on `tenant`/`field`: [`DataCall::authorize`] it
    /// first thing in its body, and pass its result through [`DataCall::counted`].
    pub(super) fn data_call<'a>(
        &'a self,
        c: &'a Caller,
        action: Action,
        tenant: &'a str,
        field: &'a str,
    ) -> DataCall<'a> {
        DataCall {
            gate: self,
            caller: c,
            action,
            tenant,
            field,
        }
    }
}

/// One data operation (one item of a batch, or a unary call) as the gate sees it.
///
/// Not a wrapper around the operation's future on purpose: futures passed by value
/// through wrappers grow at each layer, and the authorizer needs its stack.
#[derive(Debug)]
pub(super) struct DataCall<'a> {
    gate: &'a Gate,
    caller: &'a Caller,
    action: Action,
    tenant: &'a str,
    field: &'a str,
}

impl DataCall<'_> {
    /// May the caller do it?
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] (or `InvalidArgument` for an oversized id).
    pub(super) fn authorize(&self) -> Result<(), Error> {
        (self.gate).data(self.caller, self.action, self.tenant, self.field)
    }

    /// `result`, once counted by outcome (a refusal too) in the audit window.
    ///
    /// # Errors
    /// `result`'s own.
    pub(super) fn counted<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        let (c, action) = (self.caller, self.action);
        (self.gate).data_done(c, action, self.tenant, self.field, &result);
        result
    }
}
