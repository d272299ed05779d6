//! Stored blind-index values (`crypto::BlindIndex::parse`, as the re-encryption job
//! reads the index columns of an application table: binary or `fkb1:` text), and
//! computing an index of an arbitrary value under several HMAC profiles.
//!
//! Properties:
//! - nothing panics;
//! - a parsed value is `0xB1 || version (u32 BE) || digest` with a digest of at least
//!   2 bytes; parsing its binary or text form gives it back, and the input was exactly
//!   one of those (the text form is canonical: one spelling per value, so an equality
//!   search cannot miss a stored value written another way);
//! - `compute` of any value gives `5 + bits/8` bytes carrying the key's version that
//!   parse back to the same value, refuses only non-UTF-8 input under a text
//!   normalization, and indexing the normalized value gives the same index
//!   (normalization is idempotent, so a client that normalizes first still matches).
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use base64::Engine as _;
use fieldkey::crypto::{
    BlindIndex, INDEX_TEXT_PREFIX, IndexKey, IndexProfile, Normalization, SecretKey, UnicodeForm,
};
use libfuzzer_sys::fuzz_target;

fn profiles() -> Vec<(u32, IndexProfile)> {
    let n = |form, casefold, trim| Normalization {
        form,
        casefold,
        trim,
    };
    vec![
        (1, IndexProfile::hmac(64, Normalization::default())),
        (
            7,
            IndexProfile::hmac(256, n(Some(UnicodeForm::Nfc), true, true)),
        ),
        (
            u32::MAX,
            IndexProfile::hmac(16, n(Some(UnicodeForm::Nfkc), true, false)),
        ),
        (2, IndexProfile::hmac(128, n(None, true, true))),
    ]
}

static KEYS: LazyLock<Vec<IndexKey>> = LazyLock::new(|| {
    profiles()
        .into_iter()
        .map(|(v, p)| {
            IndexKey::derive(&SecretKey::from_bytes(&mut [5; 32]), "acme", "email", v, &p)
                .expect("index key")
        })
        .collect()
});

fn check_value(ix: &BlindIndex) {
    let b = ix.as_bytes();
    assert_eq!(b.first(), Some(&0xB1));
    assert!(b.len() >= 7, "value of {} bytes accepted", b.len());
    let v = u32::from_be_bytes(b.get(1..5).unwrap().try_into().unwrap());
    assert_eq!(ix.version(), v);
    assert_eq!(&BlindIndex::parse(b).expect("binary form parses"), ix);
    let text = ix.to_text();
    assert_eq!(
        &BlindIndex::parse(text.as_bytes()).expect("text form parses"),
        ix
    );
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, k) in KEYS.iter().enumerate() {
        for (j, value) in [
            "alice@example.com",
            "  \u{c9}LODIE@Example.COM ",
            "\u{fb01}\u{212b}",
        ]
        .iter()
        .enumerate()
        {
            let ix = k.compute(value.as_bytes()).expect("compute");
            out.push((format!("index-{i}-{j}.bin"), ix.as_bytes().to_vec()));
            out.push((format!("index-{i}-{j}.text"), ix.to_text().into_bytes()));
        }
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for (name, bytes) in [
        ("empty", Vec::new()),
        ("too-short", vec![0xB1, 0, 0, 0, 1, 0xAA]),
        ("shortest", vec![0xB1, 0, 0, 0, 1, 0xAA, 0xBB]),
        ("wrong-format", vec![0xB2, 0, 0, 0, 1, 0xAA, 0xBB]),
        ("text-prefix-only", INDEX_TEXT_PREFIX.as_bytes().to_vec()),
        (
            "text-padded",
            format!(
                "{INDEX_TEXT_PREFIX}{}=",
                b64.encode([0xB1, 0, 0, 0, 1, 0xAA, 0xBB])
            )
            .into_bytes(),
        ),
        (
            "text-trailing-bits",
            format!("{INDEX_TEXT_PREFIX}sQAAAAGqu9").into_bytes(),
        ),
        ("not-utf8", vec![0xff, 0xfe, b'a']),
        ("combining", "e\u{301}\u{345}\u{130}".as_bytes().to_vec()),
    ] {
        out.push((name.to_owned(), bytes));
    }
    out
}

fuzz_target!(
    init: {
        fieldkey_fuzz::write_seeds(&seeds());
    },
    |data: &[u8]| {
        if let Ok(ix) = BlindIndex::parse(data) {
            check_value(&ix);
            if data.starts_with(INDEX_TEXT_PREFIX.as_bytes()) {
                assert_eq!(ix.to_text().as_bytes(), data, "non-canonical text form accepted");
            } else {
                assert_eq!(ix.as_bytes(), data);
            }
        }
        for k in KEYS.iter() {
            let p = k.profile();
            match k.compute(data) {
                Ok(ix) => {
                    check_value(&ix);
                    assert_eq!(ix.version(), k.version());
                    assert_eq!(ix.as_bytes().len(), 5 + p.out_len());
                    let normalized = p.normalization.apply(data).expect("normalizes");
                    let again = k.compute(&normalized).expect("normalized value indexes");
                    assert_eq!(again, ix, "normalization is not idempotent");
                }
                Err(_) => {
                    assert!(p.normalization != Normalization::default());
                    assert!(std::str::from_utf8(data).is_err());
                }
            }
        }
    }
);
