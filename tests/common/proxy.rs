//! A TCP proxy on 127.0.0.1 in front of a real server (PostgreSQL, moto_server) whose
//! path a test can break while processes use it, switching modes at run time:
//!
//! - [`Mode::Pass`]: bytes are forwarded both ways;
//! - [`Mode::Cut`]: every connection is reset (RST) and new ones are reset on arrival;
//! - [`Mode::BlackHole`]: connections stay open and new ones are accepted, but nothing
//!   is forwarded in either direction: a dead network path, which the endpoints notice
//!   only by a timeout of their own;
//! - [`Mode::BlackHoleMatching`]: only the connections whose client-to-server bytes
//!   contained a byte string (e.g. `LISTEN`, the statement of PostgreSQL's notification
//!   connection) are black-holed, from that chunk on; the others forward.
//!
//! A connection that was black-holed does not survive the path coming back: it is reset
//! when the mode returns to one that would forward it (as a middlebox that lost its
//! state does); new connections then work again.
//!
//! What it does NOT do: delay, reorder or corrupt bytes, or half-close (either side
//! closing ends the connection); the bytes matched are those of the first
//! [`SEEN_MAX`] bytes a client sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How much of what a client sent is kept for [`Mode::BlackHoleMatching`].
pub const SEEN_MAX: usize = 1 << 20;

/// What the proxy does with connections (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Reset every connection, old and new.
    Cut,
    /// Forward nothing, keep connections open.
    BlackHole,
    /// Black-hole the connections whose client sent these bytes; forward the others.
    BlackHoleMatching(Vec<u8>),
}

/// What happens to one connection under a mode.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    Hold,
    Reset,
}

fn verdict(mode: &Mode, seen: &[u8]) -> Verdict {
    match mode {
        Mode::Pass => Verdict::Forward,
        Mode::Cut => Verdict::Reset,
        Mode::BlackHole => Verdict::Hold,
        Mode::BlackHoleMatching(p) if !p.is_empty() && seen.windows(p.len()).any(|w| w == p) => {
            Verdict::Hold
        }
        Mode::BlackHoleMatching(_) => Verdict::Forward,
    }
}

/// The proxy; stops accepting and resets its connections when stopped or dropped.
pub struct TcpProxy {
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    mode: watch::Sender<Mode>,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// A proxy to `upstream`, forwarding ([`Mode::Pass`]).
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (mode, _) = watch::channel(Mode::Pass);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (mode2, conns2) = (mode.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let task = tokio::spawn(relay(client, upstream, mode2.subscribe()));
                let mut conns = conns2.lock().unwrap();
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        Ok(Self {
            port,
            mode,
            accept,
            conns,
        })
    }

    /// Switches every connection, open or new, to `mode`.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// [`Mode::Pass`].
    pub fn pass(&self) {
        self.set(Mode::Pass);
    }

    /// [`Mode::Cut`].
    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    /// [`Mode::BlackHole`].
    pub fn black_hole(&self) {
        self.set(Mode::BlackHole);
    }

    /// [`Mode::BlackHoleMatching`] on `bytes`.
    pub fn black_hole_matching(&self, bytes: &[u8]) {
        self.set(Mode::BlackHoleMatching(bytes.to_vec()));
    }

    /// `url` (a DSN or URL such as postgres://u@127.0.0.1:5432/db) with its host:port
    /// replaced by the proxy's.
    pub fn via(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let user = authority
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        format!("{scheme}://{user}127.0.0.1:{}{path}", self.port)
    }

    /// Stops listening and resets every open connection.
    pub async fn stop(self) {
        self.accept.abort();
        self.cut();
        let conns: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        for c in conns {
            let abort = c.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), c)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().iter() {
            c.abort();
        }
    }
}

/// One client connection, for its whole life.
async fn relay(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let mut client = client;
    let mut server: Option<TcpStream> = None;
    let mut seen = Vec::new();
    let mut was_held = false;
    let reset = loop {
        let now = verdict(&mode.borrow_and_update(), &seen);
        match now {
            Verdict::Reset => break true,
            // The path came back, but not for a connection that was lost on it.
            Verdict::Forward if was_held => break true,
            Verdict::Hold => {
                was_held = true;
                if mode.changed().await.is_err() {
                    break false;
                }
            }
            Verdict::Forward => {
                if server.is_none() {
                    server = TcpStream::connect(upstream).await.ok();
                }
                let Some(s) = server.as_mut() else {
                    break true;
                };
                if forward(&mut client, s, &mut mode, &mut seen).await {
                    break false;
                }
            }
        }
    };
    if reset {
        let _ = client.set_zero_linger();
        if let Some(s) = &server {
            let _ = s.set_zero_linger();
        }
    }
}

/// Forwards both ways until the mode changes or a chunk makes this connection one to
/// hold (`false`: look at the verdict again), or either side closes (`true`).
async fn forward(
    client: &mut TcpStream,
    server: &mut TcpStream,
    mode: &mut watch::Receiver<Mode>,
    seen: &mut Vec<u8>,
) -> bool {
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let (mut up, mut down) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    loop {
        tokio::select! {
            // A mode set before bytes arrived applies to them.
            biased;
            changed = mode.changed() => return changed.is_err(),
            r = cr.read(&mut up) => {
                let n = match r {
                    Ok(0) | Err(_) => return true,
                    Ok(n) => n,
                };
                let keep = n.min(SEEN_MAX.saturating_sub(seen.len()));
                seen.extend_from_slice(&up[..keep]);
                if verdict(&mode.borrow(), seen) != Verdict::Forward {
                    // These bytes are lost with the path.
                    return false;
                }
                if sw.write_all(&up[..n]).await.is_err() {
                    return true;
                }
            }
            r = sr.read(&mut down) => {
                let n = match r {
                    Ok(0) | Err(_) => return true,
                    Ok(n) => n,
                };
                if cw.write_all(&down[..n]).await.is_err() {
                    return true;
                }
            }
        }
    }
}
