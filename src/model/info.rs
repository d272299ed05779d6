//! Public, secret-free views of tenants, key versions and subjects.

use super::{KeyState, KeyVersionRecord, SubjectRecord, TenantRecord};
use crate::crypto::Fingerprint;

/// A key version without its wrapped material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Version number.
    pub version: u32,
    /// State.
    pub state: KeyState,
    /// KMS key that wraps it.
    pub kms_key_id: String,
    /// Fingerprint of the wrapped material.
    pub fingerprint: Fingerprint,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last state change, Unix ms.
    pub updated_at: i64,
    /// A disaster-recovery KMS key wraps it too (`kms::dual`).
    pub second_wrapping: bool,
}

/// A tenant and its key versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantInfo {
    /// Tenant id.
    pub tenant_id: String,
    /// KMS key for new versions.
    pub kms_key_id: String,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Versions, ascending.
    pub versions: Vec<VersionInfo>,
}

impl TenantInfo {
    /// The active version number, if any.
    pub fn active_version(&self) -> Option<u32> {
        self.versions
            .iter()
            .find(|v| v.state == KeyState::Active)
            .map(|v| v.version)
    }
}

impl From<&KeyVersionRecord> for VersionInfo {
    fn from(v: &KeyVersionRecord) -> Self {
        Self {
            version: v.version,
            state: v.state,
            kms_key_id: v.kms_key_id.clone(),
            fingerprint: v.fingerprint,
            created_at: v.created_at,
            updated_at: v.updated_at,
            second_wrapping: v
                .wrapped
                .as_ref()
                .is_some_and(super::WrappedKey::has_second_wrapping),
        }
    }
}

impl From<&TenantRecord> for TenantInfo {
    fn from(r: &TenantRecord) -> Self {
        Self {
            tenant_id: r.tenant_id.clone(),
            kms_key_id: r.kms_key_id.clone(),
            created_at: r.created_at,
            versions: r.versions.iter().map(VersionInfo::from).collect(),
        }
    }
}

/// A subject's key state without its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectInfo {
    /// Tenant id.
    pub tenant_id: String,
    /// Subject id.
    pub subject_id: String,
    /// State.
    pub state: KeyState,
    /// Tenant key version that wraps the subject key.
    pub wrap_version: u32,
    /// Fingerprint of the wrapped material.
    pub fingerprint: Fingerprint,
    /// Creation time, Unix ms.
    pub created_at: i64,
    /// Last state change, Unix ms.
    pub updated_at: i64,
}

impl From<&SubjectRecord> for SubjectInfo {
    fn from(r: &SubjectRecord) -> Self {
        Self {
            tenant_id: r.tenant_id.clone(),
            subject_id: r.subject_id.clone(),
            state: r.state,
            wrap_version: r.wrap_version,
            fingerprint: r.fingerprint,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}
