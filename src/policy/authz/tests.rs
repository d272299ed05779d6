use std::str::FromStr;
use std::time::Instant;

use super::engine::first_bad_statement;
use super::*;

const WEB: &str = "spiffe://example.org/ns/shop/sa/web";
const ANALYTICS: &str = "spiffe://example.org/ns/analytics/sa/export";
const KEYOPS: &str = "spiffe://example.org/ns/ops/sa/keyops";
const ERASURE: &str = "spiffe://example.org/ns/privacy/sa/erasure";
const AUDITOR: &str = "spiffe://example.org/ns/audit/sa/auditor";

fn shipped() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))
}

/// A temporary copy of the shipped `*.cedar` files and `limits.toml`.
fn copy_of_shipped() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name.ends_with(".cedar") || name == LIMITS_FILE {
            std::fs::copy(entry.path(), dir.path().join(&name)).unwrap();
        }
    }
    dir
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn req<'a>(
    identity: &'a str,
    transport: &'a str,
    action: Action,
    tenant: Option<&'a str>,
    field: Option<&'a str>,
) -> AuthzRequest<'a> {
    AuthzRequest {
        identity,
        transport,
        action,
        tenant,
        field,
    }
}

/// The request the service sends for `action`, by its scope.
fn natural<'a>(identity: &'a str, transport: &'a str, action: Action) -> AuthzRequest<'a> {
    match action.scope() {
        Scope::Field => req(identity, transport, action, Some("acme"), Some("email")),
        Scope::Tenant | Scope::TenantOrService => {
            req(identity, transport, action, Some("acme"), None)
        }
        Scope::Service => req(identity, transport, action, None, None),
    }
}

fn allowed(a: &Authorizer, r: &AuthzRequest<'_>) -> bool {
    a.authorize(r).allowed
}

use Action as A;

/// Exactly what each example identity may do.
fn grants() -> Vec<(&'static str, &'static str, Vec<Action>)> {
    vec![
        (
            WEB,
            TRANSPORT_LOCAL,
            vec![
                A::Encrypt,
                A::Decrypt,
                A::Rewrap,
                A::BlindIndex,
                A::Pseudonymize,
                A::WhoAmI,
            ],
        ),
        (
            ANALYTICS,
            TRANSPORT_MTLS,
            vec![A::Pseudonymize, A::BlindIndex],
        ),
        (
            KEYOPS,
            TRANSPORT_MTLS,
            vec![
                A::CreateTenant,
                A::GetTenant,
                A::RotateTenantKey,
                A::ListTenants,
                A::CheckRotation,
                A::RewrapKmsKey,
                A::RetireKeyVersion,
                A::ListJobs,
                A::GetJob,
                A::WatchJob,
                A::PauseJob,
                A::ResumeJob,
                A::CancelJob,
                A::WhoAmI,
                A::RollEpoch,
                A::GetEpochStatus,
            ],
        ),
        (
            ERASURE,
            TRANSPORT_MTLS,
            vec![
                A::ShredSubject,
                A::ShredTenant,
                A::CancelErasure,
                A::GetErasure,
                A::ListErasures,
                A::SuspendSubject,
                A::ResumeSubject,
                A::SuspendTenant,
                A::ResumeTenant,
                A::GetReceiptKey,
                A::GetTenant,
                A::WhoAmI,
            ],
        ),
        (
            AUDITOR,
            TRANSPORT_MTLS,
            vec![
                A::ExportAudit,
                A::GetAuditHead,
                A::GetComplianceReport,
                A::GetReceiptKey,
                A::WhoAmI,
            ],
        ),
    ]
}

#[test]
fn each_example_identity_may_do_exactly_its_list() {
    let a = Authorizer::load(&shipped()).unwrap();
    for (identity, transport, list) in grants() {
        let mut wrong = Vec::new();
        for &action in Action::ALL {
            // The natural resource, and every other resource shape: data operations
            // need a field; nothing else depends on the resource.
            let shapes = [
                (Some("acme"), Some("email")),
                (Some("globex"), None),
                (None, None),
            ];
            for (tenant, field) in shapes {
                let expect =
                    list.contains(&action) && (action.scope() != Scope::Field || field.is_some());
                let r = req(identity, transport, action, tenant, field);
                let d = a.authorize(&r);
                if d.allowed != expect {
                    wrong.push(format!(
                        "{action} on {tenant:?}/{field:?}: allowed={} ({})",
                        d.allowed, d.reason
                    ));
                }
            }
            let n = natural(identity, transport, action);
            assert_eq!(
                allowed(&a, &n),
                list.contains(&action),
                "{identity} {action}"
            );
        }
        assert!(wrong.is_empty(), "{identity}:\n{}", wrong.join("\n"));
    }
}

