//! The admin API's client-key request bodies, and the validation that turns them into
//! [`NewKey`] and [`KeyPatch`].
//!
//! Every body rejects unknown fields (`deny_unknown_fields`), so a PATCH that names a
//! field that cannot be changed is refused rather than silently ignored. Absent and
//! `null` differ where it matters: on create an absent `rate_limit` takes the default
//! (100) while `null` means unlimited; on patch an absent field is left as it is while
//! `null` clears it (RFC 7396 merge-patch semantics, at the top level: an allow-list,
//! `spend_limits` and `model_limits` are each replaced as a whole).
//!
//! Quota fields are checked by [`crate::quota`]'s own validation, so keys and users
//! refuse the same values with the same messages (naming `spend_limits.<period>.usd`,
//! `model_limits.<model>.<field>`).

use serde::{Deserialize, Deserializer};

use crate::clock::{parse_instant, DateEdge, MS_PER_DAY};
use crate::money::Usd;
use crate::quota::{self, LimitSet, ModelLimits, SpendLimits};

pub const DEFAULT_RATE_LIMIT: i64 = 100;
pub const DEFAULT_CONCURRENT_LIMIT: i64 = 5;
/// Upper bound for every limit; keeps all arithmetic (also in Lua's doubles) exact.
pub const MAX_LIMIT: i64 = 1_000_000_000_000;
const MAX_TEXT: usize = crate::names::MAX_NAME_CHARS;
const MAX_LIST: usize = 1000;
const MAX_EXPIRE_DAYS: i64 = 36_500;

