//! The envelope decoder, as the keyring runs it on every Decrypt and Rewrap:
//! `crypto::decode_any` (text `fk1:` or binary) then `Envelope::parse`, then `open`.
//!
//! Properties:
//! - nothing panics, whatever the bytes;
//! - the text form is canonical: a decoded `fk1:` input is exactly `to_text` of its bytes
//!   (no second spelling of one ciphertext), and binary input is taken as is;
//! - a parsed envelope's fields are the header's bytes (magic, version, suite, scope,
//!   key version >= 1) and its plaintext length is the length minus the overhead;
//! - `open` under any test-vector key succeeds only on that vector's exact envelope,
//!   giving its plaintext (nothing else authenticates);
//! - the input as a plaintext: seal, text form, decode, parse and open give it back
//!   (binary and text), and flipping any one bit of the envelope makes it fail.
#![no_main]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;

use fieldkey::crypto::{
    Aad, Envelope, FieldCipher, HEADER_LEN, OVERHEAD, SecretKey, TEXT_PREFIX, decode_any, open,
    seal, to_text,
};
use fieldkey_fuzz::envelope::{Vector, seeds, valid};
use libfuzzer_sys::fuzz_target;

static VECTORS: LazyLock<Vec<Vector>> = LazyLock::new(valid);
static TENANT: LazyLock<FieldCipher> =
    LazyLock::new(|| FieldCipher::for_tenant(&SecretKey::from_bytes(&mut [3; 32]), "t1", "f"));
static SUBJECT: LazyLock<FieldCipher> = LazyLock::new(|| {
    FieldCipher::for_subject(
        &SecretKey::from_bytes(&mut [3; 32]),
        &SecretKey::from_bytes(&mut [4; 32]),
        "t1",
        "s1",
        "f",
    )
});

fn parse_and_open(data: &[u8]) {
    let decoded = match decode_any(data) {
        Ok(d) => d,
        Err(_) => {
            assert!(
                data.starts_with(TEXT_PREFIX.as_bytes()),
                "binary input refused by decode_any"
            );
            return;
        }
    };
    if data.starts_with(TEXT_PREFIX.as_bytes()) {
        assert_eq!(
            to_text(&decoded).as_bytes(),
            data,
            "a non-canonical text form was accepted"
        );
    } else {
        assert_eq!(&*decoded, data, "binary input changed by decode_any");
    }
    let Ok(env) = Envelope::parse(&decoded) else {
        return;
    };
    assert!(decoded.len() >= OVERHEAD);
    assert_eq!(env.plaintext_len(), decoded.len() - OVERHEAD);
    assert_eq!(decoded.get(..4), Some(&b"fk\x01\x01"[..]));
    let kv = u32::from_be_bytes(decoded.get(5..9).unwrap().try_into().unwrap());
    assert_eq!(env.key_version(), kv);
    assert!(kv >= 1);
    let scope_byte = decoded.get(4).copied().unwrap();
    assert_eq!(
        scope_byte,
        match env.scope() {
            fieldkey::crypto::Scope::Tenant => 0,
            fieldkey::crypto::Scope::Subject => 1,
        }
    );
    for v in VECTORS.iter() {
        if let Ok(pt) = open(&v.cipher, &env, &v.aad()) {
            assert_eq!(
                &*decoded,
                v.envelope.as_slice(),
                "a changed envelope opened under vector {}",
                v.name
            );
            assert_eq!(&*pt, v.plaintext.as_slice());
        }
    }
}

fn round_trip(data: &[u8]) {
    let subject = data.first().is_some_and(|b| b & 1 == 1);
    let version = data
        .get(..4)
        .map_or(1, |b| u32::from_be_bytes(b.try_into().unwrap()))
        .max(1);
    let context = data.get(..data.len().min(16)).unwrap();
    let aad = Aad {
        tenant: "t1",
        subject: subject.then_some("s1"),
        field: "f",
        context,
    };
    let cipher = if subject { &*SUBJECT } else { &*TENANT };
    let sealed = seal(cipher, version, &aad, data).expect("seal");
    assert_eq!(sealed.len(), data.len() + OVERHEAD);
    let text = to_text(&sealed);
    assert_eq!(
        decode_any(text.as_bytes()).unwrap().as_ref(),
        sealed.as_slice()
    );
    let env = Envelope::parse(&sealed).expect("parse of a sealed envelope");
    assert_eq!(env.key_version(), version);
    assert_eq!(&*open(cipher, &env, &aad).expect("open"), data);
    // One bit flip, at a position the input picks: always refused.
    let pos = data.iter().fold(data.len(), |a, &b| {
        a.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    let bit = pos % (sealed.len() * 8);
    let mut bad = sealed.clone();
    *bad.get_mut(bit / 8).unwrap() ^= 1 << (bit % 8);
    let r = Envelope::parse(&bad).and_then(|e| open(cipher, &e, &aad));
    assert!(
        r.is_err(),
        "bit {bit} of {} flipped (header is {HEADER_LEN}) still opens",
        sealed.len()
    );
}

fuzz_target!(
    init: {
        fieldkey_fuzz::write_seeds(&seeds());
    },
    |data: &[u8]| {
        parse_and_open(data);
        round_trip(data);
    }
);
