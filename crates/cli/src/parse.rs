//! Value parsers shared by the commands.

use std::time::Duration;

/// A duration: a bare number is seconds ("10"), else humantime ("10s",
/// "5m", "1h 30m", "7d").
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("'{s}' is not a duration: give seconds (e.g. 90) or a duration such as 90s, 5m, 1h, 7d ({e})")
    })
}

/// A retention limit that can be switched off: a value, or "none".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit<T> {
    /// No limit (sent as JSON null).
    Off,
    On(T),
}

fn is_off(s: &str) -> bool {
    matches!(
        s.trim().to_ascii_lowercase().as_str(),
        "none" | "off" | "unlimited"
    )
}

pub fn count_limit(s: &str) -> Result<Limit<u32>, String> {
    if is_off(s) {
        return Ok(Limit::Off);
    }
    s.trim()
        .parse()
        .map(Limit::On)
        .map_err(|_| format!("'{s}' is not a count: give a number, or none for no limit"))
}

pub fn age_limit(s: &str) -> Result<Limit<Duration>, String> {
    if is_off(s) {
        return Ok(Limit::Off);
    }
    duration(s)
        .map(Limit::On)
        .map_err(|e| format!("{e}; or none for no limit"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_bare_number_is_seconds_and_units_work_too() {
        assert_eq!(duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("7d"), Ok(Duration::from_secs(604800)));
        let err = duration("soon").unwrap_err();
        assert!(err.contains("'soon' is not a duration"), "{err}");
        assert!(duration("-5").is_err());
    }

    #[test]
    fn limits_can_be_switched_off() {
        assert_eq!(count_limit("3"), Ok(Limit::On(3)));
        assert_eq!(count_limit("none"), Ok(Limit::Off));
        assert_eq!(count_limit("Unlimited"), Ok(Limit::Off));
        assert!(count_limit("many").unwrap_err().contains("'many'"));
        assert_eq!(age_limit("1h"), Ok(Limit::On(Duration::from_secs(3600))));
        assert_eq!(age_limit("600"), Ok(Limit::On(Duration::from_secs(600))));
        assert_eq!(age_limit("off"), Ok(Limit::Off));
        assert!(age_limit("later").is_err());
    }
}
