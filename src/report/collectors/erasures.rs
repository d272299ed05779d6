//! Reads the erasure requests of the period, page by page, judges each with the receipt
//! keys and the key epochs judged (whether its key-store backups are sealed) and, for
//! each request proven erased, how many of its keys hold material again; and the
//! requests the audit chain records that the erasure table lost.
//!
//! Does not: judge a request (the verdict rules do) or write anything.

use std::collections::HashSet;

use ed25519_dalek::VerifyingKey;

use crate::error::Result;
use crate::store::KeyStore;

use super::super::facts::AuditIndex;
use super::super::model::{ErasureEntry, ErasureStatus, Options, Period};
use super::super::verdicts::backups::JudgedEpoch;
use super::super::verdicts::erasures::{erasure_entry, keys_live};
use super::super::verdicts::who;

/// The erasure requests of `period` judged, and the requests missing from the table
/// (`id (tenant[/subject])`, sorted).
pub(in crate::report) async fn read_erasures(
    store: &dyn KeyStore,
    opts: &Options,
    period: &Period,
    index: &AuditIndex,
    receipt_keys: &[VerifyingKey],
    epochs: &[JudgedEpoch],
) -> Result<(Vec<ErasureEntry>, Vec<String>)> {
    let now = opts.now_ms;
    let mut erasures = Vec::new();
    let mut rows = HashSet::new();
    let mut after = String::new();
    loop {
        let page = store
            .list_erasures(opts.tenant.as_deref(), &after, 500)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.erasure_id.clone();
        for e in &page {
            rows.insert(e.erasure_id.clone());
            let end = e.completed_at.or(e.cancelled_at).unwrap_or(now);
            if !period.overlaps(e.requested_at, end) {
                continue;
            }
            let mut entry = erasure_entry(e, receipt_keys, index, epochs, now);
            // Proven erased: the keys must still be gone (a restored backup brings
            // them back until the erasure ledger is reconciled).
            if entry.status == ErasureStatus::OnTime || entry.status == ErasureStatus::Late {
                let live = store
                    .live_key_count(&e.tenant_id, e.subject_id.as_deref())
                    .await?;
                keys_live(&mut entry, live);
            }
            erasures.push(entry);
        }
    }
    // Requests the audit log knows that the erasure table lost.
    let mut missing: Vec<String> = index
        .requested
        .iter()
        .filter(|(id, (ts, t, _))| {
            !rows.contains(*id)
                && opts.tenant.as_ref().is_none_or(|f| f == t)
                && period.overlaps(*ts, now)
        })
        .map(|(id, (_, t, subj))| who(id, t, subj.as_deref()))
        .collect();
    missing.sort();
    Ok((erasures, missing))
}
