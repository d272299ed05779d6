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

/// `fieldkey encrypt|decrypt --lines`: standard input as columns (here of 3 values, so
/// 7 lines take three calls), one result per line in order; a bad line prints an empty
/// line and its number and reason on standard error, exit status 1.
#[test]
fn lines_go_through_columns_in_order_and_a_bad_line_fails_alone() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    stdout(&s.cli(&["tenant", "create", "acme"]));
    let with_stdin = |args: &[&str], input: &str| -> Output {
        let mut child = Command::new(BIN)
            .args(args)
            .env("FIELDKEY_ADDR", &s.addr)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let values: Vec<String> = (0..7)
        .map(|i| format!("row:{i}\tuser{i}@example.org"))
        .collect();
    let scope = [
        "-t",
        "acme",
        "-s",
        "u1",
        "-f",
        "email",
        "--lines",
        "--tab-context",
    ];
    let mut enc_args = vec!["encrypt"];
    enc_args.extend(scope);
    enc_args.extend(["--column-size", "3"]);
    let cts = stdout(&with_stdin(&enc_args, &(values.join("\n") + "\n")));
    let cts: Vec<&str> = cts.lines().collect();
    assert_eq!(cts.len(), 7);
    assert!(cts.iter().all(|c| c.starts_with("fk1:")));
    // Back, with line 5 moved to another row (its context) and line 6 not a ciphertext.
    let lines: Vec<String> = cts
        .iter()
        .enumerate()
        .map(|(i, c)| match i {
            4 => format!("row:0\t{c}"),
            5 => "row:5\tgarbage".to_owned(),
            _ => format!("row:{i}\t{c}"),
        })
        .collect();
    let mut dec_args = vec!["decrypt"];
    dec_args.extend(scope);
    dec_args.extend(["--column-size", "3"]);
    let out = with_stdin(&dec_args, &lines.join("\n"));
    assert_eq!(out.status.code(), Some(1));
    let printed = String::from_utf8(out.stdout).unwrap();
    let printed: Vec<&str> = printed.lines().collect();
    assert_eq!(printed.len(), 7);
    for (i, p) in printed.iter().enumerate() {
        if i == 4 || i == 5 {
            assert_eq!(*p, "", "line {}", i + 1);
        } else {
            assert_eq!(*p, format!("user{i}@example.org"));
        }
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5: AUTHENTICATION_FAILED"), "{err}");
    assert!(err.contains("line 6: MALFORMED_CIPHERTEXT"), "{err}");
    assert!(err.contains("2 of 7 values failed"), "{err}");
    assert!(!err.contains("user4@"), "no plaintext in errors: {err}");
    let _ = s.terminate();
}
