//! Request extractors that fail with the contract's error body instead of axum's plain
//! text: JSON bodies (size-limited, unknown fields refused), query strings, path ids.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ErrorCode};

/// The largest JSON body any endpoint accepts.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// A JSON object body. An empty body reads as `{}`, so endpoints whose fields are all
/// optional can be called without one. Anything but an object is refused: serde's derive
/// would otherwise accept an array as a struct in positional form.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the body is larger than {MAX_BODY_BYTES} bytes"),
                )
            })?;
        let text: &[u8] = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => b"{}",
            Some(b'{') => &bytes,
            Some(_) => return Err(ApiError::bad_request("the body must be a JSON object")),
        };
        serde_json::from_slice(text)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// A query string decoded into `T` (which should refuse unknown fields).
pub struct QueryArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or_default())
            .map(QueryArgs)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
    }
}

/// A path parameter as text. A segment that does not decode to UTF-8 (`%ff`) is 400
/// with the contract's body, where axum's own rejection is plain text.
pub struct TextPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for TextPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(text)| TextPath(text))
            .map_err(|_| ApiError::bad_request("the path is not valid UTF-8"))
    }
}

/// A `{id}` path segment that must be a UUID (as every keyward id is).
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::bad_request("the id in the path is not valid UTF-8"))?;
        match uuid::Uuid::try_parse(&id) {
            Ok(uuid) => Ok(IdPath(uuid.hyphenated().to_string())),
            Err(_) => Err(ApiError::bad_request("the id in the path is not a UUID")),
        }
    }
}

/// Reads an optional boolean query value: absent or empty → `None`.
pub fn optional_bool(name: &str, value: Option<&str>) -> Result<Option<bool>, ApiError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some("true") | Some("1") => Ok(Some(true)),
        Some("false") | Some("0") => Ok(Some(false)),
        Some(_) => Err(ApiError::bad_request(format!(
            "{name} must be true or false"
        ))),
    }
}
