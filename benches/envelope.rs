//! Envelope and keyring cost against raw AES-256-GCM, in one run.
//!
//! `cargo bench --bench envelope` (results and the table in BENCHMARKS.md).
//!
//! - `raw_aes256gcm`: aes-gcm's Aes256Gcm with a prepared key and a counter nonce: the floor.
//! - `envelope_seal` / `envelope_open`: fieldkey's v1 envelope with a cached field
//!   cipher: random 192-bit nonce, header, associated data, XAES-256-GCM key derivation,
//!   AES-256-GCM.
//! - `keyring_encrypt` / `keyring_decrypt`: the whole keyring call with warm caches
//!   (cache lookups and state checks on top of the envelope).
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::sync::Arc;

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fieldkey::crypto::{Aad, Envelope, FieldCipher, KEY_LEN, SecretKey, open, seal};
use fieldkey::kms::local::{KdfParams, LocalKms};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::{Keyring, KeyringConfig};

const SIZES: [usize; 3] = [32, 1024, 64 * 1024];

fn bench(c: &mut Criterion) {
    let aad = Aad {
        tenant: "tenant-0001",
        subject: None,
        field: "email",
        context: b"row:123456",
    };
    let field = FieldCipher::for_tenant(
        &SecretKey::from_bytes(&mut [7u8; KEY_LEN]),
        aad.tenant,
        aad.field,
    );
    let raw = Aes256Gcm::new(&[9u8; 32].into());

    let rt = tokio::runtime::Builder::new_current_thread()
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
            LocalKms::create(
                &dir.path().join("kms.json"),
                &secrecy::SecretString::from("benchmark passphrase".to_owned()),
                KdfParams {
                    m_cost_kib: 256,
                    t_cost: 1,
                    p_cost: 1,
                },
            )
            .unwrap(),
        );
        let k = Keyring::new(store, kms, KeyringConfig::default());
        k.create_tenant(aad.tenant, None).await.unwrap();
        k
    });

    for size in SIZES {
        let mut g = c.benchmark_group(format!("{size}B"));
        g.throughput(Throughput::Bytes(size as u64));
        let pt = vec![0x5au8; size];

        let mut ctr: u64 = 0;
        g.bench_function(BenchmarkId::new("raw_aes256gcm", "encrypt"), |b| {
            b.iter(|| {
                ctr += 1;
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&ctr.to_le_bytes());
                let mut buf = Vec::with_capacity(size + 16);
                buf.extend_from_slice(&pt);
                let tag = raw
                    .encrypt_in_place_detached((&nonce).into(), b"", &mut buf)
                    .unwrap();
                buf.extend_from_slice(&tag);
                black_box(buf)
            })
        });
        let mut raw_ct = pt.clone();
        let raw_tag = raw
            .encrypt_in_place_detached((&[1u8; 12]).into(), b"", &mut raw_ct)
            .unwrap();
        g.bench_function(BenchmarkId::new("raw_aes256gcm", "decrypt"), |b| {
            b.iter(|| {
                let mut buf = raw_ct.clone();
                raw.decrypt_in_place_detached((&[1u8; 12]).into(), b"", &mut buf, &raw_tag)
                    .unwrap();
                black_box(buf)
            })
        });

        g.bench_function(BenchmarkId::new("envelope", "seal"), |b| {
            b.iter(|| black_box(seal(&field, 1, &aad, black_box(&pt)).unwrap()))
        });
        let env = seal(&field, 1, &aad, &pt).unwrap();
        g.bench_function(BenchmarkId::new("envelope", "open"), |b| {
            b.iter(|| {
                black_box(open(&field, &Envelope::parse(black_box(&env)).unwrap(), &aad).unwrap())
            })
        });

        g.bench_function(BenchmarkId::new("keyring", "encrypt"), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(keyring.encrypt(&aad, black_box(&pt)).await.unwrap()) })
        });
        let kenv = rt.block_on(keyring.encrypt(&aad, &pt)).unwrap();
        g.bench_function(BenchmarkId::new("keyring", "decrypt"), |b| {
            b.to_async(&rt).iter(|| async {
                black_box(keyring.decrypt(&aad, black_box(&kenv)).await.unwrap())
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
