//! Re-encryption job specs: `jobs::JobSpec::from_toml` (the operator's file, `fieldkey
//! jobs run`) and `JobSpec::from_json` (the stored form every runner compares with).
//!
//! Properties:
//! - nothing panics;
//! - a spec that parses is valid, and its stored JSON reads back equal;
//! - every name the runner puts into SQL (table, schema, key, tenant, subject, context,
//!   value and blind-index columns, the URL's environment variable) is a plain
//!   identifier (ASCII letters, digits, `_`, not starting with a digit, 1..=63 bytes):
//!   checked here independently of the parser's own check, so that quoting it cannot
//!   be escaped; 1..=16 value columns with distinct names; batch size 1..=10000;
//! - a stored spec that reads reads back equal from its own JSON.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use fieldkey::jobs::JobSpec;
use libfuzzer_sys::fuzz_target;

fn plain_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && !b.first().unwrap().is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn check_valid(spec: &JobSpec) {
    let mut names: Vec<&str> = spec.table.split('.').collect();
    assert!(names.len() <= 2);
    names.push(&spec.primary_key);
    names.push(&spec.database_url_env);
    for c in [
        &spec.tenant_column,
        &spec.subject_column,
        &spec.context_column,
    ]
    .into_iter()
    .flatten()
    {
        names.push(c);
    }
    for c in &spec.columns {
        names.push(&c.name);
        if let Some(ix) = &c.blind_index {
            names.push(ix);
        }
    }
    for n in names {
        assert!(plain_identifier(n), "{n:?} reached SQL");
    }
    assert!((1..=16).contains(&spec.columns.len()));
    for (i, c) in spec.columns.iter().enumerate() {
        assert!(spec.columns.iter().skip(i + 1).all(|d| d.name != c.name));
        assert_ne!(c.name, spec.primary_key);
    }
    assert!((1..=10_000).contains(&spec.batch_size));
    assert!(spec.tenant.is_some() || spec.tenant_column.is_some());
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![fieldkey_fuzz::file_seed!(
        "deploy-users.toml",
        "deploy/k8s/base/jobs/users.toml"
    )];
    out.extend(fieldkey_fuzz::text_seeds(&[
        (
            "minimal.toml",
            "name = \"users-2026\"\ntable = \"users\"\nprimary_key = \"id\"\ntenant = \"acme\"\n\
             [[columns]]\nname = \"email\"\nfield = \"email\"\n",
        ),
        (
            "everything.toml",
            "name = \"j\"\ndatabase_url_env = \"APP_DB\"\ntable = \"s.t\"\nprimary_key = \"pk\"\n\
             tenant_column = \"tc\"\ntenant = \"acme\"\nsubject_column = \"sc\"\ncontext_column = \"cc\"\n\
             batch_size = 10000\nrate_limit_rows_per_sec = 50\n\
             [[columns]]\nname = \"a\"\nfield = \"users.a\"\nblind_index = \"a_ix\"\n\
             [[columns]]\nname = \"b\"\nfield = \"b\"\n",
        ),
        (
            "injection.toml",
            "name = \"j\"\ntable = \"users\\\"; drop table x; --\"\nprimary_key = \"id\"\ntenant = \"t\"\n\
             [[columns]]\nname = \"e\"\nfield = \"e\"\n",
        ),
        (
            "stored.json",
            r#"{"name":"users-2026","database_url_env":"FIELDKEY_JOB_DATABASE_URL","table":"public.users","primary_key":"id","tenant_column":"tenant_id","tenant":null,"subject_column":"user_id","context_column":null,"batch_size":1000,"rate_limit_rows_per_sec":0,"columns":[{"name":"email","field":"email","blind_index":"email_bidx"}]}"#,
        ),
        ("empty", ""),
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
        if let Ok(spec) = JobSpec::from_toml(text) {
            spec.validate().expect("a parsed spec validates");
            check_valid(&spec);
            let back = JobSpec::from_json(&spec.to_json()).expect("stored form reads");
            assert_eq!(back, spec);
            assert!(spec.target().ends_with(&spec.table));
        }
        if let Ok(spec) = JobSpec::from_json(text) {
            if spec.validate().is_ok() {
                check_valid(&spec);
            }
            assert_eq!(JobSpec::from_json(&spec.to_json()).expect("reads"), spec);
        }
    }
);
