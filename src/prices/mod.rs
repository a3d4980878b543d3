//! Prices of models, and what a request's tokens cost.
//!
//! (Over 400 lines because its unit tests, about 200, sit beside the cost arithmetic
//! and the price lookup they check; the code itself is under 300.)
//!
//! - [`store`]: the SQL (`model_prices`, keyed by provider and model).
//! - [`cache`]: per provider, all its prices, loaded once and served from memory.
//! - [`Prices`]: the admin operations, the start-up load of `KEYWARD_PRICES_FILE`, and
//!   [`Prices::price_of`], the lookup the report path uses.
//!
//! Money is integer micro-USD, never a float. A price is micro-USD per million tokens,
//! read from its JSON number's text ([`crate::money::Usd`]), at most six decimals and at
//! most [`MAX_PRICE_MICROS`].
//!
//! **Which price a model gets** ([`lookup`]): its own, if it has one; else the longest
//! priced prefix of its id that ends just before a `-`. So `gpt-4o-2024-08-06` takes the
//! price of `gpt-4o-2024-08`, else `gpt-4o-2024`, else `gpt-4o`, else `gpt`; and `gpt-4o`
//! never takes `gpt-4`'s (that is not a prefix ending at a `-`). The rule does not know
//! dates from names: `gpt-4o-mini` takes `gpt-4o`'s price unless `gpt-4o-mini` is priced
//! itself, so price every model family you use (the longest prefix wins, so
//! `gpt-4o-mini-2024-07-18` then takes `gpt-4o-mini`'s).
//!
//! **Cost** ([`cost_micros`]): the sum of uncached input × input price, cached input ×
//! cached price, cache writes × cache-write price and output × output price, exact in
//! `i128`, divided by one million and rounded **up** (1 token at 0.15 USD per million
//! tokens costs 1 micro-USD, not 0).
//!
//! *Invariant (no overflow):* a price is at most [`MAX_PRICE_MICROS`] (10^12) and a token
//! count at most [`MAX_COST_TOKENS`] (10^12), so each product is at most 10^24 and the
//! sum of four at most 4·10^24, far inside `i128` (about 1.7·10^38). A cost above
//! [`crate::money::MAX_REPORT_MICROS`] (one request may not cost more than 1,000,000
//! USD) is refused ([`CostError::TooLarge`]), never wrapped or clamped silently.

pub mod cache;
pub mod service;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::to_rfc3339;
use crate::money::{format_usd, Usd, MAX_REPORT_MICROS, MICROS_PER_USD};
use crate::usage::parse::Usage;

pub use cache::PriceCache;
pub use service::{PriceError, Prices};

/// The highest price accepted: 1,000,000 USD per million tokens, in micro-USD.
pub const MAX_PRICE_MICROS: i64 = 1_000_000 * MICROS_PER_USD;

/// The most tokens of one class one cost is computed for (the usage parser's bound).
pub const MAX_COST_TOKENS: i64 = crate::usage::parse::MAX_TOKENS;

/// Tokens per price unit.
const PER: i128 = 1_000_000;

/// A model's price: micro-USD per million tokens of each class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: i64,
    pub output: i64,
    /// Cached input reads; `None` = the input price.
    pub cached_input: Option<i64>,
    /// Prompt-cache writes; `None` = the input price.
    pub cache_write: Option<i64>,
}

impl Price {
    pub fn cached_input(&self) -> i64 {
        self.cached_input.unwrap_or(self.input)
    }

    pub fn cache_write(&self) -> i64 {
        self.cache_write.unwrap_or(self.input)
    }
}

/// A price as the admin API and `KEYWARD_PRICES_FILE` give it (USD per million tokens).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceInput {
    pub input_per_mtok_usd: Usd,
    pub output_per_mtok_usd: Usd,
    #[serde(default)]
    pub cached_input_per_mtok_usd: Option<Usd>,
    #[serde(default)]
    pub cache_write_per_mtok_usd: Option<Usd>,
}

impl PriceInput {
    /// The price, when every part is from 0 to [`MAX_PRICE_MICROS`].
    pub fn validate(&self) -> Result<Price, String> {
        let check = |name: &str, Usd(m): Usd| {
            if (0..=MAX_PRICE_MICROS).contains(&m) {
                Ok(m)
            } else {
                Err(format!(
                    "{name} must be from 0 to {} (USD per million tokens)",
                    format_usd(MAX_PRICE_MICROS)
                ))
            }
        };
        Ok(Price {
            input: check("input_per_mtok_usd", self.input_per_mtok_usd)?,
            output: check("output_per_mtok_usd", self.output_per_mtok_usd)?,
            cached_input: self
                .cached_input_per_mtok_usd
                .map(|p| check("cached_input_per_mtok_usd", p))
                .transpose()?,
            cache_write: self
                .cache_write_per_mtok_usd
                .map(|p| check("cache_write_per_mtok_usd", p))
                .transpose()?,
        })
    }
}

