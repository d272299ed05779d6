//! Reads the tenants and their keys: the tenants reported on (all, or the one asked
//! for), each tenant's record, and its suspended subjects matched to the audit chain.
//!
//! Does not: judge rotation or restriction (the verdict rules do) or write anything.

use crate::error::{Error, Result};
use crate::keyring::TenantInfo;
use crate::model::KeyState;
use crate::store::KeyStore;

use super::super::facts::{AuditIndex, SuspendedSubjects};
use super::super::model::{MAX_LISTED_SUBJECTS, RestrictedSubject};
use crate::erasure::receipt::rfc3339_ms;

/// The tenants reported on: `all`, or only `filter`.
///
/// # Errors
/// [`Error::TenantNotFound`] when `filter` names no tenant: a report on nothing must
/// not read as "all met".
pub(in crate::report) fn tenant_ids(all: Vec<String>, filter: Option<&str>) -> Result<Vec<String>> {
    let mut ids = all;
    if let Some(t) = filter {
        ids.retain(|id| id == t);
        if ids.is_empty() {
            return Err(Error::TenantNotFound {
                tenant: t.to_owned(),
            });
        }
    }
    Ok(ids)
}

/// The tenant `id` as the keyring describes it (`None`: gone since it was listed).
pub(in crate::report) async fn tenant(
    store: &dyn KeyStore,
    id: &str,
) -> Result<Option<TenantInfo>> {
    Ok(store
        .get_tenant(id)
        .await?
        .map(|rec| TenantInfo::from(&rec)))
}

/// The suspended subjects of `tenant`, each with its suspension record if the audit
/// chain holds one.
pub(in crate::report) async fn suspended_subjects(
    store: &dyn KeyStore,
    tenant: &str,
    index: &AuditIndex,
) -> Result<SuspendedSubjects> {
    let mut out = SuspendedSubjects {
        count: 0,
        unrecorded: 0,
        listed: Vec::new(),
    };
    let mut after = String::new();
    loop {
        let page = store
            .subjects_in_state(tenant, KeyState::Suspended, &after, 1000)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.subject_id.clone();
        out.count += page.len() as u64;
        for s in page {
            let audit_seq = index.suspension(tenant, "subject", &s.subject_id);
            if audit_seq.is_none() {
                out.unrecorded += 1;
            }
            if out.listed.len() < MAX_LISTED_SUBJECTS {
                out.listed.push(RestrictedSubject {
                    since: rfc3339_ms(s.updated_at),
                    subject_id: s.subject_id,
                    audit_seq,
                });
            }
        }
    }
    Ok(out)
}
