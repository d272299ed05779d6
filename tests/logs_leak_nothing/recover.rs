//! Every key a test can recover from a sidecar's data directory the way an owner of
//! the local KMS passphrase (or of the AWS KMS permissions) could: the local KMS's
//! key-encryption key, root key and epoch keys from its files, then every tenant key
//! version, subject-wrapping key, subject key and signing-key seed the key store holds,
//! unwrapped through the crate's KMS, and the field keys derived from them
//! (`docs/FORMAT.md` §4).

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use fieldkey::crypto::{SecretKey, Xaes256Gcm, unwrap_subject_key, unwrap_subject_key_epoch};
use fieldkey::kms::aws::AwsKms;
use fieldkey::kms::local::LocalKms;
use fieldkey::kms::{EncryptionContext, Kms, WrappedKey};
use secrecy::SecretString;
use sqlx::Row as _;

use crate::common;
use crate::{PASSPHRASE, TENANT};

/// A key `name` with `bytes`.
pub(crate) type Secret = (String, Vec<u8>);

pub(crate) fn xaes_open(key: &[u8; 32], nonce: &[u8], ad: &[u8], body: &[u8]) -> Vec<u8> {
    let (ct, tag) = body.split_at(body.len() - 16);
    let mut buf = ct.to_vec();
    Xaes256Gcm::new(key)
        .decrypt_in_place_detached(
            nonce.try_into().unwrap(),
            ad,
            &mut buf,
            tag.try_into().unwrap(),
        )
        .unwrap();
    buf
}

pub(crate) fn lp16(b: &[u8]) -> Vec<u8> {
    let mut v = u16::try_from(b.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

/// FK of FORMAT.md §4.
pub(crate) fn field_key(tk: &[u8], sk: Option<(&str, &[u8])>, field: &str) -> Vec<u8> {
    let (ikm, info) = match sk {
        None => (
            tk.to_vec(),
            [vec![0], lp16(TENANT.as_bytes()), lp16(field.as_bytes())].concat(),
        ),
        Some((subject, sk)) => (
            [tk, sk].concat(),
            [
                vec![1],
                lp16(TENANT.as_bytes()),
                lp16(subject.as_bytes()),
                lp16(field.as_bytes()),
            ]
            .concat(),
        ),
    };
    let mut okm = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(b"fieldkey/v1 field-key"), &ikm)
        .expand(&info, &mut okm)
        .unwrap();
    okm.to_vec()
}

/// The KMS a sidecar of the test uses.
#[derive(Clone)]
pub(crate) enum Backend {
    /// The local KMS under the data directory (its passphrase [`PASSPHRASE`]).
    Local,
    /// AWS KMS (moto_server at `url`), default key `key`.
    Aws {
        /// moto_server.
        url: String,
        /// The default KMS key.
        key: String,
    },
}

/// The root key and epoch keys of the local KMS, recovered from its files with the
/// passphrase, added to `out`.
pub(crate) fn recover_local_kms_files(data: &Path, keys_dir: &Path, out: &mut Vec<Secret>) {
    // The root key, from local-kms.json (kms/local.rs: Argon2id KEK, XAES-256-GCM).
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("local-kms.json")).unwrap()).unwrap();
    let a = &file["argon2id"];
    let salt = STANDARD.decode(a["salt"].as_str().unwrap()).unwrap();
    let params = argon2::Params::new(
        u32::try_from(a["m_cost_kib"].as_u64().unwrap()).unwrap(),
        u32::try_from(a["t_cost"].as_u64().unwrap()).unwrap(),
        u32::try_from(a["p_cost"].as_u64().unwrap()).unwrap(),
        Some(32),
    )
    .unwrap();
    let mut kek = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(PASSPHRASE.as_bytes(), &salt, &mut kek)
        .unwrap();
    out.push(("local KMS key-encryption key".into(), kek.to_vec()));
    let root_id = file["key_id"].as_str().unwrap();
    let root_ad = [b"fieldkey-local-kms/v1\0".as_slice(), root_id.as_bytes()].concat();
    let root = xaes_open(
        &kek,
        &STANDARD.decode(file["nonce"].as_str().unwrap()).unwrap(),
        &root_ad,
        &STANDARD
            .decode(file["wrapped_root_key"].as_str().unwrap())
            .unwrap(),
    );
    let root: [u8; 32] = root.try_into().unwrap();
    out.push(("local KMS root key".into(), root.to_vec()));
    // Epoch keys (kms/local/keys.rs: wrapped under the root key).
    if let Ok(entries) = std::fs::read_dir(keys_dir) {
        for e in entries {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
            if let (Some(n), Some(w)) = (v["nonce"].as_str(), v["wrapped_key"].as_str()) {
                let id = v["key_id"].as_str().unwrap();
                let ad = [
                    b"fieldkey/v1 local-kms-key".as_slice(),
                    &lp16(id.as_bytes()),
                ]
                .concat();
                let k = xaes_open(
                    &root,
                    &STANDARD.decode(n).unwrap(),
                    &ad,
                    &STANDARD.decode(w).unwrap(),
                );
                out.push((format!("epoch key {id}"), k));
            }
        }
    }
}