#[test]
fn anyone_else_is_denied_everything() {
    let a = Authorizer::load(&shipped()).unwrap();
    let strangers = [
        "spiffe://example.org/ns/shop/sa/other",
        "spiffe://example.org/ns/shop/sa/web/",
        "SPIFFE://example.org/ns/shop/sa/web",
        "spiffe://evil.org/ns/shop/sa/web",
        "web.shop.svc.cluster.local",
        "local",
        "",
    ];
    for id in strangers {
        for transport in [TRANSPORT_LOCAL, TRANSPORT_MTLS, TRANSPORT_LINKERD] {
            for &action in Action::ALL {
                let d = a.authorize(&natural(id, transport, action));
                assert!(!d.allowed, "{id:?} {action}: {}", d.reason);
                assert!(d.reason.starts_with("no policy permits "), "{}", d.reason);
            }
        }
    }
}

#[test]
fn the_application_gets_data_operations_only_through_the_local_listener() {
    let a = Authorizer::load(&shipped()).unwrap();
    for transport in [TRANSPORT_MTLS, TRANSPORT_LINKERD, "LOCAL", ""] {
        for action in [
            A::Encrypt,
            A::Decrypt,
            A::Rewrap,
            A::BlindIndex,
            A::Pseudonymize,
        ] {
            assert!(
                !allowed(&a, &natural(WEB, transport, action)),
                "{transport} {action}"
            );
        }
        assert!(allowed(&a, &natural(WEB, transport, A::WhoAmI)));
    }
    assert!(allowed(&a, &natural(WEB, TRANSPORT_LOCAL, A::Decrypt)));
}

#[test]
fn reasons_name_the_policy_or_the_missing_permission() {
    let a = Authorizer::load(&shipped()).unwrap();
    let d = a.authorize(&natural(WEB, TRANSPORT_LOCAL, A::Decrypt));
    assert_eq!(&*d.reason, "permitted by policy app.cedar:data");
    let d = a.authorize(&natural(KEYOPS, TRANSPORT_MTLS, A::Decrypt));
    assert_eq!(
        &*d.reason,
        "no policy permits Crypto::Decrypt on field acme/email for spiffe://example.org/ns/ops/sa/keyops"
    );
    let d = a.authorize(&natural(ANALYTICS, TRANSPORT_MTLS, A::Decrypt));
    assert!(!d.allowed);
    assert_eq!(
        &*d.reason,
        "forbidden by policy analytics.cedar:never-decrypt: Crypto::Decrypt on field acme/email \
         for spiffe://example.org/ns/analytics/sa/export"
    );
    let d = a.authorize(&natural(AUDITOR, TRANSPORT_MTLS, A::ShredTenant));
    assert!(d.reason.ends_with(
        "Erasures::ShredTenant on tenant acme for spiffe://example.org/ns/audit/sa/auditor"
    ));
    let d = a.authorize(&natural(AUDITOR, TRANSPORT_MTLS, A::ListTenants));
    assert!(d.reason.contains("on service fieldkey"));
    // Control characters cannot forge log lines.
    let d = a.authorize(&req(
        "evil\nid",
        TRANSPORT_MTLS,
        A::Encrypt,
        Some("t\r"),
        Some("f"),
    ));
    assert!(
        !d.reason.contains('\n') && !d.reason.contains('\r'),
        "{}",
        d.reason
    );
    assert!(d.reason.contains("evil\\nid"));
}

#[test]
fn forbid_overrides_any_permit() {
    let dir = copy_of_shipped();
    let a = Authorizer::load(dir.path()).unwrap();
    write(
        dir.path(),
        "oops.cedar",
        "// far too broad\npermit (principal, action, resource);\n",
    );
    assert!(a.reload());
    for action in [A::Decrypt, A::Rewrap] {
        let d = a.authorize(&natural(ANALYTICS, TRANSPORT_MTLS, action));
        assert!(!d.allowed, "{action}");
        assert!(
            d.reason
                .starts_with("forbidden by policy analytics.cedar:never-decrypt")
        );
    }
    assert!(allowed(&a, &natural(ANALYTICS, TRANSPORT_MTLS, A::Encrypt)));
    assert!(allowed(
        &a,
        &natural("stranger", TRANSPORT_MTLS, A::Decrypt)
    ));
}

