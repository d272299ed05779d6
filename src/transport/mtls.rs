//! The mTLS listener for remote callers: rustls, TLS 1.3 only, client certificate
//! required and verified against a configured CA bundle (client-auth EKU, validity
//! dates, chain to the bundle, no CA certificate as the leaf: webpki's checks); the
//! caller's typed identity ([`identity_of`]: the first URI SAN such as `spiffe://...`,
//! else `dns:` and the first DNS SAN) is handed to the handlers as [`CallerInfo`].
//!
//! Must not: accept TLS 1.2, anonymous clients, or certificates from another CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::service::Routes;
use tonic::transport::server::Connected;

use super::TransportError;

/// Files of the mTLS listener.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    /// Address to listen on (e.g. `0.0.0.0:7451`).
    pub listen: String,
    /// Server certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Server private key (PEM).
    pub key_file: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca_file: PathBuf,
}

/// Who called, as established by the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerInfo {
    /// The typed identity from the client certificate ([`identity_of`]).
    pub identity: String,
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
}

fn tls_err(what: &str, path: &Path, e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(format!("{what} {}: {e}", path.display()))
}

/// Builds the rustls configuration: TLS 1.3 only (TLS13_AES_256_GCM_SHA384 preferred),
/// client certificates required and verified against `client_ca_file`, ALPN h2.
///
/// # Errors
/// [`TransportError::Tls`] naming the file or setting that is wrong.
pub fn server_config(cfg: &MtlsConfig) -> Result<Arc<ServerConfig>, TransportError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| tls_err("cannot read certificate", &cfg.cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err("bad certificate", &cfg.cert_file, e))?;
    if certs.is_empty() {
        return Err(tls_err("no certificate in", &cfg.cert_file, "empty"));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| tls_err("cannot read private key", &cfg.key_file, e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&cfg.client_ca_file)
        .map_err(|e| tls_err("cannot read client CA bundle", &cfg.client_ca_file, e))?
    {
        let ca = ca.map_err(|e| tls_err("bad client CA", &cfg.client_ca_file, e))?;
        roots
            .add(ca)
            .map_err(|e| tls_err("unusable client CA", &cfg.client_ca_file, e))?;
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    provider
        .cipher_suites
        .sort_by_key(|s| u8::from(s.suite() != rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
    let provider = Arc::new(provider);
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| tls_err("cannot build client verifier from", &cfg.client_ca_file, e))?;
    let verifier = Arc::new(IdentityRequired(webpki));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(format!("TLS 1.3 configuration: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("certificate and key do not match:", &cfg.cert_file, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The prefix of an identity taken from a DNS SAN.
pub const DNS_IDENTITY_PREFIX: &str = "dns:";

/// The identity in a client certificate, typed by the kind of SAN it came from, so that
/// no kind can pass for another or for a configured identity string:
/// - the first URI SAN, as written (`spiffe://example.org/ns/ops/sa/keyops`), if it is
///   an absolute URI (RFC 3986 scheme, then `:`) whose scheme is not `dns`; a first URI
///   SAN that is not (`local`, `dns:x`, no scheme) gives no identity at all;
/// - else the first DNS SAN, lower-cased, as `dns:<name>` (`dns:jobs.ops.svc`).
///
/// `None`: no usable SAN (the connection is refused).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let first_uri = names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    if let Some(u) = first_uri {
        return typed_uri(u).map(str::to_owned);
    }
    names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) if !d.is_empty() && !d.contains(':') => {
            Some(format!("{DNS_IDENTITY_PREFIX}{}", d.to_ascii_lowercase()))
        }
        _ => None,
    })
}

/// `u` if it is an absolute URI with a scheme other than `dns` (RFC 3986 §3.1:
/// `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )` then `:`), and no white space or
/// control characters.
fn typed_uri(u: &str) -> Option<&str> {
    let (scheme, rest) = u.split_once(':')?;
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let clean = u.chars().all(|c| c.is_ascii_graphic());
    (scheme_ok && clean && !rest.is_empty() && !scheme.eq_ignore_ascii_case("dns")).then_some(u)
}

