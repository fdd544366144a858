//! Durations ("30s") and byte sizes ("64MiB") as written in the config file: parsing,
//! formatting for messages, and serde `Deserialize` for both.
//!
//! A bare number is never accepted: `keep_alive = 30` could mean seconds or minutes,
//! and `max_bytes = 256` could mean bytes or MiB, so the unit must always be written.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use thiserror::Error;

/// The accepted duration forms, for error messages and hints.
pub const DURATION_FORMS: &str =
    r#"a whole number followed by ms, s, m or h, e.g. "500ms", "30s", "5m", "1h""#;

/// The accepted byte size forms, for error messages and hints.
pub const SIZE_FORMS: &str = r#"a whole number followed by B, KiB, MiB, GiB or TiB (or kB, MB, GB, TB for powers of 1000), e.g. "512KiB", "64MiB""#;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Why a duration or byte size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UnitError {
    /// The string is empty (or only spaces).
    #[error("the value is empty")]
    Empty,
    /// The string does not start with a whole number.
    #[error("`{text}` does not start with a whole number")]
    MissingNumber {
        /// The rejected string.
        text: String,
    },
    /// A number with a fractional part: only whole numbers are accepted.
    #[error("`{text}` is not a whole number")]
    Fraction {
        /// The rejected string.
        text: String,
    },
    /// A number without a unit.
    #[error("`{text}` has no unit")]
    MissingUnit {
        /// The rejected string.
        text: String,
    },
    /// A unit this parser does not know.
    #[error("`{unit}` is not a known unit")]
    UnknownUnit {
        /// The unit as written.
        unit: String,
    },
    /// The value does not fit (more than 2^64 bytes, or an absurd duration).
    #[error("`{text}` is too large")]
    TooLarge {
        /// The rejected string.
        text: String,
    },
}

/// Parses a duration written as a whole number and a unit: `ms`, `s`, `m` or `h`
/// (`"500ms"`, `"30s"`, `"5m"`, `"1h"`). A space between number and unit is allowed.
///
/// # Errors
/// A [`UnitError`] naming what is wrong; [`DURATION_FORMS`] describes what is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let (number, unit) = split_number(text)?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => {
            return Err(UnitError::MissingUnit {
                text: text.trim().to_owned(),
            });
        }
        other => {
            return Err(UnitError::UnknownUnit {
                unit: other.to_owned(),
            });
        }
    };
    number
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| UnitError::TooLarge {
            text: text.trim().to_owned(),
        })
}

/// Parses a byte size written as a whole number and a unit: `B`, `KiB`, `MiB`, `GiB`,
/// `TiB` (powers of 1024) or `kB`, `MB`, `GB`, `TB` (powers of 1000). Units are
/// case-insensitive; a space between number and unit is allowed.
///
/// # Errors
/// A [`UnitError`] naming what is wrong; [`SIZE_FORMS`] describes what is accepted.
pub fn parse_byte_size(text: &str) -> Result<u64, UnitError> {
    let (number, unit) = split_number(text)?;
    let bytes_per_unit: u64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => TIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "" => {
            return Err(UnitError::MissingUnit {
                text: text.trim().to_owned(),
            });
        }
        _ => {
            return Err(UnitError::UnknownUnit {
                unit: unit.to_owned(),
            });
        }
    };
    number
        .checked_mul(bytes_per_unit)
        .ok_or_else(|| UnitError::TooLarge {
            text: text.trim().to_owned(),
        })
}

/// Splits `" 30 s "` into `(30, "s")`. The unit is returned as written.
fn split_number(text: &str) -> Result<(u64, &str), UnitError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(UnitError::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits_end == 0 {
        return Err(UnitError::MissingNumber {
            text: text.to_owned(),
        });
    }
    let (digits, unit) = text.split_at(digits_end);
    if unit.starts_with(['.', ',']) {
        return Err(UnitError::Fraction {
            text: text.to_owned(),
        });
    }
    let number = digits.parse().map_err(|_| UnitError::TooLarge {
        text: text.to_owned(),
    })?;
    Ok((number, unit.trim_start()))
}

/// Writes a duration the way the config file does: `"1h"`, `"5m"`, `"30s"`, `"250ms"`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    match millis {
        0 => "0s".to_owned(),
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1_000 == 0 => format!("{}s", m / 1_000),
        m => format!("{m}ms"),
    }
}

