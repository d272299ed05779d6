//! Key epochs (`docs/ERASURE.md` §6): erasure that reaches key-store backups.
//!
//! Owns: the epoch roll (a new KMS key per epoch; live material moved to it; the old
//! key's deletion scheduled once nothing live needs it), its lease across replicas,
//! the signed "backups sealed" statements (`seal.rs`), and the epoch status (the
//! backup horizon). Must not: destroy live key material, or schedule the deletion of a
//! key before verifying in the store that nothing live still needs it.

mod roll;
pub mod seal;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::error::Result;
use crate::keyring::Keyring;
use crate::kms::Kms;
use crate::model::{EpochRecord, EpochState, RollLease, now_ms};
use crate::signing::Signer;
use crate::store::KeyStore;

/// Settings of the epoch roll (see `[epochs]` in the configuration).
#[derive(Debug, Clone)]
pub struct EpochSettings {
    /// How long an epoch stays active before the worker rolls to the next one.
    pub length: Duration,
    /// KMS waiting period before an old epoch key is deleted (AWS: 7..=30 days).
    pub kms_deletion_days: u32,
    /// Whether the legacy wrapping key (the KMS default key, epoch 0 of a store from
    /// before epochs) is scheduled for deletion once nothing live needs it. Off: it is
    /// kept and backups from before the first roll stay restorable while it lives.
    pub retire_legacy_key: bool,
    /// Operator-created KMS keys to take epoch keys from, in order (instead of
    /// creating them: for deployments that may not `kms:CreateKey`).
    pub key_pool: Vec<String>,
    /// Names this key store in the KMS (tags, aliases).
    pub store_tag: String,
    /// Who rolls (`host pid`), for the lease.
    pub owner: String,
    /// How long the roll's lease lasts without renewal (a roller that died is taken
    /// over after this).
    pub lease: Duration,
}

impl Default for EpochSettings {
    fn default() -> Self {
        Self {
            length: Duration::from_secs(7 * 86_400),
            kms_deletion_days: 7,
            retire_legacy_key: false,
            key_pool: Vec::new(),
            store_tag: "default".into(),
            owner: format!("pid {}", std::process::id()),
            lease: Duration::from_secs(60),
        }
    }
}

/// The epoch roller and its status: the handle `wiring` hands out.
pub struct Epochs {
    keyring: Arc<Keyring>,
    store: Arc<dyn KeyStore>,
    kms: Arc<dyn Kms>,
    signer: Signer,
    cfg: EpochSettings,
    /// A roll started by this process is running.
    running: std::sync::atomic::AtomicBool,
    /// The last roll of this process that failed, and why (cleared by a success).
    last_error: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Epochs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epochs")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// One epoch in a status report.
#[derive(Debug, Clone, Serialize)]
pub struct EpochView {
    /// The record.
    #[serde(flatten)]
    pub record: EpochRecord,
    /// Whether backups that need this key can still be restored with it.
    pub opens_backups: bool,
    /// The signed "backups sealed" statement (JSON), once sealed.
    pub seal_statement: Option<String>,
}

/// What `fieldkey epoch status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct EpochStatus {
    /// Every epoch, ascending.
    pub epochs: Vec<EpochView>,
    /// The active epoch, if epochs started.
    pub active: Option<u64>,
    /// Key-store backups taken at or after this time (Unix ms) can be restored (the
    /// oldest epoch key still alive became active then); `None`: no bound (before the
    /// first roll, or while the legacy key is kept: every backup from before epochs is
    /// restorable while it lives).
    pub restorable_backups_since_unix_ms: Option<i64>,
    /// When the active epoch is due to roll, Unix ms.
    pub next_roll_due_unix_ms: Option<i64>,
    /// Whether a roll is overdue (past its due time by more than a day) or unfinished.
    pub roll_overdue: bool,
    /// The roll's lease holder and counters.
    pub roll_owner: Option<String>,
    /// Counters of the current or last roll.
    pub progress: crate::model::RollProgress,
    /// Epoch being rolled to, if a roll is running or unfinished.
    pub rolling_to: Option<u64>,
    /// Whether the sidecar that answered is running a roll.
    pub rolling_here: bool,
    /// Why that sidecar's last roll stopped, if it failed.
    pub last_error: Option<String>,
}

impl Epochs {
    /// The roller over a keyring, its store and KMS; `signer` signs the "backups
    /// sealed" statements (the receipts' key).
    pub fn new(
        keyring: Arc<Keyring>,
        store: Arc<dyn KeyStore>,
        kms: Arc<dyn Kms>,
        signer: Signer,
        cfg: EpochSettings,
    ) -> Self {
        Self {
            keyring,
            store,
            kms,
            signer,
            cfg,
            running: std::sync::atomic::AtomicBool::new(false),
            last_error: std::sync::Mutex::new(None),
        }
    }

