//! The clock every stored timestamp uses: Unix milliseconds.

/// The store's clock: now, in Unix milliseconds (every timestamp it keeps, and the
/// lease times of jobs, use it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Earliest instant RFC 3339 can express: `0000-01-01T00:00:00.000Z`, in Unix ms.
pub const MIN_UNIX_MS: i64 = -62_167_219_200_000;

/// Latest instant RFC 3339 can express: `9999-12-31T23:59:59.999Z`, in Unix ms.
pub const MAX_UNIX_MS: i64 = 253_402_300_799_999;

/// Formats Unix milliseconds as RFC 3339 UTC with exactly three fractional digits,
/// e.g. `1764639635123` → `"2025-12-02T01:40:35.123Z"`.
///
/// Never panics: inputs outside the range RFC 3339 can express (years 0000 to 9999,
/// i.e. [`MIN_UNIX_MS`]..=[`MAX_UNIX_MS`]) are clamped to the nearest end of that range.
/// The receipt verifier rejects receipts whose timestamps lie outside it.
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
