//! Erasure receipts and backup-seal statements as a privacy officer verifies them
//! offline (`fieldkey erasure verify-receipt`, `fieldkey epoch verify-seal`): the
//! public-key reader, `erasure::receipt::verify` and `epochs::seal::verify`.
//!
//! Properties:
//! - nothing panics;
//! - a public key that reads is not weak and reads back the same from its hex and PEM;
//! - `verify` of any input says valid only for a receipt the fuzzing key signed (its
//!   signing input is one of the genuine ones): whitespace, member order and a byte
//!   order mark may change, nothing signed can; the same for seal statements;
//! - any receipt the parser accepts, once signed by the real `sign`, verifies (or is
//!   refused as inconsistent, never as malformed or badly signed) compact and pretty,
//!   and comes back equal: signing and verifying agree on every value.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use ed25519_dalek::{SigningKey, VerifyingKey};
use fieldkey::epochs::seal;
use fieldkey::erasure::receipt::{
    self, FORMAT, Receipt, ReceiptError, SignedReceipt, parse_public_key, public_key_pem,
    signing_input,
};
use fieldkey_fuzz::receipts::{key, receipts, seals, seeds};
use libfuzzer_sys::fuzz_target;

static SIGNER: LazyLock<SigningKey> = LazyLock::new(key);
static VK: LazyLock<VerifyingKey> = LazyLock::new(|| key().verifying_key());
static GENUINE: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    receipts()
        .iter()
        .map(|s| signing_input(&s.receipt).expect("signing input"))
        .collect()
});
static GENUINE_SEALS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    seals()
        .iter()
        .map(|s| seal::signing_input(&s.seal).expect("signing input"))
        .collect()
});

fn public_key(text: &str) {
    if let Ok(k) = parse_public_key(text) {
        assert!(!k.is_weak());
        assert_eq!(
            parse_public_key(&hex::encode(k.as_bytes())).expect("hex"),
            k
        );
        assert_eq!(
            parse_public_key(&public_key_pem(&k).expect("pem")).expect("pem"),
            k
        );
    }
}

fn sign_then_verify(r: Receipt) {
    let signed = receipt::sign(r, &SIGNER).expect("sign");
    for bytes in [
        serde_json::to_vec(&signed).expect("json"),
        serde_json::to_vec_pretty(&signed).expect("json"),
    ] {
        match receipt::verify(&bytes, &VK) {
            Ok(back) => assert_eq!(back, signed.receipt),
            Err(ReceiptError::Inconsistent(_)) => {}
            Err(e) => panic!("a receipt signed by sign() does not verify: {e}"),
        }
    }
}

fuzz_target!(
    init: {
        fieldkey_fuzz::write_seeds(&seeds());
    },
    |data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            public_key(text);
            if let Ok(s) = seal::verify(text, &VK) {
                let input = seal::signing_input(&s).expect("signing input");
                assert!(GENUINE_SEALS.contains(&input), "a seal the key never signed verified");
            }
        }
        if let Ok(r) = receipt::verify(data, &VK) {
            let input = signing_input(&r).expect("signing input");
            assert!(GENUINE.contains(&input), "a receipt the key never signed verified");
        }
        let json = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
        let parsed = serde_json::from_slice::<SignedReceipt>(json)
            .map(|s| s.receipt)
            .or_else(|_| serde_json::from_slice::<Receipt>(json));
        if let Ok(r) = parsed
            && r.format == FORMAT
        {
            sign_then_verify(r);
        }
    }
);
