//! PostgreSQL backend: one store shared by every replica.
//!
//! Migrations run under sqlx's advisory lock, so replicas starting together apply them
//! once. Pool acquisition times out quickly so an outage surfaces as
//! [`StoreError::Unavailable`] instead of a hang.
//!
//! The change feed (`LISTEN`) has a connection of its own, which is pinged: a connection
//! that died silently (a dead network path, a firewall that forgot it: no reset, no
//! error) would otherwise go unnoticed, and with it every shred and suspension announced
//! meanwhile. A missed ping counts as a lost connection ([`Change::Lost`]), and a new one
//! is opened with jittered back-off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

use secrecy::{ExposeSecret as _, SecretString};
use sqlx::Executor as _;
use sqlx::postgres::{PgListener, PgNotification};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::sql::{SqlStore, classify};
use super::{Change, ChangeFeedState, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("src/store/migrations/postgres");

impl SqlStore {
    /// Connects to PostgreSQL at `dsn` (`postgres://user@host:port/db`) and applies
    /// migrations.
    ///
    /// # Errors
    /// [`StoreError::Misconfigured`] for a DSN that is not PostgreSQL,
    /// [`StoreError::Unavailable`] if the server cannot be reached,
    /// [`StoreError::Migration`] if the schema cannot be brought up to date.
    pub async fn connect_postgres(dsn: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        if !(dsn.starts_with("postgres://") || dsn.starts_with("postgresql://")) {
            return Err(StoreError::Misconfigured(
                "PostgreSQL DSN must start with postgres:// or postgresql://".into(),
            ));
        }
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(3))
            .connect(dsn)
            .await
            .map_err(classify)?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Migration(std::sync::Arc::new(e)))?;
        Ok(Self {
            pool,
            backend: "postgres",
            feed: Some(Arc::new(Feed {
                dsn: SecretString::from(dsn.to_owned()),
                health: FeedHealth::default(),
                stats: FeedStats::default(),
            })),
        })
    }

    /// How the change feed's connection is watched (the defaults of [`FeedHealth`]
    /// otherwise). No effect on SQLite, which has no change feed.
    #[must_use]
    pub fn with_feed_health(mut self, health: FeedHealth) -> Self {
        if let Some(f) = &self.feed {
            self.feed = Some(Arc::new(Feed {
                dsn: f.dsn.clone(),
                health,
                stats: FeedStats::default(),
            }));
        }
        self
    }
}

/// The `NOTIFY` channel key-state changes are announced on (payload: tenant id, a tab,
/// the subject id or nothing).
pub(super) const CHANNEL: &str = "fieldkey_keys";

/// How long a new `LISTEN` connection may take to be ready (connected, authenticated,
/// `LISTEN` acknowledged): as long as the pool may wait for a connection.
const CONNECT_WITHIN: Duration = Duration::from_secs(3);

/// First delay before reconnecting; it doubles per failed attempt (jittered), up to
/// [`BACKOFF_MAX`], and starts over once a new connection has answered a ping.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest delay between two attempts to reconnect.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the change feed's connection is watched: a query on that very connection every
/// `ping_every`, answered within `ping_timeout` or the connection counts as lost. A lost
/// connection is noticed within `ping_every + ping_timeout` (750 ms by default: well
/// under the 1 s default of `cache.revalidate_ms`, which bounds the delay otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedHealth {
    /// Time between the end of one ping and the start of the next.
    pub ping_every: Duration,
    /// How long a ping may take.
    pub ping_timeout: Duration,
}

impl Default for FeedHealth {
    /// 250 ms / 500 ms. A ping is one `SELECT 1` round trip on an otherwise idle
    /// connection (26 µs on loopback, measured with pgbench), so four a second per
    /// replica cost the server next to nothing; they also keep the connection from
    /// looking idle to firewalls and NAT, which drop idle connections silently.
    fn default() -> Self {
        Self {
            ping_every: Duration::from_millis(250),
            ping_timeout: Duration::from_millis(500),
        }
    }
}

/// The change feed of a PostgreSQL store: where it connects, how it is watched, what
/// happened to it.
#[derive(Debug)]
pub(super) struct Feed {
    dsn: SecretString,
    health: FeedHealth,
    stats: FeedStats,
}

/// What the change feed's connections went through (for the metrics).
#[derive(Debug, Default)]
struct FeedStats {
    up: AtomicBool,
    lost: AtomicU64,
    reconnects: AtomicU64,
}

impl Feed {
    /// The counters, as [`super::KeyStore::change_feed_state`] reports them.
    pub(super) fn state(&self) -> ChangeFeedState {
        ChangeFeedState {
            up: self.stats.up.load(Ordering::Relaxed),
            lost: self.stats.lost.load(Ordering::Relaxed),
            reconnects: self.stats.reconnects.load(Ordering::Relaxed),
        }
    }
}

