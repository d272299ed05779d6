//! Who is calling, may they, and the audit trail of it: the caller identity (mTLS
//! SAN; the configured local identity on the loopback and Unix-socket listeners;
//! Linkerd's `l5d-client-id` only when configured to trust it, and then only on the
//! TCP listener declared behind the Linkerd proxy and from a peer inside the pod), the
//! authorization decision (Cedar policies, default deny), the decrypt-rate guard, and
//! the audit records (data operations counted per window; administration one record
//! each).
//!
//! Identity rules ([`Gate::screen`] refuses, before any handler runs; [`Gate::caller`]
//! names the caller of a screened call):
//! - mTLS: the client certificate's typed SAN; an `l5d-client-id` header is ignored.
//! - The listener declared behind the Linkerd proxy (`transport::linkerd`): a peer
//!   outside the pod is refused (`NOT_THROUGH_MESH_PROXY`, UNAUTHENTICATED), header or
//!   not: the proxy connects from inside the pod, so this caller went around it. From
//!   inside, the header names the caller when trusted, else the local identity.
//! - Any other plaintext listener: with the header trusted, a request carrying it is
//!   refused (`IDENTITY_HEADER_UNTRUSTED`, UNAUTHENTICATED): a forged identity is
//!   refused loudly, not served quietly as the local identity. With the header not
//!   trusted, it is ignored.

use std::sync::Arc;

use serde_json::json;
use tonic::Request;

use crate::audit::{AuditEvent, AuditLog, mask_ip};
use crate::erasure::Actor;
use crate::error::{Error, IdentityRefusal};
use crate::policy::authz::{
    Action, Authorizer, AuthzRequest, DecryptGuard, TRANSPORT_LINKERD, TRANSPORT_LOCAL,
    TRANSPORT_MTLS,
};
use crate::transport::linkerd::ProxiedConnInfo;
use crate::transport::mtls::CallerInfo;

/// Linkerd's header naming the meshed caller.
const LINKERD_ID_HEADER: &str = "l5d-client-id";

/// The identity given to a refused call if it ever reached a handler unscreened (no
/// policy names it; [`Gate::screen`] refuses such calls first).
const REFUSED_IDENTITY: &str = "fieldkey:refused-identity";

/// Where identities come from.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The identity of callers on the loopback TCP and Unix-socket listeners (the
    /// pod's own identity: they are in the pod).
    pub local_identity: Arc<str>,
    /// Take the identity from Linkerd's `l5d-client-id` header, on the TCP listener
    /// declared behind the pod's Linkerd proxy only (which sets it and strips it from
    /// clients' requests), from peers inside the pod only. Elsewhere a request carrying
    /// it is refused.
    pub trust_linkerd: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            local_identity: Arc::from("local"),
            trust_linkerd: false,
        }
    }
}

/// A caller, as the gate sees it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Identity.
    pub identity: Arc<str>,
    /// `local`, `mtls` or `linkerd`.
    pub transport: &'static str,
    /// Masked address.
    pub ip: Option<String>,
}

impl Caller {
    /// The caller as the erasure workflow's actor.
    pub fn actor(&self) -> Actor {
        Actor {
            id: self.identity.to_string(),
            ip: self.ip.clone(),
        }
    }
}

/// Authorization, rate guard and audit for every handler.
pub struct Gate {
    authz: Option<Arc<Authorizer>>,
    decrypt_guard: Option<DecryptGuard>,
    audit: Option<Arc<AuditLog>>,
    ids: IdentityConfig,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("authorization", &self.authz.is_some())
            .field("audit", &self.audit.is_some())
            .field("ids", &self.ids)
            .finish()
    }
}

use crate::audit::{OUTCOME_READ_REPAIR, OUTCOME_UNBOUND};

/// The read repairs of one (tenant, field) in a call (docs/ROTATION.md "Read repair"),
/// for the audit window: each is the `Crypto::Rewrap` it amounts to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repairs {
    /// Stale values returned re-encrypted under the active version.
    pub repaired: u64,
    /// Stale values whose repair failed (served on their old version).
    pub failed: u64,
    /// Values whose repair was refused (the caller may not rewrap the field): the
    /// call, item or column was refused.
    pub denied: u64,
}

impl Repairs {
    /// Counts what read repair found for one value.
    pub fn note(&mut self, r: &crate::keyring::ReadRepair) {
        match r {
            crate::keyring::ReadRepair::Repaired(_) => self.repaired += 1,
            crate::keyring::ReadRepair::Failed(_) => self.failed += 1,
            _ => {}
        }
    }

    /// Whether there is nothing to count.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn outcome<T>(r: &Result<T, Error>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => error_outcome(e),
    }
}

fn error_outcome(e: &Error) -> &'static str {
    match e {
        Error::PermissionDenied { .. } => "denied",
        Error::RateLimited(_) | Error::IndexRateLimited(_) => "rate_limited",
        _ => "failed",
    }
}

