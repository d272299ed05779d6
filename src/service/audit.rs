//! The `fieldkey.v1.Audit` service: export of the audit log as JSON lines with a
//! signed trailer, and the chain head.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb;
use super::status::to_status;
use crate::audit::AuditLog;
use crate::audit::verify::trailer_line;
use crate::erasure::receipt::public_key_pem;
use crate::error::Error;
use crate::keyring::Keyring;
use crate::policy::authz::Action;

use super::gate::{Caller, Gate};

/// The Audit service.
#[derive(Debug, Clone)]
pub struct AuditService {
    keyring: Arc<Keyring>,
    log: Arc<AuditLog>,
    gate: Arc<Gate>,
}

impl AuditService {
    /// A service over the key store's audit chain, behind `gate`.
    pub fn new(keyring: Arc<Keyring>, log: Arc<AuditLog>, gate: Arc<Gate>) -> Self {
        Self { keyring, log, gate }
    }

    async fn admit<T>(&self, req: &Request<T>, action: Action) -> Result<Caller, Status> {
        let c = self.gate.caller(req);
        self.gate
            .admin(&c, action, None)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(c)
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
        let c = self.admit(&req, Action::ExportAudit).await?;
        let from = req.into_inner().from_seq.max(1);
        self.gate
            .admin_done(
                &c,
                "audit.exported",
                "audit",
                "fieldkey",
                None,
                serde_json::json!({ "from_seq": from }),
            )
            .await;
        let (keyring, log) = (self.keyring.clone(), self.log.clone());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::AuditLine, Status>>(4);
        tokio::spawn(async move {
            let mut after = from - 1;
            let mut count = 0u64;
            let mut last = None;
            loop {
                let page = match keyring.store().audit_records(after, PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(&Error::Store(e)))).await;
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
                                .send(Err(to_status(&Error::Internal(e.to_string()))))
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
        self.admit(&req, Action::GetAuditHead).await?;
        let (seq, hash) = self
            .keyring
            .store()
            .audit_head()
            .await
            .map_err(|e| to_status(&Error::Store(e)))?;
        let (key_id, vk) = self.log.public_key().await.map_err(|e| to_status(&e))?;
        let pem = public_key_pem(&vk).map_err(|e| to_status(&Error::Internal(e.to_string())))?;
        Ok(Response::new(pb::AuditHead {
            seq,
            hash: hex::encode(hash),
            key_id,
            public_key_pem: pem,
        }))
    }
}
