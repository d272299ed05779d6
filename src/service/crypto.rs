//! The `fieldkey.v1.Crypto` service: Encrypt, Decrypt, Rewrap and their batches (the
//! blind-index and pseudonym handlers of the same service are in `index.rs`).
//!
//! Does NOT: choose keys or decide key use (the keyring does), or log plaintext. A
//! request's values are slices of the transport's receive buffer (`Bytes`: no copy is
//! made, so there is none to wipe; the receive buffer itself is not wiped, THREAT_MODEL
//! "Request buffers"); decrypted values live in self-wiping buffers until the reply is
//! encoded.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::column::open_value;
use super::gate::{Caller, Repairs};
use super::guard::Guard;
use super::status::ItemResult as _;
use crate::config::RowBindingSettings;
use crate::crypto::{Aad, to_text};
use crate::error::Error;
use crate::keyring::{Encryptor, Keyring, ReadRepair, Rewrapped};
use crate::policy::authz::Action;
use crate::proto::pb::{
    self, CiphertextFormat, DecryptBatchRequest, DecryptBatchResponse, DecryptRequest,
    DecryptResponse, DecryptResult, EncryptBatchRequest, EncryptBatchResponse, EncryptRequest,
    EncryptResponse, EncryptResult, RewrapBatchRequest, RewrapBatchResponse, RewrapRequest,
    RewrapResponse, RewrapResult,
};

/// (tenant, subject, field) of a batch item.
type BatchKey<'a> = (&'a str, &'a str, &'a str);

/// An authorization decision for an action on a (tenant, field).
type Decision<'a> = ((Action, &'a str, &'a str), Result<(), Error>);

/// Distinct (tenant, subject, field) keys remembered per batch; beyond, items resolve
/// their key individually.
pub(super) const MAX_RESOLVED_PER_BATCH: usize = 16;

/// What a batch decides and resolves once per distinct key of its items.
struct BatchMemo<'a> {
    /// The batch's nonces (EncryptBatch), drawn at once.
    nonces: Result<crate::crypto::Nonces, Error>,
    /// Authorization decisions per (action, tenant, field).
    decisions: Vec<Decision<'a>>,
    /// Encryption keys per (tenant, subject, field).
    encryptors: Vec<(BatchKey<'a>, Result<Encryptor<'a>, Error>)>,
}

impl<'a> BatchMemo<'a> {
    /// For a batch of `n` items (that encrypts with `nonces`).
    fn new(n: usize, nonces: bool) -> Self {
        Self {
            nonces: crate::crypto::Nonces::fresh(if nonces { n } else { 0 }).map_err(Error::from),
            decisions: Vec::new(),
            encryptors: Vec::new(),
        }
    }

    /// [`super::gate::Gate::data`], decided once per distinct (action, tenant, field) of
    /// the batch (the first [`MAX_RESOLVED_PER_BATCH`] of them; beyond, per item).
    fn authorize(
        &mut self,
        gate: &super::gate::Gate,
        c: &Caller,
        action: Action,
        tenant: &'a str,
        field: &'a str,
    ) -> Result<(), Error> {
        let key = (action, tenant, field);
        if let Some((_, d)) = self.decisions.iter().find(|(k, _)| *k == key) {
            return d.clone();
        }
        let d = gate.data(c, action, tenant, field);
        if self.decisions.len() < MAX_RESOLVED_PER_BATCH {
            self.decisions.push((key, d.clone()));
        }
        d
    }
}

