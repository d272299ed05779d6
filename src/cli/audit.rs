//! `fieldkey audit ...`: export the audit log, verify a store or an export offline.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Subcommand;
use ed25519_dalek::VerifyingKey;

use super::client::{CliError, connect};
use super::{KeyArgs, Target};
use crate::audit::verify::{Summary, verify_export};
use crate::erasure::receipt::{self, rfc3339_ms};
use crate::proto::pb::{self, audit_client::AuditClient};

#[derive(Subcommand, Debug)]
pub(super) enum AuditCommand {
    /// Export the audit log as JSON lines (ending with a signed trailer).
    Export {
        #[command(flatten)]
        target: Target,
        /// First record.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the checkpoint public key (PEM) and the chain head.
    PublicKey {
        #[command(flatten)]
        target: Target,
        /// Write the PEM here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify offline: an export file (--export), or the key store itself (configured
    /// like `serve`). Reports the first bad record; exits 0 if intact, 4 if not.
    Verify {
        /// An export file (JSON lines); without it, the configured key store.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Public key(s) of the checkpoint signing key (PEM file, hex or base64); repeat
        /// for keys rotated over the log's life.
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<String>,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

fn invalid(e: impl std::fmt::Display) -> CliError {
    CliError::Status(tonic::Status::failed_precondition(format!(
        "audit log INVALID: {e}"
    )))
}

pub(super) fn read_keys(given: &[String]) -> Result<Vec<VerifyingKey>, CliError> {
    given
        .iter()
        .map(|k| {
            let text = if std::path::Path::new(k).is_file() {
                std::fs::read_to_string(k)
                    .map_err(|e| CliError::Other(anyhow!("cannot read {k}: {e}")))?
            } else {
                k.clone()
            };
            receipt::parse_public_key(&text)
                .map_err(|e| CliError::Status(tonic::Status::invalid_argument(e.to_string())))
        })
        .collect()
}

fn report(s: &Summary, what: &str) {
    println!(
        "audit log OK ({what}): records {}..={} ({} records), {} signed checkpoint(s)",
        s.first_seq.unwrap_or(0),
        s.last_seq,
        s.records,
        s.checkpoints
    );
    match s.last_checkpoint {
        Some((seq, ts)) => {
            println!("  last checkpoint: record {seq} at {}", rfc3339_ms(ts));
            if s.last_seq > seq {
                println!(
                    "  {} record(s) after it are chained but not yet covered by a checkpoint",
                    s.last_seq - seq
                );
            }
        }
        None => println!("  no checkpoint yet"),
    }
}

async fn verify_store(keys: &KeyArgs, vks: Vec<VerifyingKey>) -> Result<(), CliError> {
    let cfg = super::serve::key_config(keys).map_err(CliError::Other)?;
    let store = super::serve::open_store(&cfg)
        .await
        .map_err(CliError::Other)?;
    let s = crate::audit::verify::verify_store(store.as_ref(), vks, |_| {})
        .await
        .map_err(|e| CliError::Other(e.into()))?
        .map_err(invalid)?;
    report(&s, "key store");
    Ok(())
}

pub(super) async fn audit(cmd: AuditCommand) -> Result<(), CliError> {
    match cmd {
        AuditCommand::Export { target, from, out } => {
            let mut c = AuditClient::new(connect(&target.addr).await?);
            let mut stream = c
                .export_audit(pb::ExportAuditRequest { from_seq: from })
                .await?
                .into_inner();
            let mut text = String::new();
            while let Some(line) = stream.message().await? {
                text.push_str(&line.line);
                text.push('\n');
            }
            match out {
                Some(p) => std::fs::write(&p, text)
                    .map_err(|e| CliError::Other(anyhow!("cannot write {}: {e}", p.display()))),
                None => {
                    print!("{text}");
                    Ok(())
                }
            }
        }
        AuditCommand::PublicKey { target, out } => {
            let mut c = AuditClient::new(connect(&target.addr).await?);
            let h = c
                .get_audit_head(pb::GetAuditHeadRequest {})
                .await?
                .into_inner();
            match out {
                Some(p) => {
                    std::fs::write(&p, &h.public_key_pem).map_err(|e| {
                        CliError::Other(anyhow!("cannot write {}: {e}", p.display()))
                    })?;
                    println!(
                        "{} written to {}; chain head {} ({})",
                        h.key_id,
                        p.display(),
                        h.seq,
                        h.hash
                    );
                }
                None => print!("{}", h.public_key_pem),
            }
            Ok(())
        }
        AuditCommand::Verify {
            export,
            public_keys,
            keys,
        } => {
            let vks = read_keys(&public_keys)?;
            match export {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        CliError::Other(anyhow!("cannot read {}: {e}", path.display()))
                    })?;
                    let s = verify_export(&text, vks).map_err(invalid)?;
                    report(&s, "export");
                    Ok(())
                }
                None => verify_store(&keys, vks).await,
            }
        }
    }
}
