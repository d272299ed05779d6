//! The `fieldkey.v1.Audit` service: export of the audit log as JSON lines with a
//! signed trailer, and the chain head.

use std::pin::Pin;
use std::sync::Arc;

use serde_json::json;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::status::{bad_request, to_status};
use crate::audit::AuditLog;
use crate::audit::verify::trailer_line;
use crate::erasure::receipt::public_key_pem;
use crate::model::now_ms;
use crate::policy::RotationPolicy;
use crate::policy::authz::Action;
use crate::proto::pb;
use crate::report::{self, Configuration, Evidence};

use super::call::Record;
use super::gate::Gate;

/// What the compliance report states about the configuration (fixed at start; the
/// authorization facts are read from the gate at each request).
#[derive(Debug, Clone)]
pub struct ReportFacts {
    /// The configuration facts.
    pub configuration: Configuration,
    /// The rotation policy in force.
    pub rotation: RotationPolicy,
    /// The public keys the report trusts, from the configuration.
    pub anchors: Anchors,
}

/// Trust anchors of the compliance report (`[audit] checkpoint_public_keys`,
/// `receipt_public_keys`): never read from the key store the report checks. `None`: not
/// configured (the signed promises are then never met).
#[derive(Debug, Clone, Default)]
pub struct Anchors {
    /// Keys of the audit checkpoints.
    pub audit: Option<Vec<ed25519_dalek::VerifyingKey>>,
    /// Keys of erasure receipts and "backups sealed" statements.
    pub receipts: Option<Vec<ed25519_dalek::VerifyingKey>>,
}

/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditService {
    evidence: Evidence,
    log: Arc<AuditLog>,
    gate: Arc<Gate>,
    facts: Arc<ReportFacts>,
}

impl AuditService {
    /// A service over the audit log and the report's evidence, behind `gate`.
    pub fn new(
        evidence: Evidence,
        log: Arc<AuditLog>,
        gate: Arc<Gate>,
        facts: Arc<ReportFacts>,
    ) -> Self {
        Self {
            evidence,
            log,
            gate,
            facts,
        }
    }
}

type LineStream = Pin<Box<dyn Stream<Item = Result<pb::AuditLine, Status>> + Send>>;

const PAGE: u32 = 1000;

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    type ExportAuditStream = LineStream;

    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let call = self.gate.admit(&req, Action::ExportAudit, None).await?;
        let from = req.get_ref().from_seq.max(1);
        let details = json!({ "from_seq": from });
        (call.record(Record::new(
            "audit.exported",
            "audit",
            "fieldkey",
            None,
            details,
        )))
        .await;
        let log = self.log.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::AuditLine, Status>>(4);
        tokio::spawn(async move {
            let mut after = from - 1;
            let mut count = 0u64;
            let mut last = None;
            loop {
                let page = match log.records(after, PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(&e))).await;
                        return;
                    }
                };
                let Some(tail) = page.last() else { break };
                after = tail.seq;
                for r in &page {
                    let line = match serde_json::to_string(r) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx
                                .send(Err(to_status(&crate::error::Error::Internal(
                                    e.to_string(),
                                ))))
                                .await;
                            return;
                        }
                    };
                    if tx.send(Ok(pb::AuditLine { line })).await.is_err() {
                        return;
                    }
                    count += 1;
                }
                last = page.into_iter().last();
            }
            let trailer = match log.trailer(from, last.as_ref(), count).await {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(Err(to_status(&e))).await;
                    return;
                }
            };
            let _ = tx
                .send(Ok(pb::AuditLine {
                    line: trailer_line(&trailer),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_audit_head(
        &self,
        req: Request<pb::GetAuditHeadRequest>,
    ) -> Result<Response<pb::AuditHead>, Status> {
        self.gate.admit(&req, Action::GetAuditHead, None).await?;
        let (seq, hash) = self.log.head().await.map_err(|e| to_status(&e))?;
        let (key_id, vk) = self.log.public_key().await.map_err(|e| to_status(&e))?;
        let pem = public_key_pem(&vk)
            .map_err(|e| to_status(&crate::error::Error::Internal(e.to_string())))?;
        Ok(Response::new(pb::AuditHead {
            seq,
            hash: hex::encode(hash),
            key_id,
            public_key_pem: pem,
        }))
    }

    async fn get_compliance_report(
        &self,
        req: Request<pb::ComplianceReportRequest>,
    ) -> Result<Response<pb::ComplianceReport>, Status> {
        let tenant = (!req.get_ref().tenant_id.is_empty()).then(|| req.get_ref().tenant_id.clone());
        let call = (self.gate)
            .admit(&req, Action::GetComplianceReport, tenant.as_deref())
            .await?;
        let r = req.into_inner();
        let html = match pb::ReportFormat::try_from(r.format) {
            Ok(pb::ReportFormat::Json) => false,
            Ok(pb::ReportFormat::Html) => true,
            Err(_) => {
                return Err(bad_request(format!("unknown report format {}", r.format)));
            }
        };
        let period = |ms: i64| (ms != 0).then_some(ms);
        let (since, until) = (period(r.since_unix_ms), period(r.until_unix_ms));
        if let (Some(s), Some(u)) = (since, until)
            && s >= u
        {
            return Err(bad_request(
                "the period is empty: since_unix_ms must be before until_unix_ms",
            ));
        }
        let mut configuration = self.facts.configuration.clone();
        let fresh = Configuration::authorization_of(self.gate.authz_status().map(Ok));
        configuration.authorization = fresh;
        let opts = report::Options {
            tenant: tenant.clone(),
            since_ms: since,
            until_ms: until,
            now_ms: now_ms(),
            audit_keys: self.facts.anchors.audit.clone(),
            receipt_keys: self.facts.anchors.receipts.clone(),
        };
        let built = self
            .evidence
            .report(configuration, &self.facts.rotation, &opts)
            .await
            .map_err(|e| to_status(&e));
        let built = call
            .audited(built, |built| {
                let details = json!({
                    "verdict": built.summary.verdict.as_str(),
                    "since": built.period.since,
                    "until": built.period.until,
                });
                let id = tenant.as_deref().unwrap_or("fieldkey");
                [Record::new(
                    "report.generated",
                    "report",
                    id,
                    tenant.as_deref(),
                    details,
                )]
            })
            .await?;
        let (content_type, body) = if html {
            ("text/html; charset=utf-8", report::html::render(&built))
        } else {
            (
                "application/json",
                serde_json::to_string_pretty(&built)
                    .map_err(|e| to_status(&crate::error::Error::Internal(e.to_string())))?,
            )
        };
        Ok(Response::new(pb::ComplianceReport {
            content_type: content_type.into(),
            body,
            all_met: built.summary.all_met,
            verdict: built.summary.verdict.as_str().into(),
        }))
    }
}