#[test]
fn policies_can_use_the_tenant_and_field_of_the_resource() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.cedar",
        r#"
        @id("acme-email")
        permit (principal == Identity::"a", action == Action::"Crypto::Decrypt", resource in Tenant::"acme")
        when { resource is Field && resource.name == "email" };
        @id("ops")
        permit (principal == Identity::"a", action in Action::"Jobs", resource in Service::"fieldkey");
        "#,
    );
    let a = Authorizer::load(dir.path()).unwrap();
    assert!(allowed(
        &a,
        &req("a", "mtls", A::Decrypt, Some("acme"), Some("email"))
    ));
    assert!(!allowed(
        &a,
        &req("a", "mtls", A::Decrypt, Some("acme"), Some("phone"))
    ));
    assert!(!allowed(
        &a,
        &req("a", "mtls", A::Decrypt, Some("globex"), Some("email"))
    ));
    assert!(!allowed(
        &a,
        &req("a", "mtls", A::Decrypt, Some("acme"), None)
    ));
    assert!(allowed(&a, &req("a", "mtls", A::PauseJob, None, None)));
    assert!(allowed(
        &a,
        &req("a", "mtls", A::PauseJob, Some("acme"), Some("x"))
    ));
    assert!(!allowed(&a, &req("a", "mtls", A::WhoAmI, None, None)));
    // A field without a tenant is asked about the service.
    assert!(!allowed(
        &a,
        &req("a", "mtls", A::Decrypt, None, Some("email"))
    ));
}

#[test]
fn load_refuses_a_directory_without_good_policies() {
    let dir = tempfile::tempdir().unwrap();
    let err = Authorizer::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no *.cedar"), "{err}");
    write(dir.path(), "empty.cedar", "// nothing\n");
    let err = Authorizer::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("hold no policy"), "{err}");
    write(
        dir.path(),
        "good.cedar",
        "permit (principal, action == Action::\"Keys::WhoAmI\", resource);",
    );
    write(
        dir.path(),
        "bad.cedar",
        "permit (principal, action, resource) when { true ;",
    );
    let err = Authorizer::load(dir.path()).unwrap_err().to_string();
    println!("{err}");
    assert!(err.contains("bad.cedar") && err.contains("syntax"), "{err}");
    assert!(Authorizer::load(&dir.path().join("missing")).is_err());
}

#[test]
fn syntax_errors_name_the_line_of_the_policy() {
    let line = |t: &str| first_bad_statement(t);
    let good =
        "// c;\n@id(\"a;\") permit (principal == Identity::\"x;\\\"y\", action, resource);\n";
    assert!(PolicySet::from_str(good).is_ok());
    assert_eq!(
        line(&format!(
            "{good}\n// next\n  forbid (principal, action resource);\n"
        )),
        Some(5)
    );
    assert_eq!(
        line(&format!(
            "{good}{good}\npermit (principal, action, resource)"
        )),
        Some(6)
    );
    assert_eq!(
        line("permit (principal, action, resource) when { 1 + };"),
        Some(1)
    );
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.cedar",
        &format!("{good}\n\npermit (principal, action, resource) when {{ true ;"),
    );
    let err = Authorizer::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("p.cedar") && err.contains("policy from line 5"),
        "{err}"
    );
}

#[test]
fn policies_are_validated_against_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "permit (principal, action == Action::\"Crypto::Encrpyt\", resource);",
            "Crypto::Encrpyt",
        ),
        (
            "permit (principal == User::\"x\", action, resource);",
            "User",
        ),
        (
            "permit (principal, action, resource is Field) when { resource.owner == \"x\" };",
            "owner",
        ),
        (
            "permit (principal, action, resource) when { context.transport == 1 };",
            "",
        ),
        (
            "@id(\"x\") permit (principal, action, resource);\n@id(\"x\") permit (principal, action, resource);",
            "@id(\"x\")",
        ),
        (
            "permit (principal == ?principal, action, resource);",
            "templates",
        ),
    ];
    for (text, needle) in cases {
        write(dir.path(), "p.cedar", text);
        let err = Authorizer::load(dir.path()).unwrap_err().to_string();
        println!("{err}");
        assert!(err.contains("p.cedar"), "{err}");
        assert!(err.contains(needle), "{text}: {err}");
    }
}

