//! Times as Pulsar's WebSocket API writes them: `DateFormatter`, i.e. Java's
//! `DateTimeFormatter.ISO_OFFSET_DATE_TIME` (docs/pulsar-websocket-api.md §8).
//!
//! Output is always UTC (`2026-12-06T10:30:00.12Z`): the fraction loses its trailing zeros
//! and vanishes when zero, exactly as Java's `appendFraction(NANO_OF_SECOND, 0, 9, true)`.
//! Input (a producer's `eventTime`) takes what that formatter parses: seconds and fraction
//! (1–9 digits) optional, an offset required (`Z`, `±HH:MM`, `±HH:MM:SS`), `T` and `Z` in
//! either case, and a strict calendar. Years are the four-digit ones (0000–9999); Java also
//! takes signed longer years, which no client sends.

use std::fmt::Write;

/// Formats milliseconds since the epoch.
pub fn format(ms: u64) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    let mut s = String::with_capacity(24);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if millis != 0 {
        let frac = format!("{millis:03}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Why an `eventTime` was refused; the message is Java's `DateTimeParseException` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Text '{text}' could not be parsed at index {index}")]
pub struct ParseError {
    pub text: String,
    pub index: usize,
}

/// Parses an ISO-8601 date-time with an offset into milliseconds since the epoch (negative
/// before 1970). Digits beyond the millisecond are dropped, as `Instant.toEpochMilli` does.
pub fn parse(text: &str) -> Result<i64, ParseError> {
    let err = |index: usize| ParseError {
        text: text.to_string(),
        index,
    };
    let b = text.as_bytes();
    let mut p = Cursor { b, pos: 0 };
    let year = p.digits(4).ok_or_else(|| err(p.pos))?;
    p.eat(b'-').ok_or_else(|| err(p.pos))?;
    let month = p.digits(2).ok_or_else(|| err(p.pos))?;
    p.eat(b'-').ok_or_else(|| err(p.pos))?;
    let day = p.digits(2).ok_or_else(|| err(p.pos))?;
    if !p.eat_ci(b'T') {
        return Err(err(p.pos));
    }
    let hour = p.digits(2).ok_or_else(|| err(p.pos))?;
    p.eat(b':').ok_or_else(|| err(p.pos))?;
    let minute = p.digits(2).ok_or_else(|| err(p.pos))?;
    let (mut second, mut nanos) = (0, 0u64);
    if p.peek() == Some(b':') {
        p.pos += 1;
        second = p.digits(2).ok_or_else(|| err(p.pos))?;
        if p.peek() == Some(b'.') {
            p.pos += 1;
            let start = p.pos;
            while p.pos - start < 9 && p.peek().is_some_and(|c| c.is_ascii_digit()) {
                nanos = nanos * 10 + u64::from(b[p.pos] - b'0');
                p.pos += 1;
            }
            if p.pos == start {
                return Err(err(p.pos));
            }
            nanos *= 10u64.pow(9 - (p.pos - start) as u32);
        }
    }
    let offset_at = p.pos;
    let offset_secs: i64 = if p.eat_ci(b'Z') {
        0
    } else {
        let sign = match p.peek() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return Err(err(offset_at)),
        };
        p.pos += 1;
        let oh = p.digits(2).ok_or_else(|| err(offset_at))?;
        p.eat(b':').ok_or_else(|| err(offset_at))?;
        let om = p.digits(2).ok_or_else(|| err(offset_at))?;
        let mut os = 0;
        if p.peek() == Some(b':') {
            p.pos += 1;
            os = p.digits(2).ok_or_else(|| err(offset_at))?;
        }
        if oh > 18 || om > 59 || os > 59 || oh * 3600 + om * 60 + os > 18 * 3600 {
            return Err(err(offset_at));
        }
        sign * (oh * 3600 + om * 60 + os)
    };
    if p.pos != b.len() {
        return Err(err(p.pos));
    }
    // Java reports calendar errors at index 0 ("could not be parsed: Invalid date ...").
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(err(0));
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Ok(secs * 1000 + (nanos / 1_000_000) as i64)
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn digits(&mut self, n: usize) -> Option<i64> {
        let s = self.b.get(self.pos..self.pos + n)?;
        if !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.pos += n;
        Some(s.iter().fold(0, |v, c| v * 10 + i64::from(c - b'0')))
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek() == Some(c)).then(|| self.pos += 1)
    }

    fn eat_ci(&mut self, c: u8) -> bool {
        let hit = self.peek().is_some_and(|x| x.eq_ignore_ascii_case(&c));
        if hit {
            self.pos += 1;
        }
        hit
    }
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_iso_offset_date_time_in_utc() {
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(format(123), "1970-01-01T00:00:00.123Z");
        assert_eq!(format(120), "1970-01-01T00:00:00.12Z");
        assert_eq!(format(100), "1970-01-01T00:00:00.1Z");
        assert_eq!(format(1_709_210_096_007), "2024-02-29T12:34:56.007Z");
        assert_eq!(format(1_796_553_000_500), "2026-12-06T10:30:00.5Z");
    }

    #[test]
    fn parses_what_java_parses() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse("1970-01-01T00:00Z"), Ok(0), "seconds optional");
        assert_eq!(parse("1970-01-01t00:00:01.5z"), Ok(1_500));
        assert_eq!(parse("1970-01-01T01:00:00+01:00"), Ok(0));
        assert_eq!(parse("1969-12-31T19:00:00-05:00"), Ok(0));
        assert_eq!(parse("1970-01-01T00:00:00.123456789Z"), Ok(123));
        assert_eq!(parse("2024-02-29T12:34:56.007Z"), Ok(1_709_210_096_007));
        assert_eq!(parse("1969-12-31T23:59:59Z"), Ok(-1_000));
        assert_eq!(parse("1970-01-01T00:00:00+00:00:30"), Ok(-30_000));
    }

    #[test]
    fn round_trips() {
        for ms in [
            0,
            1,
            999,
            1_000,
            86_399_999,
            951_782_400_000,
            4_102_444_800_000,
        ] {
            assert_eq!(parse(&format(ms)), Ok(ms as i64), "{ms}");
        }
    }

    #[test]
    fn refuses_what_java_refuses() {
        for bad in [
            "",
            "2024-01-01",
            "2024-01-01T00:00:00",
            "2024-01-01 00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00.1234567890Z",
            "2024-01-01T00:00:00+1:00",
            "2024-01-01T00:00:00+19:00",
            "2024-01-01T00:00:00Zjunk",
            "24-01-01T00:00:00Z",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse("2024-01-01").unwrap_err().to_string(),
            "Text '2024-01-01' could not be parsed at index 10"
        );
    }
}
