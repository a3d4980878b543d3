//! The admin API's user bodies and their validation.
//!
//! `PUT /admin/users/{user_id}` takes a whole limit set (absent = no limit of that
//! kind) and replaces what was stored. `PATCH` follows merge-patch at the top level:
//! an absent field is kept, `null` clears it; `spend_limits` and `model_limits` are
//! each replaced as a whole (`null` or `{}` clears). Unknown fields are refused at
//! every level (`deny_unknown_fields`, here and in [`crate::quota`]).

use serde::Deserialize;

use crate::client_keys::input::present;
use crate::quota::{self, LimitSet, ModelLimits, SpendLimits};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutUserRequest {
    #[serde(default)]
    pub rate_limit: Option<i64>,
    #[serde(default)]
    pub tpm_limit: Option<i64>,
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
pub struct PatchUserRequest {
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub tpm_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub daily_request_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub daily_token_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub spend_limits: Option<Option<SpendLimits>>,
    #[serde(default, deserialize_with = "present")]
    pub model_limits: Option<Option<ModelLimits>>,
}

/// A user's limits, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserLimitsInput {
    pub limits: LimitSet,
    pub model_limits: ModelLimits,
}

/// Refuses what [`LimitSet::validate`] or [`quota::validate_models`] refuses.
pub fn check(limits: LimitSet, model_limits: ModelLimits) -> Result<UserLimitsInput, String> {
    limits.validate("")?;
    quota::validate_models(&model_limits)?;
    Ok(UserLimitsInput {
        limits,
        model_limits,
    })
}

impl PutUserRequest {
    pub fn validate(self) -> Result<UserLimitsInput, String> {
        check(
            LimitSet {
                rate_limit: self.rate_limit,
                tpm_limit: self.tpm_limit,
                daily_request_limit: self.daily_request_limit,
                daily_token_limit: self.daily_token_limit,
                spend_limits: self.spend_limits.unwrap_or_default(),
            },
            self.model_limits.unwrap_or_default(),
        )
    }
}

impl PatchUserRequest {
    /// The stored limits with this patch applied, validated.
    pub fn apply(&self, stored: &UserLimitsInput) -> Result<UserLimitsInput, String> {
        fn merge<T: Clone>(patch: &Option<Option<T>>, old: &Option<T>) -> Option<T> {
            match patch {
                None => old.clone(),
                Some(new) => new.clone(),
            }
        }
        let old = &stored.limits;
        let limits = LimitSet {
            rate_limit: merge(&self.rate_limit, &old.rate_limit),
            tpm_limit: merge(&self.tpm_limit, &old.tpm_limit),
            daily_request_limit: merge(&self.daily_request_limit, &old.daily_request_limit),
            daily_token_limit: merge(&self.daily_token_limit, &old.daily_token_limit),
            spend_limits: match &self.spend_limits {
                None => old.spend_limits.clone(),
                Some(new) => new.clone().unwrap_or_default(),
            },
        };
        let model_limits = match &self.model_limits {
            None => stored.model_limits.clone(),
            Some(new) => new.clone().unwrap_or_default(),
        };
        check(limits, model_limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(json: &str) -> Result<UserLimitsInput, String> {
        serde_json::from_str::<PutUserRequest>(json)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn put_validates_every_level() {
        let ok = put(
            r#"{"daily_token_limit": 5, "model_limits": {"gpt-4o": {"spend_limits": {"day": {"usd": 1.5}}}}}"#,
        );
        assert_eq!(ok.map(|u| u.limits.daily_token_limit), Ok(Some(5)));
        for bad in [
            r#"{"rate_limit": 0}"#,
            r#"{"daily_request_limit": -1}"#,
            r#"{"spend_limits": {"month": {"usd": 0}}}"#,
            r#"{"spend_limits": {"month": {"usd": 1, "alert_at_pct": [1,2,3,4,5,6,7,8,9,10,11]}}}"#,
            r#"{"model_limits": {"gpt\u0000": {"rate_limit": 1}}}"#,
            r#"{"model_limits": {"gpt-4o": {}}}"#,
            r#"{"model_limits": {"gpt-4o": {"rpm": 1}}}"#,
            r#"{"user_id": "x"}"#,
        ] {
            assert!(put(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn patch_keeps_absent_and_clears_null() {
        let stored =
            put(r#"{"rate_limit": 5, "tpm_limit": 7, "spend_limits": {"day": {"usd": 1}}}"#)
                .unwrap_or_default();
        let patch: PatchUserRequest =
            serde_json::from_str(r#"{"tpm_limit": null, "spend_limits": {}}"#).unwrap_or_default();
        let done = patch.apply(&stored).unwrap_or_default();
        assert_eq!(done.limits.rate_limit, Some(5));
        assert_eq!(done.limits.tpm_limit, None);
        assert!(done.limits.spend_limits.is_empty());
    }
}
