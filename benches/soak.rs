//! Soak: mixed traffic against one `fieldkey serve` process on the embedded defaults
//! (SQLite, local KMS; the blind-index profile and metrics on, as `loadgen` runs it) for
//! N minutes, printing one line per interval: calls/s per kind, errors by status code,
//! and the sidecar's resident memory (VmRSS now, the highest sampled in the interval,
//! and the kernel's high-water mark VmHWM). Not run in CI; `scripts/soak.sh` runs it.
//!
//! ```sh
//! scripts/soak.sh                      # 10 minutes, a line per minute
//! scripts/soak.sh --minutes 2 --concurrency 32
//! ```
//! Options: `--minutes N` (10), `--interval-secs N` between lines (60),
//! `--concurrency N` calls in flight (16), `--connections N` HTTP/2 connections (4).
//!
//! The mix, per call drawn at random: Encrypt and Decrypt of 32-byte values (half of
//! them under one of 1,000 subjects' keys), EncryptBatch and BlindIndexBatch of 100
//! values, Encrypt and Decrypt of 1 MB values, and invalid requests that must be refused
//! (an unknown tenant, an empty tenant id, a tampered ciphertext, a value over the
//! 1 MiB field limit, a batch over the item limit). An error on a valid call, or an
//! invalid call that succeeds, is counted as unexpected.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "benchmark driver fails by panicking"
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fieldkey::proto::pb::crypto_client::CryptoClient;
use fieldkey::proto::pb::keys_client::KeysClient;
use fieldkey::proto::pb::{
    BlindIndexBatchRequest, BlindIndexRequest, CreateTenantRequest, DecryptRequest,
    EncryptBatchRequest, EncryptRequest,
};
use tonic::transport::Channel;

struct Opts {
    minutes: u64,
    interval: u64,
    concurrency: usize,
    connections: usize,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number"))
            })
            .unwrap_or(default)
    };
    Opts {
        minutes: get("--minutes", 10),
        interval: get("--interval-secs", 60).max(1),
        concurrency: get("--concurrency", 16) as usize,
        connections: get("--connections", 4).max(1) as usize,
    }
}

/// The kinds of call, with their weight in the mix (out of 100).
#[derive(Clone, Copy, Debug)]
enum Kind {
    Encrypt,
    Decrypt,
    EncryptBatch,
    BlindIndexBatch,
    EncryptLarge,
    DecryptLarge,
    Invalid,
}

const KINDS: [(Kind, u32, &str); 7] = [
    (Kind::Encrypt, 35, "Encrypt"),
    (Kind::Decrypt, 30, "Decrypt"),
    (Kind::EncryptBatch, 10, "EncryptBatch"),
    (Kind::BlindIndexBatch, 10, "BlindIndexBatch"),
    (Kind::EncryptLarge, 2, "Encrypt 1MB"),
    (Kind::DecryptLarge, 3, "Decrypt 1MB"),
    (Kind::Invalid, 10, "invalid"),
];

/// tonic's codes, 0 (Ok) to 16.
const CODES: usize = 17;

/// Calls by kind and status code, since the start.
struct Counts {
    calls: Vec<[AtomicU64; CODES]>,
    unexpected: AtomicU64,
}

