//! The key lifecycle: namespaces (with their deletion records), epoch keys, deletion
//! with its window, cancellation, and the sweep of keys past their date.

use super::common;
use super::common::openbao::{BaoServer, MOUNT, sidecar_policy};
use super::{connect, ctx};
use fieldkey::kms::{KeyDeletion, KeyStatus, Kms, KmsError};

#[tokio::test]
async fn the_namespace_header_is_sent() {
    let bao = BaoServer::start().await;
    bao.api_ok("POST", "sys/namespaces/team-a", None)
        .await
        .unwrap();
    let ns = Some("team-a");
    for (path, body) in [
        (
            format!("sys/mounts/{MOUNT}"),
            serde_json::json!({"type": "transit"}),
        ),
        (
            "sys/mounts/secret".to_owned(),
            serde_json::json!({"type": "kv", "options": {"version": "2"}}),
        ),
        (
            format!("{MOUNT}/keys/ns-key"),
            serde_json::json!({"derived": true}),
        ),
    ] {
        let (status, json) = bao.api_in(ns, "POST", &path, Some(body)).await.unwrap();
        assert!((200..300).contains(&status), "{path}: {status} {json}");
    }
    let mut s = bao.settings();
    s.key = "ns-key".into();
    s.namespace = Some("team-a".into());
    let kms = connect(&s).await;
    kms.check().await.unwrap();
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key("ns-key", &c).await.unwrap();
    assert!(
        kms.unwrap("ns-key", &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    // The deletion records live in the namespace too.
    kms.schedule_key_deletion("ns-key", 7).await.unwrap();
    assert!(matches!(
        kms.key_status("ns-key").await.unwrap(),
        KeyStatus::PendingDeletion {
            deletion_date_unix_ms: Some(_)
        }
    ));
    kms.cancel_key_deletion("ns-key").await.unwrap();
    // Without the header the key is not found: it exists only in the namespace.
    s.namespace = None;
    let root_ns = connect(&s).await;
    assert!(matches!(
        root_ns.check().await,
        Err(KmsError::KeyNotFound { .. })
    ));
}

#[tokio::test]
async fn deletion_refuses_at_once_is_idempotent_cancellable_and_final() {
    let bao = BaoServer::start().await;
    let kms = connect(
        &bao.approle("sidecar", &sidecar_policy("s1"), None)
            .await
            .unwrap(),
    )
    .await;
    let id = kms.create_epoch_key(1, "s1").await.unwrap();
    assert!(id.starts_with("fieldkey-s1-epoch-1-"), "{id}");
    let cfg = bao.key(&id).await.unwrap().unwrap();
    assert_eq!(
        (cfg["derived"].clone(), cfg["type"].clone()),
        (true.into(), "aes256-gcm96".into())
    );
    // Never the same key twice, even for the same epoch.
    let id2 = kms.create_epoch_key(1, "s1").await.unwrap();
    assert_ne!(id, id2);
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Enabled);

    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(&id, &c).await.unwrap();
    let before = common::now_ms();
    let KeyDeletion::Scheduled {
        pending_window_days: 7,
        deletion_date_unix_ms: Some(date),
    } = kms.schedule_key_deletion(&id, 7).await.unwrap()
    else {
        panic!("not scheduled");
    };
    assert!((date - before - 7 * 86_400_000).abs() < 60_000, "{date}");
    // Refused at once, by every use.
    assert!(matches!(
        kms.unwrap(&id, &dk.wrapped, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    assert!(matches!(
        kms.wrap(&id, &dk.secret, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    assert!(matches!(
        kms.generate_data_key(&id, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    // ... by another replica's provider too (it never saw the key before).
    let other = connect(&bao.settings()).await;
    assert!(matches!(
        other.unwrap(&id, &dk.wrapped, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    assert_eq!(
        kms.key_status(&id).await.unwrap(),
        KeyStatus::PendingDeletion {
            deletion_date_unix_ms: Some(date)
        }
    );
    assert_eq!(
        kms.schedule_key_deletion(&id, 7).await.unwrap(),
        KeyDeletion::AlreadyPending {
            deletion_date_unix_ms: Some(date)
        }
    );
    // Cancelled inside the window: usable again, no record left.
    kms.cancel_key_deletion(&id).await.unwrap();
    assert!(
        kms.unwrap(&id, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Enabled);
    assert!(bao.deletion_record(&id).await.unwrap().is_null());
    kms.cancel_key_deletion(&id).await.unwrap();

    // Window 0: deleted now.
    assert!(matches!(
        kms.schedule_key_deletion(&id, 0).await.unwrap(),
        KeyDeletion::Scheduled {
            pending_window_days: 0,
            ..
        }
    ));
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Deleted);
    assert!(bao.key(&id).await.unwrap().is_none());
    assert!(bao.deletion_record(&id).await.unwrap().is_null());
    assert!(matches!(
        kms.unwrap(&id, &dk.wrapped, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        kms.schedule_key_deletion(&id, 7).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        kms.cancel_key_deletion(&id).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        kms.schedule_key_deletion(&id2, 31).await,
        Err(KmsError::Misconfigured(_))
    ));
    assert_eq!(
        kms.key_status("no-such-key").await.unwrap(),
        KeyStatus::Deleted
    );
}

#[tokio::test]
async fn keys_past_their_window_are_deleted_by_whoever_looks_first() {
    let bao = BaoServer::start().await;
    // Under the least-privilege policy throughout: its KV rights must cover the sweep.
    let sidecar = bao
        .approle("sidecar", &sidecar_policy("s1"), None)
        .await
        .unwrap();
    let kms = connect(&sidecar).await;
    let c = ctx("t1", 1);
    let mut keys = Vec::new();
    for _ in 0..4 {
        let id = kms.create_epoch_key(2, "s1").await.unwrap();
        let wrapped = kms.generate_data_key(&id, &c).await.unwrap().wrapped;
        kms.schedule_key_deletion(&id, 7).await.unwrap();
        bao.backdate_deletion(&id).await.unwrap();
        keys.push((id, wrapped));
    }
    // A use of the key.
    let (a, wa) = &keys[0];
    assert!(matches!(
        kms.unwrap(a, wa, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(bao.key(a).await.unwrap().is_none());
    // Its state.
    assert_eq!(
        kms.key_status(&keys[1].0).await.unwrap(),
        KeyStatus::Deleted
    );
    assert!(bao.key(&keys[1].0).await.unwrap().is_none());
    // A late cancellation finds it gone.
    assert!(matches!(
        kms.cancel_key_deletion(&keys[2].0).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    // A provider that connects sweeps the rest.
    assert!(bao.key(&keys[3].0).await.unwrap().is_some());
    let _fresh = connect(&sidecar).await;
    assert!(bao.key(&keys[3].0).await.unwrap().is_none());
    for (id, _) in &keys {
        assert!(
            bao.deletion_record(id).await.unwrap().is_null(),
            "record of {id} left"
        );
    }

    // A record never destroys a key in use: one restored by hand outside fieldkey
    // loses its record at the sweep, and lives.
    let live = kms.create_epoch_key(3, "s1").await.unwrap();
    kms.schedule_key_deletion(&live, 7).await.unwrap();
    bao.backdate_deletion(&live).await.unwrap();
    bao.api_ok(
        "POST",
        &format!("{MOUNT}/keys/{live}/soft-delete-restore"),
        None,
    )
    .await
    .unwrap();
    let _fresh = connect(&sidecar).await;
    assert!(bao.key(&live).await.unwrap().is_some());
    assert!(bao.deletion_record(&live).await.unwrap().is_null());
    assert_eq!(kms.key_status(&live).await.unwrap(), KeyStatus::Enabled);

    // A key soft-deleted by hand has no date; scheduling gives it one.
    bao.api_ok("DELETE", &format!("{MOUNT}/keys/{live}/soft-delete"), None)
        .await
        .unwrap();
    assert_eq!(
        kms.key_status(&live).await.unwrap(),
        KeyStatus::PendingDeletion {
            deletion_date_unix_ms: None
        }
    );
    assert!(matches!(
        kms.schedule_key_deletion(&live, 3).await.unwrap(),
        KeyDeletion::Scheduled {
            pending_window_days: 3,
            deletion_date_unix_ms: Some(_)
        }
    ));
}
