//! The sidecar a test talks to, in its two forms: [`Sidecar`], a real `fieldkey serve`
//! process (the built binary, started through [`Builder`] with the config, data
//! directory, environment and log file a test wants), and [`InProcess`], the gRPC routes
//! of a [`fieldkey::service::Context`] served on loopback TCP inside the test process.
//! Also the `fieldkey` client commands run as processes ([`run_cli`]).
//!
//! Authorization is ON by default, as production runs: a sidecar process serves the
//! repository's example policies (`policies/`) with the application's identity on the
//! local listener (`policies/app.cedar`). A test that needs other grants names its own
//! policy directory ([`Builder::policies`]); one about authorization being off says so
//! ([`Builder::authz_off`]). Other identities reach a sidecar through `l5d-client-id`
//! when its configuration has [`TRUST_MESH`] (as the admin sidecar behind Linkerd).
//!
//! What it does NOT do: create key stores or make certificates (each test states its
//! own setup), or assert anything about what the sidecar answers; the only checks here
//! are that it started and stopped.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tonic::transport::Channel;

/// The built `fieldkey` binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_fieldkey");

/// How long a sidecar may take to stop on SIGTERM or to die at an injected fault.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// The repository's example policies (`policies/`): what most tests run under.
pub fn example_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A policy directory for one test, `dir/policies`: the example policies and `extra`
/// files (name, content), for a test that needs a grant the examples do not give.
pub fn example_policies_plus(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let to = dir.join("policies");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(example_policies()).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "cedar" || x == "cedarschema" || x == "toml")
        {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    for (name, text) in extra {
        std::fs::write(to.join(name), text).unwrap();
    }
    to
}

/// Configuration that makes a sidecar take the caller's identity from `l5d-client-id`
/// (as the admin sidecar behind Linkerd does, `deploy/k8s/base/config/admin.toml`), so
/// a test can call as the operator, erasure or auditor identity
/// ([`super::grpc::as_id`]); calls without the header keep the local identity.
/// It ends inside its `[listen]` table: a test may add keys of that table right after it.
pub const TRUST_MESH: &str =
    "[authz]\ntrust_linkerd_identity = true\n[listen]\ntcp_behind_linkerd = true\n";

/// The authorization a sidecar process runs with.
#[derive(Debug, Clone)]
enum Authz {
    /// The example policies, the local listener as the application (the default).
    Examples,
    /// A test's own policy directory, the local listener as the application.
    Dir(PathBuf),
    /// Off: whatever the configuration says (no `authz.policies`: every caller may do
    /// everything). Only for tests about that mode.
    Off,
}

/// Runs a `fieldkey` client command, against the sidecar at `addr` (`FIELDKEY_ADDR`) or
/// offline, and returns its output.
pub fn run_cli(addr: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(a) = addr {
        cmd.env("FIELDKEY_ADDR", a);
    }
    cmd.output().unwrap()
}

/// The options of a `fieldkey serve` process: `fieldkey serve` with the arguments given,
/// `RUST_LOG=info`, the environment given, stderr captured (or to a file).
pub struct Builder {
    args: Vec<OsString>,
    env: Vec<(String, Option<OsString>)>,
    log_file: Option<PathBuf>,
    metrics: bool,
    authz: Authz,
    log_level: &'static str,
}

impl Builder {
    /// Authorization by the policies in `dir` (a test's own set, for a test that needs
    /// grants the example policies do not give) instead of the example policies.
    pub fn policies(mut self, dir: &Path) -> Self {
        self.authz = Authz::Dir(dir.to_owned());
        self
    }

    /// No policy directory from the builder: the configuration decides (authorization
    /// off unless it names one). For tests about authorization being off.
    pub fn authz_off(mut self) -> Self {
        self.authz = Authz::Off;
        self
    }

    /// `RUST_LOG` of the process (default `info`).
    pub fn log_level(mut self, level: &'static str) -> Self {
        self.log_level = level;
        self
    }

    /// Writes `text` as `dir/fieldkey.toml` and serves with it (`--config`).
    pub fn config_text(self, dir: &Path, text: &str) -> Self {
        let path = dir.join("fieldkey.toml");
        std::fs::write(&path, text).unwrap();
        self.config(&path)
    }

