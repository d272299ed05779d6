//! Authorization over mTLS with real certificate SANs: the mTLS listener, authorization
//! ON with the example policies of `policies/` (as production runs), and Cedar deciding
//! on the identity the certificate carries. An allowed identity is served; a denied one
//! gets PERMISSION_DENIED with its reason; a DNS SAN can never pass as a SPIFFE
//! principal (typed SANs, review finding 5 of issue 19), nor can an `l5d-client-id`
//! header over mTLS.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test code fails by panicking"
)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::grpc::reason;
use common::pki::{Ca, TLS13, ca, client_config, dns, leaf, mtls_channel, uri};
use fieldkey::policy::authz::Authorizer;
use fieldkey::proto::pb::{self, crypto_client::CryptoClient, keys_client::KeysClient};
use fieldkey::service::gate::{Gate, IdentityConfig};
use fieldkey::transport::mtls::{MtlsConfig, ReloadingConfig, serve_mtls};
use fieldkey::{Keyring, KeyringConfig};
use rcgen::SanType;
use tonic::Code;
use tonic::transport::Channel;

const APP: &str = "spiffe://example.org/ns/shop/sa/web";
const ANALYTICS: &str = "spiffe://example.org/ns/analytics/sa/export";
const OPS: &str = "spiffe://example.org/ns/ops/sa/keyops";

