//! Blind-index profiles (`[blind_index.fields.NAME]`, docs/BLIND_INDEX.md).

use serde::Deserialize;

use super::ConfigError;

/// Blind indexes (docs/BLIND_INDEX.md): one profile per indexed field. A field
/// without one cannot be indexed (`INDEX_NOT_CONFIGURED`). Every sidecar and job
/// runner that indexes a field must use the same profile: it is part of the index key.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BlindIndexSettings {
    /// Argon2id evaluations running at once (each holds its memory cost); default: the
    /// number of CPUs.
    pub argon2_concurrency: Option<usize>,
    /// Profiles by field name.
    pub fields: std::collections::BTreeMap<String, FieldIndexSettings>,
}

/// Which function digests a field's values.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum IndexAlgorithmName {
    /// HMAC-SHA256 (fast).
    #[default]
    HmacSha256,
    /// Argon2id keyed with the index key (slow, for low-entropy values).
    Argon2id,
}

/// One normalization step (applied in a fixed order whatever the list's order:
/// Unicode form, case folding, the form again, trimming).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NormalizeStep {
    /// Unicode NFC.
    Nfc,
    /// Unicode NFKC.
    Nfkc,
    /// Unicode full case folding.
    Casefold,
    /// Strip leading and trailing white space.
    Trim,
}

/// Argon2id cost of a slow index.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2Settings {
    /// Memory, KiB (default 19456 = 19 MiB).
    #[serde(default = "default_argon2_memory")]
    pub memory_kib: u32,
    /// Passes (default 2).
    #[serde(default = "default_argon2_iterations")]
    pub iterations: u32,
    /// Lanes (default 1).
    #[serde(default = "default_argon2_parallelism")]
    pub parallelism: u32,
}

fn default_argon2_memory() -> u32 {
    crate::crypto::Argon2Cost::DEFAULT.memory_kib
}
fn default_argon2_iterations() -> u32 {
    crate::crypto::Argon2Cost::DEFAULT.iterations
}
fn default_argon2_parallelism() -> u32 {
    crate::crypto::Argon2Cost::DEFAULT.parallelism
}
fn default_index_bits() -> u16 {
    64
}

/// The blind-index profile of one field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldIndexSettings {
    /// `"hmac-sha256"` (default) or `"argon2id"`.
    #[serde(default)]
    pub algorithm: IndexAlgorithmName,
    /// Digest bits kept (multiple of 8, 16..=256; default 64).
    #[serde(default = "default_index_bits")]
    pub bits: u16,
    /// Normalization steps (`nfc` or `nfkc`, `casefold`, `trim`); default none.
    #[serde(default)]
    pub normalize: Vec<NormalizeStep>,
    /// Argon2id cost (only with `algorithm = "argon2id"`; default OWASP's 19 MiB, 2, 1).
    #[serde(default)]
    pub argon2: Option<Argon2Settings>,
}

impl FieldIndexSettings {
    /// The profile these settings describe.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field and the problem.
    pub fn profile(&self, field: &str) -> Result<crate::crypto::IndexProfile, ConfigError> {
        use crate::crypto::{Argon2Cost, IndexAlgorithm, IndexProfile, Normalization, UnicodeForm};
        let bad = |m: String| ConfigError::Invalid(format!("blind_index.fields.{field}: {m}"));
        let mut n = Normalization::default();
        for step in &self.normalize {
            match step {
                NormalizeStep::Nfc | NormalizeStep::Nfkc => {
                    let form = if *step == NormalizeStep::Nfc {
                        UnicodeForm::Nfc
                    } else {
                        UnicodeForm::Nfkc
                    };
                    if n.form.is_some_and(|f| f != form) {
                        return Err(bad("normalize may name nfc or nfkc, not both".into()));
                    }
                    n.form = Some(form);
                }
                NormalizeStep::Casefold => n.casefold = true,
                NormalizeStep::Trim => n.trim = true,
            }
        }
        let algorithm = match (self.algorithm, self.argon2) {
            (IndexAlgorithmName::HmacSha256, None) => IndexAlgorithm::HmacSha256,
            (IndexAlgorithmName::HmacSha256, Some(_)) => {
                return Err(bad("argon2 settings need algorithm = \"argon2id\"".into()));
            }
            (IndexAlgorithmName::Argon2id, a) => {
                IndexAlgorithm::Argon2id(a.map_or(Argon2Cost::DEFAULT, |a| Argon2Cost {
                    memory_kib: a.memory_kib,
                    iterations: a.iterations,
                    parallelism: a.parallelism,
                }))
            }
        };
        let p = IndexProfile {
            algorithm,
            bits: self.bits,
            normalization: n,
        };
        crate::crypto::validate_id("field", field).map_err(|e| bad(e.to_string()))?;
        p.validate().map_err(|e| bad(e.to_string()))?;
        Ok(p)
    }
}
