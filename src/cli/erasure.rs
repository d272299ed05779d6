//! `fieldkey erasure ...`: erasure requests, restriction, receipts (see docs/ERASURE.md).

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Subcommand;

use super::Target;
use super::client::{CliError, connect};
use crate::erasure::receipt;
use crate::proto::pb::{self, erasures_client::ErasuresClient};

#[derive(Subcommand, Debug)]
pub(super) enum ErasureCommand {
    /// Crypto-shred one subject's keys (now, or after a grace period of at most 30 days).
    ShredSubject {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
        /// Subject (user) id.
        subject: String,
        /// Grace period before execution: seconds, or with a unit (90s, 12h, 14d); at most 30d.
        #[arg(long, default_value = "0", value_parser = parse_grace)]
        grace: u32,
        /// Write the signed receipt here once completed.
        #[arg(long)]
        receipt_out: Option<PathBuf>,
    },
    /// Crypto-shred a whole tenant (every key version and subject key; its own KMS key
    /// is scheduled for deletion).
    ShredTenant {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
        /// Grace period before execution: seconds, or with a unit (90s, 12h, 14d); at most 30d.
        #[arg(long, default_value = "0", value_parser = parse_grace)]
        grace: u32,
        /// Write the signed receipt here once completed.
        #[arg(long)]
        receipt_out: Option<PathBuf>,
    },
    /// Cancel a scheduled erasure (before its grace period ends).
    Cancel {
        #[command(flatten)]
        target: Target,
        /// Erasure id.
        erasure: String,
    },
    /// Show one erasure request (and save its receipt with --receipt-out).
    Status {
        #[command(flatten)]
        target: Target,
        /// Erasure id.
        erasure: String,
        /// Write the signed receipt here (if completed).
        #[arg(long)]
        receipt_out: Option<PathBuf>,
    },
    /// List erasure requests.
    List {
        #[command(flatten)]
        target: Target,
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Suspend (restrict processing of) a subject, or a whole tenant without SUBJECT.
    Suspend {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
        /// Subject id (omit for the whole tenant).
        subject: Option<String>,
    },
    /// Lift a suspension.
    Resume {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
        /// Subject id (omit for the whole tenant).
        subject: Option<String>,
    },
    /// Print (or save) the public key that verifies erasure receipts.
    PublicKey {
        #[command(flatten)]
        target: Target,
        /// Write the PEM here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a receipt offline (no sidecar needed). Exits 0 if valid, 4 if not.
    Verify {
        /// Receipt file (JSON).
        receipt: PathBuf,
        /// The public key: a PEM file, or the key itself (PEM, hex or base64).
        #[arg(long)]
        public_key: String,
    },
}

/// Grace period in seconds from `90`, `90s`, `15m`, `12h` or `14d`; at most 30 days.
fn parse_grace(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 3600, 90s, 12h or 14d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} (use s, m, h or d)")),
    };
    let secs = n.saturating_mul(mult);
    if secs > 30 * 86_400 {
        return Err("the grace period may be at most 30 days".into());
    }
    u32::try_from(secs).map_err(|_| "grace period too long".into())
}

