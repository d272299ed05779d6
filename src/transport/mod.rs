//! Listeners: plaintext gRPC on loopback TCP and on a Unix socket, for the application
//! in the same pod; plaintext TCP behind the pod's Linkerd proxy ([`linkerd`]); mTLS
//! for remote callers ([`mtls`]).
//!
//! Owns: binding, serving and graceful shutdown (stop accepting, drain in-flight calls);
//! the memory budget of request bytes in flight across them ([`budget`]).
//! Must not: interpret requests (the service does).

pub mod budget;
pub mod linkerd;
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

/// Mode of the Unix socket: the sidecar's user and group (the application container
/// shares the pod's group), nobody else.
pub const UNIX_SOCKET_MODE: u32 = 0o660;

/// Binds a Unix socket at `path` with mode [`UNIX_SOCKET_MODE`] whatever the umask,
/// replacing a stale socket left by a previous run. Anything else at `path` (a file, a
/// directory, a link) is refused, never removed. The socket is bound under a temporary
/// name, given its mode, then renamed into place, so that it is never reachable with
/// the umask's mode.
///
/// # Errors
/// [`TransportError::Bind`].
pub fn bind_unix(path: &Path) -> Result<UnixListener, TransportError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let bind_err = |source| TransportError::Bind {
        what: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(bind_err)?,
        Ok(_) => {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to remove it",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(bind_err(e));
    }
    Ok(listener)
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
        // A connection whose peer stopped answering is closed (and the memory-budget
        // charges of its calls given back) instead of lingering.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

    use super::*;

    // Review finding 5 (issue 19): the socket took the umask's mode, and anything at
    // its path was removed.
    #[tokio::test]
    async fn the_unix_socket_has_its_own_mode_and_never_removes_what_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fk.sock");
        let l = bind_unix(&path).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, UNIX_SOCKET_MODE);
        drop(l);
        // A stale socket from a previous run is replaced.
        let l = bind_unix(&path).unwrap();
        drop(l);
        // Anything else is refused and left alone.
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        assert!(matches!(bind_unix(&file), Err(TransportError::Bind { .. })));
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        let sub = dir.path().join("a-directory");
        std::fs::create_dir(&sub).unwrap();
        assert!(bind_unix(&sub).is_err());
        assert!(sub.is_dir());
    }
}
