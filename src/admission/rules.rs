//! The small rules an admission applies in process, before the counter store: names
//! from the request, allow-lists, which strings can be a key at all, and the balance
//! hold of an estimate.

use super::AdmitError;
use crate::names;
use crate::prices::Price;

/// A name from the request: `None` for "not given" (absent or blank), refused when it
/// breaks the rule of [`crate::names`].
pub(super) fn given<'a>(
    field: &'static str,
    value: &'a Option<String>,
) -> Result<Option<&'a str>, AdmitError> {
    names::optional(field, value.as_deref()).map_err(|e| AdmitError::BadRequest(e.to_string()))
}

/// An allow-list admits a value it contains; `None` (no list) admits everything, and a
/// list admits nothing that was not named.
pub(super) fn allows(list: &Option<Vec<String>>, value: Option<&str>) -> bool {
    match list {
        None => true,
        Some(list) => value.is_some_and(|v| list.iter().any(|item| item == v)),
    }
}

/// A string that cannot be a key is refused without a lookup.
pub(super) fn plausible_secret(secret: &str) -> bool {
    (8..=512).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic())
}

/// What a request holds on its key's balance until its report, rounded up: the input
/// tokens estimated from the body `/authz` saw at the input price, and the request's
/// estimate (`max_tokens`, `estimated_tokens` or the default) at the higher of the
/// input and output prices, since `estimated_tokens` may count input too. An upstream
/// never writes more than `max_tokens`, so the hold covers what the request can cost
/// unless its input was underestimated. An estimate whose cost is beyond what one
/// request may cost holds that most.
pub(super) fn hold(price: &Price, input: i64, estimate: i64) -> i64 {
    let dearer = Price {
        output: price.output.max(price.input),
        ..*price
    };
    let usage = crate::usage::parse::Usage {
        input_tokens: input,
        output_tokens: estimate,
        ..Default::default()
    };
    crate::prices::cost_micros(&dearer, &usage).unwrap_or(crate::money::MAX_REPORT_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_keys::input::MAX_LIMIT;

    #[test]
    fn holds_price_the_estimate_and_saturate() {
        let price = Price {
            input: 2_500_000,
            output: 10_000_000,
            cached_input: None,
            cache_write: None,
        };
        // 400 input tokens at 2.5 USD/Mtok + 100 estimated at 10 USD/Mtok = 2,000 micro-USD.
        assert_eq!(hold(&price, 400, 100), 2_000);
        assert_eq!(hold(&price, 0, 1), 10);
        assert_eq!(hold(&price, 0, 0), 0);
        // The estimate is priced at the dearer of the two prices.
        let reversed = Price {
            input: 10_000_000,
            output: 2_500_000,
            ..price
        };
        assert_eq!(hold(&reversed, 0, 100), 1_000);
        let dear = Price {
            output: crate::prices::MAX_PRICE_MICROS,
            ..price
        };
        assert_eq!(hold(&dear, 0, MAX_LIMIT), crate::money::MAX_REPORT_MICROS);
    }

    #[test]
    fn allow_lists() {
        assert!(allows(&None, None));
        assert!(allows(&None, Some("x")));
        let list = Some(vec!["gpt-4o".to_string()]);
        assert!(allows(&list, Some("gpt-4o")));
        assert!(!allows(&list, Some("gpt-4")));
        assert!(!allows(&list, None), "a list admits nothing unnamed");
    }

    #[test]
    fn implausible_secrets_skip_the_lookup() {
        assert!(plausible_secret("sk-kw-abcdefgh"));
        assert!(!plausible_secret("short"));
        assert!(!plausible_secret("has space inside it"));
        assert!(!plausible_secret(&"x".repeat(513)));
    }
}
