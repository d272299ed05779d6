//! Request limits (`[limits]`) and cache bounds (`[cache]`).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Default of `limits.memory_budget_bytes`: two messages of the default largest size.
/// Measured (BENCHMARKS.md, issue 20): with it the sidecar's RSS stays under 256 MiB
/// whatever the callers send.
pub const DEFAULT_MEMORY_BUDGET: usize = 32 << 20;

/// Request limits; each violation has its own status (see the proto).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest gRPC request message, bytes.
    pub max_message_bytes: usize,
    /// Most items in one batch request.
    pub max_batch_items: usize,
    /// Largest plaintext or ciphertext of one field, bytes.
    pub max_field_bytes: usize,
    /// Server-side deadline of one call, milliseconds.
    pub request_timeout_ms: u64,
    /// Calls in flight across all connections; more are refused at once.
    pub max_concurrent_requests: usize,
    /// Bytes of request messages held in memory at once, across all connections; a
    /// message that does not fit is refused at once (RESOURCE_EXHAUSTED,
    /// MEMORY_BUDGET) before it is buffered. At least `max_message_bytes`.
    pub memory_budget_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            max_batch_items: 10_000,
            max_field_bytes: 1 << 20,
            request_timeout_ms: 10_000,
            max_concurrent_requests: 4096,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET,
        }
    }
}

impl Limits {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch_items == 0
            || self.max_field_bytes == 0
            || self.max_concurrent_requests == 0
        {
            return Err(ConfigError::Invalid("limits must be positive".into()));
        }
        if self.max_message_bytes < 1024 || self.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_message_bytes must be >= 1024 and request_timeout_ms > 0".into(),
            ));
        }
        if self.memory_budget_bytes < self.max_message_bytes.saturating_add(5) {
            return Err(ConfigError::Invalid(format!(
                "limits.memory_budget_bytes ({}) must hold at least one message of limits.max_message_bytes ({}) and its 5-byte frame header",
                self.memory_budget_bytes, self.max_message_bytes
            )));
        }
        Ok(())
    }

    /// The deadline as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Cache bounds and freshness.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Unwrapped key lifetime in memory, seconds.
    pub key_ttl_secs: u64,
    /// Tenants with cached keys.
    pub max_tenants: u64,
    /// Subjects with cached keys.
    pub max_subjects: u64,
    /// Metadata re-read interval (cross-replica propagation bound), milliseconds.
    pub revalidate_ms: u64,
    /// While the key store is unreachable, cached key states up to this old keep
    /// serving (availability through a database outage); also how long a replica cut
    /// off from the store may miss a shred made elsewhere. 0 = never serve stale.
    pub max_stale_ms: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            key_ttl_secs: 900,
            max_tenants: 10_000,
            max_subjects: 100_000,
            revalidate_ms: 1000,
            max_stale_ms: 300_000,
        }
    }
}