fn state_name(s: i32) -> String {
    pb::ErasureState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ERASURE_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn time(ms: i64) -> String {
    if ms == 0 {
        "-".into()
    } else {
        receipt::rfc3339_ms(ms)
    }
}

fn print_erasure(e: &pb::Erasure) {
    let what = if e.subject_id.is_empty() {
        format!("tenant {}", e.tenant_id)
    } else {
        format!("subject {} of tenant {}", e.subject_id, e.tenant_id)
    };
    println!(
        "erasure {}  {}  {}",
        e.erasure_id,
        state_name(e.state),
        what
    );
    println!(
        "  requested {} by {}; executes from {}",
        time(e.requested_at_unix_ms),
        e.requested_by,
        time(e.execute_after_unix_ms)
    );
    if e.completed_at_unix_ms != 0 {
        println!(
            "  completed {} (audit record #{}, {} attempt(s))",
            time(e.completed_at_unix_ms),
            e.audit_seq,
            e.attempts
        );
    }
    if e.cancelled_at_unix_ms != 0 {
        println!(
            "  cancelled {} by {}",
            time(e.cancelled_at_unix_ms),
            e.cancelled_by
        );
    }
    if !e.last_error.is_empty() {
        println!("  last attempt failed: {} (retrying)", e.last_error);
    }
}

fn save_receipt(e: &pb::Erasure, out: Option<&PathBuf>) -> Result<(), CliError> {
    let Some(path) = out else { return Ok(()) };
    if e.receipt.is_empty() {
        return Err(CliError::Other(anyhow!(
            "erasure {} is {}: no receipt yet",
            e.erasure_id,
            state_name(e.state)
        )));
    }
    std::fs::write(path, &e.receipt)
        .map_err(|err| CliError::Other(anyhow!("cannot write {}: {err}", path.display())))?;
    println!("  receipt written to {}", path.display());
    Ok(())
}

fn verify(path: &PathBuf, public_key: &str) -> Result<(), CliError> {
    let key_text = if std::path::Path::new(public_key).is_file() {
        std::fs::read_to_string(public_key)
            .map_err(|e| CliError::Other(anyhow!("cannot read {public_key}: {e}")))?
    } else {
        public_key.to_owned()
    };
    let key = receipt::parse_public_key(&key_text)
        .map_err(|e| CliError::Status(tonic::Status::invalid_argument(e.to_string())))?;
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::Other(anyhow!("cannot read {}: {e}", path.display())))?;
    match receipt::verify(&bytes, &key) {
        Ok(r) => {
            let what = match &r.subject_id {
                Some(s) => format!("subject {s} of tenant {}", r.tenant_id),
                None => format!("tenant {}", r.tenant_id),
            };
            println!("receipt OK: erasure {} of {what}", r.erasure_id);
            println!(
                "  requested {} by {}; executed {} by {}",
                r.requested_at, r.requested_by, r.executed_at, r.executed_by
            );
            for k in &r.destroyed {
                let version = k.version.map(|v| format!(" v{v}")).unwrap_or_default();
                println!(
                    "  destroyed {}{version}  fingerprint {}",
                    k.kind, k.fingerprint
                );
            }
            if r.scope == receipt::SCOPE_TENANT {
                println!(
                    "  subject keys of the tenant, all destroyed: {} (digest {})",
                    r.subject_keys_destroyed,
                    r.subject_keys_digest.as_deref().unwrap_or("-")
                );
            }
            if let Some(k) = &r.kms_key_deletion {
                println!("  KMS key {}: deletion {}", k.kms_key_id, k.status);
            }
            if let Some(b) = &r.backups {
                println!(
                    "  backup copies guarded by key epoch {} (KMS key {}): sealed when its deletion is scheduled (fieldkey epoch verify-seal)",
                    b.epoch, b.kms_key_id
                );
            }
            println!(
                "  audit record #{} (previous hash {}); signed by {}",
                r.audit_seq, r.audit_prev_hash, r.signing_key_id
            );
            Ok(())
        }
        Err(e) => Err(CliError::Status(tonic::Status::failed_precondition(
            format!("receipt INVALID: {e}"),
        ))),
    }
}

