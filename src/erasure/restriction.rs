//! Restriction of processing (GDPR Art. 18) as an audited action: suspending and
//! resuming a subject's or a tenant's keys through the keyring.
//!
//! Does not erase anything; the key-state rules themselves are the keyring's.

use serde_json::json;

use crate::crypto::Scope;
use crate::error::{Error, Result};
use crate::model::KeyState;

use super::{Actor, Erasures, scope_of, target_event};

impl Erasures {
    /// Suspends (restricts processing of) a subject, or a whole tenant when `subject`
    /// is `None`: its keys neither encrypt nor decrypt until resumed. Audited.
    /// Idempotent. A subject with no key yet gets one, suspended, so that nothing can
    /// be written for it either.
    ///
    /// # Errors
    /// [`Error::KeyDestroyed`] for a shredded subject; not-found errors; store errors.
    pub async fn suspend(&self, actor: &Actor, tenant: &str, subject: Option<&str>) -> Result<()> {
        self.restrict(actor, tenant, subject, true).await
    }

    /// Lifts a suspension. Audited. Idempotent.
    ///
    /// # Errors
    /// As [`Erasures::suspend`].
    pub async fn resume(&self, actor: &Actor, tenant: &str, subject: Option<&str>) -> Result<()> {
        self.restrict(actor, tenant, subject, false).await
    }

    pub(super) async fn restrict(
        &self,
        actor: &Actor,
        tenant: &str,
        subject: Option<&str>,
        suspend: bool,
    ) -> Result<()> {
        let k = &self.keyring;
        let before = match subject {
            // Restricting a subject with no data yet: give it a key now, so that its
            // first write is already restricted.
            Some(s) if suspend => match k.subject(tenant, s).await {
                Err(Error::SubjectNotFound { .. }) => k.ensure_subject(tenant, s).await?.state,
                other => other?.state,
            },
            Some(s) => k.subject(tenant, s).await?.state,
            None => {
                let t = k.tenant(tenant).await?;
                let live = t
                    .versions
                    .iter()
                    .any(|v| !matches!(v.state, KeyState::Destroyed | KeyState::Retired));
                if !live {
                    // Nothing left to restrict: the tenant was erased.
                    return Err(Error::KeyDestroyed {
                        tenant: tenant.to_owned(),
                        scope: Scope::Tenant,
                        version: None,
                    });
                }
                tenant_state(&t)
            }
        };
        match (subject, suspend) {
            (Some(s), true) => drop(k.suspend_subject(tenant, s).await?),
            (Some(s), false) => drop(k.resume_subject(tenant, s).await?),
            (None, true) => drop(k.suspend_tenant(tenant).await?),
            (None, false) => drop(k.resume_tenant(tenant).await?),
        }
        let target = suspend == (before != KeyState::Suspended);
        if target {
            let (scope, _) = scope_of(subject);
            let action = format!("{scope}.{}", if suspend { "suspended" } else { "resumed" });
            self.store
                .append_audit(&target_event(action, actor, tenant, subject, json!({})))
                .await?;
        }
        Ok(())
    }
}

/// A tenant's restriction state for auditing: suspended if any version is.
fn tenant_state(t: &crate::keyring::TenantInfo) -> KeyState {
    if t.versions.iter().any(|v| v.state == KeyState::Suspended) {
        KeyState::Suspended
    } else {
        KeyState::Active
    }
}
