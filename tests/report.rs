//! The compliance report over a key store holding tenants in every situation: a fresh
//! key, one due soon, one past its age, rotations in progress / finished / with
//! ciphertexts left, a restricted subject, erasures on time, late, cancelled, overdue
//! and pending; then a tampered audit record and a tampered receipt. One test per
//! verdict rule, each on its own copy of that situation ([`situation`]); then the JSON
//! (against the JSON Schema in docs/ too), the CLI, the tampered store, and the HTML
//! page rendered in headless Chromium (screenshot kept under `$CARGO_TARGET_DIR/tmp/`),
//! and that neither form holds key material or plaintext. Then the backup stage of
//! erasures over key epochs rolled for real (local KMS with a keys directory): met only
//! once the key-store backups are sealed within 30 days, late when they are not, a
//! forged seal caught, and the backup horizon before and after rolls, with and without
//! the legacy key kept.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use base64::Engine as _;
use serde_json::Value;
use sqlx::Row as _;

use fieldkey::audit::AuditConfig;
use fieldkey::crypto::Aad;
use fieldkey::epochs::{EpochSettings, Epochs};
use fieldkey::erasure::{Actor, ErasureConfig};
use fieldkey::kms::local::LocalKms;
use fieldkey::model::rfc3339_ms;
use fieldkey::policy::RotationPolicy;
use fieldkey::policy::authz::Authorizer;
use fieldkey::report::{self, BackupsStatus, Configuration, ErasureStatus, Options, Verdict};
use fieldkey::store::{ErasureLedger, KeyStore, NewJob, SqlStore, now_ms};
use fieldkey::{Keyring, KeyringConfig};

const DAY: i64 = 86_400_000;
const BIN: &str = env!("CARGO_BIN_EXE_fieldkey");
const HOSTILE_ID: &str = "u-<script>alert(1)</script>";
const SECRET_VALUES: [&str; 2] = ["alice@example.com", "1970-01-31 secret birth date"];

fn actor() -> Actor {
    Actor {
        id: "spiffe://example.org/ns/privacy/sa/dpo".into(),
        ip: Some("10.1.2.0/24".into()),
    }
}

fn aad<'a>(tenant: &'a str, subject: Option<&'a str>) -> Aad<'a> {
    Aad {
        tenant,
        subject,
        field: "email",
        context: b"row-1",
    }
}

struct Situation {
    dir: tempfile::TempDir,
    store: Arc<dyn KeyStore>,
    raw: sqlx::SqlitePool,
    ids: std::collections::HashMap<&'static str, String>,
}

fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

async fn backdate_key(raw: &sqlx::SqlitePool, tenant: &str, days: i64) -> Result<()> {
    sqlx::query(
        "UPDATE fk_tenant_keys SET created_at = created_at - $1, updated_at = updated_at - $1 \
         WHERE tenant_id = $2",
    )
    .bind(days * DAY)
    .bind(tenant)
    .execute(raw)
    .await?;
    Ok(())
}

async fn job(store: &dyn KeyStore, id: &str, tenant: &str, progress: Value) -> Result<()> {
    store
        .create_job(NewJob {
            job_id: id.into(),
            target: "app.users".into(),
            tenant_id: Some(tenant.into()),
            spec: "{}".into(),
            progress: progress.to_string(),
        })
        .await?;
    Ok(())
}

/// The key store with every situation the report must tell apart.
async fn situation() -> Result<Situation> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.db");
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&path).await?);
    let kms = common::local_kms(&dir)?;
    let ledger = Arc::new(ErasureLedger::open_sqlite(&dir.path().join("ledger.db")).await?);
    let keyring = Arc::new(
        Keyring::new(store.clone(), kms.clone(), KeyringConfig::default()).with_ledger(ledger),
    );
    let parts = fieldkey::wiring::Parts::new(keyring.clone(), store.clone(), kms);
    let erasures = parts.erasures(ErasureConfig::default());
    let audit = parts.audit_log(AuditConfig::default());
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await?;
    let mut ids = std::collections::HashMap::new();

    // Rotation against the policy (365 days, warning 30 days before).
    for t in ["t-fresh", "t-due", "t-stale"] {
        keyring.create_tenant(t, None).await?;
        keyring
            .encrypt(&aad(t, Some("u1")), SECRET_VALUES[0].as_bytes())
            .await?;
    }
    backdate_key(&raw, "t-due", 350).await?;
    backdate_key(&raw, "t-stale", 400).await?;
    // A suspended tenant whose key is past its age: suspension does not hide it.
    keyring.create_tenant("t-suspended-stale", None).await?;
    backdate_key(&raw, "t-suspended-stale", 400).await?;
    erasures
        .suspend(&actor(), "t-suspended-stale", None)
        .await?;

    // Rotations: a job still running, a job done with nothing left, one with leftovers,
    // and one with no job at all.
    for t in ["t-rotating", "t-rotated", "t-left", "t-nojob"] {
        keyring.create_tenant(t, None).await?;
        keyring
            .encrypt(&aad(t, None), SECRET_VALUES[1].as_bytes())
            .await?;
        keyring.rotate_tenant(t).await?;
    }
    job(
        store.as_ref(),
        "users-rotating",
        "t-rotating",
        serde_json::json!({"total_rows": 100, "rows_scanned": 40, "values_rewrapped": 40}),
    )
    .await?;
    job(
        store.as_ref(),
        "users-rotated",
        "t-rotated",
        serde_json::json!({"total_rows": 10, "rows_scanned": 10, "values_rewrapped": 10}),
    )
    .await?;
    job(
        store.as_ref(),
        "users-left",
        "t-left",
        serde_json::json!({"total_rows": 10, "rows_scanned": 10, "values_rewrapped": 8,
            "values_failed": 2, "leftovers": {"t-left": {"1": 2}}}),
    )
    .await?;
    sqlx::query(
        "UPDATE fk_jobs SET state = 'completed', finished_at = $1 WHERE job_id IN ('users-rotated', 'users-left')",
    )
    .bind(now_ms())
    .execute(&raw)
    .await?;

    // Restriction.
    keyring.create_tenant("t-restricted", None).await?;
    keyring
        .encrypt(&aad("t-restricted", Some("u-7")), b"x")
        .await?;
    erasures
        .suspend(&actor(), "t-restricted", Some("u-7"))
        .await?;
    // Ids are any visible ASCII: the HTML must escape them.
    erasures
        .suspend(&actor(), "t-restricted", Some(HOSTILE_ID))
        .await?;

    // Erasures.
    let t = "t-erasure";
    keyring.create_tenant(t, None).await?;
    for s in [
        "u-on-time",
        "u-late",
        "u-cancel",
        "u-overdue",
        "u-pending",
        "u-tampered",
    ] {
        keyring
            .encrypt(&aad(t, Some(s)), SECRET_VALUES[0].as_bytes())
            .await?;
    }
    let on_time = erasures
        .request(&actor(), t, Some("u-on-time"), Duration::ZERO)
        .await?;
    ids.insert("on-time", on_time.erasure_id);
    let tampered = erasures
        .request(&actor(), t, Some("u-tampered"), Duration::ZERO)
        .await?;
    ids.insert("tampered", tampered.erasure_id);
    // Late: requested 31 days ago with the full 30-day grace period, carried out only now
    // (the workers were down).
    let late = erasures
        .request(
            &actor(),
            t,
            Some("u-late"),
            Duration::from_secs(30 * 86_400),
        )
        .await?;
    sqlx::query(
        "UPDATE fk_erasures SET requested_at = requested_at - $1, execute_after = execute_after - $1 \
         WHERE erasure_id = $2",
    )
    .bind(31 * DAY)
    .bind(&late.erasure_id)
    .execute(&raw)
    .await?;
    assert_eq!(erasures.run_due().await?, 1, "the late erasure runs now");
    ids.insert("late", late.erasure_id);
    let cancel = erasures
        .request(
            &actor(),
            t,
            Some("u-cancel"),
            Duration::from_secs(10 * 86_400),
        )
        .await?;
    erasures.cancel(&actor(), &cancel.erasure_id).await?;
    ids.insert("cancel", cancel.erasure_id);
    // Overdue: requested 31 days ago, still waiting.
    let overdue = erasures
        .request(
            &actor(),
            t,
            Some("u-overdue"),
            Duration::from_secs(30 * 86_400),
        )
        .await?;
    sqlx::query("UPDATE fk_erasures SET requested_at = requested_at - $1 WHERE erasure_id = $2")
        .bind(31 * DAY)
        .bind(&overdue.erasure_id)
        .execute(&raw)
        .await?;
    ids.insert("overdue", overdue.erasure_id);
    let pending = erasures
        .request(
            &actor(),
            t,
            Some("u-pending"),
            Duration::from_secs(10 * 86_400),
        )
        .await?;
    ids.insert("pending", pending.erasure_id);

    audit.flush().await?;
    assert!(audit.checkpoint().await?.is_some(), "a signed checkpoint");
    Ok(Situation {
        dir,
        store,
        raw,
        ids,
    })
}

