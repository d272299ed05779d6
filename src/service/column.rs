//! The columnar batches of the `Crypto` service: `EncryptColumn`, `DecryptColumn`,
//! `RewrapColumn` and `BlindIndexColumn` (the trait methods in `crypto.rs` call these).
//!
//! A column names its tenant and field once: the call is authorized, rate-counted and
//! audited once (by outcome, with the number of values), the tenant's keys resolved
//! once and each subject's once ([`ColumnKeys`]); values are decoded as slices of the
//! request buffer (`Bytes`, no copy per value) and the results built into one buffer
//! per call, sliced per value. A bad value fails alone (`ColumnError`); a refusal of
//! the whole call (authorization, rate, the tenant) is every value's error.
//!
//! Does NOT: wipe the request's plaintexts (they are slices of the transport's receive
//! buffer, which no layer wipes, as for the item batches: THREAT_MODEL "Request
//! buffers"). Decrypted values are in one self-wiping buffer, wiped once tonic has
//! encoded the reply.

use std::ops::Range;

use bytes::Bytes;
use tonic::{Code, Status};

use super::crypto::CryptoService;
use super::gate::{Caller, Repairs};
use super::status::{item_error, limit_status};
use crate::crypto::{self, Plaintext};
use crate::error::Error;
use crate::keyring::{ColumnKeys, Encryptor, ReadRepair};
use crate::policy::authz::Action;
use crate::proto::pb::{
    BlindIndexColumnRequest, BlindIndexColumnResponse, CiphertextFormat, ColumnError,
    DecryptColumnRequest, DecryptColumnResponse, EncryptColumnRequest, EncryptColumnResponse,
    IndexFormat, RewrapColumnRequest, RewrapColumnResponse,
};

/// The subject of each value: one for all, or one each (an empty id: tenant-scoped).
struct Subjects<'a> {
    all: Option<&'a str>,
    each: &'a [String],
}

impl<'a> Subjects<'a> {
    fn of(&self, i: usize) -> Option<&'a str> {
        match self.each.get(i) {
            Some(s) => (!s.is_empty()).then_some(s.as_str()),
            None => self.all,
        }
    }
}

/// The context of each value: none, or one each.
struct Contexts<'a>(&'a [Bytes]);

impl Contexts<'_> {
    fn of(&self, i: usize) -> &[u8] {
        self.0.get(i).map_or(&[], |c| c.as_ref())
    }
}

fn mismatch(message: String) -> Status {
    limit_status(Code::InvalidArgument, "COLUMN_MISMATCH", message)
}

/// The per-value lists of a column, checked against its `n` values.
fn shape<'a>(
    n: usize,
    subject_id: &'a str,
    subject_ids: &'a [String],
    contexts: &'a [Bytes],
) -> Result<(Subjects<'a>, Contexts<'a>), Status> {
    if !subject_ids.is_empty() && subject_ids.len() != n {
        return Err(mismatch(format!(
            "subject_ids has {} entries for {n} values (give none or one per value)",
            subject_ids.len()
        )));
    }
    if !subject_ids.is_empty() && !subject_id.is_empty() {
        return Err(mismatch(
            "give subject_id (one subject for all values) or subject_ids (one per value), not both"
                .into(),
        ));
    }
    if !contexts.is_empty() && contexts.len() != n {
        return Err(mismatch(format!(
            "contexts has {} entries for {n} values (give none or one per value)",
            contexts.len()
        )));
    }
    Ok((
        Subjects {
            all: (!subject_id.is_empty()).then_some(subject_id),
            each: subject_ids,
        },
        Contexts(contexts),
    ))
}

/// One buffer's pieces, one per value (an empty piece for a value that failed).
fn pieces(buf: Bytes, ranges: &[Range<usize>]) -> Vec<Bytes> {
    ranges.iter().map(|r| buf.slice(r.clone())).collect()
}

/// The failures of a column, by position.
#[derive(Default)]
struct Failures(Vec<(usize, Error)>);

impl Failures {
    fn push(&mut self, i: usize, e: Error) {
        self.0.push((i, e));
    }

