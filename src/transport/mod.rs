//! Listeners: plaintext gRPC on loopback TCP and on a Unix socket, for the application
//! in the same pod; mTLS for remote callers ([`mtls`]).
//!
//! Owns: binding, serving and graceful shutdown (stop accepting, drain in-flight calls).
//! Must not: interpret requests (the service does).

pub mod mtls;

use std::future::Future;
use std::path::Path;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;

/// Why a listener failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The address or socket path could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        /// Address or path.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// TLS set-up failed (files, keys, CA bundle).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds a TCP listener (use a loopback address for the in-pod API).
///
/// # Errors
/// [`TransportError::Bind`].
pub async fn bind_tcp(addr: &str) -> Result<TcpListener, TransportError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TransportError::Bind {
            what: addr.to_owned(),
            source,
        })
}

/// Binds a Unix socket at `path`, replacing a stale socket file left by a previous run.
///
/// # Errors
/// [`TransportError::Bind`].
pub fn bind_unix(path: &Path) -> Result<UnixListener, TransportError> {
    let bind_err = |source| TransportError::Bind {
        what: path.display().to_string(),
        source,
    };
    if path.exists() {
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    UnixListener::bind(path).map_err(bind_err)
}

/// Serves `routes` on `listener` until `shutdown` completes, then drains in-flight calls.
///
/// # Errors
/// [`TransportError::Serve`].
pub async fn serve_tcp(
    routes: Routes,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError> {
    // TCP_NODELAY on every accepted connection: `Server::tcp_nodelay` only reaches
    // connections tonic accepts itself, and with Nagle's algorithm a response that does
    // not fill a segment waits for the peer's delayed ACK (~40 ms per call).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    serve_incoming(routes, incoming, shutdown).await
}

/// Serves `routes` on a Unix socket until `shutdown` completes, then drains.
///
/// # Errors
/// [`TransportError::Serve`].
pub async fn serve_unix(
    routes: Routes,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError> {
    serve_incoming(routes, UnixListenerStream::new(listener), shutdown).await
}

/// The one serving loop behind every listener: gRPC over already-accepted connections
/// until `shutdown`, then drain in-flight calls.
async fn serve_incoming<I, IO, IE>(
    routes: Routes,
    incoming: I,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Server::builder()
        .tcp_nodelay(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
