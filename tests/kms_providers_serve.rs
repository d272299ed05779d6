//! `fieldkey serve` configured for each KMS provider that has a section of its own
//! (`[kms.openbao]`, `[kms.pkcs11]`), against the real server: the configuration is
//! read, the provider built behind its breakers, and a tenant created, used, rolled
//! into a key epoch (whose key the provider makes) and rotated through the CLI.
#![expect(clippy::unwrap_used, reason = "test code fails by panicking")]

mod common;

use std::process::Output;

use common::sidecar::Sidecar;

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {} {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .trim_end()
        .to_owned()
}

/// A tenant's life through the CLI of a sidecar serving with `kms` as its `[kms]`.
fn tenant_life(dir: &std::path::Path, kms: &str, provider: &str, epoch_key: &str) {
    let config = format!(
        "data_dir = {data:?}\n[epochs]\nstore_tag = \"serve-test\"\nlocal_keys_dir = {keys:?}\n{kms}",
        data = dir.join("data"),
        keys = dir.join("kms-keys"),
    );
    let s = Sidecar::builder()
        .authz_off()
        .any_port()
        .config_text(dir, &config)
        .start();
    assert!(
        s.log().contains(&format!("kms=\"{provider}\""))
            || s.log().contains(&format!("\"kms\":\"{provider}\""))
            || s.log().contains(&format!("kms={provider}")),
        "the sidecar did not say it uses {provider}: {}",
        s.log()
    );
    stdout(&s.cli(&["tenant", "create", "acme"]));
    let ct = stdout(&s.cli(&["encrypt", "-t", "acme", "-s", "u1", "-f", "email", "a@x"]));
    stdout(&s.cli(&["epoch", "roll"]));
    let status = stdout(&s.cli(&["epoch", "status"]));
    assert!(
        status.contains(epoch_key),
        "the provider did not make the epoch key ({epoch_key}): {status}"
    );
    stdout(&s.cli(&["tenant", "rotate", "acme"]));
    let pt = stdout(&s.cli(&["decrypt", "-t", "acme", "-s", "u1", "-f", "email", &ct]));
    assert_eq!(pt, "a@x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_openbao() {
    let bao = common::openbao::BaoServer::start().await;
    let st = bao.settings();
    let token_file = match &st.auth {
        fieldkey::kms::openbao::OpenBaoAuth::Token { token_file } => token_file.clone().unwrap(),
        other => panic!("{other:?}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let kms = format!(
        "[kms]\nprovider = \"openbao\"\n[kms.openbao]\naddress = {:?}\nkey = {:?}\n[kms.openbao.auth]\nmethod = \"token\"\ntoken_file = {token_file:?}\n",
        st.address, st.key
    );
    let d = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        tenant_life(&d, &kms, "openbao", "fieldkey-serve-test-epoch-1-")
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_pkcs11() {
    let hsm = tokio::task::spawn_blocking(common::softhsm::SoftHsm::init)
        .await
        .unwrap();
    let st = hsm.settings();
    let dir = tempfile::tempdir().unwrap();
    let kms = format!(
        "[kms]\nprovider = \"pkcs11\"\n[kms.pkcs11]\nmodule = {:?}\ntoken_label = {:?}\nkey_label = {:?}\npin_file = {:?}\n",
        st.module,
        st.token_label,
        st.key_label,
        st.pin_file.clone().unwrap()
    );
    let d = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        tenant_life(&d, &kms, "pkcs11", "fieldkey/serve-test/epoch-1-")
    })
    .await
    .unwrap();
    drop(hsm);
}
