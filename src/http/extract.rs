//! Request extractors that fail with the contract's error body instead of axum's plain
//! text: bodies (size-limited, read only once the caller's proof was checked, and within a
//! process-wide budget of bytes held), JSON objects, query strings, path ids.

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::error::{ApiError, ErrorCode};

/// The largest JSON body any endpoint accepts.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// The largest body of `/v1/admit` and `/v1/report`, whose proof (a client key, a lease)
/// is inside the body, so anyone can make keyward read it: their fields are a few names
/// and numbers (a name is at most 200 characters, a lease id 512), and at this bound
/// every data-plane connection at once holds half of [`MAX_BODIES_HELD`], so such bodies
/// alone never spend it.
pub const MAX_DATA_BODY_BYTES: usize = 8 * 1024;

/// The most bytes of request bodies the process holds at once, over every request and
/// both listeners. Each frame of a body takes its size from this budget as it arrives and
/// gives it back when the body is dropped or parsed; a frame that finds it spent gets 503
/// `BUSY` at once. Without it, a caller whose proof is inside the body (`/v1/admit`,
/// `/v1/report`) could make keyward hold 256 KiB per connection, 4,096 connections long.
pub const MAX_BODIES_HELD: usize = 64 * 1024 * 1024;

/// The budget [`MAX_BODIES_HELD`] counts down, in bytes.
static BODIES_HELD: Semaphore = Semaphore::const_new(MAX_BODIES_HELD);

/// A request body not read yet: the handler checks whatever proof the headers carry
/// first, then reads it with [`UnreadBody::json`] or [`UnreadBody::bytes`]. (An extractor
/// that reads, such as `Bytes` or [`JsonBody`], has read the whole body before the handler
/// runs, whoever sent it.)
pub struct UnreadBody(pub Body);

impl<S: Send + Sync> FromRequest<S> for UnreadBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(UnreadBody(req.into_body()))
    }
}

/// A body read whole, with the share of [`MAX_BODIES_HELD`] it holds until dropped.
pub struct HeldBytes<'a> {
    bytes: Bytes,
    _held: Option<SemaphorePermit<'a>>,
}

impl std::ops::Deref for HeldBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl UnreadBody {
    /// The body as a JSON object of at most [`MAX_BODY_BYTES`]. An empty body reads as
    /// `{}`, so endpoints whose fields are all optional can be called without one.
    /// Anything but an object is refused: serde's derive would otherwise accept an array
    /// as a struct in positional form. The bytes are given back once parsed.
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        self.json_within(MAX_BODY_BYTES).await
    }

    /// [`UnreadBody::json`] with a smaller bound than [`MAX_BODY_BYTES`].
    pub async fn json_within<T: DeserializeOwned>(self, limit: usize) -> Result<T, ApiError> {
        let bytes = self.bytes(limit).await?;
        let text: &[u8] = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => b"{}",
            Some(b'{') => &bytes,
            Some(_) => return Err(ApiError::bad_request("the body must be a JSON object")),
        };
        serde_json::from_slice(text)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }

    /// The whole body, if it is at most `limit` bytes (413 `PAYLOAD_TOO_LARGE` else, at
    /// once when its `Content-Length` says so).
    pub async fn bytes(self, limit: usize) -> Result<HeldBytes<'static>, ApiError> {
        read(self.0, limit, &BODIES_HELD).await
    }
}

/// Reads `body` whole, taking what each frame adds to it from `budget` as it arrives.
async fn read(body: Body, limit: usize, budget: &Semaphore) -> Result<HeldBytes<'_>, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {limit} bytes"),
        )
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut held: Option<SemaphorePermit<'_>> = None;
    // What `held` counts: the first frame's length, then the capacity of the copy.
    let mut counted = 0;
    let mut first = Bytes::new();
    // Only a body in several frames is copied (most arrive in one).
    let mut more: Option<Vec<u8>> = None;
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        // A client that stops mid-body: the request bound answers it, or it is gone.
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("the body could not be read: {e}")))?;
        if frame.is_empty() {
            continue;
        }
        let len = more.as_ref().map_or(first.len(), Vec::len) + frame.len();
        if len > limit {
            return Err(too_large());
        }
        // The copy grows by doubling, up to the limit, and counts its whole capacity.
        let capacity = match &more {
            Some(copy) if copy.capacity() >= len => copy.capacity(),
            Some(copy) => (2 * copy.capacity()).max(len).min(limit),
            None if first.is_empty() => len,
            None => (2 * len).min(limit),
        };
        if capacity > counted {
            let permit = u32::try_from(capacity - counted)
                .ok()
                .and_then(|n| budget.try_acquire_many(n).ok())
                .ok_or_else(busy)?;
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            counted = capacity;
        }
        match &mut more {
            Some(copy) => {
                copy.reserve_exact(capacity - copy.len());
                copy.extend_from_slice(&frame);
            }
            None if first.is_empty() => first = frame,
            // The first frame is copied and let go: it may share an allocation larger
            // than itself (the connection's read buffer), which is not held then.
            None => {
                let mut copy = Vec::with_capacity(capacity);
                copy.extend_from_slice(&std::mem::take(&mut first));
                copy.extend_from_slice(&frame);
                more = Some(copy);
            }
        }
    }
    Ok(HeldBytes {
        bytes: more.map_or(first, Bytes::from),
        _held: held,
    })
}

