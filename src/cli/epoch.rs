//! `fieldkey epoch`: roll the key store to a new key epoch on a running sidecar, show
//! the epochs and the backup horizon, and verify a "backups sealed" statement offline.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Subcommand;

use super::Target;
use super::client::{CliError, connect};
use crate::erasure::receipt;
use crate::proto::pb::{self, keys_client::KeysClient};

/// Key epochs (docs/ERASURE.md §6).
#[derive(Subcommand, Debug)]
pub(super) enum EpochCommand {
    /// Roll to a new key epoch on a running sidecar and follow it to the end (a
    /// progress bar; --json prints the final status). Resumable: after an interruption
    /// run it again (or with --finish-only, which starts no new epoch).
    Roll {
        #[command(flatten)]
        target: Target,
        /// Only finish an unfinished roll.
        #[arg(long)]
        finish_only: bool,
        /// Return once the roll has started.
        #[arg(long)]
        no_wait: bool,
        /// Print the final status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The epochs, their KMS keys and states, and the restorable backup horizon.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Write each sealed epoch's signed statement to DIR/epoch-<n>.seal.json.
        #[arg(long, value_name = "DIR")]
        seals_out: Option<PathBuf>,
    },
    /// Verify a signed "backups sealed" statement offline (exit 4 if altered).
    VerifySeal {
        /// The statement file (JSON).
        file: PathBuf,
        /// The receipts' public key (PEM file or text; `fieldkey erasure public-key`).
        #[arg(long)]
        public_key: String,
    },
}

fn ms(v: i64) -> String {
    crate::model::rfc3339_ms(v)
}

fn print_status(st: &pb::EpochStatus, json: bool) -> Result<(), CliError> {
    if json {
        println!("{}", st.status_json);
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&st.status_json)
        .map_err(|e| CliError::Other(anyhow!("bad status from the sidecar: {e}")))?;
    match st.active_epoch {
        0 => println!("no key epoch yet: the first roll starts them"),
        e => println!("active epoch {e}"),
    }
    if let Some(epochs) = v.get("epochs").and_then(|e| e.as_array()) {
        for e in epochs {
            let n = e
                .get("epoch")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            let state = e.get("state").and_then(|s| s.as_str()).unwrap_or("?");
            let key = e.get("kms_key_id").and_then(|s| s.as_str()).unwrap_or("-");
            let created = e
                .get("created_at")
                .and_then(serde_json::Value::as_i64)
                .map(ms);
            let deletion = e
                .get("deletion_date")
                .and_then(serde_json::Value::as_i64)
                .map(|d| format!(", KMS deletion {}", ms(d)))
                .unwrap_or_default();
            let opens = if e.get("opens_backups").and_then(serde_json::Value::as_bool) == Some(true)
            {
                "opens backups"
            } else {
                "sealed"
            };
            println!(
                "  epoch {n:>3}  {state:<9} {opens:<13} since {}  {key}{deletion}",
                created.unwrap_or_default()
            );
        }
    }
    match st.restorable_backups_since_unix_ms {
        0 => println!(
            "restorable key-store backups: all (no epoch yet, or the legacy key is kept: epochs.retire_legacy_key)"
        ),
        t => println!("restorable key-store backups: those taken since {}", ms(t)),
    }
    if st.roll_overdue {
        println!("WARNING: a roll is overdue or unfinished");
    }
    if !st.last_error.is_empty() {
        println!("last roll stopped: {}", st.last_error);
    }
    Ok(())
}

fn write_seals(st: &pb::EpochStatus, dir: &std::path::Path) -> Result<(), CliError> {
    let v: serde_json::Value = serde_json::from_str(&st.status_json)
        .map_err(|e| CliError::Other(anyhow!("bad status from the sidecar: {e}")))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Other(anyhow!("cannot create {}: {e}", dir.display())))?;
    for e in v
        .get("epochs")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
    {
        if let (Some(n), Some(text)) = (
            e.get("epoch").and_then(serde_json::Value::as_u64),
            e.get("seal_statement").and_then(|t| t.as_str()),
        ) {
            let path = dir.join(format!("epoch-{n}.seal.json"));
            std::fs::write(&path, text).map_err(|err| {
                CliError::Other(anyhow!("cannot write {}: {err}", path.display()))
            })?;
            eprintln!("seal of epoch {n} written to {}", path.display());
        }
    }
    Ok(())
}

