//! What an OpenBao refusal means: the one table of the error texts the provider
//! recognises, and the mapping of a refusal to a [`KmsError`].
//!
//! OpenBao has no error codes. Transit answers most refusals with HTTP 400 and an
//! English sentence in `{"errors": [...]}` (a wrong context, an altered ciphertext, an
//! unknown key and a soft-deleted key all share 400), so the texts are matched here,
//! narrowly (whole sentences or their fixed prefixes, as OpenBao's source writes them:
//! `builtin/logical/transit/path_*.go`, `sdk/helper/keysutil/policy.go`, the KV v2
//! plugin), and checked against a real server by `tests/kms_openbao.rs`. A 400 that
//! matches nothing is [`KmsError::Rejected`] with the status only: the server's text
//! goes to the log, never into the error.
//!
//! Does not: decide retries (5xx and 429 never reach this table: the client retries
//! them) or re-login (a 403 is handled by the caller first).

use crate::kms::KmsError;

/// What a refusal means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Wrong key, context or associated data, or altered / malformed ciphertext.
    InvalidCiphertext,
    /// The key does not exist (400 from Transit, 404 from a key read).
    KeyNotFound,
    /// The key is soft-deleted: pending deletion.
    SoftDeleted,
    /// The key refuses this ciphertext's version (`min_decryption_version` raised).
    KeyInvalidState,
    /// A KV v2 check-and-set write lost a race.
    CasMismatch,
    /// 403: this token may not do it (or is not valid).
    AccessDenied,
    /// 404 "no handler for route": nothing is mounted there.
    NoRoute,
    /// Anything else, by HTTP status.
    Other(u16),
}

