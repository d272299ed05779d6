//! The audit chain: what a record holds, how it is hashed, and how a chain is checked.
//!
//! Owns: [`AuditEvent`] (what happened, by whom, to what), [`AuditRecord`] (an event at
//! its position in the chain), the record hash, and [`verify_chain`]. Each record's hash
//! covers its sequence number, time, every field and the previous record's hash, so an
//! edited, deleted or reordered record breaks the chain from that point on. The store
//! appends records atomically (`AuditStore::append_audit`); nothing here touches storage.
//!
//! Must not: hold key material or plaintext. Subject ids appear only as resource ids of
//! erasure and restriction records (that is what those records are about).

pub mod aggregate;
mod export_line;
mod log;
pub mod verify;

pub use crate::model::audit::{AuditEvent, AuditRecord, GENESIS, record_hash};
pub use log::{AuditConfig, AuditLog, CHECKPOINT_PURPOSE};

/// The outcome of a data record that counts, among the `ok` calls of its window, those
/// that carried no row context (an Encrypt whose value any row of the tenant accepts).
pub const OUTCOME_UNBOUND: &str = "unbound";

/// The outcome of a data record that counts, among the `ok` `Crypto::Rewrap` of its
/// window, those made by read repair (a Decrypt that also returned the value
/// re-encrypted under the active version: docs/ROTATION.md "Read repair").
pub const OUTCOME_READ_REPAIR: &str = "read_repair";

use std::net::IpAddr;

/// Where and why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A record's sequence number is not the one after its predecessor (deleted,
    /// reordered or inserted records).
    #[error(
        "audit record {found}: expected sequence number {expected} (a record was deleted, reordered or inserted)"
    )]
    Gap {
        /// The sequence number that should come next.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// A record does not point at its predecessor's hash.
    #[error("audit record {seq}: does not chain to the record before it")]
    BrokenLink {
        /// The record.
        seq: u64,
    },
    /// A record's content does not match its hash (edited).
    #[error("audit record {seq}: content does not match its hash (edited)")]
    Altered {
        /// The record.
        seq: u64,
    },
}

/// Checks that `records` form a chain starting after `(prev_seq, prev_hash)` (use
/// `(0, GENESIS)` for a whole log). Returns the last record's `(seq, hash)`.
///
/// # Errors
/// The first record that fails, and how.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    prev_seq: u64,
    prev_hash: [u8; 32],
) -> Result<(u64, [u8; 32]), ChainError> {
    let (mut seq, mut hash) = (prev_seq, prev_hash);
    for r in records {
        let expected = seq.saturating_add(1);
        if r.seq != expected {
            return Err(ChainError::Gap {
                expected,
                found: r.seq,
            });
        }
        if r.prev_hash != hash {
            return Err(ChainError::BrokenLink { seq: r.seq });
        }
        if record_hash(r.seq, r.ts, &r.event, &r.prev_hash) != r.hash {
            return Err(ChainError::Altered { seq: r.seq });
        }
        seq = r.seq;
        hash = r.hash;
    }
    Ok((seq, hash))
}

/// A caller address masked for the log: IPv4 to its /24, IPv6 to its /48.
pub fn mask_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => mask_ip(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                let masked = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
                format!("{masked}/48")
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        let mut prev = GENESIS;
        for seq in 1..=n {
            let event = AuditEvent {
                action: "subject.suspended".into(),
                resource_type: "subject".into(),
                resource_id: format!("user-{seq}"),
                actor: "spiffe://example/erasure".into(),
                tenant_id: Some("acme".into()),
                caller_ip: Some(mask_ip("10.1.2.3".parse().unwrap())),
                details: serde_json::json!({"n": seq}),
            };
            let ts = 1_000 + i64::try_from(seq).unwrap();
            let hash = record_hash(seq, ts, &event, &prev);
            out.push(AuditRecord {
                seq,
                ts,
                event,
                prev_hash: prev,
                hash,
            });
            prev = hash;
        }
        out
    }

    #[test]
    fn an_intact_chain_verifies_and_each_tampering_is_named() {
        let good = chain(5);
        assert_eq!(verify_chain(&good, 0, GENESIS).unwrap().0, 5);

        let mut edited = good.clone();
        edited[2].event.actor = "someone-else".into();
        assert_eq!(
            verify_chain(&edited, 0, GENESIS),
            Err(ChainError::Altered { seq: 3 })
        );

        let mut deleted = good.clone();
        deleted.remove(1);
        assert_eq!(
            verify_chain(&deleted, 0, GENESIS),
            Err(ChainError::Gap {
                expected: 2,
                found: 3
            })
        );

        let mut reordered = good.clone();
        reordered.swap(1, 2);
        assert!(matches!(
            verify_chain(&reordered, 0, GENESIS),
            Err(ChainError::Gap { expected: 2, .. })
        ));

        // Rewriting a record and its own hash still breaks the next link.
        let mut rehashed = good.clone();
        rehashed[1].event.details = serde_json::json!({"n": 99});
        rehashed[1].hash = record_hash(
            2,
            rehashed[1].ts,
            &rehashed[1].event,
            &rehashed[1].prev_hash,
        );
        assert_eq!(
            verify_chain(&rehashed, 0, GENESIS),
            Err(ChainError::BrokenLink { seq: 3 })
        );

        // A suffix verifies from its predecessor.
        assert!(verify_chain(&good[3..], 3, good[2].hash).is_ok());
    }

    #[test]
    fn addresses_are_masked() {
        assert_eq!(mask_ip("192.168.7.42".parse().unwrap()), "192.168.7.0/24");
        assert_eq!(
            mask_ip("2001:db8:1:2::5".parse().unwrap()),
            "2001:db8:1::/48"
        );
        assert_eq!(mask_ip("::ffff:10.0.0.9".parse().unwrap()), "10.0.0.0/24");
    }
}
