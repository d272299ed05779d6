//! Load generator: drives Encrypt, Decrypt, EncryptBatch, DecryptBatch, the columnar
//! EncryptColumn / DecryptColumn and BlindIndexBatch against a `fieldkey serve` process
//! at a given concurrency, and the same load against a bare tonic echo process (the
//! transport floor), in one run; also raw HMAC-SHA256 in this process (the blind
//! index's crypto floor). Prints ops/s and p50/p99/p999 latency, latency at one call in
//! flight (Encrypt against echo), and the sidecar's resident memory: idle, under the
//! load, and per 100,000 cached subject keys (`--subjects N`, 100,000; 0 skips it).
//!
//! ```sh
//! cargo bench --bench loadgen -- --concurrency 64 --connections 4 --seconds 10
//! ```
//! Options: `--concurrency N` calls in flight (64), `--connections N` HTTP/2 connections
//! (4), `--seconds N` per scenario (10), `--size N` field bytes (32), `--batch N` fields
//! per batch or column (100), `--only blind` just the blind-index scenarios (with their
//! floors), `--only batch` just the batch and column scenarios (with their floor).
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "benchmark driver fails by panicking"
)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldkey::proto::echo_pb::EchoMessage;
use fieldkey::proto::echo_pb::echo_client::EchoClient;
use fieldkey::proto::echo_pb::echo_server::{Echo, EchoServer};
use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::proto::pb::{
    CreateTenantRequest, DecryptBatchRequest, DecryptColumnRequest, DecryptRequest,
    EncryptBatchRequest, EncryptColumnRequest, EncryptRequest,
};

/// The resident set (VmRSS) and its peak (VmHWM) of process `pid`, MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}
use hdrhistogram::Histogram;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

#[derive(Clone)]
struct Opts {
    subjects: usize,
    only_batch: bool,
    concurrency: usize,
    connections: usize,
    seconds: u64,
    size: usize,
    batch: usize,
    only_blind: bool,
    /// `--only metrics`: Encrypt with the metrics layer on versus off, and the echo floor.
    only_metrics: bool,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number"))
            })
            .unwrap_or(default)
    };
    let only = |what: &str| {
        args.iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .is_some_and(|v| v == what)
    };
    Opts {
        subjects: get("--subjects", 100_000),
        only_batch: only("batch"),
        concurrency: get("--concurrency", 64),
        connections: get("--connections", 4),
        seconds: get("--seconds", 10) as u64,
        size: get("--size", 32),
        batch: get("--batch", 100),
        only_blind: only("blind"),
        only_metrics: only("metrics"),
    }
}

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, req: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }
}

fn serve_echo() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("echo listening on {}", listener.local_addr().unwrap());
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(EchoServer::new(EchoService).max_decoding_message_size(64 << 20))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .unwrap();
    });
}

#[allow(
    clippy::zombie_processes,
    reason = "the caller kills and reaps the child"
)]
/// The server processes this run started: their CPU time is read around every
/// scenario (only the one under load uses any).
static SERVERS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// CPU seconds (user + system) used so far by process `pid` ("self": this one), from
/// /proc (clock ticks of 1/100 s, Linux's USER_HZ).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends at the last ')'): utime is the 12th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// CPU seconds of (the servers, this client process).
fn cpu_now() -> (f64, f64) {
    let servers = SERVERS
        .lock()
        .unwrap()
        .iter()
        .map(|p| cpu_secs(&p.to_string()))
        .sum();
    (servers, cpu_secs("self"))
}

#[expect(
    clippy::zombie_processes,
    reason = "the child is returned to the caller, which kills and waits for it (the lint \
              loses track of it once its pid is read)"
)]
fn spawn(mut cmd: Command, prefix: &str) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    if let Ok(mut servers) = SERVERS.lock() {
        servers.push(child.id());
    }
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("server printed nothing").unwrap();
        if let Some(addr) = line.strip_prefix(prefix) {
            return (child, format!("http://{addr}"));
        }
    }
}

async fn channels(addr: &str, n: usize) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Channel::from_shared(addr.to_owned())
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap(),
        );
    }
    out
}

struct Stats {
    calls: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    /// CPU seconds used during the scenario by the servers and by this client.
    server_cpu: f64,
    client_cpu: f64,
}

