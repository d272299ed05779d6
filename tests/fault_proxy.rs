//! The fault-injecting TCP proxy the process-level fault tests rely on
//! (`tests/common/proxy.rs`), against a real TCP echo server: each mode does what it
//! says to open and new connections, and the path comes back for new connections only.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::time::Duration;

use common::proxy::TcpProxy;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A server that sends back what it receives, on 127.0.0.1.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// What a connection gets back for `msg`.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Echo,
    /// Nothing within the wait: the connection is open, the path dead.
    Silence,
    /// Closed or reset.
    Gone,
}

async fn ask(s: &mut TcpStream, msg: &[u8]) -> Answer {
    if s.write_all(msg).await.is_err() {
        return Answer::Gone;
    }
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await {
        Err(_) => Answer::Silence,
        Ok(Ok(_)) if buf == msg => Answer::Echo,
        Ok(_) => Answer::Gone,
    }
}

async fn connect(p: &TcpProxy) -> TcpStream {
    TcpStream::connect(("127.0.0.1", p.port)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_passes_cuts_and_black_holes_at_run_time() {
    let proxy = TcpProxy::start(echo_server().await).await.unwrap();
    let mut listen = connect(&proxy).await;
    let mut other = connect(&proxy).await;
    assert_eq!(ask(&mut listen, b"LISTEN \"ch\";").await, Answer::Echo);
    assert_eq!(ask(&mut other, b"SELECT 1").await, Answer::Echo);

    // Only the connection that sent LISTEN goes silent, and a new one once it does.
    proxy.black_hole_matching(b"LISTEN");
    assert_eq!(ask(&mut listen, b"SELECT 1").await, Answer::Silence);
    assert_eq!(ask(&mut other, b"SELECT 2").await, Answer::Echo);
    let mut fresh = connect(&proxy).await;
    assert_eq!(ask(&mut fresh, b"SELECT 3").await, Answer::Echo);
    assert_eq!(ask(&mut fresh, b"LIS").await, Answer::Echo);
    // matched across two writes
    assert_eq!(ask(&mut fresh, b"TEN x").await, Answer::Silence);
    assert_eq!(ask(&mut fresh, b"SELECT 4").await, Answer::Silence);

    // Everything silent; new connections are accepted, and silent too.
    proxy.black_hole();
    assert_eq!(ask(&mut other, b"SELECT 5").await, Answer::Silence);
    let mut new = connect(&proxy).await;
    assert_eq!(ask(&mut new, b"SELECT 6").await, Answer::Silence);

    // Back to pass: connections lost on the dead path are reset, new ones work.
    proxy.pass();
    for s in [&mut listen, &mut other, &mut fresh, &mut new] {
        assert_eq!(ask(s, b"SELECT 7").await, Answer::Gone);
    }
    let mut after = connect(&proxy).await;
    assert_eq!(ask(&mut after, b"LISTEN again").await, Answer::Echo);

    // Cut: open connections reset, new ones reset on arrival.
    proxy.cut();
    assert_eq!(ask(&mut after, b"SELECT 8").await, Answer::Gone);
    // (the reset may come before the connection is even reported established)
    if let Ok(mut refused) = TcpStream::connect(("127.0.0.1", proxy.port)).await {
        assert_eq!(ask(&mut refused, b"SELECT 9").await, Answer::Gone);
    }

    proxy.pass();
    let mut back = connect(&proxy).await;
    assert_eq!(ask(&mut back, b"SELECT 10").await, Answer::Echo);
    // Stopped: open connections reset, the port closed.
    let port = proxy.port;
    proxy.stop().await;
    assert_eq!(ask(&mut back, b"SELECT 11").await, Answer::Gone);
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
}
