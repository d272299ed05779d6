//! Authorization: who may call which RPC on which tenant or field, decided by Cedar
//! policies in `policies/*.cedar` (default deny; a `forbid` overrides every `permit`),
//! plus per-identity decrypt ceilings from `policies/limits.toml`.
//!
//! The entity model (the schema in `policies/schema.cedarschema`, compiled in):
//! - principal `Identity::"<caller identity>"` (certificate SAN, Linkerd identity, or the
//!   local listener's configured identity);
//! - action `Action::"<Service>::<Method>"` ([`Action`]), in the group
//!   `Action::"<Service>"`; batch RPCs are authorized per item as the single-item action;
//! - resource `Field::"tenant/field"` (in `Tenant::"tenant"`, attributes `tenant`,
//!   `name`), `Tenant::"tenant"` (in `Service::"fieldkey"`), or `Service::"fieldkey"`;
//! - context `{ transport: "local" | "mtls" | "linkerd" }`.
//!
//! Cedar evaluates each request (see `engine.rs`); decisions are cached per loaded policy
//! set (see `cache.rs`); a reload installs a new set, with a new, empty cache, atomically.

mod action;
mod cache;
mod engine;
mod limits;

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use cedar_policy::PolicySet;
use sha2::{Digest, Sha256};

pub use action::{Action, Scope};
pub use limits::{
    Budget, DEFAULT_INDEX_LIMIT, DecryptGuard, DecryptLimits, MAX_PER_SECOND, RateLimit,
    RateLimited,
};

use super::PolicyError;
use cache::DecisionCache;
use engine::Engine;

/// `context.transport` of calls on the loopback TCP or Unix-socket listener.
pub const TRANSPORT_LOCAL: &str = "local";
/// `context.transport` of calls on the mTLS listener (identity from the certificate).
pub const TRANSPORT_MTLS: &str = "mtls";
/// `context.transport` of calls whose identity is Linkerd's `l5d-client-id`.
pub const TRANSPORT_LINKERD: &str = "linkerd";
/// The id of the `Service` entity: `Service::"fieldkey"`.
pub const SERVICE_ID: &str = "fieldkey";
/// The decrypt ceilings file in the policy directory (optional).
pub const LIMITS_FILE: &str = "limits.toml";
/// The schema every policy is validated against.
pub const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");

/// Shortest interval [`Authorizer::watch`] accepts.
const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(10);

/// One authorization question. Build it from borrowed parts; it allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The caller's identity.
    pub identity: &'a str,
    /// How the call arrived: [`TRANSPORT_LOCAL`], [`TRANSPORT_MTLS`] or
    /// [`TRANSPORT_LINKERD`].
    pub transport: &'a str,
    /// What the caller wants to do.
    pub action: Action,
    /// The tenant, if the request names one.
    pub tenant: Option<&'a str>,
    /// The field, if the request names one (ignored without a tenant).
    pub field: Option<&'a str>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the call may proceed.
    pub allowed: bool,
    /// Why: "permitted by policy app.cedar:data", "forbidden by policy …: …", or "no
    /// policy permits Crypto::Decrypt on field acme/email for <identity>". Names
    /// identities, tenants and fields, never request data. Shared (`Arc`), so that a
    /// cached decision is returned without allocating.
    pub reason: Arc<str>,
}

/// What is loaded, and the last problem seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus {
    /// Increases by one with every policy set installed (1 after [`Authorizer::load`]).
    pub generation: u64,
    /// The policy directory.
    pub dir: PathBuf,
    /// The files of the installed set (`*.cedar`, and `limits.toml` if present).
    pub files: Vec<String>,
    /// Policies in the installed set.
    pub policies: usize,
    /// SHA-256 (hex) over the installed files' names and contents: names the policy
    /// set in force (compliance report, logs).
    pub digest: String,
    /// When the installed set was loaded.
    pub loaded_at: SystemTime,
    /// Why the directory's current contents were refused (the file and the reason);
    /// `None` when they are what is installed.
    pub last_error: Option<String>,
    /// Decisions in the cache.
    pub cached_decisions: usize,
}

