//! The PKCS#11 KMS provider against real SoftHSM2 tokens (one per test,
//! [`common::softhsm::SoftHsm`]; scripts/test.sh sets SoftHSM2 up): wrapping bound to
//! key and context, the attacks on wrapped keys, PIN and key-policy refusals, the
//! deletion lifecycle an HSM lacks, a token that loses its login or goes away, and the
//! session pool under load.
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::sync::Arc;

use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

use common::softhsm::{DEFAULT_KEY_LABEL, KeySpec, SoftHsm};
use fieldkey::crypto::SecretKey;
use fieldkey::kms::pkcs11::Pkcs11Kms;
use fieldkey::kms::{EncryptionContext, KeyDeletion, KeyStatus, Kms, KmsError, WrappedKey};

fn ctx(tenant: &str, version: u32) -> EncryptionContext {
    EncryptionContext::tenant_key(tenant, version)
}

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    fieldkey::model::now_ms()
}

#[tokio::test]
async fn wrapped_keys_round_trip_under_their_key_and_context() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    assert_eq!(kms.provider(), "pkcs11");
    assert_eq!(kms.default_key_id(), DEFAULT_KEY_LABEL);
    let id = kms.default_key_id().to_owned();
    let c = ctx("t1", 1);

    let dk = kms.generate_data_key(&id, &c).await.unwrap();
    assert_eq!(dk.wrapped.as_bytes().len(), 61);
    assert_eq!(dk.wrapped.as_bytes()[0], 0x01);
    assert!(
        kms.unwrap(&id, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );

    let key = SecretKey::generate().unwrap();
    let w1 = kms.wrap(&id, &key, &c).await.unwrap();
    let w2 = kms.wrap(&id, &key, &c).await.unwrap();
    assert_ne!(w1.as_bytes(), w2.as_bytes(), "a fresh IV per wrap");
    assert!(kms.unwrap(&id, &w1, &c).await.unwrap().ct_eq(&key));
    assert!(kms.unwrap(&id, &w2, &c).await.unwrap().ct_eq(&key));

    kms.check().await.unwrap();
    assert_eq!(kms.canonical_key_id(&id).await.unwrap(), id);
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Enabled);
}

/// A wrapped key replayed under another tenant's or version's context (or with an
/// extra pair) must not unwrap.
#[tokio::test]
async fn a_wrapped_key_replayed_under_another_context_is_refused() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    let id = DEFAULT_KEY_LABEL;
    let dk = kms.generate_data_key(id, &ctx("t1", 1)).await.unwrap();
    for other in [
        ctx("t2", 1),
        ctx("t1", 2),
        ctx("t1", 1).with("fieldkey:purpose", "subject-wrapping-key"),
        ctx("t1", 1).with("extra", "x"),
        EncryptionContext::default(),
    ] {
        assert!(
            matches!(
                kms.unwrap(id, &dk.wrapped, &other).await,
                Err(KmsError::InvalidCiphertext)
            ),
            "unwrapped under {other:?}"
        );
    }
    // and it still unwraps where it belongs (the refusals above were not a dead key)
    assert!(
        kms.unwrap(id, &dk.wrapped, &ctx("t1", 1))
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
}

/// Every flipped bit position (one per byte), every truncation and an appended byte:
/// [`KmsError::InvalidCiphertext`], never a panic or another error.
#[tokio::test]
async fn altered_wrapped_keys_are_invalid_ciphertext() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    let id = DEFAULT_KEY_LABEL;
    let c = ctx("t1", 1);
    let good = kms.generate_data_key(id, &c).await.unwrap().wrapped;
    let bytes = good.as_bytes().to_vec();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let r = kms.unwrap(id, &WrappedKey::new(b), &c).await;
        assert!(
            matches!(r, Err(KmsError::InvalidCiphertext)),
            "byte {i} flipped: {r:?}"
        );
    }
    for n in 0..bytes.len() {
        let r = kms
            .unwrap(id, &WrappedKey::new(bytes[..n].to_vec()), &c)
            .await;
        assert!(
            matches!(r, Err(KmsError::InvalidCiphertext)),
            "truncated to {n}: {r:?}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        kms.unwrap(id, &WrappedKey::new(longer), &c).await,
        Err(KmsError::InvalidCiphertext)
    ));
    // the session pool survived the failures
    kms.unwrap(id, &good, &c).await.unwrap();
}

