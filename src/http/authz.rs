//! `ANY /authz/{*path}`: the check for Envoy `ext_authz` (HTTP mode), the shipped
//! nginx Lua (`examples/nginx/keyward.lua`) and nginx `auth_request`. It turns the
//! proxied request into an admission and answers in the proxy's terms.
//!
//! - Client key: `Authorization: Bearer`, `x-api-key`, `x-goog-api-key` or `api-key`.
//! - Original path: `{*path}`, or `X-Original-URI` behind nginx. The API format is
//!   inferred from it, and the provider from the format unless `x-keyward-provider`
//!   names one.
//! - Model and token estimate: from the JSON body when the proxy forwards it (`model`;
//!   the largest of `max_tokens`, `max_completion_tokens`, `max_output_tokens`, Gemini's
//!   `generationConfig.maxOutputTokens`, times the answers asked for: `n`, `best_of`,
//!   `generationConfig.candidateCount`), read by [`super::scan`] as far as it goes when
//!   the proxy cut it short; else the Gemini model in the path; only then
//!   `x-keyward-model` / `x-keyward-estimated-tokens`. The body comes first because it
//!   is what the upstream acts on; the shipped proxies drop client-sent `x-keyward-*`
//!   headers, and these headers are for a gateway that forwards no body.
//! - A provider key is picked whenever the provider has a pool; a provider without
//!   one is admitted without a pick. `x-keyward-select: false` opts out, and
//!   `x-keyward-select: true` requires a pick (`NO_PROVIDER_KEY` without one).
//!
//! Allowed: **200** (Envoy allows on 200 only) with `x-keyward-lease`, `x-keyward-key-id`
//! and, when a provider key was picked, `x-keyward-provider-key-id`,
//! `x-keyward-upstream-authorization: Bearer <value>` and `x-keyward-upstream-key:
//! <value>` (for providers that take the key in another header).
//! Denied: the contract's status and JSON body, `Retry-After`, `x-keyward-status` (the
//! real status) and `x-keyward-error` (the code). With `x-keyward-mode: nginx` every
//! denial is sent as 403, because nginx turns other codes into 500, and the JSON body is
//! also sent in `x-keyward-error-body`, because `auth_request` drops the body. (The
//! shipped nginx Lua calls `/authz` itself and passes the plain answer on.)

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::UnreadBody;
use super::ratelimit;
use super::scan::scan;
use super::state::AppState;
use crate::admission::{AdmitBody, AdmitError};
use crate::client_keys::ClientKey;
use crate::usage::api_format;

/// The most of a forwarded body that is read for `model` and `max_tokens`.
pub const MAX_AUTHZ_BODY: usize = 1024 * 1024;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The client key, from the headers the LLM APIs use for it.
pub fn client_key(headers: &HeaderMap) -> Option<String> {
    if let Some(auth) = header(headers, "authorization") {
        let (scheme, token) = auth.split_once(' ').unwrap_or(("", auth));
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(token.trim().to_string());
        }
    }
    ["x-api-key", "x-goog-api-key", "api-key"]
        .iter()
        .find_map(|name| header(headers, name))
        .map(str::to_string)
}

/// Whether a path reaches the upstream as keyward reads it: no `.` or `..` segment, and
/// no percent-encoded `/`, `.`, `:` or `%` (which the upstream may decode into another
/// route, e.g. another model's, after keyward checked this one). The query is not
/// looked at.
fn plain_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    let encoded = |code: &str| {
        path.as_bytes()
            .windows(3)
            .any(|w| w[0] == b'%' && w[1..].eq_ignore_ascii_case(code.as_bytes()))
    };
    !path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
        && !["2f", "2e", "3a", "25", "5c"]
            .iter()
            .any(|code| encoded(code))
}

/// `gemini-1.5-pro` from `/v1beta/models/gemini-1.5-pro:generateContent`.
fn model_in_path(path: &str) -> Option<String> {
    let after = path.split("/models/").nth(1)?;
    let model = after.split([':', '/', '?']).next()?;
    (!model.is_empty()).then(|| model.to_string())
}