/// An error and its sources, on one line.
fn error_text(e: &PolicyError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// The policy directory's contents, read once.
struct Snapshot {
    /// `(file name, text)` of each `*.cedar` file, by name.
    cedar: Vec<(String, String)>,
    limits: Option<String>,
    digest: [u8; 32],
}

impl Snapshot {
    fn read(dir: &Path) -> Result<Self, PolicyError> {
        let read_err = |path: &Path, source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        };
        // A mounted ConfigMap is updated by writing a new `..<timestamp>` directory and
        // swapping the `..data` symlink to it at once; the visible files are symlinks
        // through `..data`. Read file by file through them, a read that spans a swap
        // would mix old and new files (a `forbid` of the old set missing beside a
        // `permit` of the new). So `..data` is resolved once and every file is read
        // from that one directory (review finding 5). If the old directory is removed
        // under the read, the read fails and the last good set keeps serving.
        let resolved = std::fs::canonicalize(dir.join("..data")).ok();
        let dir = resolved.as_deref().filter(|d| d.is_dir()).unwrap_or(dir);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
            let entry = entry.map_err(|e| read_err(dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            // Hidden entries are skipped: Kubernetes mounts a ConfigMap as symlinks to
            // `..data/<file>` next to `..data` and `..<timestamp>` directories.
            if name.starts_with('.') || !name.ends_with(".cedar") {
                continue;
            }
            // Follows symlinks: a ConfigMap's files are symlinks.
            if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
                names.push(name);
            }
        }
        names.sort();
        if names.is_empty() {
            return Err(PolicyError::Invalid {
                path: dir.display().to_string(),
                reason: "no *.cedar policy files (with no policy, everything is denied)".into(),
            });
        }
        let mut hash = Sha256::new();
        let mut cedar = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(&name);
            let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name.as_bytes());
            hash.update((text.len() as u64).to_le_bytes());
            hash.update(text.as_bytes());
            cedar.push((name, text));
        }
        let limits_path = dir.join(LIMITS_FILE);
        let limits = match std::fs::read_to_string(&limits_path) {
            Ok(text) => {
                hash.update(b"\0limits\0");
                hash.update(text.as_bytes());
                Some(text)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(read_err(&limits_path, e)),
        };
        Ok(Self {
            cedar,
            limits,
            digest: hash.finalize().into(),
        })
    }
}

/// One installed policy set, with its decision cache.
struct Loaded {
    generation: u64,
    policies: PolicySet,
    policy_count: usize,
    limits: Arc<DecryptLimits>,
    files: Vec<String>,
    loaded_at: SystemTime,
    digest: [u8; 32],
    cache: DecisionCache,
}

impl Loaded {
    /// Builds a set from a snapshot: every file must parse and validate (a set missing
    /// one file could lack a `forbid` that another file's `permit` relies on).
    fn build(
        engine: &Engine,
        dir: &Path,
        snap: Snapshot,
        generation: u64,
        previous_limits: Option<&Arc<DecryptLimits>>,
    ) -> Result<Self, PolicyError> {
        let mut policies = PolicySet::new();
        let mut policy_count = 0;
        let mut files = Vec::with_capacity(snap.cedar.len() + 1);
        for (name, text) in &snap.cedar {
            policy_count += engine
                .add_file(name, text, &mut policies)
                .map_err(|reason| PolicyError::Invalid {
                    path: dir.join(name).display().to_string(),
                    reason,
                })?;
            files.push(name.clone());
        }
        if policy_count == 0 {
            return Err(PolicyError::Invalid {
                path: dir.display().to_string(),
                reason: "the *.cedar files hold no policy (everything would be denied)".into(),
            });
        }
        let limits = match &snap.limits {
            None => DecryptLimits::unlimited(),
            Some(text) => {
                files.push(LIMITS_FILE.to_owned());
                DecryptLimits::parse(text).map_err(|reason| PolicyError::Invalid {
                    path: dir.join(LIMITS_FILE).display().to_string(),
                    reason,
                })?
            }
        };
        // Unchanged limits keep their `Arc`, so the decrypt guard keeps its buckets.
        let limits = match previous_limits {
            Some(prev) if **prev == limits => Arc::clone(prev),
            _ => Arc::new(limits),
        };
        Ok(Self {
            generation,
            policies,
            policy_count,
            limits,
            files,
            loaded_at: SystemTime::now(),
            digest: snap.digest,
            cache: DecisionCache::new(),
        })
    }
}

/// Reload bookkeeping (one reload at a time).
struct ReloadState {
    /// Digest of the last contents refused, so that they are reported once.
    refused_digest: Option<[u8; 32]>,
    last_error: Option<String>,
}