fn subject(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Encrypts one request's value with a resolved key, in the requested form.
fn seal_response(enc: &Encryptor<'_>, r: &EncryptRequest) -> Result<EncryptResponse, Error> {
    let env = enc.seal(&r.context, &r.plaintext)?;
    Ok(EncryptResponse {
        ciphertext: in_form(&env, r.format).unwrap_or_else(|| env.into()),
        key_version: enc.key_version(),
    })
}

/// The text form of `env` when `format` asks for it (`None`: binary, as it is).
fn in_form(env: &[u8], format: i32) -> Option<bytes::Bytes> {
    (format == CiphertextFormat::Text as i32).then(|| to_text(env).into())
}

/// The `fieldkey.v1.Crypto` service.
#[derive(Debug, Clone)]
pub struct CryptoService {
    pub(super) keyring: Arc<Keyring>,
    pub(super) guard: Guard,
    row_binding: Arc<RowBindingSettings>,
}

impl CryptoService {
    /// A service over `keyring`, enforcing `guard`'s limits and `row_binding`.
    pub fn new(keyring: Arc<Keyring>, guard: Guard, row_binding: Arc<RowBindingSettings>) -> Self {
        Self {
            keyring,
            guard,
            row_binding,
        }
    }

    /// A field bound to its row needs a context (review finding 6: without one, a value
    /// of the tenant could be copied into any row of it).
    pub(super) fn check_context(&self, field: &str, context: &[u8]) -> Result<(), Error> {
        if context.is_empty() && self.row_binding.requires(field) {
            return Err(Error::ContextRequired {
                field: field.to_owned(),
            });
        }
        Ok(())
    }

    /// Counts an encryption that bound no row (the compliance report lists such fields).
    fn note_unbound(
        &self,
        c: &Caller,
        r: &EncryptRequest,
        result: &Result<EncryptResponse, Error>,
    ) {
        if r.context.is_empty() && result.is_ok() {
            self.guard
                .gate
                .data_unbound(c, Action::Encrypt, &r.tenant_id, &r.field);
        }
    }

    async fn encrypt_one(&self, c: &Caller, r: EncryptRequest) -> Result<EncryptResponse, Error> {
        let call = (self.guard.gate).data_call(c, Action::Encrypt, &r.tenant_id, &r.field);
        let result = async {
            call.authorize()?;
            self.check_context(&r.field, &r.context)?;
            self.guard.check_field("plaintext", r.plaintext.len())?;
            let enc = self
                .keyring
                .encryptor(&r.tenant_id, subject(&r.subject_id), &r.field)
                .await?;
            seal_response(&enc, &r)
        }
        .await;
        self.note_unbound(c, &r, &result);
        call.counted(result)
    }

    /// One item of an EncryptBatch: authorized once per distinct (tenant, field) of
    /// the batch (the decision depends on nothing else), its key resolved once per
    /// distinct (tenant, subject, field); counted by the caller, per run of items. The
    /// envelope is appended to `out`; returns where it is and its key version.
    async fn encrypt_batch_item<'a>(
        &self,
        c: &Caller,
        r: &'a EncryptRequest,
        memo: &mut BatchMemo<'a>,
        out: &mut Vec<u8>,
    ) -> Result<(std::ops::Range<usize>, u32), Error> {
        memo.authorize(&self.guard.gate, c, Action::Encrypt, &r.tenant_id, &r.field)?;
        self.check_context(&r.field, &r.context)?;
        self.guard.check_field("plaintext", r.plaintext.len())?;
        let key = (
            r.tenant_id.as_str(),
            r.subject_id.as_str(),
            r.field.as_str(),
        );
        let enc = match memo.encryptors.iter().find(|(k, _)| *k == key) {
            Some((_, found)) => found.clone()?,
            None => {
                let fresh = self.keyring.encryptor(key.0, subject(key.1), key.2).await;
                if memo.encryptors.len() < MAX_RESOLVED_PER_BATCH {
                    memo.encryptors.push((key, fresh.clone()));
                }
                fresh?
            }
        };
        let nonces = memo.nonces.as_mut().map_err(|e| e.clone())?;
        let start = out.len();
        enc.seal_into(nonces, &r.context, &r.plaintext, out)?;
        Ok((start..out.len(), enc.key_version()))
    }

    async fn rewrap_one(&self, c: &Caller, r: &RewrapRequest) -> Result<RewrapResponse, Error> {
        let call = (self.guard.gate).data_call(c, Action::Rewrap, &r.tenant_id, &r.field);
        let result = async {
            call.authorize()?;
            self.check_context(&r.field, &r.context)?;
            self.guard.check_field("ciphertext", r.ciphertext.len())?;
            let aad = Aad {
                tenant: &r.tenant_id,
                subject: subject(&r.subject_id),
                field: &r.field,
                context: &r.context,
            };
            let rw: Rewrapped = self
                .keyring
                .rewrap_checked(&aad, &r.ciphertext, r.verify)
                .await?;
            Ok(RewrapResponse {
                changed: rw.changed(),
                key_version: rw.to_version,
                previous_key_version: rw.from_version,
                ciphertext: rw.ciphertext,
            })
        }
        .await;
        call.counted(result)
    }

    /// May `c` have values of `tenant`/`field` repaired on read? Producing a ciphertext
    /// is a write: read repair needs `Crypto::Rewrap` (what the Rewrap RPC needs for
    /// the same result) beside `Crypto::Decrypt`. A refusal names read repair.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] (or `InvalidArgument` for an oversized id).
    pub(super) fn authorize_repair(
        &self,
        c: &Caller,
        tenant: &str,
        field: &str,
    ) -> Result<(), Error> {
        (self.guard.gate)
            .data(c, Action::Rewrap, tenant, field)
            .map_err(repair_refused)
    }

    async fn decrypt_one(&self, c: &Caller, r: &DecryptRequest) -> Result<DecryptResponse, Error> {
        let call = (self.guard.gate).data_call(c, Action::Decrypt, &r.tenant_id, &r.field);
        let mut repairs = Repairs::default();
        let result = async {
            call.authorize()?;
            if r.repair {
                // Before anything is decrypted or taken from the allowance, whether or
                // not the value turns out stale.
                self.authorize_repair(c, &r.tenant_id, &r.field)
                    .inspect_err(|_| repairs.denied = 1)?;
            }
            self.check_context(&r.field, &r.context)?;
            self.guard.gate.decrypt_quota(c, &r.tenant_id, 1).await?;
            self.guard.check_field("ciphertext", r.ciphertext.len())?;
            // The keys of a one-value column: the snapshot that decrypts the value also
            // says whether it is stale (no store round trip for that).
            let mut keys = self.keyring.column(&r.tenant_id, &r.field);
            let mut out = crate::crypto::Plaintext::with_capacity(r.ciphertext.len());
            let subject = subject(&r.subject_id);
            let v = open_value(
                &mut keys,
                subject,
                &r.context,
                &r.ciphertext,
                r.repair,
                &mut out,
            )
            .await?;
            repairs.note(&v.repair);
            Ok(decrypt_response(
                // No copy: the reply owns the self-wiping buffer (see build.rs).
                bytes::Bytes::from_owner(out).slice(v.range),
                v.version,
                v.repair,
            ))
        }
        .await;
        let only_repair_refused = repairs.denied > 0;
        (self.guard.gate).data_repairs(c, &r.tenant_id, &r.field, repairs);
        if only_repair_refused {
            // Refused only for its repair: its Decrypt was allowed, so it is no Decrypt
            // denial; the audit counts the refusal once, as the Rewrap denied.
            return result;
        }
        call.counted(result)
    }
}