impl Gate {
    /// No authorization, no audit: every caller may do everything (development and
    /// tests; `fieldkey serve` warns loudly when it runs like this).
    pub fn open() -> Self {
        Self {
            authz: None,
            decrypt_guard: None,
            audit: None,
            ids: IdentityConfig::default(),
        }
    }

    /// A gate enforcing `authz` (and its decrypt limits) and writing to `audit`.
    pub fn new(
        authz: Option<Arc<Authorizer>>,
        audit: Option<Arc<AuditLog>>,
        ids: IdentityConfig,
    ) -> Self {
        let decrypt_guard = authz.clone().map(DecryptGuard::new);
        Self {
            authz,
            decrypt_guard,
            audit,
            ids,
        }
    }

    /// The authorization policy set in force, or `None` when authorization is off.
    pub fn authz_status(&self) -> Option<crate::policy::authz::PolicyStatus> {
        self.authz.as_ref().map(|a| a.status())
    }

    /// The audit log, if any.
    pub fn audit(&self) -> Option<&Arc<AuditLog>> {
        self.audit.as_ref()
    }

    /// Who is calling, or why the identity presented is refused (the rules are in
    /// the module documentation).
    fn identify<T>(&self, req: &Request<T>) -> Result<Caller, (IdentityRefusal, Option<String>)> {
        if let Some(c) = req.extensions().get::<CallerInfo>() {
            // The certificate names the caller; a header cannot override it.
            return Ok(Caller {
                identity: Arc::from(c.identity.as_str()),
                transport: TRANSPORT_MTLS,
                ip: c.remote_addr.map(|a| mask_ip(a.ip())),
            });
        }
        let header = req
            .metadata()
            .get(LINKERD_ID_HEADER)
            .map(|v| v.to_str().unwrap_or_default());
        let local = |ip| Caller {
            identity: self.ids.local_identity.clone(),
            transport: TRANSPORT_LOCAL,
            ip,
        };
        if let Some(conn) = req.extensions().get::<ProxiedConnInfo>() {
            let ip = conn.remote_addr.map(|a| mask_ip(a.ip()));
            if !conn.peer_in_pod() {
                return Err((IdentityRefusal::NotThroughProxy, ip));
            }
            return Ok(
                match header.filter(|v| self.ids.trust_linkerd && !v.is_empty()) {
                    Some(id) => Caller {
                        identity: Arc::from(id),
                        transport: TRANSPORT_LINKERD,
                        ip,
                    },
                    None => local(ip),
                },
            );
        }
        let ip = req.remote_addr().map(|a| mask_ip(a.ip()));
        if self.ids.trust_linkerd && header.is_some() {
            return Err((IdentityRefusal::HeaderOnUndeclaredListener, ip));
        }
        Ok(local(ip))
    }

    /// Refuses a call whose identity cannot be established as presented (run on every
    /// call before its handler, as an interceptor).
    ///
    /// # Errors
    /// UNAUTHENTICATED with reason `IDENTITY_HEADER_UNTRUSTED` or
    /// `NOT_THROUGH_MESH_PROXY`.
    pub fn screen<T>(&self, req: &Request<T>) -> Result<(), tonic::Status> {
        match self.identify(req) {
            Ok(_) => Ok(()),
            Err((refusal, ip)) => {
                tracing::warn!(caller_ip = ip.as_deref().unwrap_or("-"), reason = %refusal, "caller identity refused");
                let status = super::status::to_status(&Error::Unauthenticated(refusal));
                self.record_refusal(req, &status, ip);
                Err(status)
            }
        }
    }