fn configuration() -> Configuration {
    let cfg = fieldkey::config::Config::default();
    let authz = Authorizer::load(&repo_policies()).map(|a| a.status());
    Configuration::from_config(
        &cfg,
        &RotationPolicy::default(),
        Some(authz.map_err(|e| e.to_string())),
    )
}

/// The public keys of `purpose` as the operator exported them when the sidecar made
/// them: the test made these keys itself, so it may trust what the store says of them
/// now (an operator pins them in `[audit]` of the configuration).
async fn genuine_keys(
    store: &dyn KeyStore,
    purpose: &str,
) -> Result<Option<Vec<ed25519_dalek::VerifyingKey>>> {
    let mut out = Vec::new();
    for k in store.signing_keys(purpose).await? {
        out.push(ed25519_dalek::VerifyingKey::from_bytes(
            &k.public_key.as_slice().try_into()?,
        )?);
    }
    Ok(Some(out))
}

/// Options for a report at `now` that trusts the store's current signing keys (taken
/// as genuine trust anchors, see [`genuine_keys`]).
async fn anchored(store: &dyn KeyStore, now: i64) -> Result<Options> {
    Ok(Options {
        now_ms: now,
        audit_keys: genuine_keys(store, fieldkey::audit::CHECKPOINT_PURPOSE).await?,
        receipt_keys: genuine_keys(store, fieldkey::erasure::SIGNING_PURPOSE).await?,
        ..Options::default()
    })
}

async fn build(store: &dyn KeyStore) -> Result<report::Report> {
    Ok(report::build(
        store,
        configuration(),
        &RotationPolicy::default(),
        &anchored(store, now_ms()).await?,
    )
    .await?)
}

fn promise<'a>(r: &'a report::Report, id: &str) -> &'a report::PromiseResult {
    r.summary
        .promises
        .iter()
        .find(|p| p.id.as_str() == id)
        .unwrap_or_else(|| panic!("no promise {id}"))
}

fn tenant<'a>(r: &'a report::Report, id: &str) -> &'a report::TenantSection {
    r.tenants.iter().find(|t| t.tenant_id == id).unwrap()
}

fn erasure<'a>(r: &'a report::Report, id: &str) -> &'a report::ErasureEntry {
    r.erasures.iter().find(|e| e.erasure_id == id).unwrap()
}

/// Every wrapped key blob of the store, in the encodings a report could leak it in.
async fn wrapped_blobs(raw: &sqlx::SqlitePool) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for q in [
        "SELECT wrapped FROM fk_tenant_keys WHERE wrapped IS NOT NULL",
        "SELECT wrapped FROM fk_subjects WHERE wrapped IS NOT NULL",
        "SELECT wrapped FROM fk_signing_keys",
    ] {
        for row in sqlx::query(q).fetch_all(raw).await? {
            let b: Vec<u8> = row.try_get("wrapped")?;
            out.push(hex::encode(&b));
            out.push(base64::engine::general_purpose::STANDARD.encode(&b));
            out.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b));
        }
    }
    assert!(out.len() > 20, "the store holds wrapped keys");
    Ok(out)
}

fn assert_no_secrets(what: &str, text: &str, blobs: &[String]) {
    for b in blobs {
        assert!(
            !text.contains(b.as_str()),
            "{what} contains wrapped key material"
        );
    }
    for v in SECRET_VALUES {
        assert!(!text.contains(v), "{what} contains a plaintext value");
    }
    assert!(
        !text.contains("test passphrase"),
        "{what} contains the KMS passphrase"
    );
}

