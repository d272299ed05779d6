//! `WatchJob` streams end with their clients (review finding 5, issue 19): a stream of a
//! job that does not change (paused, or pending with no runner) sends nothing, and its
//! task used to poll the store for ever after the client had gone.

mod common;

use std::time::Duration;

use anyhow::Result;
use fieldkey::proto::pb::{self, jobs_client::JobsClient};
use fieldkey::store::NewJob;
use tokio_stream::StreamExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_watch_streams_leave_no_task_behind() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let kms = common::local_kms(&dir)?;
    let keyring = std::sync::Arc::new(fieldkey::Keyring::new(
        store.clone(),
        kms.clone(),
        fieldkey::KeyringConfig::default(),
    ));
    store
        .create_job(NewJob {
            job_id: "idle".into(),
            target: "app.users".into(),
            tenant_id: None,
            spec: "{}".into(),
            progress: "{}".into(),
        })
        .await?;
    // No authorization: this is about the stream's task, not who may watch.
    let server = common::sidecar::InProcess::start_as_given(
        fieldkey::wiring::Parts::new(keyring, store, kms).context(),
    )
    .await?;
    let mut jobs = JobsClient::new(server.channel().await?);
    jobs.list_jobs(pb::ListJobsRequest {}).await?;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut s = jobs
            .watch_job(pb::WatchJobRequest {
                job_id: "idle".into(),
                interval_ms: 100,
            })
            .await?
            .into_inner();
        // The first view arrives: the stream's task runs.
        s.next().await.transpose()?;
        streams.push(s);
    }
    assert!(
        metrics.num_alive_tasks() >= baseline + 20,
        "one task per stream"
    );
    drop(streams);
    common::eventually(
        "every abandoned stream's task to end",
        Duration::from_secs(10),
        || async { (metrics.num_alive_tasks() <= baseline).then_some(()) },
    )
    .await;
    server.stop().await;
    Ok(())
}
