//! Per-identity ceilings (`policies/limits.toml`) and the guard that enforces them:
//! decrypted values, and blind index / pseudonym items.
//!
//! Why index and pseudonym items are budgeted: a blind index or a pseudonym is a keyed
//! hash, so whoever may compute them can invert a low-entropy column (birth dates, postal
//! codes, sequential user ids) by a dictionary: hash every candidate, compare with the
//! stored values. An identity that may decrypt the field learns nothing that way it
//! could not read directly, so by default only identities that may NOT decrypt the item
//! (Cedar's answer to `Crypto::Decrypt` on the same tenant and field; for a pseudonym the
//! purpose stands as the field) are held to the index budget, with a low built-in default.
//! Does NOT: make inversion impossible, only slow and visible (every refusal is an audit
//! record); a small domain (two genders, 36,500 birth dates) is still enumerable at any
//! budget over time. Use a slow (Argon2id) index or no index for such fields.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use super::Authorizer;

/// Highest accepted `per_second` (the rate limiter's resolution is a nanosecond per
/// value; far above anything one sidecar decrypts).
pub const MAX_PER_SECOND: u32 = 1_000_000;

/// Limiters kept at once; beyond, the map is emptied (every identity starts with a
/// full bucket again). Identities are authenticated callers, so this is never reached
/// in practice.
const MAX_LIMITERS: usize = 10_000;

/// A rate: sustained values per second and the burst allowed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate.
    pub per_second: u32,
    /// Values allowed at once.
    pub burst: u32,
}

/// The index budget of identities that may not decrypt the item, when `limits.toml`
/// has no `[index_default]`: enough for an export job that looks rows up one at a time,
/// far too little to hash a dictionary at HMAC speed.
pub const DEFAULT_INDEX_LIMIT: RateLimit = RateLimit {
    per_second: 20,
    burst: 200,
};

/// The parsed `limits.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecryptLimits {
    default: Option<RateLimit>,
    per_identity: HashMap<String, RateLimit>,
    index_default: RateLimit,
    index_per_identity: HashMap<String, RateLimit>,
}

impl Default for DecryptLimits {
    fn default() -> Self {
        Self {
            default: None,
            per_identity: HashMap::new(),
            index_default: DEFAULT_INDEX_LIMIT,
            index_per_identity: HashMap::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    default: Option<RateSpec>,
    #[serde(default)]
    decrypt: Vec<IdentitySpec>,
    #[serde(default)]
    index_default: Option<RateSpec>,
    #[serde(default)]
    index: Vec<IdentitySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateSpec {
    per_second: u32,
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentitySpec {
    identity: String,
    per_second: u32,
    burst: Option<u32>,
}

fn rate(what: &str, per_second: u32, burst: Option<u32>) -> Result<RateLimit, String> {
    if !(1..=MAX_PER_SECOND).contains(&per_second) {
        return Err(format!(
            "{what}: per_second must be 1..={MAX_PER_SECOND}, not {per_second}"
        ));
    }
    let burst = burst.unwrap_or(per_second);
    if burst == 0 {
        return Err(format!("{what}: burst must be at least 1"));
    }
    Ok(RateLimit { per_second, burst })
}

fn per_identity(
    table: &str,
    specs: Vec<IdentitySpec>,
) -> Result<HashMap<String, RateLimit>, String> {
    let mut out = HashMap::with_capacity(specs.len());
    for d in specs {
        if d.identity.is_empty() {
            return Err(format!("[[{table}]]: identity must not be empty"));
        }
        let what = format!("[[{table}]] {}", d.identity.escape_debug());
        let r = rate(&what, d.per_second, d.burst)?;
        if out.insert(d.identity, r).is_some() {
            return Err(format!("{what}: listed twice"));
        }
    }
    Ok(out)
}

impl DecryptLimits {
    /// No `limits.toml`: decrypts unlimited; index and pseudonym items of identities
    /// that may not decrypt them held to [`DEFAULT_INDEX_LIMIT`].
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Parses and validates `limits.toml` text: unknown keys, zero or out-of-range
    /// numbers, empty or duplicate identities are refused.
    ///
    /// # Errors
    /// A message naming the problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: LimitsFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let default = match file.default {
            Some(d) => Some(rate("[default]", d.per_second, d.burst)?),
            None => None,
        };
        let index_default = match file.index_default {
            Some(d) => rate("[index_default]", d.per_second, d.burst)?,
            None => DEFAULT_INDEX_LIMIT,
        };
        Ok(Self {
            default,
            per_identity: per_identity("decrypt", file.decrypt)?,
            index_default,
            index_per_identity: per_identity("index", file.index)?,
        })
    }

    /// The decrypt ceiling for `identity`: its own, else the default, else none
    /// (unlimited).
    pub fn for_identity(&self, identity: &str) -> Option<RateLimit> {
        self.per_identity.get(identity).copied().or(self.default)
    }

    /// The index/pseudonym budget for `identity`: its own `[[index]]` entry; else none
    /// if it may decrypt the item (`may_decrypt`, asked only then); else the
    /// `[index_default]` (built in: [`DEFAULT_INDEX_LIMIT`]).
    pub fn for_index(
        &self,
        identity: &str,
        may_decrypt: impl FnOnce() -> bool,
    ) -> Option<RateLimit> {
        if let Some(own) = self.index_per_identity.get(identity) {
            return Some(*own);
        }
        if may_decrypt() {
            None
        } else {
            Some(self.index_default)
        }
    }
}

/// What a ceiling counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Decrypted values (`Decrypt`, each `DecryptBatch` item).
    Decrypt,
    /// Blind index and pseudonym items (`BlindIndex`, `Pseudonymize` and their batches'
    /// items).
    Index,
}

impl Budget {
    fn as_str(self) -> &'static str {
        match self {
            Budget::Decrypt => "decrypt",
            Budget::Index => "blind index/pseudonym",
        }
    }
}

