//! The mTLS listener with certificates made at test time (rcgen): TLS 1.3 only, client
//! certificate required from the configured CA; the caller identity reaches handlers.
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::proto::pb::{CreateTenantRequest, WhoAmIRequest};
use fieldkey::store::{KeyStore, SqlStore};
use fieldkey::transport::mtls::{MtlsConfig, ReloadingConfig, serve_mtls};
use fieldkey::{Keyring, KeyringConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// (certificate PEM, key PEM)
fn leaf(ca: &Ca, sans: Vec<SanType>, expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = sans;
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

struct Fixture {
    addr: SocketAddr,
    ca: Ca,
    cfg: MtlsConfig,
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
    tokio::spawn(serve_mtls(routes, listener, tls, async {
        let _ = rx.await;
    }));
    Ok(Fixture {
        addr,
        ca,
        cfg,
        _dir: dir,
        stop: Some(tx),
    })
}

fn client_config(
    server_ca: &str,
    client: Option<(&str, &str)>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server_ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(|c| c.unwrap())
                .collect();
            b.with_client_auth_cert(
                chain,
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}

async fn who_am_i(addr: SocketAddr, cfg: rustls::ClientConfig) -> Result<String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let channel = tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    let mut keys = KeysClient::new(channel);
    let me = keys.who_am_i(WhoAmIRequest {}).await?.into_inner();
    keys.create_tenant(CreateTenantRequest {
        tenant_id: "acme".into(),
        kms_key_id: String::new(),
    })
    .await?;
    Ok(format!("{}:{}", me.transport, me.identity))
}

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

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
async fn a_dns_only_certificate_gives_the_dns_identity() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(
        &f.ca,
        vec![SanType::DnsName("jobs.ops.svc".try_into()?)],
        false,
    );
    let seen = who_am_i(f.addr, client_config(&f.ca.pem, Some((&cert, &key)), TLS13)).await?;
    assert_eq!(seen, "mtls:jobs.ops.svc");
    Ok(())
}

#[tokio::test]
async fn no_client_certificate_is_refused() -> Result<()> {
    let f = start().await?;
    assert!(
        who_am_i(f.addr, client_config(&f.ca.pem, None, TLS13))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() -> Result<()> {
    let f = start().await?;
    let other = ca("someone else's CA");
    let (cert, key) = leaf(&other, vec![uri("spiffe://evil/sa/x")], false);
    assert!(
        who_am_i(f.addr, client_config(&f.ca.pem, Some((&cert, &key)), TLS13))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn an_expired_certificate_is_refused() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(
        &f.ca,
        vec![uri("spiffe://cluster.local/ns/ops/sa/old")],
        true,
    );
    assert!(
        who_am_i(f.addr, client_config(&f.ca.pem, Some((&cert, &key)), TLS13))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn a_tls12_only_client_is_refused() -> Result<()> {
    let f = start().await?;
    let (cert, key) = leaf(
        &f.ca,
        vec![uri("spiffe://cluster.local/ns/ops/sa/legacy")],
        false,
    );
    let tls12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    assert!(
        who_am_i(f.addr, client_config(&f.ca.pem, Some((&cert, &key)), tls12))
            .await
            .is_err()
    );
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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while served_cert(&f).await? != renewed {
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate not served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_ne!(before, renewed);
    // a broken file keeps the last good configuration
    std::fs::write(
        &f.cfg.cert_file,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        served_cert(&f).await?,
        renewed,
        "still serving the last good certificate"
    );
    Ok(())
}
