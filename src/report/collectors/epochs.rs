//! Reads the key epochs (`docs/ERASURE.md` §6) with the signed "backups sealed"
//! statement of every sealed epoch whose key is not kept.
//!
//! Does not: verify a statement or judge a horizon (the verdict rules do), or write
//! anything.

use crate::error::Result;
use crate::model::{EpochState, KEPT_LEGACY};
use crate::store::{KeyStore, StoreError};

use super::super::facts::EpochFacts;

/// Every epoch, ascending, with its statement. Epoch records that do not decode are
/// reported in `unreadable` and leave no epoch (so nothing counts as sealed).
pub(in crate::report) async fn read_epochs(
    store: &dyn KeyStore,
    unreadable: &mut Vec<String>,
) -> Result<Vec<EpochFacts>> {
    let records = match store.epochs().await {
        Ok(r) => r,
        Err(StoreError::Corrupt(why)) => {
            unreadable.push(format!("key epochs: {why}"));
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        let statement = if record.state == EpochState::Sealed
            && record.kms_status.as_deref() != Some(KEPT_LEGACY)
        {
            store.epoch_seal(record.epoch).await?
        } else {
            None
        };
        out.push(EpochFacts { record, statement });
    }
    Ok(out)
}
