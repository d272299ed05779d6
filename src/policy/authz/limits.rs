//! Decrypt ceilings (`policies/limits.toml`) and the guard that enforces them.

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

/// The parsed `limits.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecryptLimits {
    default: Option<RateLimit>,
    per_identity: HashMap<String, RateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    default: Option<RateSpec>,
    #[serde(default)]
    decrypt: Vec<IdentitySpec>,
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

impl DecryptLimits {
    /// No limits at all (no `limits.toml`).
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
        let mut per_identity = HashMap::with_capacity(file.decrypt.len());
        for d in file.decrypt {
            if d.identity.is_empty() {
                return Err("[[decrypt]]: identity must not be empty".into());
            }
            let what = format!("[[decrypt]] {}", d.identity.escape_debug());
            let r = rate(&what, d.per_second, d.burst)?;
            if per_identity.insert(d.identity, r).is_some() {
                return Err(format!("{what}: listed twice"));
            }
        }
        Ok(Self {
            default,
            per_identity,
        })
    }

    /// The ceiling for `identity`: its own, else the default, else none (unlimited).
    pub fn for_identity(&self, identity: &str) -> Option<RateLimit> {
        self.per_identity.get(identity).copied().or(self.default)
    }
}

/// A decrypt refused by the guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "decrypt rate limit exceeded: {requested} value(s) requested, ceiling {}/s with a burst of {}",
    limit.per_second,
    limit.burst
)]
pub struct RateLimited {
    /// Values asked for.
    pub requested: u32,
    /// The ceiling that refused them.
    pub limit: RateLimit,
    /// When the request would fit; `None` if it never will (more than the burst).
    pub retry_after: Option<Duration>,
}

struct GuardState {
    /// The limits these limiters were built for (compared by pointer: the authorizer
    /// keeps the same `Arc` across reloads that leave `limits.toml` unchanged).
    limits: Arc<DecryptLimits>,
    limiters: RwLock<HashMap<Box<str>, DefaultDirectRateLimiter>>,
}

impl GuardState {
    fn new(limits: Arc<DecryptLimits>) -> Self {
        Self {
            limits,
            limiters: RwLock::new(HashMap::new()),
        }
    }
}

/// Per-identity ceilings on decrypted values (GCRA token buckets from `governor`),
/// following the [`Authorizer`]'s current `limits.toml`: when a reload changes the
/// limits, the limiters are rebuilt (a reload that leaves them unchanged keeps the
/// buckets' state).
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

    /// Takes `n` values from `identity`'s allowance (a `Decrypt` is 1, a
    /// `DecryptBatch` its item count). `n == 0` and identities without a ceiling
    /// always pass.
    ///
    /// # Errors
    /// [`RateLimited`] if the values do not fit now (nothing is taken then).
    pub fn check(&self, identity: &str, n: u32) -> Result<(), RateLimited> {
        let Some(cells) = NonZeroU32::new(n) else {
            return Ok(());
        };
        let current = self.authz.current_set();
        if current.limits.for_identity(identity).is_none() {
            return Ok(());
        }
        let mut state = self.state.load();
        if !Arc::ptr_eq(&state.limits, &current.limits) {
            // New limits: fresh limiters. Whichever thread swaps first wins.
            let fresh = Arc::new(GuardState::new(Arc::clone(&current.limits)));
            let _previous = self.state.compare_and_swap(&state, fresh);
            state = self.state.load();
        }
        // The limits the limiters are built for (newer than `current` if a reload
        // raced with this call).
        let Some(limit) = state.limits.for_identity(identity) else {
            return Ok(());
        };
        // Ok, or Err(when it would fit; None: never).
        let verdict = |l: &DefaultDirectRateLimiter| match l.check_n(cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(l.clock().now()))),
            Err(_insufficient_capacity) => Err(None),
        };
        let known = {
            let map = state
                .limiters
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            map.get(identity).map(verdict)
        };
        let outcome = match known {
            Some(o) => o,
            None => {
                let mut map = state
                    .limiters
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
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
            requested: n,
            limit,
            retry_after,
        })
    }
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
    }
}