/// A call refused by the guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} rate limit exceeded: {requested} value(s) requested, ceiling {}/s with a burst of {}",
    budget.as_str(),
    limit.per_second,
    limit.burst
)]
pub struct RateLimited {
    /// What was counted.
    pub budget: Budget,
    /// Values asked for.
    pub requested: u32,
    /// The ceiling that refused them.
    pub limit: RateLimit,
    /// When the request would fit; `None` if it never will (more than the burst).
    pub retry_after: Option<Duration>,
}

type Limiters = RwLock<HashMap<Box<str>, DefaultDirectRateLimiter>>;

struct GuardState {
    /// The limits these limiters were built for (compared by pointer: the authorizer
    /// keeps the same `Arc` across reloads that leave `limits.toml` unchanged).
    limits: Arc<DecryptLimits>,
    decrypt: Limiters,
    index: Limiters,
}

impl GuardState {
    fn new(limits: Arc<DecryptLimits>) -> Self {
        Self {
            limits,
            decrypt: RwLock::new(HashMap::new()),
            index: RwLock::new(HashMap::new()),
        }
    }

    fn limiters(&self, budget: Budget) -> &Limiters {
        match budget {
            Budget::Decrypt => &self.decrypt,
            Budget::Index => &self.index,
        }
    }
}

/// Per-identity ceilings on decrypted values and on index/pseudonym items (GCRA token
/// buckets from `governor`), following the [`Authorizer`]'s current `limits.toml`: when
/// a reload changes the limits, the limiters are rebuilt (a reload that leaves them
/// unchanged keeps the buckets' state).
pub struct DecryptGuard {
    authz: Arc<Authorizer>,
    state: ArcSwap<GuardState>,
}

impl DecryptGuard {
    /// A guard following `authz`'s limits.
    pub fn new(authz: Arc<Authorizer>) -> Self {
        let limits = authz.limits();
        Self {
            authz,
            state: ArcSwap::from_pointee(GuardState::new(limits)),
        }
    }

    /// The limiters for the current limits (rebuilt if a reload changed them).
    fn state(&self) -> arc_swap::Guard<Arc<GuardState>> {
        let current = self.authz.current_set();
        let state = self.state.load();
        if Arc::ptr_eq(&state.limits, &current.limits) {
            return state;
        }
        // New limits: fresh limiters. Whichever thread swaps first wins.
        let fresh = Arc::new(GuardState::new(Arc::clone(&current.limits)));
        let _previous = self.state.compare_and_swap(&state, fresh);
        self.state.load()
    }

