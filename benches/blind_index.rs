//! Blind-index and pseudonym cost against raw HMAC-SHA256, in one run.
//!
//! `cargo bench --bench blind_index` (results in BENCHMARKS.md).
//!
//! - `raw_hmac_sha256`: the hmac crate's HMAC-SHA256 with a key set once (the keyed
//!   state cloned per value, as fieldkey does): the floor.
//! - `index_hmac` / `index_hmac_normalized`: `IndexKey::compute` for a 32-byte value,
//!   without and with NFC + case folding + trimming (format byte, version, truncation).
//! - `keyring_blind_index`: the whole keyring call with warm caches.
//! - `index_argon2id_default`: one value at the documented default Argon2id cost
//!   (19 MiB, 2 passes, 1 lane).
//! - `keyring_pseudonymize`: a pseudonym with warm caches.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fieldkey::crypto::{
    Argon2Cost, IndexAlgorithm, IndexKey, IndexProfile, KEY_LEN, Normalization, SecretKey,
    UnicodeForm,
};
use fieldkey::keyring::IndexProfiles;
use fieldkey::kms::local::{KdfParams, LocalKms};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::{Keyring, KeyringConfig};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

fn bench(c: &mut Criterion) {
    let value = b"user-000123@example-school.org.x"; // 32 bytes
    assert_eq!(value.len(), 32);
    let tk = SecretKey::from_bytes(&mut [7u8; KEY_LEN]);
    let norm = Normalization {
        form: Some(UnicodeForm::Nfc),
        casefold: true,
        trim: true,
    };
    let raw = IndexKey::derive(
        &tk,
        "tenant-0001",
        "email",
        1,
        &IndexProfile::hmac(64, Normalization::default()),
    )
    .unwrap();
    let normalized = IndexKey::derive(
        &tk,
        "tenant-0001",
        "email",
        1,
        &IndexProfile::hmac(64, norm),
    )
    .unwrap();
    let mut g = c.benchmark_group("blind_index_32B");
    g.throughput(Throughput::Elements(1));
    let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&[9u8; 32]).unwrap();
    g.bench_function("raw_hmac_sha256", |b| {
        b.iter(|| {
            let mut m = mac.clone();
            m.update(black_box(value));
            black_box(m.finalize().into_bytes())
        })
    });
    g.bench_function("index_hmac", |b| {
        b.iter(|| black_box(raw.compute(black_box(value)).unwrap()))
    });
    g.bench_function("index_hmac_normalized", |b| {
        b.iter(|| black_box(normalized.compute(black_box(value)).unwrap()))
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keyring = rt.block_on(async {
        let store: Arc<dyn KeyStore> = Arc::new(
            SqlStore::open_sqlite(&dir.path().join("k.db"))
                .await
                .unwrap(),
        );
        let kms = Arc::new(
            LocalKms::open_or_create(
                &dir.path().join("kms.json"),
                &secrecy::SecretString::from("bench passphrase".to_owned()),
                KdfParams {
                    m_cost_kib: 256,
                    t_cost: 1,
                    p_cost: 1,
                },
            )
            .unwrap(),
        );
        let mut fields = HashMap::new();
        fields.insert("email".to_owned(), IndexProfile::hmac(64, norm));
        let k = Keyring::new(store, kms, KeyringConfig::default())
            .with_index_profiles(IndexProfiles::new(fields, 2));
        k.create_tenant("tenant-0001", None).await.unwrap();
        k.blind_index("tenant-0001", "email", value, false)
            .await
            .unwrap();
        k.pseudonymize("tenant-0001", "user-1", "analytics")
            .await
            .unwrap();
        k
    });
    g.bench_function("keyring_blind_index", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                keyring
                    .blind_index("tenant-0001", "email", black_box(value), false)
                    .await
                    .unwrap(),
            )
        })
    });
    g.bench_function("keyring_pseudonymize", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                keyring
                    .pseudonymize("tenant-0001", "user-1", "analytics")
                    .await
                    .unwrap(),
            )
        })
    });
    g.finish();

    let mut g = c.benchmark_group("blind_index_argon2id");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    let slow = IndexKey::derive(
        &tk,
        "tenant-0001",
        "birth_date",
        1,
        &IndexProfile {
            algorithm: IndexAlgorithm::Argon2id(Argon2Cost::DEFAULT),
            bits: 64,
            normalization: Normalization::default(),
        },
    )
    .unwrap();
    g.bench_function("index_argon2id_default", |b| {
        b.iter(|| black_box(slow.compute(black_box(b"1990-01-31")).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