struct Env {
    addr: SocketAddr,
    ca: Ca,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn copy_policies(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "cedar" || x == "cedarschema" || x == "toml")
        {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// The mTLS listener with authorization on (the example policies), trusting the
/// Linkerd header (so that a test can show it has no effect over mTLS).
async fn env() -> Result<Env> {
    let dir = tempfile::tempdir()?;
    let policies = dir.path().join("policies");
    copy_policies(&policies);
    let ca = ca("fieldkey test CA");
    let (cert, key) = leaf(&ca, vec![dns("localhost")], false);
    let w = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let cfg = MtlsConfig {
        listen: "127.0.0.1:0".into(),
        cert_file: w("server.pem", &cert),
        key_file: w("server.key", &key),
        client_ca_file: w("clients-ca.pem", &ca.pem),
    };
    let store = common::sqlite_store(&dir).await?;
    let kms = common::local_kms(&dir)?;
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let parts = fieldkey::wiring::Parts::new(keyring, store, kms);
    let gate = Arc::new(Gate::new(
        Some(Arc::new(Authorizer::load(&policies)?)),
        None,
        IdentityConfig {
            local_identity: Arc::from(APP),
            trust_linkerd: true,
        },
    ));
    let routes = fieldkey::service::routes(parts.context().with_gate(gate)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tls = ReloadingConfig::watch(cfg, Duration::from_secs(3600))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_mtls(routes, listener, tls, async {
        let _ = rx.await;
    }));
    Ok(Env {
        addr,
        ca,
        _dir: dir,
        _stop: tx,
    })
}

/// A channel presenting a certificate with `sans`.
async fn as_cert(e: &Env, sans: Vec<SanType>) -> Result<Channel> {
    let (cert, key) = leaf(&e.ca, sans, false);
    mtls_channel(e.addr, client_config(&e.ca.pem, Some((&cert, &key)), TLS13)).await
}

fn with_header<T>(msg: T, l5d: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(id) = l5d {
        r.metadata_mut()
            .insert("l5d-client-id", id.parse().unwrap());
    }
    r
}

async fn create_tenant(ch: &Channel, tenant: &str, l5d: Option<&str>) -> Result<(), tonic::Status> {
    KeysClient::new(ch.clone())
        .create_tenant(with_header(
            pb::CreateTenantRequest {
                tenant_id: tenant.into(),
                kms_key_id: String::new(),
            },
            l5d,
        ))
        .await
        .map(|_| ())
}

async fn who(ch: &Channel) -> Result<String, tonic::Status> {
    let me = KeysClient::new(ch.clone())
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    Ok(format!("{}:{}", me.transport, me.identity))
}

async fn encrypt(ch: &Channel, tenant: &str) -> Result<Vec<u8>, tonic::Status> {
    CryptoClient::new(ch.clone())
        .encrypt(pb::EncryptRequest {
            tenant_id: tenant.into(),
            subject_id: "u1".into(),
            field: "email".into(),
            context: vec![].into(),
            plaintext: b"alice@example.org".to_vec().into(),
            format: 0,
        })
        .await
        .map(|r| r.into_inner().ciphertext.to_vec())
}

/// Whether TLS error `expected` is somewhere in `e`'s chain of sources (as itself, or
/// as the I/O error that carries it: hyper passes it on as its message).
fn failed_with(e: &(dyn std::error::Error + 'static), expected: &rustls::Error) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>() == Some(expected) {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
            && io.to_string() == expected.to_string()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether a call failed because the connection went away under it (a transport
/// error of the client, no status from the server).
fn closed_by_the_server(s: &tonic::Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(err) = cur {
        if err.downcast_ref::<tonic::transport::Error>().is_some() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, names: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
            assert_eq!(reason(&s), "PERMISSION_DENIED", "{s:?}");
            assert!(
                s.message().contains(names),
                "the reason names {names}: {}",
                s.message()
            );
        }
        Ok(v) => panic!("allowed ({v:?}), expected PERMISSION_DENIED"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_identities_get_exactly_their_policies() -> Result<()> {
    let e = env().await?;
    // The operator's SPIFFE id: tenant administration is allowed (operators.cedar).
    let ops = as_cert(&e, vec![uri(OPS), dns("keyops.ops.svc")]).await?;
    assert_eq!(who(&ops).await?, format!("mtls:{OPS}"));
    create_tenant(&ops, "acme", None).await?;
    // ... and data operations are not.
    denied(encrypt(&ops, "acme").await, OPS);
    // The analytics export may do neither (analytics.cedar).
    let analytics = as_cert(&e, vec![uri(ANALYTICS)]).await?;
    denied(create_tenant(&analytics, "globex", None).await, ANALYTICS);
    denied(encrypt(&analytics, "acme").await, ANALYTICS);
    // The application's own SPIFFE id over the network: data operations are for the
    // pod-local listener only (app.cedar, context.transport == "local").
    let app = as_cert(&e, vec![uri(APP)]).await?;
    assert_eq!(who(&app).await?, format!("mtls:{APP}"));
    denied(encrypt(&app, "acme").await, APP);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_san_cannot_pass_as_a_spiffe_principal() -> Result<()> {
    let e = env().await?;
    let ops = as_cert(&e, vec![uri(OPS)]).await?;
    create_tenant(&ops, "acme", None).await?;
    // A DNS SAN is typed `dns:`; no policy names it.
    let by_dns = as_cert(&e, vec![dns("keyops.ops.svc")]).await?;
    denied(who(&by_dns).await, "dns:keyops.ops.svc");
    denied(
        create_tenant(&by_dns, "globex", None).await,
        "dns:keyops.ops.svc",
    );
    // A DNS SAN spelling the operator's SPIFFE id (a CA that copies names from CSRs
    // unchecked) was the operator before typing; now it names no identity and the
    // handshake is refused (tests/mtls.rs pins the alert).
    let access_denied = rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied);
    let (refused, seen) = match as_cert(&e, vec![SanType::DnsName(OPS.try_into()?)]).await {
        Err(err) => (failed_with(&*err, &access_denied), format!("{err:?}")),
        // Under TLS 1.3 the client has finished its side of the handshake before the
        // server checks its certificate: the server's alert can lose the race with the
        // client's first write, which then sees the connection closed (broken pipe)
        // instead. Either is the handshake refused; never a gRPC answer, which would
        // mean the server served the call under some identity.
        Ok(ch) => match create_tenant(&ch, "initech", None).await {
            Err(s) => (
                failed_with(&s, &access_denied) || closed_by_the_server(&s),
                format!("{s:?}"),
            ),
            Ok(()) => panic!("a DNS SAN spelling {OPS} was served as the operator"),
        },
    };
    assert!(
        refused,
        "expected the handshake refused with {access_denied}; got {seen}"
    );
    // Over mTLS the certificate decides: an l5d-client-id header naming the operator
    // (trusted on this server's mesh listener, if it had one) changes nothing.
    denied(
        create_tenant(&by_dns, "umbrella", Some(OPS)).await,
        "dns:keyops.ops.svc",
    );
    let analytics = as_cert(&e, vec![uri(ANALYTICS)]).await?;
    denied(
        create_tenant(&analytics, "umbrella", Some(OPS)).await,
        ANALYTICS,
    );
    Ok(())
}
