//! The mTLS listener with certificates made at test time (rcgen): TLS 1.3 only, client
//! certificate required from the configured CA; the caller's typed identity reaches
//! handlers. Each refusal is asserted by its specific failure: the error the production
//! server configuration raises, and the TLS alert the running listener sends.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use common::pki::{Ca, TLS13, ca, client_config, intermediate, issue, leaf, mtls_channel, uri};
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::proto::pb::{CreateTenantRequest, WhoAmIRequest};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::transport::mtls::{MtlsConfig, ReloadingConfig, serve_mtls};
use fieldkey::{Keyring, KeyringConfig};
use rcgen::{BasicConstraints, IsCa, SanType};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};

struct Fixture {
    addr: SocketAddr,
    ca: Ca,
    cfg: MtlsConfig,
    tls: ReloadingConfig,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let ca = ca("fieldkey test CA");
    let (cert, key) = leaf(&ca, vec![SanType::DnsName("localhost".try_into()?)], false);
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
    let store: Arc<dyn KeyStore> = Arc::new(SqlStore::open_sqlite(&dir.path().join("k.db")).await?);
    let kms: Arc<dyn fieldkey::kms::Kms> = common::local_kms(&dir)?;
    let keyring = Arc::new(Keyring::new(
        store.clone(),
        kms.clone(),
        KeyringConfig::default(),
    ));
    let parts = fieldkey::wiring::Parts::new(keyring.clone(), store, kms);
    let routes = fieldkey::service::routes(parts.context()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tls = ReloadingConfig::watch(cfg.clone(), std::time::Duration::from_millis(50))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_mtls(routes, listener, tls.clone(), async {
        let _ = rx.await;
    }));
    Ok(Fixture {
        addr,
        ca,
        cfg,
        tls,
        _dir: dir,
        stop: Some(tx),
    })
}

async fn who_am_i(addr: SocketAddr, cfg: rustls::ClientConfig) -> Result<String> {
    let channel = mtls_channel(addr, cfg).await?;
    let mut keys = KeysClient::new(channel);
    let me = keys.who_am_i(WhoAmIRequest {}).await?.into_inner();
    keys.create_tenant(CreateTenantRequest {
        tenant_id: "acme".into(),
        kms_key_id: String::new(),
    })
    .await?;
    Ok(format!("{}:{}", me.transport, me.identity))
}

#[tokio::test]
async fn a_valid_client_certificate_is_served_and_its_spiffe_identity_seen() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(
        &f.ca,
        vec![
            uri("spiffe://cluster.local/ns/ops/sa/erasure"),
            SanType::DnsName("erasure.ops".try_into()?),
        ],
        false,
    );
    let seen = who_am_i(f.addr, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await?;
    assert_eq!(seen, "mtls:spiffe://cluster.local/ns/ops/sa/erasure");
    Ok(())
}

#[tokio::test]
async fn a_dns_only_certificate_gives_the_typed_dns_identity() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(
        &f.ca,
        vec![SanType::DnsName("jobs.ops.svc".try_into()?)],
        false,
    );
    let seen = who_am_i(f.addr, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await?;
    // Typed (review finding 5, issue 19): a DNS SAN is `dns:<name>`, never a bare
    // string that could equal a URI or a configured identity.
    assert_eq!(seen, "mtls:dns:jobs.ops.svc");
    Ok(())
}

/// The rustls error inside an I/O error of tokio-rustls.
fn tls_error(e: &std::io::Error) -> Option<rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>().cloned()
}

/// What a client of `addr` meets: the handshake, then one read. A TLS 1.3 server
/// judges the client certificate after the client's Finished, so its alert arrives on
/// the client's first read.
async fn client_outcome(addr: SocketAddr, cfg: rustls::ClientConfig) -> rustls::Error {
    use tokio::io::AsyncReadExt as _;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = match connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return tls_error(&e).unwrap_or_else(|| panic!("not a TLS failure: {e}")),
    };
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf))
        .await
        .expect("the server neither refused nor closed within 10 s");
    match read {
        Err(e) => tls_error(&e).unwrap_or_else(|| panic!("not a TLS failure: {e}")),
        Ok(n) => panic!("the server accepted the client (read {n} bytes), expected a refusal"),
    }
}

