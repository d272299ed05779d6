//! Authorization and the audit log, end to end over real gRPC: the example policies in
//! `policies/` (copied to a temporary directory), identities presented as Linkerd's
//! `l5d-client-id` (trusted in this configuration) and as a real mTLS certificate SAN,
//! PERMISSION_DENIED with an audit record, the decrypt guard, policy reload, and the
//! export / offline verification of the audit log with its tamper cases.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code fails by panicking"
)]

mod common;

use common::grpc::reason;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use fieldkey::audit::verify::{Failure, verify_export};
use fieldkey::audit::{AuditConfig, AuditLog, AuditRecord};
use fieldkey::policy::authz::Authorizer;
use fieldkey::proto::pb::{
    self, audit_client::AuditClient, crypto_client::CryptoClient, erasures_client::ErasuresClient,
    jobs_client::JobsClient, keys_client::KeysClient,
};
use fieldkey::service::gate::{Gate, IdentityConfig};
use fieldkey::store::KeyStore;
use fieldkey::{Keyring, KeyringConfig};
use tonic::Code;
use tonic::transport::Channel;

const APP: &str = "spiffe://example.org/ns/shop/sa/web";
const ANALYTICS: &str = "spiffe://example.org/ns/analytics/sa/export";
const OPS: &str = "spiffe://example.org/ns/ops/sa/keyops";
const ERASURE: &str = "spiffe://example.org/ns/privacy/sa/erasure";
const AUDITOR: &str = "spiffe://example.org/ns/audit/sa/auditor";
const STRANGER: &str = "spiffe://example.org/ns/other/sa/unknown";

struct Env {
    _dir: tempfile::TempDir,
    policies: std::path::PathBuf,
    store: Arc<dyn KeyStore>,
    audit: Arc<AuditLog>,
    authz: Arc<Authorizer>,
    ch: Channel,
    _server: common::sidecar::InProcess,
}

fn copy_policies(to: &Path, limits: &str) {
    std::fs::create_dir_all(to).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "cedar" || x == "cedarschema")
        {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(to.join("limits.toml"), limits).unwrap();
}

async fn env(limits: &str) -> Result<Env> {
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    copy_policies(&policies, limits);
    let store = common::sqlite_store(&dir).await?;
    let kms = common::local_kms(&dir)?;
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let parts = fieldkey::wiring::Parts::new(keyring.clone(), store.clone(), kms);
    let authz = Arc::new(Authorizer::load(&policies)?);
    authz.watch(Duration::from_millis(50));
    let audit = Arc::new(parts.audit_log(AuditConfig {
        window: Duration::from_secs(3600),
        checkpoint_every: Duration::from_secs(3600),
        executor: "test".into(),
    }));
    let gate = Arc::new(Gate::new(
        Some(authz.clone()),
        Some(audit.clone()),
        IdentityConfig {
            local_identity: Arc::from(APP),
            trust_linkerd: true,
        },
    ));
    let mut ctx = parts.context().with_gate(gate);
    ctx.audit = audit.clone();
    // The mesh listener: the header is trusted there only (review finding 2, issue 19).
    let server = common::sidecar::InProcess::start_behind_linkerd(ctx).await?;
    let ch = server.channel().await?;
    Ok(Env {
        _dir: dir,
        policies,
        store,
        audit,
        authz,
        ch,
        _server: server,
    })
}

/// A request from `who`: the application calls over the pod-local listener (its
/// identity is the configured local identity, and app.cedar allows data operations
/// only locally); every other identity arrives through the mesh (`l5d-client-id`).
fn as_id<T>(who: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if who != APP {
        r.metadata_mut()
            .insert("l5d-client-id", who.parse().unwrap());
    }
    r
}

async fn encrypt(ch: &Channel, who: &str, tenant: &str) -> Result<Vec<u8>, tonic::Status> {
    CryptoClient::new(ch.clone())
        .encrypt(as_id(
            who,
            pb::EncryptRequest {
                tenant_id: tenant.into(),
                subject_id: "u1".into(),
                field: "email".into(),
                context: vec![].into(),
                plaintext: b"alice@example.org".to_vec().into(),
                format: 0,
            },
        ))
        .await
        .map(|r| r.into_inner().ciphertext.to_vec())
}

