//! Reads the audit chain: verifies it to its last signed checkpoint with the checkpoint
//! keys (pinned, or read from the store), and indexes what later sections look up in it
//! (erasure requests, completions, cancellations and restorations, suspensions, sealed
//! key epochs).
//!
//! Does not: judge the chain's freshness (the verdict rules do) or write anything.

use ed25519_dalek::VerifyingKey;

use crate::audit::AuditRecord;
use crate::audit::verify::{self, verify_store};
use crate::erasure::receipt::{self, rfc3339_ms};
use crate::error::Result;
use crate::store::KeyStore;

use super::super::facts::AuditIndex;
use super::super::model::{
    ANCHORS_KEY_STORE, ANCHORS_PINNED, AuditSection, Options, Period, PromiseId, UnboundField,
    Verdict,
};

/// The public keys the store records for `purpose`; a malformed one is reported in
/// `unreadable` (and verifies nothing) instead of failing the report.
pub(in crate::report) async fn store_keys(
    store: &dyn KeyStore,
    purpose: &str,
    unreadable: &mut Vec<String>,
) -> Result<Vec<VerifyingKey>> {
    let mut out = Vec::new();
    for rec in store.signing_keys(purpose).await? {
        let key = <[u8; 32]>::try_from(rec.public_key.as_slice())
            .ok()
            .and_then(|b| VerifyingKey::from_bytes(&b).ok());
        match key {
            Some(vk) => out.push(vk),
            None => unreadable.push(format!(
                "signing key {} ({purpose}) is not an Ed25519 public key",
                rec.key_id
            )),
        }
    }
    Ok(out)
}

/// The audit chain verified, as its section (verdict still to be refined), and the
/// index of what it records.
pub(in crate::report) async fn read_chain(
    store: &dyn KeyStore,
    opts: &Options,
    period: &Period,
    unreadable: &mut Vec<String>,
) -> Result<(AuditSection, AuditIndex)> {
    let (audit_keys, key_source) = match &opts.audit_keys {
        Some(k) => (k.clone(), ANCHORS_PINNED),
        None => (
            store_keys(store, crate::audit::CHECKPOINT_PURPOSE, unreadable).await?,
            ANCHORS_KEY_STORE,
        ),
    };
    let mut index = AuditIndex::default();
    let verified = verify_store(store, audit_keys.clone(), |r: &AuditRecord| {
        index_record(&mut index, period, r);
    })
    .await?;
    let mut section = audit_section(verified, key_source, &audit_keys, index.in_period);
    section.unbound_fields = index
        .unbound
        .iter()
        .filter(|((t, _), _)| opts.tenant.as_ref().is_none_or(|only| only == t))
        .map(|((tenant, field), n)| UnboundField {
            tenant_id: tenant.clone(),
            field: field.clone(),
            encrypted_without_context: *n,
        })
        .collect();
    Ok((section, index))
}

/// Adds what `r` says to `index`.
fn index_record(index: &mut AuditIndex, period: &Period, r: &AuditRecord) {
    if period.contains(r.ts) {
        index.in_period += 1;
        let d = &r.event.details;
        if r.event.resource_type == "field"
            && d.get("outcome").and_then(|v| v.as_str()) == Some(crate::audit::OUTCOME_UNBOUND)
            && let (Some(tenant), Some(count)) =
                (&r.event.tenant_id, d.get("count").and_then(|v| v.as_u64()))
            && let Some(field) = r.event.resource_id.strip_prefix(&format!("{tenant}/"))
        {
            *index
                .unbound
                .entry((tenant.clone(), field.to_owned()))
                .or_default() += count;
        }
    }
    let erasure_id = r.event.details.get("erasure_id").and_then(|v| v.as_str());
    let resource = || {
        (
            r.event.tenant_id.clone().unwrap_or_default(),
            r.event.resource_type.clone(),
            r.event.resource_id.clone(),
        )
    };
    match (r.event.action.as_str(), erasure_id) {
        ("erasure.completed", Some(id)) => {
            if let Some(digest) = r
                .event
                .details
                .get("receipt_sha256")
                .and_then(|v| v.as_str())
            {
                index
                    .completed
                    .insert(id.to_owned(), (r.seq, digest.to_owned()));
            }
        }
        ("erasure.requested", Some(id)) => {
            let tenant = r.event.tenant_id.clone().unwrap_or_default();
            let subject = (r.event.resource_type == "subject").then(|| r.event.resource_id.clone());
            index
                .requested
                .insert(id.to_owned(), (r.ts, tenant, subject));
        }
        ("erasure.cancelled", Some(id)) => {
            index.cancelled.insert(id.to_owned());
        }
        ("erasure.restored", Some(id)) => {
            index.restored.insert(id.to_owned());
        }
        ("epoch.sealed", _) => {
            let digest = r.event.details.get("seal_sha256").and_then(|v| v.as_str());
            if let (Ok(epoch), Some(d)) = (r.event.resource_id.parse::<u64>(), digest) {
                index.sealed.insert(epoch, (r.seq, d.to_owned()));
            }
        }
        ("subject.suspended" | "tenant.suspended", _) => {
            index.suspended.insert(resource(), r.seq);
        }
        // A later resumption voids the suspension record: a new suspension needs
        // its own.
        ("subject.resumed" | "tenant.resumed", _) => {
            index.suspended.remove(&resource());
        }
        _ => {}
    }
}

/// The chain's section, from its verification.
fn audit_section(
    verified: std::result::Result<verify::Summary, verify::VerifyError>,
    key_source: &str,
    keys: &[VerifyingKey],
    in_period: u64,
) -> AuditSection {
    let key_ids = keys.iter().map(receipt::key_id).collect();
    match verified {
        Ok(s) => {
            let (cp_seq, cp_at, cp_ms) = match s.last_checkpoint {
                Some((seq, ts)) => (Some(seq), Some(rfc3339_ms(ts)), Some(ts)),
                None => (None, None, None),
            };
            AuditSection {
                promise: PromiseId::AuditLog,
                // Refined by `audit_freshness` (checkpoints, empty log).
                verdict: Verdict::Met,
                verified: true,
                error: None,
                records: s.records,
                last_seq: s.last_seq,
                checkpoints: s.checkpoints,
                last_checkpoint_seq: cp_seq,
                last_checkpoint_at: cp_at,
                last_checkpoint_unix_ms: cp_ms,
                records_after_last_checkpoint: s.last_seq.saturating_sub(cp_seq.unwrap_or(0)),
                records_in_period: in_period,
                key_source: key_source.into(),
                key_ids,
                unbound_fields: Vec::new(),
            }
        }
        Err(e) => AuditSection {
            promise: PromiseId::AuditLog,
            verdict: Verdict::NotMet,
            verified: false,
            error: Some(e.to_string()),
            records: 0,
            last_seq: 0,
            checkpoints: 0,
            last_checkpoint_seq: None,
            last_checkpoint_at: None,
            last_checkpoint_unix_ms: None,
            records_after_last_checkpoint: 0,
            records_in_period: in_period,
            key_source: key_source.into(),
            key_ids,
            unbound_fields: Vec::new(),
        },
    }
}