/// A stored price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    pub provider: String,
    pub model: String,
    pub price: Price,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The admin API's view of a price: every class with the price it is charged at (a
/// class given no price of its own shows the input price).
#[derive(Debug, Serialize)]
pub struct PriceView<'a> {
    pub provider: &'a str,
    pub model: &'a str,
    pub input_per_mtok_usd: Usd,
    pub output_per_mtok_usd: Usd,
    pub cached_input_per_mtok_usd: Usd,
    pub cache_write_per_mtok_usd: Usd,
    pub created_at: String,
    pub updated_at: String,
}

impl ModelPrice {
    pub fn view(&self) -> PriceView<'_> {
        PriceView {
            provider: &self.provider,
            model: &self.model,
            input_per_mtok_usd: Usd(self.price.input),
            output_per_mtok_usd: Usd(self.price.output),
            cached_input_per_mtok_usd: Usd(self.price.cached_input()),
            cache_write_per_mtok_usd: Usd(self.price.cache_write()),
            created_at: to_rfc3339(self.created_at),
            updated_at: to_rfc3339(self.updated_at),
        }
    }
}

/// The price `model` gets among one provider's `prices`: its own, else that of the
/// longest prefix of its id that ends just before a `-` (see the module docs).
pub fn lookup<'a>(prices: &'a BTreeMap<String, Price>, model: &str) -> Option<&'a Price> {
    crate::names::longest_prefix(prices, model).map(|(_, price)| price)
}

/// Why a cost could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostError {
    #[error("token counts must be from 0 to {MAX_COST_TOKENS}, and cached input plus cache writes at most the input")]
    BadUsage,
    #[error(
        "the tokens' cost at this price is above {} USD, the most one request may cost",
        format_usd(MAX_REPORT_MICROS)
    )]
    TooLarge,
}

/// What `usage` costs at `price`, in micro-USD, rounded up (see the module docs).
pub fn cost_micros(price: &Price, usage: &Usage) -> Result<i64, CostError> {
    let tokens = [
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.output_tokens,
    ];
    if tokens.iter().any(|t| !(0..=MAX_COST_TOKENS).contains(t)) {
        return Err(CostError::BadUsage);
    }
    let uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens;
    if uncached < 0 {
        return Err(CostError::BadUsage);
    }
    let prices = [
        price.input,
        price.cached_input(),
        price.cache_write(),
        price.output,
    ];
    if prices.iter().any(|p| !(0..=MAX_PRICE_MICROS).contains(p)) {
        // Only a price that skipped validation (none does) could get here.
        return Err(CostError::TooLarge);
    }
    let counts = [
        uncached,
        usage.cached_input_tokens,
        usage.cache_write_tokens,
        usage.output_tokens,
    ];
    // Each product ≤ 10^24, the sum ≤ 4·10^24: exact in i128 (checked all the same).
    let total = counts
        .iter()
        .zip(prices)
        .try_fold(0i128, |sum, (&n, p)| {
            sum.checked_add(i128::from(n).checked_mul(i128::from(p))?)
        })
        .ok_or(CostError::TooLarge)?;
    let micros = (total + PER - 1) / PER;
    if micros > i128::from(MAX_REPORT_MICROS) {
        return Err(CostError::TooLarge);
    }
    Ok(micros as i64)
}

/// A bad `KEYWARD_PRICES_FILE`: what is wrong, in one line.
pub type FileError = String;

/// Reads `KEYWARD_PRICES_FILE`'s JSON: an object keyed by `provider/model` (the model is
/// everything after the first `/`, and may hold more), each value a [`PriceInput`].
pub fn parse_file(text: &str) -> Result<Vec<(String, String, Price)>, FileError> {
    let entries: BTreeMap<String, PriceInput> = serde_json::from_str(text)
        .map_err(|e| format!("not a JSON object of prices keyed by provider/model: {e}"))?;
    let mut out = Vec::with_capacity(entries.len());
    for (key, input) in entries {
        let (provider, model) =
            split_name(&key).map_err(|why| format!("entry `{}`: {why}", key.escape_debug()))?;
        let price = input
            .validate()
            .map_err(|why| format!("entry `{}`: {why}", key.escape_debug()))?;
        out.push((provider, model, price));
    }
    Ok(out)
}

