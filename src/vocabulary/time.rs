//! Times as the Segment spec writes them: ISO-8601 read the ways SDKs send it, written as RFC 3339
//! in UTC, kept to microseconds (the lake's resolution) everywhere.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};

/// Reads ISO-8601 dates as SDKs send them: RFC 3339 with an offset, or without one (taken as UTC),
/// or a bare date.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(to_micros(t.with_timezone(&Utc)));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(to_micros(t.and_utc()));
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc())
}

/// The lake keeps microseconds; so does everything before it, so that both agree.
pub fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// RFC 3339 in UTC with as many fraction digits as the time needs (0, 3, 6 or 9), as chrono's
/// `to_rfc3339_opts(SecondsFormat::AutoSi, true)` writes it, only faster: every message gets
/// up to four of these at the edge, and chrono's general formatter was 3 % of ingestion.
pub fn format_time(t: DateTime<Utc>) -> String {
    let mut text = Vec::with_capacity(30);
    write_time(&mut text, t);
    String::from_utf8(text).expect("ASCII")
}

/// [`format_time`] appended to `out`, without a string of its own (the edge writes four a
/// message straight into the log record).
pub fn write_time(out: &mut Vec<u8>, t: DateTime<Utc>) {
    let (secs, nanos) = (t.timestamp(), t.timestamp_subsec_nanos());
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        // Years of other widths, and leap seconds: chrono knows them.
        out.extend_from_slice(t.to_rfc3339_opts(SecondsFormat::AutoSi, true).as_bytes());
        return;
    }
    let clock = secs.rem_euclid(86_400) as u32;
    // YYYY-MM-DDTHH:MM:SS, then the fraction and the zone.
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    let fields = [
        (year as u32, 0, 4),
        (month, 5, 2),
        (day, 8, 2),
        (clock / 3600, 11, 2),
        (clock / 60 % 60, 14, 2),
        (clock % 60, 17, 2),
    ];
    for (n, at, width) in fields {
        put_digits(&mut text[at..at + width], n);
    }
    let (fraction, width) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    let mut len = 19;
    if width > 0 {
        put_digits(&mut text[20..20 + width], fraction);
        len = 20 + width;
    }
    text[len] = b'Z';
    out.extend_from_slice(&text[..=len]);
}

/// The proleptic Gregorian date `days` after 1970-01-01 (the civil-from-days arithmetic of
/// 400-year eras): the date derived once, where chrono's year(), month() and day() each derive
/// it again.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_based_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * march_based_month + 2) / 5 + 1) as u32;
    let month = if march_based_month < 10 {
        march_based_month + 3
    } else {
        march_based_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Writes `n` in decimal into `slot`, zero-padded to its length.
fn put_digits(slot: &mut [u8], mut n: u32) {
    for digit in slot.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_time(text).unwrap()
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Seconds from year 0 to 9999 and beyond, and every kind of fraction.
            let secs = (state % 400_000_000_000) as i64 - 62_200_000_000;
            let nanos = match state % 4 {
                0 => 0,
                1 => (state >> 8) as u32 % 1000 * 1_000_000,
                2 => (state >> 8) as u32 % 1_000_000 * 1_000,
                _ => (state >> 8) as u32 % 1_000_000_000,
            };
            let Some(t) = DateTime::from_timestamp(secs, nanos) else {
                continue;
            };
            assert_eq!(
                format_time(t),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                "{secs} {nanos}"
            );
        }
    }

    #[test]
    fn parses_the_dates_sdks_send() {
        assert_eq!(
            at("2026-01-01T00:00:00.123456789Z"),
            at("2026-01-01T00:00:00.123456Z")
        );
        assert_eq!(at("2026-01-01T01:00:00+01:00"), at("2026-01-01T00:00:00Z"));
        assert_eq!(at("2026-01-01T00:00:00.5"), at("2026-01-01T00:00:00.500Z"));
        assert_eq!(at("2026-01-01"), at("2026-01-01T00:00:00Z"));
        assert!(parse_time("01/02/2026").is_none());
    }
}