async fn drive<F, Fut>(chs: &[Channel], o: &Opts, secs: u64, call: F) -> Stats
where
    F: Fn(Channel) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let cpu0 = cpu_now();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..o.concurrency {
        let ch = chs[i % chs.len()].clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            while Instant::now() < end {
                let t = Instant::now();
                call(ch.clone()).await;
                h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
            }
            h
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let elapsed = start.elapsed();
    let cpu1 = cpu_now();
    Stats {
        calls: hist.len(),
        elapsed,
        hist,
        server_cpu: cpu1.0 - cpu0.0,
        client_cpu: cpu1.1 - cpu0.1,
    }
}

/// Prints a scenario's row: calls and items per second, latency quantiles, and the CPU
/// microseconds per item spent by the server and by this client (the two share the
/// machine's cores: where the client's share grows, the server's throughput is capped).
fn report(name: &str, items_per_call: u64, s: &Stats) -> f64 {
    let ops = s.calls as f64 / s.elapsed.as_secs_f64();
    let items = (s.calls * items_per_call).max(1) as f64;
    println!(
        "| {name:<34} | {:>10.0} | {:>12.0} | {:>7} | {:>7} | {:>7} | {:>7.2} | {:>7.2} |",
        ops,
        ops * items_per_call as f64,
        s.hist.value_at_quantile(0.5),
        s.hist.value_at_quantile(0.99),
        s.hist.value_at_quantile(0.999),
        s.server_cpu * 1e6 / items,
        s.client_cpu * 1e6 / items,
    );
    ops
}

fn header() {
    println!(
        "| scenario                           |      ops/s |      items/s | p50 us  | p99 us  | p999 us | srv us/item | cli us/item |"
    );
    println!(
        "| ---------------------------------- | ---------: | -----------: | ------: | ------: | ------: | ------: | ------: |"
    );
}

/// Raw HMAC-SHA256 of `size`-byte values on one thread in this process (keyed state
/// cloned per value, as the sidecar does): values/s.
fn raw_hmac_rate(size: usize, secs: f64) -> f64 {
    use hmac::{Hmac, KeyInit, Mac};
    let mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&[9u8; 32]).unwrap();
    let v = vec![0x5au8; size];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..10_000 {
            let mut m = mac.clone();
            m.update(std::hint::black_box(&v));
            std::hint::black_box(m.finalize().into_bytes());
        }
        n += 10_000;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// BlindIndexBatch of `--batch` values of `--size` bytes, beside the echo floor for the
/// same request size and raw HMAC-SHA256.
async fn blind_scenarios(o: &Opts, fk_ch: &[Channel], echo_ch: &[Channel]) {
    use fieldkey::proto::pb::{BlindIndexBatchRequest, BlindIndexRequest};
    let item = |i: usize| BlindIndexRequest {
        tenant_id: "bench".into(),
        field: "email".into(),
        // distinct values of exactly `size` bytes
        value: format!("{i:0>width$}", width = o.size).into_bytes(),
        format: 0,
        lookup: false,
    };
    let n = o.batch;
    let items: Arc<Vec<BlindIndexRequest>> = Arc::new((0..n).map(item).collect());
    let payload = prost::Message::encoded_len(&BlindIndexBatchRequest {
        items: items.to_vec(),
    });
    let hmac = raw_hmac_rate(o.size, 2.0);
    println!(
        "| {:<34} | {:>10} | {:>12.0} | {:>7} | {:>7} | {:>7} | {:>7} | {:>7.2} |",
        format!("raw HMAC-SHA256, {} B, 1 thread", o.size),
        "-",
        hmac,
        "-",
        "-",
        "-",
        "-",
        1e6 / hmac
    );
    let big = vec![0x5au8; payload];
    let s = drive(echo_ch, o, o.seconds, move |ch| {
        let p = big.clone();
        async move {
            EchoClient::new(ch)
                .echo(EchoMessage { payload: p })
                .await
                .unwrap();
        }
    })
    .await;
    report(
        &format!("echo floor, {payload} B (index batch)"),
        n as u64,
        &s,
    );
    // warm-up (derives and caches the index key)
    let it = items.clone();
    drive(fk_ch, o, 1, move |ch| {
        let items = it.to_vec();
        async move {
            CryptoClient::new(ch)
                .blind_index_batch(BlindIndexBatchRequest { items })
                .await
                .unwrap();
        }
    })
    .await;
    let it = items.clone();
    let s = drive(fk_ch, o, o.seconds, move |ch| {
        let items = it.to_vec();
        async move {
            let r = CryptoClient::new(ch)
                .blind_index_batch(BlindIndexBatchRequest { items })
                .await
                .unwrap();
            assert_eq!(r.into_inner().results.len(), n);
        }
    })
    .await;
    let values = report(
        &format!("BlindIndexBatch, {n} x {} B", o.size),
        n as u64,
        &s,
    ) * n as f64;
    println!(
        "\nBlindIndexBatch: {values:.0} values/s (target >= 1,000,000); raw HMAC-SHA256 on one thread: {hmac:.0} values/s"
    );
}