/// `provider/model` split and checked like the admin API's path.
fn split_name(key: &str) -> Result<(String, String), String> {
    let (provider, model) = key
        .split_once('/')
        .ok_or("the key must be provider/model")?;
    let provider = check_provider(provider)?;
    let model = check_model(model)?;
    Ok((provider.to_string(), model.to_string()))
}

/// A provider name as prices are keyed: the pool's alphabet.
pub fn check_provider(provider: &str) -> Result<&str, String> {
    if crate::pool::valid_provider(provider) {
        Ok(provider)
    } else {
        Err("the provider must be 1 to 64 of A-Z, a-z, 0-9, ., _ and -".into())
    }
}

/// A model name as prices are keyed: the names rule, not empty.
pub fn check_model(model: &str) -> Result<&str, String> {
    match crate::names::check("model", model) {
        Ok(m) if !m.is_empty() => Ok(m),
        Ok(_) => Err("the model must not be empty".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Errors of the price operations.
#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: i64, output: i64) -> Price {
        Price {
            input,
            output,
            cached_input: None,
            cache_write: None,
        }
    }

    fn table(models: &[(&str, i64)]) -> BTreeMap<String, Price> {
        models
            .iter()
            .map(|(m, p)| (m.to_string(), price(*p, *p)))
            .collect()
    }

    #[test]
    fn exact_then_longest_prefix_at_a_dash() {
        let t = table(&[
            ("gpt-4o", 1),
            ("gpt-4", 2),
            ("gpt-4o-2024", 3),
            ("claude", 4),
        ]);
        assert_eq!(lookup(&t, "gpt-4o").unwrap().input, 1);
        assert_eq!(lookup(&t, "gpt-4").unwrap().input, 2);
        // Longest priced prefix wins.
        assert_eq!(lookup(&t, "gpt-4o-2024-08-06").unwrap().input, 3);
        assert_eq!(lookup(&t, "gpt-4o-mini").unwrap().input, 1);
        assert_eq!(lookup(&t, "gpt-4-turbo-2024-04-09").unwrap().input, 2);
        assert_eq!(lookup(&t, "claude-3-5-sonnet-latest").unwrap().input, 4);
        // `gpt-4` is a prefix of `gpt-4o`'s text, but not one that ends at a dash.
        let only_4 = table(&[("gpt-4", 2)]);
        assert_eq!(lookup(&only_4, "gpt-4o"), None);
        assert_eq!(lookup(&only_4, "gpt-4o-2024-08-06"), None);
        assert_eq!(lookup(&only_4, "gpt"), None);
        assert_eq!(lookup(&only_4, "gpt-"), None);
        // Model ids with slashes and non-ASCII text are plain text to the rule.
        let t = table(&[("accounts/x/models/llama-v3", 5)]);
        assert_eq!(
            lookup(&t, "accounts/x/models/llama-v3-8b").unwrap().input,
            5
        );
        assert_eq!(lookup(&t, "é-é"), None);
    }

    fn usage(input: i64, cached: i64, writes: i64, output: i64) -> Usage {
        Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            cache_write_tokens: writes,
            output_tokens: output,
            reasoning_tokens: 0,
        }
    }

    #[test]
    fn cost_is_exact_and_rounded_up() {
        // 0.15 USD per million tokens: one token is 0.15 micro-USD → 1.
        let p = price(150_000, 600_000);
        assert_eq!(cost_micros(&p, &usage(1, 0, 0, 0)), Ok(1));
        assert_eq!(cost_micros(&p, &usage(0, 0, 0, 0)), Ok(0));
        // 1M input at 0.15 + 1M output at 0.6 = 0.75 USD exactly.
        assert_eq!(
            cost_micros(&p, &usage(1_000_000, 0, 0, 1_000_000)),
            Ok(750_000)
        );
        // 7 input × 0.15 + 3 output × 0.6 = 1.05 + 1.8 = 2.85 micro → 3 (one rounding,
        // of the sum, not one per class).
        assert_eq!(cost_micros(&p, &usage(7, 0, 0, 3)), Ok(3));
        // Cached reads and writes at their own prices, the rest of the input at its own.
        let p = Price {
            input: 3_000_000,
            output: 15_000_000,
            cached_input: Some(300_000),
            cache_write: Some(3_750_000),
        };
        // 1000 uncached × 3 USD + 2000 cached × 0.3 + 500 writes × 3.75 + 100 output × 15,
        // per million tokens: (3e9 + 6e8 + 1.875e9 + 1.5e9) micro-USD / 10^6 = 6975.
        assert_eq!(cost_micros(&p, &usage(3_500, 2_000, 500, 100)), Ok(6_975));
        // Without their own prices, cached input and cache writes cost the input price.
        let p = price(2_000_000, 0);
        assert_eq!(cost_micros(&p, &usage(1_000, 600, 400, 0)), Ok(2_000));
    }

    #[test]
    fn cost_is_bounded_and_never_wraps() {
        let most = price(MAX_PRICE_MICROS, MAX_PRICE_MICROS);
        let big = MAX_COST_TOKENS;
        assert_eq!(
            cost_micros(&most, &usage(big, 0, 0, big)),
            Err(CostError::TooLarge)
        );
        // One million USD exactly is allowed, a micro-USD more is not.
        let one_usd_per_token = price(MICROS_PER_USD * 1_000_000, 0);
        assert_eq!(
            cost_micros(&one_usd_per_token, &usage(1_000_000, 0, 0, 0)),
            Ok(MAX_REPORT_MICROS)
        );
        assert_eq!(
            cost_micros(&one_usd_per_token, &usage(1_000_001, 0, 0, 0)),
            Err(CostError::TooLarge)
        );
        for bad in [
            usage(-1, 0, 0, 0),
            usage(0, 0, 0, -1),
            usage(big + 1, 0, 0, 0),
            usage(10, 8, 3, 0),
        ] {
            assert_eq!(
                cost_micros(&most, &bad),
                Err(CostError::BadUsage),
                "{bad:?}"
            );
        }
        // A price that skipped validation is refused, not multiplied.
        assert_eq!(
            cost_micros(&price(i64::MAX, 0), &usage(big, 0, 0, 0)),
            Err(CostError::TooLarge)
        );
    }

    #[test]
    fn prices_are_bounded_exact_and_strict() {
        let parse = |text: &str| {
            serde_json::from_str::<PriceInput>(text)
                .map_err(|e| e.to_string())
                .and_then(|i| i.validate())
        };
        assert_eq!(
            parse(r#"{"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6}"#),
            Ok(price(150_000, 600_000))
        );
        let p = parse(
            r#"{"input_per_mtok_usd": 3, "output_per_mtok_usd": 15, "cached_input_per_mtok_usd": 0.3, "cache_write_per_mtok_usd": 3.75}"#,
        )
        .unwrap();
        assert_eq!((p.cached_input(), p.cache_write()), (300_000, 3_750_000));
        assert_eq!(
            parse(r#"{"input_per_mtok_usd": 1000000, "output_per_mtok_usd": 0}"#)
                .unwrap()
                .input,
            MAX_PRICE_MICROS
        );
        for bad in [
            r#"{"input_per_mtok_usd": 1000000.000001, "output_per_mtok_usd": 0}"#,
            r#"{"input_per_mtok_usd": -1, "output_per_mtok_usd": 0}"#,
            r#"{"input_per_mtok_usd": 1, "output_per_mtok_usd": 1e300}"#,
            r#"{"input_per_mtok_usd": 0.0000001, "output_per_mtok_usd": 0}"#,
            r#"{"input_per_mtok_usd": "1", "output_per_mtok_usd": 0}"#,
            r#"{"input_per_mtok_usd": 1}"#,
            r#"{"input_per_mtok_usd": 1, "output_per_mtok_usd": 1, "extra": 1}"#,
            r#"{"input_per_mtok_usd": 1, "output_per_mtok_usd": 1, "cached_input_per_mtok_usd": -0.5}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_file_is_keyed_by_provider_slash_model() {
        let entries = parse_file(
            r#"{"openai/gpt-4o": {"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10},
                "fireworks/accounts/fireworks/models/llama": {"input_per_mtok_usd": 0.2, "output_per_mtok_usd": 0.2}}"#,
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries.contains(&(
            "fireworks".into(),
            "accounts/fireworks/models/llama".into(),
            price(200_000, 200_000)
        )));
        for (bad, says) in [
            ("[]", "not a JSON object"),
            ("{", "not a JSON object"),
            (
                r#"{"gpt-4o": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1}}"#,
                "provider/model",
            ),
            (
                r#"{"open ai/x": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1}}"#,
                "provider must",
            ),
            (
                r#"{"openai/": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1}}"#,
                "model must not be empty",
            ),
            (
                r#"{"openai/x": {"input_per_mtok_usd": 2000000, "output_per_mtok_usd": 1}}"#,
                "input_per_mtok_usd must be",
            ),
            (
                r#"{"openai/x": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 1, "typo": 1}}"#,
                "typo",
            ),
        ] {
            let why = parse_file(bad).unwrap_err();
            assert!(why.contains(says), "{bad}: {why}");
            assert!(!why.contains('\n'), "{why}");
        }
    }
}
