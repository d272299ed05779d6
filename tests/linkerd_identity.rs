//! Linkerd's `l5d-client-id` as an attacker sends it (review finding 2, issue 19), over
//! real sockets: from another network namespace (made here: `ip netns`, a veth pair,
//! addresses in 10.0.0.0/8), from the loopback, and from the host's own address, on the
//! listener declared behind the Linkerd proxy and on an ordinary plaintext listener,
//! with the header trusted and not.
//!
//! The client side of "another pod" is a small Python relay run with `ip netns exec`
//! in the namespace: it accepts on a Unix socket (the file system is shared) and
//! connects over TCP from the namespace's address, so the test's own gRPC client speaks
//! through it. Needs root and iproute2; without them the test FAILS (it never skips).
//! The namespace and the veth pair are removed when the test ends, failed or not.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use common::grpc::reason;
use fieldkey::proto::pb::WhoAmIRequest;
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::service::gate::{Gate, IdentityConfig};
use fieldkey::{Keyring, KeyringConfig};
use tonic::Code;
use tonic::transport::Channel;

const LOCAL: &str = "spiffe://example.org/ns/shop/sa/web";
const OPERATOR: &str = "keyops.ops.serviceaccount.identity.linkerd.cluster.local";

/// A network namespace with a veth pair to this one: `host` here, `peer` there.
struct NetNs {
    name: String,
    host_if: String,
    host: IpAddr,
    peer: IpAddr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2 is required): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed (this test needs root to make a network namespace): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        // 10.<128 + pid % 100>.<n>.0/30: distinct per test of this process.
        let (b, c) = (128 + pid % 100, n % 250);
        let ns = Self {
            name: format!("fk-ns-{tag}"),
            host_if: format!("fkh{tag}"),
            host: format!("10.{b}.{c}.1").parse().unwrap(),
            peer: format!("10.{b}.{c}.2").parse().unwrap(),
        };
        let peer_if = format!("fkp{tag}");
        // Registered for cleanup before anything exists: Drop removes what was made.
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let nsip = |args: &[&str]| {
            let mut a = vec!["-n", ns.name.as_str()];
            a.extend_from_slice(args);
            ip(&a);
        };
        nsip(&["addr", "add", &format!("{}/30", ns.peer), "dev", &peer_if]);
        nsip(&["link", "set", &peer_if, "up"]);
        nsip(&["link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it ours; the
        // explicit delete covers a half-made setup.
        for args in [
            vec!["link", "del", self.host_if.as_str()],
            vec!["netns", "del", self.name.as_str()],
        ] {
            let _ = Command::new("ip")
                .args(&args)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Accepts on a Unix socket, connects to `target` over TCP, relays both ways.
const RELAY: &str = r#"
import socket, sys, threading
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(16)
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
while True:
    c, _ = srv.accept()
    t = socket.create_connection((host, port))
    threading.Thread(target=pump, args=(c, t), daemon=True).start()
    threading.Thread(target=pump, args=(t, c), daemon=True).start()
"#;

/// A gRPC client inside a network namespace (through the relay); killed when dropped.
struct NsClient {
    relay: Child,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NsClient {
    fn start(ns: &NetNs, target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        let relay = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", RELAY])
            .arg(&path)
            .arg(target.ip().to_string())
            .arg(target.port().to_string())
            .spawn()
            .expect("cannot start the relay (ip netns exec python3)");
        let mut c = Self {
            relay,
            path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Listening, not just bound (the socket file appears at bind, before listen).
        while std::os::unix::net::UnixStream::connect(&c.path).is_err() {
            if let Some(status) = c.relay.try_wait().unwrap() {
                panic!("the relay in the namespace exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not listen in 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        c
    }

    async fn channel(&self) -> Channel {
        let path = self.path.clone();
        tonic::transport::Endpoint::try_from("http://relay")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .unwrap()
    }
}

impl Drop for NsClient {
    fn drop(&mut self) {
        let _ = self.relay.kill();
        let _ = self.relay.wait();
    }
}

/// Which listener serves.
#[derive(Clone, Copy)]
enum Listener {
    /// `listen.tcp` as the application's pod-local listener.
    Plain,
    /// `listen.tcp` with `tcp_behind_linkerd = true`.
    BehindLinkerd,
}

/// Serves the full routes (authorization off, so only identity decides) on
/// `0.0.0.0:<free port>`; stops when dropped.
struct Server {
    port: u16,
    store: Arc<dyn fieldkey::store::KeyStore>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// The audit records of refused identities, once there are `n` of them.
    async fn refusals(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<_> = self
                .store
                .audit_records(0, 100_000)
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.event.action == "authz.unauthenticated")
                .map(|r| {
                    let mut d = r.event.details.clone();
                    d["actor"] = r.event.actor.clone().into();
                    d["caller_ip"] = r.event.caller_ip.clone().into();
                    d
                })
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{n} refusals not audited in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn serve(listener: Listener, trust_linkerd: bool) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let store = common::sqlite_store(&dir).await?;
    let kms = common::local_kms(&dir)?;
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let parts = fieldkey::wiring::Parts::new(keyring, store.clone(), kms);
    let audit = Arc::new(parts.audit_log(fieldkey::audit::AuditConfig {
        window: Duration::from_secs(3600),
        checkpoint_every: Duration::from_secs(3600),
        executor: "test".into(),
    }));
    let gate = Arc::new(Gate::new(
        None,
        Some(audit),
        IdentityConfig {
            local_identity: Arc::from(LOCAL),
            trust_linkerd,
        },
    ));
    let routes = fieldkey::service::routes(parts.context().with_gate(gate)).await?;
    let tcp = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
    let port = tcp.local_addr()?.port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async {
        let _ = rx.await;
    };
    match listener {
        Listener::Plain => {
            tokio::spawn(fieldkey::transport::serve_tcp(routes, tcp, stop));
        }
        Listener::BehindLinkerd => {
            tokio::spawn(fieldkey::transport::linkerd::serve_tcp_behind_linkerd(
                routes, tcp, stop,
            ));
        }
    }
    Ok(Server {
        port,
        store,
        _stop: tx,
        _dir: dir,
    })
}

async fn tcp_channel(ip: IpAddr, port: u16) -> Channel {
    Channel::from_shared(format!("http://{}", SocketAddr::new(ip, port)))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `transport:identity` the server sees, with `header` as `l5d-client-id`.
async fn who(ch: &Channel, header: Option<&str>) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(WhoAmIRequest {});
    if let Some(h) = header {
        req.metadata_mut()
            .insert("l5d-client-id", h.parse().unwrap());
    }
    let me = KeysClient::new(ch.clone())
        .who_am_i(req)
        .await?
        .into_inner();
    Ok(format!("{}:{}", me.transport, me.identity))
}

fn refused(r: Result<String, tonic::Status>, why: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
            assert_eq!(reason(&s), why, "{s:?}");
        }
        Ok(seen) => panic!("served as {seen}, expected UNAUTHENTICATED {why}"),
    }
}

const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_header_from_another_pod_is_refused_on_the_plain_listener() -> Result<()> {
    let ns = NetNs::new();
    let s = serve(Listener::Plain, true).await?;
    let other_pod = NsClient::start(&ns, SocketAddr::new(ns.host, s.port));
    let ch = other_pod.channel().await;
    // Before the fix: served as the operator it named.
    refused(who(&ch, Some(OPERATOR)).await, "IDENTITY_HEADER_UNTRUSTED");
    // Also an empty one: any header is refused where it is not trusted.
    refused(who(&ch, Some("")).await, "IDENTITY_HEADER_UNTRUSTED");
    // Each attempt is an audit record naming the identity claimed, not served.
    let audited = s.refusals(2).await;
    assert_eq!(audited[0]["reason"], "IDENTITY_HEADER_UNTRUSTED");
    assert_eq!(audited[0]["claimed_identity"], OPERATOR);
    assert_eq!(audited[0]["actor"], "fieldkey:refused-identity");
    assert!(
        audited[0]["caller_ip"]
            .as_str()
            .is_some_and(|ip| !ip.is_empty())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_listener_refuses_every_caller_from_outside_the_pod() -> Result<()> {
    let ns = NetNs::new();
    for trust in [true, false] {
        let s = serve(Listener::BehindLinkerd, trust).await?;
        let other_pod = NsClient::start(&ns, SocketAddr::new(ns.host, s.port));
        let ch = other_pod.channel().await;
        refused(who(&ch, Some(OPERATOR)).await, "NOT_THROUGH_MESH_PROXY");
        // Without the header too: plaintext from another pod went around the proxy.
        refused(who(&ch, None).await, "NOT_THROUGH_MESH_PROXY");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_is_honoured_from_inside_the_pod_on_the_mesh_listener_only() -> Result<()> {
    let ns = NetNs::new();
    let mesh = serve(Listener::BehindLinkerd, true).await?;
    // Linkerd before 2.11 forwards from the loopback; 2.11 and later from the pod's
    // own address to itself (here: this namespace's address on the veth).
    for from in [LOOPBACK, ns.host] {
        let ch = tcp_channel(from, mesh.port).await;
        assert_eq!(
            who(&ch, Some(OPERATOR)).await?,
            format!("linkerd:{OPERATOR}")
        );
        assert_eq!(who(&ch, None).await?, format!("local:{LOCAL}"));
    }
    // The same header on the ordinary listener of the same pod is refused.
    let plain = serve(Listener::Plain, true).await?;
    let ch = tcp_channel(LOOPBACK, plain.port).await;
    refused(who(&ch, Some(OPERATOR)).await, "IDENTITY_HEADER_UNTRUSTED");
    assert_eq!(who(&ch, None).await?, format!("local:{LOCAL}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_trust_off_the_header_is_ignored_and_outsiders_still_refused() -> Result<()> {
    let ns = NetNs::new();
    let plain = serve(Listener::Plain, false).await?;
    let mesh = serve(Listener::BehindLinkerd, false).await?;
    for port in [plain.port, mesh.port] {
        let ch = tcp_channel(LOOPBACK, port).await;
        assert_eq!(who(&ch, Some(OPERATOR)).await?, format!("local:{LOCAL}"));
    }
    // From another pod: the plain listener ignores the header (it is for the pod's
    // own application; bind it to the loopback), the mesh listener refuses.
    let c = NsClient::start(&ns, SocketAddr::new(ns.host, plain.port));
    assert_eq!(
        who(&c.channel().await, Some(OPERATOR)).await?,
        format!("local:{LOCAL}")
    );
    let c = NsClient::start(&ns, SocketAddr::new(ns.host, mesh.port));
    refused(
        who(&c.channel().await, Some(OPERATOR)).await,
        "NOT_THROUGH_MESH_PROXY",
    );
    Ok(())
}