/// A refusal of read repair, naming it (the policies' reason follows).
fn repair_refused(e: Error) -> Error {
    match e {
        Error::PermissionDenied { reason } => Error::PermissionDenied {
            reason: format!("read repair is a rewrap: {reason}"),
        },
        other => other,
    }
}

/// The reply for a decrypted value: its plaintext, version, and what read repair found.
fn decrypt_response(
    plaintext: bytes::Bytes,
    key_version: u32,
    repair: ReadRepair,
) -> DecryptResponse {
    let stale = repair.is_stale();
    let (repaired_ciphertext, repaired_key_version) = match repair {
        ReadRepair::Repaired(rw) => (bytes::Bytes::from(rw.ciphertext), rw.to_version),
        _ => (bytes::Bytes::new(), 0),
    };
    DecryptResponse {
        plaintext,
        key_version,
        stale,
        repaired_ciphertext,
        repaired_key_version,
    }
}

#[tonic::async_trait]
impl pb::crypto_server::Crypto for CryptoService {
    async fn encrypt(
        &self,
        req: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        self.guard
            .run(self.encrypt_one(&c, req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn decrypt(
        &self,
        req: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        self.guard
            .run(self.decrypt_one(&c, req.get_ref()))
            .await
            .map(Response::new)
    }

    async fn encrypt_batch(
        &self,
        req: Request<EncryptBatchRequest>,
    ) -> Result<Response<EncryptBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async {
            let mut results = Vec::with_capacity(items.len());
            // Every envelope in one buffer, which the replies slice.
            let room = items
                .iter()
                .map(|r| r.plaintext.len() + crate::crypto::OVERHEAD)
                .sum();
            let mut out = Vec::with_capacity(room);
            {
                // Items of one batch usually share (tenant, subject, field): decide and
                // resolve each distinct one once (a few per batch), not once per item.
                let mut memo = BatchMemo::new(items.len(), true);
                for item in &items {
                    results.push(self.encrypt_batch_item(&c, item, &mut memo, &mut out).await);
                }
            }
            let gate = &self.guard.gate;
            gate.data_done_batch(
                &c,
                Action::Encrypt,
                items
                    .iter()
                    .zip(&results)
                    .map(|(r, res)| (r.tenant_id.as_str(), r.field.as_str(), res)),
            );
            for (r, res) in items.iter().zip(&results) {
                if r.context.is_empty() && res.is_ok() {
                    gate.data_unbound(&c, Action::Encrypt, &r.tenant_id, &r.field);
                }
            }
            let buf = bytes::Bytes::from(out);
            let results = items
                .iter()
                .zip(results)
                .map(|(r, res)| {
                    EncryptResult::of(res.map(|(range, key_version)| {
                        let env = buf.slice(range);
                        EncryptResponse {
                            ciphertext: in_form(&env, r.format).unwrap_or(env),
                            key_version,
                        }
                    }))
                })
                .collect();
            Ok::<_, Status>(EncryptBatchResponse { results })
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn rewrap(
        &self,
        req: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        self.guard
            .run(self.rewrap_one(&c, req.get_ref()))
            .await
            .map(Response::new)
    }

    async fn rewrap_batch(
        &self,
        req: Request<RewrapBatchRequest>,
    ) -> Result<Response<RewrapBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async {
            let mut results = Vec::with_capacity(items.len());
            for item in &items {
                results.push(RewrapResult::of(self.rewrap_one(&c, item).await));
            }
            Ok::<_, Status>(RewrapBatchResponse { results })
        };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn blind_index(
        &self,
        req: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        self.guard
            .run(self.blind_index_one(&c, req.into_inner()))
            .await
            .map(Response::new)
    }

    async fn blind_index_batch(
        &self,
        req: Request<pb::BlindIndexBatchRequest>,
    ) -> Result<Response<pb::BlindIndexBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async { Ok::<_, Status>(self.blind_index_batch(&c, items).await) };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn pseudonymize(
        &self,
        req: Request<pb::PseudonymizeRequest>,
    ) -> Result<Response<pb::PseudonymizeResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        self.guard
            .run(self.pseudonymize_one(&c, req.get_ref()))
            .await
            .map(Response::new)
    }

    async fn pseudonymize_batch(
        &self,
        req: Request<pb::PseudonymizeBatchRequest>,
    ) -> Result<Response<pb::PseudonymizeBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async { Ok::<_, Status>(self.pseudonymize_batch(&c, &items).await) };
        self.guard.run(fut).await.map(Response::new)
    }

    async fn encrypt_column(
        &self,
        req: Request<pb::EncryptColumnRequest>,
    ) -> Result<Response<pb::EncryptColumnResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = self.encrypt_column(&c, req.get_ref());
        self.guard.run(fut).await.map(Response::new)
    }

    async fn decrypt_column(
        &self,
        req: Request<pb::DecryptColumnRequest>,
    ) -> Result<Response<pb::DecryptColumnResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = self.decrypt_column(&c, req.get_ref());
        self.guard.run(fut).await.map(Response::new)
    }