/// Every key recoverable from the files in `data` and `keys_dir` and the key store at
/// `db_url` (SQLite or PostgreSQL), with the passphrase or the AWS KMS, added to `out`.
pub(crate) async fn recover_keys(
    data: &Path,
    keys_dir: &Path,
    backend: &Backend,
    db_url: &str,
    out: &mut Vec<Secret>,
) {
    let kms: Arc<dyn Kms> = match backend {
        Backend::Local => {
            recover_local_kms_files(data, keys_dir, out);
            Arc::new(
                LocalKms::open(
                    &data.join("local-kms.json"),
                    &SecretString::from(PASSPHRASE.to_owned()),
                )
                .unwrap()
                .with_keys_dir(keys_dir)
                .unwrap(),
            )
        }
        Backend::Aws { url, key } => {
            Arc::new(AwsKms::new(common::aws_config(url, key)).await.unwrap())
        }
    };
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(db_url).await.unwrap();
    let unwrap = |key_id: String, wrapped: Vec<u8>, ctx: EncryptionContext| {
        let kms = kms.clone();
        async move {
            kms.unwrap(&key_id, &WrappedKey::new(wrapped), &ctx)
                .await
                .unwrap()
        }
    };
    let mut tks = std::collections::BTreeMap::new();
    for r in sqlx::query(
        "SELECT tenant_id, CAST(version AS BIGINT), kms_key_id, wrapped FROM fk_tenant_keys WHERE wrapped IS NOT NULL",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    {
        let (t, v): (String, i64) = (r.get(0), r.get(1));
        let v = u32::try_from(v).unwrap();
        let k = unwrap(r.get(2), r.get(3), EncryptionContext::tenant_key(&t, v)).await;
        out.push((format!("tenant key {t} v{v}"), k.expose().to_vec()));
        for field in ["email", "phone", "notes"] {
            out.push((
                format!("field key {t} v{v} {field}"),
                field_key(k.expose(), None, field),
            ));
        }
        tks.insert(v, k);
    }
    let mut swks = std::collections::BTreeMap::new();
    for r in sqlx::query(
        "SELECT swk_id, tenant_id, CAST(epoch AS BIGINT), kms_key_id, wrapped FROM fk_subject_wrapping_keys",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    {
        let (id, t, e): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        let ctx = EncryptionContext::default()
            .with("fieldkey:purpose", "subject-wrapping-key")
            .with("fieldkey:tenant", &t)
            .with("fieldkey:epoch", &e.to_string());
        let k = unwrap(r.get(3), r.get(4), ctx).await;
        out.push((format!("subject-wrapping key {id}"), k.expose().to_vec()));
        swks.insert(id, (u64::try_from(e).unwrap(), k));
    }
    for r in sqlx::query(
        "SELECT subject_id, CAST(wrap_version AS BIGINT), wrapped, swk_id FROM fk_subjects WHERE wrapped IS NOT NULL",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    {
        let (s, w, blob, swk): (String, i64, Vec<u8>, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let sk: SecretKey = match swk {
            Some(id) => {
                let (e, k) = &swks[&id];
                unwrap_subject_key_epoch(k, TENANT, &s, *e, &blob).unwrap()
            }
            None => {
                let w = u32::try_from(w).unwrap();
                unwrap_subject_key(&tks[&w], TENANT, &s, w, &blob).unwrap()
            }
        };
        out.push((format!("subject key of {s}"), sk.expose().to_vec()));
        for (v, tk) in &tks {
            for field in ["email", "phone"] {
                out.push((
                    format!("field key v{v} {field} of {s}"),
                    field_key(tk.expose(), Some((&s, sk.expose())), field),
                ));
            }
        }
    }
    for r in sqlx::query("SELECT key_id, purpose, kms_key_id, wrapped FROM fk_signing_keys")
        .fetch_all(&db)
        .await
        .unwrap()
    {
        let (id, purpose): (String, String) = (r.get(0), r.get(1));
        let ctx = EncryptionContext::default()
            .with("fieldkey:purpose", "signing-key")
            .with("fieldkey:usage", &purpose);
        let k = unwrap(r.get(2), r.get(3), ctx).await;
        out.push((
            format!("signing seed {id} ({purpose})"),
            k.expose().to_vec(),
        ));
    }
    db.close().await;
}