/// Absent → `None`; `null` → `Some(None)`; a value → `Some(Some(v))` (also for the
/// user bodies of [`crate::users::input`]).
pub(crate) fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub allowed_providers: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_api_formats: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<Option<i64>>,
    #[serde(default)]
    pub tpm_limit: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    pub concurrent_limit: Option<Option<i64>>,
    #[serde(default)]
    pub expire_days: Option<i64>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub is_standalone: Option<bool>,
    #[serde(default)]
    pub initial_balance_usd: Option<Usd>,
    #[serde(default)]
    pub auto_delete_on_expiry: Option<bool>,
    #[serde(default)]
    pub daily_request_limit: Option<i64>,
    #[serde(default)]
    pub daily_token_limit: Option<i64>,
    #[serde(default)]
    pub spend_limits: Option<SpendLimits>,
    #[serde(default)]
    pub model_limits: Option<ModelLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchKeyRequest {
    #[serde(default, deserialize_with = "present")]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub allowed_providers: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub allowed_api_formats: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub allowed_models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub tpm_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub concurrent_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub is_active: Option<Option<bool>>,
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub auto_delete_on_expiry: Option<Option<bool>>,
    #[serde(default, deserialize_with = "present")]
    pub daily_request_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub daily_token_limit: Option<Option<i64>>,
    /// Replaced as a whole (like an allow-list); `null` or `{}` clears every period.
    #[serde(default, deserialize_with = "present")]
    pub spend_limits: Option<Option<SpendLimits>>,
    /// Replaced as a whole; `null` or `{}` clears every model's limits.
    #[serde(default, deserialize_with = "present")]
    pub model_limits: Option<Option<ModelLimits>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceRequest {
    pub amount_usd: Usd,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpireRequest {
    #[serde(default)]
    pub auto_delete: Option<bool>,
}

/// A validated key to create (everything but the secret, which the service generates).
#[derive(Debug, Clone, PartialEq)]
pub struct NewKey {
    pub user_id: Option<String>,
    pub name: Option<String>,
    pub allowed_providers: Option<Vec<String>>,
    pub allowed_api_formats: Option<Vec<String>>,
    pub allowed_models: Option<Vec<String>>,
    pub rate_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
    pub concurrent_limit: Option<i64>,
    pub expires_at: Option<i64>,
    pub is_standalone: bool,
    pub balance_micros: Option<i64>,
    pub auto_delete_on_expiry: Option<bool>,
    pub daily_request_limit: Option<i64>,
    pub daily_token_limit: Option<i64>,
    pub spend_limits: SpendLimits,
    pub model_limits: ModelLimits,
}

/// A validated change: `None` leaves a field as it is, `Some(x)` sets it to `x`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub allowed_providers: Option<Option<Vec<String>>>,
    pub allowed_api_formats: Option<Option<Vec<String>>>,
    pub allowed_models: Option<Option<Vec<String>>>,
    pub rate_limit: Option<Option<i64>>,
    pub tpm_limit: Option<Option<i64>>,
    pub concurrent_limit: Option<Option<i64>>,
    pub is_active: Option<bool>,
    pub expires_at: Option<Option<i64>>,
    pub auto_delete_on_expiry: Option<Option<bool>>,
    pub daily_request_limit: Option<Option<i64>>,
    pub daily_token_limit: Option<Option<i64>>,
    /// `Some(empty)` clears.
    pub spend_limits: Option<SpendLimits>,
    /// `Some(empty)` clears.
    pub model_limits: Option<ModelLimits>,
}

/// A name or label: the rule of [`crate::names`], and not blank.
fn text(field: &str, value: String) -> Result<String, String> {
    match crate::names::printable(&value) {
        Some(value) if !value.is_empty() => Ok(value.to_string()),
        _ => Err(format!(
            "{field} must be 1 to {MAX_TEXT} printable characters (no control characters)"
        )),
    }
}

/// Validates an allow-list; an empty list becomes `None` ("all"), duplicates are dropped.
fn allow_list(field: &str, list: Option<Vec<String>>) -> Result<Option<Vec<String>>, String> {
    let Some(list) = list else { return Ok(None) };
    if list.len() > MAX_LIST {
        return Err(format!("{field} has more than {MAX_LIST} entries"));
    }
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for item in list {
        let item = text(&format!("each entry of {field}"), item)?;
        if !out.contains(&item) {
            out.push(item);
        }
    }
    Ok((!out.is_empty()).then_some(out))
}

fn limit(field: &str, value: Option<i64>) -> Result<Option<i64>, String> {
    match value {
        Some(n) if !(1..=MAX_LIMIT).contains(&n) => Err(format!(
            "{field} must be a whole number from 1 to {MAX_LIMIT}, or null for unlimited"
        )),
        other => Ok(other),
    }
}

/// Spend limits as [`LimitSet::validate`] checks them (the message names
/// `spend_limits.<period>.…`); absent or `{}` is none.
fn spend(value: Option<SpendLimits>) -> Result<SpendLimits, String> {
    let set = LimitSet {
        spend_limits: value.unwrap_or_default(),
        ..LimitSet::default()
    };
    set.validate("")?;
    Ok(set.spend_limits)
}

/// Per-model limits as [`quota::validate_models`] checks them; absent or `{}` is none.
fn models(value: Option<ModelLimits>) -> Result<ModelLimits, String> {
    let models = value.unwrap_or_default();
    quota::validate_models(&models)?;
    Ok(models)
}

fn timestamp(field: &str, value: &str) -> Result<i64, String> {
    parse_instant(value, DateEdge::Start).map_err(|why| format!("{field}: {why}"))
}

impl CreateKeyRequest {
    pub fn validate(self, now_ms: i64) -> Result<NewKey, String> {
        let is_standalone = self.is_standalone.unwrap_or(false);
        let expires_at = match (self.expire_days, self.expires_at) {
            (Some(_), Some(_)) => return Err("give expire_days or expires_at, not both".into()),
            (Some(days), None) if !(1..=MAX_EXPIRE_DAYS).contains(&days) => {
                return Err(format!("expire_days must be from 1 to {MAX_EXPIRE_DAYS}"))
            }
            (Some(days), None) => Some(now_ms + days * MS_PER_DAY),
            (None, Some(at)) => {
                let at = timestamp("expires_at", &at)?;
                if at <= now_ms {
                    return Err("expires_at must be in the future".into());
                }
                Some(at)
            }
            (None, None) => None,
        };
        let balance_micros = match self.initial_balance_usd {
            None => None,
            Some(_) if !is_standalone => {
                return Err(
                    "initial_balance_usd is only for standalone keys (is_standalone: true)".into(),
                )
            }
            Some(Usd(m)) if m < 0 => return Err("initial_balance_usd must not be negative".into()),
            Some(Usd(m)) => Some(m),
        };
        Ok(NewKey {
            user_id: self.user_id.map(|u| text("user_id", u)).transpose()?,
            name: self.name.map(|n| text("name", n)).transpose()?,
            allowed_providers: allow_list("allowed_providers", self.allowed_providers)?,
            allowed_api_formats: allow_list("allowed_api_formats", self.allowed_api_formats)?,
            allowed_models: allow_list("allowed_models", self.allowed_models)?,
            rate_limit: limit(
                "rate_limit",
                self.rate_limit.unwrap_or(Some(DEFAULT_RATE_LIMIT)),
            )?,
            tpm_limit: limit("tpm_limit", self.tpm_limit)?,
            concurrent_limit: limit(
                "concurrent_limit",
                self.concurrent_limit
                    .unwrap_or(Some(DEFAULT_CONCURRENT_LIMIT)),
            )?,
            expires_at,
            is_standalone,
            balance_micros,
            auto_delete_on_expiry: self.auto_delete_on_expiry,
            daily_request_limit: limit("daily_request_limit", self.daily_request_limit)?,
            daily_token_limit: limit("daily_token_limit", self.daily_token_limit)?,
            spend_limits: spend(self.spend_limits)?,
            model_limits: models(self.model_limits)?,
        })
    }
}

impl PatchKeyRequest {
    pub fn validate(self) -> Result<KeyPatch, String> {
        let required = |field: &str| format!("{field} cannot be null");
        Ok(KeyPatch {
            name: match self.name {
                None => None,
                Some(None) => return Err(required("name")),
                Some(Some(n)) => Some(text("name", n)?),
            },
            allowed_providers: self
                .allowed_providers
                .map(|l| allow_list("allowed_providers", l))
                .transpose()?,
            allowed_api_formats: self
                .allowed_api_formats
                .map(|l| allow_list("allowed_api_formats", l))
                .transpose()?,
            allowed_models: self
                .allowed_models
                .map(|l| allow_list("allowed_models", l))
                .transpose()?,
            rate_limit: self
                .rate_limit
                .map(|v| limit("rate_limit", v))
                .transpose()?,
            tpm_limit: self.tpm_limit.map(|v| limit("tpm_limit", v)).transpose()?,
            concurrent_limit: self
                .concurrent_limit
                .map(|v| limit("concurrent_limit", v))
                .transpose()?,
            is_active: match self.is_active {
                None => None,
                Some(None) => return Err(required("is_active")),
                Some(v) => v,
            },
            expires_at: self
                .expires_at
                .map(|v| v.map(|at| timestamp("expires_at", &at)).transpose())
                .transpose()?,
            auto_delete_on_expiry: self.auto_delete_on_expiry,
            daily_request_limit: self
                .daily_request_limit
                .map(|v| limit("daily_request_limit", v))
                .transpose()?,
            daily_token_limit: self
                .daily_token_limit
                .map(|v| limit("daily_token_limit", v))
                .transpose()?,
            spend_limits: self.spend_limits.map(spend).transpose()?,
            model_limits: self.model_limits.map(models).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(json: &str) -> Result<NewKey, String> {
        serde_json::from_str::<CreateKeyRequest>(json)
            .map_err(|e| e.to_string())?
            .validate(1_000)
    }

    #[test]
    fn create_defaults_and_null_means_unlimited() {
        let k = create("{}").unwrap();
        assert_eq!(k.rate_limit, Some(100));
        assert_eq!(k.concurrent_limit, Some(5));
        assert_eq!(k.tpm_limit, None);
        let k =
            create(r#"{"rate_limit": null, "concurrent_limit": null, "tpm_limit": 10}"#).unwrap();
        assert_eq!(
            (k.rate_limit, k.concurrent_limit, k.tpm_limit),
            (None, None, Some(10))
        );
    }

    #[test]
    fn empty_allow_lists_mean_all_and_duplicates_go() {
        let k = create(r#"{"allowed_models": [], "allowed_providers": ["a", "a", "b"]}"#).unwrap();
        assert_eq!(k.allowed_models, None);
        assert_eq!(k.allowed_providers, Some(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn bad_values_are_refused() {
        for body in [
            r#"{"rate_limit": 0}"#,
            r#"{"rate_limit": -5}"#,
            r#"{"tpm_limit": 0}"#,
            r#"{"concurrent_limit": 1000000000001}"#,
            r#"{"expire_days": 0}"#,
            r#"{"expire_days": 3, "expires_at": "2100-01-01T00:00:00Z"}"#,
            r#"{"expires_at": "1970-01-01T00:00:00Z"}"#,
            r#"{"expires_at": "soon"}"#,
            r#"{"initial_balance_usd": 5}"#,
            r#"{"is_standalone": true, "initial_balance_usd": -1}"#,
            r#"{"name": ""}"#,
            r#"{"allowed_models": [""]}"#,
            r#"{"rate_limit": "100"}"#,
            r#"{"rate_limit": 1.5}"#,
            r#"{"bogus": 1}"#,
        ] {
            assert!(create(body).is_err(), "{body} was accepted");
        }
    }

    #[test]
    fn patch_distinguishes_absent_from_null() {
        let p: PatchKeyRequest =
            serde_json::from_str(r#"{"rate_limit": null, "allowed_models": []}"#).unwrap();
        let p = p.validate().unwrap();
        assert_eq!(p.rate_limit, Some(None));
        assert_eq!(p.allowed_models, Some(None));
        assert_eq!(p.tpm_limit, None);
        let p: PatchKeyRequest = serde_json::from_str(r#"{"name": null}"#).unwrap();
        assert!(p.validate().is_err());
        assert!(serde_json::from_str::<PatchKeyRequest>(r#"{"is_standalone": true}"#).is_err());
    }
}