impl Counts {
    fn new() -> Self {
        Self {
            calls: KINDS
                .iter()
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            unexpected: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> Vec<[u64; CODES]> {
        self.calls
            .iter()
            .map(|k| std::array::from_fn(|c| k[c].load(Ordering::Relaxed)))
            .collect()
    }
}

/// The values the traffic needs: ciphertexts to decrypt, made once.
struct Fixture {
    small: Vec<u8>,
    /// (subject, ciphertext) under subject keys.
    by_subject: Vec<(String, Vec<u8>)>,
    large: Vec<u8>,
    large_ct: Vec<u8>,
}

const TENANT: &str = "soak";
const SUBJECTS: usize = 1000;
const LARGE: usize = 1_000_000;

fn enc(subject: &str, plaintext: Vec<u8>) -> EncryptRequest {
    let plaintext = plaintext.into();
    EncryptRequest {
        tenant_id: TENANT.into(),
        subject_id: subject.into(),
        field: "email".into(),
        context: b"row:1".to_vec().into(),
        plaintext,
        format: 0,
    }
}

fn dec(subject: &str, ciphertext: Vec<u8>) -> DecryptRequest {
    let ciphertext = ciphertext.into();
    DecryptRequest {
        tenant_id: TENANT.into(),
        subject_id: subject.into(),
        field: "email".into(),
        context: b"row:1".to_vec().into(),
        ciphertext,
        repair: false,
    }
}

fn pick<T: Clone>(v: &[T]) -> T {
    v[rand::random_range(0..v.len())].clone()
}

/// One call of `kind`; its status code and whether that was the expected outcome.
async fn call(ch: Channel, kind: Kind, f: &Fixture) -> (tonic::Code, bool) {
    let mut c = CryptoClient::new(ch).max_decoding_message_size(64 << 20);
    let small =
        || format!("user{:08}@example.org", rand::random_range(0..1_000_000u32)).into_bytes();
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |()| tonic::Code::Ok);
    match kind {
        Kind::Encrypt => {
            let subject = if rand::random() {
                format!("s{}", rand::random_range(0..SUBJECTS))
            } else {
                String::new()
            };
            let r = code(c.encrypt(enc(&subject, small())).await.map(drop));
            (r, r == tonic::Code::Ok)
        }
        Kind::Decrypt => {
            let (subject, ct) = if rand::random() {
                pick(&f.by_subject)
            } else {
                (String::new(), f.small.clone())
            };
            let r = code(c.decrypt(dec(&subject, ct)).await.map(drop));
            (r, r == tonic::Code::Ok)
        }
        Kind::EncryptBatch => {
            let items = (0..100).map(|_| enc("", small())).collect();
            let r = code(
                c.encrypt_batch(EncryptBatchRequest { items })
                    .await
                    .map(drop),
            );
            (r, r == tonic::Code::Ok)
        }
        Kind::BlindIndexBatch => {
            let items = (0..100)
                .map(|_| BlindIndexRequest {
                    tenant_id: TENANT.into(),
                    field: "email".into(),
                    value: small(),
                    format: 0,
                    lookup: false,
                })
                .collect();
            let r = code(
                c.blind_index_batch(BlindIndexBatchRequest { items })
                    .await
                    .map(drop),
            );
            (r, r == tonic::Code::Ok)
        }
        Kind::EncryptLarge => {
            let r = code(c.encrypt(enc("", f.large.clone())).await.map(drop));
            (r, r == tonic::Code::Ok)
        }
        Kind::DecryptLarge => {
            let r = code(c.decrypt(dec("", f.large_ct.clone())).await.map(drop));
            (r, r == tonic::Code::Ok)
        }
        Kind::Invalid => {
            let r = match rand::random_range(0..5u32) {
                0 => {
                    let mut e = enc("", small());
                    e.tenant_id = "no-such-tenant".into();
                    c.encrypt(e).await.map(drop)
                }
                1 => {
                    let mut e = enc("", small());
                    e.tenant_id = String::new();
                    c.encrypt(e).await.map(drop)
                }
                2 => {
                    let mut ct = f.small.clone();
                    let last = ct.len() - 1;
                    ct[last] ^= 1;
                    c.decrypt(dec("", ct)).await.map(drop)
                }
                3 => c.encrypt(enc("", vec![7u8; (1 << 20) + 1])).await.map(drop),
                _ => {
                    let items = (0..10_001).map(|_| enc("", b"x".to_vec())).collect();
                    c.encrypt_batch(EncryptBatchRequest { items })
                        .await
                        .map(drop)
                }
            };
            let r = code(r);
            (r, r != tonic::Code::Ok)
        }
    }
}

fn draw() -> usize {
    let mut n = rand::random_range(0..100u32);
    for (i, (_, w, _)) in KINDS.iter().enumerate() {
        if n < *w {
            return i;
        }
        n -= w;
    }
    0
}

/// A `/proc/<pid>/status` line's value in MiB (`VmRSS`, `VmHWM`).
fn status_mib(pid: u32, key: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .strip_prefix(':')?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn code_name(c: usize) -> String {
    format!("{:?}", tonic::Code::from(c as i32))
}

fn main() {
    let o = opts();
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("fieldkey.toml");
    std::fs::write(
        &cfg,
        "[blind_index.fields.email]\nbits = 64\nnormalize = [\"nfc\", \"casefold\", \"trim\"]\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fieldkey"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(data.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("sidecar printed nothing").unwrap();
        if let Some(a) = line.strip_prefix("fieldkey listening on tcp://") {
            break format!("http://{a}");
        }
    };
    // The rest of stdout, read so that the sidecar never blocks on it.
    std::thread::spawn(move || for _ in lines {});

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut chs = Vec::new();
        for _ in 0..o.connections {
            chs.push(
                Channel::from_shared(addr.clone())
                    .unwrap()
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .unwrap(),
            );
        }
        KeysClient::new(chs[0].clone())
            .create_tenant(CreateTenantRequest {
                tenant_id: TENANT.into(),
                kms_key_id: String::new(),
            })
            .await
            .unwrap();
        let mut c = CryptoClient::new(chs[0].clone()).max_decoding_message_size(64 << 20);
        let ct = |r: EncryptRequest| {
            let mut c = c.clone();
            async move { c.encrypt(r).await.unwrap().into_inner().ciphertext.to_vec() }
        };
        let small = ct(enc("", b"someone@example.org".to_vec())).await;
        let mut by_subject = Vec::new();
        for i in 0..100 {
            let s = format!("s{}", i * (SUBJECTS / 100));
            by_subject.push((s.clone(), ct(enc(&s, b"someone@example.org".to_vec())).await));
        }
        let large = vec![0x5au8; LARGE];
        let large_ct = ct(enc("", large.clone())).await;
        c.decrypt(dec("", large_ct.clone())).await.unwrap();
        let fixture = Arc::new(Fixture {
            small,
            by_subject,
            large,
            large_ct,
        });

        let counts = Arc::new(Counts::new());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..o.concurrency {
            let (ch, f, counts, stop) = (
                chs[i % chs.len()].clone(),
                fixture.clone(),
                counts.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let k = draw();
                    let (code, expected) = call(ch.clone(), KINDS[k].0, &f).await;
                    counts.calls[k][code as usize].fetch_add(1, Ordering::Relaxed);
                    if !expected {
                        counts.unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }

        println!(
            "\nsoak: {} min, concurrency {} over {} connections, a line every {} s; sidecar pid {pid}, RSS at start {:.1} MiB\n",
            o.minutes,
            o.concurrency,
            o.connections,
            o.interval,
            status_mib(pid, "VmRSS")
        );
        let names: Vec<&str> = KINDS.iter().map(|k| k.2).collect();
        println!(
            "| t (s) | {} | errors by code | unexpected | RSS MiB | max RSS MiB (interval) | VmHWM MiB |",
            names.iter().map(|n| format!("{n} /s")).collect::<Vec<_>>().join(" | ")
        );
        println!("|{}", " ---: |".repeat(names.len() + 6));
        let start = Instant::now();
        let end = start + Duration::from_secs(o.minutes * 60);
        let mut before = counts.snapshot();
        let mut unexpected_before = 0;
        let mut peak_all = 0.0f64;
        let mut next = start;
        while next < end {
            next = (next + Duration::from_secs(o.interval)).min(end);
            let mut peak = 0.0f64;
            while Instant::now() < next {
                peak = peak.max(status_mib(pid, "VmRSS"));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            peak_all = peak_all.max(peak);
            let now = counts.snapshot();
            let secs = o.interval as f64;
            let rates: Vec<String> = (0..KINDS.len())
                .map(|k| {
                    let n: u64 = (0..CODES).map(|c| now[k][c] - before[k][c]).sum();
                    format!("{:.0}", n as f64 / secs)
                })
                .collect();
            let mut errors: Vec<String> = (1..CODES)
                .filter_map(|c| {
                    let n: u64 = (0..KINDS.len()).map(|k| now[k][c] - before[k][c]).sum();
                    (n > 0).then(|| format!("{} {n}", code_name(c)))
                })
                .collect();
            if errors.is_empty() {
                errors.push("none".into());
            }
            let unexpected = counts.unexpected.load(Ordering::Relaxed);
            println!(
                "| {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                start.elapsed().as_secs_f64(),
                rates.join(" | "),
                errors.join(", "),
                unexpected - unexpected_before,
                status_mib(pid, "VmRSS"),
                peak,
                status_mib(pid, "VmHWM"),
            );
            before = now;
            unexpected_before = unexpected;
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let total: u64 = counts.snapshot().iter().flatten().sum();
        println!(
            "\n{total} calls in {:.0} s; unexpected outcomes {}; RSS peak sampled {peak_all:.1} MiB, VmHWM {:.1} MiB, RSS at the end {:.1} MiB",
            start.elapsed().as_secs_f64(),
            counts.unexpected.load(Ordering::Relaxed),
            status_mib(pid, "VmHWM"),
            status_mib(pid, "VmRSS"),
        );
    });
    let _ = child.kill();
    let _ = child.wait();
}
