//! The evidence a report is built from, as a handle: read access to the key store's
//! tenants, jobs, erasures, key epochs, audit chain and signing keys.
//!
//! The Audit service holds one to build a report on request; it never writes, and it
//! does not give its holder the store (the service reaches no store methods).

use std::sync::Arc;

use super::{Configuration, Options, Report, build};
use crate::error::Result;
use crate::policy::RotationPolicy;
use crate::store::KeyStore;

/// Where a report's evidence is read from. Cheap to clone.
#[derive(Clone)]
pub struct Evidence(Arc<dyn KeyStore>);

impl std::fmt::Debug for Evidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evidence").finish_non_exhaustive()
    }
}

impl Evidence {
    /// The evidence kept in `store`.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        Self(store)
    }

    /// The report over this evidence: see [`build`].
    ///
    /// # Errors
    /// As [`build`].
    pub async fn report(
        &self,
        configuration: Configuration,
        rotation: &RotationPolicy,
        opts: &Options,
    ) -> Result<Report> {
        build(self.0.as_ref(), configuration, rotation, opts).await
    }
}
