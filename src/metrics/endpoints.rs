//! The HTTP endpoints on the metrics port: `GET /metrics` (Prometheus text format
//! 0.0.4), `/healthz` (liveness: the process serves) and `/readyz` (readiness: the KMS
//! and the key store answer).
//!
//! Owns: [`Readiness`] (its timeout and the cached verdict), the `dependency_up` gauge
//! and the router. Does not: render the metrics (`mod.rs` does) or serve gRPC.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;

use super::Metrics;
use crate::kms::Kms;
use crate::store::KeyStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct Dependency {
    dependency: &'static str,
}

impl Metrics {
    /// Sets whether `dependency` answered the last readiness check.
    fn set_up(&self, dependency: &'static str, up: bool) {
        self.up
            .get_or_create(&Dependency { dependency })
            .set(i64::from(up));
    }
}

/// Readiness: the KMS and the key store answered within `timeout`; the verdict is
/// reused for `cache_for`, so probes do not turn into a KMS call each.
pub struct Readiness {
    kms: Arc<dyn Kms>,
    store: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    cache_for: Duration,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
    /// The active epoch's KMS key, as the last store check read it.
    epoch_key: Mutex<Option<String>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("timeout", &self.timeout)
            .field("cache_for", &self.cache_for)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// Checks of the KMS and the key store.
    pub fn new(kms: Arc<dyn Kms>, store: Arc<dyn KeyStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            kms,
            store,
            metrics,
            timeout: Duration::from_secs(2),
            cache_for: Duration::from_secs(2),
            last: Mutex::new(None),
            epoch_key: Mutex::new(None),
        }
    }

    /// `Ok` when both dependencies answer, else what does not.
    pub async fn check(&self) -> Result<(), String> {
        if let Some((at, r)) = self.last.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && at.elapsed() < self.cache_for
        {
            return r.clone();
        }
        // Once key epochs started, what must be usable is the active epoch's key (the
        // default key may be a retired legacy key). Which key that is comes from the
        // store check (the last one that answered), so that a key-store outage never
        // makes the KMS look down.
        let epoch_key = self
            .epoch_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let kms = tokio::time::timeout(self.timeout, async {
            let Some(k) = epoch_key else {
                return self.kms.check().await;
            };
            match self.kms.key_status(&k).await? {
                crate::kms::KeyStatus::Enabled => Ok(()),
                other => {
                    // A roll may have sealed that key since the last store check:
                    // look at the active epoch again before saying the KMS is down.
                    if let Ok(Some(e)) = self.store.active_epoch().await
                        && let Some(now) = e.kms_key_id
                        && now != k
                    {
                        *self.epoch_key.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(now.clone());
                        if self.kms.key_status(&now).await? == crate::kms::KeyStatus::Enabled {
                            return Ok(());
                        }
                    }
                    Err(crate::kms::KmsError::Rejected {
                        code: format!("the active epoch's KMS key is {other:?}"),
                    })
                }
            }
        });
        // One query: reading the active epoch is the reachability check too.
        let store = tokio::time::timeout(self.timeout, async {
            if let Some(e) = self.store.active_epoch().await? {
                *self.epoch_key.lock().unwrap_or_else(|p| p.into_inner()) = e.kms_key_id;
            }
            Ok::<_, crate::store::StoreError>(())
        });
        let (kms, store) = tokio::join!(kms, store);
        let (kms, store) = (
            why_down("KMS", kms, self.timeout),
            why_down("key store", store, self.timeout),
        );
        self.metrics.set_up("kms", kms.is_none());
        self.metrics.set_up("key_store", store.is_none());
        let down: Vec<String> = [kms, store].into_iter().flatten().collect();
        let r = if down.is_empty() {
            Ok(())
        } else {
            Err(down.join("; "))
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), r.clone()));
        r
    }
}

/// Why a dependency's readiness check failed (its error, or no answer in time), or
/// `None` if it answered.
fn why_down<E: std::fmt::Display>(
    what: &str,
    r: Result<Result<(), E>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Option<String> {
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{what}: {e}")),
        Err(_) => Some(format!("{what}: no answer within {} s", timeout.as_secs())),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
///
/// # Errors
/// If the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let m = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    Response::builder()
                        .header(
                            "content-type",
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )
                        .body(Body::from(m.render_current().await))
                        .unwrap_or_default()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready.check().await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
