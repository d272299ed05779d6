//! `fieldkey report`: the compliance evidence report, read offline from a key store
//! (configured like `serve`), or fetched from a sidecar (`--remote`, the auditor's
//! `Audit.GetComplianceReport`).

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Args, ValueEnum};

use super::client::{CliError, connect};
use super::{KeyArgs, Target};
use crate::model::now_ms;
use crate::proto::pb::{self, audit_client::AuditClient};
use crate::report::{self, Configuration};

/// Output format.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Format {
    /// JSON (docs/compliance-report.schema.json).
    #[default]
    Json,
    /// One self-contained HTML page.
    Html,
}

#[derive(Args, Debug)]
pub(super) struct ReportArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// Ask a running sidecar (Audit.GetComplianceReport) instead of reading the key store.
    #[arg(long)]
    remote: bool,
    #[command(flatten)]
    target: Target,
    /// Only this tenant.
    #[arg(long, short = 't')]
    tenant: Option<String>,
    /// Period start: a date (2026-01-01, UTC midnight) or an RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Period end (exclusive): a date or an RFC 3339 time.
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Authorization policy directory in force (default: the configuration's
    /// `authz.policies`); its files and digest are reported.
    #[arg(long, env = "FIELDKEY_POLICIES")]
    policies: Option<PathBuf>,
    /// Pin the public key(s) that verify audit checkpoints (PEM file, hex or base64);
    /// default: `[audit] checkpoint_public_keys` of the configuration, else those
    /// recorded in the key store (and then the audit promise is never met).
    #[arg(long = "audit-public-key")]
    audit_public_keys: Vec<String>,
    /// Pin the public key(s) that verify erasure receipts; default: `[audit]
    /// receipt_public_keys` of the configuration, else those recorded in the key store
    /// (and then the erasure promise is never met).
    #[arg(long = "receipt-public-key")]
    receipt_public_keys: Vec<String>,
    /// Exit with status 4 when a promise is not met or an integrity check failed.
    #[arg(long)]
    strict: bool,
}

/// A date (`YYYY-MM-DD`, UTC midnight) or an RFC 3339 time, as Unix ms.
fn parse_time(s: &str) -> Result<i64, String> {
    use time::format_description::well_known::Rfc3339;
    let bad = || {
        format!("{s:?}: expected a date (2026-01-31) or an RFC 3339 time (2026-01-31T12:00:00Z)")
    };
    let t = if s.len() == 10 {
        time::OffsetDateTime::parse(&format!("{s}T00:00:00Z"), &Rfc3339).map_err(|_| bad())?
    } else {
        time::OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?
    };
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| bad())
}

fn write_out(out: Option<&PathBuf>, body: &str) -> Result<(), CliError> {
    match out {
        Some(p) => std::fs::write(p, body)
            .map_err(|e| CliError::Other(anyhow!("cannot write {}: {e}", p.display()))),
        None => {
            print!("{body}");
            Ok(())
        }
    }
}

fn verdict_line(all_met: bool, verdict: &str, out: Option<&PathBuf>) {
    let to = out
        .map(|p| format!(" ({})", p.display()))
        .unwrap_or_default();
    if all_met {
        eprintln!("report{to}: all promises met (worst verdict: {verdict})");
    } else {
        eprintln!("report{to}: NOT ALL PROMISES MET (see the summary at the top)");
    }
}

fn refuse_if_strict(strict: bool, all_met: bool) -> Result<(), CliError> {
    if strict && !all_met {
        return Err(CliError::Status(tonic::Status::failed_precondition(
            "a promise is not met or an integrity check failed",
        )));
    }
    Ok(())
}

pub(super) async fn report(a: ReportArgs) -> Result<(), CliError> {
    let (since, until) = (a.since, a.until);
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        // A usage error, like any other bad argument (exit 2).
        <super::Cli as clap::CommandFactory>::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "the period is empty: --since must be before --until",
            )
            .exit();
    }
    if a.remote {
        // A report of many tenants is a few MiB: more than tonic's 4 MiB default.
        let mut c =
            AuditClient::new(connect(&a.target.addr).await?).max_decoding_message_size(256 << 20);
        let r = c
            .get_compliance_report(pb::ComplianceReportRequest {
                tenant_id: a.tenant.clone().unwrap_or_default(),
                since_unix_ms: since.unwrap_or(0),
                until_unix_ms: until.unwrap_or(0),
                format: match a.format {
                    Format::Json => pb::ReportFormat::Json,
                    Format::Html => pb::ReportFormat::Html,
                } as i32,
            })
            .await?
            .into_inner();
        write_out(a.out.as_ref(), &r.body)?;
        verdict_line(r.all_met, &r.verdict, a.out.as_ref());
        return refuse_if_strict(a.strict, r.all_met);
    }

    let cfg = super::serve::key_config(&a.keys).map_err(CliError::Other)?;
    let rotation = super::serve::rotation_policy(&cfg).map_err(CliError::Other)?;
    let policies = a.policies.clone().or_else(|| cfg.authz.policies.clone());
    let authz = policies.map(|dir| {
        crate::policy::authz::Authorizer::load(&dir)
            .map(|az| az.status())
            .map_err(|e| e.to_string())
    });
    let configuration = Configuration::from_config(&cfg, &rotation, authz);
    // A mistyped path must not become a fresh, empty store that reports "all met".
    if cfg.store.postgres_url.is_none() && !cfg.sqlite_path().is_file() {
        return Err(CliError::Status(tonic::Status::not_found(format!(
            "no key store at {} (check --config / --data-dir)",
            cfg.sqlite_path().display()
        ))));
    }
    let store = super::serve::open_store(&cfg)
        .await
        .map_err(CliError::Other)?;
    let pinned = |keys: &[String]| -> Result<_, CliError> {
        if keys.is_empty() {
            Ok(None)
        } else {
            super::audit::read_keys(keys).map(Some)
        }
    };
    // Keys given on the command line, else the configuration's trust anchors.
    let anchors = super::serve::trust_anchors(&cfg).map_err(CliError::Other)?;
    let opts = report::Options {
        tenant: a.tenant.clone(),
        since_ms: since,
        until_ms: until,
        now_ms: now_ms(),
        audit_keys: pinned(&a.audit_public_keys)?.or(anchors.audit),
        receipt_keys: pinned(&a.receipt_public_keys)?.or(anchors.receipts),
    };
    let built = report::build(store.as_ref(), configuration, &rotation, &opts)
        .await
        .map_err(|e| CliError::Status(crate::service::status::to_status(&e)))?;
    let body = match a.format {
        Format::Json => serde_json::to_string_pretty(&built)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| CliError::Other(e.into()))?,
        Format::Html => report::html::render(&built),
    };
    write_out(a.out.as_ref(), &body)?;
    verdict_line(
        built.summary.all_met,
        built.summary.verdict.as_str(),
        a.out.as_ref(),
    );
    refuse_if_strict(a.strict, built.summary.all_met)
}
