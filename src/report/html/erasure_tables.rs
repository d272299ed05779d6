//! The erasure requests (live keys destroyed, key-store backups sealed) and the key
//! epochs with the backup horizon, as HTML tables.

use std::fmt::Write as _;

use super::super::{ErasureStatus, Report};
use super::{badge, esc, opt, section_table, table_head};

/// The columns of the erasure table.
const ERASURE_COLUMNS: &str = "Request|Tenant / subject|Requested|Scheduled for|Live keys destroyed|Days|Backups sealed|Status|Receipt";

/// The columns of the key epoch table.
const EPOCH_COLUMNS: &str = "Epoch|KMS key|State|Active from|Rolled|Deletion scheduled|Key deleted on|Opens backups|Backups sealed statement";

/// The kebab-case form of a status (as in the JSON).
fn status_text<T: serde::Serialize>(s: &T) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(super) fn erasures(h: &mut String, r: &Report) {
    let rows = r.erasures.len();
    if !section_table(h, "erasures", "Erasure requests", rows, ERASURE_COLUMNS) {
        return;
    }
    for e in &r.erasures {
        // `problem` says why the evidence fails, or (on-time) why the backups are late.
        let evidence_problem = e
            .problem
            .as_ref()
            .filter(|_| e.status != ErasureStatus::OnTime);
        let receipt = match (&e.receipt, evidence_problem) {
            (_, Some(p)) => format!("<b style=\"color:var(--bad)\">FAILED: {}</b>", esc(p)),
            (None, None) => "—".to_owned(),
            (Some(c), None) if c.verified && c.chained => format!(
                "verified, signed by <span class=\"mono\">{}</span>, audit record {}; {} key(s) destroyed",
                opt(c.signing_key_id.as_deref()),
                c.audit_seq
                    .map_or_else(|| "—".to_owned(), |s| s.to_string()),
                c.keys_destroyed
            ),
            (Some(c), None) => format!(
                "<b style=\"color:var(--bad)\">FAILED: {}</b>",
                opt(c.error.as_deref())
            ),
        };
        let sealed = match (e.backup_epoch, &e.backups_sealed_at, e.backups_days) {
            (None, _, _) => "—".to_owned(),
            (Some(ep), Some(at), Some(d)) => {
                format!("{} ({d:.1} d; keys of epochs ≤ {ep})", esc(at))
            }
            (Some(ep), _, _) => format!("not yet (epoch {ep} or older opens them)"),
        };
        let backups = e
            .backups_status
            .map(|b| format!(", backups {}", status_text(&b)))
            .unwrap_or_default();
        let late_backups = e
            .problem
            .as_deref()
            .filter(|_| e.status == ErasureStatus::OnTime)
            .map(|p| format!("<br><b style=\"color:var(--bad)\">{}</b>", esc(p)))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr data-erasure=\"{}\"><td class=\"mono\">{}</td><td>{}{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td class=\"num\">{:.1}</td><td>{}{}</td><td>{} {}{}</td><td>{}</td></tr>",
            esc(&e.erasure_id),
            esc(&e.erasure_id),
            esc(&e.tenant_id),
            e.subject_id
                .as_deref()
                .map(|s| format!(" / {}", esc(s)))
                .unwrap_or_default(),
            esc(&e.requested_at),
            esc(&e.scheduled_for),
            opt(e
                .completed_at
                .as_deref()
                .or(e.cancelled_at.as_deref().map(|_| "cancelled"))),
            e.days,
            sealed,
            late_backups,
            badge(e.verdict),
            esc(&status_text(&e.status)),
            esc(&backups),
            receipt
        );
    }
    h.push_str("</table>\n");
}

pub(super) fn backups(h: &mut String, r: &Report) {
    let b = &r.backups;
    let _ = write!(
        h,
        "<h2 id=\"backups\">Key-store backups</h2><p>Backup horizon: {}.{}</p>",
        esc(&b.finding),
        b.active_epoch
            .map(|a| format!(" Active key epoch: {a}."))
            .unwrap_or_default()
    );
    if b.epochs.is_empty() {
        return;
    }
    table_head(h, EPOCH_COLUMNS);
    for e in &b.epochs {
        let statement = match (e.seal_verified, &e.seal_error) {
            (None, _) => "—".to_owned(),
            (Some(true), _) => "verified, chained into the audit log".to_owned(),
            (Some(false), err) => format!(
                "<b style=\"color:var(--bad)\">FAILED: {}</b>",
                opt(err.as_deref())
            ),
        };
        let _ = write!(
            h,
            "<tr data-epoch=\"{}\"><td class=\"num\">{}</td><td class=\"mono\">{}</td><td>{}{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e.epoch,
            e.epoch,
            opt(e.kms_key_id.as_deref()),
            esc(&e.state),
            e.kms_status
                .as_deref()
                .map(|s| format!(" ({})", esc(s)))
                .unwrap_or_default(),
            esc(&e.created_at),
            opt(e.rolled_at.as_deref()),
            opt(e.sealed_at.as_deref()),
            opt(e.deletion_date.as_deref()),
            if e.opens_backups { "yes" } else { "no" },
            statement
        );
    }
    h.push_str("</table>\n");
}