/// The error the production server configuration raises for `client` (over a real
/// socket, with a TlsAcceptor of `server_config`), and the alert the running listener
/// of `f` sends the same client.
async fn refusal(f: &Fixture, client: rustls::ClientConfig) -> (rustls::Error, rustls::Error) {
    let server = fieldkey::transport::mtls::server_config(&f.cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match tokio_rustls::TlsAcceptor::from(server).accept(tcp).await {
            Ok(_) => panic!("the server configuration accepted the client"),
            Err(e) => tls_error(&e).unwrap_or_else(|| panic!("not a TLS failure: {e}")),
        }
    });
    let (server_err, _) = tokio::join!(accept, client_outcome(addr, client.clone()));
    (server_err.unwrap(), client_outcome(f.addr, client).await)
}

fn alert(a: rustls::AlertDescription) -> rustls::Error {
    rustls::Error::AlertReceived(a)
}

#[tokio::test]
async fn no_client_certificate_is_refused_as_certificate_required() -> Result<()> {
    let f = start().await?;
    let (server, client) = refusal(&f, client_config(&f.ca.pem, None, TLS13)).await;
    assert_eq!(server, rustls::Error::NoCertificatesPresented);
    assert_eq!(client, alert(rustls::AlertDescription::CertificateRequired));
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_as_unknown_ca() -> Result<()> {
    let f = start().await?;
    let other = ca("someone else's CA");
    let (cert, key) = leaf(&other, vec![uri("spiffe://evil/sa/x")], false);
    let (server, client) = refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await;
    assert_eq!(
        server,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    );
    assert_eq!(client, alert(rustls::AlertDescription::UnknownCA));
    Ok(())
}

#[tokio::test]
async fn an_expired_certificate_is_refused_as_expired() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(
        &f.ca,
        vec![uri("spiffe://cluster.local/ns/ops/sa/old")],
        true,
    );
    let (server, client) = refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await;
    assert!(
        matches!(
            server,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{server:?}"
    );
    assert_eq!(client, alert(rustls::AlertDescription::CertificateExpired));
    Ok(())
}

#[tokio::test]
async fn a_certificate_not_yet_valid_is_refused_as_not_valid_yet() -> Result<()> {
    let f = start().await?;
    let (cert, key) = issue(
        &f.ca,
        vec![uri("spiffe://cluster.local/ns/ops/sa/new")],
        |p| {
            p.not_before = rcgen::date_time_ymd(2090, 1, 1);
            p.not_after = rcgen::date_time_ymd(2091, 1, 1);
        },
    );
    let (server, client) = refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await;
    assert!(
        matches!(
            server,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYetContext { .. })
        ),
        "{server:?}"
    );
    // TLS has no alert of its own for it (RFC 8446: certificate_expired covers "not
    // currently valid").
    assert_eq!(client, alert(rustls::AlertDescription::CertificateExpired));
    Ok(())
}

#[tokio::test]
async fn a_server_auth_only_certificate_is_refused_for_its_purpose() -> Result<()> {
    let f = start().await?;
    let (cert, key) = issue(
        &f.ca,
        vec![uri("spiffe://cluster.local/ns/ops/sa/web-server")],
        |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        },
    );
    let (server, client) = refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await;
    assert!(
        matches!(
            server,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{server:?}"
    );
    assert_eq!(
        client,
        alert(rustls::AlertDescription::UnsupportedCertificate)
    );
    Ok(())
}

#[tokio::test]
async fn a_ca_certificate_as_the_client_leaf_is_refused() -> Result<()> {
    let f = start().await?;
    let (cert, key) = issue(
        &f.ca,
        vec![uri("spiffe://cluster.local/ns/ops/sa/ca")],
        |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        },
    );
    let (server, client) = refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await;
    // webpki's CaUsedAsEndEntity, which rustls carries as an "other" certificate error.
    match &server {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(e)) => {
            assert_eq!(e.to_string(), "CaUsedAsEndEntity", "{server:?}");
        }
        other => panic!("expected CaUsedAsEndEntity, got {other:?}"),
    }
    assert_eq!(client, alert(rustls::AlertDescription::CertificateUnknown));
    Ok(())
}