/// The verdict of promise `id` in `r`.
fn verdict(r: &report::Report, id: &str) -> Verdict {
    promise(r, id).verdict
}

/// The situation and its report, built now.
async fn situation_report() -> Result<(Situation, report::Report)> {
    let s = situation().await?;
    let r = build(s.store.as_ref()).await?;
    Ok((s, r))
}

/// The rows edited behind the service's back, the chain left intact: a receipt altered
/// (its signature fails), an overdue request edited to look cancelled (no
/// erasure.cancelled record), a job whose counters were overwritten.
async fn tamper_rows(s: &Situation) -> Result<()> {
    // A receipt altered on an intact chain: its signature fails.
    let receipt: String =
        sqlx::query_scalar("SELECT receipt FROM fk_erasures WHERE erasure_id = $1")
            .bind(&s.ids["tampered"])
            .fetch_one(&s.raw)
            .await?;
    let edited = receipt.replacen("\"executed_at_unix_ms\": ", "\"executed_at_unix_ms\": 1", 1);
    assert_ne!(edited, receipt, "the receipt states its execution time");
    sqlx::query("UPDATE fk_erasures SET receipt = $1 WHERE erasure_id = $2")
        .bind(&edited)
        .bind(&s.ids["tampered"])
        .execute(&s.raw)
        .await?;
    // An overdue request edited to look cancelled: no erasure.cancelled record.
    sqlx::query(
        "UPDATE fk_erasures SET state = 'cancelled', cancelled_at = $1 WHERE erasure_id = $2",
    )
    .bind(now_ms())
    .bind(&s.ids["overdue"])
    .execute(&s.raw)
    .await?;
    // A job whose counters were overwritten: reported, not fatal.
    sqlx::query("UPDATE fk_jobs SET progress = 'not json' WHERE job_id = 'users-rotating'")
        .execute(&s.raw)
        .await?;
    Ok(())
}

/// Tampering with the chain (after [`tamper_rows`]): an audit record edited.
async fn tamper_chain(s: &Situation) -> Result<()> {
    sqlx::query("DROP TRIGGER fk_audit_no_update")
        .execute(&s.raw)
        .await?;
    sqlx::query("UPDATE fk_audit SET actor = 'someone-else' WHERE seq = 3")
        .execute(&s.raw)
        .await?;
    Ok(())
}

