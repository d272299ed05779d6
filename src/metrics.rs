//! Prometheus metrics and the health endpoints, on their own port.
//!
//! Owns: the metric families (`docs/OPERATIONS.md` §8 lists them), the tower layer that
//! counts every gRPC call by RPC and status with its latency, the KMS decorator that
//! counts and times every KMS call, the gauges refreshed from the keyring (cache, key
//! ages, re-encryption jobs), and the HTTP server for `GET /metrics` (Prometheus text
//! format 0.0.4), `/healthz` (liveness: the process serves) and `/readyz` (readiness:
//! the KMS and the key store answer).
//!
//! Must not: put anything secret or personal in a label. Labels carry RPC names, status
//! codes, KMS operation names, tenant ids and job ids only (never subject ids, fields'
//! values or key material).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

use crate::crypto::SecretKey;
use crate::keyring::Keyring;
use crate::kms::{DataKey, EncryptionContext, KeyDeletion, Kms, KmsError, WrappedKey};
use crate::policy::RotationPolicy;
use crate::policy::authz::Action;
use crate::store::now_ms;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCode {
    rpc: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    rpc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KmsOpOutcome {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KmsOp {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobStateLabel {
    job_id: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Dependency {
    dependency: &'static str,
}

/// Upper bounds of the latency buckets: 50 µs doubling to ~26 s.
fn latency_bounds() -> Arc<[f64]> {
    exponential_buckets(0.000_05, 2.0, 20).collect()
}

fn latency_histogram() -> AtomicHistogram {
    AtomicHistogram::new(latency_bounds())
}

/// A histogram with fixed buckets and atomic counters: observing is a few atomic adds
/// and takes no lock (prometheus-client's `Histogram` takes a mutex per observation,
/// which every call of one RPC would contend for).
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    bounds: Arc<[f64]>,
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: Box<[AtomicU64]>,
    /// Sum of the observations in nanoseconds.
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: Arc<[f64]>) -> Self {
        let buckets = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(HistogramCells {
            bounds,
            buckets,
            sum_nanos: AtomicU64::new(0),
        }))
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let c = &self.0;
        let secs = d.as_secs_f64();
        let i = c.bounds.partition_point(|b| *b < secs);
        if let Some(b) = c.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        c.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl prometheus_client::metrics::TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let buckets: Vec<(f64, u64)> = c
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(c.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        #[allow(clippy::cast_precision_loss, reason = "a sum of latencies in seconds")]
        let sum = c.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        // The count from the buckets read, so that it equals the +Inf bucket even while
        // observations land during the scrape.
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Every metric of one sidecar process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    cache_source: Arc<std::sync::OnceLock<std::sync::Weak<Keyring>>>,
    requests: Family<RpcCode, Counter>,
    latency: Family<Rpc, AtomicHistogram, fn() -> AtomicHistogram>,
    kms_calls: Family<KmsOpOutcome, Counter>,
    kms_latency: Family<KmsOp, AtomicHistogram, fn() -> AtomicHistogram>,
    key_age: Family<TenantLabel, Gauge<f64, AtomicU64>>,
    tenants_by_status: Family<StatusLabel, Gauge>,
    job_rows_total: Family<JobLabel, Gauge>,
    job_rows_scanned: Family<JobLabel, Gauge>,
    job_values_rewrapped: Family<JobLabel, Gauge>,
    job_values_failed: Family<JobLabel, Gauge>,
    job_state: Family<JobStateLabel, Gauge>,
    up: Family<Dependency, Gauge>,
    refreshed: Gauge,
    /// The series the last refresh set (to remove those that disappear).
    last_refresh: Mutex<LastRefresh>,
    /// Per-RPC handles into `requests` and `latency`, resolved on first use, so that a
    /// call costs atomic adds and no label allocation or family lookup.
    slots: Box<[RpcSlot]>,
}

/// Labels of the gauges set by the last [`Metrics::refresh`].
#[derive(Debug, Default)]
struct LastRefresh {
    tenants: HashSet<String>,
    job_ids: HashSet<String>,
    job_states: HashSet<JobStateLabel>,
}

/// gRPC status codes 0..=16 by name, as labels.
const CODE_NAMES: [&str; 17] = [
    "Ok",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// Batch RPCs of `Crypto`: their own labels (their action is the single-item one).
const BATCH_RPCS: [&str; 5] = [
    "EncryptBatch",
    "DecryptBatch",
    "RewrapBatch",
    "BlindIndexBatch",
    "PseudonymizeBatch",
];

/// One RPC's label and its lazily created series.
#[derive(Debug)]
struct RpcSlot {
    label: String,
    latency: std::sync::OnceLock<AtomicHistogram>,
    codes: [std::sync::OnceLock<Counter>; 17],
}

impl RpcSlot {
    fn new(label: String) -> Self {
        Self {
            label,
            latency: std::sync::OnceLock::new(),
            codes: std::array::from_fn(|_| std::sync::OnceLock::new()),
        }
    }
}

/// Every label a call can get: each action's single RPC, the batch RPCs, health,
/// reflection, and `unknown` (a caller cannot mint labels).
fn all_slots() -> Box<[RpcSlot]> {
    Action::ALL
        .iter()
        .map(|a| format!("{}/{}", a.service(), a.method()))
        .chain(BATCH_RPCS.iter().map(|m| format!("Crypto/{m}")))
        .chain(["grpc.health", "grpc.reflection", "unknown"].map(String::from))
        .map(RpcSlot::new)
        .collect()
}

/// The slot of a request path (see [`all_slots`] for the order).
fn slot_of(path: &str) -> usize {
    let n = Action::ALL.len();
    if let Some((service, method)) = path
        .strip_prefix("/fieldkey.v1.")
        .and_then(|p| p.split_once('/'))
    {
        if service == "Crypto"
            && let Some(i) = BATCH_RPCS.iter().position(|b| *b == method)
        {
            return n + i;
        }
        if let Some(a) = Action::from_rpc(service, method)
            && a.method() == method
        {
            return a.index();
        }
    } else if path.starts_with("/grpc.health.v1.Health/") {
        return n + BATCH_RPCS.len();
    } else if path.starts_with("/grpc.reflection.") {
        return n + BATCH_RPCS.len() + 1;
    }
    n + BATCH_RPCS.len() + 2
}

/// Cache counters and sizes, read at every scrape from the keyring attached with
/// [`Metrics::attach`] (weakly: the keyring's KMS holds these metrics).
#[derive(Debug, Default)]
struct CacheCollector(Arc<std::sync::OnceLock<std::sync::Weak<Keyring>>>);

impl prometheus_client::collector::Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(keyring) = self.0.get().and_then(std::sync::Weak::upgrade) else {
            return Ok(());
        };
        let stats = keyring.cache().stats();
        for (name, help, v) in [
            (
                "fieldkey_cache_hits",
                "Tenant key-cache lookups that found the entry.",
                &stats.hits,
            ),
            (
                "fieldkey_cache_misses",
                "Tenant key-cache lookups that loaded from the key store (and the KMS).",
                &stats.misses,
            ),
            (
                "fieldkey_cache_evictions",
                "Cache entries evicted or invalidated (their keys zeroized).",
                &stats.evictions,
            ),
        ] {
            let c = ConstCounter::new(v.load(Ordering::Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let (tenants, subjects) = keyring.cache().sizes();
        let mut e = encoder.encode_descriptor(
            "fieldkey_cache_entries",
            "Cached entries (each holds unwrapped key material).",
            None,
            MetricType::Gauge,
        )?;
        for (kind, n) in [("tenant", tenants), ("subject", subjects)] {
            #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
            struct Kind {
                kind: &'static str,
            }
            let labels = Kind { kind };
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// The metric families. Cache metrics appear once a keyring is attached.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RpcCode, Counter>::default();
        registry.register(
            "fieldkey_requests",
            "gRPC calls by RPC and status code",
            requests.clone(),
        );
        let latency = Family::<Rpc, AtomicHistogram, fn() -> AtomicHistogram>::new_with_constructor(
            latency_histogram as fn() -> AtomicHistogram,
        );
        registry.register(
            "fieldkey_request_duration_seconds",
            "gRPC call latency by RPC (server side, until the last response byte)",
            latency.clone(),
        );
        let kms_calls = Family::<KmsOpOutcome, Counter>::default();
        registry.register(
            "fieldkey_kms_calls",
            "KMS calls by operation and outcome",
            kms_calls.clone(),
        );
        let kms_latency =
            Family::<KmsOp, AtomicHistogram, fn() -> AtomicHistogram>::new_with_constructor(
                latency_histogram as fn() -> AtomicHistogram,
            );
        registry.register(
            "fieldkey_kms_duration_seconds",
            "KMS call latency by operation",
            kms_latency.clone(),
        );
        let key_age = Family::<TenantLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "fieldkey_key_age_seconds",
            "Age of each tenant's active key version",
            key_age.clone(),
        );
        let tenants_by_status = Family::<StatusLabel, Gauge>::default();
        registry.register(
            "fieldkey_tenants",
            "Tenants by rotation status of their active key against the rotation policy",
            tenants_by_status.clone(),
        );
        let job_rows_total = Family::<JobLabel, Gauge>::default();
        registry.register(
            "fieldkey_job_rows_in_scope",
            "Rows in scope of a re-encryption job",
            job_rows_total.clone(),
        );
        let job_rows_scanned = Family::<JobLabel, Gauge>::default();
        registry.register(
            "fieldkey_job_rows_scanned",
            "Rows a re-encryption job has read",
            job_rows_scanned.clone(),
        );
        let job_values_rewrapped = Family::<JobLabel, Gauge>::default();
        registry.register(
            "fieldkey_job_values_rewrapped",
            "Values a re-encryption job moved to the active key version",
            job_values_rewrapped.clone(),
        );
        let job_values_failed = Family::<JobLabel, Gauge>::default();
        registry.register(
            "fieldkey_job_values_failed",
            "Values a re-encryption job could not move (they block retirement)",
            job_values_failed.clone(),
        );
        let job_state = Family::<JobStateLabel, Gauge>::default();
        registry.register(
            "fieldkey_job_state",
            "1 for each re-encryption job's current state",
            job_state.clone(),
        );
        let up = Family::<Dependency, Gauge>::default();
        registry.register(
            "fieldkey_dependency_up",
            "Whether the KMS and the key store answered the last readiness check",
            up.clone(),
        );
        let refreshed = Gauge::default();
        registry.register(
            "fieldkey_gauges_refreshed_timestamp_seconds",
            "When key ages and job gauges were last refreshed from the key store",
            refreshed.clone(),
        );
        let cache = CacheCollector::default();
        let cache_source = cache.0.clone();
        registry.register_collector(Box::new(cache));
        Arc::new(Self {
            registry,
            cache_source,
            requests,
            latency,
            kms_calls,
            kms_latency,
            key_age,
            tenants_by_status,
            job_rows_total,
            job_rows_scanned,
            job_values_rewrapped,
            job_values_failed,
            job_state,
            up,
            refreshed,
            slots: all_slots(),
            last_refresh: Mutex::new(LastRefresh::default()),
        })
    }

    /// Reports `keyring`'s cache (its hits, misses, evictions and sizes).
    pub fn attach(&self, keyring: &Arc<Keyring>) {
        let _ = self.cache_source.set(Arc::downgrade(keyring));
    }

    /// The exposition after moka's pending maintenance, so that the cache sizes count
    /// every insert and eviction so far (moka updates them lazily).
    pub async fn render_current(&self) -> String {
        let keyring = self.cache_source.get().and_then(std::sync::Weak::upgrade);
        if let Some(k) = keyring {
            k.cache().run_pending_tasks().await;
        }
        self.render()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    fn record(&self, slot: usize, code: usize, elapsed: Duration) {
        let Some(s) = self.slots.get(slot) else {
            return;
        };
        let code = code.min(CODE_NAMES.len() - 1);
        if let (Some(cell), Some(name)) = (s.codes.get(code), CODE_NAMES.get(code)) {
            cell.get_or_init(|| {
                self.requests
                    .get_or_create(&RpcCode {
                        rpc: s.label.clone(),
                        code: (*name).to_owned(),
                    })
                    .clone()
            })
            .inc();
        }
        s.latency
            .get_or_init(|| {
                self.latency
                    .get_or_create(&Rpc {
                        rpc: s.label.clone(),
                    })
                    .clone()
            })
            .observe(elapsed);
    }

    /// Wraps `routes` so that every call is counted and timed.
    pub fn instrument(self: &Arc<Self>, routes: tonic::service::Routes) -> tonic::service::Routes {
        let router = routes.into_axum_router().layer(Instrument {
            metrics: self.clone(),
        });
        tonic::service::Routes::from(router)
    }

    /// Refreshes key ages (against `policy`) and job gauges from the key store.
    ///
    /// # Errors
    /// What the keyring or the store returns.
    pub async fn refresh(
        &self,
        keyring: &Keyring,
        policy: &RotationPolicy,
    ) -> crate::error::Result<()> {
        // New values are set first and only the series that disappeared are removed
        // afterwards, so that a scrape never sees a family half refilled.
        let checks = keyring.rotate_due(policy, now_ms(), true).await?;
        let mut by_status: HashMap<&'static str, i64> = HashMap::new();
        let mut tenants = HashSet::new();
        for c in &checks {
            *by_status.entry(c.age.status.as_str()).or_default() += 1;
            if c.age.active_version.is_some() {
                #[allow(clippy::cast_precision_loss, reason = "ages in ms fit an f64")]
                let secs = c.age.age_ms as f64 / 1000.0;
                self.key_age
                    .get_or_create(&TenantLabel {
                        tenant: c.age.tenant_id.clone(),
                    })
                    .set(secs);
                tenants.insert(c.age.tenant_id.clone());
            }
        }
        for status in ["ok", "due-soon", "overdue", "no-active-key"] {
            self.tenants_by_status
                .get_or_create(&StatusLabel { status })
                .set(by_status.get(status).copied().unwrap_or(0));
        }
        let jobs = crate::jobs::list(keyring.store().as_ref()).await?;
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (mut job_ids, mut job_states) = (HashSet::new(), HashSet::new());
        for j in jobs {
            let job = JobLabel {
                job_id: j.record.job_id.clone(),
            };
            let p = &j.progress;
            self.job_rows_total.get_or_create(&job).set(g(p.total_rows));
            self.job_rows_scanned
                .get_or_create(&job)
                .set(g(p.rows_scanned));
            self.job_values_rewrapped
                .get_or_create(&job)
                .set(g(p.values_rewrapped));
            self.job_values_failed
                .get_or_create(&job)
                .set(g(p.values_failed));
            let state = JobStateLabel {
                job_id: j.record.job_id.clone(),
                state: j.record.state.to_string(),
            };
            self.job_state.get_or_create(&state).set(1);
            job_ids.insert(j.record.job_id);
            job_states.insert(state);
        }
        let mut last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
        for tenant in last.tenants.difference(&tenants) {
            self.key_age.remove(&TenantLabel {
                tenant: tenant.clone(),
            });
        }
        for id in last.job_ids.difference(&job_ids) {
            let job = JobLabel { job_id: id.clone() };
            for f in [
                &self.job_rows_total,
                &self.job_rows_scanned,
                &self.job_values_rewrapped,
                &self.job_values_failed,
            ] {
                f.remove(&job);
            }
        }
        for st in last.job_states.difference(&job_states) {
            self.job_state.remove(st);
        }
        *last = LastRefresh {
            tenants,
            job_ids,
            job_states,
        };
        self.refreshed.set(now_ms() / 1000);
        Ok(())
    }

    fn set_up(&self, dependency: &'static str, up: bool) {
        self.up
            .get_or_create(&Dependency { dependency })
            .set(i64::from(up));
    }
}

/// The status code of a response's headers or trailers, as an index into
/// [`CODE_NAMES`] (out-of-range codes count as `Unknown`).
fn grpc_status(h: &HeaderMap) -> Option<usize> {
    let v = h.get("grpc-status")?;
    let code = std::str::from_utf8(v.as_bytes())
        .ok()?
        .parse::<usize>()
        .ok()?;
    Some(if code < CODE_NAMES.len() {
        code
    } else {
        UNKNOWN
    })
}

/// The tower layer of [`Metrics::instrument`].
#[derive(Clone)]
struct Instrument {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for Instrument {
    type Service = Instrumented<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Instrumented {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
struct Instrumented<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Request<Body>> for Instrumented<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Armed before the call: a call dropped before its response headers (client
        // reset, deadline) is recorded as `Cancelled` when the future is dropped.
        let mut pending = Watched {
            inner: Body::empty(),
            done: Some(Done {
                metrics: self.metrics.clone(),
                slot: slot_of(req.uri().path()),
                started: Instant::now(),
            }),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = match fut.await {
                Ok(res) => res,
                Err(e) => {
                    pending.finish(UNKNOWN);
                    return Err(e);
                }
            };
            if let Some(code) = grpc_status(res.headers()) {
                // Trailers-only response (an error before any message).
                pending.finish(code);
                return Ok(res);
            }
            let done = pending.done.take();
            Ok(res.map(|body| Body::new(Watched { inner: body, done })))
        })
    }
}

/// Recorded once, when the response body ends (trailers), or when it is dropped early
/// (the client went away: `Cancelled`).
struct Done {
    metrics: Arc<Metrics>,
    slot: usize,
    started: Instant,
}

struct Watched {
    inner: Body,
    done: Option<Done>,
}

impl Watched {
    fn finish(&mut self, code: usize) {
        if let Some(d) = self.done.take() {
            d.metrics.record(d.slot, code, d.started.elapsed());
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(UNKNOWN),
            // A body that ends without trailers: gRPC would have sent a status.
            Poll::Ready(None) => self.finish(UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A KMS that counts and times every call of the one it wraps.
pub struct MeteredKms {
    inner: Arc<dyn Kms>,
    metrics: Arc<Metrics>,
}

impl MeteredKms {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Kms>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, KmsError>>,
    ) -> Result<T, KmsError> {
        let started = Instant::now();
        let r = f.await;
        let outcome = match &r {
            Ok(_) => "ok",
            Err(KmsError::Unavailable(_) | KmsError::Timeout) => "unavailable",
            Err(KmsError::Throttled) => "throttled",
            Err(_) => "error",
        };
        self.metrics
            .kms_calls
            .get_or_create(&KmsOpOutcome { op, outcome })
            .inc();
        self.metrics
            .kms_latency
            .get_or_create(&KmsOp { op })
            .observe(started.elapsed());
        r
    }
}

#[async_trait]
impl Kms for MeteredKms {
    fn provider(&self) -> &'static str {
        self.inner.provider()
    }
    fn default_key_id(&self) -> &str {
        self.inner.default_key_id()
    }
    async fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KmsError> {
        self.timed(
            "generate_data_key",
            self.inner.generate_data_key(key_id, ctx),
        )
        .await
    }
    async fn wrap(
        &self,
        key_id: &str,
        key: &SecretKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.timed("wrap", self.inner.wrap(key_id, key, ctx)).await
    }
    async fn unwrap(
        &self,
        key_id: &str,
        wrapped: &WrappedKey,
        ctx: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.timed("unwrap", self.inner.unwrap(key_id, wrapped, ctx))
            .await
    }
    async fn check(&self) -> Result<(), KmsError> {
        self.timed("check", self.inner.check()).await
    }
    async fn canonical_key_id(&self, key_id: &str) -> Result<String, KmsError> {
        self.timed("describe", self.inner.canonical_key_id(key_id))
            .await
    }
    async fn schedule_key_deletion(
        &self,
        key_id: &str,
        pending_window_days: u32,
    ) -> Result<KeyDeletion, KmsError> {
        self.timed(
            "schedule_key_deletion",
            self.inner
                .schedule_key_deletion(key_id, pending_window_days),
        )
        .await
    }
}

/// Readiness: the KMS and the key store answered within `timeout`; the verdict is
/// reused for `cache_for`, so probes do not turn into a KMS call each.
#[derive(Debug)]
pub struct Readiness {
    keyring: Arc<Keyring>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    cache_for: Duration,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    /// Checks of `keyring`'s KMS and store.
    pub fn new(keyring: Arc<Keyring>, metrics: Arc<Metrics>) -> Self {
        Self {
            keyring,
            metrics,
            timeout: Duration::from_secs(2),
            cache_for: Duration::from_secs(2),
            last: Mutex::new(None),
        }
    }

    /// `Ok` when both dependencies answer, else what does not.
    pub async fn check(&self) -> Result<(), String> {
        if let Some((at, r)) = self.last.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && at.elapsed() < self.cache_for
        {
            return r.clone();
        }
        let kms = tokio::time::timeout(self.timeout, self.keyring.kms().check());
        let store = tokio::time::timeout(self.timeout, self.keyring.store().ping());
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

/// Refreshes the key-age and job gauges every `every` until the task is aborted.
pub fn spawn_refresh(
    metrics: Arc<Metrics>,
    keyring: Arc<Keyring>,
    policy: RotationPolicy,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = metrics.refresh(&keyring, &policy).await {
                tracing::warn!(error = %e, "cannot refresh key-age and job metrics");
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn rpc_labels_are_bounded() {
        let slots = all_slots();
        let label = |p: &str| slots[slot_of(p)].label.clone();
        assert_eq!(label("/fieldkey.v1.Crypto/Encrypt"), "Crypto/Encrypt");
        assert_eq!(
            label("/fieldkey.v1.Crypto/BlindIndexBatch"),
            "Crypto/BlindIndexBatch"
        );
        assert_eq!(
            label("/fieldkey.v1.Keys/RotateTenantKey"),
            "Keys/RotateTenantKey"
        );
        assert_eq!(
            label("/fieldkey.v1.Audit/GetComplianceReport"),
            "Audit/GetComplianceReport"
        );
        assert_eq!(label("/fieldkey.v1.Crypto/Nope"), "unknown");
        assert_eq!(label("/fieldkey.v1.Keys/EncryptBatch"), "unknown");
        assert_eq!(label("/evil/../x"), "unknown");
        assert_eq!(label("/grpc.health.v1.Health/Check"), "grpc.health");
        assert_eq!(
            label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "grpc.reflection"
        );
        // every label is distinct
        let mut all: Vec<&str> = slots.iter().map(|s| s.label.as_str()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), slots.len());
    }

    #[test]
    fn the_exposition_is_prometheus_text() {
        let m = Metrics::new();
        m.record(
            slot_of("/fieldkey.v1.Crypto/Encrypt"),
            0,
            Duration::from_millis(2),
        );
        let text = m.render();
        assert!(
            text.contains("fieldkey_requests_total{rpc=\"Crypto/Encrypt\",code=\"Ok\"} 1"),
            "{text}"
        );
        // cumulative buckets, ending with +Inf; the sum in seconds
        assert!(
            text.contains(
                "fieldkey_request_duration_seconds_bucket{le=\"0.0016\",rpc=\"Crypto/Encrypt\"} 0"
            ) || text.contains(
                "fieldkey_request_duration_seconds_bucket{rpc=\"Crypto/Encrypt\",le=\"0.0016\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("le=\"0.0032\"} 1") && text.contains("le=\"+Inf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fieldkey_request_duration_seconds_sum{rpc=\"Crypto/Encrypt\"} 0.002\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fieldkey_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF"),
            "classic text format, not OpenMetrics"
        );
    }
}