    /// `--listen 127.0.0.1:0`: gRPC on a free port of loopback TCP.
    pub fn any_port(self) -> Self {
        self.arg("--listen").arg("127.0.0.1:0")
    }

    /// `--data-dir dir`: the embedded defaults under `dir`.
    pub fn data_dir(self, dir: &Path) -> Self {
        self.arg("--data-dir").arg(dir)
    }

    /// `--config path`.
    pub fn config(self, path: &Path) -> Self {
        self.arg("--config").arg(path)
    }

    /// One more argument to `fieldkey serve`.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Sets an environment variable of the process.
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.to_owned(), Some(value.into())));
        self
    }

    /// Removes an environment variable from the process (one the test runner may have).
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.push((key.to_owned(), None));
        self
    }

    /// Sets `key` when `value` is given, removes it otherwise.
    pub fn env_opt(self, key: &str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.env(key, v),
            None => self.env_remove(key),
        }
    }

    /// stderr to the file `path` (kept after the process) instead of memory.
    pub fn log_file(mut self, path: &Path) -> Self {
        self.log_file = Some(path.to_owned());
        self
    }

    /// Waits also for the metrics address (the config serves metrics).
    pub fn with_metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Starts the process and waits until it prints the addresses it serves on.
    pub fn start(self) -> Sidecar {
        // FIELDKEY_TEST_BIN runs another build (an older release, to watch a test fail
        // on the code before its fix); the one built with the tests by default.
        let bin = std::env::var_os("FIELDKEY_TEST_BIN").unwrap_or_else(|| BIN.into());
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(&self.args)
            .env("RUST_LOG", self.log_level)
            .stdout(Stdio::piped());
        let policies = match &self.authz {
            Authz::Examples => Some(example_policies()),
            Authz::Dir(d) => Some(d.clone()),
            Authz::Off => None,
        };
        match policies {
            Some(dir) => {
                cmd.env("FIELDKEY_POLICIES", dir)
                    .env("FIELDKEY_LOCAL_IDENTITY", super::grpc::ids::APP);
            }
            None => {
                cmd.env_remove("FIELDKEY_POLICIES");
            }
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        match &self.log_file {
            Some(path) => cmd.stderr(std::fs::File::create(path).unwrap()),
            None => cmd.stderr(Stdio::piped()),
        };
        let mut child = cmd.spawn().unwrap();
        let log = match self.log_file {
            Some(path) => Log::File(path),
            None => Log::capture(child.stderr.take().unwrap()),
        };
        let mut s = Sidecar {
            child,
            addr: String::new(),
            metrics: None,
            log,
        };
        let mut lines = BufReader::new(s.child.stdout.take().unwrap()).lines();
        while s.addr.is_empty() || (self.metrics && s.metrics.is_none()) {
            let Some(Ok(line)) = lines.next() else {
                let _ = s.child.kill();
                let _ = s.child.wait();
                panic!("sidecar printed nothing; log:\n{}", s.finish_log())
            };
            if let Some(a) = line.strip_prefix("fieldkey listening on tcp://") {
                s.addr = format!("http://{a}");
            } else if let Some(a) = line.strip_prefix("fieldkey metrics on http://") {
                s.metrics = Some(a.to_owned());
            } else {
                panic!("{line}");
            }
        }
        s
    }
}

/// The log (stderr) of a running sidecar.
enum Log {
    /// Read by a thread into memory while the process runs.
    Captured {
        text: Arc<Mutex<String>>,
        reader: Option<std::thread::JoinHandle<()>>,
    },
    /// Written to a file, which stays after the process.
    File(PathBuf),
}

impl Log {
    fn capture(mut err: std::process::ChildStderr) -> Self {
        let text = Arc::<Mutex<String>>::default();
        let t2 = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self::Captured {
            text,
            reader: Some(reader),
        }
    }
}