#[tokio::test]
async fn a_certificate_naming_no_usable_identity_is_refused_in_the_handshake() -> Result<()> {
    let f = start().await?;
    for sans in [
        vec![],
        // Typed SANs: a URI SAN that is not an absolute URI, or that poses as a DNS
        // identity, names nobody (and the DNS SAN after it is not taken instead).
        vec![uri("local"), SanType::DnsName("ops.svc".try_into()?)],
        vec![uri("dns:jobs.ops.svc")],
        // A DNS SAN spelling a URI (a CA copying names from requests unchecked).
        vec![SanType::DnsName(
            "spiffe://cluster.local/ns/ops/sa/keyops".try_into()?,
        )],
    ] {
        let (cert, key) = leaf(&f.ca, sans.clone(), false);
        let (server, client) =
            refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await;
        assert_eq!(
            server,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure
            ),
            "{sans:?}"
        );
        assert_eq!(
            client,
            alert(rustls::AlertDescription::AccessDenied),
            "{sans:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_chain_through_an_intermediate_is_accepted() -> Result<()> {
    let f = start().await?;
    let sub = intermediate(&f.ca, "fieldkey test intermediate");
    let (cert, key) = leaf(
        &sub,
        vec![uri("spiffe://cluster.local/ns/ops/sa/via-sub")],
        false,
    );
    let chain = format!("{cert}{}", sub.pem);
    let seen = who_am_i(
        f.addr,
        client_config(&f.ca.pem, Some((&chain, &key)), TLS13),
    )
    .await?;
    assert_eq!(seen, "mtls:spiffe://cluster.local/ns/ops/sa/via-sub");
    // Without the intermediate the leaf does not chain to the bundle.
    let (server, _) = refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await;
    assert_eq!(
        server,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
    );
    Ok(())
}

#[tokio::test]
async fn a_tls12_only_client_is_refused_as_protocol_version() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(
        &f.ca,
        vec![uri("spiffe://cluster.local/ns/ops/sa/legacy")],
        false,
    );
    let tls12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let (server, client) = refusal(&f, client_config(&f.ca.pem, Some((&cert, &key)), tls12)).await;
    // The client offers TLS 1.2 only; the server has no TLS 1.2 enabled.
    assert_eq!(
        server,
        rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOfferedOrEnabled)
    );
    assert_eq!(client, alert(rustls::AlertDescription::ProtocolVersion));
    let _ = f.stop;
    Ok(())
}

#[tokio::test]
async fn the_server_prefers_aes_256_gcm_sha384() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(&f.ca, vec![uri("spiffe://x/y")], false);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(
        &f.ca.pem,
        Some((&cert, &key)),
        TLS13,
    )));
    let tcp = tokio::net::TcpStream::connect(f.addr).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
    Ok(())
}

/// The server certificate the client sees, as DER.
async fn served_cert(f: &Fixture) -> Result<Vec<u8>> {
    let (cert, key) = leaf(&f.ca, vec![uri("spiffe://x/y")], false);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(
        &f.ca.pem,
        Some((&cert, &key)),
        TLS13,
    )));
    let tcp = tokio::net::TcpStream::connect(f.addr).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec())
}

#[tokio::test]
async fn rotated_certificate_files_are_picked_up_and_bad_ones_ignored() -> Result<()> {
    let f = start().await?;
    let before = served_cert(&f).await?;
    // a renewed server certificate from the same CA
    let (cert, key) = leaf(
        &f.ca,
        vec![SanType::DnsName("localhost".try_into()?)],
        false,
    );
    std::fs::write(&f.cfg.key_file, &key)?;
    std::fs::write(&f.cfg.cert_file, &cert)?;
    let renewed = CertificateDer::from_pem_slice(cert.as_bytes())?
        .as_ref()
        .to_vec();
    // The reload is observed (a loaded change), not waited for on a guessed interval.
    until("the renewed certificate is loaded", || {
        f.tls.status().loaded >= 1
    })
    .await;
    assert_eq!(served_cert(&f).await?, renewed);
    assert_ne!(before, renewed);
    // a broken file keeps the last good configuration: once the watcher has tried it
    // and failed, the renewed certificate is still served
    let failed_before = f.tls.status().failed;
    std::fs::write(
        &f.cfg.cert_file,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )?;
    until("the broken file is tried", || {
        f.tls.status().failed > failed_before
    })
    .await;
    assert_eq!(
        served_cert(&f).await?,
        renewed,
        "still serving the last good certificate"
    );
    Ok(())
}

/// Polls `cond` until it holds, failing after 10 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
