//! The configuration file: the TOML parse `config::Config::from_file` runs on the
//! file's text, then `Config::validate` as `fieldkey serve` runs it at start.
//!
//! Properties:
//! - nothing panics (parse, validation, the derived paths and index profiles);
//! - a configuration that validates keeps what validation promises, checked here
//!   independently: positive limits, at least one listener, the erasure and epoch
//!   periods within the 30-day backup budget (finite), a KMS deletion window within
//!   its range, valid blind-index profiles, and the local KMS's epoch-key directory
//!   not inside the data directory (compared with `.` and `..` resolved, as the
//!   filesystem would).
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Component, Path, PathBuf};

use fieldkey::config::Config;
use libfuzzer_sys::fuzz_target;

/// `p` made absolute, with `.` and `..` resolved lexically (symbolic links aside).
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn check_valid(c: &Config) {
    let l = &c.limits;
    assert!(l.max_batch_items > 0 && l.max_field_bytes > 0 && l.max_concurrent_requests > 0);
    assert!(l.max_message_bytes >= 1024 && l.request_timeout_ms > 0);
    assert!(c.listen.tcp.is_some() || c.listen.unix.is_some() || c.listen.mtls.is_some());
    assert!((7..=30).contains(&c.erasure.kms_key_deletion_days));
    let worst = c.epochs.worst_case_days(c.erasure.max_grace_days);
    assert!(
        worst.is_finite() && worst <= 30.0,
        "worst case {worst} days"
    );
    assert!(c.epochs.length_days > 0.0 && c.epochs.roll_time_days >= 0.0);
    assert!(c.epochs.kms_deletion_days <= 30);
    assert!(c.metrics.refresh_secs > 0 && c.erasure.poll_ms >= 10);
    for (name, f) in &c.blind_index.fields {
        f.profile(name)
            .expect("a validated field profile")
            .validate()
            .expect("valid");
    }
    if c.kms.aws_key_id.is_none() {
        let keys = resolved(&c.local_keys_dir());
        let data = resolved(&c.data_dir);
        assert!(
            !keys.starts_with(&data),
            "local_keys_dir {keys:?} is inside data_dir {data:?}"
        );
    }
    let _ = (
        c.sqlite_path(),
        c.local_key_file(),
        c.limits.request_timeout(),
    );
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        fieldkey_fuzz::file_seed!("k8s-fieldkey.toml", "deploy/k8s/base/config/fieldkey.toml"),
        fieldkey_fuzz::file_seed!("k8s-admin.toml", "deploy/k8s/base/config/admin.toml"),
        fieldkey_fuzz::file_seed!("docker.toml", "deploy/docker/fieldkey.toml"),
    ];
    out.extend(fieldkey_fuzz::text_seeds(&[
        ("empty", ""),
        (
            "epochs-and-keys.toml",
            "data_dir = \"data\"\n[epochs]\nlength_days = 2.5\nroll_time_days = 0.5\n\
             kms_deletion_days = 0\nlocal_keys_dir = \"keys\"\nkey_pool = [\"k1\"]\n\
             [erasure]\nmax_grace_days = 20\nkms_key_deletion_days = 30\n",
        ),
        ("epochs-nan.toml", "[epochs]\nlength_days = nan\nroll_time_days = -inf\n"),
        (
            "index-profiles.toml",
            "[blind_index]\nargon2_concurrency = 2\n[blind_index.fields.dob]\nalgorithm = \"argon2id\"\n\
             bits = 128\nnormalize = [\"nfkc\", \"trim\"]\n[blind_index.fields.dob.argon2]\n\
             memory_kib = 8\niterations = 1\nparallelism = 1\n",
        ),
        (
            "limits.toml",
            "[limits]\nmax_message_bytes = 1024\nmax_batch_items = 1\nmax_field_bytes = 1\n\
             request_timeout_ms = 18446744073709551615\nmax_concurrent_requests = 1\n\
             [cache]\nmax_stale_ms = 0\n[listen]\nunix = \"/run/fieldkey.sock\"\n",
        ),
    ]));
    out
}

fuzz_target!(
    init: {
        fieldkey_fuzz::write_seeds(&seeds());
    },
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(c) = toml::from_str::<Config>(text) else {
            return;
        };
        if c.validate().is_ok() {
            check_valid(&c);
        }
    }
);