/// The answer when [`MAX_BODIES_HELD`] is spent.
fn busy() -> ApiError {
    let mut error = ApiError::new(
        ErrorCode::Busy,
        format!(
            "keyward already holds {} MiB of request bodies; retry shortly",
            MAX_BODIES_HELD / (1024 * 1024)
        ),
    );
    error.retry_after_ms = Some(1000);
    error
}

/// A JSON object body read before the handler runs, as [`UnreadBody::json`] reads it:
/// for endpoints whose proof is in the body or that need none before it.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        UnreadBody(req.into_body()).json().await.map(JsonBody)
    }
}

/// A JSON object body of at most [`MAX_DATA_BODY_BYTES`], read before the handler runs:
/// `/v1/admit` and `/v1/report`, whose proof is in the body.
pub struct DataBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for DataBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        UnreadBody(req.into_body())
            .json_within(MAX_DATA_BODY_BYTES)
            .await
            .map(DataBody)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A body arriving in `frames`.
    fn body(frames: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Bytes, std::io::Error>> =
            frames.iter().map(|f| Ok(Bytes::from_static(f))).collect();
        Body::from_stream(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn bodies_are_read_whole_within_their_limit() {
        let budget = Semaphore::new(100);
        let read_ = read(body(&[b"{\"a\":", b"", b"1}"]), 10, &budget).await;
        let bytes = read_.unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(&*bytes, b"{\"a\":1}");
        // The copy of a body in several frames counts its capacity (twice the first two).
        assert_eq!(budget.available_permits(), 90);
        drop(bytes);
        assert_eq!(budget.available_permits(), 100);
        let whole = read(body(&[b"1234", b"567", b"890"]), 10, &budget).await;
        assert_eq!(whole.ok().map(|b| b.to_vec()), Some(b"1234567890".to_vec()));
        let too_large = read(body(&[b"123456", b"78901"]), 10, &budget).await;
        assert_eq!(
            too_large.err().map(|e| e.code),
            Some(ErrorCode::PayloadTooLarge)
        );
        // What was taken before the refusal is given back with it.
        assert_eq!(budget.available_permits(), 100);
        let empty = read(body(&[]), 10, &budget).await;
        assert_eq!(empty.ok().map(|b| b.len()), Some(0));
    }

    #[tokio::test]
    async fn a_spent_budget_refuses_at_once_and_comes_back() {
        let budget = Semaphore::new(10);
        let held = read(body(&[b"123456"]), 100, &budget).await;
        let held = held.unwrap_or_else(|e| panic!("{}", e.message));
        // The second frame finds the budget spent: 503 BUSY, with a retry hint.
        let refused = read(body(&[b"1234", b"5"]), 100, &budget).await;
        let refused = refused
            .err()
            .map(|e| (e.code, e.status().as_u16(), e.retry_after_ms));
        assert_eq!(refused, Some((ErrorCode::Busy, 503, Some(1000))));
        assert_eq!(budget.available_permits(), 4);
        drop(held);
        let again = read(body(&[b"1234", b"5"]), 100, &budget).await;
        assert_eq!(again.ok().map(|b| b.len()), Some(5));
    }

    #[tokio::test]
    async fn json_is_an_object_and_empty_reads_as_empty() {
        let json = |frames: &[&'static [u8]]| {
            UnreadBody(body(frames)).json::<std::collections::BTreeMap<String, i64>>()
        };
        assert_eq!(json(&[b"  "]).await.ok().map(|m| m.len()), Some(0));
        assert_eq!(
            json(&[b"{\"a\"", b":1}"]).await.ok().map(|m| m.len()),
            Some(1)
        );
        let array = json(&[b"[1]"]).await.err().map(|e| e.code);
        assert_eq!(array, Some(ErrorCode::BadRequest));
    }
}