    async fn rewrap_column(
        &self,
        req: Request<pb::RewrapColumnRequest>,
    ) -> Result<Response<pb::RewrapColumnResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = self.rewrap_column(&c, req.get_ref());
        self.guard.run(fut).await.map(Response::new)
    }

    async fn blind_index_column(
        &self,
        req: Request<pb::BlindIndexColumnRequest>,
    ) -> Result<Response<pb::BlindIndexColumnResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let fut = self.blind_index_column(&c, req.get_ref());
        self.guard.run(fut).await.map(Response::new)
    }

    async fn decrypt_batch(
        &self,
        req: Request<DecryptBatchRequest>,
    ) -> Result<Response<DecryptBatchResponse>, Status> {
        let c = self.guard.gate.caller(&req);
        let items = req.into_inner().items;
        self.guard.check_batch(items.len())?;
        let fut = async { Ok::<_, Status>(self.decrypt_items(&c, &items).await) };
        self.guard.run(fut).await.map(Response::new)
    }
}

impl CryptoService {
    /// A DecryptBatch: each item authorized, rate-counted and checked as a single
    /// Decrypt (with repair, also authorized as a Rewrap); the keys of each distinct
    /// (tenant, field) resolved once ([`crate::keyring::ColumnKeys`], for the first
    /// [`MAX_RESOLVED_PER_BATCH`] of them), the plaintexts decrypted into one
    /// self-wiping buffer that the replies slice (wiped once tonic has encoded the
    /// reply).
    async fn decrypt_items(&self, c: &Caller, items: &[DecryptRequest]) -> DecryptBatchResponse {
        let room = items.iter().map(|r| r.ciphertext.len()).sum();
        let mut out = crate::crypto::Plaintext::with_capacity(room);
        let mut memo = BatchMemo::new(items.len(), false);
        let mut columns: Vec<((&str, &str), crate::keyring::ColumnKeys<'_, '_>)> = Vec::new();
        let mut results = Vec::with_capacity(items.len());
        // Per item: refused only for its repair (not counted as a Decrypt, see below).
        let mut only_repair_refused = Vec::with_capacity(items.len());
        // Read repairs, counted by runs of items of one (tenant, field).
        let mut repairs: Option<((&str, &str), Repairs)> = None;
        for r in items {
            let mut denied = false;
            let result = async {
                memo.authorize(&self.guard.gate, c, Action::Decrypt, &r.tenant_id, &r.field)?;
                if r.repair {
                    memo.authorize(&self.guard.gate, c, Action::Rewrap, &r.tenant_id, &r.field)
                        .map_err(repair_refused)
                        .inspect_err(|_| denied = true)?;
                }
                self.check_context(&r.field, &r.context)?;
                self.guard.gate.decrypt_quota(c, &r.tenant_id, 1).await?;
                self.guard.check_field("ciphertext", r.ciphertext.len())?;
                let key = (r.tenant_id.as_str(), r.field.as_str());
                let subject = subject(&r.subject_id);
                let at = match columns.iter().position(|(k, _)| *k == key) {
                    Some(at) => at,
                    None if columns.len() < MAX_RESOLVED_PER_BATCH => {
                        columns.push((key, self.keyring.column(key.0, key.1)));
                        columns.len() - 1
                    }
                    None => {
                        let mut once = self.keyring.column(key.0, key.1);
                        let (ctx, ct) = (&r.context, &r.ciphertext);
                        return open_value(&mut once, subject, ctx, ct, r.repair, &mut out).await;
                    }
                };
                let (_, keys) = columns
                    .get_mut(at)
                    .ok_or_else(|| Error::Internal("batch keys lost".into()))?;
                open_value(keys, subject, &r.context, &r.ciphertext, r.repair, &mut out).await
            }
            .await;
            let key = (r.tenant_id.as_str(), r.field.as_str());
            let run = match &mut repairs {
                Some((k, run)) if *k == key => run,
                _ => {
                    if let Some(((t, f), done)) = repairs.take() {
                        (self.guard.gate).data_repairs(c, t, f, done);
                    }
                    &mut repairs.insert((key, Repairs::default())).1
                }
            };
            run.denied += u64::from(denied);
            if let Ok(v) = &result {
                run.note(&v.repair);
            }
            results.push(result);
            only_repair_refused.push(denied);
        }
        drop(columns);
        if let Some(((t, f), done)) = repairs {
            (self.guard.gate).data_repairs(c, t, f, done);
        }
        // An item refused only for its repair had its Decrypt allowed: it is counted
        // once, as the Rewrap denied (above), not also as a Decrypt denial.
        self.guard.gate.data_done_batch(
            c,
            Action::Decrypt,
            items
                .iter()
                .zip(&results)
                .zip(&only_repair_refused)
                .filter(|(_, refused)| !**refused)
                .map(|((r, res), _)| (r.tenant_id.as_str(), r.field.as_str(), res)),
        );
        // No copy: each reply's value is a slice of the self-wiping buffer.
        let buf = bytes::Bytes::from_owner(out);
        let results = results
            .into_iter()
            .map(|r| {
                DecryptResult::of(
                    r.map(|v| decrypt_response(buf.slice(v.range), v.version, v.repair)),
                )
            })
            .collect();
        DecryptBatchResponse { results }
    }
}
