//! Money as integer micro-USD.
//!
//! Invariant: no amount ever passes through a float on its way in. JSON numbers are read
//! from their text (serde_json's `RawValue`) and converted exactly; more than six
//! decimals, or more than [`MAX_USD`] in magnitude, is an input error. On the way out a
//! micro-USD integer is printed as a JSON number with at most six decimals.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

pub const MICROS_PER_USD: i64 = 1_000_000;

/// The largest amount accepted anywhere, in USD (one billion).
pub const MAX_USD: i64 = 1_000_000_000;
pub const MAX_MICROS: i64 = MAX_USD * MICROS_PER_USD;

/// The largest total kept anywhere (a key's spent and credited micro-USD, its requests
/// and tokens): 2^53 − 1, about 9 billion USD. Every integer up to it is exact as a
/// double, so the Lua scripts (whose numbers are doubles) and JSON readers that parse
/// numbers as doubles (JavaScript) see these values exactly, and a sum of two of them
/// still fits an i64. A change that would take a total past it is refused, never
/// wrapped or rounded.
pub const MAX_TOTAL: i64 = (1 << 53) - 1;

/// The largest cost one report may carry: 1,000,000 USD. No single LLM request costs
/// anywhere near that, so a larger value is a mistake or an attack (one forged report
/// once charged 1e9 USD), and with it a live balance needs billions of reports to
/// approach [`MAX_TOTAL`].
pub const MAX_REPORT_MICROS: i64 = 1_000_000 * MICROS_PER_USD;

/// `value` held within ±[`MAX_TOTAL`]: the live balance of the counter stores. Past
/// either end a key is far beyond exhausted, or credited far beyond any use, so holding
/// it there loses nothing that matters, and keeps every value exact in the Lua scripts
/// (which clamp the same way) and every sum of two of them inside an i64.
pub fn bounded(value: i128) -> i64 {
    value.clamp(-i128::from(MAX_TOTAL), i128::from(MAX_TOTAL)) as i64
}

/// An amount of USD, held as integer micro-USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Usd(pub i64);

impl Usd {
    pub fn micros(self) -> i64 {
        self.0
    }
}

/// Parses the text of a JSON number into micro-USD, exactly.
///
/// ```
/// assert_eq!(keyward::money::parse_usd("12.5"), Ok(12_500_000));
/// assert_eq!(keyward::money::parse_usd("1e-6"), Ok(1));
/// assert!(keyward::money::parse_usd("0.0000001").is_err()); // finer than a micro-USD
/// ```
pub fn parse_usd(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => {
            let exp: i32 = unsigned[i + 1..]
                .parse()
                .map_err(|_| format!("`{text}` is not a number"))?;
            (&unsigned[..i], exp)
        }
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int_part.is_empty() || !all_digits(int_part) || !all_digits(frac_part) {
        return Err(format!("`{text}` is not a number"));
    }
    // value = digits × 10^(exponent − frac_len); in micros: digits × 10^(exponent − frac_len + 6)
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let scale = i64::from(exponent) - frac_part.len() as i64 + 6;
    let too_precise = || format!("`{text}` has more than 6 decimal places");
    let too_large = || format!("`{text}` is out of range (at most {MAX_USD} USD)");
    let micros: i64 = if digits.is_empty() {
        0
    } else if scale >= 0 {
        if digits.len() as i64 + scale > 19 {
            return Err(too_large());
        }
        let base: i64 = digits.parse().map_err(|_| too_large())?;
        base.checked_mul(10_i64.pow(scale as u32))
            .ok_or_else(too_large)?
    } else {
        let cut = (-scale) as usize;
        if cut >= digits.len() {
            return Err(too_precise());
        }
        let (keep, drop) = digits.split_at(digits.len() - cut);
        if drop.bytes().any(|b| b != b'0') {
            return Err(too_precise());
        }
        if keep.len() > 19 {
            return Err(too_large());
        }
        keep.parse().map_err(|_| too_large())?
    };
    if micros > MAX_MICROS {
        return Err(too_large());
    }
    Ok(if negative { -micros } else { micros })
}

