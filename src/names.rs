//! Names keyward stores or checks: provider, model, API format (and labels).
//!
//! One rule on every endpoint that accepts such a name (`/v1/admit`, `/authz`,
//! `/v1/select`, `/v1/report`, the admin API): trimmed, at most [`MAX_NAME_CHARS`]
//! characters, none of them a control character (NUL included). A name that breaks it
//! is refused with 400 before anything is looked up or counted: a NUL or an endless
//! model name must never reach a usage record, where the database would refuse it
//! after the request was already admitted and charged.
//!
//! Provider names that select a pool keep their stricter alphabet on top of this
//! ([`crate::pool::valid_provider`]): they become Redis key names.

/// The most characters (not bytes) a name may have.
pub const MAX_NAME_CHARS: usize = 200;

/// A name that breaks the rule; the message names the field, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be at most {MAX_NAME_CHARS} printable characters (no control or invisible formatting characters)")]
pub struct BadName {
    pub field: &'static str,
}

/// The trimmed text when it keeps the rule (it may be empty), else `None`.
pub fn printable(value: &str) -> Option<&str> {
    let value = value.trim();
    // A char is at most 4 bytes: longer texts are refused without counting.
    let too_long = value.len() > 4 * MAX_NAME_CHARS
        || (value.len() > MAX_NAME_CHARS && value.chars().count() > MAX_NAME_CHARS);
    (!too_long && !value.chars().any(|c| c.is_control() || invisible(c))).then_some(value)
}

/// Characters that print as nothing or reorder what follows (Unicode's format and
/// line/paragraph separator characters): `gpt\u{200b}-4o` must not pass for `gpt-4o`
/// in a listing, and a bidi override must not reverse a log line.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0000}'..='\u{E007F}')
}

/// The trimmed name, which may be empty.
pub fn check<'a>(field: &'static str, value: &'a str) -> Result<&'a str, BadName> {
    printable(value).ok_or(BadName { field })
}

/// An optional name: absent or blank is `None`.
pub fn optional<'a>(
    field: &'static str,
    value: Option<&'a str>,
) -> Result<Option<&'a str>, BadName> {
    match value {
        None => Ok(None),
        Some(v) => check(field, v).map(|v| (!v.is_empty()).then_some(v)),
    }
}

/// The entry for `model` in a map keyed by model names: its own, else the one of its
/// longest listed prefix that ends before a `-` (`gpt-4o-2024-08-06` → `gpt-4o`), so a
/// dated model id follows its family's entry. Prices and per-model limits both look up
/// this way.
pub fn longest_prefix<'a, V>(
    map: &'a std::collections::BTreeMap<String, V>,
    model: &str,
) -> Option<(&'a str, &'a V)> {
    if let Some((k, v)) = map.get_key_value(model) {
        return Some((k.as_str(), v));
    }
    model
        .char_indices()
        .rev()
        .filter(|(_, c)| *c == '-')
        .find_map(|(i, _)| map.get_key_value(&model[..i]))
        .map(|(k, v)| (k.as_str(), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_characters_are_refused() {
        for c in [
            '\u{200B}', '\u{202E}', '\u{2028}', '\u{2029}', '\u{FEFF}', '\u{00AD}', '\u{2066}',
        ] {
            let name = format!("gpt{c}-4o");
            assert_eq!(
                check("model", &name),
                Err(BadName { field: "model" }),
                "{c:?}"
            );
        }
        assert!(
            check("model", "模型-é-ü").is_ok(),
            "other scripts are names too"
        );
    }

    #[test]
    fn printable_names_up_to_200_characters() {
        assert_eq!(check("model", " gpt-4o "), Ok("gpt-4o"));
        assert_eq!(optional("model", Some("  ")), Ok(None));
        assert_eq!(optional("model", None), Ok(None));
        let long = "é".repeat(MAX_NAME_CHARS);
        assert_eq!(
            check("model", &long),
            Ok(long.as_str()),
            "characters, not bytes"
        );
        assert!(check("model", "accounts/fireworks/models/llama-v3p1-8b").is_ok());
    }

    #[test]
    fn control_characters_and_long_names_are_refused() {
        for bad in [
            "gpt\u{0}4o".to_string(),
            "a\nb".to_string(),
            "a\tb".to_string(),
            "\u{7f}".to_string(),
            "a\u{85}b".to_string(),
            "x".repeat(MAX_NAME_CHARS + 1),
            "é".repeat(MAX_NAME_CHARS + 1),
            "x".repeat(250_000),
        ] {
            let e = check("api_format", &bad).unwrap_err();
            assert_eq!(e.field, "api_format");
            assert!(e.to_string().starts_with("api_format must be"), "{e}");
        }
    }
}