#[derive(Debug, Clone, Copy)]
enum Match {
    /// The whole sentence.
    Exact(&'static str),
    /// A fixed prefix (the rest names the detail).
    Prefix(&'static str),
    /// A fixed suffix (the start names the key).
    Suffix(&'static str),
}

/// The 400 texts the provider recognises. Each line names where OpenBao writes it.
const TEXTS: &[(Match, Refusal)] = &[
    // keysutil Policy.SymmetricDecryptRaw: Go's AEAD Open failure. A wrong context (the
    // derived key differs), wrong associated data, a wrong key or a flipped byte.
    (
        Match::Exact("cipher: message authentication failed"),
        Refusal::InvalidCiphertext,
    ),
    // keysutil Policy.DecryptWithFactory / SymmetricDecryptRaw: "invalid ciphertext: no
    // prefix", "...: wrong number of fields", "...: version number could not be
    // decoded", "...: version is too new", "...: could not decode base64", "invalid
    // ciphertext length".
    (
        Match::Prefix("invalid ciphertext"),
        Refusal::InvalidCiphertext,
    ),
    // transit path_encrypt.go / path_decrypt.go: no such key.
    (
        Match::Exact("encryption key not found"),
        Refusal::KeyNotFound,
    ),
    // keysutil ErrSoftDeleted: every use of a soft-deleted key.
    (
        Match::Exact("refusing to use soft-deleted key"),
        Refusal::SoftDeleted,
    ),
    // keysutil ErrTooOld: the ciphertext's key version is below min_decryption_version.
    (
        Match::Exact("ciphertext or signature version is disallowed by policy (too old)"),
        Refusal::KeyInvalidState,
    ),
    // transit path_keys.go delete: "error deleting policy <name>: could not delete key;
    // not found".
    (
        Match::Suffix("could not delete key; not found"),
        Refusal::KeyNotFound,
    ),
    // transit path_config_keys.go: "no existing key named <name> could be found".
    (
        Match::Prefix("no existing key named "),
        Refusal::KeyNotFound,
    ),
    // KV v2 path_data.go: a `cas` write whose version is not the current one.
    (
        Match::Exact("check-and-set parameter did not match the current version"),
        Refusal::CasMismatch,
    ),
];

/// The sentences of an `errors` array, without the "1 error occurred:" wrapping of
/// OpenBao's multierror (`"1 error occurred:\n\t* permission denied\n\n"`).
pub(super) fn sentences(errors: &[String]) -> Vec<&str> {
    errors
        .iter()
        .flat_map(|e| e.lines())
        .map(|l| l.trim().trim_start_matches("* ").trim())
        .filter(|l| !l.is_empty() && !is_multierror_header(l))
        .collect()
}

/// `1 error occurred:`, `2 errors occurred:`.
fn is_multierror_header(line: &str) -> bool {
    line.ends_with("occurred:") && line.contains(" error")
}

/// What a refusal with HTTP `status` and `errors` means.
pub(super) fn classify(status: u16, errors: &[String]) -> Refusal {
    let texts = sentences(errors);
    match status {
        403 => Refusal::AccessDenied,
        404 if texts.iter().any(|t| t.starts_with("no handler for route")) => Refusal::NoRoute,
        404 => Refusal::KeyNotFound,
        400 => texts
            .iter()
            .find_map(|t| {
                TEXTS.iter().find_map(|(m, r)| {
                    let hit = match m {
                        Match::Exact(s) => t == s,
                        Match::Prefix(s) => t.starts_with(s),
                        Match::Suffix(s) => t.ends_with(s),
                    };
                    hit.then_some(*r)
                })
            })
            .unwrap_or(Refusal::Other(400)),
        other => Refusal::Other(other),
    }
}

impl Refusal {
    /// The [`KmsError`] of this refusal of a call about `key_id` at `path`.
    pub(super) fn into_error(self, key_id: &str, path: &str) -> KmsError {
        let key_id = key_id.to_owned();
        match self {
            Refusal::InvalidCiphertext => KmsError::InvalidCiphertext,
            Refusal::KeyNotFound => KmsError::KeyNotFound { key_id },
            Refusal::SoftDeleted | Refusal::KeyInvalidState => KmsError::KeyInvalidState { key_id },
            Refusal::AccessDenied => KmsError::AccessDenied { key_id },
            Refusal::NoRoute => KmsError::Misconfigured(format!(
                "OpenBao has no route for {path}: is the engine mounted there (and the namespace right)?"
            )),
            Refusal::CasMismatch => KmsError::Rejected {
                code: "openbao: check-and-set conflict".into(),
            },
            Refusal::Other(status) => KmsError::Rejected {
                code: format!("openbao: {status}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(status: u16, text: &str) -> Refusal {
        classify(status, &[text.to_owned()])
    }

    #[test]
    fn the_texts_of_a_real_server_map_to_their_meaning() {
        // As OpenBao 2.7.2 answered them (see tests/kms_openbao.rs for the live check).
        assert_eq!(
            c(400, "cipher: message authentication failed"),
            Refusal::InvalidCiphertext
        );
        for t in [
            "invalid ciphertext: no prefix",
            "invalid ciphertext: could not decode base64",
            "invalid ciphertext length",
            "invalid ciphertext: version is too new",
        ] {
            assert_eq!(c(400, t), Refusal::InvalidCiphertext, "{t}");
        }
        assert_eq!(c(400, "encryption key not found"), Refusal::KeyNotFound);
        assert_eq!(
            c(400, "refusing to use soft-deleted key"),
            Refusal::SoftDeleted
        );
        assert_eq!(
            c(
                400,
                "error deleting policy k2: could not delete key; not found"
            ),
            Refusal::KeyNotFound
        );
        assert_eq!(
            c(400, "no existing key named k2 could be found"),
            Refusal::KeyNotFound
        );
        assert_eq!(
            c(
                400,
                "check-and-set parameter did not match the current version"
            ),
            Refusal::CasMismatch
        );
        assert_eq!(
            c(403, "1 error occurred:\n\t* permission denied\n\n"),
            Refusal::AccessDenied
        );
        assert_eq!(c(404, ""), Refusal::KeyNotFound);
        assert_eq!(
            classify(404, &[]),
            Refusal::KeyNotFound,
            "a key read of a missing key: 404 with no text"
        );
        assert_eq!(
            c(
                404,
                "no handler for route \"nomount/keys/k1\". route entry not found."
            ),
            Refusal::NoRoute
        );
    }

    #[test]
    fn matching_is_narrow() {
        // A sentence that merely mentions a known phrase is not that refusal.
        assert_eq!(
            c(400, "the plaintext said: encryption key not found"),
            Refusal::Other(400)
        );
        assert_eq!(
            c(400, "missing 'context' for key derivation"),
            Refusal::Other(400)
        );
        assert_eq!(c(409, "encryption key not found"), Refusal::Other(409));
        // The server's text never reaches the error.
        let e = c(400, "something secret-looking: s.abcdef").into_error("k", "transit/x");
        assert!(!format!("{e} {e:?}").contains("s.abcdef"));
    }
}