/// EncryptBatch, EncryptColumn, DecryptBatch and DecryptColumn of `--batch` values:
/// (EncryptBatch fields/s, EncryptColumn fields/s).
async fn batch_scenarios(
    o: &Opts,
    fk_ch: &[Channel],
    enc: &(impl Fn() -> EncryptRequest + Clone + Send + Sync + 'static),
    ct: &[u8],
) -> (f64, f64) {
    let n = o.batch;
    let e = enc.clone();
    let s = drive(fk_ch, o, o.seconds, move |ch| {
        let items = (0..n).map(|_| e()).collect();
        async move {
            let r = CryptoClient::new(ch)
                .encrypt_batch(EncryptBatchRequest { items })
                .await
                .unwrap();
            assert_eq!(r.into_inner().results.len(), n);
        }
    })
    .await;
    let batch = report(&format!("EncryptBatch, {n} x {} B", o.size), n as u64, &s) * n as f64;
    let value = bytes::Bytes::from(vec![0x5au8; o.size]);
    let row = bytes::Bytes::from_static(b"row:1");
    let column = EncryptColumnRequest {
        tenant_id: "bench".into(),
        field: "email".into(),
        contexts: vec![row.clone(); n],
        plaintexts: vec![value; n],
        ..Default::default()
    };
    let s = drive(fk_ch, o, o.seconds, move |ch| {
        let r = column.clone();
        async move {
            let r = CryptoClient::new(ch)
                .encrypt_column(r)
                .await
                .unwrap()
                .into_inner();
            assert!(r.errors.is_empty() && r.ciphertexts.len() == n);
        }
    })
    .await;
    let col = report(&format!("EncryptColumn, {n} x {} B", o.size), n as u64, &s) * n as f64;
    let item = DecryptRequest {
        tenant_id: "bench".into(),
        subject_id: String::new(),
        field: "email".into(),
        context: b"row:1".to_vec().into(),
        ciphertext: ct.to_vec().into(),
        repair: false,
    };
    let s = drive(fk_ch, o, o.seconds, move |ch| {
        let items = vec![item.clone(); n];
        async move {
            let r = CryptoClient::new(ch)
                .decrypt_batch(DecryptBatchRequest { items })
                .await
                .unwrap();
            assert_eq!(r.into_inner().results.len(), n);
        }
    })
    .await;
    report(&format!("DecryptBatch, {n} x {} B", o.size), n as u64, &s);
    let column = DecryptColumnRequest {
        tenant_id: "bench".into(),
        field: "email".into(),
        contexts: vec![row; n],
        ciphertexts: vec![bytes::Bytes::copy_from_slice(ct); n],
        ..Default::default()
    };
    let s = drive(fk_ch, o, o.seconds, move |ch| {
        let r = column.clone();
        async move {
            let r = CryptoClient::new(ch)
                .decrypt_column(r)
                .await
                .unwrap()
                .into_inner();
            assert!(r.errors.is_empty() && r.plaintexts.len() == n);
        }
    })
    .await;
    report(&format!("DecryptColumn, {n} x {} B", o.size), n as u64, &s);
    (batch, col)
}

/// Resident memory per cached subject key: encrypts one value for each of `--subjects`
/// new subjects (columns of 1,000 subjects), then compares the sidecar's VmRSS.
async fn cached_subjects(o: &Opts, fk_ch: &[Channel], pid: u32) {
    let (before, _) = rss_mib(pid);
    let t = Instant::now();
    let per_call = 1000;
    let mut c = CryptoClient::new(fk_ch[0].clone());
    let mut done = 0;
    while done < o.subjects {
        let k = per_call.min(o.subjects - done);
        let r = c
            .encrypt_column(EncryptColumnRequest {
                tenant_id: "bench".into(),
                field: "email".into(),
                subject_ids: (done..done + k).map(|i| format!("subject-{i}")).collect(),
                plaintexts: vec![bytes::Bytes::from_static(b"x"); k],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.errors.is_empty(), "{:?}", r.errors.first());
        done += k;
    }
    let (after, hwm) = rss_mib(pid);
    println!(
        "\n{} subject keys created and cached in {:.1} s: RSS {before:.1} -> {after:.1} MiB (peak {hwm:.1}): {:.1} MiB per 100,000",
        o.subjects,
        t.elapsed().as_secs_f64(),
        (after - before) * 100_000.0 / o.subjects as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--serve-echo") {
        serve_echo();
        return;
    }
    let o = opts();
    let data = tempfile::tempdir().unwrap();
    let (mut echo, echo_addr) = spawn(
        {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.arg("--serve-echo");
            c
        },
        "echo listening on ",
    );
    // The email field has a blind-index profile (HMAC-SHA256, 64 bits, NFC + case
    // folding + trimming, as docs/BLIND_INDEX.md suggests for email addresses).
    let cfg_off = data.path().join("fieldkey.toml");
    std::fs::write(
        &cfg_off,
        "[blind_index.fields.email]\nbits = 64\nnormalize = [\"nfc\", \"casefold\", \"trim\"]\n",
    )
    .unwrap();
    let (mut fk, fk_addr) = spawn(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_fieldkey"));
            c.args(["serve", "--listen", "127.0.0.1:0", "--config"])
                .arg(&cfg_off)
                .arg("--data-dir")
                .arg(data.path())
                .env("RUST_LOG", "warn");
            c
        },
        "fieldkey listening on tcp://",
    );
    // The same sidecar with authorization (the example policies) and auditing on.
    let data_on = tempfile::tempdir().unwrap();
    let cfg_on = data_on.path().join("fieldkey.toml");
    std::fs::write(
        &cfg_on,
        format!(
            "[listen]\ntcp_behind_linkerd = true\n[authz]\npolicies = {:?}\nlocal_identity = \"spiffe://example.org/ns/shop/sa/web\"\ntrust_linkerd_identity = true\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies")
        ),
    )
    .unwrap();
    let (mut fk_on, fk_on_addr) = spawn(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_fieldkey"));
            c.args(["serve", "--listen", "127.0.0.1:0", "--config"])
                .arg(&cfg_on)
                .arg("--data-dir")
                .arg(data_on.path())
                .env("RUST_LOG", "warn");
            c
        },
        "fieldkey listening on tcp://",
    );
    // The first sidecar's configuration with Prometheus metrics served (every call
    // counted and timed): the metrics on/off comparison.
    let data_m = tempfile::tempdir().unwrap();
    let (mut fk_m, fk_m_addr) = spawn(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_fieldkey"));
            c.args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&cfg_off)
            .arg("--data-dir")
            .arg(data_m.path())
            .env("RUST_LOG", "warn");
            c
        },
        "fieldkey listening on tcp://",
    );
    let fk_pid = fk.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let fk_ch = channels(&fk_addr, o.connections).await;
        let echo_ch = channels(&echo_addr, o.connections).await;
        KeysClient::new(fk_ch[0].clone())
            .create_tenant(CreateTenantRequest { tenant_id: "bench".into(), kms_key_id: String::new() })
            .await
            .unwrap();
        let value = vec![0x5au8; o.size];
        let enc = {
            let value = value.clone();
            move || EncryptRequest {
                tenant_id: "bench".into(),
                subject_id: String::new(),
                field: "email".into(),
                context: b"row:1".to_vec().into(),
                plaintext: value.clone().into(),
                format: 0,
            }
        };
        let ct = CryptoClient::new(fk_ch[0].clone()).encrypt(enc()).await.unwrap().into_inner().ciphertext;
        let (idle_rss, _) = rss_mib(fk_pid);
        let on_ch = channels(&fk_on_addr, o.connections).await;
        let mut create = tonic::Request::new(CreateTenantRequest { tenant_id: "bench".into(), kms_key_id: String::new() });
        create
            .metadata_mut()
            .insert("l5d-client-id", "spiffe://example.org/ns/ops/sa/keyops".parse().unwrap());
        KeysClient::new(on_ch[0].clone()).create_tenant(create).await.unwrap();
        let batch_payload = {
            let one = EncryptRequest { ..enc() };
            prost::Message::encoded_len(&EncryptBatchRequest { items: vec![one; o.batch] })
        };
        println!(
            "\nconcurrency {} over {} connections, {} s per scenario, {} B fields, batches of {}\n",
            o.concurrency, o.connections, o.seconds, o.size, o.batch
        );
        header();

        if o.only_blind {
            blind_scenarios(&o, &fk_ch, &echo_ch).await;
            return;
        }
        if o.only_batch {
            let big = vec![0x5au8; batch_payload];
            let s = drive(&echo_ch, &o, o.seconds, move |ch| {
                let p = big.clone();
                async move {
                    EchoClient::new(ch).echo(EchoMessage { payload: p }).await.unwrap();
                }
            })
            .await;
            let floor = report(&format!("echo floor, {batch_payload} B (batch size)"), o.batch as u64, &s) * o.batch as f64;
            let fields = batch_scenarios(&o, &fk_ch, &enc, &ct).await;
            println!("\nEncryptBatch / floor {:.2}; EncryptColumn / floor {:.2}", fields.0 / floor, fields.1 / floor);
            return;
        }
        if o.only_metrics {
            let m_ch = channels(&fk_m_addr, o.connections).await;
            KeysClient::new(m_ch[0].clone())
                .create_tenant(CreateTenantRequest { tenant_id: "bench".into(), kms_key_id: String::new() })
                .await
                .unwrap();
            let v = value.clone();
            let echo_stats = drive(&echo_ch, &o, o.seconds, move |ch| {
                let v = v.clone();
                async move {
                    EchoClient::new(ch).echo(EchoMessage { payload: v }).await.unwrap();
                }
            })
            .await;
            report(&format!("echo floor, {} B", o.size), 1, &echo_stats);
            // Metrics on versus off: alternate two rounds each (after a warm-up), same run.
            let (mut off_total, mut on_total) = (0.0, 0.0);
            for round in 0..=2 {
                for (on, chs) in [(false, &fk_ch), (true, &m_ch)] {
                    let e = enc.clone();
                    let secs = if round == 0 { 1 } else { o.seconds };
                    let s = drive(chs, &o, secs, move |ch| {
                        let r = e();
                        async move {
                            CryptoClient::new(ch).encrypt(r).await.unwrap();
                        }
                    })
                    .await;
                    if round == 0 {
                        continue;
                    }
                    let label = format!("Encrypt, {} B, metrics {} (round {round})", o.size, if on { "on" } else { "off" });
                    let ops = report(&label, 1, &s);
                    if on { on_total += ops } else { off_total += ops }
                }
            }
            println!("\nEncrypt with metrics / without: {:.1}% (target >= 95%)", 100.0 * on_total / off_total);
            return;
        }
        // warm-up both servers
        let v = value.clone();
        drive(&echo_ch, &o, 1, move |ch| {
            let v = v.clone();
            async move {
                EchoClient::new(ch).echo(EchoMessage { payload: v }).await.unwrap();
            }
        })
        .await;
        let e = enc.clone();
        drive(&fk_ch, &o, 1, move |ch| {
            let r = e();
            async move {
                CryptoClient::new(ch).encrypt(r).await.unwrap();
            }
        })
        .await;

        let v = value.clone();
        let echo_stats = drive(&echo_ch, &o, o.seconds, move |ch| {
            let v = v.clone();
            async move {
                EchoClient::new(ch).echo(EchoMessage { payload: v }).await.unwrap();
            }
        })
        .await;
        let echo_ops = report(&format!("echo floor, {} B", o.size), 1, &echo_stats);

        let e = enc.clone();
        let s = drive(&fk_ch, &o, o.seconds, move |ch| {
            let r = e();
            async move {
                CryptoClient::new(ch).encrypt(r).await.unwrap();
            }
        })
        .await;
        let enc_ops = report(&format!("Encrypt, {} B", o.size), 1, &s);

        // Authorization + audit on versus off: alternate two rounds each, same run.
        let (mut off_total, mut on_total) = (0.0, 0.0);
        for round in 1..=2 {
            for (on, chs) in [(false, &fk_ch), (true, &on_ch)] {
                let e = enc.clone();
                let s = drive(chs, &o, o.seconds, move |ch| {
                    let r = e();
                    async move {
                        CryptoClient::new(ch).encrypt(r).await.unwrap();
                    }
                })
                .await;
                let label = format!("Encrypt, {} B, authz+audit {} (round {round})", o.size, if on { "on" } else { "off" });
                let ops = report(&label, 1, &s);
                if on { on_total += ops } else { off_total += ops }
            }
        }
        let authz_ratio = on_total / off_total;

        let ct1 = ct.clone();
        let s = drive(&fk_ch, &o, o.seconds, move |ch| {
            let r = DecryptRequest {
                tenant_id: "bench".into(),
                subject_id: String::new(),
                field: "email".into(),
                context: b"row:1".to_vec().into(),
                ciphertext: ct1.clone(),
                repair: false,
            };
            async move {
                CryptoClient::new(ch).decrypt(r).await.unwrap();
            }
        })
        .await;
        report(&format!("Decrypt, {} B", o.size), 1, &s);

        let big = vec![0x5au8; batch_payload];
        let s = drive(&echo_ch, &o, o.seconds, move |ch| {
            let p = big.clone();
            async move {
                EchoClient::new(ch).echo(EchoMessage { payload: p }).await.unwrap();
            }
        })
        .await;
        report(&format!("echo floor, {batch_payload} B (batch size)"), o.batch as u64, &s);

        let fields = batch_scenarios(&o, &fk_ch, &enc, &ct).await;

        blind_scenarios(&o, &fk_ch, &echo_ch).await;

        // Latency at one call in flight, one connection: Encrypt against the echo floor.
        let one = Opts { concurrency: 1, ..o.clone() };
        println!("\none call in flight, one connection:\n");
        header();
        let v = value.clone();
        let echo1 = drive(&echo_ch[..1], &one, o.seconds, move |ch| {
            let v = v.clone();
            async move {
                EchoClient::new(ch).echo(EchoMessage { payload: v }).await.unwrap();
            }
        })
        .await;
        report(&format!("echo floor, {} B, 1 in flight", o.size), 1, &echo1);
        let e = enc.clone();
        let enc1 = drive(&fk_ch[..1], &one, o.seconds, move |ch| {
            let r = e();
            async move {
                CryptoClient::new(ch).encrypt(r).await.unwrap();
            }
        })
        .await;
        report(&format!("Encrypt, {} B, 1 in flight", o.size), 1, &enc1);
        let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as i64;
        println!(
            "\nEncrypt - echo at 1 in flight: p50 {:+} us, p99 {:+} us (target within 10 us)",
            q(&enc1.hist, 0.5) - q(&echo1.hist, 0.5),
            q(&enc1.hist, 0.99) - q(&echo1.hist, 0.99)
        );
        let (rss, hwm) = rss_mib(fk_pid);
        println!("\nsidecar memory: idle {idle_rss:.1} MiB; after the load {rss:.1} MiB (peak {hwm:.1} MiB)");
        if o.subjects > 0 {
            cached_subjects(&o, &fk_ch, fk_pid).await;
        }
        println!(
            "\nEncrypt / echo floor: {:.0}%; EncryptBatch: {:.0} fields/s, EncryptColumn: {:.0} fields/s",
            100.0 * enc_ops / echo_ops,
            fields.0,
            fields.1
        );
        println!(
            "Encrypt with authorization + audit / without: {:.1}% (target >= 90%)",
            100.0 * authz_ratio
        );
    });
    for child in [&mut fk, &mut fk_on, &mut fk_m, &mut echo] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
