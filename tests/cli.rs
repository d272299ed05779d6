//! The built `fieldkey` binary: `serve` on embedded defaults, the client commands against
//! it, exit codes, SIGTERM, and a restart that still decrypts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code fails by panicking"
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fieldkey");

struct Sidecar {
    child: Child,
    addr: String,
}

impl Sidecar {
    fn start(data_dir: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("FIELDKEY_LOCAL_KMS_PASSPHRASE")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("sidecar printed nothing").unwrap();
        let addr = line
            .strip_prefix("fieldkey listening on tcp://")
            .unwrap_or_else(|| panic!("{line}"));
        Self {
            addr: format!("http://{addr}"),
            child,
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("FIELDKEY_ADDR", &self.addr)
            .output()
            .unwrap()
    }

    /// SIGTERM, then the exit status and stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sidecar did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        use std::io::Read as _;
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    }
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim_end()
        .to_owned()
}

#[test]
fn serve_on_embedded_defaults_then_round_trip_rotate_restart_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sidecar::start(dir.path());
    stdout(&s.cli(&["tenant", "create", "acme"]));
    let ct = stdout(&s.cli(&[
        "encrypt",
        "-t",
        "acme",
        "-s",
        "user-1",
        "-f",
        "email",
        "alice@example.com",
    ]));
    assert!(ct.starts_with("fk1:"), "{ct}");
    let pt = stdout(&s.cli(&["decrypt", "-t", "acme", "-s", "user-1", "-f", "email", &ct]));
    assert_eq!(pt, "alice@example.com");

    // exit codes scripts can rely on
    assert_eq!(
        s.cli(&["tenant", "show", "ghost"]).status.code(),
        Some(3),
        "not found"
    );
    s.cli(&["tenant", "create", "other"]);
    let tct = stdout(&s.cli(&["encrypt", "-t", "acme", "-f", "note", "alice@example.com"]));
    let wrong = s.cli(&["decrypt", "-t", "other", "-f", "note", &tct]);
    assert_eq!(
        wrong.status.code(),
        Some(4),
        "refused: {}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("AUTHENTICATION_FAILED"));
    assert!(!String::from_utf8_lossy(&wrong.stderr).contains("alice"));
    let shown = stdout(&s.cli(&["tenant", "rotate", "acme"]));
    assert!(
        shown.contains("active version 2") && shown.contains("decrypt_only"),
        "{shown}"
    );
    let due = stdout(&s.cli(&["tenant", "rotate-due", "--dry-run"]));
    assert!(
        due.contains("rotate after 365 days") && due.contains("dry run") && due.contains("acme"),
        "{due}"
    );
    assert!(
        due.lines()
            .any(|l| l.starts_with("acme") && l.contains(" ok ")),
        "{due}"
    );
    let retire = s.cli(&["tenant", "retire", "acme", "1"]);
    assert_eq!(retire.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&retire.stderr).contains("RETIREMENT_BLOCKED"));
    let job = s.cli(&["jobs", "status", "nope"]);
    assert_eq!(job.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&job.stderr).contains("JOB_NOT_FOUND"));

    let (status, log) = s.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{log}");
    assert!(log.contains("stopped; cached keys wiped"), "{log}");
    assert!(!log.contains("alice@example.com"), "plaintext never logged");

    // the embedded store and local KMS survive a restart
    let s = Sidecar::start(dir.path());
    let pt = stdout(&s.cli(&["decrypt", "-t", "acme", "-s", "user-1", "-f", "email", &ct]));
    assert_eq!(pt, "alice@example.com");
    let _ = s.terminate();
}

#[test]
fn client_exit_code_when_no_sidecar_answers_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = Command::new(BIN)
        .args([
            "tenant",
            "show",
            "acme",
            "--addr",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("is `fieldkey serve` running?"));
}

#[test]
fn help_is_available_everywhere_and_usage_errors_exit_2() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["encrypt", "--help"],
        &["tenant", "rotate", "--help"],
        &["tenant", "rotate-due", "--help"],
        &["tenant", "rewrap-kms-key", "--help"],
        &["jobs", "run", "--help"],
        &["jobs", "watch", "--help"],
    ] {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}");
        assert!(!o.stdout.is_empty());
    }
    for args in [
        &["encrypt"][..],
        &["tenant", "rewrap-kms-key", "--kms-key-id", "k"],
        &[
            "tenant",
            "rewrap-kms-key",
            "--kms-key-id",
            "k",
            "acme",
            "--all",
        ],
        &["jobs", "run", "spec.toml", "--lease-seconds", "0"],
    ] {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
    }
}