    /// One `authz.unauthenticated` audit record of a refused identity (written off the
    /// request path), with the identity claimed, cut to 255 bytes: an attempt to pose
    /// as an operator belongs in the tamper-evident log, not only in the process log.
    fn record_refusal<T>(&self, req: &Request<T>, status: &tonic::Status, ip: Option<String>) {
        let (Some(audit), Ok(rt)) = (&self.audit, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let claimed = req
            .metadata()
            .get(LINKERD_ID_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .map(|mut c| {
                let mut end = c.len().min(255);
                while !c.is_char_boundary(end) {
                    end -= 1;
                }
                c.truncate(end);
                c
            });
        let reason = status
            .metadata()
            .get(super::status::REASON_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let audit = audit.clone();
        rt.spawn(async move {
            audit
                .event(AuditEvent {
                    action: "authz.unauthenticated".into(),
                    resource_type: "service".into(),
                    resource_id: "fieldkey".into(),
                    actor: REFUSED_IDENTITY.into(),
                    tenant_id: None,
                    caller_ip: ip,
                    details: json!({ "reason": reason, "claimed_identity": claimed }),
                })
                .await;
        });
    }

    /// Who is calling (a call refused by [`Gate::screen`] gets an identity no policy
    /// names).
    pub fn caller<T>(&self, req: &Request<T>) -> Caller {
        self.identify(req).unwrap_or_else(|(_, ip)| Caller {
            identity: Arc::from(REFUSED_IDENTITY),
            transport: TRANSPORT_LOCAL,
            ip,
        })
    }

    fn decide(
        &self,
        c: &Caller,
        action: Action,
        tenant: Option<&str>,
        field: Option<&str>,
    ) -> Result<(), Error> {
        // Bounded before anything is cached, counted or written to the audit log.
        for (what, v) in [("tenant_id", tenant), ("field", field)] {
            if v.is_some_and(|v| v.len() > 255) {
                return Err(Error::InvalidArgument(format!(
                    "{what} must be at most 255 bytes"
                )));
            }
        }
        let Some(authz) = &self.authz else {
            return Ok(());
        };
        let d = authz.authorize(&AuthzRequest {
            identity: &c.identity,
            transport: c.transport,
            action,
            tenant,
            field,
        });
        if d.allowed {
            Ok(())
        } else {
            Err(Error::PermissionDenied {
                reason: d.reason.to_string(),
            })
        }
    }

    /// May `c` do data operation `action` on `tenant`/`field`? (Counted by
    /// [`Gate::data_done`].)
    ///
    /// # Errors
    /// [`Error::PermissionDenied`].
    pub fn data(&self, c: &Caller, action: Action, tenant: &str, field: &str) -> Result<(), Error> {
        self.decide(c, action, Some(tenant), Some(field))
    }

    /// Takes `n` decrypted values from `c`'s allowance.
    ///
    /// # Errors
    /// [`Error::RateLimited`] (also recorded at once in the audit log).
    pub async fn decrypt_quota(&self, c: &Caller, tenant: &str, n: u32) -> Result<(), Error> {
        let Some(g) = &self.decrypt_guard else {
            return Ok(());
        };
        let r = g.check(&c.identity, n);
        self.rate_limited(c, Action::Decrypt, tenant, r).await
    }

    /// Takes `n` items of `action` ([`Action::BlindIndex`] or [`Action::Pseudonymize`])
    /// on `tenant`/`field` from `c`'s index budget: identities that may not decrypt
    /// `field` (by the policies in force) are held to the index budget of
    /// `limits.toml`, whose built-in default is low (a keyed hash inverted by a
    /// dictionary is a decryption).
    ///
    /// # Errors
    /// [`Error::RateLimited`] (also recorded at once in the audit log).
    pub async fn index_quota(
        &self,
        c: &Caller,
        action: Action,
        tenant: &str,
        field: &str,
        n: u32,
    ) -> Result<(), Error> {
        let Some(g) = &self.decrypt_guard else {
            return Ok(());
        };
        let may_decrypt = || {
            self.decide(c, Action::Decrypt, Some(tenant), Some(field))
                .is_ok()
        };
        let r = g.check_index(&c.identity, may_decrypt, n);
        self.rate_limited(c, action, tenant, r).await
    }

    /// A refusal of the guard: one audit record, and [`Error::RateLimited`].
    async fn rate_limited(
        &self,
        c: &Caller,
        action: Action,
        tenant: &str,
        r: Result<(), crate::policy::RateLimited>,
    ) -> Result<(), Error> {
        let Err(e) = r else { return Ok(()) };
        if let Some(a) = &self.audit {
            a.event(AuditEvent {
                action: "authz.rate_limited".into(),
                resource_type: "tenant".into(),
                resource_id: tenant.to_owned(),
                actor: c.identity.to_string(),
                tenant_id: Some(tenant.to_owned()),
                caller_ip: c.ip.clone(),
                details: json!({ "action": action.to_string(), "reason": e.to_string() }),
            })
            .await;
        }
        Err(match e.budget {
            crate::policy::Budget::Decrypt => Error::RateLimited(e.to_string()),
            crate::policy::Budget::Index => Error::IndexRateLimited(e.to_string()),
        })
    }

    /// Counts a batch's finished items in the audit window, by outcome: runs of items
    /// with the same (tenant, field, outcome) are counted with one update (the same
    /// records as one [`Gate::data_done`] per item, for less work per item).
    pub fn data_done_batch<'a, T: 'a>(
        &self,
        c: &Caller,
        action: Action,
        items: impl IntoIterator<Item = (&'a str, &'a str, &'a Result<T, Error>)>,
    ) {
        if self.audit.is_none() {
            return;
        }
        let mut run: Option<(&str, &str, &'static str, u64)> = None;
        let flush = |(tenant, field, o, n): (&str, &str, &'static str, u64)| {
            self.count(c, action, tenant, field, o, n);
        };
        for (tenant, field, result) in items {
            let o = outcome(result);
            match &mut run {
                Some((t, f, ro, n)) if *t == tenant && *f == field && *ro == o => *n += 1,
                _ => {
                    if let Some(r) = run.take() {
                        flush(r);
                    }
                    run = Some((tenant, field, o, 1));
                }
            }
        }
        if let Some(r) = run {
            flush(r);
        }
    }

    /// Counts a column's values in the audit window: `ok` successes, and each failure
    /// by outcome (one update per outcome, not per value).
    pub fn data_done_column(
        &self,
        c: &Caller,
        action: Action,
        tenant: &str,
        field: &str,
        ok: usize,
        errors: &[&Error],
    ) {
        if self.audit.is_none() {
            return;
        }
        let mut tally: Vec<(&'static str, u64)> = Vec::new();
        if ok > 0 {
            tally.push(("ok", u64::try_from(ok).unwrap_or(u64::MAX)));
        }
        for e in errors {
            let o = error_outcome(e);
            match tally.iter_mut().find(|(k, _)| *k == o) {
                Some((_, n)) => *n += 1,
                None => tally.push((o, 1)),
            }
        }
        for (o, n) in tally {
            self.count(c, action, tenant, field, o, n);
        }
    }

    /// [`Gate::data_unbound`] for `n` values of a column.
    pub fn data_unbound_n(&self, c: &Caller, action: Action, tenant: &str, field: &str, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.count(c, action, tenant, field, OUTCOME_UNBOUND, n);
    }

    /// Counts, beside its `ok` outcome, a data operation that carried no row context
    /// (outcome `unbound` in the audit window; the compliance report lists the fields).
    pub fn data_unbound(&self, c: &Caller, action: Action, tenant: &str, field: &str) {
        self.count(c, action, tenant, field, OUTCOME_UNBOUND, 1);
    }

    /// Counts read repairs in the audit window as the `Crypto::Rewrap` they are (an
    /// explicit Rewrap call is counted the same way): outcome `ok` for each value
    /// repaired, and `read_repair` beside it (which of the `ok` were read repairs);
    /// `failed` and `denied` as for any data operation.
    pub fn data_repairs(&self, c: &Caller, tenant: &str, field: &str, r: Repairs) {
        for (outcome, n) in [
            ("ok", r.repaired),
            (OUTCOME_READ_REPAIR, r.repaired),
            ("failed", r.failed),
            ("denied", r.denied),
        ] {
            if n > 0 {
                self.count(c, Action::Rewrap, tenant, field, outcome, n);
            }
        }
    }

    /// Counts a finished data operation in the audit window, by outcome.
    pub fn data_done<T>(
        &self,
        c: &Caller,
        action: Action,
        tenant: &str,
        field: &str,
        result: &Result<T, Error>,
    ) {
        self.count(c, action, tenant, field, outcome(result), 1);
    }

    /// `n` data operations of `c` counted in the audit window under `outcome`.
    fn count(
        &self,
        c: &Caller,
        action: Action,
        tenant: &str,
        field: &str,
        outcome: &'static str,
        n: u64,
    ) {
        if let Some(a) = &self.audit {
            a.data(
                &c.identity,
                c.ip.as_deref(),
                tenant,
                field,
                action.as_str(),
                outcome,
                n,
            );
        }
    }

    /// May `c` call administration RPC `action` (on `tenant`, if it names one)? A
    /// refusal is one audit record.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`].
    pub async fn admin(
        &self,
        c: &Caller,
        action: Action,
        tenant: Option<&str>,
    ) -> Result<(), Error> {
        let r = self.decide(c, action, tenant, None);
        if let (Err(Error::PermissionDenied { reason }), Some(a)) = (&r, &self.audit) {
            a.event(AuditEvent {
                action: "authz.denied".into(),
                resource_type: if tenant.is_some() {
                    "tenant"
                } else {
                    "service"
                }
                .into(),
                resource_id: tenant.unwrap_or("fieldkey").to_owned(),
                actor: c.identity.to_string(),
                tenant_id: tenant.map(str::to_owned),
                caller_ip: c.ip.clone(),
                details: json!({ "action": action.to_string(), "reason": reason }),
            })
            .await;
        }
        r
    }

    /// Records a key-management action that succeeded (one record).
    pub async fn admin_done(
        &self,
        c: &Caller,
        action: &str,
        resource_type: &str,
        resource_id: &str,
        tenant: Option<&str>,
        details: serde_json::Value,
    ) {
        if let Some(a) = &self.audit {
            a.event(AuditEvent {
                action: action.into(),
                resource_type: resource_type.into(),
                resource_id: resource_id.into(),
                actor: c.identity.to_string(),
                tenant_id: tenant.map(str::to_owned),
                caller_ip: c.ip.clone(),
                details,
            })
            .await;
        }
    }
}