/// webpki's verification of the client certificate, then: the certificate must name an
/// identity ([`identity_of`]). Refused in the handshake (alert `access_denied`) rather
/// than dropped after it, so the client learns why.
#[derive(Debug)]
struct IdentityRequired(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for IdentityRequired {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        if identity_of(end_entity).is_none() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An accepted, authenticated mTLS connection.
pub struct MtlsConn {
    inner: TlsStream<TcpStream>,
    info: CallerInfo,
}

impl Connected for MtlsConn {
    type ConnectInfo = CallerInfo;
    fn connect_info(&self) -> CallerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MtlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A server configuration that follows its files: certificates rotate (an internal CA
/// renews them; mesh identities live a day), so the certificate, key and client CA
/// bundle are re-read when their files change, without a restart. A change that does
/// not load (half-written file, key not matching) keeps the last good configuration
/// and logs a warning; new connections use the new configuration, open ones keep theirs.
#[derive(Clone)]
pub struct ReloadingConfig {
    current: Arc<arc_swap::ArcSwap<ServerConfig>>,
    counts: Arc<ReloadCounts>,
}

/// How many changes of the files were loaded, and how many did not load.
#[derive(Debug, Default)]
struct ReloadCounts {
    loaded: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// Reload attempts since [`ReloadingConfig::watch`] (an observable effect for
/// operators' checks and tests: no waiting on a guessed interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Changes that loaded and now serve new connections.
    pub loaded: u64,
    /// Attempts that failed to load (the last good configuration kept serving); a
    /// change that keeps failing counts once per check.
    pub failed: u64,
}

impl std::fmt::Debug for ReloadingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadingConfig")
    }
}

fn fingerprint_files(cfg: &MtlsConfig) -> Vec<Option<(std::time::SystemTime, u64)>> {
    [&cfg.cert_file, &cfg.key_file, &cfg.client_ca_file]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl ReloadingConfig {
    /// Loads the files now (failing if they do not load) and re-checks them every
    /// `interval` in a background task.
    ///
    /// # Errors
    /// As [`server_config`].
    pub fn watch(cfg: MtlsConfig, interval: std::time::Duration) -> Result<Self, TransportError> {
        let current = Arc::new(arc_swap::ArcSwap::new(server_config(&cfg)?));
        let counts = Arc::new(ReloadCounts::default());
        let this = Self {
            current: current.clone(),
            counts: counts.clone(),
        };
        let weak = Arc::downgrade(&current);
        tokio::spawn(async move {
            let mut seen = fingerprint_files(&cfg);
            loop {
                tokio::time::sleep(interval).await;
                let Some(current) = weak.upgrade() else {
                    return;
                };
                let now = fingerprint_files(&cfg);
                if now == seen {
                    continue;
                }
                match server_config(&cfg) {
                    Ok(new) => {
                        current.store(new);
                        seen = now;
                        counts
                            .loaded
                            .fetch_add(1, std::sync::atomic::Ordering::Release);
                        tracing::info!(cert = %cfg.cert_file.display(), "mTLS certificate, key and CA bundle reloaded");
                    }
                    Err(e) => {
                        // keep `seen` unchanged so the next tick tries again
                        counts
                            .failed
                            .fetch_add(1, std::sync::atomic::Ordering::Release);
                        tracing::warn!(error = %e, "mTLS files changed but do not load; keeping the last good configuration");
                    }
                }
            }
        });
        Ok(this)
    }

    /// Reload attempts so far.
    pub fn status(&self) -> ReloadStatus {
        use std::sync::atomic::Ordering::Acquire;
        ReloadStatus {
            loaded: self.counts.loaded.load(Acquire),
            failed: self.counts.failed.load(Acquire),
        }
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }
}

/// Serves `routes` over mTLS on `listener` until `shutdown`, then drains.
///
/// Handshakes run concurrently and off the accept loop; a failed handshake (no client
/// certificate, wrong CA, expired, TLS 1.2) is logged and the connection dropped.
///
/// # Errors
/// [`TransportError::Serve`].
pub async fn serve_mtls(
    routes: Routes,
    listener: TcpListener,
    config: ReloadingConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), TransportError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<MtlsConn>>(64);
    let accept_loop = tokio::spawn(async move {
        loop {
            let Ok((tcp, remote)) = listener.accept().await else {
                continue;
            };
            // No Nagle: small responses must not wait for the peer's delayed ACK.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
            }
            let (acceptor, tx) = (TlsAcceptor::from(config.current()), tx.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "mTLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "mTLS handshake timed out");
                        return;
                    }
                };
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(identity_of);
                let Some(identity) = identity else {
                    // Unreachable: the verifier refused such certificates in the handshake.
                    tracing::warn!(%remote, "client certificate names no usable identity; refused");
                    return;
                };
                tracing::debug!(%remote, identity, "mTLS caller");
                let conn = MtlsConn {
                    inner: tls,
                    info: CallerInfo {
                        identity,
                        remote_addr: Some(remote),
                    },
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    let result = super::serve_incoming(
        routes,
        tokio_stream::wrappers::ReceiverStream::new(rx),
        shutdown,
    )
    .await;
    accept_loop.abort();
    result
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert_with(sans: Vec<SanType>) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        p.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    // Review finding 5 (issue 19): URI and DNS SANs collapsed into one untyped string,
    // so a DNS SAN could read as a configured identity (`local`, a Linkerd name) or as
    // a URI identity.
    #[test]
    fn identities_are_typed_by_the_kind_of_san() {
        let id = |sans| identity_of(&cert_with(sans));
        assert_eq!(
            id(vec![
                uri("spiffe://example.org/ns/ops/sa/keyops"),
                dns("x.ops")
            ])
            .as_deref(),
            Some("spiffe://example.org/ns/ops/sa/keyops")
        );
        assert_eq!(
            id(vec![dns("Jobs.Ops.svc")]).as_deref(),
            Some("dns:jobs.ops.svc")
        );
        // A DNS SAN never equals a configured identity string or a Linkerd identity.
        assert_eq!(id(vec![dns("local")]).as_deref(), Some("dns:local"));
        assert_eq!(
            id(vec![dns(
                "keyops.ops.serviceaccount.identity.linkerd.cluster.local"
            )])
            .as_deref(),
            Some("dns:keyops.ops.serviceaccount.identity.linkerd.cluster.local")
        );
        // A URI SAN cannot pass for a DNS identity, nor be a bare string.
        for bad in [
            "dns:jobs.ops.svc",
            "DNS:jobs.ops.svc",
            "local",
            "1x:y",
            "spiffe:",
        ] {
            assert_eq!(id(vec![uri(bad), dns("fallback.ops")]), None, "{bad}");
        }
        assert_eq!(id(vec![]), None);
    }
}
