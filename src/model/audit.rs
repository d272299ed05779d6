//! The audit record: what happened, by whom, to what ([`AuditEvent`]), at its place in
//! the chain ([`AuditRecord`]), and the record hash that chains them.
//!
//! Each record's hash covers its sequence number, time, every field and the previous
//! record's hash, so an edited, deleted or reordered record breaks the chain from that
//! point on. The store appends records; `crate::audit` verifies chains and writes the
//! log. Must not: hold key material or plaintext.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// Domain separation of record hashes.
const HASH_DOMAIN: &[u8] = b"fieldkey-audit-record/1";

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What was done (`erasure.requested`, `erasure.completed`, `subject.suspended`, ...).
    pub action: String,
    /// Kind of thing it was done to (`erasure`, `subject`, `tenant`).
    pub resource_type: String,
    /// Which one.
    pub resource_id: String,
    /// Who did it (the caller identity).
    pub actor: String,
    /// Tenant concerned, if any.
    pub tenant_id: Option<String>,
    /// Caller address, masked (see `crate::audit::mask_ip`).
    pub caller_ip: Option<String>,
    /// Action-specific facts, a JSON object (never key bytes or plaintext).
    pub details: serde_json::Value,
}

/// An event at its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position, from 1, without gaps.
    pub seq: u64,
    /// When it was appended, Unix ms.
    pub ts: i64,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the previous record ([`GENESIS`] for the first), hex.
    #[serde(with = "hex_32")]
    pub prev_hash: [u8; 32],
    /// This record's hash, hex.
    #[serde(with = "hex_32")]
    pub hash: [u8; 32],
}

mod hex_32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("expected 32 bytes of hex"))
    }
}

fn put(h: &mut Sha256, part: &[u8]) {
    h.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
    h.update(part);
}

fn put_opt(h: &mut Sha256, part: Option<&str>) {
    match part {
        None => h.update([0u8]),
        Some(p) => {
            h.update([1u8]);
            put(h, p.as_bytes());
        }
    }
}

/// The hash of a record: SHA-256 over a domain tag, then seq, ts, each field
/// (length-prefixed; optional fields with a presence byte; details as canonical JSON)
/// and the previous hash.
pub fn record_hash(seq: u64, ts: i64, event: &AuditEvent, prev_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(ts.to_be_bytes());
    put(&mut h, event.action.as_bytes());
    put(&mut h, event.resource_type.as_bytes());
    put(&mut h, event.resource_id.as_bytes());
    put(&mut h, event.actor.as_bytes());
    put_opt(&mut h, event.tenant_id.as_deref());
    put_opt(&mut h, event.caller_ip.as_deref());
    put(&mut h, &super::json::canonical_json(&event.details));
    h.update(prev_hash);
    h.finalize().into()
}
