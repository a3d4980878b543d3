//! The provider-key admin bodies and their validation.

use serde::Deserialize;

use crate::client_keys::input::MAX_LIMIT;

const MAX_LABEL: usize = crate::names::MAX_NAME_CHARS;
const MAX_VALUE: usize = 4096;
const MAX_PRIORITY: i64 = 1_000_000;

fn present<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddKeyRequest {
    pub label: String,
    pub value: String,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default)]
    pub max_rpm: Option<i64>,
    #[serde(default)]
    pub max_tpm: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchProviderKeyRequest {
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub priority: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    pub max_rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub max_tpm: Option<Option<i64>>,
    #[serde(default)]
    pub is_active: Option<bool>,
}

/// A validated key to add; the value is still plaintext here and encrypted by the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProviderKey {
    pub label: String,
    pub value: String,
    pub priority: i64,
    pub max_rpm: Option<i64>,
    pub max_tpm: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderKeyPatch {
    pub label: Option<String>,
    pub priority: Option<i64>,
    pub max_rpm: Option<Option<i64>>,
    pub max_tpm: Option<Option<i64>>,
    pub is_active: Option<bool>,
}

fn label(value: String) -> Result<String, String> {
    match crate::names::printable(&value) {
        Some(value) if !value.is_empty() => Ok(value.to_string()),
        _ => Err(format!(
            "label must be 1 to {MAX_LABEL} printable characters"
        )),
    }
}

fn priority(value: i64) -> Result<i64, String> {
    if (0..=MAX_PRIORITY).contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "priority must be a whole number from 0 (tried first) to {MAX_PRIORITY}"
        ))
    }
}

fn limit(field: &str, value: Option<i64>) -> Result<Option<i64>, String> {
    match value {
        Some(n) if !(1..=MAX_LIMIT).contains(&n) => Err(format!(
            "{field} must be a whole number from 1 to {MAX_LIMIT}, or null for unlimited"
        )),
        other => Ok(other),
    }
}

impl AddKeyRequest {
    pub fn validate(self) -> Result<NewProviderKey, String> {
        // The value is never echoed in an error.
        let value = self.value.trim().to_string();
        if value.is_empty()
            || value.len() > MAX_VALUE
            || value.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(format!(
                "value must be 1 to {MAX_VALUE} characters without spaces or control characters"
            ));
        }
        Ok(NewProviderKey {
            label: label(self.label)?,
            value,
            priority: priority(self.priority.unwrap_or(0))?,
            max_rpm: limit("max_rpm", self.max_rpm)?,
            max_tpm: limit("max_tpm", self.max_tpm)?,
        })
    }
}

impl PatchProviderKeyRequest {
    pub fn validate(self) -> Result<ProviderKeyPatch, String> {
        Ok(ProviderKeyPatch {
            label: self.label.map(label).transpose()?,
            priority: self.priority.map(priority).transpose()?,
            max_rpm: self.max_rpm.map(|v| limit("max_rpm", v)).transpose()?,
            max_tpm: self.max_tpm.map(|v| limit("max_tpm", v)).transpose()?,
            is_active: self.is_active,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(json: &str) -> Result<NewProviderKey, String> {
        serde_json::from_str::<AddKeyRequest>(json)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn add_validates_without_echoing_the_value() {
        let k = add(r#"{"label": " main ", "value": "sk-upstream"}"#).unwrap();
        assert_eq!((k.label.as_str(), k.priority, k.max_rpm), ("main", 0, None));
        for bad in [
            r#"{"label": "x", "value": ""}"#,
            r#"{"label": "x", "value": "has space"}"#,
            r#"{"label": "", "value": "v"}"#,
            r#"{"label": "x", "value": "v", "priority": -1}"#,
            r#"{"label": "x", "value": "v", "max_rpm": 0}"#,
            r#"{"label": "x", "value": "v", "max_tpm": -5}"#,
            r#"{"label": "x"}"#,
            r#"{"label": "x", "value": "v", "extra": 1}"#,
        ] {
            let e = add(bad).unwrap_err();
            assert!(!e.contains("has space"), "{e}");
        }
    }
}
