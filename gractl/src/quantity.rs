//! Resource quantities as people type them, Kubernetes-style: CPU (`2`, `0.5`,
//! `500m`), sizes (`512Mi`, `4Gi`, `1G`, plain bytes) and durations (`30s`,
//! `500ms`, `2m`). Used by flags (through `FromStr`) and by the workspace config
//! (through `Deserialize`), so both reject the same values with the same words.

use std::{fmt, marker::PhantomData, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, de};

/// Why a quantity did not parse; the caller names the flag or field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("expected a CPU amount like 2, 0.5 or 500m")]
    Cpu,
    #[error("expected a size like 512Mi, 4Gi or 1G")]
    Size,
    #[error("expected a duration like 30s, 500ms, 2m or 1h")]
    Duration,
}

/// CPU in thousandths of a core, as the API carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu(pub u32);

impl Cpu {
    pub fn millis(self) -> u32 {
        self.0
    }
}

impl FromStr for Cpu {
    type Err = QuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let millis = match text.strip_suffix('m') {
            Some(millis) => decimal(millis, 1).ok_or(QuantityError::Cpu)?,
            None => decimal(text, 1000).ok_or(QuantityError::Cpu)?,
        };
        // Fractions of a millicore cannot be requested: reject rather than round.
        if millis.ceil != millis.floor {
            return Err(QuantityError::Cpu);
        }
        u32::try_from(millis.floor)
            .map(Cpu)
            .map_err(|_| QuantityError::Cpu)
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

/// A number of bytes (memory, storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

const BINARY: [(&str, u64); 5] = [
    ("Pi", 1 << 50),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
];

const DECIMAL: [(&str, u64); 6] = [
    ("P", 1_000_000_000_000_000),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("k", 1_000),
    ("K", 1_000),
];

impl FromStr for Size {
    type Err = QuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (number, multiplier) = BINARY
            .iter()
            .chain(DECIMAL.iter())
            .find_map(|(suffix, multiplier)| {
                text.strip_suffix(suffix)
                    .map(|number| (number, *multiplier))
            })
            .unwrap_or((text, 1));
        let bytes = decimal(number, multiplier).ok_or(QuantityError::Size)?;
        // Kubernetes rounds fractional bytes up (1.1Ki is 1127 bytes, not 1126).
        u64::try_from(bytes.ceil)
            .map(Size)
            .map_err(|_| QuantityError::Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (suffix, multiplier) in BINARY.iter().chain(DECIMAL.iter()) {
                if *suffix != "K" && self.0.is_multiple_of(*multiplier) {
                    return write!(f, "{}{suffix}", self.0 / multiplier);
                }
            }
        }
        write!(f, "{}", self.0)
    }
}

/// `number * multiplier`, rounded both ways, for a plain decimal number
/// (`2`, `0.5`, `.5`); `None` for anything else (signs, exponents, empty).
struct Scaled {
    floor: u128,
    ceil: u128,
}

fn decimal(number: &str, multiplier: u64) -> Option<Scaled> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 18
        || whole.len() > 20
    {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let numerator = digits
        .parse::<u128>()
        .ok()?
        .checked_mul(u128::from(multiplier))?;
    let denominator = 10u128.pow(u32::try_from(fraction.len()).ok()?);
    let floor = numerator / denominator;
    let ceil = floor + u128::from(numerator % denominator != 0);
    Some(Scaled { floor, ceil })
}

/// Parses `500ms`, `30s`, `2m`, `1h`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, QuantityError> {
    let text = text.trim();
    let (number, unit_millis) = [("ms", 1), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
        .iter()
        .find_map(|(suffix, millis)| text.strip_suffix(suffix).map(|n| (n, *millis)))
        .unwrap_or((text, 1000));
    let millis = decimal(number, unit_millis).ok_or(QuantityError::Duration)?;
    u64::try_from(millis.ceil)
        .map(Duration::from_millis)
        .map_err(|_| QuantityError::Duration)
}

/// Accepts a YAML string or number, so `cpu: 2`, `cpu: 0.5` and `cpu: "500m"`
/// all work, and reports a bad one as `invalid value "two": expected ...`.
fn deserialize_quantity<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = QuantityError>,
{
    // The value is checked inside the visitor so the deserializer attaches
    // the field's own path and position to the error.
    struct Quantity<T>(PhantomData<T>);

    impl<T: FromStr<Err = QuantityError>> de::Visitor<'_> for Quantity<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a quantity such as 2, 500m or 4Gi")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
            text.parse()
                .map_err(|error| E::custom(format!("invalid value {text:?}: {error}")))
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<T, E> {
            self.visit_str(&value.to_string())
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<T, E> {
            self.visit_str(&value.to_string())
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<T, E> {
            self.visit_str(&value.to_string())
        }
    }

    deserializer.deserialize_any(Quantity(PhantomData))
}

impl<'de> Deserialize<'de> for Cpu {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_quantity(deserializer)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_quantity(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_accepts_cores_fractions_and_millicores() {
        for (text, millis) in [
            ("2", 2000),
            ("0.5", 500),
            (".5", 500),
            ("1.25", 1250),
            ("500m", 500),
            ("1m", 1),
            ("2.0", 2000),
            (" 3 ", 3000),
        ] {
            assert_eq!(text.parse::<Cpu>(), Ok(Cpu(millis)), "{text}");
        }
    }

    #[test]
    fn cpu_rejects_words_units_signs_and_fractions_of_a_millicore() {
        for text in [
            "", "two", "2 cores", "-1", "+1", "1e3", "0.0001", "0.5m", "2Gi", ".", "..", "99999999",
        ] {
            assert_eq!(text.parse::<Cpu>(), Err(QuantityError::Cpu), "{text:?}");
        }
    }

    #[test]
    fn sizes_accept_binary_and_decimal_suffixes() {
        for (text, bytes) in [
            ("1024", 1024),
            ("512Mi", 512 << 20),
            ("4Gi", 4 << 30),
            ("1Ti", 1 << 40),
            ("2Ki", 2048),
            ("1G", 1_000_000_000),
            ("1M", 1_000_000),
            ("1k", 1000),
            ("1K", 1000),
            ("1T", 1_000_000_000_000),
            ("1.5Gi", 3 << 29),
            ("1.1Ki", 1127),
        ] {
            assert_eq!(text.parse::<Size>(), Ok(Size(bytes)), "{text}");
        }
    }

    #[test]
    fn sizes_reject_other_spellings() {
        for text in [
            "4GB",
            "4gi",
            "4 Gi",
            "Gi",
            "",
            "-1Gi",
            "1e9",
            "four",
            "1Gib",
            "100000000000Pi",
        ] {
            assert_eq!(text.parse::<Size>(), Err(QuantityError::Size), "{text:?}");
        }
    }

    #[test]
    fn quantities_print_in_their_shortest_exact_form() {
        assert_eq!(Cpu(2000).to_string(), "2");
        assert_eq!(Cpu(500).to_string(), "500m");
        assert_eq!(Cpu(1500).to_string(), "1500m");
        assert_eq!(Size(4 << 30).to_string(), "4Gi");
        assert_eq!(Size(512 << 20).to_string(), "512Mi");
        assert_eq!(Size(1_000_000_000).to_string(), "1G");
        assert_eq!(Size(1000).to_string(), "1k");
        assert_eq!(Size(1023).to_string(), "1023");
        assert_eq!(Size(0).to_string(), "0");
    }

    #[test]
    fn durations_accept_common_units_and_plain_seconds() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("soon"), Err(QuantityError::Duration));
        assert_eq!(parse_duration("-1s"), Err(QuantityError::Duration));
    }
}
