//! Rewrapping rows: each value moved to the tenant's active key version (by the
//! keyring, which alone sees plaintext, with the row's keys resolved once:
//! [`Keyring::row_keys`]), its blind index recomputed, and the tallies that settle a
//! row into the job's counters.
//!
//! Owns: the per-row decision (rewrap, leave current, count as shredded or failed), the
//! split of a batch over two worker tasks, and adding a row's tallies to the progress.
//! Does not: read or write the table (`table` does) or renew the lease.

use crate::crypto::{self, Envelope};
use crate::error::Error;
use crate::jobs::spec::ColumnSpec;
use crate::keyring::Keyring;
use crate::kms::KmsError;
use crate::model::JobProgress;
use crate::store::StoreError;

use super::table::{DbRow, Value, in_form_of, same};
use super::{BatchError, BatchResult, Runner, Task};

/// A row after rewrapping: the row as read, its new column values (`None`: nothing
/// to write), its tallies.
type Rewrapped = (DbRow, Option<Vec<Option<Value>>>, RowTally);

/// A row to write: the row as read, its new column values, its tallies.
pub(super) type Update = (DbRow, Vec<Option<Value>>, RowTally);

/// Per-row tallies, added to the job's counters once the row is settled.
#[derive(Default)]
pub(super) struct RowTally {
    rewrapped: u64,
    current: u64,
    shredded: u64,
    indexes_recomputed: u64,
    indexes_current: u64,
    indexes_cleared: u64,
    pub(super) failed: Vec<(Option<u32>, String)>,
}

/// Rows per batch below which rewrapping stays on one task.
const PARALLEL_MIN_ROWS: usize = 64;

impl Runner {
    /// One batch after `checkpoint`. Returns the new checkpoint, or `None` at the end.
    /// Reads nothing, writes nothing: rewraps `rows`, settles those that need no
    /// write, and returns the others with their new values.
    pub(super) async fn prepare(
        &self,
        mut rows: Vec<DbRow>,
        progress: &mut JobProgress,
    ) -> BatchResult<Vec<Update>> {
        // Rewrapping is CPU work: the second half of a batch goes to another worker
        // thread, so both cores are used while the database is busy with the write.
        let second = if rows.len() >= PARALLEL_MIN_ROWS {
            let tail = rows.split_off(rows.len() / 2);
            let (k, cols, verify) = (self.keyring.clone(), self.columns.clone(), self.verify);
            Some(Task::spawn(async move {
                rewrap_rows(&k, &cols, verify, tail).await
            }))
        } else {
            None
        };
        let mut done = rewrap_rows(&self.keyring, &self.columns, self.verify, rows).await?;
        if let Some(mut h) = second {
            let more = h.join("rewrap").await??;
            done.extend(more);
        }
        let mut updates = Vec::new();
        for (row, new_values, tally) in done {
            match new_values {
                Some(nv) => updates.push((row, nv, tally)),
                None => settle(progress, &row, tally),
            }
        }
        Ok(updates)
    }
}

/// Rewraps rows in order; see [`rewrap_row`].
async fn rewrap_rows(
    keyring: &Keyring,
    columns: &[ColumnSpec],
    verify: bool,
    rows: Vec<DbRow>,
) -> BatchResult<Vec<Rewrapped>> {
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (nv, tally) = rewrap_row(keyring, columns, verify, &row).await?;
        out.push((row, nv, tally));
    }
    Ok(out)
}

/// What became of one value's blind index.
enum IndexOutcome {
    /// Recomputed under the active version: write this (in the column's form).
    Set(crypto::BlindIndex),
    /// The value's key is shredded: clear the index.
    Clear,
    /// Could not be recomputed: leave it.
    Keep,
}