    fn errors(&self) -> Vec<&Error> {
        self.0.iter().map(|(_, e)| e).collect()
    }

    fn into_wire(self) -> Vec<ColumnError> {
        self.0
            .into_iter()
            .map(|(i, e)| ColumnError {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                error: Some(item_error(&e)),
            })
            .collect()
    }

    /// Every one of `n` values failed with `e`.
    fn all(n: usize, e: &Error) -> Self {
        Self((0..n).map(|i| (i, e.clone())).collect())
    }
}

impl CryptoService {
    /// Authorizes a column's call once; its keys are resolved as values need them.
    fn open_column<'a>(
        &self,
        c: &Caller,
        action: Action,
        tenant: &'a str,
        field: &'a str,
    ) -> Result<ColumnKeys<'_, 'a>, Error> {
        self.guard.gate.data(c, action, tenant, field)?;
        Ok(self.keyring.column(tenant, field))
    }

    /// Counts a finished column in the audit window: its successes and each failure
    /// by outcome.
    fn column_done(
        &self,
        c: &Caller,
        action: Action,
        (tenant, field): (&str, &str),
        n: usize,
        failed: &Failures,
    ) {
        let ok = n.saturating_sub(failed.0.len());
        (self.guard.gate).data_done_column(c, action, tenant, field, ok, &failed.errors());
    }

    pub(super) async fn encrypt_column(
        &self,
        c: &Caller,
        r: &EncryptColumnRequest,
    ) -> Result<EncryptColumnResponse, Status> {
        let n = r.plaintexts.len();
        self.guard.check_batch(n)?;
        let (subjects, contexts) = shape(n, &r.subject_id, &r.subject_ids, &r.contexts)?;
        let mut failed = Failures::default();
        let mut ranges = Vec::with_capacity(n);
        let mut out = Vec::new();
        let mut key_version = 0;
        let mut unbound = 0usize;
        match self.open_column(c, Action::Encrypt, &r.tenant_id, &r.field) {
            Err(e) => failed = Failures::all(n, &e),
            Ok(mut keys) => {
                let room: usize = r
                    .plaintexts
                    .iter()
                    .map(|p| p.len() + crypto::OVERHEAD)
                    .sum();
                out.reserve(room);
                // One fork check for the column's nonces, not one per value.
                let mut nonces = crypto::Nonces::fresh(n).map_err(Error::from);
                // The last subject's encryptor: a run of values of one subject (all of
                // them, when subject_id names it) needs no lookup.
                let mut current: Option<(Option<&str>, Encryptor<'_>)> = None;
                for (i, pt) in r.plaintexts.iter().enumerate() {
                    let start = out.len();
                    let context = contexts.of(i);
                    let subject = subjects.of(i);
                    let sealed = async {
                        self.check_context(&r.field, context)?;
                        self.guard.check_field("plaintext", pt.len())?;
                        let nonces = nonces.as_mut().map_err(|e| e.clone())?;
                        let enc = match &current {
                            Some((s, enc)) if *s == subject => enc,
                            _ => {
                                let enc = keys.encryptor(subject).await?.clone();
                                &current.insert((subject, enc)).1
                            }
                        };
                        key_version = enc.key_version();
                        enc.seal_into(nonces, context, pt, &mut out)
                    }
                    .await;
                    match sealed {
                        Ok(()) => unbound += usize::from(context.is_empty()),
                        Err(e) => failed.push(i, e),
                    }
                    ranges.push(start..out.len());
                }
            }
        }
        self.column_done(c, Action::Encrypt, (&r.tenant_id, &r.field), n, &failed);
        if unbound > 0 {
            (self.guard.gate).data_unbound_n(c, Action::Encrypt, &r.tenant_id, &r.field, unbound);
        }
        let ciphertexts = if r.format == CiphertextFormat::Text as i32 {
            ranges
                .iter()
                .map(|range| match out.get(range.clone()) {
                    Some(env) if !env.is_empty() => Bytes::from(crypto::to_text(env)),
                    _ => Bytes::new(),
                })
                .collect()
        } else {
            pieces(Bytes::from(out), &ranges)
        };
        Ok(EncryptColumnResponse {
            ciphertexts,
            key_version,
            errors: failed.into_wire(),
        })
    }

    pub(super) async fn decrypt_column(
        &self,
        c: &Caller,
        r: &DecryptColumnRequest,
    ) -> Result<DecryptColumnResponse, Status> {
        let n = r.ciphertexts.len();
        self.guard.check_batch(n)?;
        let (subjects, contexts) = shape(n, &r.subject_id, &r.subject_ids, &r.contexts)?;
        let mut failed = Failures::default();
        let mut ranges = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut stale = Vec::with_capacity(n);
        let mut repaired = Vec::with_capacity(if r.repair { n } else { 0 });
        let mut repaired_key_version = 0;
        let mut repairs = Repairs::default();
        // Plaintexts are shorter than their envelopes (text forms: shorter still).
        let room: usize = r.ciphertexts.iter().map(Bytes::len).sum();
        let mut out = Plaintext::with_capacity(room);
        let opened = match self.open_column(c, Action::Decrypt, &r.tenant_id, &r.field) {
            Ok(keys) => {
                // Read repair is a write: decided for the whole column before anything
                // is decrypted or taken from the decrypt allowance.
                let may_repair = if r.repair {
                    self.authorize_repair(c, &r.tenant_id, &r.field)
                } else {
                    Ok(())
                };
                if may_repair.is_err() {
                    repairs.denied = u64::try_from(n).unwrap_or(u64::MAX);
                }
                match may_repair {
                    Ok(()) => {
                        let quota = u32::try_from(n).unwrap_or(u32::MAX);
                        let taken = self.guard.gate.decrypt_quota(c, &r.tenant_id, quota).await;
                        taken.map(|()| keys)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match opened {
            Err(e) => {
                failed = Failures::all(n, &e);
                ranges.resize(n, 0..0);
                versions.resize(n, 0);
                stale.resize(n, false);
                if r.repair {
                    repaired.resize(n, Bytes::new());
                }
            }
            Ok(mut keys) => {
                for (i, ct) in r.ciphertexts.iter().enumerate() {
                    let context = contexts.of(i);
                    let result = async {
                        self.check_context(&r.field, context)?;
                        self.guard.check_field("ciphertext", ct.len())?;
                        open_value(&mut keys, subjects.of(i), context, ct, r.repair, &mut out).await
                    }
                    .await;
                    match result {
                        Ok(v) => {
                            ranges.push(v.range);
                            versions.push(v.version);
                            stale.push(v.repair.is_stale());
                            repairs.note(&v.repair);
                            if r.repair {
                                repaired.push(match v.repair {
                                    ReadRepair::Repaired(rw) => {
                                        repaired_key_version = rw.to_version;
                                        Bytes::from(rw.ciphertext)
                                    }
                                    _ => Bytes::new(),
                                });
                            }
                        }
                        Err(e) => {
                            failed.push(i, e);
                            ranges.push(0..0);
                            versions.push(0);
                            stale.push(false);
                            if r.repair {
                                repaired.push(Bytes::new());
                            }
                        }
                    }
                }
            }
        }
        // A column refused only for its repair had its Decrypt allowed: its values are
        // counted once, as the Rewrap denied, not also as Decrypt denials.
        if repairs.denied == 0 {
            self.column_done(c, Action::Decrypt, (&r.tenant_id, &r.field), n, &failed);
        }
        (self.guard.gate).data_repairs(c, &r.tenant_id, &r.field, repairs);
        // No copy: the reply's values are slices of the self-wiping buffer.
        let plaintexts = pieces(Bytes::from_owner(out), &ranges);
        Ok(DecryptColumnResponse {
            plaintexts,
            key_versions: versions,
            errors: failed.into_wire(),
            stale,
            repaired_ciphertexts: repaired,
            repaired_key_version,
        })
    }

    pub(super) async fn rewrap_column(
        &self,
        c: &Caller,
        r: &RewrapColumnRequest,
    ) -> Result<RewrapColumnResponse, Status> {
        let n = r.ciphertexts.len();
        self.guard.check_batch(n)?;
        let (subjects, contexts) = shape(n, &r.subject_id, &r.subject_ids, &r.contexts)?;
        let mut failed = Failures::default();
        let mut results: Vec<Result<(Bytes, u32, u32), ()>> = Vec::with_capacity(n);
        match self.open_column(c, Action::Rewrap, &r.tenant_id, &r.field) {
            Err(e) => failed = Failures::all(n, &e),
            Ok(mut keys) => {
                let mut scratch = Plaintext::with_capacity(0);
                for (i, ct) in r.ciphertexts.iter().enumerate() {
                    let result = async {
                        let context = contexts.of(i);
                        self.check_context(&r.field, context)?;
                        self.guard.check_field("ciphertext", ct.len())?;
                        rewrap_value(
                            &mut keys,
                            subjects.of(i),
                            context,
                            ct,
                            r.verify,
                            &mut scratch,
                        )
                        .await
                    }
                    .await;
                    scratch.clear();
                    results.push(result.map_err(|e| failed.push(i, e)));
                }
            }
        }
        self.column_done(c, Action::Rewrap, (&r.tenant_id, &r.field), n, &failed);
        let mut resp = RewrapColumnResponse {
            ciphertexts: Vec::with_capacity(n),
            key_versions: Vec::with_capacity(n),
            previous_key_versions: Vec::with_capacity(n),
            errors: Vec::new(),
        };
        for i in 0..n {
            let (ct, to, from) = match results.get(i) {
                Some(Ok(v)) => v.clone(),
                _ => (Bytes::new(), 0, 0),
            };
            resp.ciphertexts.push(ct);
            resp.key_versions.push(to);
            resp.previous_key_versions.push(from);
        }
        resp.errors = failed.into_wire();
        Ok(resp)
    }

    pub(super) async fn blind_index_column(
        &self,
        c: &Caller,
        r: &BlindIndexColumnRequest,
    ) -> Result<BlindIndexColumnResponse, Status> {
        let n = r.values.len();
        self.guard.check_batch(n)?;
        let text = r.format == IndexFormat::Text as i32;
        let encode = |i: crypto::BlindIndex| -> Bytes {
            if text {
                Bytes::from(i.to_text())
            } else {
                Bytes::from(i.into_bytes())
            }
        };
        let mut failed = Failures::default();
        let mut resp = BlindIndexColumnResponse::default();
        let resolved = async {
            self.guard
                .gate
                .data(c, Action::BlindIndex, &r.tenant_id, &r.field)?;
            let quota = u32::try_from(n).unwrap_or(u32::MAX);
            (self.guard.gate)
                .index_quota(c, Action::BlindIndex, &r.tenant_id, &r.field, quota)
                .await?;
            self.keyring.indexer(&r.tenant_id, &r.field, r.lookup).await
        }
        .await;
        match resolved {
            Err(e) => {
                failed = Failures::all(n, &e);
                resp.indexes.resize(n, Bytes::new());
            }
            Ok(idx) => {
                resp.key_version = idx.key_version();
                if r.lookup {
                    resp.lookup_key_versions = idx.versions();
                }
                let k = resp.lookup_key_versions.len();
                // Argon2id profiles run on blocking threads, bounded by the keyring.
                let mut slow = tokio::task::JoinSet::new();
                let mut computed = Vec::with_capacity(n);
                for (i, v) in r.values.iter().enumerate() {
                    if let Err(e) = self.guard.check_field("value", v.len()) {
                        computed.push(Some(Err(e)));
                    } else if idx.is_slow() {
                        let (idx, v, lookup) = (idx.clone(), v.clone(), r.lookup);
                        slow.spawn(async move { (i, idx.compute(&v, lookup).await) });
                        computed.push(None);
                    } else {
                        computed.push(Some(idx.compute(v, r.lookup).await));
                    }
                }
                while let Some(joined) = slow.join_next().await {
                    match joined {
                        Ok((i, out)) => {
                            if let Some(slot) = computed.get_mut(i) {
                                *slot = Some(out);
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "blind index task failed"),
                    }
                }
                for (i, out) in computed.into_iter().enumerate() {
                    match out
                        .unwrap_or_else(|| Err(Error::Internal("blind index task lost".into())))
                    {
                        Ok(ix) => {
                            resp.indexes.push(encode(ix.index));
                            resp.lookup_indexes
                                .extend(ix.lookup.into_iter().map(encode));
                        }
                        Err(e) => {
                            failed.push(i, e);
                            resp.indexes.push(Bytes::new());
                            let padded = resp.lookup_indexes.len() + k;
                            resp.lookup_indexes.resize(padded, Bytes::new());
                        }
                    }
                }
            }
        }
        self.column_done(c, Action::BlindIndex, (&r.tenant_id, &r.field), n, &failed);
        resp.errors = failed.into_wire();
        Ok(resp)
    }
}

/// A value decrypted into a call's plaintext buffer, and what read repair found.
pub(super) struct Opened {
    /// Where its plaintext is in the buffer.
    pub(super) range: Range<usize>,
    /// The tenant key version that had encrypted it.
    pub(super) version: u32,
    /// Whether it is stale, and with repair its new ciphertext (or why there is none).
    pub(super) repair: ReadRepair,
}

/// Decrypts `ct` of `subject` with `context` with `keys`, appending the plaintext to
/// `out`, and reports whether it is stale; with `repair` (which the caller has
/// authorized as a `Crypto::Rewrap`), a stale value is sealed again under the active
/// version ([`ColumnKeys::read_repair`]: the reseal of `RewrapColumn`). Every decrypting
/// call (Decrypt, DecryptBatch, DecryptColumn) opens its values here.
pub(super) async fn open_value<'a>(
    keys: &mut ColumnKeys<'_, 'a>,
    subject: Option<&'a str>,
    context: &[u8],
    ct: &[u8],
    repair: bool,
    out: &mut Plaintext,
) -> Result<Opened, Error> {
    let (range, version) = keys.open_into(subject, context, ct, out).await?;
    let plaintext = out
        .as_bytes()
        .get(range.clone())
        .ok_or_else(|| Error::Internal("decrypted plaintext range".into()))?;
    let repair = keys
        .read_repair(subject, context, ct, version, plaintext, repair)
        .await;
    if let ReadRepair::Failed(e) = &repair {
        // The value is served on its old version; the metrics count the failure.
        tracing::debug!(error = %e, "read repair failed");
    }
    Ok(Opened {
        range,
        version,
        repair,
    })
}

/// One value of a `RewrapColumn`, as [`crate::keyring::Keyring::rewrap_checked`]
/// rewraps it: (its ciphertext now, version now, version before).
async fn rewrap_value<'a>(
    keys: &mut ColumnKeys<'_, 'a>,
    subject: Option<&'a str>,
    context: &[u8],
    ct: &Bytes,
    verify: bool,
    scratch: &mut Plaintext,
) -> Result<(Bytes, u32, u32), Error> {
    let from = {
        let bytes = crypto::decode_any(ct)?;
        crypto::Envelope::parse(&bytes)?.key_version()
    };
    keys.check(subject, context)?;
    let active = keys.active_version().await?;
    if from >= active {
        // Current (or newer than our snapshot): never moved backwards; the request's
        // own bytes go back.
        if verify {
            keys.open_into(subject, context, ct, scratch).await?;
        }
        return Ok((ct.clone(), from, from));
    }
    // Decrypt first: a ciphertext that does not belong here fails before anything
    // (such as a subject key) is created for it.
    let (range, _) = keys.open_into(subject, context, ct, scratch).await?;
    let plaintext = scratch
        .as_bytes()
        .get(range)
        .ok_or_else(|| Error::Internal("rewrap plaintext range".into()))?;
    let rw = keys.reseal(subject, context, ct, from, plaintext).await?;
    Ok((Bytes::from(rw.ciphertext), rw.to_version, from))
}
