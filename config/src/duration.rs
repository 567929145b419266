//! Human durations: `"250ms"`, `"5s"`, `"1m"`, `"2h"`, `"10us"`.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Parses a human duration such as `"250ms"` or `"5s"`.
///
/// Units: `us`, `ms`, `s`, `m`, `h`, `d`. A bare number is rejected, so that
/// `"5"` is never silently read as seconds or milliseconds.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(millrace_config::parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert!(millrace_config::parse_duration("5").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration `{text}` has no unit (use us, ms, s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("duration `{text}` does not start with a whole number"))?;
    let micros_per_unit: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        other => {
            return Err(format!(
                "duration `{text}` has unknown unit `{other}` (use us, ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(micros_per_unit)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("duration `{text}` is too large"))
}

/// A [`Duration`] that deserializes from a human duration string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(parse_duration("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in [
            "",
            "5",
            "ms",
            "5 parsecs",
            "-1s",
            "1.5s",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }
}
