//! The plaintext TCP listener declared (`listen.tcp_behind_linkerd`) as sitting behind
//! the pod's Linkerd proxy: the one listener on which Linkerd's `l5d-client-id` header
//! may name the caller (when `authz.trust_linkerd_identity` is on).
//!
//! Its connections carry [`ProxiedConnInfo`] (both ends' addresses) so that the gate
//! can tell the proxy's connections from anyone else's. The proxy runs in the pod's
//! network namespace and connects to the application from inside it: from the
//! loopback address to `127.0.0.1:<port>` (Linkerd before 2.11), or from the pod's own
//! address to the pod's address (2.11 and later forward to the original destination,
//! linkerd2-proxy#1161, and refuse ports bound only on loopback, linkerd2#6495). So a
//! peer is "in the pod" when its address is a loopback address or the very address it
//! connected to; another pod has its own address. Linux drops packets that arrive from
//! outside with one of the host's own addresses as source (a martian source), and a
//! TCP handshake from a spoofed source cannot complete, so neither can be forged from
//! outside the namespace.
//!
//! Does NOT: tell the proxy from another process of the same pod (a process inside the
//! pod's network namespace can connect from the loopback and write any header: the
//! residual risk in docs/THREAT_MODEL.md), read headers or decide anything (the gate
//! does, `service::gate`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt as _;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpIncoming};

use super::TransportError;

/// Both ends of a connection accepted on the listener declared behind the Linkerd
/// proxy (a request extension, as tonic's `TcpConnectInfo` on the other listeners).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxiedConnInfo {
    /// The address the peer connected to.
    pub local_addr: Option<SocketAddr>,
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
}

impl ProxiedConnInfo {
    /// Whether the peer is in this network namespace (the pod): a loopback address, or
    /// the address it connected to. Unknown addresses are outside.
    pub fn peer_in_pod(&self) -> bool {
        match (self.remote_addr, self.local_addr) {
            (Some(r), Some(l)) => {
                let (r, l) = (r.ip().to_canonical(), l.ip().to_canonical());
                r.is_loopback() || r == l
            }
            _ => false,
        }
    }
}

/// A TCP connection accepted on the listener declared behind the Linkerd proxy.
#[derive(Debug)]
pub struct ProxiedStream(TcpStream);

impl Connected for ProxiedStream {
    type ConnectInfo = ProxiedConnInfo;
    fn connect_info(&self) -> ProxiedConnInfo {
        ProxiedConnInfo {
            local_addr: self.0.local_addr().ok(),
            remote_addr: self.0.peer_addr().ok(),
        }
    }
}

impl AsyncRead for ProxiedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProxiedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Serves `routes` on `listener`, declared as sitting behind the pod's Linkerd proxy,
/// until `shutdown` completes, then drains in-flight calls. Every request carries its
/// connection's [`ProxiedConnInfo`].
///
/// # Errors
/// [`TransportError::Serve`].
pub async fn serve_tcp_behind_linkerd(
    routes: Routes,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError> {
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|conn| conn.map(ProxiedStream));
    super::serve_incoming(routes, incoming, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(remote: &str, local: &str) -> ProxiedConnInfo {
        ProxiedConnInfo {
            remote_addr: remote.parse().ok(),
            local_addr: local.parse().ok(),
        }
    }

    #[test]
    fn only_peers_of_this_network_namespace_are_in_the_pod() {
        // Linkerd < 2.11: loopback to loopback.
        assert!(info("127.0.0.1:50000", "127.0.0.1:7450").peer_in_pod());
        assert!(info("[::1]:50000", "[::1]:7450").peer_in_pod());
        assert!(info("[::ffff:127.0.0.1]:50000", "[::ffff:127.0.0.1]:7450").peer_in_pod());
        // Linkerd >= 2.11: the pod's address to itself.
        assert!(info("10.1.2.3:50000", "10.1.2.3:7450").peer_in_pod());
        assert!(info("[::ffff:10.1.2.3]:50000", "10.1.2.3:7450").peer_in_pod());
        // Another pod, or nothing known.
        assert!(!info("10.1.2.4:50000", "10.1.2.3:7450").peer_in_pod());
        assert!(!info("10.1.2.4:50000", "").peer_in_pod());
        assert!(!info("", "10.1.2.3:7450").peer_in_pod());
    }
}
