//! The blind-index profiles the blind index tests configure: HMAC-SHA256 for `email`
//! (NFC, casefold, trim) and `login`, Argon2id at a test cost for `dob`.

use std::collections::HashMap;

use fieldkey::crypto::{Argon2Cost, IndexAlgorithm, IndexProfile, Normalization, UnicodeForm};
use fieldkey::keyring::IndexProfiles;

pub(crate) const SMALL_ARGON: Argon2Cost = Argon2Cost {
    memory_kib: 256,
    iterations: 1,
    parallelism: 1,
};

pub(crate) fn profiles() -> IndexProfiles {
    let mut m = HashMap::new();
    m.insert(
        "email".to_owned(),
        IndexProfile::hmac(
            64,
            Normalization {
                form: Some(UnicodeForm::Nfc),
                casefold: true,
                trim: true,
            },
        ),
    );
    m.insert(
        "login".to_owned(),
        IndexProfile::hmac(128, Normalization::default()),
    );
    m.insert(
        "dob".to_owned(),
        IndexProfile {
            algorithm: IndexAlgorithm::Argon2id(SMALL_ARGON),
            bits: 32,
            normalization: Normalization {
                trim: true,
                ..Normalization::default()
            },
        },
    );
    IndexProfiles::new(m, 2)
}
