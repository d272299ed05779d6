//! The compliance evidence report: what a privacy officer or an auditor asks to see
//! proven, read from the key store and the configuration in force.
//!
//! Owns: the report's model ([`Report`], serialized as the JSON of
//! `docs/COMPLIANCE.md`, format [`FORMAT`]), the verdict of every promise of a data
//! processing agreement that fieldkey supports ([`PromiseId`]), and how they are derived:
//! key ages against the rotation policy, ciphertexts left on old key versions by
//! re-encryption jobs, erasure requests against the 30-day limit with their receipts
//! verified and matched to the audit chain (met only once the key-store backups holding
//! the destroyed keys are sealed: key epochs and their signed "backups sealed"
//! statements, and the backup horizon), restricted subjects, the audit chain verified
//! to its last signed checkpoint, and the configuration facts. [`html`] renders it.
//!
//! Must not: write anything, call the KMS, or put key material or personal data beyond
//! identifiers in the report (fingerprints of wrapped keys, ids and times only).
//!
//! The room, by concern: `model` (the report's types and verdict scale), `facts` (the
//! configuration read into facts, and what the collectors gather for the rules),
//! `collectors` (reading the store into facts, and [`build`] that assembles the
//! report), `evidence` (the read-only handle the Audit service builds reports with), `verdicts` (the rules that turn facts into verdicts), [`html`] (the page).

mod collectors;
mod evidence;
mod facts;
pub mod html;
mod model;
mod verdicts;

pub use collectors::build;
pub use evidence::Evidence;
pub use model::{
    AuditFacts, AuditSection, AuthzFacts, BackupsSection, BackupsStatus, CompletionEntry,
    Configuration, ERASURE_LIMIT_DAYS, EpochEntry, ErasureEntry, ErasureStatus, FORMAT, JobEntry,
    KmsFacts, MAX_LISTED_SUBJECTS, OldVersion, Options, Period, PromiseId, PromiseResult,
    ReceiptCheck, Report, RestrictedSubject, RestrictionEntry, RotationEntry, RotationFacts,
    Summary, TenantSection, TlsFacts, TrustAnchors, UnboundField, Verdict, VersionEntry,
};
