//! The `BlindIndex`, `BlindIndexBatch`, `Pseudonymize` and `PseudonymizeBatch`
//! handlers of the `Crypto` service (the trait methods in `crypto.rs` call these).

use tokio::task::JoinSet;
use zeroize::Zeroize as _;

use super::crypto::{CryptoService, MAX_RESOLVED_PER_BATCH};
use super::status::ItemResult as _;
use crate::crypto::BlindIndex;
use crate::error::Error;
use crate::keyring::{Indexed, Indexer};
use crate::policy::authz::Action;
use crate::proto::pb::{
    BlindIndexBatchResponse, BlindIndexRequest, BlindIndexResponse, BlindIndexResult, IndexFormat,
    PseudonymizeBatchResponse, PseudonymizeRequest, PseudonymizeResponse, PseudonymizeResult,
};

use super::gate::Caller;

/// (tenant, field, lookup) of a batch item.
type IndexKeyOf<'a> = (&'a str, &'a str, bool);

fn encode(i: BlindIndex, format: i32) -> Vec<u8> {
    if format == IndexFormat::Text as i32 {
        i.to_text().into_bytes()
    } else {
        i.into_bytes()
    }
}

fn index_response(out: Indexed, format: i32) -> BlindIndexResponse {
    let key_version = out.index.version();
    BlindIndexResponse {
        index: encode(out.index, format),
        key_version,
        lookup_indexes: out.lookup.into_iter().map(|i| encode(i, format)).collect(),
    }
}

impl CryptoService {
    /// Authorizes and checks one item and resolves its index keys (once per distinct
    /// (tenant, field, lookup) in a batch: the result is kept in `resolved`).
    async fn indexer_for<'a, 'r>(
        &self,
        c: &Caller,
        r: &'a BlindIndexRequest,
        resolved: &'r mut Vec<(IndexKeyOf<'a>, Result<Indexer, Error>)>,
    ) -> Result<&'r Indexer, Error> {
        self.guard
            .gate
            .data(c, Action::BlindIndex, &r.tenant_id, &r.field)?;
        self.guard.check_field("value", r.value.len())?;
        (self.guard.gate)
            .index_quota(c, Action::BlindIndex, &r.tenant_id, &r.field, 1)
            .await?;
        let key = (r.tenant_id.as_str(), r.field.as_str(), r.lookup);
        let at = match resolved.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let fresh = self.keyring.indexer(key.0, key.1, key.2).await;
                if resolved.len() >= MAX_RESOLVED_PER_BATCH {
                    // Many distinct keys in one batch: forget the oldest.
                    drop(resolved.remove(0));
                }
                resolved.push((key, fresh));
                resolved.len() - 1
            }
        };
        match resolved.get(at) {
            Some((_, Ok(idx))) => Ok(idx),
            Some((_, Err(e))) => Err(e.clone()),
            None => Err(Error::Internal("resolved indexer lost".into())),
        }
    }

    pub(super) async fn blind_index_one(
        &self,
        c: &Caller,
        mut r: BlindIndexRequest,
    ) -> Result<BlindIndexResponse, Error> {
        let call = (self.guard.gate).data_call(c, Action::BlindIndex, &r.tenant_id, &r.field);
        let result = async {
            // indexer_for authorizes the item (as for each item of a batch).
            let mut resolved = Vec::with_capacity(1);
            let idx = self.indexer_for(c, &r, &mut resolved).await?;
            let out = idx.compute(&r.value, r.lookup).await?;
            Ok(index_response(out, r.format))
        }
        .await;
        r.value.zeroize();
        call.counted(result)
    }

    /// A batch: fast (HMAC) items are computed in order on this task; slow (Argon2id)
    /// items run concurrently, bounded by the keyring's slow-index limit.
    pub(super) async fn blind_index_batch(
        &self,
        c: &Caller,
        mut items: Vec<BlindIndexRequest>,
    ) -> BlindIndexBatchResponse {
        let mut results: Vec<Option<Result<BlindIndexResponse, Error>>> =
            Vec::with_capacity(items.len());
        let mut slow = JoinSet::new();
        {
            let mut resolved = Vec::new();
            for (i, r) in items.iter().enumerate() {
                match self.indexer_for(c, r, &mut resolved).await {
                    Ok(idx) if idx.is_slow() => {
                        let idx = idx.clone();
                        let (value, lookup, format) = (r.value.clone(), r.lookup, r.format);
                        slow.spawn(async move {
                            let mut value = value;
                            let out = idx.compute(&value, lookup).await;
                            value.zeroize();
                            (i, out.map(|o| index_response(o, format)))
                        });
                        results.push(None);
                    }
                    Ok(idx) => {
                        let out = idx
                            .compute(&r.value, r.lookup)
                            .await
                            .map(|o| index_response(o, r.format));
                        results.push(Some(out));
                    }
                    Err(e) => results.push(Some(Err(e))),
                }
            }
        }
        while let Some(joined) = slow.join_next().await {
            match joined {
                Ok((i, out)) => {
                    if let Some(slot) = results.get_mut(i) {
                        *slot = Some(out);
                    }
                }
                Err(e) => tracing::error!(error = %e, "blind index task failed"),
            }
        }
        let results: Vec<Result<BlindIndexResponse, Error>> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Internal("blind index task lost".into()))))
            .collect();
        self.guard.gate.data_done_batch(
            c,
            Action::BlindIndex,
            items
                .iter()
                .zip(&results)
                .map(|(r, res)| (r.tenant_id.as_str(), r.field.as_str(), res)),
        );
        for r in &mut items {
            r.value.zeroize();
        }
        let out = results.into_iter().map(BlindIndexResult::of).collect();
        BlindIndexBatchResponse { results: out }
    }

    pub(super) async fn pseudonymize_one(
        &self,
        c: &Caller,
        r: &PseudonymizeRequest,
    ) -> Result<PseudonymizeResponse, Error> {
        let call = (self.guard.gate).data_call(c, Action::Pseudonymize, &r.tenant_id, &r.purpose);
        let result = async {
            call.authorize()?;
            (self.guard.gate)
                .index_quota(c, Action::Pseudonymize, &r.tenant_id, &r.purpose, 1)
                .await?;
            let p = self
                .keyring
                .pseudonymize(&r.tenant_id, &r.subject_id, &r.purpose)
                .await?;
            Ok(PseudonymizeResponse {
                pseudonym: hex::encode(p),
            })
        }
        .await;
        call.counted(result)
    }

    pub(super) async fn pseudonymize_batch(
        &self,
        c: &Caller,
        items: &[PseudonymizeRequest],
    ) -> PseudonymizeBatchResponse {
        let mut results = Vec::with_capacity(items.len());
        for r in items {
            results.push(PseudonymizeResult::of(self.pseudonymize_one(c, r).await));
        }
        PseudonymizeBatchResponse { results }
    }
}