pub(super) async fn epoch(cmd: EpochCommand) -> Result<(), CliError> {
    match cmd {
        EpochCommand::Status {
            target,
            json,
            seals_out,
        } => {
            let st = KeysClient::new(connect(&target.addr).await?)
                .get_epoch_status(pb::GetEpochStatusRequest {})
                .await?
                .into_inner();
            if let Some(dir) = seals_out {
                write_seals(&st, &dir)?;
            }
            print_status(&st, json)
        }
        EpochCommand::Roll {
            target,
            finish_only,
            no_wait,
            json,
        } => {
            let mut c = KeysClient::new(connect(&target.addr).await?);
            let mut st = c
                .roll_epoch(pb::RollEpochRequest { finish_only })
                .await?
                .into_inner();
            if !no_wait {
                let bar = (!json).then(|| {
                    let b = indicatif::ProgressBar::new(0);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{spinner} {msg} [{bar:30}] {pos}/{len} tenants",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    b
                });
                while st.rolling {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    st = c
                        .get_epoch_status(pb::GetEpochStatusRequest {})
                        .await?
                        .into_inner();
                    if let (Some(b), Ok(v)) = (
                        &bar,
                        serde_json::from_str::<serde_json::Value>(&st.status_json),
                    ) {
                        let p = v.get("progress");
                        let num = |k: &str| {
                            p.and_then(|p| p.get(k))
                                .and_then(serde_json::Value::as_u64)
                                .unwrap_or(0)
                        };
                        b.set_length(num("tenants_total"));
                        b.set_position(num("tenants_done"));
                        b.set_message(format!(
                            "{} (subject keys {}, versions {})",
                            p.and_then(|p| p.get("phase"))
                                .and_then(|s| s.as_str())
                                .unwrap_or(""),
                            num("subjects_rewrapped"),
                            num("versions_rewrapped")
                        ));
                    }
                }
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
            }
            print_status(&st, json)?;
            if st.last_error.is_empty() {
                Ok(())
            } else {
                Err(CliError::Status(tonic::Status::aborted(format!(
                    "the roll stopped: {} (run it again to resume)",
                    st.last_error
                ))))
            }
        }
        EpochCommand::VerifySeal { file, public_key } => {
            let key_text = if std::path::Path::new(&public_key).is_file() {
                std::fs::read_to_string(&public_key)
                    .map_err(|e| CliError::Other(anyhow!("cannot read {public_key}: {e}")))?
            } else {
                public_key
            };
            let key = receipt::parse_public_key(&key_text)
                .map_err(|e| CliError::Status(tonic::Status::invalid_argument(e.to_string())))?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Other(anyhow!("cannot read {}: {e}", file.display())))?;
            match crate::epochs::seal::verify(&text, &key) {
                Ok(s) => {
                    println!(
                        "seal OK: epoch {} KMS key {} deletion {} (date {}), {} erasure(s) sealed",
                        s.epoch,
                        s.kms_key_id,
                        s.kms_status,
                        s.deletion_date_unix_ms
                            .map(ms)
                            .unwrap_or_else(|| "-".into()),
                        s.erasures.len()
                    );
                    println!(
                        "  audit record #{} (previous hash {}); signed by {}",
                        s.audit_seq, s.audit_prev_hash, s.signing_key_id
                    );
                    Ok(())
                }
                Err(e) => Err(CliError::Status(tonic::Status::failed_precondition(
                    format!("seal INVALID: {e}"),
                ))),
            }
        }
    }
}