#[tokio::test]
async fn another_key_label_cannot_unwrap() {
    let hsm = SoftHsm::init();
    hsm.create_key("other", KeySpec::default());
    let kms = hsm.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY_LABEL, &c).await.unwrap();
    assert!(matches!(
        kms.unwrap("other", &dk.wrapped, &c).await,
        Err(KmsError::InvalidCiphertext)
    ));
    for missing in ["nope", "", "fieldkey-default\n", &"x".repeat(300)] {
        let r = kms.unwrap(missing, &dk.wrapped, &c).await;
        assert!(
            matches!(r, Err(KmsError::KeyNotFound { .. })),
            "{missing:?}: {r:?}"
        );
        assert_eq!(kms.key_status(missing).await.unwrap(), KeyStatus::Deleted);
    }
    // Two keys with one label: which one is meant is not knowable.
    hsm.create_key("twice", KeySpec::default());
    hsm.create_key("twice", KeySpec::default());
    let r = kms.wrap("twice", &dk.secret, &c).await;
    assert!(matches!(r, Err(KmsError::Misconfigured(_))), "{r:?}");
}

#[tokio::test]
async fn a_wrong_pin_is_misconfigured_and_never_shown() {
    let hsm = SoftHsm::init();
    let wrong = "wrong-pin-4711";
    let settings = hsm.settings_with_pin(wrong);
    let Err(KmsError::Misconfigured(msg)) = Pkcs11Kms::open(&settings).await else {
        panic!("a wrong PIN was accepted or gave another error");
    };
    assert!(msg.contains("refused the PIN"), "{msg}");
    assert!(msg.contains("CKR_PIN_INCORRECT"), "{msg}");
    assert!(
        !msg.contains(wrong) && !msg.contains(hsm.user_pin()),
        "{msg}"
    );
    // The right PIN still works: the token was not locked by the one attempt.
    hsm.kms().await.check().await.unwrap();

    // One PIN source only; an absent or empty one is refused.
    let mut both = hsm.settings();
    both.pin_env = Some("FIELDKEY_TEST_NO_SUCH_PIN_VAR".into());
    assert!(matches!(
        Pkcs11Kms::open(&both).await,
        Err(KmsError::Misconfigured(_))
    ));
    let mut env = hsm.settings();
    env.pin_file = None;
    env.pin_env = Some("FIELDKEY_TEST_NO_SUCH_PIN_VAR".into());
    let Err(KmsError::Misconfigured(msg)) = Pkcs11Kms::open(&env).await else {
        panic!("a missing PIN variable was accepted");
    };
    assert!(msg.contains("FIELDKEY_TEST_NO_SUCH_PIN_VAR"), "{msg}");
    let empty = hsm.settings_with_pin("");
    assert!(matches!(
        Pkcs11Kms::open(&empty).await,
        Err(KmsError::Misconfigured(_))
    ));
}

#[tokio::test]
async fn debug_output_never_shows_the_pin() {
    let hsm = SoftHsm::init();
    let settings = hsm.settings();
    let kms = hsm.kms().await;
    for text in [
        format!("{settings:?}"),
        format!("{kms:?}"),
        format!("{hsm:?}"),
    ] {
        assert!(!text.contains(hsm.user_pin()), "{text}");
    }
    assert!(format!("{kms:?}").contains(hsm.token_label()));
}

#[tokio::test]
async fn keys_that_can_leave_the_token_are_refused() {
    let hsm = SoftHsm::init();
    hsm.create_key(
        "extractable",
        KeySpec {
            extractable: true,
            ..KeySpec::default()
        },
    );
    hsm.create_key(
        "readable",
        KeySpec {
            sensitive: false,
            ..KeySpec::default()
        },
    );
    hsm.create_key(
        "aes128",
        KeySpec {
            len: 16,
            ..KeySpec::default()
        },
    );
    for (label, why) in [
        ("extractable", "extractable"),
        ("readable", "not sensitive"),
        ("aes128", "256 bits"),
    ] {
        let mut s = hsm.settings();
        s.key_label = label.into();
        let Err(KmsError::Misconfigured(msg)) = Pkcs11Kms::open(&s).await else {
            panic!("default key {label} accepted");
        };
        assert!(msg.contains(why), "{label}: {msg}");
    }
    // Named as a tenant's key: refused too.
    let kms = hsm.kms().await;
    let key = SecretKey::generate().unwrap();
    assert!(matches!(
        kms.wrap("extractable", &key, &ctx("t1", 1)).await,
        Err(KmsError::Misconfigured(_))
    ));
}