async fn decrypt(ch: &Channel, who: &str, tenant: &str, ct: &[u8]) -> Result<(), tonic::Status> {
    CryptoClient::new(ch.clone())
        .decrypt(as_id(
            who,
            pb::DecryptRequest {
                tenant_id: tenant.into(),
                subject_id: "u1".into(),
                field: "email".into(),
                context: vec![].into(),
                ciphertext: ct.to_vec().into(),
                repair: false,
            },
        ))
        .await
        .map(|_| ())
}

async fn all_audit(store: &dyn KeyStore) -> Vec<AuditRecord> {
    store.audit_records(0, 100_000).await.unwrap()
}

fn denied(r: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
            assert_eq!(reason(&s), "PERMISSION_DENIED", "{what}");
        }
        Ok(v) => panic!("{what}: allowed ({v:?})"),
    }
}

/// The five example identities through real gRPC: each can do what its policy says,
/// and is refused (PERMISSION_DENIED, audited) the rest; a stranger gets nothing.
#[tokio::test(flavor = "multi_thread")]
async fn each_example_identity_gets_exactly_its_policy() -> Result<()> {
    let e = env("").await?;
    let ch = &e.ch;
    let mut keys = KeysClient::new(ch.clone());
    let mut erasures = ErasuresClient::new(ch.clone());
    let mut jobs = JobsClient::new(ch.clone());
    let mut audit = AuditClient::new(ch.clone());
    let create = |who: &str| {
        as_id(
            who,
            pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                kms_key_id: String::new(),
            },
        )
    };
    // Operators create and rotate tenants; nobody else may.
    for who in [APP, ANALYTICS, ERASURE, AUDITOR, STRANGER] {
        denied(
            keys.create_tenant(create(who)).await,
            &format!("{who} CreateTenant"),
        );
    }
    keys.create_tenant(create(OPS)).await?;
    keys.rotate_tenant_key(as_id(
        OPS,
        pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        },
    ))
    .await?;
    jobs.list_jobs(as_id(OPS, pb::ListJobsRequest {})).await?;

    // The application encrypts and decrypts; the others may not see plaintext.
    let ct = encrypt(ch, APP, "acme").await?;
    decrypt(ch, APP, "acme", &ct).await?;
    for who in [ANALYTICS, OPS, ERASURE, AUDITOR, STRANGER] {
        denied(
            decrypt(ch, who, "acme", &ct).await,
            &format!("{who} Decrypt"),
        );
        denied(encrypt(ch, who, "acme").await, &format!("{who} Encrypt"));
    }
    // ... and the application may not administer keys, erase or read the audit log.
    denied(
        keys.rotate_tenant_key(as_id(
            APP,
            pb::RotateTenantKeyRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await,
        "app RotateTenantKey",
    );
    denied(
        jobs.list_jobs(as_id(APP, pb::ListJobsRequest {})).await,
        "app ListJobs",
    );
    let shred = |who: &str| {
        as_id(
            who,
            pb::ShredSubjectRequest {
                tenant_id: "acme".into(),
                subject_id: "u1".into(),
                grace_seconds: 3600,
            },
        )
    };
    for who in [APP, ANALYTICS, OPS, AUDITOR, STRANGER] {
        denied(
            erasures.shred_subject(shred(who)).await,
            &format!("{who} ShredSubject"),
        );
    }
    for who in [APP, ANALYTICS, OPS, ERASURE, STRANGER] {
        denied(
            audit
                .get_audit_head(as_id(who, pb::GetAuditHeadRequest {}))
                .await,
            &format!("{who} GetAuditHead"),
        );
    }
    // The erasure workflow erases and suspends.
    let er = erasures.shred_subject(shred(ERASURE)).await?.into_inner();
    erasures
        .suspend_subject(as_id(
            ERASURE,
            pb::RestrictionRequest {
                tenant_id: "acme".into(),
                subject_id: "u1".into(),
            },
        ))
        .await?;
    denied(
        keys.rotate_tenant_key(as_id(
            ERASURE,
            pb::RotateTenantKeyRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await,
        "erasure RotateTenantKey",
    );
    // The auditor reads the log and the compliance report, and nothing else.
    audit
        .get_audit_head(as_id(AUDITOR, pb::GetAuditHeadRequest {}))
        .await?;
    let report_of = |who: &str, tenant: &str| {
        as_id(
            who,
            pb::ComplianceReportRequest {
                tenant_id: tenant.into(),
                since_unix_ms: 0,
                until_unix_ms: 0,
                format: pb::ReportFormat::Json as i32,
            },
        )
    };
    let rep = audit
        .get_compliance_report(report_of(AUDITOR, ""))
        .await?
        .into_inner();
    assert_eq!(rep.content_type, "application/json");
    let json: serde_json::Value = serde_json::from_str(&rep.body)?;
    assert_eq!(json["format"], "fieldkey-compliance-report/2");
    assert_eq!(json["summary"]["all_met"], rep.all_met);
    // the sidecar reports the policy set it enforces
    assert_eq!(json["configuration"]["authorization"]["enabled"], true);
    let html = audit
        .get_compliance_report(as_id(
            AUDITOR,
            pb::ComplianceReportRequest {
                tenant_id: "acme".into(),
                since_unix_ms: 0,
                until_unix_ms: 0,
                format: pb::ReportFormat::Html as i32,
            },
        ))
        .await?
        .into_inner();
    assert!(html.body.starts_with("<!DOCTYPE html>"), "{}", html.body);
    for who in [APP, ANALYTICS, OPS, ERASURE, STRANGER] {
        denied(
            audit.get_compliance_report(report_of(who, "acme")).await,
            &format!("{who} GetComplianceReport"),
        );
    }
    denied(
        erasures
            .get_erasure(as_id(
                AUDITOR,
                pb::ErasureIdRequest {
                    erasure_id: er.erasure_id.clone(),
                },
            ))
            .await,
        "auditor GetErasure",
    );
    denied(
        keys.get_tenant(as_id(
            AUDITOR,
            pb::GetTenantRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await,
        "auditor GetTenant",
    );

    // Audit trail: one record per refused administration call, with the identity;
    // refused data operations are counted in the window's records.
    e.audit.flush().await?;
    let recs = all_audit(&*e.store).await;
    let denials: Vec<&AuditRecord> = recs
        .iter()
        .filter(|r| r.event.action == "authz.denied")
        .collect();
    assert!(denials.iter().any(|r| r.event.actor == STRANGER
        && r.event.details["action"] == "Keys::CreateTenant"));
    assert!(
        denials.iter().any(
            |r| r.event.actor == AUDITOR && r.event.details["action"] == "Erasures::GetErasure"
        )
    );
    let analytics_decrypt = recs
        .iter()
        .find(|r| {
            r.event.actor == ANALYTICS
                && r.event.action == "Crypto::Decrypt"
                && r.event.details["outcome"] == "denied"
        })
        .expect("the refused decrypt is in the audit log");
    assert_eq!(analytics_decrypt.event.details["count"], 1);
    assert_eq!(analytics_decrypt.event.resource_id, "acme/email");
    let app_ok = recs
        .iter()
        .find(|r| r.event.actor == APP && r.event.action == "Crypto::Encrypt")
        .unwrap();
    assert_eq!(app_ok.event.details["outcome"], "ok");
    assert_eq!(app_ok.event.caller_ip.as_deref(), Some("127.0.0.0/24"));
    // Key management is one record each, with the actor.
    assert!(
        recs.iter()
            .any(|r| r.event.action == "tenant.rotated" && r.event.actor == OPS)
    );
    assert!(
        recs.iter()
            .any(|r| r.event.action == "erasure.requested" && r.event.actor == ERASURE)
    );
    Ok(())
}

/// A decrypt-rate ceiling from limits.toml: beyond it RESOURCE_EXHAUSTED and an audit
/// record; other identities are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn the_decrypt_guard_stops_bulk_decryption_and_says_so() -> Result<()> {
    let e = env(&format!(
        "[[decrypt]]\nidentity = \"{APP}\"\nper_second = 1\nburst = 5\n"
    ))
    .await?;
    KeysClient::new(e.ch.clone())
        .create_tenant(as_id(
            OPS,
            pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                kms_key_id: String::new(),
            },
        ))
        .await?;
    let ct = encrypt(&e.ch, APP, "acme").await?;
    for _ in 0..5 {
        decrypt(&e.ch, APP, "acme", &ct).await?;
    }
    let err = decrypt(&e.ch, APP, "acme", &ct).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "DECRYPT_RATE_LIMITED");
    let recs = all_audit(&*e.store).await;
    assert!(
        recs.iter()
            .any(|r| r.event.action == "authz.rate_limited" && r.event.actor == APP),
        "the refusal is audited at once"
    );
    Ok(())
}

/// Policies reload without a restart; a broken file keeps the last good set.
#[tokio::test(flavor = "multi_thread")]
async fn policies_reload_and_a_broken_file_keeps_the_last_good_set() -> Result<()> {
    let e = env("").await?;
    let mut keys = KeysClient::new(e.ch.clone());
    let who = |id: &str| as_id(id, pb::WhoAmIRequest {});
    denied(keys.who_am_i(who(STRANGER)).await, "stranger before");
    std::fs::write(
        e.policies.join("stranger.cedar"),
        format!(
            "permit (principal == Identity::\"{STRANGER}\", action == Action::\"Keys::WhoAmI\", resource);\n"
        ),
    )?;
    let me = common::eventually(
        "the new policy is picked up",
        Duration::from_secs(5),
        || {
            let mut keys = keys.clone();
            async move { keys.who_am_i(who(STRANGER)).await.ok() }
        },
    )
    .await
    .into_inner();
    assert_eq!(
        (me.identity.as_str(), me.transport.as_str()),
        (STRANGER, "linkerd")
    );
    // A broken file: the last good set (with the stranger's permit) stays in force.
    let generation = e.authz.status().generation;
    std::fs::write(e.policies.join("broken.cedar"), "permit (principal ==;")?;
    let refused = common::eventually(
        "the broken file is read and refused",
        Duration::from_secs(5),
        || async { e.authz.status().last_error },
    )
    .await;
    assert!(refused.contains("broken.cedar"), "{refused}");
    assert_eq!(e.authz.status().generation, generation, "nothing installed");
    keys.who_am_i(who(STRANGER)).await?;
    denied(
        keys.rotate_tenant_key(as_id(
            STRANGER,
            pb::RotateTenantKeyRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await,
        "still default deny",
    );
    Ok(())
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Export through the RPC, verify offline, and the four tamper cases: an edited, a
/// deleted, a reordered and a truncated record are each detected, naming the record.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_export_verifies_and_every_tampering_is_detected() -> Result<()> {
    let e = env("").await?;
    let mut keys = KeysClient::new(e.ch.clone());
    keys.create_tenant(as_id(
        OPS,
        pb::CreateTenantRequest {
            tenant_id: "acme".into(),
            kms_key_id: String::new(),
        },
    ))
    .await?;
    for _ in 0..3 {
        keys.rotate_tenant_key(as_id(
            OPS,
            pb::RotateTenantKeyRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await?;
    }
    encrypt(&e.ch, APP, "acme").await?;
    e.audit.flush().await?;
    assert!(
        e.audit.checkpoint().await?.is_some(),
        "a checkpoint is written"
    );
    keys.rotate_tenant_key(as_id(
        OPS,
        pb::RotateTenantKeyRequest {
            tenant_id: "acme".into(),
        },
    ))
    .await?;

    let mut audit = AuditClient::new(e.ch.clone());
    let head = audit
        .get_audit_head(as_id(AUDITOR, pb::GetAuditHeadRequest {}))
        .await?
        .into_inner();
    let key = fieldkey::erasure::receipt::parse_public_key(&head.public_key_pem)?;
    let mut stream = audit
        .export_audit(as_id(AUDITOR, pb::ExportAuditRequest { from_seq: 1 }))
        .await?
        .into_inner();
    let mut lines = Vec::new();
    while let Some(l) = stream.message().await? {
        lines.push(l.line);
    }
    let text = lines.join("\n");
    let summary = verify_export(&text, vec![key])?;
    assert!(summary.records >= 7, "{summary:?}");
    assert_eq!(summary.checkpoints, 1);
    eprintln!("intact export: {summary:?}");

    let n = lines.len() - 1; // the last line is the trailer
    let check = |what: &str, tampered: Vec<String>, expect: &str| {
        let r = verify_export(&tampered.join("\n"), vec![key]);
        let err = r.expect_err(what);
        eprintln!("{what}: {err}");
        assert!(err.to_string().contains(expect), "{what}: {err}");
        err.kind
    };
    // edited: record 3's actor changed
    let mut edited = lines.clone();
    edited[2] = edited[2].replace(OPS, "spiffe://example.org/ns/ops/sa/someone-else");
    let kind = check(
        "edited",
        edited,
        "audit record 3: content does not match its hash",
    );
    assert_eq!(kind, Failure::Altered);
    // deleted: record 4 removed
    let mut deleted = lines.clone();
    deleted.remove(3);
    let kind = check("deleted", deleted, "audit record 5: expected record 4 next");
    assert_eq!(kind, Failure::Chain);
    // reordered: records 2 and 3 swapped
    let mut reordered = lines.clone();
    reordered.swap(1, 2);
    let kind = check(
        "reordered",
        reordered,
        "audit record 3: expected record 2 next",
    );
    assert_eq!(kind, Failure::Chain);
    // truncated: the last records and the trailer cut off
    let truncated: Vec<String> = lines[..n - 2].to_vec();
    let kind = check("truncated", truncated, "truncated");
    assert_eq!(kind, Failure::Incomplete);
    // truncated but keeping the trailer: the count no longer matches
    let mut cut = lines[..n - 2].to_vec();
    cut.push(lines[n].clone());
    let kind = check("truncated (trailer kept)", cut, "truncated");
    assert_eq!(kind, Failure::Incomplete);
    // the beginning cut off (records 1 and 2), trailer kept
    let headless: Vec<String> = lines[2..].to_vec();
    let kind = check(
        "beginning deleted",
        headless,
        "records at the beginning are missing",
    );
    assert_eq!(kind, Failure::Incomplete);
    // a forged checkpoint signature
    let forged: Vec<String> = lines
        .iter()
        .map(|l| {
            if l.contains("audit.checkpoint") {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["details"]["signature"] = serde_json::json!(base64_zero());
                v.to_string()
            } else {
                l.clone()
            }
        })
        .collect();
    // (its record's hash covers the signature: caught as an edit; a forgery that
    // recomputes the hashes is refused on the signature, tests/audit_forgery.rs)
    let kind = check(
        "forged checkpoint",
        forged,
        "content does not match its hash",
    );
    assert_eq!(kind, Failure::Altered);
    let _ = write_lines;

    // The key store itself, offline, with the CLI: intact, then edited, then truncated.
    let pem = e._dir.path().join("audit.pem");
    std::fs::write(&pem, &head.public_key_pem)?;
    let cli = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fieldkey"))
            .args(["audit", "verify", "--data-dir"])
            .arg(e._dir.path())
            .arg("--public-key")
            .arg(&pem)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = cli();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("audit log OK (key store)"), "{out}");
    let raw = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        e._dir.path().join("keys.db").display()
    ))
    .await?;
    sqlx::query("DROP TRIGGER fk_audit_no_update")
        .execute(&raw)
        .await?;
    sqlx::query("DROP TRIGGER fk_audit_no_delete")
        .execute(&raw)
        .await?;
    sqlx::query("UPDATE fk_audit SET actor = 'someone-else' WHERE seq = 2")
        .execute(&raw)
        .await?;
    let (code, out) = cli();
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains("audit record 2: content does not match its hash"),
        "{out}"
    );
    eprintln!("store edited: {}", out.trim());
    sqlx::query("UPDATE fk_audit SET actor = $1 WHERE seq = 2")
        .bind(OPS)
        .execute(&raw)
        .await?;
    let (code, out) = cli();
    assert_eq!(code, Some(0), "restored: {out}");
    let last: i64 = sqlx::query_scalar("SELECT MAX(seq) FROM fk_audit")
        .fetch_one(&raw)
        .await?;
    sqlx::query("DELETE FROM fk_audit WHERE seq = $1")
        .bind(last)
        .execute(&raw)
        .await?;
    let (code, out) = cli();
    assert_eq!(code, Some(4), "{out}");
    assert!(out.contains("truncated"), "{out}");
    eprintln!("store truncated: {}", out.trim());
    sqlx::query("DELETE FROM fk_audit WHERE seq = 1")
        .execute(&raw)
        .await?;
    let (code, out) = cli();
    assert_eq!(code, Some(4), "{out}");
    assert!(
        out.contains("records at the beginning were deleted"),
        "{out}"
    );
    eprintln!("store beginning deleted: {}", out.trim());
    raw.close().await;
    Ok(())
}

fn base64_zero() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([0u8; 64])
}

/// A column is one authorization decision for all its values, takes all of them from
/// the decrypt budget at once (a column cannot slip past the guard), and is counted in
/// the audit window with the number of its values, by outcome.
#[tokio::test(flavor = "multi_thread")]
async fn a_column_is_authorized_rate_limited_and_counted_per_value() -> Result<()> {
    use bytes::Bytes;
    let e = env(&format!(
        "[[decrypt]]\nidentity = \"{APP}\"\nper_second = 1\nburst = 5\n"
    ))
    .await?;
    KeysClient::new(e.ch.clone())
        .create_tenant(as_id(
            OPS,
            pb::CreateTenantRequest {
                tenant_id: "acme".into(),
                kms_key_id: String::new(),
            },
        ))
        .await?;
    let mut c = CryptoClient::new(e.ch.clone());
    let enc = c
        .encrypt_column(as_id(
            APP,
            pb::EncryptColumnRequest {
                tenant_id: "acme".into(),
                field: "email".into(),
                subject_id: "u1".into(),
                plaintexts: (0..6).map(|i| Bytes::from(format!("v{i}"))).collect(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    assert!(enc.errors.is_empty(), "{:?}", enc.errors);
    let column = |n: usize| pb::DecryptColumnRequest {
        tenant_id: "acme".into(),
        field: "email".into(),
        subject_id: "u1".into(),
        ciphertexts: enc.ciphertexts[..n].to_vec(),
        ..Default::default()
    };
    // Analytics may not decrypt: every value refused, nothing decrypted.
    let denied = c
        .decrypt_column(as_id(ANALYTICS, column(3)))
        .await?
        .into_inner();
    assert_eq!(denied.errors.len(), 3);
    assert!(denied.errors.iter().all(|x| {
        let ie = x.error.as_ref().unwrap();
        ie.reason == "PERMISSION_DENIED" && ie.code == Code::PermissionDenied as i32
    }));
    assert!(denied.plaintexts.iter().all(Bytes::is_empty));
    // Burst 5: a column of 6 does not fit and is refused whole; one of 5 fits.
    let over = c.decrypt_column(as_id(APP, column(6))).await?.into_inner();
    assert_eq!(over.errors.len(), 6, "{:?}", over.errors);
    assert_eq!(
        over.errors[0].error.as_ref().unwrap().reason,
        "DECRYPT_RATE_LIMITED"
    );
    let fits = c.decrypt_column(as_id(APP, column(5))).await?.into_inner();
    assert!(fits.errors.is_empty(), "{:?}", fits.errors);
    let after = c.decrypt_column(as_id(APP, column(1))).await?.into_inner();
    assert_eq!(after.errors.len(), 1, "the budget is spent");
    e.audit.flush().await?;
    let recs = all_audit(&*e.store).await;
    let count = |actor: &str, action: &str, outcome: &str| -> u64 {
        recs.iter()
            .filter(|r| {
                r.event.actor == actor
                    && r.event.action == action
                    && r.event.details["outcome"] == outcome
            })
            .map(|r| r.event.details["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(count(APP, "Crypto::Encrypt", "ok"), 6);
    assert_eq!(count(ANALYTICS, "Crypto::Decrypt", "denied"), 3);
    assert_eq!(count(APP, "Crypto::Decrypt", "ok"), 5);
    assert_eq!(count(APP, "Crypto::Decrypt", "rate_limited"), 7);
    Ok(())
}
