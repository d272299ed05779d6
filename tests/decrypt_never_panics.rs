//! No panic on any input: random bytes and random mutations of valid envelopes (binary
//! and text form) fed to the keyring's decrypt always give a clean error (or, for an
//! unmodified envelope, the plaintext).
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::sync::{Arc, OnceLock};

use fieldkey::crypto::{Aad, to_text};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::{Error, Keyring, KeyringConfig};
use proptest::prelude::*;

struct World {
    rt: tokio::runtime::Runtime,
    keyring: Keyring,
    tenant_env: Vec<u8>,
    subject_env: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (keyring, tenant_env, subject_env) = rt.block_on(async {
            let store: Arc<dyn KeyStore> = Arc::new(
                SqlStore::open_sqlite(&dir.path().join("k.db"))
                    .await
                    .unwrap(),
            );
            let k = Keyring::new(
                store,
                common::local_kms(&dir).unwrap(),
                KeyringConfig::default(),
            );
            k.create_tenant("acme", None).await.unwrap();
            k.rotate_tenant("acme").await.unwrap();
            let t = k.encrypt(&tenant_aad(), b"tenant secret").await.unwrap();
            let s = k.encrypt(&subject_aad(), b"subject secret").await.unwrap();
            (k, t, s)
        });
        World {
            rt,
            keyring,
            tenant_env,
            subject_env,
            _dir: dir,
        }
    })
}

fn tenant_aad() -> Aad<'static> {
    Aad {
        tenant: "acme",
        subject: None,
        field: "email",
        context: b"row",
    }
}

fn subject_aad() -> Aad<'static> {
    Aad {
        tenant: "acme",
        subject: Some("alice"),
        field: "email",
        context: b"row",
    }
}

/// Decrypts and checks the outcome is a clean result: Ok only for the original bytes.
fn check(input: &[u8], aad: &Aad<'_>, original: &[u8]) {
    let w = world();
    match w.rt.block_on(w.keyring.decrypt(aad, input)) {
        Ok(pt) => {
            let text = to_text(original);
            assert!(
                input == original || input == text.as_bytes(),
                "mutated input decrypted to {pt:?}"
            );
        }
        Err(
            Error::MalformedEnvelope(_)
            | Error::AuthenticationFailed
            | Error::ScopeMismatch { .. }
            | Error::UnknownKeyVersion { .. },
        ) => {}
        Err(other) => panic!("unexpected error class for garbage input: {other:?}"),
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    Splice(usize, Vec<u8>),
}

fn apply(mut v: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Flip(i, x) => {
            let n = v.len();
            if n > 0 {
                v[i % n] ^= x.max(&1);
            }
        }
        Mutation::Truncate(i) => v.truncate(i % (v.len() + 1)),
        Mutation::Extend(x) => v.extend_from_slice(x),
        Mutation::Splice(i, x) => {
            let at = i % (v.len() + 1);
            v.splice(at..at, x.iter().copied());
        }
    }
    v
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Extend),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, x)| Mutation::Splice(i, x)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_give_clean_errors(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        check(&bytes, &tenant_aad(), &world().tenant_env);
    }

    #[test]
    fn random_bytes_behind_valid_magic_give_clean_errors(tail in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut v = b"fk\x01\x01".to_vec();
        v.extend_from_slice(&tail);
        check(&v, &tenant_aad(), &world().tenant_env);
        let mut t = b"fk1:".to_vec();
        t.extend_from_slice(&tail);
        check(&t, &tenant_aad(), &world().tenant_env);
    }

    #[test]
    fn mutated_binary_envelopes_give_clean_errors(ms in proptest::collection::vec(mutation(), 1..4)) {
        for (orig, aad) in [(&world().tenant_env, tenant_aad()), (&world().subject_env, subject_aad())] {
            let v = ms.iter().fold(orig.clone(), apply);
            check(&v, &aad, orig);
        }
    }

    #[test]
    fn mutated_text_envelopes_give_clean_errors(ms in proptest::collection::vec(mutation(), 1..4)) {
        for (orig, aad) in [(&world().tenant_env, tenant_aad()), (&world().subject_env, subject_aad())] {
            let v = ms.iter().fold(to_text(orig).into_bytes(), apply);
            check(&v, &aad, orig);
        }
    }
}

#[test]
fn unmodified_envelopes_decrypt() {
    let w = world();
    assert_eq!(
        &*w.rt
            .block_on(w.keyring.decrypt(&tenant_aad(), &w.tenant_env))
            .unwrap(),
        b"tenant secret"
    );
    assert_eq!(
        &*w.rt
            .block_on(w.keyring.decrypt(&subject_aad(), &w.subject_env))
            .unwrap(),
        b"subject secret"
    );
}
