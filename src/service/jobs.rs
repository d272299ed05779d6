//! The `fieldkey.v1.Jobs` service: re-encryption jobs as operators see them. Reads and
//! steers the job records in the key store; the runners (`fieldkey jobs run`) do the
//! work.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::status::{bad_request, to_status};
use crate::jobs::{JobBoard, JobView};
use crate::model::JobControl;
use crate::policy::authz::Action;
use crate::proto::pb;

use super::call::Record;
use super::gate::Gate;

/// The Jobs service.
#[derive(Debug, Clone)]
pub struct JobsService {
    jobs: JobBoard,
    gate: Arc<Gate>,
}

impl JobsService {
    /// A service over the keyring's store, behind `gate`.
    pub fn new(jobs: JobBoard, gate: Arc<Gate>) -> Self {
        Self { jobs, gate }
    }
}

fn job_pb(v: JobView) -> pb::Job {
    let r = v.record;
    let p = v.progress;
    pb::Job {
        job_id: r.job_id,
        target: r.target,
        tenant_id: r.tenant_id.unwrap_or_default(),
        state: r.state.as_str().to_owned(),
        control: r.control.as_str().to_owned(),
        total_rows: p.total_rows,
        rows_scanned: p.rows_scanned,
        rows_updated: p.rows_updated,
        values_rewrapped: p.values_rewrapped,
        values_current: p.values_current,
        conflicts: p.conflicts,
        values_shredded: p.values_shredded,
        values_failed: p.values_failed,
        runs: p.runs,
        owner: r.owner.unwrap_or_default(),
        error: r.error.or(p.last_error).unwrap_or_default(),
        created_at_unix_ms: r.created_at,
        started_at_unix_ms: r.started_at.unwrap_or(0),
        updated_at_unix_ms: r.updated_at,
        finished_at_unix_ms: r.finished_at.unwrap_or(0),
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

impl JobsService {
    async fn control(
        &self,
        req: Request<pb::JobRequest>,
        action: Action,
        c: JobControl,
    ) -> Result<Response<pb::Job>, Status> {
        let call = self.gate.admit(&req, action, None).await?;
        let id = &req.get_ref().job_id;
        let v = self.jobs.control(id, c).await.map_err(|e| to_status(&e));
        let v = call
            .audited(v, |v| {
                let (tenant, details) = (&v.record.tenant_id, json!({ "target": v.record.target }));
                let action = format!("job.{}", c.as_str());
                [Record::new(action, "job", id, tenant.as_deref(), details)]
            })
            .await?;
        Ok(Response::new(job_pb(v)))
    }
}

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsService {
    type WatchJobStream = JobStream;

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.gate.admit(&req, Action::ListJobs, None).await?;
        let list = self.jobs.list().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: list.into_iter().map(job_pb).collect(),
        }))
    }

    async fn get_job(&self, req: Request<pb::JobRequest>) -> Result<Response<pb::Job>, Status> {
        self.gate.admit(&req, Action::GetJob, None).await?;
        self.jobs
            .get(&req.into_inner().job_id)
            .await
            .map(|v| Response::new(job_pb(v)))
            .map_err(|e| to_status(&e))
    }

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.gate.admit(&req, Action::WatchJob, None).await?;
        let r = req.into_inner();
        let interval = match r.interval_ms {
            0 => Duration::from_millis(500),
            ms @ 100..=60_000 => Duration::from_millis(u64::from(ms)),
            _ => {
                return Err(bad_request("interval_ms must be 0 or 100..=60000"));
            }
        };
        let jobs = self.jobs.clone();
        // First read here, so an unknown job fails the call rather than the stream.
        let first = jobs.get(&r.job_id).await.map_err(|e| to_status(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut last: Option<pb::Job> = None;
            let mut next = Ok(first);
            loop {
                let view = match next {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(&e))).await;
                        return;
                    }
                };
                let finished = view.record.state.is_finished();
                let job = job_pb(view);
                if last.as_ref() != Some(&job) {
                    if tx.send(Ok(job.clone())).await.is_err() {
                        return; // the client went away
                    }
                    last = Some(job);
                }
                if finished {
                    return;
                }
                // A job that does not change (paused, or pending with no runner) sends
                // nothing, so a send never fails: watch for the client leaving instead
                // (review finding 5: a task per abandoned stream polled the store for
                // ever).
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                next = jobs.get(&r.job_id).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pause_job(&self, req: Request<pb::JobRequest>) -> Result<Response<pb::Job>, Status> {
        self.control(req, Action::PauseJob, JobControl::Pause).await
    }

    async fn resume_job(&self, req: Request<pb::JobRequest>) -> Result<Response<pb::Job>, Status> {
        self.control(req, Action::ResumeJob, JobControl::Run).await
    }

    async fn cancel_job(&self, req: Request<pb::JobRequest>) -> Result<Response<pb::Job>, Status> {
        self.control(req, Action::CancelJob, JobControl::Cancel)
            .await
    }
}
