//! [`BaoServer`]: a real OpenBao dev server (`bao server -dev`, in memory) on a free
//! loopback port, one per test, with Transit mounted at `transit` and a derived
//! `aes256-gcm96` default key; killed when dropped. Its binary is
//! `FIELDKEY_TEST_BAO_BIN` (exported by `scripts/test.sh`), else `bao` on `PATH`.
//!
//! Also the raw administration tests need, with the root token: any API call
//! ([`BaoServer::api`]), keys, seal / unseal, an AppRole with a policy, namespaces.
//!
//! What it does NOT give: persistence (a restarted server is a new, empty one) or a
//! cluster; the dev server's root token is all-powerful, so a test about least
//! privilege logs in with an AppRole restricted by a policy ([`BaoServer::approle`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use fieldkey::kms::openbao::{OpenBaoAuth, OpenBaoKms, OpenBaoSettings};

/// The Transit mount every server gets.
pub const MOUNT: &str = "transit";
/// The default key every server gets (derived aes256-gcm96).
pub const DEFAULT_KEY: &str = "fieldkey-default";

/// The least-privilege policy of the sidecar (the text in `docs/OPERATIONS.md`) for
/// a store tagged `store_tag`, the default mount and the default deletion records.
pub fn sidecar_policy(store_tag: &str) -> String {
    format!(
        r#"
path "{MOUNT}/keys/*" {{ capabilities = ["read"] }}
path "{MOUNT}/encrypt/*" {{ capabilities = ["update"] }}
path "{MOUNT}/decrypt/*" {{ capabilities = ["update"] }}
path "{MOUNT}/keys/fieldkey-{store_tag}-epoch-*" {{ capabilities = ["create", "read", "update", "delete"] }}
path "secret/data/fieldkey/transit-deletions/{MOUNT}/*" {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/fieldkey/transit-deletions/{MOUNT}/*" {{ capabilities = ["list", "delete"] }}
"#
    )
}

/// A running `bao server -dev`.
pub struct BaoServer {
    /// `http://127.0.0.1:<port>` (`https://` with [`BaoServer::start_tls`]).
    pub addr: String,
    /// The dev root token.
    pub root_token: String,
    /// The dev server's single unseal key (printed on its standard output).
    pub unseal_key: String,
    /// The CA of a TLS server (`-dev-tls`).
    pub ca_file: Option<PathBuf>,
    /// A file holding the root token (the settings' `token_file`).
    pub token_file: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    http: reqwest::Client,
}

/// The OpenBao binary tests run.
pub fn bao_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FIELDKEY_TEST_BAO_BIN") {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("bao"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no OpenBao binary: set FIELDKEY_TEST_BAO_BIN or run the tests through scripts/test.sh, which installs it"
            )
        })
}

impl BaoServer {
    /// A plain-HTTP dev server on 127.0.0.1.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// A dev server with TLS (`-dev-tls`: a CA and certificate made by OpenBao, the CA
    /// at [`BaoServer::ca_file`]).
    pub async fn start_tls() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Self {
        let mut last = None;
        // A "free" port can be taken before the server binds it: try again.
        for _ in 0..5 {
            match Self::try_start(tls).await {
                Ok(s) => return s,
                Err(e) => {
                    eprintln!("bao dev server did not start, retrying: {e:#}");
                    last = Some(e);
                }
            }
        }
        panic!("bao dev server did not start: {:#}", last.unwrap());
    }

    async fn try_start(tls: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port_pair()?;
        let root_token = format!("root-{}", hex::encode(super::rand_bytes::<12>()));
        let log = std::fs::File::create(dir.path().join("bao.log"))?;
        let mut cmd = Command::new(bao_bin());
        cmd.arg("server")
            .arg("-dev")
            .arg("-dev-no-store-token")
            .arg(format!("-dev-root-token-id={root_token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            // The token helper and anything else that writes to HOME stay in the tempdir.
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if tls {
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
        }
        let mut child = cmd.spawn().context("cannot start bao")?;
        let out = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().context("no stdout")?;
        let out2 = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut o) = out2.lock() {
                    o.push_str(&line);
                    o.push('\n');
                }
            }
        });
        let scheme = if tls { "https" } else { "http" };
        let ca_file = tls.then(|| dir.path().join("vault-ca.pem"));
        let token_file = dir.path().join("root-token");
        std::fs::write(&token_file, &root_token)?;
        let mut server = Self {
            addr: format!("{scheme}://127.0.0.1:{port}"),
            root_token,
            unseal_key: String::new(),
            ca_file,
            token_file,
            dir,
            child: Some(child),
            http: reqwest::Client::new(),
        };
        // Wait for the banner (it carries the unseal key and follows the listener).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(key) = out
                .lock()
                .ok()
                .and_then(|o| unseal_key_in(&o).map(str::to_owned))
            {
                server.unseal_key = key;
                break;
            }
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "bao exited ({status}): {}",
                    std::fs::read_to_string(server.dir.path().join("bao.log")).unwrap_or_default()
                );
            }
            if std::time::Instant::now() > deadline {
                bail!("bao printed no unseal key within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &server.ca_file {
            let pem = std::fs::read(ca).context("dev-tls wrote no CA")?;
            http = http.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem)?);
        }
        server.http = http.build()?;
        let mut healthy = false;
        for _ in 0..300 {
            if let Ok(r) = server.http.get(server.url("sys/health")).send().await
                && r.status().as_u16() == 200
            {
                healthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !healthy {
            bail!("bao did not become healthy");
        }
        server
            .api_ok(
                "POST",
                &format!("sys/mounts/{MOUNT}"),
                Some(serde_json::json!({"type": "transit"})),
            )
            .await?;
        server.create_key(DEFAULT_KEY, true, "aes256-gcm96").await?;
        Ok(server)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Settings for this server: the default key, the root token from a file, the CA
    /// of a TLS server, and patient deadlines (for tests that are not about them).
    pub fn settings(&self) -> OpenBaoSettings {
        let mut s = OpenBaoSettings::new(self.addr.clone(), DEFAULT_KEY);
        s.auth = OpenBaoAuth::Token {
            token_file: Some(self.token_file.clone()),
        };
        s.ca_file = self.ca_file.clone();
        s.operation_timeout_ms = 30_000;
        s.attempt_timeout_ms = 10_000;
        s.connect_timeout_ms = 2_000;
        s.max_attempts = 3;
        s.initial_backoff_ms = 10;
        s
    }

    /// The provider connected with [`BaoServer::settings`].
    pub async fn kms(&self) -> OpenBaoKms {
        OpenBaoKms::connect(&self.settings())
            .await
            .expect("connect to the bao dev server")
    }

    /// A raw API call with the root token: (HTTP status, JSON body or null).
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        self.api_in(None, method, path, body).await
    }

    /// [`BaoServer::api`] in namespace `ns`.
    pub async fn api_in(
        &self,
        ns: Option<&str>,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("X-Vault-Token", &self.root_token);
        if let Some(ns) = ns {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    }

    /// [`BaoServer::api`] that must succeed (2xx); its JSON.
    pub async fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let (status, json) = self.api(method, path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: HTTP {status}: {json}");
        }
        Ok(json)
    }

    /// Creates Transit key `name` in the default mount.
    pub async fn create_key(&self, name: &str, derived: bool, kind: &str) -> Result<()> {
        self.api_ok(
            "POST",
            &format!("{MOUNT}/keys/{name}"),
            Some(serde_json::json!({ "type": kind, "derived": derived })),
        )
        .await
        .map(|_| ())
    }

    /// The key's configuration (`GET transit/keys/<name>`), `None` if there is none.
    pub async fn key(&self, name: &str) -> Result<Option<serde_json::Value>> {
        let (status, json) = self
            .api("GET", &format!("{MOUNT}/keys/{name}"), None)
            .await?;
        Ok(match status {
            200 => Some(json["data"].clone()),
            404 => None,
            other => bail!("key read: HTTP {other}: {json}"),
        })
    }

    /// Seals the server (every call then answers 503).
    pub async fn seal(&self) -> Result<()> {
        self.api_ok("PUT", "sys/seal", None).await.map(|_| ())
    }

    /// Unseals it with the dev unseal key.
    pub async fn unseal(&self) -> Result<()> {
        let json = self
            .api_ok(
                "PUT",
                "sys/unseal",
                Some(serde_json::json!({ "key": self.unseal_key })),
            )
            .await?;
        if json["sealed"] != serde_json::json!(false) {
            bail!("still sealed: {json}");
        }
        Ok(())
    }

    /// Enables AppRole (once), writes policy `name` with `policy_hcl`, and creates role
    /// `name` with it (`token_ttl` / `token_max_ttl` if given, e.g. "2s"). Returns
    /// settings that log in with it: its role id, and a fresh secret id in a file.
    pub async fn approle(
        &self,
        name: &str,
        policy_hcl: &str,
        token_ttl: Option<&str>,
    ) -> Result<OpenBaoSettings> {
        let (status, auths) = self.api("GET", "sys/auth", None).await?;
        if status != 200 || auths["data"]["approle/"].is_null() {
            self.api_ok(
                "POST",
                "sys/auth/approle",
                Some(serde_json::json!({"type": "approle"})),
            )
            .await?;
        }
        self.api_ok(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(serde_json::json!({ "policy": policy_hcl })),
        )
        .await?;
        let mut role = serde_json::json!({ "token_policies": [name] });
        if let Some(ttl) = token_ttl {
            role["token_ttl"] = ttl.into();
            role["token_max_ttl"] = ttl.into();
        }
        self.api_ok("POST", &format!("auth/approle/role/{name}"), Some(role))
            .await?;
        let role_id = self
            .api_ok("GET", &format!("auth/approle/role/{name}/role-id"), None)
            .await?["data"]["role_id"]
            .as_str()
            .context("no role_id")?
            .to_owned();
        let secret = self
            .api_ok("POST", &format!("auth/approle/role/{name}/secret-id"), None)
            .await?["data"]["secret_id"]
            .as_str()
            .context("no secret_id")?
            .to_owned();
        let secret_id_file = self.dir.path().join(format!("{name}.secret-id"));
        std::fs::write(&secret_id_file, format!("{secret}\n"))?;
        let mut s = self.settings();
        s.auth = OpenBaoAuth::AppRole {
            role_id,
            secret_id_file,
            mount: "approle".into(),
        };
        Ok(s)
    }

    /// The provider's deletion record of `key` (default mount and record location),
    /// JSON null if there is none.
    pub async fn deletion_record(&self, key: &str) -> Result<serde_json::Value> {
        let (status, json) = self
            .api(
                "GET",
                &format!("secret/data/fieldkey/transit-deletions/{MOUNT}/{key}"),
                None,
            )
            .await?;
        Ok(match status {
            404 => serde_json::Value::Null,
            200 => json["data"]["data"].clone(),
            other => bail!("record read: HTTP {other}: {json}"),
        })
    }

    /// Moves the deletion date of `key` (scheduled by the provider) into the past, as
    /// if its window were over, through the server's API.
    pub async fn backdate_deletion(&self, key: &str) -> Result<()> {
        let mut r = self.deletion_record(key).await?;
        if r.is_null() {
            bail!("no deletion record for {key}");
        }
        r["deletion_date_unix_ms"] = 1.into();
        self.api_ok(
            "POST",
            &format!("secret/data/fieldkey/transit-deletions/{MOUNT}/{key}"),
            Some(serde_json::json!({ "data": r })),
        )
        .await
        .map(|_| ())
    }

    /// Writes `contents` to a file in the server's temporary directory.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// The server's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (a KMS that is gone: connections refused).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BaoServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unseal_key_in(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Unseal Key:"))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// A loopback port that is free, with the next one free too (the dev server's
/// cluster listener takes port + 1).
fn free_port_pair() -> Result<u16> {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free pair of loopback ports")
}