#[tokio::test]
async fn open_refuses_bad_settings_and_tolerates_a_missing_default_key() {
    let hsm = SoftHsm::init();
    let mut s = hsm.settings();
    s.token_label = "fk-no-such-token".into();
    assert!(matches!(
        Pkcs11Kms::open(&s).await,
        Err(KmsError::Misconfigured(_))
    ));
    let mut s = hsm.settings();
    s.module = "/nonexistent/libpkcs11.so".into();
    assert!(matches!(
        Pkcs11Kms::open(&s).await,
        Err(KmsError::Misconfigured(_))
    ));
    // The default key may have been deleted on purpose (the legacy key of key
    // epochs): the provider opens, readiness says the key is missing.
    let mut s = hsm.settings();
    s.key_label = "not-there".into();
    let kms = Pkcs11Kms::open(&s).await.unwrap();
    assert!(matches!(
        kms.check().await,
        Err(KmsError::KeyNotFound { .. })
    ));
}

/// Schedule → refused at once (by fieldkey and by the token for other applications) →
/// already pending on repeat → cancelled → usable again; window 0 → destroyed at once,
/// really gone from the token.
#[tokio::test]
async fn deletion_refuses_at_once_can_be_cancelled_and_destroys_the_key() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    let id = kms.create_epoch_key(1, "store-a").await.unwrap();
    assert!(id.starts_with("fieldkey/store-a/epoch-1-"), "{id}");
    let again = kms.create_epoch_key(1, "store-a").await.unwrap();
    assert_ne!(id, again, "an existing label is never adopted");
    assert_eq!(hsm.find_keys(&id).len(), 1);
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(&id, &c).await.unwrap();
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Enabled);

    assert!(matches!(
        kms.schedule_key_deletion(&id, 31).await,
        Err(KmsError::Misconfigured(_))
    ));
    let before = now_ms();
    let KeyDeletion::Scheduled {
        pending_window_days: 7,
        deletion_date_unix_ms: Some(date),
    } = kms.schedule_key_deletion(&id, 7).await.unwrap()
    else {
        panic!("not scheduled for 7 days");
    };
    assert!((before + 7 * DAY_MS..=now_ms() + 7 * DAY_MS).contains(&date));
    for r in [
        kms.unwrap(&id, &dk.wrapped, &c).await.map(|_| ()),
        kms.wrap(&id, &dk.secret, &c).await.map(|_| ()),
        kms.generate_data_key(&id, &c).await.map(|_| ()),
    ] {
        assert!(matches!(r, Err(KmsError::KeyInvalidState { .. })), "{r:?}");
    }
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
    // Other applications of the token are refused too (CKA_ENCRYPT off).
    let s = hsm.session();
    let key = hsm.find_keys(&id)[0];
    let mut iv = [0u8; 12];
    let mech = Mechanism::AesGcm(GcmParams::new(&mut iv, &[], 128.into()).unwrap());
    assert!(matches!(
        s.encrypt(&mech, key, &[0u8; 32]),
        Err(P11Error::Pkcs11(RvError::KeyFunctionNotPermitted, _))
    ));

    kms.cancel_key_deletion(&id).await.unwrap();
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Enabled);
    assert!(
        kms.unwrap(&id, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
    kms.cancel_key_deletion(&id).await.unwrap(); // an enabled key: nothing to do

    let before = now_ms();
    let KeyDeletion::Scheduled {
        pending_window_days: 0,
        deletion_date_unix_ms: Some(date),
    } = kms.schedule_key_deletion(&id, 0).await.unwrap()
    else {
        panic!("window 0 not scheduled");
    };
    assert!((before..=now_ms()).contains(&date));
    assert_eq!(kms.key_status(&id).await.unwrap(), KeyStatus::Deleted);
    assert!(matches!(
        kms.unwrap(&id, &dk.wrapped, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    // Really gone from the token, as a second session of the test sees it.
    assert!(
        hsm.find_keys(&id).is_empty(),
        "the key outlived its deletion"
    );
    assert!(hsm.find_data(&format!("fieldkey-deletion:{id}")).is_empty());
    assert!(matches!(
        kms.schedule_key_deletion(&id, 7).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(matches!(
        kms.cancel_key_deletion(&id).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    // The other epoch key was never touched.
    assert_eq!(kms.key_status(&again).await.unwrap(), KeyStatus::Enabled);
}

/// Moves the deletion date of `key_label`'s record into the past, as the test's own
/// PKCS#11 session (SoftHSM2 does not let a data object's value change: the record is
/// replaced).
fn backdate_deletion(hsm: &SoftHsm, key_label: &str) {
    let record_label = format!("fieldkey-deletion:{key_label}");
    let records = hsm.find_data(&record_label);
    assert_eq!(records.len(), 1, "one deletion record for {key_label}");
    let (handle, value) = &records[0];
    let mut json: serde_json::Value = serde_json::from_slice(value).unwrap();
    assert_eq!(json["format"], "fieldkey-pkcs11-deletion/v1");
    json["deletion_date_unix_ms"] = serde_json::json!(1);
    let s = hsm.session();
    s.destroy_object(*handle).unwrap();
    s.create_object(&[
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Application(b"fieldkey".to_vec()),
        Attribute::Label(record_label.into_bytes()),
        Attribute::Value(serde_json::to_vec(&json).unwrap()),
    ])
    .unwrap();
}

/// A key whose waiting period is over is destroyed by the sweep of the next open (no
/// use of it needed), or lazily by the next look at it.
#[tokio::test]
async fn a_key_past_its_deletion_date_is_destroyed() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    let swept = kms.create_epoch_key(1, "s").await.unwrap();
    let lazy = kms.create_epoch_key(2, "s").await.unwrap();
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(&lazy, &c).await.unwrap();

    kms.schedule_key_deletion(&swept, 7).await.unwrap();
    backdate_deletion(&hsm, &swept);
    assert_eq!(hsm.find_keys(&swept).len(), 1);
    let reopened = hsm.kms().await; // open sweeps
    assert!(hsm.find_keys(&swept).is_empty(), "the sweep left the key");
    assert!(
        hsm.find_data(&format!("fieldkey-deletion:{swept}"))
            .is_empty()
    );
    assert_eq!(
        reopened.key_status(&swept).await.unwrap(),
        KeyStatus::Deleted
    );

    // Without a sweep: the next use finds the date passed and destroys the key.
    kms.schedule_key_deletion(&lazy, 7).await.unwrap();
    backdate_deletion(&hsm, &lazy);
    assert_eq!(hsm.find_keys(&lazy).len(), 1);
    assert!(matches!(
        kms.unwrap(&lazy, &dk.wrapped, &c).await,
        Err(KmsError::KeyNotFound { .. })
    ));
    assert!(hsm.find_keys(&lazy).is_empty(), "a use left the key");
    assert_eq!(kms.key_status(&lazy).await.unwrap(), KeyStatus::Deleted);
}

/// A deletion record left behind (its key destroyed by hand, a new key made with the
/// same label) must not make the new key pending, nor get it destroyed.
#[tokio::test]
async fn a_left_over_record_cannot_condemn_a_later_key_with_the_same_label() {
    let hsm = SoftHsm::init();
    let label = "tenant-byok";
    hsm.create_key(label, KeySpec::default());
    let kms = hsm.kms().await;
    kms.schedule_key_deletion(label, 7).await.unwrap();
    // An operator destroys the key by hand (object handles last only while the
    // application has a session on the token: found again here).
    let s = hsm.session();
    s.destroy_object(hsm.find_keys(label)[0]).unwrap();
    hsm.create_key(label, KeySpec::default());
    assert_eq!(kms.key_status(label).await.unwrap(), KeyStatus::Enabled);
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(label, &c).await.unwrap();
    // past the old record's date: still nothing happens to the new key
    backdate_deletion(&hsm, label);
    let reopened = hsm.kms().await;
    assert_eq!(hsm.find_keys(label).len(), 1);
    assert!(
        hsm.find_data(&format!("fieldkey-deletion:{label}"))
            .is_empty()
    );
    assert!(
        reopened
            .unwrap(label, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
}

/// A key the token will not let fieldkey disable is still refused by fieldkey while
/// pending (its record), and destroyed at the end.
#[tokio::test]
async fn a_key_the_token_cannot_disable_is_still_refused_while_pending() {
    let hsm = SoftHsm::init();
    let label = "fixed";
    hsm.create_key(
        label,
        KeySpec {
            modifiable: false,
            ..KeySpec::default()
        },
    );
    let kms = hsm.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(label, &c).await.unwrap();
    kms.schedule_key_deletion(label, 3).await.unwrap();
    assert!(matches!(
        kms.unwrap(label, &dk.wrapped, &c).await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    kms.cancel_key_deletion(label).await.unwrap();
    kms.unwrap(label, &dk.wrapped, &c).await.unwrap();
    kms.schedule_key_deletion(label, 0).await.unwrap();
    assert!(hsm.find_keys(label).is_empty());
}

/// The default key scheduled for deletion: readiness says so.
#[tokio::test]
async fn check_reports_a_pending_default_key() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    kms.check().await.unwrap();
    kms.schedule_key_deletion(DEFAULT_KEY_LABEL, 7)
        .await
        .unwrap();
    assert!(matches!(
        kms.check().await,
        Err(KmsError::KeyInvalidState { .. })
    ));
    kms.cancel_key_deletion(DEFAULT_KEY_LABEL).await.unwrap();
    kms.check().await.unwrap();
    // Disabled by someone else (not a deletion): KeyDisabled, and cancel does not
    // enable it.
    let s = hsm.session();
    let key = hsm.find_keys(DEFAULT_KEY_LABEL)[0];
    s.update_attributes(key, &[Attribute::Encrypt(false), Attribute::Decrypt(false)])
        .unwrap();
    assert!(matches!(
        kms.check().await,
        Err(KmsError::KeyDisabled { .. })
    ));
    assert_eq!(
        kms.key_status(DEFAULT_KEY_LABEL).await.unwrap(),
        KeyStatus::Disabled
    );
    assert!(kms.cancel_key_deletion(DEFAULT_KEY_LABEL).await.is_err());
    let attrs = s.get_attributes(key, &[AttributeType::Encrypt]).unwrap();
    assert!(matches!(attrs.as_slice(), [Attribute::Encrypt(false)]));
}

/// The session pool (2 sessions) under 64 concurrent wraps and unwraps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_calls_share_two_sessions() {
    let hsm = SoftHsm::init();
    let mut settings = hsm.settings();
    settings.sessions = 2;
    let kms = Arc::new(Pkcs11Kms::open(&settings).await.unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u32 {
        let kms = Arc::clone(&kms);
        tasks.spawn(async move {
            let c = ctx(&format!("t{i}"), i);
            let dk = kms.generate_data_key(DEFAULT_KEY_LABEL, &c).await?;
            let back = kms.unwrap(DEFAULT_KEY_LABEL, &dk.wrapped, &c).await?;
            Ok::<bool, KmsError>(back.ct_eq(&dk.secret))
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        assert!(r.unwrap().unwrap());
        ok += 1;
    }
    assert_eq!(ok, 64);
}

/// The application's login is lost (every session of it logged out): the provider
/// logs in again instead of taking its keys for deleted.
#[tokio::test]
async fn a_lost_login_is_restored_not_taken_for_a_deleted_key() {
    let hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY_LABEL, &c).await.unwrap();
    hsm.session().logout().unwrap(); // logs out every session of the process
    assert_eq!(
        kms.key_status(DEFAULT_KEY_LABEL).await.unwrap(),
        KeyStatus::Enabled
    );
    hsm.session().logout().unwrap();
    assert!(
        kms.unwrap(DEFAULT_KEY_LABEL, &dk.wrapped, &c)
            .await
            .unwrap()
            .ct_eq(&dk.secret)
    );
}

/// The token goes away under the running library: Unavailable (retryable), never
/// "key not found" or "deleted", and no panic.
#[tokio::test]
async fn a_token_that_goes_away_is_unavailable_not_deleted() {
    let mut hsm = SoftHsm::init();
    let kms = hsm.kms().await;
    let c = ctx("t1", 1);
    let dk = kms.generate_data_key(DEFAULT_KEY_LABEL, &c).await.unwrap();
    hsm.remove_token();
    for _ in 0..2 {
        let r = kms.unwrap(DEFAULT_KEY_LABEL, &dk.wrapped, &c).await;
        assert!(matches!(r, Err(KmsError::Unavailable(_))), "{r:?}");
        let r = kms.key_status(DEFAULT_KEY_LABEL).await;
        assert!(matches!(r, Err(KmsError::Unavailable(_))), "{r:?}");
        let r = kms.check().await;
        assert!(matches!(r, Err(KmsError::Unavailable(_))), "{r:?}");
    }
}
