//! `fieldkey serve`: build the keyring from configuration, serve gRPC, stop cleanly.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::SecretString;

use super::{KeyArgs, ServeArgs};
use crate::audit::AuditConfig;
use crate::cache::CacheConfig;
use crate::config::Config;
use crate::erasure::ErasureConfig;
use crate::keyring::{Keyring, KeyringConfig};
use crate::kms::Kms;
use crate::kms::local::{KdfParams, LocalKms};
use crate::policy::RotationPolicy;
use crate::policy::authz::Authorizer;
use crate::service::gate::{Gate, IdentityConfig};
use crate::store::{ErasureLedger, FeedHealth, KeyStore, SqlStore};
use crate::wiring::Parts;

fn config_from(serve: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = key_config(&serve.keys)?;
    if let Some(l) = &serve.listen {
        cfg.listen.tcp = Some(l.clone());
    }
    if let Some(m) = &serve.metrics_listen {
        cfg.metrics.listen = Some(m.clone());
    }
    if let Some(u) = &serve.unix_socket {
        cfg.listen.unix = Some(u.clone());
    }
    if let Some(p) = &serve.policies {
        cfg.authz.policies = Some(p.clone());
    }
    if let Some(id) = &serve.local_identity {
        cfg.authz.local_identity.clone_from(id);
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Configuration from a file and the key-store/KMS flags.
pub(super) fn key_config(args: &KeyArgs) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = &args.data_dir {
        cfg.data_dir.clone_from(d);
    }
    if let Some(p) = &args.postgres_url {
        cfg.store.postgres_url = Some(p.clone());
    }
    if let Some(k) = &args.aws_kms_key_id {
        cfg.kms.aws_key_id = Some(k.clone());
    }
    if let Some(r) = &args.aws_region {
        cfg.kms.aws_region = Some(r.clone());
    }
    if let Some(e) = &args.aws_kms_endpoint {
        cfg.kms.aws_endpoint_url = Some(e.clone());
    }
    if let Some(p) = &args.rotation_policy {
        cfg.policy.rotation = Some(p.clone());
    }
    cfg.validate()?;
    Ok(cfg)
}

pub(super) fn rotation_policy(cfg: &Config) -> anyhow::Result<RotationPolicy> {
    Ok(match &cfg.policy.rotation {
        Some(path) => {
            let p = RotationPolicy::load(path)?;
            tracing::info!(path = %path.display(), max_key_age_days = p.max_key_age_days, warn_days = p.warn_days, "rotation policy loaded");
            p
        }
        None => {
            let p = RotationPolicy::default();
            tracing::info!(
                max_key_age_days = p.max_key_age_days,
                warn_days = p.warn_days,
                "no rotation policy file; using the default"
            );
            p
        }
    })
}

/// The local KMS passphrase: `FIELDKEY_LOCAL_KMS_PASSPHRASE`, else a random one kept in
/// `<data_dir>/local-kms.passphrase` (mode 0600) so the embedded defaults work with no
/// set-up. Both are for development only.
pub(super) fn local_passphrase(data_dir: &Path) -> anyhow::Result<SecretString> {
    if let Ok(p) = std::env::var("FIELDKEY_LOCAL_KMS_PASSPHRASE") {
        return Ok(SecretString::from(p));
    }
    let path = data_dir.join("local-kms.passphrase");
    if !path.exists() {
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source failed: {e}"))?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        use std::io::Write as _;
        opts.open(&path)
            .and_then(|mut f| f.write_all(hex::encode(bytes).as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        tracing::warn!(path = %path.display(), "generated a local KMS passphrase file (development only; set FIELDKEY_LOCAL_KMS_PASSPHRASE or use AWS KMS)");
    }
    let p = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(SecretString::from(p.trim().to_owned()))
}

/// The configured key store (no KMS needed: offline audit verification uses it too).
pub(super) async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn KeyStore>> {
    Ok(match &cfg.store.postgres_url {
        Some(dsn) => Arc::new(SqlStore::connect_postgres(dsn).await?.with_feed_health(
            FeedHealth {
                ping_every: Duration::from_millis(cfg.store.change_feed_ping_ms),
                ping_timeout: Duration::from_millis(cfg.store.change_feed_timeout_ms),
            },
        )),
        None => Arc::new(SqlStore::open_sqlite(&cfg.sqlite_path()).await?),
    })
}

/// The sidecar's lower floor from the configuration: the store, the KMS and the
/// keyring over them (the rooms above get narrow handles from these, see [`run`]).
pub(super) async fn build_keyring(
    cfg: &Config,
    metrics: Option<&Arc<crate::metrics::Metrics>>,
) -> anyhow::Result<Parts> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let store = open_store(cfg).await?;
    let kms = super::kms::build_kms(cfg, metrics).await?;
    tracing::info!(
        store = store.backend(),
        kms = kms.provider(),
        "key store and KMS ready"
    );
    let kcfg = KeyringConfig {
        cache: CacheConfig {
            key_ttl: Duration::from_secs(cfg.cache.key_ttl_secs),
            max_tenants: cfg.cache.max_tenants,
            max_subjects: cfg.cache.max_subjects,
        },
        revalidate_after: Duration::from_millis(cfg.cache.revalidate_ms),
        max_stale: Duration::from_millis(cfg.cache.max_stale_ms),
        tenant_kms_keys: Some(cfg.kms.tenant_keys.clone()),
        ..KeyringConfig::default()
    };
    let ledger = Arc::new(match (&cfg.erasure.ledger, &cfg.store.postgres_url) {
        (Some(url), _) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            ErasureLedger::connect_postgres(url).await?
        }
        (Some(path), pg) => {
            if pg.is_some() {
                tracing::warn!(
                    "erasure.ledger is a local file but the key store is a shared PostgreSQL database: other replicas cannot see this ledger; use a postgres:// ledger database shared by every replica"
                );
            }
            ErasureLedger::open_sqlite(Path::new(path)).await?
        }
        (None, Some(dsn)) => {
            tracing::warn!(
                "erasure.ledger is not set: the erasure ledger shares the key store's PostgreSQL database, so restoring that database also rolls back erasures until they are re-applied by hand; point erasure.ledger at a separate database"
            );
            ErasureLedger::connect_postgres(dsn).await?
        }
        (None, None) => ErasureLedger::open_sqlite(&cfg.data_dir.join("erasure-ledger.db")).await?,
    });
    tracing::info!(backend = ledger.backend(), "erasure ledger ready");
    let keyring = Arc::new(
        Keyring::new(store.clone(), kms.clone(), kcfg)
            .with_ledger(ledger)
            .with_index_profiles(cfg.index_profiles()?),
    );
    Ok(Parts::new(keyring, store, kms))
}

/// Key epoch settings from the configuration.
/// The report's trust anchors from `[audit]` (checkpoints, receipts): `None` for a
/// list left empty.
pub(super) fn trust_anchors(cfg: &Config) -> anyhow::Result<crate::service::audit::Anchors> {
    let read = |files: &[std::path::PathBuf]| -> anyhow::Result<_> {
        if files.is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("trust anchor {}", f.display()))?;
            let found = crate::erasure::receipt::parse_public_keys(&text)
                .with_context(|| format!("trust anchor {}", f.display()))?;
            keys.extend(found);
        }
        Ok(Some(keys))
    };
    Ok(crate::service::audit::Anchors {
        audit: read(&cfg.audit.checkpoint_public_keys)?,
        receipts: read(&cfg.audit.receipt_public_keys)?,
    })
}