#[test]
fn a_broken_file_keeps_the_last_good_set_until_it_is_fixed() {
    let dir = copy_of_shipped();
    let a = Authorizer::load(dir.path()).unwrap();
    let s = a.status();
    assert_eq!(s.generation, 1);
    assert_eq!(s.last_error, None);
    assert_eq!(
        s.files,
        [
            "analytics.cedar",
            "app.cedar",
            "auditor.cedar",
            "erasure.cedar",
            "operators.cedar",
            LIMITS_FILE
        ]
    );
    assert!(!a.reload(), "nothing changed");
    assert!(allowed(&a, &natural(WEB, TRANSPORT_LOCAL, A::WhoAmI)));

    let good_app = std::fs::read_to_string(dir.path().join("app.cedar")).unwrap();
    write(
        dir.path(),
        "app.cedar",
        &good_app.replace("permit (", "permit (("),
    );
    assert!(!a.reload());
    let s = a.status();
    assert_eq!(s.generation, 1, "the last good set stays");
    let err = s.last_error.expect("the error is recorded");
    assert!(err.contains("app.cedar") && err.contains("syntax"), "{err}");
    assert!(allowed(&a, &natural(WEB, TRANSPORT_LOCAL, A::Decrypt)));
    assert!(allowed(&a, &natural(WEB, TRANSPORT_LOCAL, A::WhoAmI)));
    assert!(!a.reload(), "the same broken content is not retried");
    assert!(a.status().last_error.is_some());

    // Fixed (and changed: no WhoAmI any more).
    let whoami_at = good_app.find("// Any transport").unwrap();
    write(dir.path(), "app.cedar", &good_app[..whoami_at]);
    assert!(a.reload());
    let s = a.status();
    assert_eq!(s.generation, 2);
    assert_eq!(s.last_error, None);
    assert!(
        !allowed(&a, &natural(WEB, TRANSPORT_LOCAL, A::WhoAmI)),
        "cache was not reused"
    );
    assert!(allowed(&a, &natural(WEB, TRANSPORT_LOCAL, A::Decrypt)));

    // Broken limits are refused the same way, naming the file.
    let limits = std::fs::read_to_string(dir.path().join(LIMITS_FILE)).unwrap();
    write(
        dir.path(),
        LIMITS_FILE,
        &limits.replace("burst = 4000", "burst = 0"),
    );
    assert!(!a.reload());
    let err = a.status().last_error.unwrap();
    assert!(err.contains(LIMITS_FILE) && err.contains("burst"), "{err}");
    // Reverting to what is installed clears the error without a new generation.
    write(dir.path(), LIMITS_FILE, &limits);
    assert!(!a.reload());
    assert_eq!(a.status().last_error, None);
    assert_eq!(a.status().generation, 2);

    // Removing a file is a change; removing all is refused.
    std::fs::remove_file(dir.path().join("auditor.cedar")).unwrap();
    assert!(a.reload());
    assert!(!allowed(
        &a,
        &natural(AUDITOR, TRANSPORT_MTLS, A::ExportAudit)
    ));
    for f in [
        "analytics.cedar",
        "app.cedar",
        "erasure.cedar",
        "operators.cedar",
    ] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    assert!(!a.reload());
    assert!(a.status().last_error.unwrap().contains("no *.cedar"));
    assert!(allowed(
        &a,
        &natural(KEYOPS, TRANSPORT_MTLS, A::RotateTenantKey)
    ));
    // Hidden files (a ConfigMap's `..data` entries) and other extensions are ignored.
    write(
        dir.path(),
        ".hidden.cedar",
        "permit (principal, action, resource);",
    );
    write(
        dir.path(),
        "notes.cedar.bak",
        "permit (principal, action, resource);",
    );
    assert!(!a.reload());
}

#[test]
fn shipped_limits_are_loaded() {
    let a = Authorizer::load(&shipped()).unwrap();
    assert_eq!(
        a.decrypt_limit(WEB),
        Some(RateLimit {
            per_second: 2000,
            burst: 4000
        })
    );
    assert_eq!(a.decrypt_limit(ANALYTICS), None);
}