/// The report of the situation with its rows and then its chain tampered with.
async fn tampered_report(s: &Situation) -> Result<report::Report> {
    tamper_rows(s).await?;
    tamper_chain(s).await?;
    let bad = build(s.store.as_ref()).await?;
    eprintln!("{}", serde_json::to_string_pretty(&bad.summary)?);
    Ok(bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_at_rest_is_met_with_tenant_keys() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(verdict(&r, "encryption-at-rest"), Verdict::Met);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_protection_is_not_met_on_the_local_kms() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(
        verdict(&r, "kms-protection"),
        Verdict::NotMet,
        "local development KMS"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_judges_each_tenant_key_against_the_policy() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(
        verdict(&r, "key-rotation"),
        Verdict::NotMet,
        "t-stale is overdue"
    );
    let rotation = &promise(&r, "key-rotation").findings;
    assert!(
        rotation
            .iter()
            .any(|f| f.starts_with("t-stale: ") && f.contains("past the 365-day limit")),
        "{rotation:?}"
    );
    assert!(
        rotation
            .iter()
            .any(|f| f.starts_with("t-due: ") && f.contains("rotation due within")),
        "{rotation:?}"
    );

    let rot = |t: &str| {
        (
            tenant(&r, t).rotation.verdict,
            tenant(&r, t).rotation.status.clone(),
        )
    };
    assert_eq!(rot("t-fresh"), (Verdict::Met, "ok".into()));
    assert_eq!(rot("t-due"), (Verdict::Attention, "due-soon".into()));
    assert_eq!(rot("t-stale"), (Verdict::NotMet, "overdue".into()));
    // A suspended tenant whose key is past its age: suspension does not hide it.
    assert_eq!(
        rot("t-suspended-stale"),
        (Verdict::NotMet, "overdue".into())
    );
    assert!(
        tenant(&r, "t-suspended-stale")
            .rotation
            .finding
            .starts_with("suspended")
    );
    assert!(tenant(&r, "t-suspended-stale").restriction.tenant_suspended);
    let age = tenant(&r, "t-stale").rotation.age_days.unwrap();
    assert!((399.9..400.1).contains(&age), "{age}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_completion_reports_what_jobs_left_on_old_versions() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(verdict(&r, "rotation-completion"), Verdict::Attention);
    let old = |t: &str| tenant(&r, t).rotation_completion.old_versions.clone();
    let o = old("t-rotating");
    assert_eq!((o.len(), o[0].version, o[0].ciphertexts_left), (1, 1, None));
    assert!(
        o[0].finding
            .contains("rotation in progress: re-encryption job users-rotating"),
        "{o:?}"
    );
    let o = old("t-rotated");
    assert_eq!(o[0].ciphertexts_left, Some(0));
    assert!(o[0].finding.contains("can be retired"), "{o:?}");
    assert_eq!(old("t-left")[0].ciphertexts_left, Some(2));
    let o = old("t-nojob");
    assert_eq!(o[0].ciphertexts_left, None);
    assert!(
        o[0].finding.contains("no re-encryption job has completed"),
        "{o:?}"
    );
    assert!(old("t-fresh").is_empty());
    assert_eq!(
        tenant(&r, "t-fresh").rotation_completion.verdict,
        Verdict::Met
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_judges_each_request_against_30_days_and_its_receipt() -> Result<()> {
    let (s, r) = situation_report().await?;
    assert_eq!(
        verdict(&r, "erasure"),
        Verdict::NotMet,
        "one late, one overdue"
    );
    let e = |k: &str| erasure(&r, &s.ids[k]);
    assert_eq!(e("on-time").status, ErasureStatus::OnTime);
    let rc = e("on-time").receipt.clone().unwrap();
    assert!(
        rc.verified && rc.chained && rc.keys_destroyed == 1,
        "{rc:?}"
    );
    // Live keys destroyed on time, but no key epoch was ever rolled: the key-store
    // backups holding copies of them are not sealed yet. Inside the 30 days that is
    // pending (attention), not met.
    assert_eq!(e("on-time").backup_epoch, Some(0));
    assert_eq!(e("on-time").backups_status, Some(BackupsStatus::Pending));
    assert_eq!(e("on-time").backups_sealed_at, None);
    assert_eq!(e("on-time").verdict, Verdict::Attention);
    let findings = &promise(&r, "erasure").findings;
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with(&format!("{} (", s.ids["on-time"]))
                && f.contains("key-store backups not sealed yet")),
        "{findings:?}"
    );
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with("backup horizon: unbounded: no key epoch yet")),
        "{findings:?}"
    );
    assert_eq!(e("late").status, ErasureStatus::Late);
    assert_eq!(e("late").backups_status, Some(BackupsStatus::Late));
    assert_eq!(e("late").verdict, Verdict::NotMet);
    assert!((31.0..31.1).contains(&e("late").days), "{}", e("late").days);
    assert!(
        e("late").receipt.as_ref().unwrap().verified,
        "late, but proven"
    );
    assert_eq!(e("cancel").status, ErasureStatus::Cancelled);
    assert_eq!(e("cancel").verdict, Verdict::NotApplicable);
    assert_eq!(e("overdue").status, ErasureStatus::Overdue);
    assert_eq!(e("pending").status, ErasureStatus::Pending);
    assert_eq!(e("pending").verdict, Verdict::Attention);
    for open in ["pending", "overdue", "cancel"] {
        assert_eq!(
            (e(open).backup_epoch, e(open).backups_status),
            (None, None),
            "{open}: no backup stage before the keys are destroyed"
        );
    }
    assert_eq!(e("tampered").status, ErasureStatus::OnTime);
    assert_eq!(r.backups.restorable_since, None, "no key epoch: unbounded");
    assert!(r.backups.epochs.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restriction_is_met_when_every_suspension_is_in_the_audit_log() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(verdict(&r, "restriction"), Verdict::Met);
    let rs = &tenant(&r, "t-restricted").restriction;
    assert_eq!((rs.verdict, rs.suspended_subjects), (Verdict::Met, 2));
    assert_eq!(rs.subjects[0].subject_id, "u-7");
    assert!(
        rs.subjects.iter().all(|s| s.audit_seq.is_some()),
        "each suspension is in the audit log"
    );
    assert_eq!(
        tenant(&r, "t-fresh").restriction.verdict,
        Verdict::NotApplicable
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_is_met_on_a_verified_checkpointed_chain() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(verdict(&r, "audit-log"), Verdict::Met);
    assert!(r.audit_log.verified);
    assert!(r.audit_log.checkpoints >= 1);
    assert_eq!(r.audit_log.key_source, "pinned");
    assert_eq!(r.trust_anchors.audit, "pinned");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_security_is_not_applicable_without_a_remote_listener() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(
        verdict(&r, "transport-security"),
        Verdict::NotApplicable,
        "no mTLS listener"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_control_is_met_with_the_repository_policies() -> Result<()> {
    let (_s, r) = situation_report().await?;
    assert_eq!(
        verdict(&r, "access-control"),
        Verdict::Met,
        "the repository's policies"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_is_not_met_and_alerts_name_the_broken_promises() -> Result<()> {
    let (_s, r) = situation_report().await?;
    eprintln!("{}", serde_json::to_string_pretty(&r.summary)?);
    assert!(!r.summary.all_met);
    assert_eq!(r.summary.verdict, Verdict::NotMet);
    // Alerts name the broken promises, not integrity failures.
    assert!(
        r.summary.alerts.iter().all(|a| a.starts_with("NOT MET: ")),
        "{:?}",
        r.summary.alerts
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_report_matches_the_schema_and_holds_no_secrets() -> Result<()> {
    let (s, r) = situation_report().await?;
    let json = serde_json::to_string_pretty(&r)?;
    let blobs = wrapped_blobs(&s.raw).await?;
    assert_no_secrets("the JSON report", &json, &blobs);
    check_schema(&json, s.dir.path())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_the_same_store_offline_and_says_the_same() -> Result<()> {
    let (s, r) = situation_report().await?;
    // The trust anchors in a configuration file, as an operator pins them.
    let pem = |keys: Option<Vec<ed25519_dalek::VerifyingKey>>| -> String {
        keys.unwrap()
            .iter()
            .map(|k| fieldkey::erasure::receipt::public_key_pem(k).unwrap())
            .collect()
    };
    let anchors = s.dir.path().join("anchors");
    std::fs::create_dir_all(&anchors)?;
    let audit_pem = anchors.join("audit.pem");
    let receipt_pem = anchors.join("receipts.pem");
    std::fs::write(
        &audit_pem,
        pem(genuine_keys(s.store.as_ref(), fieldkey::audit::CHECKPOINT_PURPOSE).await?),
    )?;
    std::fs::write(
        &receipt_pem,
        pem(genuine_keys(s.store.as_ref(), fieldkey::erasure::SIGNING_PURPOSE).await?),
    )?;
    let config = s.dir.path().join("fieldkey.toml");
    std::fs::write(
        &config,
        format!(
            "[audit]\ncheckpoint_public_keys = [{:?}]\nreceipt_public_keys = [{:?}]\n",
            audit_pem.display().to_string(),
            receipt_pem.display().to_string()
        ),
    )?;
    let out_json = s.dir.path().join("report.json");
    let cli = Command::new(BIN)
        .args(["report", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(s.dir.path())
        .arg("--policies")
        .arg(repo_policies())
        .args(["--format", "json", "--out"])
        .arg(&out_json)
        .output()?;
    assert_eq!(
        cli.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(String::from_utf8_lossy(&cli.stderr).contains("NOT ALL PROMISES MET"));
    let from_cli: report::Report = serde_json::from_str(&std::fs::read_to_string(&out_json)?)?;
    assert_eq!(
        from_cli
            .summary
            .promises
            .iter()
            .map(|p| p.verdict)
            .collect::<Vec<_>>(),
        r.summary
            .promises
            .iter()
            .map(|p| p.verdict)
            .collect::<Vec<_>>()
    );
    let strict = Command::new(BIN)
        .args(["report", "--strict", "--format", "json", "--data-dir"])
        .arg(s.dir.path())
        .args(["--out"])
        .arg(s.dir.path().join("strict.json"))
        .output()?;
    assert_eq!(
        strict.status.code(),
        Some(4),
        "--strict refuses a report with a broken promise"
    );
    let period = Command::new(BIN)
        .args([
            "report",
            "--since",
            "2030-01-01",
            "--until",
            "2029-01-01",
            "--data-dir",
        ])
        .arg(s.dir.path())
        .output()?;
    assert_eq!(
        period.status.code(),
        Some(2),
        "an empty period is a usage error: {}",
        String::from_utf8_lossy(&period.stderr)
    );
    let nowhere = Command::new(BIN)
        .args(["report", "--data-dir"])
        .arg(s.dir.path().join("mistyped"))
        .output()?;
    assert_eq!(
        nowhere.status.code(),
        Some(3),
        "a missing store is not found, not created: {}",
        String::from_utf8_lossy(&nowhere.stderr)
    );
    assert!(!s.dir.path().join("mistyped/keys.db").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_on_an_unknown_tenant_is_refused() -> Result<()> {
    let s = situation().await?;
    // A report on nothing is refused, never "all met".
    let r_none = report::build(
        s.store.as_ref(),
        configuration(),
        &RotationPolicy::default(),
        &Options {
            tenant: Some("no-such-tenant".into()),
            now_ms: now_ms(),
            ..Options::default()
        },
    )
    .await;
    assert!(
        matches!(r_none, Err(fieldkey::Error::TenantNotFound { .. })),
        "{r_none:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_one_period_reports_only_what_falls_in_it() -> Result<()> {
    let s = situation().await?;
    let one = report::build(
        s.store.as_ref(),
        configuration(),
        &RotationPolicy::default(),
        &Options {
            tenant: Some("t-erasure".into()),
            since_ms: Some(now_ms() - 40 * DAY),
            until_ms: Some(now_ms() - 20 * DAY),
            now_ms: now_ms(),
            ..Options::default()
        },
    )
    .await?;
    assert_eq!(one.tenants.len(), 1);
    let mut in_period: Vec<&str> = one.erasures.iter().map(|e| e.erasure_id.as_str()).collect();
    in_period.sort_unstable();
    let mut expected = vec![s.ids["late"].as_str(), s.ids["overdue"].as_str()];
    expected.sort_unstable();
    assert_eq!(
        in_period, expected,
        "requested 31 days ago: the only ones in that period"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_rows_fail_the_erasure_evidence_on_an_intact_chain() -> Result<()> {
    let s = situation().await?;
    tamper_rows(&s).await?;
    let edited_rows = build(s.store.as_ref()).await?;
    assert!(
        edited_rows.summary.alerts.iter().any(|a| a
            .starts_with("KEY STORE RECORD UNREADABLE: re-encryption job users-rotating")),
        "{:?}",
        edited_rows.summary.alerts
    );
    assert!(!edited_rows.summary.all_met);
    assert!(edited_rows.audit_log.verified, "the chain itself is intact");
    let t = erasure(&edited_rows, &s.ids["tampered"]);
    assert_eq!(
        (t.status, t.verdict),
        (ErasureStatus::ProofFailed, Verdict::NotMet)
    );
    assert!(
        t.problem
            .as_deref()
            .unwrap_or("")
            .contains("signature does not match"),
        "{t:?}"
    );
    let o = erasure(&edited_rows, &s.ids["overdue"]);
    assert_eq!(o.status, ErasureStatus::ProofFailed, "{o:?}");
    assert!(
        o.problem
            .as_deref()
            .unwrap_or("")
            .contains("no erasure.cancelled record"),
        "{o:?}"
    );
    assert!(
        edited_rows.summary.alerts[0].starts_with("ERASURE EVIDENCE FAILED VERIFICATION: "),
        "{:?}",
        edited_rows.summary.alerts
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_audit_record_breaks_the_chain_and_is_the_first_alert() -> Result<()> {
    let s = situation().await?;
    let bad = tampered_report(&s).await?;
    assert!(!bad.audit_log.verified);
    assert_eq!(bad.audit_log.verdict, Verdict::NotMet);
    assert!(
        bad.audit_log
            .error
            .as_deref()
            .unwrap()
            .contains("audit record 3: content does not match its hash")
    );
    assert!(
        bad.summary.alerts[0].starts_with("AUDIT LOG DOES NOT VERIFY: audit record 3"),
        "{:?}",
        bad.summary.alerts
    );
    assert!(
        bad.summary.alerts[1].starts_with(&format!(
            "ERASURE EVIDENCE FAILED VERIFICATION: {}",
            s.ids["tampered"]
        )),
        "{:?}",
        bad.summary.alerts
    );
    let t = erasure(&bad, &s.ids["tampered"]);
    assert_eq!(
        (t.status, t.verdict),
        (ErasureStatus::ProofFailed, Verdict::NotMet)
    );
    // the rest of the evidence is still read (the chain is indexed past the bad record)
    assert_eq!(
        erasure(&bad, &s.ids["on-time"]).status,
        ErasureStatus::OnTime
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_renders_in_chromium_with_the_alerts_first() -> Result<()> {
    let (s, r) = situation_report().await?;
    let blobs = wrapped_blobs(&s.raw).await?;
    let bad = tampered_report(&s).await?;

    // HTML: both reports render in Chromium; the broken one shows its alerts first.
    let html_ok = report::html::render(&r);
    let html_bad = report::html::render(&bad);
    for (name, html) in [
        ("compliance-report", &html_ok),
        ("compliance-report-tampered", &html_bad),
    ] {
        assert_no_secrets(name, html, &blobs);
        let dom = render_in_chromium(name, html)?;
        assert!(
            dom.contains("id=\"summary\""),
            "{name}: no summary in the DOM"
        );
        assert!(dom.contains("NOT ALL PROMISES MET"), "{name}");
        assert!(
            dom.contains("id=\"chart-key-ages\"") && dom.contains("id=\"chart-erasures\""),
            "{name}: charts"
        );
        assert_no_secrets(name, &dom, &blobs);
    }
    assert!(
        !html_ok.contains("<script>")
            && html_ok.contains("u-&lt;script&gt;alert(1)&lt;/script&gt;"),
        "ids are escaped in the HTML"
    );
    assert!(
        html_ok.contains("<h2 id=\"backups\">Key-store backups</h2>")
            && html_ok.contains("unbounded: no key epoch yet"),
        "the backup horizon is on the page"
    );
    let alerts_at = html_bad.find("AUDIT LOG DOES NOT VERIFY").unwrap();
    let promises_at = html_bad.find("id=\"promises\"").unwrap();
    assert!(alerts_at < promises_at, "the alerts come before the detail");
    Ok(())
}

/// A key store whose local KMS keeps epoch keys in a keys directory, with its keyring,
/// erasure workflow and audit log: for the backup stage of erasures.
struct EpochSituation {
    dir: tempfile::TempDir,
    store: Arc<dyn KeyStore>,
    raw: sqlx::SqlitePool,
    parts: fieldkey::wiring::Parts,
    erasures: fieldkey::erasure::Erasures,
}

async fn epoch_situation() -> Result<EpochSituation> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keys.db");
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&path).await?);
    let kms = Arc::new(
        LocalKms::open_or_create(
            &dir.path().join("local-kms.json"),
            &secrecy::SecretString::from("test passphrase 123".to_owned()),
            common::FAST_KDF,
        )?
        .with_keys_dir(&dir.path().join("kms-keys"))?,
    );
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let parts = fieldkey::wiring::Parts::new(keyring, store.clone(), kms);
    let erasures = parts.erasures(ErasureConfig::default());
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await?;
    Ok(EpochSituation {
        dir,
        store,
        raw,
        parts,
        erasures,
    })
}

impl EpochSituation {
    /// A roller whose old keys the KMS deletes `deletion_days` after the roll.
    fn epochs(&self, deletion_days: u32, retire_legacy_key: bool) -> Epochs {
        self.parts.epochs(EpochSettings {
            kms_deletion_days: deletion_days,
            retire_legacy_key,
            store_tag: "report-test".into(),
            ..EpochSettings::default()
        })
    }

    async fn roll(&self, deletion_days: u32, retire_legacy_key: bool) -> Result<()> {
        self.epochs(deletion_days, retire_legacy_key)
            .roll(true, &|_| {})
            .await?;
        Ok(())
    }

    /// A tenant with subjects holding data.
    async fn tenant(&self, tenant: &str, subjects: &[&str]) -> Result<()> {
        let keyring = &self.parts.keyring;
        keyring.create_tenant(tenant, None).await?;
        for s in subjects {
            keyring
                .encrypt(&aad(tenant, Some(s)), SECRET_VALUES[0].as_bytes())
                .await?;
        }
        Ok(())
    }

    /// Erases `subject` now; its id.
    async fn erase(&self, tenant: &str, subject: &str) -> Result<String> {
        let e = self
            .erasures
            .request(&actor(), tenant, Some(subject), Duration::ZERO)
            .await?;
        assert_eq!(e.state.as_str(), "completed", "grace 0 erases at once");
        Ok(e.erasure_id)
    }

    /// The report as made at `now`.
    async fn report_at(&self, now: i64) -> Result<report::Report> {
        Ok(report::build(
            self.store.as_ref(),
            configuration(),
            &RotationPolicy::default(),
            &anchored(self.store.as_ref(), now).await?,
        )
        .await?)
    }

    /// The deletion date the store records for `epoch`'s key.
    async fn deletion_date(&self, epoch: u64) -> Result<Option<i64>> {
        let all = self.store.epochs().await?;
        Ok(all.iter().find(|e| e.epoch == epoch).unwrap().deletion_date)
    }

    /// When `epoch` became active.
    async fn epoch_start(&self, epoch: u64) -> Result<i64> {
        let all = self.store.epochs().await?;
        Ok(all.iter().find(|e| e.epoch == epoch).unwrap().created_at)
    }
}

fn epoch_entry(r: &report::Report, epoch: u64) -> &report::EpochEntry {
    r.backups.epochs.iter().find(|e| e.epoch == epoch).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_is_met_once_its_backups_are_sealed_within_30_days() -> Result<()> {
    let s = epoch_situation().await?;
    s.roll(0, false).await?; // epoch 1 (an empty store has no legacy epoch 0)
    s.tenant("acme", &["alice", "bob"]).await?;
    let id = s.erase("acme", "alice").await?;

    // Live keys destroyed, receipt verified; epoch 1's key still opens the backups.
    let before = s.report_at(now_ms()).await?;
    let e = erasure(&before, &id);
    assert_eq!(e.status, ErasureStatus::OnTime);
    assert_eq!(e.backup_epoch, Some(1));
    assert_eq!(
        (e.backups_status, e.verdict),
        (Some(BackupsStatus::Pending), Verdict::Attention)
    );
    assert_eq!(verdict(&before, "erasure"), Verdict::Attention);

    // The roll seals epoch 1: its key's deletion is scheduled (window 0 days).
    s.roll(0, false).await?;
    let after = s.report_at(now_ms()).await?;
    let e = erasure(&after, &id);
    let deleted = s.deletion_date(1).await?.unwrap();
    assert_eq!(
        (e.backups_status, e.verdict),
        (Some(BackupsStatus::Sealed), Verdict::Met),
        "{e:?}"
    );
    assert_eq!(
        e.backups_sealed_at.as_deref(),
        Some(rfc3339_ms(deleted).as_str())
    );
    assert!(e.backups_days.unwrap() < 0.1, "{e:?}");
    assert_eq!(e.problem, None);
    assert_eq!(verdict(&after, "erasure"), Verdict::Met);
    let findings = &promise(&after, "erasure").findings;
    assert!(
        findings.iter().any(|f| f.starts_with("1 erasure(s) met")),
        "{findings:?}"
    );
    let e1 = epoch_entry(&after, 1);
    assert_eq!(
        (e1.state.as_str(), e1.seal_verified, e1.opens_backups),
        ("sealed", Some(true), false)
    );
    assert_eq!(after.backups.active_epoch, Some(2));
    assert!(
        !after
            .summary
            .alerts
            .iter()
            .any(|a| a.starts_with("BACKUP SEAL")),
        "{:?}",
        after.summary.alerts
    );
    // The epochs in the JSON match the schema; the page shows them.
    check_schema(&serde_json::to_string_pretty(&after)?, s.dir.path())?;
    let html = report::html::render(&after);
    let dom = render_in_chromium("compliance-report-epochs", &html)?;
    assert!(
        dom.contains("id=\"backups\"")
            && dom.contains("data-epoch=\"1\"")
            && dom.contains("verified, chained into the audit log"),
        "the epochs and their seals are on the page"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_whose_backups_are_not_sealed_within_30_days_is_not_met() -> Result<()> {
    let s = epoch_situation().await?;
    s.roll(0, false).await?; // epoch 1
    s.tenant("acme", &["alice", "bob"]).await?;
    let alice = s.erase("acme", "alice").await?;

    // No roll since: 29 days on it is still pending; 31 days on it is late.
    let r29 = s.report_at(now_ms() + 29 * DAY).await?;
    assert_eq!(
        erasure(&r29, &alice).backups_status,
        Some(BackupsStatus::Pending)
    );
    let r31 = s.report_at(now_ms() + 31 * DAY).await?;
    let e = erasure(&r31, &alice);
    assert_eq!(
        e.status,
        ErasureStatus::OnTime,
        "the live keys were on time"
    );
    assert_eq!(
        (e.backups_status, e.verdict),
        (Some(BackupsStatus::Late), Verdict::NotMet)
    );
    assert!(
        e.problem
            .as_deref()
            .unwrap_or("")
            .contains("still not sealed 31.0 days after the request"),
        "{e:?}"
    );
    assert_eq!(verdict(&r31, "erasure"), Verdict::NotMet);
    assert!(
        r31.summary
            .alerts
            .iter()
            .any(|a| a.starts_with("NOT MET: Erasure of a user")),
        "{:?}",
        r31.summary.alerts
    );

    // Sealed, but the KMS deletes the key 30 days after the roll: past the limit.
    let bob = s.erase("acme", "bob").await?;
    s.roll(30, false).await?;
    let r = s.report_at(now_ms()).await?;
    let e = erasure(&r, &bob);
    let deleted = s.deletion_date(1).await?.unwrap();
    assert_eq!(
        e.backups_sealed_at.as_deref(),
        Some(rfc3339_ms(deleted).as_str())
    );
    assert_eq!(
        (e.backups_status, e.verdict),
        (Some(BackupsStatus::Late), Verdict::NotMet),
        "{e:?}"
    );
    assert!(
        e.problem
            .as_deref()
            .unwrap_or("")
            .contains("sealed 30.0 days after the request"),
        "{e:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_epoch_record_does_not_seal_backups() -> Result<()> {
    let s = epoch_situation().await?;
    s.roll(0, false).await?;
    s.tenant("acme", &["alice"]).await?;
    let id = s.erase("acme", "alice").await?;
    s.roll(0, false).await?;
    // Epoch 1's deletion brought forward, and the active epoch 2 made to look sealed:
    // neither matches a signed statement.
    sqlx::query("UPDATE fk_epochs SET deletion_date = deletion_date - 1000 WHERE epoch = 1")
        .execute(&s.raw)
        .await?;
    sqlx::query(
        "UPDATE fk_epochs SET state = 'sealed', kms_status = 'scheduled', \
         sealed_at = $1, deletion_date = $1 WHERE epoch = 2",
    )
    .bind(now_ms())
    .execute(&s.raw)
    .await?;
    let r = s.report_at(now_ms()).await?;
    let e2 = epoch_entry(&r, 2);
    assert_eq!((e2.seal_verified, e2.opens_backups), (Some(false), true));
    assert_eq!(
        e2.seal_error.as_deref(),
        Some("sealed, but no signed statement is stored")
    );
    let e1 = epoch_entry(&r, 1);
    assert_eq!((e1.seal_verified, e1.opens_backups), (Some(false), true));
    assert!(
        e1.seal_error
            .as_deref()
            .unwrap_or("")
            .contains("does not match the epoch's record"),
        "{e1:?}"
    );
    assert!(
        r.summary.alerts[0].starts_with("BACKUP SEAL FAILED VERIFICATION: key epoch 1: "),
        "{:?}",
        r.summary.alerts
    );
    assert!(!r.summary.all_met);
    let e = erasure(&r, &id);
    assert_eq!(
        (e.backups_status, e.backups_sealed_at.clone()),
        (Some(BackupsStatus::Pending), None),
        "an unproven seal seals nothing"
    );
    assert_eq!(
        r.backups.restorable_since,
        Some(rfc3339_ms(s.epoch_start(1).await?)),
        "an unproven seal leaves the epoch's backups restorable"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_horizon_follows_the_rolls_and_a_kept_legacy_key_keeps_it_unbounded()
-> Result<()> {
    // A store that starts with epochs: bounded from the first roll.
    let s = epoch_situation().await?;
    let r = s.report_at(now_ms()).await?;
    assert_eq!(r.backups.restorable_since, None);
    assert!(r.backups.finding.starts_with("unbounded: no key epoch yet"));
    s.roll(0, false).await?;
    let r = s.report_at(now_ms()).await?;
    assert_eq!(
        r.backups.restorable_since,
        Some(rfc3339_ms(s.epoch_start(1).await?))
    );
    s.roll(0, false).await?;
    let r = s.report_at(now_ms()).await?;
    assert_eq!(
        r.backups.restorable_since,
        Some(rfc3339_ms(s.epoch_start(2).await?)),
        "epoch 1's key is pending deletion: only backups since epoch 2 restore"
    );
    assert!(!epoch_entry(&r, 1).opens_backups && epoch_entry(&r, 2).opens_backups);

    // A store from before epochs, its legacy key kept: unbounded, and an erasure from
    // before the first roll never has its backups sealed.
    let s = epoch_situation().await?;
    s.tenant("old", &["alice", "bob"]).await?;
    let id = s.erase("old", "alice").await?;
    s.roll(0, false).await?;
    s.roll(0, false).await?;
    let r = s.report_at(now_ms()).await?;
    let e0 = epoch_entry(&r, 0);
    assert_eq!(
        (e0.kms_status.as_deref(), e0.opens_backups, e0.seal_verified),
        (Some("kept-legacy"), true, None)
    );
    assert_eq!(epoch_entry(&r, 1).seal_verified, Some(true));
    assert_eq!(r.backups.restorable_since, None);
    assert!(
        r.backups
            .finding
            .starts_with("unbounded: the legacy key of epoch 0")
            && r.backups.finding.contains("kept-legacy"),
        "{}",
        r.backups.finding
    );
    let e = erasure(&r, &id);
    assert_eq!(
        (e.backup_epoch, e.backups_status),
        (Some(0), Some(BackupsStatus::Pending))
    );
    let late = s.report_at(now_ms() + 31 * DAY).await?;
    assert_eq!(
        erasure(&late, &id).backups_status,
        Some(BackupsStatus::Late),
        "the kept legacy key still opens backups holding alice's key"
    );

    // The same with the legacy key retired: bounded at epoch 1, and the erasure met.
    let s = epoch_situation().await?;
    s.tenant("old", &["alice", "bob"]).await?;
    let id = s.erase("old", "alice").await?;
    s.roll(0, true).await?;
    let r = s.report_at(now_ms()).await?;
    assert_eq!(
        r.backups.restorable_since,
        Some(rfc3339_ms(s.epoch_start(1).await?))
    );
    let e = erasure(&r, &id);
    assert_eq!(
        (e.backups_status, e.verdict),
        (Some(BackupsStatus::Sealed), Verdict::Met),
        "{e:?}"
    );
    Ok(())
}

/// Validates the JSON against docs/compliance-report.schema.json with the Python
/// `jsonschema` package of the test venv (scripts/test.sh).
fn check_schema(json: &str, dir: &Path) -> Result<()> {
    let python = std::env::var("FIELDKEY_TEST_PYTHON").expect(
        "FIELDKEY_TEST_PYTHON is not set: run the tests through scripts/test.sh (its venv has jsonschema)",
    );
    let file = dir.join("report-for-schema.json");
    std::fs::write(&file, json)?;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/compliance-report.schema.json");
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, jsonschema\n\
             schema = json.load(open(sys.argv[1])); doc = json.load(open(sys.argv[2]))\n\
             jsonschema.Draft202012Validator.check_schema(schema)\n\
             jsonschema.Draft202012Validator(schema).validate(doc)\n\
             print('schema ok')",
        ])
        .arg(&schema)
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "the report does not match docs/compliance-report.schema.json: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Renders `html` in headless Chromium: a full-page screenshot kept as a test artifact
/// (`$CARGO_TARGET_DIR/tmp/<name>.png`), and the DOM Chromium parsed.
fn render_in_chromium(name: &str, html: &str) -> Result<String> {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("headless Chromium is needed (scripts/test.sh installs Debian's chromium package)");
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&artifacts)?;
    let page = artifacts.join(format!("{name}.html"));
    std::fs::write(&page, html)?;
    let png = artifacts.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&png);
    let profile = tempfile::tempdir()?;
    let base = |c: &mut Command| {
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()));
    };
    let mut shot = Command::new(chromium);
    base(&mut shot);
    let out = shot
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1200,2600")
        .arg(format!("file://{}", page.display()))
        .output()?;
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "Chromium made no real screenshot ({size} bytes): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dump = Command::new(chromium);
    base(&mut dump);
    let out = dump
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()?;
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("</html>"),
        "Chromium printed no DOM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("screenshot: {} ({size} bytes)", png.display());
    Ok(dom)
}

/// Review finding 3 (issue 19): the report verified signatures with keys read from the
/// store it checks, so a writer of the key store could add a signing key of its own,
/// sign a checkpoint with it (over a tail it rewrote, say) and have the audit promise
/// met. Now: without pinned trust anchors the signed promises are never met, and with
/// them the forged checkpoint fails verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_written_into_the_store_cannot_vouch_for_the_report() -> Result<()> {
    let s = situation().await?;
    let store = s.store.as_ref();
    let genuine = anchored(store, now_ms()).await?;

    // The attacker: a key of its own, recorded as the checkpoint key (the genuine one
    // retired, as a key rotation would leave it), and a checkpoint signed with it.
    let forger = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let public = forger.verifying_key();
    let genuine_key = store
        .signing_key(fieldkey::audit::CHECKPOINT_PURPOSE)
        .await?
        .unwrap();
    store.retire_signing_key(&genuine_key.key_id).await?;
    store
        .create_signing_key(&fieldkey::model::SigningKeyRecord {
            key_id: fieldkey::signing::key_id(&public),
            purpose: fieldkey::audit::CHECKPOINT_PURPOSE.into(),
            public_key: public.as_bytes().to_vec(),
            kms_key_id: genuine_key.kms_key_id.clone(),
            epoch: genuine_key.epoch,
            wrapped: vec![0; 48],
            created_at: now_ms(),
        })
        .await?;
    let forge = move |seq: u64, prev: &[u8; 32]| {
        Ok(fieldkey::model::AuditEvent {
            action: "audit.checkpoint".into(),
            resource_type: "audit".into(),
            resource_id: "fieldkey".into(),
            actor: "fieldkey".into(),
            tenant_id: None,
            caller_ip: None,
            details: fieldkey::audit::verify::checkpoint_details(seq - 1, prev, &forger),
        })
    };
    store.append_audit_fn(&forge).await?;

    // Keys from the store: the forged checkpoint verifies, but the promise is not met
    // and says why.
    let unanchored = report::build(
        store,
        configuration(),
        &RotationPolicy::default(),
        &Options {
            now_ms: now_ms(),
            ..Options::default()
        },
    )
    .await?;
    assert!(unanchored.audit_log.verified, "{:?}", unanchored.audit_log);
    assert_eq!(unanchored.trust_anchors.audit, "key-store");
    assert_eq!(verdict(&unanchored, "audit-log"), Verdict::NotMet);
    assert_eq!(verdict(&unanchored, "erasure"), Verdict::NotMet);
    assert!(
        promise(&unanchored, "audit-log").findings[0].contains("pin the trust anchors"),
        "{:?}",
        promise(&unanchored, "audit-log").findings
    );
    assert!(!unanchored.summary.all_met);

    // Pinned genuine keys: the forged checkpoint does not verify.
    let pinned =
        report::build(store, configuration(), &RotationPolicy::default(), &genuine).await?;
    assert!(!pinned.audit_log.verified);
    assert_eq!(verdict(&pinned, "audit-log"), Verdict::NotMet);
    assert!(
        pinned
            .summary
            .alerts
            .iter()
            .any(|a| a.starts_with("AUDIT LOG DOES NOT VERIFY")),
        "{:?}",
        pinned.summary.alerts
    );
    assert_eq!(pinned.trust_anchors.audit, "pinned");
    Ok(())
}