    /// Starts a roll in the background (it goes on if the caller goes away); `false`
    /// if this process is already rolling.
    pub fn start_roll(self: &Arc<Self>, new_epoch: bool) -> bool {
        use std::sync::atomic::Ordering;
        if self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let out = me.roll(new_epoch, &|_| {}).await;
            let mut last = me.last_error.lock().unwrap_or_else(|p| p.into_inner());
            match out {
                Ok(_) => *last = None,
                Err(e) => {
                    tracing::warn!(error = %e, "key epoch roll stopped; it resumes on the next run");
                    *last = Some(e.to_string());
                }
            }
            me.running.store(false, Ordering::Release);
        });
        true
    }

    /// Whether a roll started by this process is running.
    pub fn rolling_here(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Why this process's last roll failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The worker: every `every`, rolls if one is due (a new epoch when the active one
    /// is older than its length; finishing an unfinished roll otherwise). Replicas
    /// running it together are serialized by the lease.
    pub fn spawn_worker(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match self.roll_due().await {
                    Ok(true) => {
                        self.start_roll(true);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot tell whether a key epoch roll is due")
                    }
                }
            }
        })
    }

    /// The settings in effect.
    pub fn settings(&self) -> &EpochSettings {
        &self.cfg
    }

    /// Epochs, the backup horizon and the roll's progress.
    ///
    /// # Errors
    /// [`crate::Error::Store`].
    pub async fn status(&self) -> Result<EpochStatus> {
        let epochs = self.store.epochs().await?;
        let lease: RollLease = self.store.roll_lease().await?;
        let active = epochs.iter().find(|e| e.state == EpochState::Active);
        // Unbounded before the first roll, and while the legacy key (epoch 0) is kept:
        // backups from before epochs need only it.
        let legacy_open = epochs.iter().any(|e| e.epoch == 0 && e.opens_backups());
        let horizon = if epochs.is_empty() || legacy_open {
            None
        } else {
            epochs
                .iter()
                .filter(|e| e.opens_backups())
                .map(|e| e.created_at)
                .min()
        };
        let length_ms = i64::try_from(self.cfg.length.as_millis()).unwrap_or(i64::MAX);
        let due = active.map(|a| a.created_at.saturating_add(length_ms));
        let unfinished = epochs
            .iter()
            .any(|e| matches!(e.state, EpochState::Creating | EpochState::Retiring));
        let overdue = due.is_some_and(|d| now_ms() > d.saturating_add(86_400_000))
            || (unfinished
                && lease.updated_at > 0
                && now_ms() > lease.updated_at.saturating_add(86_400_000));
        Ok(EpochStatus {
            active: active.map(|a| a.epoch),
            restorable_backups_since_unix_ms: horizon,
            next_roll_due_unix_ms: due,
            roll_overdue: overdue,
            roll_owner: lease
                .owner
                .filter(|_| lease.lease_until.is_some_and(|u| u > now_ms())),
            rolling_to: lease.target.filter(|_| unfinished),
            rolling_here: self.rolling_here(),
            last_error: self.last_error(),
            progress: lease.progress,
            epochs: {
                let mut views = Vec::with_capacity(epochs.len());
                for record in epochs {
                    let seal_statement = if record.state == EpochState::Sealed {
                        self.store.epoch_seal(record.epoch).await?
                    } else {
                        None
                    };
                    views.push(EpochView {
                        opens_backups: record.opens_backups(),
                        seal_statement,
                        record,
                    });
                }
                views
            },
        })
    }

    /// Whether a roll is due: no epoch yet, an unfinished roll, or the active epoch
    /// older than the configured length.
    ///
    /// # Errors
    /// [`crate::Error::Store`].
    pub async fn roll_due(&self) -> Result<bool> {
        let epochs = self.store.epochs().await?;
        let length_ms = i64::try_from(self.cfg.length.as_millis()).unwrap_or(i64::MAX);
        Ok(
            match epochs.iter().find(|e| e.state == EpochState::Active) {
                None => true,
                Some(a) => {
                    epochs
                        .iter()
                        .any(|e| matches!(e.state, EpochState::Creating | EpochState::Retiring))
                        || now_ms() >= a.created_at.saturating_add(length_ms)
                }
            },
        )
    }

    /// The statement of a sealed epoch (signed JSON), if any.
    ///
    /// # Errors
    /// [`crate::Error::Store`].
    pub async fn seal_statement(&self, epoch: u64) -> Result<Option<String>> {
        Ok(self.store.epoch_seal(epoch).await?)
    }
}