/// A running `fieldkey serve` process, killed when dropped.
pub struct Sidecar {
    /// The process.
    pub child: Child,
    /// gRPC address, `http://127.0.0.1:port`.
    pub addr: String,
    /// Metrics address, `127.0.0.1:port`, when it serves metrics.
    pub metrics: Option<String>,
    log: Log,
}

impl Sidecar {
    /// The options of a new sidecar.
    pub fn builder() -> Builder {
        Builder {
            args: Vec::new(),
            env: Vec::new(),
            log_file: None,
            metrics: false,
            authz: Authz::Examples,
            log_level: "info",
        }
    }

    /// A gRPC channel to the sidecar.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Runs a `fieldkey` client command against this sidecar.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(Some(&self.addr), args)
    }

    /// What the sidecar has logged so far.
    pub fn log(&self) -> String {
        match &self.log {
            Log::Captured { text, .. } => text.lock().unwrap().clone(),
            Log::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// The whole log of a process that has exited.
    fn finish_log(&mut self) -> String {
        if let Log::Captured { reader, .. } = &mut self.log
            && let Some(r) = reader.take()
        {
            let _ = r.join();
        }
        self.log()
    }

    /// (status code, body) of GET `path` on the metrics port.
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(self.metrics.as_deref().unwrap()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }

    /// SIGTERM, then the exit status and the whole log.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + STOP_WITHIN;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "sidecar did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.finish_log())
    }

    /// SIGTERM, and waits until it has stopped.
    pub fn stop(self) {
        let _ = self.terminate();
    }

    /// Waits for the process to die on its own (fault injection) and returns how.
    pub fn wait_dead(mut self) -> ExitStatus {
        let deadline = Instant::now() + STOP_WITHIN;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar did not abort at the fault; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gRPC routes of a service context served on a free port of loopback TCP, inside
/// the test process; stopped when dropped.
pub struct InProcess {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    /// Serves the routes of `ctx` with authorization ON, as production runs: the
    /// example policies, callers on loopback are the application (`policies/app.cedar`)
    /// unless they name another identity in `l5d-client-id` (trusted here, see
    /// [`super::grpc::as_id`]), decisions audited to `ctx.audit`.
    pub async fn start(ctx: fieldkey::service::Context) -> Result<Self> {
        let authz = Arc::new(fieldkey::policy::authz::Authorizer::load(
            &example_policies(),
        )?);
        let gate = Arc::new(fieldkey::service::gate::Gate::new(
            Some(authz),
            Some(ctx.audit.clone()),
            fieldkey::service::gate::IdentityConfig {
                local_identity: Arc::from(super::grpc::ids::APP),
                trust_linkerd: true,
            },
        ));
        // Behind the (test's stand-in for the) Linkerd proxy: the only listener where a
        // trusted `l5d-client-id` names the caller.
        Self::start_on(ctx.with_gate(gate), true).await
    }

    /// Serves the routes of `ctx` with the gate it carries: a test's own authorization
    /// set-up, or none at all (the context of `Parts::context()` lets every caller do
    /// everything; a test using that says why). On a plain loopback listener.
    pub async fn start_as_given(ctx: fieldkey::service::Context) -> Result<Self> {
        Self::start_on(ctx, false).await
    }

    /// Serves the routes of `ctx` with the gate it carries on a listener declared behind
    /// the Linkerd proxy (the only one where a trusted `l5d-client-id` names the caller;
    /// the test's loopback client stands for the proxy).
    pub async fn start_behind_linkerd(ctx: fieldkey::service::Context) -> Result<Self> {
        Self::start_on(ctx, true).await
    }

    async fn start_on(ctx: fieldkey::service::Context, behind_linkerd: bool) -> Result<Self> {
        let routes = fieldkey::service::routes(ctx).await?;
        let listener = fieldkey::transport::bind_tcp("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = rx.await;
            };
            if behind_linkerd {
                fieldkey::transport::linkerd::serve_tcp_behind_linkerd(routes, listener, stop)
                    .await
                    .unwrap();
            } else {
                fieldkey::transport::serve_tcp(routes, listener, stop)
                    .await
                    .unwrap();
            }
        });
        Ok(Self {
            addr,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(self.url())?.connect().await?)
    }

    /// Stops the server and waits until it has.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
