//! The change-feed metrics: whether the key store's change feed (PostgreSQL `LISTEN`)
//! is connected, and how often its connection was lost and re-established, read from
//! the store at every scrape.
//!
//! Owns: the collector and its link to the store. Does not: count anything itself (the
//! store counts), or print anything for a store without a change feed (SQLite).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::Metrics;
use crate::store::KeyStore;

/// Where the collector finds the store once [`Metrics::attach_store`] has set it.
#[derive(Clone, Default)]
pub(super) struct FeedSource(Arc<OnceLock<Arc<dyn KeyStore>>>);

impl std::fmt::Debug for FeedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FeedSource")
            .field(&self.0.get().map(|s| s.backend()))
            .finish()
    }
}

/// The change feed's state, read at every scrape from the store attached with
/// [`Metrics::attach_store`].
#[derive(Debug, Default)]
pub(super) struct FeedCollector(pub(super) FeedSource);

impl prometheus_client::collector::Collector for FeedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = self.0.0.get().and_then(|s| s.change_feed_state()) else {
            return Ok(());
        };
        let up = ConstGauge::new(i64::from(state.up));
        up.encode(encoder.encode_descriptor(
            "fieldkey_change_feed_up",
            "Whether the key store's change feed (LISTEN connection) is connected and answering pings.",
            None,
            up.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "fieldkey_change_feed_lost",
                "Change-feed connections lost (closed, failed, or a ping unanswered); each makes cached key states re-read.",
                state.lost,
            ),
            (
                "fieldkey_change_feed_reconnects",
                "Change-feed connections re-established after a loss.",
                state.reconnects,
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Reports the change feed of `store` (nothing for a store without one).
    pub fn attach_store(&self, store: &Arc<dyn KeyStore>) {
        let _ = self.feed_source.0.set(store.clone());
    }
}
