//! Validation of tenant, subject and field identifiers and of the caller context.
//!
//! Identifiers end up in associated data, in the key store and in audit records, so they
//! are restricted to visible ASCII: no control characters (log injection), no Unicode
//! (normalisation ambiguity: two spellings of one id must not name two keys).

use super::CryptoError;

/// Longest tenant, subject or field identifier, in bytes.
pub const MAX_ID_LEN: usize = 255;
/// Longest caller context bound as associated data, in bytes.
pub const MAX_CONTEXT_LEN: usize = 1024;

/// Checks an identifier: 1..=[`MAX_ID_LEN`] bytes of visible ASCII (0x21..=0x7E).
///
/// # Errors
/// [`CryptoError::InvalidArgument`] naming `kind` and the rule broken (never echoing
/// the value, which may be personal data).
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), CryptoError> {
    if id.is_empty() {
        return Err(CryptoError::InvalidArgument(format!(
            "{kind} must not be empty"
        )));
    }
    if id.len() > MAX_ID_LEN {
        return Err(CryptoError::InvalidArgument(format!(
            "{kind} is {} bytes; the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if !id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(CryptoError::InvalidArgument(format!(
            "{kind} must be visible ASCII (no spaces, control characters or non-ASCII)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_visible_ascii_and_bounded() {
        assert!(validate_id("tenant_id", "acme-01").is_ok());
        assert!(validate_id("tenant_id", "").is_err());
        assert!(validate_id("tenant_id", "a b").is_err());
        assert!(validate_id("tenant_id", "a\nb").is_err());
        assert!(validate_id("tenant_id", "é").is_err());
        assert!(validate_id("tenant_id", &"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id("tenant_id", &"a".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn errors_do_not_echo_the_value() {
        let Err(e) = validate_id("subject_id", "secret person\n") else {
            panic!("must fail");
        };
        assert!(!e.to_string().contains("secret"));
    }
}