/// Opens a `LISTEN` connection and forwards announced changes, pinging the connection
/// ([`FeedHealth`]). When the connection is lost (closed, failed, or a ping not
/// answered in time), [`Change::Lost`] is sent and a new connection is opened with
/// jittered back-off; [`Change::Lost`] is sent again after each failed attempt and once
/// the new connection listens, as notifications may have been missed meanwhile. The task
/// ends when the receiver is dropped.
///
/// # Errors
/// [`StoreError::Unavailable`] if the first connection cannot be opened.
pub(super) async fn listen(feed: Arc<Feed>) -> Result<mpsc::Receiver<Change>, StoreError> {
    let listener = subscribe(&feed).await?;
    feed.stats.up.store(true, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(follow(feed, listener, tx));
    Ok(rx)
}

/// A new connection that listens on [`CHANNEL`], within [`CONNECT_WITHIN`].
async fn subscribe(feed: &Feed) -> Result<PgListener, StoreError> {
    let open = async {
        let mut l = PgListener::connect(feed.dsn.expose_secret()).await?;
        // A lost connection makes `try_recv` return at once (we reconnect, with
        // back-off), and leaves the listener without it.
        l.eager_reconnect(false);
        l.listen(CHANNEL).await?;
        Ok(l)
    };
    match tokio::time::timeout(CONNECT_WITHIN, open).await {
        Ok(r) => r.map_err(classify),
        Err(_) => Err(classify(timed_out(
            "no LISTEN connection within the time allowed",
        ))),
    }
}

fn timed_out(what: &'static str) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}

/// The change feed's task: one connection after the other, for as long as the receiver
/// of `tx` is there.
async fn follow(feed: Arc<Feed>, mut listener: PgListener, tx: mpsc::Sender<Change>) {
    let mut backoff = Backoff::default();
    loop {
        let Some(why) = forward(&feed.health, &mut listener, &tx, &mut backoff).await else {
            return;
        };
        feed.stats.up.store(false, Ordering::Relaxed);
        feed.stats.lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %why, "key-change notifications: connection lost; reconnecting");
        // A connection that is still there (a ping went unanswered) is closed by sqlx
        // in the background; on a dead path that ends when the kernel gives up on it.
        drop(listener);
        if tx.send(Change::Lost).await.is_err() {
            return;
        }
        listener = loop {
            tokio::time::sleep(backoff.next_delay()).await;
            match subscribe(&feed).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = %e, "key-change notifications: cannot reconnect; retrying");
                    if tx.send(Change::Lost).await.is_err() {
                        return;
                    }
                }
            }
        };
        tracing::info!("key-change notifications: reconnected");
        if tx.send(Change::Lost).await.is_err() {
            return;
        }
        feed.stats.up.store(true, Ordering::Relaxed);
        feed.stats.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Forwards the notifications of one connection and pings it, until it is lost (why)
/// or the receiver is gone (`None`). The back-off starts over at the first answered ping.
async fn forward(
    health: &FeedHealth,
    listener: &mut PgListener,
    tx: &mpsc::Sender<Change>,
    backoff: &mut Backoff,
) -> Option<sqlx::Error> {
    let mut next_ping = Instant::now() + health.ping_every;
    loop {
        // `try_recv` may be dropped while it waits (sqlx reads a message only once it
        // has all of it), so the ping can take its turn on the connection.
        let received = tokio::select! {
            r = listener.try_recv() => Some(r),
            () = tokio::time::sleep_until(next_ping) => None,
        };
        match received {
            Some(Ok(Some(n))) => {
                if tx.send(change_of(&n)).await.is_err() {
                    return None;
                }
            }
            Some(Ok(None)) => {
                return Some(sqlx::Error::Io(
                    std::io::ErrorKind::ConnectionAborted.into(),
                ));
            }
            Some(Err(e)) => return Some(e),
            None => {
                // Notifications that arrive meanwhile are buffered by the listener and
                // returned by the next `try_recv`.
                match tokio::time::timeout(health.ping_timeout, listener.execute("SELECT 1")).await
                {
                    Ok(Ok(_)) => backoff.reset(),
                    Ok(Err(e)) => return Some(e),
                    Err(_) => {
                        return Some(timed_out("no answer to a ping within the time allowed"));
                    }
                }
                next_ping = Instant::now() + health.ping_every;
            }
        }
    }
}

/// The change a notification announces.
fn change_of(n: &PgNotification) -> Change {
    let (tenant, subject) = n.payload().split_once('\t').unwrap_or((n.payload(), ""));
    Change::Key {
        tenant: tenant.to_owned(),
        subject: (!subject.is_empty()).then(|| subject.to_owned()),
    }
}

/// Delays between attempts to reconnect: doubling from [`BACKOFF_FIRST`] up to
/// [`BACKOFF_MAX`], each drawn at random from its upper half, so that replicas that
/// lost the server together do not come back in step.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The upper bound of the next delay.
    fn peek(&self) -> Duration {
        BACKOFF_FIRST
            .saturating_mul(1u32 << self.failures.min(16))
            .min(BACKOFF_MAX)
    }

    /// The next delay, jittered; the one after is longer.
    fn next_delay(&mut self) -> Duration {
        let max = self.peek();
        self.failures = self.failures.saturating_add(1);
        max.mul_f64(rand::random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_double_with_jitter_up_to_the_cap_and_start_over() {
        let mut b = Backoff::default();
        let mut top = BACKOFF_FIRST;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(
                d >= top / 2 && d <= top,
                "{d:?} not in [{:?}, {top:?}]",
                top / 2
            );
            top = (top * 2).min(BACKOFF_MAX);
        }
        assert_eq!(b.peek(), BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_FIRST);
    }
}