/// `x-keyward-select`: `Some(true)` to require a pick, `Some(false)` to opt out, `None`
/// (absent) to pick whenever the provider has a pool.
fn select_header(headers: &HeaderMap) -> Result<Option<bool>, ApiError> {
    match header(headers, "x-keyward-select")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => Ok(None),
        Some("true" | "1") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(_) => Err(ApiError::bad_request(
            "x-keyward-select must be true or false",
        )),
    }
}

/// What is refused from the headers alone, before any of the body is read (up to
/// 1 MiB of it, which a caller without a key must not be able to make keyward hold): a
/// path the upstream could route elsewhere, and a request without a client key. The
/// key, when there is one.
fn before_the_body(path: &str, headers: &HeaderMap) -> Result<String, ApiError> {
    if !plain_path(path) {
        return Err(ApiError::bad_request(
            "the path has a dot segment or an encoded separator: the upstream could route it elsewhere than it reads",
        ));
    }
    client_key(headers).ok_or_else(|| AdmitError::MissingKey.into())
}

/// The admission an authz request with client key `key` stands for. The body says what
/// the upstream will act on, so it comes first: the `x-keyward-*` headers only fill what
/// it leaves out (a proxy that forwards no body, or a body cut before the field).
fn admit_body(
    path: &str,
    headers: &HeaderMap,
    key: String,
    body: &[u8],
) -> Result<AdmitBody, ApiError> {
    let scanned = scan(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let format = api_format::of_path(path);
    // Where the path names the model (Gemini), the upstream serves that one: it is the
    // model checked, and a body naming another is refused rather than believed.
    let path_model = model_in_path(path);
    if let (Some(in_path), Some(in_body)) = (&path_model, &scanned.model) {
        if in_path != in_body {
            return Err(ApiError::bad_request(
                "the body's model is not the model the path names",
            ));
        }
    }
    let estimated_tokens = match scanned.estimate() {
        Some(n) => Some(n),
        None => header(headers, "x-keyward-estimated-tokens")
            .map(|text| {
                text.parse::<i64>().map_err(|_| {
                    ApiError::bad_request("x-keyward-estimated-tokens must be a whole number")
                })
            })
            .transpose()?,
    };
    let select = select_header(headers)?;
    // OpenAI chat and completions streams state their usage only when asked, and the
    // body states no output limit the upstream would keep to (a header's estimate binds
    // nobody). A body the proxy cut short before `stream` may be a stream all the same.
    let usage_unstated = matches!(format, Some(("openai_chat" | "openai_completions", _)))
        && (scanned.stream == Some(true) || (!scanned.complete && scanned.stream.is_none()))
        && scanned.include_usage != Some(true)
        && scanned.estimate().is_none();
    Ok(AdmitBody {
        key: Some(key),
        provider: header(headers, "x-keyward-provider")
            .map(str::to_string)
            .or_else(|| format.map(|(_, provider)| provider.to_string())),
        model: path_model
            .or(scanned.model)
            .or_else(|| header(headers, "x-keyward-model").map(str::to_string)),
        api_format: format.map(|(f, _)| f.to_string()),
        estimated_tokens,
        select: select == Some(true),
        select_if_pooled: select.is_none(),
        // About four bytes of JSON per input token: enough for a hold that prices the
        // prompt too (a body cut short by the proxy holds for what was seen).
        input_estimate: body.len().div_ceil(4) as i64,
        usage_unstated,
    })
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// JSON with every non-ASCII character escaped, so it fits in a header.
fn header_safe_json(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .flat_map(|c| match c {
            ' '..='~' => vec![c.to_string()],
            _ => {
                let mut units = [0u16; 2];
                c.encode_utf16(&mut units)
                    .iter()
                    .map(|u| format!("\\u{u:04x}"))
                    .collect()
            }
        })
        .collect()
}

/// The admission a request stands for, with its key: what the headers alone refuse
/// first (the key looked up too: no body is read for a key that does not exist or
/// cannot be used), then the body, read only then, within its peer's budget of bodies
/// held (`extract::MAX_BODIES_HELD_PER_PEER` for a remote peer: one peer cannot spend
/// every tenant's budget); the bytes are given back once it is scanned.
async fn admission(
    state: &AppState,
    path: &str,
    headers: &HeaderMap,
    body: UnreadBody,
) -> Result<(Arc<ClientKey>, AdmitBody), ApiError> {
    let secret = before_the_body(path, headers)?;
    let key = state.admission.check_key(Some(&secret)).await?;
    let body = body.bytes(MAX_AUTHZ_BODY).await?;
    Ok((key, admit_body(path, headers, secret, &body)?))
}

pub async fn authz(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: UnreadBody,
) -> Response {
    let started = std::time::Instant::now();
    let nginx = header(&headers, "x-keyward-mode").is_some_and(|m| m.eq_ignore_ascii_case("nginx"));
    let original = match header(&headers, "x-original-uri") {
        Some(original) => original.to_string(),
        None => match path {
            Ok(Path(path)) => format!("/{path}"),
            // `/authz` itself.
            Err(PathRejection::MissingPathParams(_)) => "/".to_string(),
            // `%ff`: axum's own answer would be plain text.
            Err(_) => {
                return ApiError::bad_request("the path is not valid UTF-8").into_response();
            }
        },
    };
    let outcome = match admission(&state, &original, &headers, body).await {
        Ok((key, request)) => state
            .admission
            .admit_as(Some(key), &request)
            .await
            .map_err(|e| {
                let limits = match &e {
                    AdmitError::Limited {
                        key, usage, quotas, ..
                    } => Some((key.clone(), *usage, quotas.to_vec())),
                    _ => None,
                };
                (ApiError::from(e), limits)
            }),
        Err(e) => Err((e, None)),
    };
    match outcome {
        Ok(admitted) => {
            crate::metrics::decision("authz", started, None);
            let mut response = StatusCode::OK.into_response();
            let h = response.headers_mut();
            set(h, "x-keyward-lease", &admitted.lease_id);
            set(h, "x-keyward-key-id", &admitted.key.id);
            if let Some(pk) = &admitted.provider_key {
                set(h, "x-keyward-provider-key-id", &pk.id);
                set(
                    h,
                    "x-keyward-upstream-authorization",
                    &format!("Bearer {}", pk.value),
                );
                set(h, "x-keyward-upstream-key", &pk.value);
            }
            ratelimit::apply(h, &admitted.key, &admitted.usage, &admitted.quotas);
            ratelimit::degraded(h, admitted.degraded);
            response
        }
        Err((error, limits)) => {
            crate::metrics::decision("authz", started, Some((error.code.as_str(), error.limit)));
            let (status, code) = (error.status(), error.code);
            let mut response = error.into_response();
            if let Some((key, usage, quotas)) = limits {
                ratelimit::apply(response.headers_mut(), &key, &usage, &quotas);
            }
            set(response.headers_mut(), "x-keyward-status", status.as_str());
            set(response.headers_mut(), "x-keyward-error", code.as_str());
            if nginx {
                let (mut parts, body) = response.into_parts();
                let bytes = axum::body::to_bytes(body, 64 * 1024)
                    .await
                    .unwrap_or_default();
                set(
                    &mut parts.headers,
                    "x-keyward-error-body",
                    &header_safe_json(&bytes),
                );
                parts.status = StatusCode::FORBIDDEN;
                return Response::from_parts(parts, axum::body::Body::from(bytes));
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ErrorCode;

    #[test]
    fn models_and_plain_paths() {
        let gemini = "/v1beta/models/gemini-1.5-pro:generateContent";
        assert_eq!(model_in_path(gemini).as_deref(), Some("gemini-1.5-pro"));
        assert!(plain_path(gemini));
        assert!(plain_path("/v1/chat/completions?x=%2F.."));
        for tricky in [
            "/v1beta/models/gemini-1.5-flash/../gemini-1.5-pro:generateContent",
            "/v1beta/x/models/gemini-1.5-flash/../../models/gemini-1.5-pro:generateContent",
            "/v1beta/models/gemini-1.5-flash%2F..%2Fgemini-1.5-pro:generateContent",
            "/v1beta/models/gemini-1.5-flash%2f..:generateContent",
            "/v1/./chat/completions",
            "/v1beta/models/gemini-1.5-pro%3AgenerateContent",
        ] {
            assert!(!plain_path(tricky), "{tricky}");
        }
    }

    #[test]
    fn keys_from_every_header_llm_apis_use() {
        for (name, value) in [
            ("authorization", "Bearer sk-1"),
            ("authorization", "bearer sk-1"),
            ("x-api-key", "sk-1"),
            ("x-goog-api-key", "sk-1"),
            ("api-key", "sk-1"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            assert_eq!(client_key(&h).as_deref(), Some("sk-1"), "{name}");
        }
        assert_eq!(client_key(&HeaderMap::new()), None);
    }

    #[test]
    fn header_safe_bodies() {
        assert_eq!(
            header_safe_json("{\"m\":\"é\"}".as_bytes()),
            "{\"m\":\"\\u00e9\"}"
        );
    }

    /// What the handler reads from the headers and the body, as it reads them.
    fn admit(path: &str, headers: &HeaderMap, body: &[u8]) -> Result<AdmitBody, ApiError> {
        let key = before_the_body(path, headers)?;
        admit_body(path, headers, key, body)
    }

    /// `pairs`, beside a client key (without one nothing else is read).
    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("sk-kw-test"));
        for (name, value) in pairs {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        h
    }

    #[test]
    fn the_body_is_preferred_to_the_headers() {
        let spoofed = headers(&[
            ("x-keyward-model", "gpt-4o"),
            ("x-keyward-estimated-tokens", "1"),
        ]);
        let body = br#"{"model": "gpt-4o-mini", "max_tokens": 4000}"#;
        let a = admit("/v1/chat/completions", &spoofed, body).unwrap();
        assert_eq!(a.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(a.estimated_tokens, Some(4000));
        // The headers fill what the body leaves out.
        let a = admit("/v1/chat/completions", &spoofed, b"").unwrap();
        assert_eq!(
            (a.model.as_deref(), a.estimated_tokens),
            (Some("gpt-4o"), Some(1))
        );
        let a = admit("/v1/chat/completions", &spoofed, br#"{"messages": []"#).unwrap();
        assert_eq!(
            (a.model.as_deref(), a.estimated_tokens),
            (Some("gpt-4o"), Some(1))
        );
        // Gemini names its model in the path, which the upstream acts on.
        let a = admit(
            "/v1beta/models/gemini-1.5-pro:generateContent",
            &spoofed,
            br#"{"generationConfig": {"maxOutputTokens": 77}}"#,
        )
        .unwrap();
        assert_eq!(
            (a.model.as_deref(), a.estimated_tokens),
            (Some("gemini-1.5-pro"), Some(77))
        );
        // A body that names its model twice is refused, whatever the headers say.
        let twice = br#"{"model": "gpt-4o-mini", "model": "gpt-4o"}"#;
        let e = admit("/v1/chat/completions", &spoofed, twice).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn selection_is_the_default() {
        let a = admit("/v1/chat/completions", &headers(&[]), b"").unwrap();
        assert_eq!((a.select, a.select_if_pooled), (false, true));
        // Without a key: refused before the body is read.
        let e = admit("/v1/chat/completions", &HeaderMap::new(), b"{").unwrap_err();
        assert_eq!(e.code, ErrorCode::MissingKey);
        let a = admit(
            "/v1/messages",
            &headers(&[("x-keyward-select", "true")]),
            b"",
        )
        .unwrap();
        assert_eq!((a.select, a.select_if_pooled), (true, false));
        let a = admit(
            "/v1/messages",
            &headers(&[("x-keyward-select", "false")]),
            b"",
        )
        .unwrap();
        assert_eq!((a.select, a.select_if_pooled), (false, false));
        let e = admit(
            "/v1/messages",
            &headers(&[("x-keyward-select", "maybe")]),
            b"",
        );
        assert!(e.is_err());
    }
}
