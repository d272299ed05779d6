//! The key rotation policy (`policies/rotation.toml`): how old a tenant's active key
//! version may get before it must be rotated, and when to start warning.

use std::path::Path;

use serde::Deserialize;

use super::PolicyError;
use crate::model::{KeyState, TenantInfo};

const DAY_MS: i64 = 86_400_000;

/// Maximum key age and warning window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationPolicy {
    /// A tenant's active key version must be rotated once it is this many days old
    /// (the DPA's yearly rotation: 365).
    pub max_key_age_days: u32,
    /// Keys within this many days of `max_key_age_days` are reported as due soon.
    pub warn_days: u32,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            max_key_age_days: 365,
            warn_days: 30,
        }
    }
}

/// Where one tenant stands against the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStatus {
    /// Younger than the warning window.
    Ok,
    /// Inside the warning window.
    DueSoon,
    /// At or past the maximum age: rotate now.
    Overdue,
    /// No active version (suspended or destroyed): nothing to rotate.
    NoActiveKey,
}

impl RotationStatus {
    /// Stable text form.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationStatus::Ok => "ok",
            RotationStatus::DueSoon => "due-soon",
            RotationStatus::Overdue => "overdue",
            RotationStatus::NoActiveKey => "no-active-key",
        }
    }
}

/// A tenant's active key age, assessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAge {
    /// Tenant id.
    pub tenant_id: String,
    /// Active version, if any.
    pub active_version: Option<u32>,
    /// When the active version was created, Unix ms (0 without one).
    pub active_since: i64,
    /// Age of the active version in ms (0 without one).
    pub age_ms: i64,
    /// Verdict.
    pub status: RotationStatus,
}

impl RotationPolicy {
    /// Reads and validates a policy file.
    ///
    /// # Errors
    /// [`PolicyError::Read`] or [`PolicyError::Invalid`].
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| PolicyError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses and validates policy text.
    ///
    /// # Errors
    /// A message naming the problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let p: RotationPolicy = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        if !(1..=3650).contains(&p.max_key_age_days) {
            return Err("max_key_age_days must be 1..=3650".into());
        }
        if p.warn_days >= p.max_key_age_days {
            return Err("warn_days must be below max_key_age_days".into());
        }
        Ok(p)
    }

    /// Assesses a tenant at time `now_ms`.
    pub fn assess(&self, t: &TenantInfo, now_ms: i64) -> KeyAge {
        let active = t.versions.iter().find(|v| v.state == KeyState::Active);
        let Some(v) = active else {
            return KeyAge {
                tenant_id: t.tenant_id.clone(),
                active_version: None,
                active_since: 0,
                age_ms: 0,
                status: RotationStatus::NoActiveKey,
            };
        };
        let age_ms = now_ms.saturating_sub(v.created_at).max(0);
        let max_ms = i64::from(self.max_key_age_days) * DAY_MS;
        let warn_ms = i64::from(self.max_key_age_days - self.warn_days) * DAY_MS;
        let status = if age_ms >= max_ms {
            RotationStatus::Overdue
        } else if age_ms >= warn_ms {
            RotationStatus::DueSoon
        } else {
            RotationStatus::Ok
        };
        KeyAge {
            tenant_id: t.tenant_id.clone(),
            active_version: Some(v.version),
            active_since: v.created_at,
            age_ms,
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Fingerprint;
    use crate::model::VersionInfo;

    fn tenant(created_days_ago: i64, now: i64, state: KeyState) -> TenantInfo {
        TenantInfo {
            tenant_id: "acme".into(),
            kms_key_id: "k".into(),
            created_at: 0,
            versions: vec![VersionInfo {
                version: 3,
                state,
                kms_key_id: "k".into(),
                fingerprint: Fingerprint::from_bytes([0; 32]),
                created_at: now - created_days_ago * DAY_MS,
                updated_at: 0,
                second_wrapping: false,
            }],
        }
    }

    #[test]
    fn ages_are_judged_against_max_age_and_warning_window() {
        let p = RotationPolicy::default();
        let now = 1_800_000_000_000;
        let s = |d| p.assess(&tenant(d, now, KeyState::Active), now).status;
        assert_eq!(s(0), RotationStatus::Ok);
        assert_eq!(s(334), RotationStatus::Ok);
        assert_eq!(s(335), RotationStatus::DueSoon);
        assert_eq!(s(364), RotationStatus::DueSoon);
        assert_eq!(s(365), RotationStatus::Overdue);
        assert_eq!(s(2000), RotationStatus::Overdue);
        let a = p.assess(&tenant(10, now, KeyState::DecryptOnly), now);
        assert_eq!(a.status, RotationStatus::NoActiveKey);
        assert_eq!(a.active_version, None);
    }

    #[test]
    fn policy_files_are_validated() {
        assert_eq!(
            RotationPolicy::parse("").unwrap(),
            RotationPolicy::default()
        );
        let p = RotationPolicy::parse("max_key_age_days = 90\nwarn_days = 14\n").unwrap();
        assert_eq!(p.max_key_age_days, 90);
        assert!(RotationPolicy::parse("max_key_age_days = 0").is_err());
        assert!(RotationPolicy::parse("max_key_age_days = 30\nwarn_days = 30").is_err());
        assert!(
            RotationPolicy::parse("max_age = 30").is_err(),
            "unknown keys are refused"
        );
        assert!(RotationPolicy::parse("max_key_age_days = -1").is_err());
    }

    #[test]
    fn the_shipped_policy_file_is_valid_and_yearly() {
        let p = RotationPolicy::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policies/rotation.toml"
        )))
        .unwrap();
        assert_eq!(p.max_key_age_days, 365);
    }
}
