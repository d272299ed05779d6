//! A forger with write access to an audit export (or the key store it came from) but
//! not the sidecar's signing key: edits a record, recomputes every hash after it, and
//! re-signs the checkpoints and the trailer with a key of their own. The hash chain is
//! then perfect (it verifies under the forger's key), so only the signatures can tell,
//! and the offline verifier (library and `fieldkey audit verify`) must refuse on the
//! signature, with its named failure, because it trusts only the public key the
//! operator gives it.
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use common::grpc::{as_id, create_tenant, ids};
use common::sidecar::{Sidecar, TRUST_MESH};
use ed25519_dalek::SigningKey;
use fieldkey::audit::verify::{
    CHECKPOINT_ACTION, Failure, Trailer, checkpoint_details, sign_trailer, trailer_line,
    verify_export,
};
use fieldkey::audit::{AuditRecord, record_hash};
use fieldkey::proto::pb::{self, audit_client::AuditClient, keys_client::KeysClient};
use std::time::Duration;

/// Rewrites `lines` (records, then the trailer) from record `edit_seq` on: `edit`
/// changes that record, every later hash is recomputed, every checkpoint after it is
/// re-signed by `forger` (declaring `claimed_key_id`, or the forger's own id), and the
/// trailer too.
fn forge(
    lines: &[String],
    edit_seq: u64,
    edit: impl Fn(&mut AuditRecord),
    forger: &SigningKey,
    claimed_key_id: Option<&str>,
) -> Vec<String> {
    let (trailer_line_text, records) = lines.split_last().unwrap();
    let mut out = Vec::new();
    let mut prev = None;
    for l in records {
        let mut r: AuditRecord = serde_json::from_str(l).unwrap();
        if r.seq < edit_seq {
            out.push(l.clone());
            prev = Some(r.hash);
            continue;
        }
        if r.seq == edit_seq {
            edit(&mut r);
        }
        r.prev_hash = prev.unwrap();
        if r.event.action == CHECKPOINT_ACTION {
            let mut d = checkpoint_details(r.seq - 1, &r.prev_hash, forger);
            if let Some(k) = claimed_key_id {
                d["key_id"] = serde_json::json!(k);
            }
            r.event.details = d;
        }
        r.hash = record_hash(r.seq, r.ts, &r.event, &r.prev_hash);
        prev = Some(r.hash);
        out.push(serde_json::to_string(&r).unwrap());
    }
    let v: serde_json::Value = serde_json::from_str(trailer_line_text).unwrap();
    let mut t: Trailer = serde_json::from_value(v["export_end"].clone()).unwrap();
    t.last_hash = hex::encode(prev.unwrap());
    let mut t = sign_trailer(t, forger);
    if let Some(k) = claimed_key_id {
        t.key_id = k.to_owned();
    }
    out.push(trailer_line(&t));
    out
}