/// New values for a row's columns (`None` if nothing changes), and its tallies.
/// `row.values` holds the encrypted columns, then the blind-index columns.
async fn rewrap_row(
    keyring: &Keyring,
    columns: &[ColumnSpec],
    verify: bool,
    row: &DbRow,
) -> std::result::Result<(Option<Vec<Option<Value>>>, RowTally), BatchError> {
    let mut tally = RowTally::default();
    let mut out: Vec<Option<Value>> = Vec::with_capacity(row.values.len());
    let mut index_out: Vec<Option<Value>> = Vec::new();
    let mut changed = false;
    let mut index_values = row.values.iter().skip(columns.len());
    // The row's tenant and subject keys, resolved once for all its values.
    let keys = keyring.row_keys(&row.tenant, row.subject.as_deref()).await;
    for (col, v) in columns.iter().zip(&row.values) {
        let stored_index = if col.blind_index.is_some() {
            Some(index_values.next().and_then(Option::as_ref))
        } else {
            None
        };
        let Some(v) = v else {
            out.push(None);
            if let Some(ix) = stored_index {
                index_out.push(ix.map(same));
            }
            continue;
        };
        let (rewrapped, index) = match stored_index {
            None => (
                keys.rewrap(&col.field, &row.context, v.bytes(), verify)
                    .await,
                IndexOutcome::Keep,
            ),
            Some(_) => match keys
                .rewrap_and_index(&col.field, &row.context, v.bytes())
                .await
            {
                Ok((r, ix)) => (Ok(r), IndexOutcome::Set(ix)),
                Err(e @ Error::KeyDestroyed { .. }) => (Err(e), IndexOutcome::Clear),
                Err(e) => (Err(e), IndexOutcome::Keep),
            },
        };
        match rewrapped {
            Ok(r) if r.changed() => {
                tally.rewrapped += 1;
                changed = true;
                out.push(Some(in_form_of(v, r.ciphertext)?));
            }
            Ok(_) => {
                tally.current += 1;
                out.push(Some(same(v)));
            }
            Err(e) if is_transient(&e) => return Err(BatchError::Transient(e.to_string())),
            Err(Error::KeyDestroyed { .. }) => {
                tally.shredded += 1;
                out.push(Some(same(v)));
            }
            Err(e) => {
                tally.failed.push((version_of(v.bytes()), e.to_string()));
                out.push(Some(same(v)));
            }
        }
        let Some(stored) = stored_index else { continue };
        match index {
            IndexOutcome::Set(ix) => {
                let is_current = stored
                    .is_some_and(|s| crypto::BlindIndex::parse(s.bytes()).is_ok_and(|p| p == ix));
                if is_current {
                    tally.indexes_current += 1;
                    index_out.push(stored.map(same));
                } else {
                    tally.indexes_recomputed += 1;
                    changed = true;
                    index_out.push(Some(Value::Index(ix)));
                }
            }
            IndexOutcome::Clear => {
                if stored.is_some() {
                    tally.indexes_cleared += 1;
                    changed = true;
                }
                index_out.push(None);
            }
            IndexOutcome::Keep => {
                // Not recomputed: an index still on an old version blocks that
                // version's retirement like a ciphertext would.
                if let Some(ix) = stored.and_then(|s| crypto::BlindIndex::parse(s.bytes()).ok()) {
                    tally.failed.push((
                        Some(ix.version()),
                        "blind index not recomputed (its value could not be decrypted)".into(),
                    ));
                }
                index_out.push(stored.map(same));
            }
        }
    }
    out.extend(index_out);
    Ok((changed.then_some(out), tally))
}

fn is_transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Kms(KmsError::Unavailable(_) | KmsError::Timeout | KmsError::Throttled)
            | Error::Store(StoreError::Unavailable(_))
    )
}

/// The key version an envelope names, if it parses.
pub(super) fn version_of(v: &[u8]) -> Option<u32> {
    let bytes = crypto::decode_any(v).ok()?;
    Envelope::parse(&bytes).ok().map(|e| e.key_version())
}

pub(super) fn settle(progress: &mut JobProgress, row: &DbRow, tally: RowTally) {
    progress.values_rewrapped += tally.rewrapped;
    progress.values_current += tally.current;
    progress.values_shredded += tally.shredded;
    progress.indexes_recomputed += tally.indexes_recomputed;
    progress.indexes_current += tally.indexes_current;
    progress.indexes_cleared += tally.indexes_cleared;
    for (version, err) in tally.failed {
        progress.values_failed += 1;
        if let Some(v) = version {
            *progress
                .leftovers
                .entry(row.tenant.clone())
                .or_default()
                .entry(v)
                .or_default() += 1;
        }
        progress.last_error = Some(err);
    }
}
