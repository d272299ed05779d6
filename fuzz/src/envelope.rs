//! The envelope test vectors (`tests/vectors/envelope_v1.json`, made by the crate's own
//! `crypto::vectors` tests): each valid one with the cipher and associated data that
//! open it, and the seeds of the envelope target.

use fieldkey::crypto::{Aad, FieldCipher, SecretKey, to_text};
use serde_json::Value;

const VECTORS: &str = include_str!("../../tests/vectors/envelope_v1.json");

/// A valid vector: the envelope and everything that opens it.
pub struct Vector {
    /// Vector name.
    pub name: String,
    /// The binary envelope.
    pub envelope: Vec<u8>,
    /// Its plaintext.
    pub plaintext: Vec<u8>,
    /// The cipher of its key, tenant, subject and field.
    pub cipher: FieldCipher,
    tenant: String,
    subject: Option<String>,
    field: String,
    context: Vec<u8>,
}

impl Vector {
    /// Its associated data.
    pub fn aad(&self) -> Aad<'_> {
        Aad {
            tenant: &self.tenant,
            subject: self.subject.as_deref(),
            field: &self.field,
            context: &self.context,
        }
    }
}

fn bytes(v: &Value, key: &str) -> Vec<u8> {
    hex::decode(v[key].as_str().expect(key)).expect(key)
}

fn key(v: &Value, key: &str) -> SecretKey {
    let mut k: [u8; 32] = bytes(v, key).try_into().expect(key);
    SecretKey::from_bytes(&mut k)
}

fn all() -> Value {
    serde_json::from_str(VECTORS).expect("envelope vectors")
}

/// Every valid vector.
pub fn valid() -> Vec<Vector> {
    let all = all();
    all["valid"]
        .as_array()
        .expect("valid")
        .iter()
        .map(|v| {
            let tenant = v["tenant"].as_str().expect("tenant").to_owned();
            let field = v["field"].as_str().expect("field").to_owned();
            let subject = v["subject"].as_str().map(str::to_owned);
            let tk = key(v, "tenant_key");
            let cipher = match &subject {
                None => FieldCipher::for_tenant(&tk, &tenant, &field),
                Some(s) => {
                    FieldCipher::for_subject(&tk, &key(v, "subject_key"), &tenant, s, &field)
                }
            };
            Vector {
                name: v["name"].as_str().expect("name").to_owned(),
                envelope: bytes(v, "envelope"),
                plaintext: bytes(v, "plaintext"),
                cipher,
                tenant,
                subject,
                field,
                context: bytes(v, "context"),
            }
        })
        .collect()
}

/// Seeds: every vector (valid and failing) in binary and text form, and edge cases of
/// length and of the text form.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let all = all();
    let mut out = Vec::new();
    for kind in ["valid", "invalid"] {
        for v in all[kind].as_array().expect(kind) {
            let name = v["name"].as_str().expect("name");
            let env = bytes(v, "envelope");
            out.push((format!("{name}.text"), to_text(&env).into_bytes()));
            out.push((format!("{name}.bin"), env));
        }
    }
    let short = bytes(&all["valid"][0], "envelope");
    for (name, b) in [
        ("empty", Vec::new()),
        ("magic-only", b"fk".to_vec()),
        ("header-only", short.get(..33).expect("header").to_vec()),
        (
            "one-short-of-overhead",
            short.get(..48).expect("prefix").to_vec(),
        ),
        ("text-prefix-only", b"fk1:".to_vec()),
        ("text-padded", format!("{}==", to_text(&short)).into_bytes()),
        ("text-standard-alphabet", b"fk1:+/+/".to_vec()),
        ("text-trailing-bits", b"fk1:QR".to_vec()),
    ] {
        out.push((name.to_owned(), b));
    }
    out
}
