//! Certificates made at test time (rcgen) and mTLS clients: a CA, leaves and
//! intermediates it issues, a rustls client configuration, and a gRPC channel over
//! mTLS to a listener.
//!
//! What it does NOT do: start a server or assert anything.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::Channel;

/// A certificate authority: its issuer and its certificate (PEM).
pub struct Ca {
    /// Signs what it issues.
    pub issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A self-signed root CA named `name`.
pub fn ca(name: &str) -> Ca {
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

/// A CA certificate issued by `root` (an intermediate).
pub fn intermediate(root: &Ca, name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.signed_by(&key, &root.issuer).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// (certificate PEM, key PEM) of a certificate issued by `ca` with `sans`, after `edit`.
pub fn issue(
    ca: &Ca,
    sans: Vec<SanType>,
    edit: impl FnOnce(&mut CertificateParams),
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = sans;
    edit(&mut p);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// (certificate PEM, key PEM) of a leaf issued by `ca`; `expired`: valid in 2020 only.
pub fn leaf(ca: &Ca, sans: Vec<SanType>, expired: bool) -> (String, String) {
    issue(ca, sans, |p| {
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
    })
}

/// A URI SAN.
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A DNS SAN.
pub fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

/// TLS 1.3 only.
pub const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// A client trusting `server_ca`, presenting `client` (certificate chain PEM, key PEM)
/// if given, offering `versions`, ALPN h2.
pub fn client_config(
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

/// A gRPC channel over mTLS to `addr` (server name `localhost`).
pub async fn mtls_channel(addr: SocketAddr, cfg: rustls::ClientConfig) -> Result<Channel> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    Ok(tonic::transport::Endpoint::try_from("http://localhost")?
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
        .await?)
}
