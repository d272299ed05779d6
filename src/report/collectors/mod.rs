//! Builds the report: reads the key store (read only) into facts, one collector per
//! concern (the audit chain, tenants and their keys, re-encryption jobs, key epochs,
//! erasure requests), hands them to the verdict rules, and assembles the [`Report`].
//!
//! Does not: write anything, call the KMS, or decide a verdict itself (the rules live
//! in `verdicts`).

mod audit;
mod epochs;
mod erasures;
mod jobs;
mod keys;

use crate::erasure::receipt::rfc3339_ms;
use crate::error::Result;
use crate::policy::RotationPolicy;
use crate::store::KeyStore;

use super::model::Configuration;
use super::model::{
    ANCHORS_KEY_STORE, ANCHORS_PINNED, FORMAT, Options, Period, Report, TrustAnchors,
};
use super::verdicts::{self, backups as backup_rules, tenants as tenant_rules};

/// Builds the report from `store` (read only) and the configuration facts.
///
/// # Errors
/// [`crate::error::Error::Store`] if the store cannot be read. Everything the store
/// holds that does not verify is reported, not returned as an error.
pub async fn build(
    store: &dyn KeyStore,
    configuration: Configuration,
    rotation: &RotationPolicy,
    opts: &Options,
) -> Result<Report> {
    let period = Period::new(opts.since_ms, opts.until_ms);
    let now = opts.now_ms;
    // Store records that do not decode: shown as alerts, never fatal.
    let mut unreadable = Vec::new();

    // The audit chain, with what later sections look up in it.
    let (mut audit_log, index) = audit::read_chain(store, opts, &period, &mut unreadable).await?;
    let all_tenants = store.list_tenants().await?;
    audit_log.verdict =
        verdicts::audit_freshness(&audit_log, &configuration, !all_tenants.is_empty(), now);

    let jobs = jobs::read_jobs(store, &mut unreadable).await?;
    // Tenants.
    let tenant_ids = keys::tenant_ids(all_tenants, opts.tenant.as_deref())?;
    let mut tenants = Vec::with_capacity(tenant_ids.len());
    for id in &tenant_ids {
        let Some(info) = keys::tenant(store, id).await? else {
            continue;
        };
        let subjects = keys::suspended_subjects(store, &info.tenant_id, &index).await?;
        let restriction = tenant_rules::restriction(&info, &index, subjects);
        tenants.push(tenant_rules::tenant_section(
            &info,
            rotation,
            &jobs,
            restriction,
            now,
        ));
    }

    // Key epochs, their "backups sealed" statements verified with the receipt keys
    // (pinned, or read from the store); then erasures, with when their backups are
    // sealed.
    let (receipt_keys, receipt_source) = match &opts.receipt_keys {
        Some(k) => (k.clone(), ANCHORS_PINNED),
        None => (
            audit::store_keys(store, crate::erasure::SIGNING_PURPOSE, &mut unreadable).await?,
            ANCHORS_KEY_STORE,
        ),
    };
    let trust_anchors = TrustAnchors {
        audit: audit_log.key_source.clone(),
        audit_key_ids: audit_log.key_ids.clone(),
        receipts: receipt_source.into(),
        receipt_key_ids: receipt_keys
            .iter()
            .map(crate::erasure::receipt::key_id)
            .collect(),
    };
    let epoch_facts = epochs::read_epochs(store, &mut unreadable).await?;
    let judged = backup_rules::judge_epochs(&epoch_facts, &receipt_keys, &index);
    let backups = backup_rules::backups_section(&judged);
    let (erasures, missing) =
        erasures::read_erasures(store, opts, &period, &index, &receipt_keys, &judged).await?;
    let jobs = jobs::job_entries(&jobs, opts, &period);

    let summary = verdicts::summarize(
        &configuration,
        rotation,
        &audit_log,
        &tenants,
        &verdicts::ErasureEvidence {
            entries: &erasures,
            missing: &missing,
            backups: &backups,
        },
        &trust_anchors,
        &unreadable,
    );
    Ok(Report {
        format: FORMAT.into(),
        generated_at: rfc3339_ms(now),
        generated_at_unix_ms: now,
        period,
        tenant_filter: opts.tenant.clone(),
        summary,
        configuration,
        audit_log,
        tenants,
        erasures,
        backups,
        jobs,
        trust_anchors,
    })
}
