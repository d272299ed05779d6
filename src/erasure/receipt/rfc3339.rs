//! RFC 3339 UTC timestamps with milliseconds, as written in receipts.
//!
//! Formatting only; checking that a receipt's strings match its Unix times is
//! `verify.rs`'s job.

use super::{MAX_UNIX_MS, MIN_UNIX_MS};

/// Formats Unix milliseconds as RFC 3339 UTC with exactly three fractional digits,
/// e.g. `1764639635123` → `"2025-12-02T01:40:35.123Z"`.
///
/// Never panics: inputs outside the range RFC 3339 can express (years 0000 to 9999,
/// i.e. [`MIN_UNIX_MS`]..=[`MAX_UNIX_MS`]) are clamped to the nearest end of that range.
/// [`verify`](super::verify) rejects receipts whose timestamps lie outside it.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let ms = unix_ms.clamp(MIN_UNIX_MS, MAX_UNIX_MS);
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        // Unreachable: the clamped range lies inside `time`'s supported range.
        Err(_) => String::from("1970-01-01T00:00:00.000Z"),
    }
}