/// Writes a byte size with the largest binary unit that divides it: `"16MiB"`, `"45B"`.
pub fn format_byte_size(bytes: u64) -> String {
    [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")]
        .into_iter()
        .find(|(unit, _)| bytes != 0 && bytes.is_multiple_of(*unit))
        .map_or_else(
            || format!("{bytes}B"),
            |(unit, name)| format!("{}{name}", bytes / unit),
        )
}

/// A [`Duration`] read from a string such as `"30s"` (see [`parse_duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(UnitVisitor {
            what: "duration",
            forms: DURATION_FORMS,
            parse: |text| parse_duration(text).map(HumanDuration),
        })
    }
}

/// A number of bytes read from a string such as `"64MiB"` (see [`parse_byte_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(UnitVisitor {
            what: "size",
            forms: SIZE_FORMS,
            parse: |text| parse_byte_size(text).map(ByteSize),
        })
    }
}

/// A plain whole number (a count or a rate), written without quotes: `1000`.
///
/// Range checks belong to each key; this type only rejects what is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Count(pub i64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_i64(CountVisitor)
    }
}

struct CountVisitor;

impl Visitor<'_> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number without quotes, e.g. 1000")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Count, E> {
        Ok(Count(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Count, E> {
        i64::try_from(value)
            .map(Count)
            .map_err(|_| E::custom(format_args!("{value} is too large")))
    }
}

/// Visits a string and parses it; anything else (a bare number in particular) is an
/// "invalid type" error whose "expected" part names the accepted forms.
struct UnitVisitor<T> {
    what: &'static str,
    forms: &'static str,
    parse: fn(&str) -> Result<T, UnitError>,
}

impl<T> Visitor<'_> for UnitVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} in quotes: {}", self.what, self.forms)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.parse)(text).map_err(|err| {
            E::custom(format_args!(
                "invalid {} {text:?}: {err}; write {}",
                self.what, self.forms
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 5 m "), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_without_a_known_unit_are_rejected() {
        assert_eq!(
            parse_duration("30 secs"),
            Err(UnitError::UnknownUnit {
                unit: "secs".into()
            })
        );
        assert_eq!(
            parse_duration("30"),
            Err(UnitError::MissingUnit { text: "30".into() })
        );
        assert_eq!(
            parse_duration("1.5s"),
            Err(UnitError::Fraction {
                text: "1.5s".into()
            })
        );
        assert_eq!(
            parse_duration("-1s"),
            Err(UnitError::MissingNumber { text: "-1s".into() })
        );
        assert_eq!(parse_duration(""), Err(UnitError::Empty));
        assert!(matches!(
            parse_duration("99999999999999999999h"),
            Err(UnitError::TooLarge { .. })
        ));
    }

    #[test]
    fn sizes_in_binary_and_decimal_units_parse() {
        assert_eq!(parse_byte_size("512B"), Ok(512));
        assert_eq!(parse_byte_size("256KiB"), Ok(262_144));
        assert_eq!(parse_byte_size("64mib"), Ok(64 << 20));
        assert_eq!(parse_byte_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_byte_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_byte_size("64MB"), Ok(64_000_000));
        assert_eq!(parse_byte_size("3kB"), Ok(3_000));
    }

    #[test]
    fn sizes_without_a_known_unit_are_rejected() {
        assert_eq!(
            parse_byte_size("12XB"),
            Err(UnitError::UnknownUnit { unit: "XB".into() })
        );
        assert_eq!(
            parse_byte_size("4096"),
            Err(UnitError::MissingUnit {
                text: "4096".into()
            })
        );
        assert_eq!(
            parse_byte_size("MiB"),
            Err(UnitError::MissingNumber { text: "MiB".into() })
        );
        assert!(matches!(
            parse_byte_size("99999999TiB"),
            Err(UnitError::TooLarge { .. })
        ));
    }

    #[test]
    fn formatting_uses_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_byte_size(16 << 20), "16MiB");
        assert_eq!(format_byte_size(262_144), "256KiB");
        assert_eq!(format_byte_size(45), "45B");
        assert_eq!(format_byte_size(0), "0B");
    }

    #[test]
    fn formatted_values_parse_back() {
        for millis in [1, 999, 1_000, 60_000, 3_600_000, 5_400_000] {
            let d = Duration::from_millis(millis);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        for bytes in [1, 45, 1024, 262_144, 16 << 20, 3 << 30] {
            assert_eq!(parse_byte_size(&format_byte_size(bytes)), Ok(bytes));
        }
    }
}