pub(super) fn epoch_settings(cfg: &Config) -> crate::epochs::EpochSettings {
    let e = &cfg.epochs;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    crate::epochs::EpochSettings {
        length: Duration::from_secs_f64(e.length_days * 86_400.0),
        kms_deletion_days: e.kms_deletion_days,
        retire_legacy_key: e.retire_legacy_key,
        key_pool: e.key_pool.clone(),
        store_tag: e.store_tag.clone().unwrap_or_else(|| "default".into()),
        // A random part: two processes must never share a lease owner (HOSTNAME may be
        // unset, pids repeat across containers).
        owner: format!(
            "fieldkey@{host} pid {} {}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        ),
        lease: Duration::from_secs(e.lease_secs),
    }
}

/// Erasure settings from the configuration (and the crash-test fault injection
/// variable, `FIELDKEY_FAULT_ABORT_AFTER_ERASURE_STEP`, never set in production).
fn erasure_config(cfg: &Config) -> ErasureConfig {
    let e = &cfg.erasure;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    let abort_after = std::env::var("FIELDKEY_FAULT_ABORT_AFTER_ERASURE_STEP").ok();
    if let Some(step) = &abort_after {
        tracing::warn!(
            step,
            "FAULT INJECTION: this process will abort during an erasure (tests only)"
        );
    }
    ErasureConfig {
        max_grace: Duration::from_secs(u64::from(e.max_grace_days) * 86_400),
        kms_key_deletion_days: e.kms_key_deletion_days,
        retry_after: Duration::from_secs(e.retry_after_secs),
        poll: Duration::from_millis(e.poll_ms),
        reconcile_every: Duration::from_secs(e.reconcile_secs),
        executor: format!("fieldkey@{host} pid {}", std::process::id()),
        abort_after,
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub(super) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = config_from(&args)?;
    crate::harden::harden_and_log();
    let rotation = rotation_policy(&cfg)?;
    let metrics = crate::metrics::Metrics::new();
    let parts = build_keyring(&cfg, Some(&metrics)).await?;
    let keyring = parts.keyring.clone();
    let jobs = parts.jobs();
    metrics.attach(&keyring);
    metrics.attach_store(&parts.store);
    for (field, f) in &cfg.blind_index.fields {
        tracing::info!(
            field = %field,
            algorithm = ?f.algorithm,
            bits = f.bits,
            normalize = ?f.normalize,
            "blind index profile"
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // One set of services for every listener: the in-flight limit and the health
    // status are the sidecar's, not a listener's.
    // Shreds and suspensions made by other replicas apply here as soon as announced.
    let _follow = keyring.follow_changes().await?;
    let erasures = Arc::new(parts.erasures(erasure_config(&cfg)));
    let worker = erasures.clone().spawn_worker();
    let epochs = Arc::new(parts.epochs(epoch_settings(&cfg)));
    let epoch_worker = cfg.epochs.auto_roll.then(|| {
        epochs
            .clone()
            .spawn_worker(Duration::from_secs(cfg.epochs.check_secs))
    });
    let audit = Arc::new(parts.audit_log(AuditConfig {
        window: Duration::from_secs(cfg.audit.window_secs),
        checkpoint_every: Duration::from_secs(cfg.audit.checkpoint_secs),
        executor: erasure_config(&cfg).executor,
    }));
    let audit_task = audit.clone().spawn();
    let (authz, _policy_watch) = match &cfg.authz.policies {
        Some(dir) => {
            let a = Arc::new(Authorizer::load(dir)?);
            let st = a.status();
            tracing::info!(dir = %dir.display(), policies = st.policies, files = ?st.files, "authorization policies loaded (default deny)");
            let w = a.watch(Duration::from_secs(cfg.authz.reload_secs));
            (Some(a), Some(w))
        }
        None => {
            tracing::warn!(
                "AUTHORIZATION IS OFF: no authz.policies directory configured; every caller may call every RPC (development only)"
            );
            (None, None)
        }
    };
    // Read before serving: a trust anchor that is configured but unreadable stops the
    // start rather than letting reports fall back to the store's keys.
    let anchors = trust_anchors(&cfg)?;
    let gate = Arc::new(Gate::new(
        authz,
        Some(audit.clone()),
        IdentityConfig {
            local_identity: Arc::from(cfg.authz.local_identity.as_str()),
            trust_linkerd: cfg.authz.trust_linkerd_identity,
        },
    ));
    // One memory budget for every listener; the metrics report how much of it is used.
    let budget = crate::transport::budget::MemoryBudget::new(cfg.limits.memory_budget_bytes);
    metrics.watch_budget(budget.clone());
    let routes = crate::service::routes(crate::service::Context {
        epochs: epochs.clone(),
        keyring: keyring.clone(),
        limits: cfg.limits.clone(),
        rotation,
        erasures: erasures.clone(),
        audit: audit.clone(),
        jobs: jobs.clone(),
        evidence: parts.evidence(),
        gate,
        report: Arc::new(crate::service::audit::ReportFacts {
            configuration: crate::report::Configuration::from_config(&cfg, &rotation, None),
            rotation,
            anchors,
        }),
        row_binding: Arc::new(cfg.row_binding.clone()),
        budget: Some(budget.clone()),
    })
    .await?;
    // Every call counted and timed, when the metrics are served.
    let routes = if cfg.metrics.listen.is_some() {
        metrics.instrument(routes)
    } else {
        routes
    };
    let mut servers = tokio::task::JoinSet::new();
    let mut refresh = None;
    if let Some(addr) = &cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "serving /metrics, /healthz and /readyz over HTTP");
        println!("fieldkey metrics on http://{local}");
        let ready = Arc::new(crate::metrics::Readiness::new(
            parts.kms.clone(),
            parts.store.clone(),
            metrics.clone(),
        ));
        let (m, stop) = (metrics.clone(), wait(stop_rx.clone()));
        servers.spawn(async move {
            crate::metrics::serve(listener, m, ready, stop)
                .await
                .map_err(|source| crate::transport::TransportError::Bind {
                    what: "the metrics address".into(),
                    source,
                })
        });
        refresh = Some(crate::metrics::spawn_refresh(
            metrics.clone(),
            keyring.clone(),
            jobs.clone(),
            rotation,
            Duration::from_secs(cfg.metrics.refresh_secs),
        ));
    }
    if let Some(addr) = &cfg.listen.tcp {
        let listener = crate::transport::bind_tcp(addr).await?;
        let local = listener.local_addr()?;
        println!("fieldkey listening on tcp://{local}");
        if cfg.listen.tcp_behind_linkerd {
            tracing::info!(%local, trust_linkerd_identity = cfg.authz.trust_linkerd_identity, "serving gRPC on TCP behind the Linkerd proxy (callers from outside the pod are refused)");
            servers.spawn(crate::transport::linkerd::serve_tcp_behind_linkerd(
                routes.clone(),
                listener,
                wait(stop_rx.clone()),
            ));
        } else {
            tracing::info!(%local, "serving gRPC on TCP");
            servers.spawn(crate::transport::serve_tcp(
                routes.clone(),
                listener,
                wait(stop_rx.clone()),
            ));
        }
    }
    if let Some(path) = &cfg.listen.unix {
        let listener = crate::transport::bind_unix(path)?;
        tracing::info!(path = %path.display(), "serving gRPC on a Unix socket");
        println!("fieldkey listening on unix://{}", path.display());
        servers.spawn(crate::transport::serve_unix(
            routes.clone(),
            listener,
            wait(stop_rx.clone()),
        ));
    }
    if let Some(m) = &cfg.listen.mtls {
        let tls =
            crate::transport::mtls::ReloadingConfig::watch(m.clone(), Duration::from_secs(5))?;
        let listener = crate::transport::bind_tcp(&m.listen).await?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "serving gRPC over mTLS (TLS 1.3, client certificates required)");
        println!("fieldkey listening on mtls://{local}");
        servers.spawn(crate::transport::mtls::serve_mtls(
            routes.clone(),
            listener,
            tls,
            wait(stop_rx.clone()),
        ));
    }
    tokio::select! {
        () = shutdown_signal() => {}
        Some(res) = servers.join_next() => {
            res.context("server task failed")??;
            anyhow::bail!("a listener stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(true);
    while let Some(res) = servers.join_next().await {
        res.context("server task failed")??;
    }
    worker.abort();
    if let Some(w) = epoch_worker {
        w.abort();
    }
    audit_task.abort();
    if let Some(r) = refresh {
        r.abort();
    }
    // The last window's counts.
    if let Err(e) = audit.flush().await {
        tracing::error!(error = %e, "could not write the last audit window");
    }
    keyring.wipe_cache().await;
    tracing::info!("stopped; cached keys wiped");
    Ok(())
}

pub(super) fn init_local_kms(path: &Path, passphrase: String) -> anyhow::Result<()> {
    let kms = LocalKms::create(path, &SecretString::from(passphrase), KdfParams::default())?;
    println!(
        "created {} (key id {})",
        path.display(),
        kms.default_key_id()
    );
    Ok(())
}