/// Formats micro-USD as decimal text with at most six decimals.
///
/// ```
/// assert_eq!(keyward::money::format_usd(1_500_000), "1.5");
/// assert_eq!(keyward::money::format_usd(-1), "-0.000001");
/// ```
pub fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let whole = abs / MICROS_PER_USD as u64;
    let frac = abs % MICROS_PER_USD as u64;
    if frac == 0 {
        format!("{sign}{whole}")
    } else {
        let frac = format!("{frac:06}");
        format!("{sign}{whole}.{}", frac.trim_end_matches('0'))
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        let text = raw.get();
        if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            return Err(D::Error::custom(format!(
                "expected a USD amount as a JSON number, found {}",
                json_kind(text)
            )));
        }
        parse_usd(text).map(Usd).map_err(D::Error::custom)
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The decimal text is emitted as a raw JSON number, so no float rounding happens.
        match RawValue::from_string(format_usd(self.0)) {
            Ok(raw) => raw.serialize(serializer),
            Err(e) => Err(serde::ser::Error::custom(e)),
        }
    }
}

fn json_kind(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "something else",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_usd("0"), Ok(0));
        assert_eq!(parse_usd("1"), Ok(1_000_000));
        assert_eq!(parse_usd("0.1"), Ok(100_000));
        assert_eq!(parse_usd("12.345678"), Ok(12_345_678));
        assert_eq!(parse_usd("-0.000001"), Ok(-1));
        assert_eq!(parse_usd("1e-6"), Ok(1));
        assert_eq!(parse_usd("2.5E2"), Ok(250_000_000));
        assert_eq!(parse_usd("0.1000000"), Ok(100_000));
        assert_eq!(parse_usd("1000000000"), Ok(MAX_MICROS));
    }

    #[test]
    fn rejects_precision_range_and_garbage() {
        assert!(parse_usd("0.0000001").is_err());
        assert!(parse_usd("1e-7").is_err());
        assert!(parse_usd("1000000000.000001").is_err());
        assert!(parse_usd("1e300").is_err());
        assert!(parse_usd("99999999999999999999999").is_err());
        assert!(parse_usd("abc").is_err());
        assert!(parse_usd(".5").is_err());
        assert!(parse_usd("1.2.3").is_err());
    }

    #[test]
    fn bounds_hold_exactly() {
        assert_eq!(MAX_TOTAL as f64 as i64, MAX_TOTAL);
        assert_eq!(bounded(i128::from(i64::MAX) * 2), MAX_TOTAL);
        assert_eq!(bounded(-i128::from(i64::MAX) * 2), -MAX_TOTAL);
        assert_eq!(bounded(-5), -5);
        const { assert!(MAX_MICROS < MAX_TOTAL && MAX_REPORT_MICROS < MAX_MICROS) };
    }

    #[test]
    fn formats_without_float_noise() {
        assert_eq!(format_usd(0), "0");
        assert_eq!(format_usd(100_000), "0.1");
        assert_eq!(format_usd(12_345_678), "12.345678");
        assert_eq!(format_usd(-1), "-0.000001");
        assert_eq!(format_usd(3_000_000), "3");
    }

    #[test]
    fn serde_round_trip() {
        #[derive(Deserialize, Serialize)]
        struct W {
            a: Option<Usd>,
        }
        let w: W = serde_json::from_str(r#"{"a": 0.3}"#).unwrap();
        assert_eq!(w.a, Some(Usd(300_000)));
        assert_eq!(serde_json::to_string(&w).unwrap(), r#"{"a":0.3}"#);
        let w: W = serde_json::from_str(r#"{"a": null}"#).unwrap();
        assert_eq!(w.a, None);
        assert!(serde_json::from_str::<W>(r#"{"a": "1"}"#).is_err());
        assert!(serde_json::from_str::<W>(r#"{"a": true}"#).is_err());
    }
}