    /// Takes `n` values from `identity`'s decrypt allowance (a `Decrypt` is 1, a
    /// `DecryptBatch` item 1). `n == 0` and identities without a ceiling always pass.
    ///
    /// # Errors
    /// [`RateLimited`] if the values do not fit now (nothing is taken then).
    pub fn check(&self, identity: &str, n: u32) -> Result<(), RateLimited> {
        if n == 0
            || self
                .authz
                .current_set()
                .limits
                .for_identity(identity)
                .is_none()
        {
            return Ok(());
        }
        let state = self.state();
        // The limits the limiters are built for (newer than the set read above if a
        // reload raced with this call).
        let limit = state.limits.for_identity(identity);
        take(&state, Budget::Decrypt, identity, limit, n)
    }

    /// Takes `n` items from `identity`'s index/pseudonym budget
    /// ([`DecryptLimits::for_index`]; `may_decrypt` is asked only for identities
    /// without an `[[index]]` entry).
    ///
    /// # Errors
    /// [`RateLimited`] if the items do not fit now (nothing is taken then).
    pub fn check_index(
        &self,
        identity: &str,
        may_decrypt: impl FnOnce() -> bool,
        n: u32,
    ) -> Result<(), RateLimited> {
        if n == 0 {
            return Ok(());
        }
        let state = self.state();
        let limit = state.limits.for_index(identity, may_decrypt);
        take(&state, Budget::Index, identity, limit, n)
    }
}

/// Takes `n` cells from `identity`'s bucket for `budget` under `limit` (none: passes).
fn take(
    state: &GuardState,
    budget: Budget,
    identity: &str,
    limit: Option<RateLimit>,
    n: u32,
) -> Result<(), RateLimited> {
    let (Some(limit), Some(cells)) = (limit, NonZeroU32::new(n)) else {
        return Ok(());
    };
    // Ok, or Err(when it would fit; None: never).
    let verdict = |l: &DefaultDirectRateLimiter| match l.check_n(cells) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(l.clock().now()))),
        Err(_insufficient_capacity) => Err(None),
    };
    let limiters = state.limiters(budget);
    let known = {
        let map = limiters.read().unwrap_or_else(PoisonError::into_inner);
        map.get(identity).map(verdict)
    };
    let outcome = match known {
        Some(o) => o,
        None => {
            let mut map = limiters.write().unwrap_or_else(PoisonError::into_inner);
            if map.len() >= MAX_LIMITERS && !map.contains_key(identity) {
                map.clear();
            }
            verdict(
                map.entry(identity.into())
                    .or_insert_with(|| RateLimiter::direct(quota(limit))),
            )
        }
    };
    outcome.map_err(|retry_after| RateLimited {
        budget,
        requested: n,
        limit,
        retry_after,
    })
}

