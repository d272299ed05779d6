//! The built `fieldkey` binary: `serve` on embedded defaults, the client commands against
//! it, exit codes, SIGTERM, and a restart that still decrypts.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::sidecar::{BIN, Sidecar};

/// `fieldkey serve` on the embedded defaults under `data_dir`, without a passphrase.
/// Authorization OFF on purpose: the embedded defaults are the development mode these
/// tests are about (every caller may do everything; the sidecar warns at start).
fn start(data_dir: &Path) -> Sidecar {
    Sidecar::builder()
        .authz_off()
        .any_port()
        .data_dir(data_dir)
        .env_remove("FIELDKEY_LOCAL_KMS_PASSPHRASE")
        .start()
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
    let s = start(dir.path());
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
    assert!(
        log.contains("AUTHORIZATION IS OFF"),
        "the development defaults say authorization is off: {log}"
    );
    assert!(!log.contains("alice@example.com"), "plaintext never logged");

    // the embedded store and local KMS survive a restart
    let s = start(dir.path());
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
