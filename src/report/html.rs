//! The compliance report as one self-contained HTML page (no script, no external
//! resource): a summary at the top, charts as inline SVG, then the detail. Prints on A4.
//!
//! Must not: add anything that is not in the [`Report`] (the page shows exactly what the
//! JSON holds), or emit any text unescaped.

mod erasure_tables;

use std::fmt::Write as _;

use super::{ErasureStatus, Report, Verdict};
use erasure_tables::{backups, erasures};

/// The columns of the job table.
const JOB_COLUMNS: &str =
    "Job|Table|Tenant|State|Created|Finished|Rows read|Moved|Shredded|Failed|Left on old versions";

/// Most bars in one chart (the oldest keys, the longest erasures); the tables list all.
const MAX_BARS: usize = 40;

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn badge(v: Verdict) -> String {
    let label = match v {
        Verdict::Met => "MET",
        Verdict::Attention => "ATTENTION",
        Verdict::NotMet => "NOT MET",
        Verdict::NotApplicable => "N/A",
    };
    format!(r#"<span class="badge {}">{label}</span>"#, v.as_str())
}

fn opt(s: Option<&str>) -> String {
    s.map_or_else(|| "—".to_owned(), esc)
}

/// Opens a table whose header row names `columns` (separated by `|`).
fn table_head(h: &mut String, columns: &str) {
    h.push_str("<table><tr>");
    for c in columns.split('|') {
        let _ = write!(h, "<th>{c}</th>");
    }
    h.push_str("</tr>");
}

/// Opens the section `id` titled `title` (a plural noun, as "Erasure requests") on a
/// table of `columns` (separated by `|`); a section of no `rows` says so ("No erasure
/// request in the period.") instead, and `false` is returned.
fn section_table(h: &mut String, id: &str, title: &str, rows: usize, columns: &str) -> bool {
    let _ = write!(h, "<h2 id=\"{id}\">{title}</h2>");
    if rows == 0 {
        let mut noun = title.strip_suffix('s').unwrap_or(title).chars();
        let first = noun.next().map(|c| c.to_ascii_lowercase());
        let _ = write!(
            h,
            "<p>No {}{} in the period.</p>",
            first.map(String::from).unwrap_or_default(),
            noun.as_str()
        );
        return false;
    }
    table_head(h, columns);
    true
}

const STYLE: &str = r#"
:root { --ok:#1b7f3b; --warn:#a86400; --bad:#b3261e; --na:#666; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:#1f2328; margin: 0 auto; max-width: 1100px; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.meta { color: #57606a; margin-bottom: 16px; }
.verdict { border-radius: 8px; padding: 14px 18px; margin: 12px 0; font-size: 18px; font-weight: 600; }
.verdict.met, .verdict.not-applicable { background: #e6f4ea; border: 2px solid var(--ok); color: var(--ok); }
.verdict.attention { background: #fff4e0; border: 2px solid var(--warn); color: var(--warn); }
.verdict.not-met { background: #fdecea; border: 2px solid var(--bad); color: var(--bad); }
.alerts { background: #fdecea; border: 2px solid var(--bad); border-radius: 8px; padding: 10px 18px; margin: 12px 0; }
.alerts h2 { color: var(--bad); border: 0; margin: 4px 0; }
.alerts li { color: var(--bad); font-weight: 600; margin: 4px 0; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; word-break: break-all; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 700; color: #fff; white-space: nowrap; }
.badge.met { background: var(--ok); } .badge.attention { background: var(--warn); }
.badge.not-met { background: var(--bad); } .badge.not-applicable { background: var(--na); }
ul.findings { margin: 0; padding-left: 18px; }
.chart { margin: 8px 0 16px; }
.chart text { font-size: 11px; font-family: system-ui, sans-serif; }
.legend { color: #57606a; font-size: 12px; }
.section-ref { color: #57606a; font-size: 12px; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  h2 { break-after: avoid; } table, .chart, .verdict, .alerts { break-inside: avoid; }
  @page { size: A4; margin: 14mm; }
}
"#;

/// Renders `r` as a complete HTML document.
pub fn render(r: &Report) -> String {
    let mut h = String::with_capacity(32 * 1024);
    let title = match &r.tenant_filter {
        Some(t) => format!("fieldkey compliance report — tenant {t}"),
        None => "fieldkey compliance report".to_owned(),
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"generator\" content=\"{}\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(&r.format),
        esc(&title)
    );
    let period = match (&r.period.since, &r.period.until) {
        (None, None) => "all time".to_owned(),
        (s, u) => format!(
            "{} to {}",
            s.as_deref().unwrap_or("the beginning"),
            u.as_deref().unwrap_or("now")
        ),
    };
    let _ = writeln!(
        h,
        "<h1>{}</h1><div class=\"meta\">Generated {} · period: {} · key store: {} · KMS: {}</div>",
        esc(&title),
        esc(&r.generated_at),
        esc(&period),
        esc(&r.configuration.key_store),
        esc(&r.configuration.kms.provider)
    );

    // Summary: the verdict, then the alerts, then the promises.
    let s = &r.summary;
    let headline = if s.all_met {
        match s.verdict {
            Verdict::Attention => "All promises met — some items need attention",
            _ => "All promises met",
        }
        .to_owned()
    } else {
        let n = s
            .promises
            .iter()
            .filter(|p| p.verdict == Verdict::NotMet)
            .count();
        format!("NOT ALL PROMISES MET: {n} promise(s) not met")
    };
    let class = if s.all_met {
        s.verdict.as_str()
    } else {
        Verdict::NotMet.as_str()
    };
    let _ = writeln!(
        h,
        "<div id=\"summary\" class=\"verdict {class}\">{}</div>",
        esc(&headline)
    );
    if !s.alerts.is_empty() {
        h.push_str("<div id=\"alerts\" class=\"alerts\"><h2>Alerts</h2><ul>");
        for a in &s.alerts {
            let _ = write!(h, "<li>{}</li>", esc(a));
        }
        h.push_str("</ul></div>\n");
    }
    h.push_str(
        "<h2>Promises</h2><table id=\"promises\"><tr><th>Promise</th><th>Verdict</th>\
         <th>Evidence</th><th>Section</th></tr>",
    );
    for p in &s.promises {
        let _ = write!(
            h,
            "<tr data-promise=\"{}\"><td>{}</td><td>{}</td><td><ul class=\"findings\">",
            esc(p.id.as_str()),
            esc(&p.promise),
            badge(p.verdict)
        );
        for f in &p.findings {
            let _ = write!(h, "<li>{}</li>", esc(f));
        }
        let _ = write!(
            h,
            "</ul></td><td class=\"section-ref\"><a href=\"#{0}\">{0}</a></td></tr>",
            esc(&p.section)
        );
    }
    h.push_str("</table>\n");

    key_age_chart(&mut h, r);
    erasure_chart(&mut h, r);
    configuration(&mut h, r);
    audit(&mut h, r);
    tenants(&mut h, r);
    erasures(&mut h, r);
    backups(&mut h, r);
    jobs(&mut h, r);
    h.push_str(
        "<p class=\"legend\">Ids and times only: this report holds no key material and no \
         personal data beyond identifiers. Machine-readable form: <code>fieldkey report \
         --format json</code> (docs/COMPLIANCE.md).</p></body></html>\n",
    );
    h
}

/// Horizontal bars: one per tenant with an active key, its age against the limit.
fn key_age_chart(h: &mut String, r: &Report) {
    let max_days = f64::from(r.configuration.rotation_policy.max_key_age_days);
    let warn_from = max_days - f64::from(r.configuration.rotation_policy.warn_days);
    let color = |d: f64| {
        if d >= max_days {
            "#b3261e"
        } else if d >= warn_from {
            "#a86400"
        } else {
            "#1b7f3b"
        }
    };
    let rows: Vec<(&str, f64, &str)> = r
        .tenants
        .iter()
        .filter_map(|t| {
            t.rotation
                .age_days
                .map(|a| (t.tenant_id.as_str(), a, color(a)))
        })
        .collect();
    let legend = format!(
        "Age of each tenant's active key version, days; the red line is the \
         {max_days:.0}-day limit, amber from {warn_from:.0} days."
    );
    let chart = Chart {
        id: "chart-key-ages",
        title: "Key ages against the rotation limit",
        longest: "oldest",
        limit: max_days,
    };
    chart.render(h, &legend, rows);
}

/// Horizontal bars: one per erasure, days from request to its backups sealed (or to the
/// destruction of its live keys while they are not, or to now while open).
fn erasure_chart(h: &mut String, r: &Report) {
    let who: Vec<String> = r
        .erasures
        .iter()
        .map(|e| match &e.subject_id {
            Some(s) => format!("{}/{s}", e.tenant_id),
            None => e.tenant_id.clone(),
        })
        .collect();
    let rows: Vec<(&str, f64, &str)> = r
        .erasures
        .iter()
        .zip(&who)
        .filter(|(e, _)| e.status != ErasureStatus::Cancelled)
        .map(|(e, w)| {
            let c = match e.verdict {
                Verdict::Met => "#1b7f3b",
                Verdict::Attention => "#a86400",
                _ => "#b3261e",
            };
            (w.as_str(), e.backups_days.unwrap_or(e.days), c)
        })
        .collect();
    let chart = Chart {
        id: "chart-erasures",
        title: "Erasure times against 30 days",
        longest: "longest",
        limit: 30.0,
    };
    let legend = "Days from request to key-store backups sealed (backups not yet sealed: to \
                  the destruction of the live keys; open requests: to now); green met, amber \
                  pending; the red line is the 30-day limit.";
    chart.render(h, legend, rows);
}

/// A chart section of horizontal bars.
struct Chart {
    /// The SVG's id.
    id: &'static str,
    /// Its heading.
    title: &'static str,
    /// How the legend calls the bars shown when some are left out (`oldest`).
    longest: &'static str,
    /// Where the limit line stands, days.
    limit: f64,
}

impl Chart {
    /// The heading, `legend`, and the longest [`MAX_BARS`] of `rows` (label, days,
    /// color), longest first; nothing when there is no row.
    fn render(&self, h: &mut String, legend: &str, mut rows: Vec<(&str, f64, &str)>) {
        if rows.is_empty() {
            return;
        }
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shown = rows.len().min(MAX_BARS);
        let _ = write!(
            h,
            "<h2>{}</h2><div class=\"legend\">{legend}{}</div>",
            self.title,
            if rows.len() > shown {
                format!(" The {shown} {} of {} shown.", self.longest, rows.len())
            } else {
                String::new()
            }
        );
        rows.truncate(shown);
        bars(h, self.id, &rows, self.limit);
    }
}

/// An SVG bar chart with a limit line at `limit`.
fn bars(h: &mut String, id: &str, rows: &[(&str, f64, &str)], limit: f64) {
    let (label_w, plot_w, bar_h, gap) = (220.0_f64, 620.0_f64, 16.0_f64, 6.0_f64);
    let n = rows.len();
    let top = 8.0;
    #[allow(clippy::cast_precision_loss, reason = "at most MAX_BARS rows")]
    let height = top + n as f64 * (bar_h + gap) + 24.0;
    let scale_max = rows
        .iter()
        .map(|&(_, v, _)| v)
        .fold(limit * 1.1, f64::max)
        .max(1.0);
    let x = |v: f64| label_w + v.max(0.0) / scale_max * plot_w;
    let width = label_w + plot_w + 70.0;
    let _ = write!(
        h,
        "<div class=\"chart\"><svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" \
         role=\"img\">"
    );
    for (i, &(label, v, color)) in rows.iter().enumerate() {
        #[allow(clippy::cast_precision_loss, reason = "at most MAX_BARS rows")]
        let y = top + i as f64 * (bar_h + gap);
        let shown = if label.chars().count() > 32 {
            format!("{}…", label.chars().take(31).collect::<String>())
        } else {
            label.to_owned()
        };
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{label_w:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bar_h:.1}\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{v:.1} d</text>",
            label_w - 6.0,
            y + bar_h - 4.0,
            esc(&shown),
            (x(v) - label_w).max(1.0),
            color,
            x(v) + 4.0,
            y + bar_h - 4.0
        );
    }
    let lx = x(limit);
    let bottom = height - 20.0;
    let _ = writeln!(
        h,
        "<line x1=\"{lx:.1}\" y1=\"0\" x2=\"{lx:.1}\" y2=\"{bottom:.1}\" stroke=\"#b3261e\" \
         stroke-width=\"2\" stroke-dasharray=\"5,3\"/><text x=\"{lx:.1}\" y=\"{:.1}\" \
         text-anchor=\"middle\" fill=\"#b3261e\">limit {limit:.0} d</text></svg></div>",
        bottom + 14.0
    );
}

fn configuration(h: &mut String, r: &Report) {
    let c = &r.configuration;
    let a = &c.authorization;
    let rows: Vec<(&str, String)> = vec![
        ("Envelope and cipher", esc(&c.envelope)),
        ("Key store", esc(&c.key_store)),
        (
            "KMS",
            format!(
                "{}{}{}",
                esc(&c.kms.provider),
                c.kms
                    .default_key_id
                    .as_deref()
                    .map(|k| format!(", default key <code>{}</code>", esc(k)))
                    .unwrap_or_default(),
                c.kms
                    .region
                    .as_deref()
                    .map(|k| format!(", region {}", esc(k)))
                    .unwrap_or_default()
            ),
        ),
        (
            "Rotation policy",
            format!(
                "keys at most {} days old, warning {} days before ({})",
                c.rotation_policy.max_key_age_days,
                c.rotation_policy.warn_days,
                esc(&c.rotation_policy.source)
            ),
        ),
        (
            "mTLS listener",
            match &c.tls.mtls_listener {
                Some(l) => format!(
                    "{} — {}, {} first, client certificate required",
                    esc(l),
                    esc(&c.tls.versions.join(", ")),
                    esc(&c.tls.preferred_cipher_suite)
                ),
                None => "none (no remote callers)".into(),
            },
        ),
        ("Local listeners", esc(&c.tls.local_listeners.join(", "))),
        (
            "Linkerd identity trusted",
            if c.tls.trust_linkerd_identity {
                "yes (l5d-client-id)".into()
            } else {
                "no".into()
            },
        ),
        (
            "Authorization",
            if a.enabled {
                format!(
                    "on, default deny: {} policies in {} <span class=\"mono\">(sha256 {})</span>{}",
                    a.policies,
                    esc(&a.files.join(", ")),
                    opt(a.digest.as_deref()),
                    a.error
                        .as_deref()
                        .map(|e| format!("; newest change refused: {}", esc(e)))
                        .unwrap_or_default()
                )
            } else {
                format!(
                    "<b>OFF</b>{}",
                    a.error
                        .as_deref()
                        .map(|e| format!(": {}", esc(e)))
                        .unwrap_or_default()
                )
            },
        ),
        (
            "Audit",
            format!(
                "data operations counted per {} s; signed checkpoint every {} s",
                c.audit.window_secs, c.audit.checkpoint_secs
            ),
        ),
        ("Erasure ledger", esc(&c.erasure_ledger)),
    ];
    h.push_str("<h2 id=\"configuration\">Configuration in force</h2><table>");
    for (k, v) in rows {
        let _ = write!(h, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    h.push_str("</table>\n");
}

fn audit(h: &mut String, r: &Report) {
    let a = &r.audit_log;
    let _ = writeln!(
        h,
        "<h2 id=\"audit_log\">Audit log {}</h2><table>\
         <tr><th>Chain</th><td>{}</td></tr>\
         <tr><th>Records</th><td>{} (last {}; {} in the period)</td></tr>\
         <tr><th>Signed checkpoints</th><td>{}; last: record {} at {}; {} record(s) after it</td></tr>\
         <tr><th>Checkpoint keys</th><td>{} <span class=\"mono\">{}</span></td></tr></table>",
        badge(a.verdict),
        if a.verified {
            format!(
                "verified: every hash, link and checkpoint signature, from record 1 to the head; \
                 {} record(s) after the last checkpoint are chained but not yet signed",
                a.records_after_last_checkpoint
            )
        } else {
            format!(
                "<b style=\"color:var(--bad)\">DOES NOT VERIFY: {}</b>",
                opt(a.error.as_deref())
            )
        },
        a.records,
        a.last_seq,
        a.records_in_period,
        a.checkpoints,
        a.last_checkpoint_seq
            .map_or_else(|| "—".to_owned(), |s| s.to_string()),
        opt(a.last_checkpoint_at.as_deref()),
        a.records_after_last_checkpoint,
        if a.key_source == "pinned" {
            "pinned (given to the report)"
        } else {
            "read from the key store being verified (pin them with --audit-public-key)"
        },
        esc(&a.key_ids.join(", "))
    );
}

fn tenants(h: &mut String, r: &Report) {
    h.push_str("<h2 id=\"tenants\">Tenants</h2>");
    if r.tenants.is_empty() {
        h.push_str("<p>No tenant.</p>");
    }
    for t in &r.tenants {
        let _ = write!(
            h,
            "<h3 data-tenant=\"{0}\">{0} <span class=\"legend\">({1}, since {2}; KMS key <code>{3}</code>; second (DR) wrapping: <span data-second-wrapping=\"{4}\">{4}</span>)</span></h3>",
            esc(&t.tenant_id),
            esc(&t.state),
            esc(&t.created_at),
            esc(&t.kms_key_id),
            if t.second_wrapping { "yes" } else { "no" }
        );
        let _ = write!(
            h,
            "<p>Rotation {}: {}</p>",
            badge(t.rotation.verdict),
            esc(&t.rotation.finding)
        );
        table_head(
            h,
            "Version|State|Created|Age (days)|Last change|Second (DR) wrapping|Fingerprint of the wrapped key",
        );
        for v in &t.versions {
            let _ = write!(
                h,
                "<tr><td class=\"num\">v{}</td><td>{}</td><td>{}</td><td class=\"num\">{:.1}</td>\
                 <td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
                v.version,
                esc(&v.state),
                esc(&v.created_at),
                v.age_days,
                esc(&v.updated_at),
                if v.second_wrapping { "yes" } else { "no" },
                esc(&v.fingerprint)
            );
        }
        h.push_str("</table>");
        let c = &t.rotation_completion;
        if !c.old_versions.is_empty() {
            let _ = write!(h, "<p>Rotation completion {}:</p><ul>", badge(c.verdict));
            for o in &c.old_versions {
                let _ = write!(
                    h,
                    "<li>v{}: {} <span class=\"legend\">(jobs: {})</span></li>",
                    o.version,
                    esc(&o.finding),
                    esc(&if o.jobs.is_empty() {
                        "none".to_owned()
                    } else {
                        o.jobs.join(", ")
                    })
                );
            }
            h.push_str("</ul>");
        }
        let rs = &t.restriction;
        if rs.tenant_suspended || rs.suspended_subjects > 0 {
            let _ = write!(
                h,
                "<p>Restriction {}: {}{} subject(s) suspended.</p>",
                badge(rs.verdict),
                if rs.tenant_suspended {
                    "the whole tenant is suspended; "
                } else {
                    ""
                },
                rs.suspended_subjects
            );
            if !rs.subjects.is_empty() {
                table_head(h, "Subject|Suspended since|Audit record");
                for s in &rs.subjects {
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(&s.subject_id),
                        esc(&s.since),
                        s.audit_seq.map_or_else(
                            || "<b style=\"color:var(--warn)\">not found</b>".to_owned(),
                            |q| q.to_string()
                        )
                    );
                }
                h.push_str("</table>");
            }
        }
    }
}

fn jobs(h: &mut String, r: &Report) {
    if !section_table(h, "jobs", "Re-encryption jobs", r.jobs.len(), JOB_COLUMNS) {
        return;
    }
    for j in &r.jobs {
        let left: Vec<String> = j
            .leftovers
            .iter()
            .flat_map(|(t, m)| m.iter().map(move |(v, n)| format!("{t} v{v}: {n}")))
            .collect();
        let _ = write!(
            h,
            "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"num\">{} / {}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&j.job_id),
            esc(&j.target),
            opt(j.tenant_id.as_deref()),
            esc(&j.state),
            esc(&j.created_at),
            opt(j.finished_at.as_deref()),
            j.rows_scanned,
            j.total_rows,
            j.values_rewrapped,
            j.values_shredded,
            j.values_failed,
            esc(&if left.is_empty() {
                "none".to_owned()
            } else {
                left.join(", ")
            })
        );
    }
    h.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }
}