fn text(lines: &[String]) -> String {
    lines.join("\n") + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rehashed_export_re_signed_by_another_key_is_refused_on_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    let sc = Sidecar::builder()
        .any_port()
        .data_dir(&dir.path().join("data"))
        .config_text(
            dir.path(),
            &format!("{TRUST_MESH}\n[audit]\nwindow_secs = 1\ncheckpoint_secs = 1\n"),
        )
        .env("FIELDKEY_LOCAL_KMS_PASSPHRASE", "audit forgery passphrase")
        .start();
    let ch = sc.channel().await;
    create_tenant(&ch, "acme").await.unwrap();
    let rotate = || async {
        KeysClient::new(ch.clone())
            .rotate_tenant_key(as_id(
                ids::OPS,
                pb::RotateTenantKeyRequest {
                    tenant_id: "acme".into(),
                },
            ))
            .await
            .unwrap();
    };
    rotate().await;
    rotate().await;
    let mut audit = AuditClient::new(ch.clone());
    let export = |mut audit: AuditClient<_>| async move {
        let mut s = audit
            .export_audit(as_id(ids::AUDITOR, pb::ExportAuditRequest { from_seq: 1 }))
            .await
            .unwrap()
            .into_inner();
        let mut lines = Vec::new();
        while let Some(l) = s.message().await.unwrap() {
            lines.push(l.line);
        }
        lines
    };
    // A checkpoint after the rotations (the sidecar writes one each second when the
    // chain has grown), then one more record after it.
    let has_checkpoint =
        |lines: &[String]| lines.iter().skip(3).any(|l| l.contains(CHECKPOINT_ACTION));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !has_checkpoint(&export(audit.clone()).await) {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rotate().await;
    let head = audit
        .get_audit_head(as_id(ids::AUDITOR, pb::GetAuditHeadRequest {}))
        .await
        .unwrap()
        .into_inner();
    let trusted = fieldkey::erasure::receipt::parse_public_key(&head.public_key_pem).unwrap();
    let lines = export(audit.clone()).await;
    let intact = verify_export(&text(&lines), vec![trusted]).unwrap();
    assert!(intact.checkpoints >= 1, "{intact:?}");
    let first_cp = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["action"] == CHECKPOINT_ACTION)
        .unwrap()["seq"]
        .as_u64()
        .unwrap();
    let last_seq = intact.last_seq;
    assert!(
        last_seq > first_cp,
        "a record after the first checkpoint: {intact:?}"
    );
    eprintln!("intact: {intact:?}, first checkpoint at record {first_cp}");

    let forger = SigningKey::from_bytes(&common::rand_bytes::<32>());
    let forger_pub = forger.verifying_key();
    let trusted_id = fieldkey::signing::key_id(&trusted);
    let rename =
        |r: &mut AuditRecord| r.event.actor = "spiffe://example.org/ns/ops/sa/innocent".into();

    // 1. Edited before the first checkpoint, everything after re-signed by the forger
    //    under the forger's own key id: the checkpoint names an untrusted key.
    let forged = forge(&lines, 2, rename, &forger, None);
    assert_ne!(forged, lines);
    let ok = verify_export(&text(&forged), vec![forger_pub]).unwrap();
    assert_eq!(
        (ok.records, ok.checkpoints),
        (intact.records, intact.checkpoints),
        "the forgery is consistent: only the key differs"
    );
    let e = verify_export(&text(&forged), vec![trusted]).unwrap_err();
    eprintln!("forged, own key id: {e}");
    assert_eq!(
        (e.kind, e.seq),
        (Failure::UntrustedKey, Some(first_cp)),
        "{e}"
    );

    // 2. The same, the forger's signatures claiming the trusted key's id: the signature
    //    does not verify under that key.
    let forged_claim = forge(&lines, 2, rename, &forger, Some(&trusted_id));
    let e = verify_export(&text(&forged_claim), vec![trusted]).unwrap_err();
    eprintln!("forged, claiming the trusted key id: {e}");
    assert_eq!(
        (e.kind, e.seq),
        (Failure::BadSignature, Some(first_cp)),
        "{e}"
    );

    // 3. Edited after the last checkpoint: only the trailer covers it.
    for (claim, kind) in [
        (None, Failure::UntrustedKey),
        (Some(trusted_id.as_str()), Failure::BadSignature),
    ] {
        let forged_tail = forge(&lines, last_seq, rename, &forger, claim);
        let e = verify_export(&text(&forged_tail), vec![trusted]).unwrap_err();
        eprintln!("forged tail (claim {claim:?}): {e}");
        assert_eq!((e.kind, e.seq, e.line), (kind, None, None), "{e}");
        assert!(e.reason.starts_with("export trailer "), "{e}");
    }

    // 4. No trust anchor at all: nothing verifies (the export carries no key).
    let e = verify_export(&text(&lines), vec![]).unwrap_err();
    assert_eq!(e.kind, Failure::UntrustedKey, "{e}");

    // The CLI, given the operator's public key: exit 4 on the signature.
    let pem = dir.path().join("audit.pem");
    std::fs::write(&pem, &head.public_key_pem).unwrap();
    for (name, content, expect) in [
        ("intact.jsonl", &lines, None),
        (
            "forged.jsonl",
            &forged,
            Some("checkpoint signed by key ed25519:"),
        ),
        (
            "forged-claim.jsonl",
            &forged_claim,
            Some("checkpoint signature does not verify under the trusted key"),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text(content)).unwrap();
        let out = common::sidecar::run_cli(
            None,
            &[
                "audit",
                "verify",
                "--export",
                path.to_str().unwrap(),
                "--public-key",
                pem.to_str().unwrap(),
            ],
        );
        let all = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        match expect {
            None => assert_eq!(out.status.code(), Some(0), "{name}: {all}"),
            Some(want) => {
                assert_eq!(out.status.code(), Some(4), "{name}: {all}");
                assert!(
                    all.contains(&format!("audit record {first_cp}: {want}")),
                    "{name}: {all}"
                );
                assert!(!all.contains("does not match its hash"), "{name}: {all}");
            }
        }
    }
    sc.stop();
}