#[test]
fn the_decrypt_guard_refuses_beyond_the_burst_and_recovers() {
    let dir = copy_of_shipped();
    write(
        dir.path(),
        LIMITS_FILE,
        &format!(
            "[[decrypt]]\nidentity = \"{WEB}\"\nper_second = 1000\nburst = 5\n\n\
             [[decrypt]]\nidentity = \"slow\"\nper_second = 1\nburst = 2\n"
        ),
    );
    let a = Arc::new(Authorizer::load(dir.path()).unwrap());
    let g = DecryptGuard::new(Arc::clone(&a));
    g.check(WEB, 3).unwrap();
    g.check(WEB, 0).unwrap();
    g.check(WEB, 2).unwrap();
    let e = g.check(WEB, 1).unwrap_err();
    assert_eq!(e.requested, 1);
    assert_eq!(
        e.limit,
        RateLimit {
            per_second: 1000,
            burst: 5
        }
    );
    let wait = e.retry_after.unwrap();
    assert!(wait <= Duration::from_millis(2), "{wait:?}");
    let e = g.check(WEB, 6).unwrap_err();
    assert_eq!(e.retry_after, None, "more than the burst never fits");
    g.check(ANALYTICS, 1_000_000).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    g.check(WEB, 5).unwrap();
    assert!(g.check(WEB, 1).is_err());

    // A reload that changes only policies keeps the (empty) bucket.
    g.check("slow", 2).unwrap();
    assert!(g.check("slow", 1).is_err());
    let app = std::fs::read_to_string(dir.path().join("app.cedar")).unwrap();
    write(dir.path(), "app.cedar", &format!("{app}\n// edited\n"));
    assert!(a.reload());
    assert!(g.check("slow", 1).is_err(), "bucket state survived");

    // New limits rebuild the limiters; a default applies to everyone else.
    write(
        dir.path(),
        LIMITS_FILE,
        &format!(
            "[default]\nper_second = 1\nburst = 2\n\n[[decrypt]]\nidentity = \"{WEB}\"\nper_second = 1000\nburst = 50\n"
        ),
    );
    assert!(a.reload());
    g.check(WEB, 50).unwrap();
    g.check(ANALYTICS, 2).unwrap();
    assert!(g.check(ANALYTICS, 1).is_err());
    g.check(KEYOPS, 1).unwrap();
    assert!(g.check(KEYOPS, 3).is_err());
}

#[tokio::test]
async fn watch_picks_up_changes_and_stops_with_the_authorizer() {
    let dir = copy_of_shipped();
    let a = Arc::new(Authorizer::load(dir.path()).unwrap());
    let task = a.watch(Duration::from_millis(20));
    write(
        dir.path(),
        "extra.cedar",
        "permit (principal == Identity::\"x\", action, resource);",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.status().generation < 2 {
        assert!(Instant::now() < deadline, "not reloaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(allowed(&a, &req("x", "mtls", A::ListTenants, None, None)));
    drop(a);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the watch task ends once the authorizer is dropped")
        .unwrap();
}

#[test]
fn decisions_are_cached_per_policy_set() {
    let a = Authorizer::load(&shipped()).unwrap();
    assert_eq!(a.status().cached_decisions, 0);
    let r = natural(WEB, TRANSPORT_LOCAL, A::Encrypt);
    let first = a.authorize(&r);
    let second = a.authorize(&r);
    assert_eq!(first, second);
    assert!(
        Arc::ptr_eq(&first.reason, &second.reason),
        "served from the cache"
    );
    assert_eq!(a.status().cached_decisions, 1);
}

/// Prints the cost of a cached and of an uncached decision. Meaningful in release:
/// `cargo test --release --lib policy::authz::tests::timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing printout"]
fn timing() {
    let a = Authorizer::load(&shipped()).unwrap();
    let r = natural(WEB, TRANSPORT_LOCAL, A::Encrypt);
    assert!(a.authorize(&r).allowed);
    let n = 1_000_000u32;
    let t = Instant::now();
    let mut ok = 0u32;
    for _ in 0..n {
        ok += u32::from(a.authorize(std::hint::black_box(&r)).allowed);
    }
    let cached = t.elapsed() / n;
    assert_eq!(ok, n);

    let fields: Vec<String> = (0..50_000).map(|i| format!("field{i}")).collect();
    let t = Instant::now();
    for f in &fields {
        let r = req(WEB, TRANSPORT_LOCAL, A::Decrypt, Some("acme"), Some(f));
        assert!(a.authorize(&r).allowed);
    }
    let uncached = t.elapsed() / 50_000;
    let t = Instant::now();
    for f in &fields[..10_000] {
        let r = req(KEYOPS, TRANSPORT_MTLS, A::Decrypt, Some("acme"), Some(f));
        assert!(!a.authorize(&r).allowed);
    }
    let uncached_deny = t.elapsed() / 10_000;
    println!(
        "authorize: cached {cached:?}, uncached allow {uncached:?}, uncached deny {uncached_deny:?} \
         ({} policies)",
        a.status().policies
    );
}