fn quota(limit: RateLimit) -> Quota {
    // `parse` guarantees both are non-zero; `MIN` is never used.
    let per_second = NonZeroU32::new(limit.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_limits_parse() {
        let l = DecryptLimits::parse(
            r#"
            [default]
            per_second = 10

            [[decrypt]]
            identity = "spiffe://example.org/ns/shop/sa/web"
            per_second = 2000
            burst = 4000
            "#,
        )
        .unwrap();
        assert_eq!(
            l.for_identity("spiffe://example.org/ns/shop/sa/web"),
            Some(RateLimit {
                per_second: 2000,
                burst: 4000
            })
        );
        assert_eq!(
            l.for_identity("someone-else"),
            Some(RateLimit {
                per_second: 10,
                burst: 10
            }),
            "the default applies to unlisted identities, burst defaulting to the rate"
        );
        let none = DecryptLimits::parse("").unwrap();
        assert_eq!(none, DecryptLimits::unlimited());
        assert_eq!(none.for_identity("x"), None, "no default: unlimited");
    }

    #[test]
    fn index_budgets_apply_to_callers_that_may_not_decrypt() {
        let built_in = DecryptLimits::parse("").unwrap();
        assert_eq!(
            built_in.for_index("analytics", || false),
            Some(DEFAULT_INDEX_LIMIT),
            "no limits.toml: the low built-in budget"
        );
        assert_eq!(
            built_in.for_index("app", || true),
            None,
            "a caller that may decrypt the field is not held"
        );
        let l = DecryptLimits::parse(
            "[index_default]\nper_second = 3\n\n[[index]]\nidentity = \"big\"\nper_second = 500\nburst = 900\n",
        )
        .unwrap();
        let asked = std::cell::Cell::new(false);
        assert_eq!(
            l.for_index("big", || {
                asked.set(true);
                true
            }),
            Some(RateLimit {
                per_second: 500,
                burst: 900
            }),
            "an [[index]] entry holds even a caller that may decrypt"
        );
        assert!(!asked.get(), "policies are not asked for a listed identity");
        assert_eq!(
            l.for_index("other", || false),
            Some(RateLimit {
                per_second: 3,
                burst: 3
            })
        );
    }

    #[test]
    fn the_index_bucket_is_separate_from_the_decrypt_bucket_and_refuses_beyond_it() {
        let l = Arc::new(
            DecryptLimits::parse(
                "[[decrypt]]\nidentity = \"a\"\nper_second = 1\nburst = 2\n[[index]]\nidentity = \"a\"\nper_second = 1\nburst = 3\n",
            )
            .unwrap(),
        );
        let state = GuardState::new(Arc::clone(&l));
        let index = |n| take(&state, Budget::Index, "a", l.for_index("a", || false), n);
        let decrypt = |n| take(&state, Budget::Decrypt, "a", l.for_identity("a"), n);
        assert!(index(3).is_ok(), "the whole index burst");
        let e = index(1).unwrap_err();
        assert_eq!(e.budget, Budget::Index);
        assert!(e.retry_after.is_some(), "fits again later");
        assert!(
            e.to_string()
                .starts_with("blind index/pseudonym rate limit exceeded"),
            "{e}"
        );
        assert!(decrypt(2).is_ok(), "decrypts are counted apart");
        assert_eq!(decrypt(1).unwrap_err().budget, Budget::Decrypt);
        assert_eq!(
            index(4).map_err(|e| e.retry_after),
            Err(None),
            "more than the burst never fits"
        );
    }

    #[test]
    fn bad_limits_are_refused_with_a_reason() {
        let err = |t: &str| DecryptLimits::parse(t).unwrap_err();
        assert!(
            err("[[decrypt]]\nidentity = \"a\"\nper_second = 5\nrate = 3\n").contains("rate"),
            "unknown key"
        );
        assert!(err("[defaults]\nper_second = 5\n").contains("defaults"));
        assert!(err("[[decrypt]]\nidentity = \"a\"\nper_second = 0\n").contains("per_second"));
        assert!(
            err("[[decrypt]]\nidentity = \"a\"\nper_second = 5\nburst = 0\n").contains("burst")
        );
        assert!(err("[default]\nper_second = 0\n").contains("[default]"));
        assert!(!err("[[decrypt]]\nidentity = \"a\"\nper_second = -5\n").is_empty());
        assert!(
            err("[[decrypt]]\nidentity = \"a\"\nper_second = 2000000\n").contains("1..=1000000")
        );
        assert!(err("[[decrypt]]\nidentity = \"\"\nper_second = 5\n").contains("empty"));
        assert!(
            err("[[decrypt]]\nidentity = \"a\"\nper_second = 5\n[[decrypt]]\nidentity = \"a\"\nper_second = 6\n")
                .contains("twice")
        );
        assert!(
            !err("[[decrypt]]\nper_second = 5\n").is_empty(),
            "identity required"
        );
        assert!(err("[index_default]\nper_second = 0\n").contains("[index_default]"));
        assert!(err("[[index]]\nidentity = \"\"\nper_second = 5\n").contains("[[index]]"));
        assert!(
            err("[[index]]\nidentity = \"a\"\nper_second = 5\n[[index]]\nidentity = \"a\"\nper_second = 6\n")
                .contains("twice")
        );
    }
}