/// Decides requests against the policy directory's Cedar policies. Cheap to share
/// (`Arc`); [`Authorizer::authorize`] takes no lock but a shard's read lock of the
/// decision cache.
pub struct Authorizer {
    dir: PathBuf,
    engine: Engine,
    current: ArcSwap<Loaded>,
    reload: Mutex<ReloadState>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("dir", &self.dir)
            .field("generation", &self.current.load().generation)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// Loads every `*.cedar` file in `dir` (and `limits.toml`, if present).
    ///
    /// # Errors
    /// [`PolicyError::Read`] if the directory or a file cannot be read;
    /// [`PolicyError::Invalid`] naming the file and the reason if any file does not
    /// parse or validate against the schema, or if there is no policy at all.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let engine = Engine::new().map_err(|reason| PolicyError::Invalid {
            path: "policies/schema.cedarschema (built in)".into(),
            reason,
        })?;
        let snap = Snapshot::read(dir)?;
        let loaded = Loaded::build(&engine, dir, snap, 1, None)?;
        tracing::info!(
            dir = %dir.display(),
            files = ?loaded.files,
            policies = loaded.policy_count,
            "authorization policies loaded"
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            engine,
            current: ArcSwap::from_pointee(loaded),
            reload: Mutex::new(ReloadState {
                refused_digest: None,
                last_error: None,
            }),
        })
    }

    /// Re-reads the directory and installs its contents if they changed (any file
    /// added, removed or edited: names and contents are hashed). If they do not load, the
    /// last good set stays, the error is logged (`tracing::error!`, once per distinct
    /// content) and shown by [`Authorizer::status`]. Returns whether a new set was
    /// installed.
    pub fn reload(&self) -> bool {
        let mut st = self.reload.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current.load_full();
        let snap = match Snapshot::read(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                let msg = error_text(&e);
                if st.last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, generation = current.generation,
                        "authorization policies not reloaded; keeping the last good set");
                }
                st.last_error = Some(msg);
                st.refused_digest = None;
                return false;
            }
        };
        if snap.digest == current.digest {
            // Back to what is installed (perhaps after a refused edit).
            st.last_error = None;
            st.refused_digest = None;
            return false;
        }
        if st.refused_digest == Some(snap.digest) {
            return false;
        }
        let digest = snap.digest;
        match Loaded::build(
            &self.engine,
            &self.dir,
            snap,
            current.generation + 1,
            Some(&current.limits),
        ) {
            Ok(next) => {
                tracing::info!(
                    generation = next.generation,
                    files = ?next.files,
                    policies = next.policy_count,
                    "authorization policies reloaded"
                );
                self.current.store(Arc::new(next));
                st.last_error = None;
                st.refused_digest = None;
                true
            }
            Err(e) => {
                let msg = error_text(&e);
                tracing::error!(error = %msg, generation = current.generation,
                    "authorization policies not reloaded; keeping the last good set");
                st.last_error = Some(msg);
                st.refused_digest = Some(digest);
                false
            }
        }
    }

    /// Spawns a task that calls [`Authorizer::reload`] every `interval` (at least
    /// 10 ms), on the blocking pool. The task holds a [`Weak`] reference and ends once
    /// the `Authorizer` is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let interval = interval.max(MIN_WATCH_INTERVAL);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // immediate; the files were just read
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else {
                    break;
                };
                if tokio::task::spawn_blocking(move || this.reload())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    }

    /// Decides one request. Cached: repeated questions cost a hash and a shard's read
    /// lock; a new question costs a Cedar evaluation (see `tests::timing`).
    pub fn authorize(&self, req: &AuthzRequest<'_>) -> Decision {
        let set = self.current.load();
        if let Some(d) = set.cache.get(req) {
            return d;
        }
        let d = self.engine.evaluate(&set.policies, req);
        set.cache.insert(req, d.clone());
        d
    }

    /// What is loaded, and the last refused change.
    pub fn status(&self) -> PolicyStatus {
        let set = self.current.load();
        let last_error = self
            .reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_error
            .clone();
        PolicyStatus {
            generation: set.generation,
            dir: self.dir.clone(),
            files: set.files.clone(),
            policies: set.policy_count,
            digest: hex::encode(set.digest),
            loaded_at: set.loaded_at,
            last_error,
            cached_decisions: set.cache.len(),
        }
    }

    /// The decrypt ceiling for `identity` (its own, else the default), `None` if
    /// unlimited.
    pub fn decrypt_limit(&self, identity: &str) -> Option<RateLimit> {
        self.current.load().limits.for_identity(identity)
    }

    /// The installed decrypt limits.
    pub fn limits(&self) -> Arc<DecryptLimits> {
        Arc::clone(&self.current.load().limits)
    }

    fn current_set(&self) -> arc_swap::Guard<Arc<Loaded>> {
        self.current.load()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod configmap_tests {
    use super::Snapshot;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Version `v` of a two-file set, in its own `..<v>` directory.
    fn version(root: &Path, v: &str) {
        let d = root.join(format!("..{v}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["a.cedar", "b.cedar"] {
            std::fs::write(d.join(f), format!("// {v}\n")).unwrap();
        }
    }

    /// Points `..data` at `..<v>` atomically (a new symlink renamed over the old).
    fn swap(root: &Path, v: &str) {
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..{v}"), &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
    }

    #[test]
    fn a_configmap_swap_never_yields_a_mixed_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        version(root, "v1");
        version(root, "v2");
        swap(root, "v1");
        for f in ["a.cedar", "b.cedar"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), root.join(f)).unwrap();
        }
        /// Stops the swapper however the reader ends (a failed assertion included).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop = AtomicBool::new(false);
        let mixed = std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    swap(root, if n.is_multiple_of(2) { "v1" } else { "v2" });
                }
            });
            let _stop = Stop(&stop);
            (0..3000)
                .filter_map(|_| {
                    let snap = Snapshot::read(root).ok()?;
                    let texts: Vec<String> = snap.cedar.into_iter().map(|(_, t)| t).collect();
                    (texts.len() != 2 || texts[0] != texts[1]).then_some(texts)
                })
                .next()
        });
        assert_eq!(mixed, None, "a snapshot mixed two versions");
    }
}