pub(super) async fn erasure(cmd: ErasureCommand) -> Result<(), CliError> {
    use ErasureCommand as C;
    match cmd {
        C::ShredSubject {
            target,
            tenant,
            subject,
            grace,
            receipt_out,
        } => {
            let mut c = ErasuresClient::new(connect(&target.addr).await?);
            let e = c
                .shred_subject(pb::ShredSubjectRequest {
                    tenant_id: tenant,
                    subject_id: subject,
                    grace_seconds: grace,
                })
                .await?
                .into_inner();
            print_erasure(&e);
            save_receipt(&e, receipt_out.as_ref())
        }
        C::ShredTenant {
            target,
            tenant,
            grace,
            receipt_out,
        } => {
            let mut c = ErasuresClient::new(connect(&target.addr).await?);
            let e = c
                .shred_tenant(pb::ShredTenantRequest {
                    tenant_id: tenant,
                    grace_seconds: grace,
                })
                .await?
                .into_inner();
            print_erasure(&e);
            save_receipt(&e, receipt_out.as_ref())
        }
        C::Cancel { target, erasure } => {
            let mut c = ErasuresClient::new(connect(&target.addr).await?);
            let e = c
                .cancel_erasure(pb::ErasureIdRequest {
                    erasure_id: erasure,
                })
                .await?
                .into_inner();
            print_erasure(&e);
            Ok(())
        }
        C::Status {
            target,
            erasure,
            receipt_out,
        } => {
            let mut c = ErasuresClient::new(connect(&target.addr).await?);
            let e = c
                .get_erasure(pb::ErasureIdRequest {
                    erasure_id: erasure,
                })
                .await?
                .into_inner();
            print_erasure(&e);
            save_receipt(&e, receipt_out.as_ref())
        }
        C::List { target, tenant } => {
            let mut c = ErasuresClient::new(connect(&target.addr).await?);
            let mut token = String::new();
            loop {
                let page = c
                    .list_erasures(pb::ListErasuresRequest {
                        tenant_id: tenant.clone().unwrap_or_default(),
                        page_token: token,
                        page_size: 0,
                    })
                    .await?
                    .into_inner();
                for e in &page.erasures {
                    print_erasure(e);
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                token = page.next_page_token;
            }
        }
        C::Suspend {
            target,
            tenant,
            subject,
        } => restrict(&target, tenant, subject, true).await,
        C::Resume {
            target,
            tenant,
            subject,
        } => restrict(&target, tenant, subject, false).await,
        C::PublicKey { target, out } => {
            let mut c = ErasuresClient::new(connect(&target.addr).await?);
            let k = c
                .get_receipt_key(pb::GetReceiptKeyRequest {})
                .await?
                .into_inner();
            match out {
                Some(path) => {
                    std::fs::write(&path, &k.public_key_pem).map_err(|e| {
                        CliError::Other(anyhow!("cannot write {}: {e}", path.display()))
                    })?;
                    println!("{} written to {}", k.key_id, path.display());
                }
                None => print!("{}", k.public_key_pem),
            }
            Ok(())
        }
        C::Verify {
            receipt,
            public_key,
        } => verify(&receipt, &public_key),
    }
}

async fn restrict(
    target: &Target,
    tenant: String,
    subject: Option<String>,
    suspend: bool,
) -> Result<(), CliError> {
    let mut c = ErasuresClient::new(connect(&target.addr).await?);
    let req = pb::RestrictionRequest {
        tenant_id: tenant,
        subject_id: subject.unwrap_or_default(),
    };
    let r = if suspend {
        c.suspend_subject(req).await?
    } else {
        c.resume_subject(req).await?
    }
    .into_inner();
    let state = pb::KeyState::try_from(r.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("KEY_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    if r.subject_id.is_empty() {
        println!("tenant {}: {state}", r.tenant_id);
    } else {
        println!(
            "subject {} of tenant {}: {state}",
            r.subject_id, r.tenant_id
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_grace;

    #[test]
    fn grace_periods_parse_with_units_and_stop_at_30_days() {
        assert_eq!(parse_grace("0").unwrap(), 0);
        assert_eq!(parse_grace("90").unwrap(), 90);
        assert_eq!(parse_grace("15m").unwrap(), 900);
        assert_eq!(parse_grace("12h").unwrap(), 43_200);
        assert_eq!(parse_grace("30d").unwrap(), 2_592_000);
        assert!(parse_grace("31d").is_err());
        assert!(parse_grace("2w").is_err());
        assert!(parse_grace("x").is_err());
    }
}
