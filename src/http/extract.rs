//! Request extractors that fail with the contract's error body instead of axum's plain
//! text: bodies (size-limited, read only once the caller's proof was checked, and within a
//! budget of bytes held: the data plane's, with a share per client key, or the admin
//! API's own), JSON objects, query strings, path ids.

use std::sync::LazyLock;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use dashmap::DashMap;
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

/// The most bytes of request bodies the data plane holds at once, over every request.
/// Each frame of a body takes its size from this budget as it arrives and gives it back
/// when the body is dropped or parsed; a frame that finds it spent gets 503 `BUSY` at
/// once. Without it, a caller whose proof is inside the body (`/v1/admit`, `/v1/report`)
/// could make keyward hold 256 KiB per connection, 4,096 connections long.
pub const MAX_BODIES_HELD: usize = 64 * 1024 * 1024;

/// The most of [`MAX_BODIES_HELD`] the requests of one client key hold at once: four
/// `/authz` bodies of 1 MiB. Beyond it that key's next frame gets 503 `BUSY` while other
/// keys' requests go on, so the holder of one valid key, sending bodies slowly, cannot
/// spend the budget of every tenant. A body is counted in its key's share where the key
/// is known before the body is read: `/authz` (the key is looked up first) and
/// `/v1/report/upstream` (the lease names its key). `/v1/admit` and `/v1/report` carry
/// their proof inside the body, so they have no key before the read and count against
/// the whole budget only (8 KiB each at most, [`MAX_DATA_BODY_BYTES`]); `/v1/select`'s
/// caller holds the data-plane token, the operator's own proxy, and is not a tenant.
pub const MAX_BODIES_HELD_PER_KEY: usize = MAX_BODIES_HELD / 16;

/// The most bytes of request bodies the admin API holds at once: a budget of its own,
/// so the data plane can never make the operator's calls fail, nor the reverse (64 bodies
/// of the largest size, [`MAX_BODY_BYTES`]; admin callers hold the admin token and are
/// few).
pub const MAX_ADMIN_BODIES_HELD: usize = 16 * 1024 * 1024;

/// The data plane's budget: [`MAX_BODIES_HELD`], with [`MAX_BODIES_HELD_PER_KEY`] per key.
static DATA_BODIES: LazyLock<Budget> =
    LazyLock::new(|| Budget::new(MAX_BODIES_HELD, MAX_BODIES_HELD_PER_KEY, "keyward"));

/// The admin API's budget: [`MAX_ADMIN_BODIES_HELD`] (every caller holds the same token,
/// so there is no share to keep apart).
static ADMIN_BODIES: LazyLock<Budget> = LazyLock::new(|| {
    Budget::new(
        MAX_ADMIN_BODIES_HELD,
        MAX_ADMIN_BODIES_HELD,
        "the admin API",
    )
});

/// Bytes of request bodies held at once: a total, and a share of it per client key.
struct Budget {
    /// What is left of the total, in bytes.
    free: Semaphore,
    total: usize,
    share: usize,
    /// The bytes each client key's bodies hold, for keys with a body in flight only: an
    /// entry is removed when it falls to 0, so the map is as large as the keys sending.
    keys: DashMap<String, usize>,
    /// Who answers `BUSY` when the total is spent, for its message.
    whose: &'static str,
}

impl Budget {
    fn new(total: usize, share: usize, whose: &'static str) -> Budget {
        Budget {
            free: Semaphore::new(total),
            total,
            share,
            keys: DashMap::new(),
            whose,
        }
    }

    /// A hold of nothing yet, counted in `key`'s share too when there is one.
    fn hold(&self, key: Option<String>) -> Held<'_> {
        Held {
            budget: self,
            permit: None,
            key,
            bytes: 0,
        }
    }

    /// Adds `n` to what `key` holds, if that stays within the share.
    fn take_share(&self, key: &str, n: usize) -> bool {
        // Most frames are of a key already holding bytes: no allocation for its name.
        if let Some(mut held) = self.keys.get_mut(key) {
            if *held + n > self.share {
                return false;
            }
            *held += n;
            return true;
        }
        if n > self.share {
            return false;
        }
        let mut held = self.keys.entry(key.to_owned()).or_insert(0);
        if *held + n > self.share {
            return false;
        }
        *held += n;
        true
    }

    /// Takes `n` back from what `key` holds; the entry goes when it falls to 0.
    fn give_back(&self, key: &str, n: usize) {
        if n == 0 {
            return;
        }
        let emptied = match self.keys.get_mut(key) {
            Some(mut held) => {
                *held = held.saturating_sub(n);
                *held == 0
            }
            None => false,
        };
        // Another body of the key may have taken bytes since: only an empty entry goes.
        if emptied {
            self.keys.remove_if(key, |_, held| *held == 0);
        }
    }

    /// The answer when the total is spent.
    fn spent(&self) -> ApiError {
        busy(format!(
            "{} already holds {} MiB of request bodies; retry shortly",
            self.whose,
            self.total / (1024 * 1024)
        ))
    }

    /// The answer when a key's share is spent.
    fn share_spent(&self) -> ApiError {
        busy(format!(
            "this client key's requests already hold {} MiB of request bodies, its share of keyward's {} MiB; retry shortly",
            self.share / (1024 * 1024),
            self.total / (1024 * 1024)
        ))
    }
}

/// 503 `BUSY` with a retry hint: bodies held come back within the request bound (10 s).
fn busy(message: String) -> ApiError {
    let mut error = ApiError::new(ErrorCode::Busy, message);
    error.retry_after_ms = Some(1000);
    error
}

/// What one body holds of a [`Budget`], given back (to its key's share too) when dropped.
struct Held<'a> {
    budget: &'a Budget,
    permit: Option<SemaphorePermit<'a>>,
    key: Option<String>,
    /// The bytes taken, from the total and from the key's share alike.
    bytes: usize,
}

impl Held<'_> {
    /// Takes `n` more bytes: from the key's share first, then from the total.
    fn take(&mut self, n: usize) -> Result<(), ApiError> {
        let budget = self.budget;
        let n32 = u32::try_from(n).map_err(|_| budget.spent())?;
        if let Some(key) = &self.key {
            if !budget.take_share(key, n) {
                return Err(budget.share_spent());
            }
        }
        let permit = match budget.free.try_acquire_many(n32) {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(key) = &self.key {
                    budget.give_back(key, n);
                }
                return Err(budget.spent());
            }
        };
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.budget.give_back(key, self.bytes);
        }
    }
}

/// A request body not read yet: the handler checks whatever proof the headers carry
/// first, then reads it with [`UnreadBody::json`] or [`UnreadBody::bytes`], within the
/// data plane's budget (and, after [`UnreadBody::held_by`], its key's share). (An
/// extractor that reads, such as `Bytes` or [`DataBody`], has read the whole body before
/// the handler runs, whoever sent it.)
pub struct UnreadBody {
    body: Body,
    budget: &'static Budget,
    key: Option<String>,
}

impl<S: Send + Sync> FromRequest<S> for UnreadBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(UnreadBody::data(req.into_body()))
    }
}

/// A body read whole, with the part of its budget it holds until dropped.
pub struct HeldBytes<'a> {
    bytes: Bytes,
    _held: Held<'a>,
}

impl std::ops::Deref for HeldBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl UnreadBody {
    /// A data-plane body, counted against [`MAX_BODIES_HELD`] alone until
    /// [`UnreadBody::held_by`] names its key.
    fn data(body: Body) -> UnreadBody {
        UnreadBody {
            body,
            budget: &DATA_BODIES,
            key: None,
        }
    }

    /// Counts the body within client key `key_id`'s share as well
    /// ([`MAX_BODIES_HELD_PER_KEY`]): for a body whose key is known before it is read.
    pub fn held_by(mut self, key_id: &str) -> UnreadBody {
        self.key = Some(key_id.to_owned());
        self
    }

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
        read(self.body, limit, self.budget.hold(self.key)).await
    }
}

/// Reads `body` whole, taking what each frame adds to it into `held` as it arrives.
async fn read(body: Body, limit: usize, mut held: Held<'_>) -> Result<HeldBytes<'_>, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {limit} bytes"),
        )
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
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
            held.take(capacity - counted)?;
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

/// A JSON object body of the admin API, read before the handler runs (after the admin
/// token was checked: `require_admin` wraps every route) as [`UnreadBody::json`] reads
/// it, within the admin API's own budget ([`MAX_ADMIN_BODIES_HELD`]).
pub struct AdminBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AdminBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let body = UnreadBody {
            body: req.into_body(),
            budget: &ADMIN_BODIES,
            key: None,
        };
        body.json().await.map(AdminBody)
    }
}

/// A JSON object body of at most [`MAX_DATA_BODY_BYTES`], read before the handler runs:
/// `/v1/admit` and `/v1/report`, whose proof is in the body. No key is known before the
/// read, so it counts against the data plane's whole budget only, not a key's share.
pub struct DataBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for DataBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        UnreadBody::data(req.into_body())
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

    /// What `budget` has left of its total.
    fn free(budget: &Budget) -> usize {
        budget.free.available_permits()
    }

    #[tokio::test]
    async fn bodies_are_read_whole_within_their_limit() {
        let budget = Budget::new(100, 100, "test");
        let read_ = read(body(&[b"{\"a\":", b"", b"1}"]), 10, budget.hold(None)).await;
        let bytes = read_.unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(&*bytes, b"{\"a\":1}");
        // The copy of a body in several frames counts its capacity (twice the first two).
        assert_eq!(free(&budget), 90);
        drop(bytes);
        assert_eq!(free(&budget), 100);
        let whole = read(body(&[b"1234", b"567", b"890"]), 10, budget.hold(None)).await;
        assert_eq!(whole.ok().map(|b| b.to_vec()), Some(b"1234567890".to_vec()));
        let too_large = read(body(&[b"123456", b"78901"]), 10, budget.hold(None)).await;
        assert_eq!(
            too_large.err().map(|e| e.code),
            Some(ErrorCode::PayloadTooLarge)
        );
        // What was taken before the refusal is given back with it.
        assert_eq!(free(&budget), 100);
        let empty = read(body(&[]), 10, budget.hold(None)).await;
        assert_eq!(empty.ok().map(|b| b.len()), Some(0));
    }

    #[tokio::test]
    async fn a_spent_budget_refuses_at_once_and_comes_back() {
        let budget = Budget::new(10, 10, "test");
        let held = read(body(&[b"123456"]), 100, budget.hold(None)).await;
        let held = held.unwrap_or_else(|e| panic!("{}", e.message));
        // The second frame finds the budget spent: 503 BUSY, with a retry hint.
        let refused = read(body(&[b"1234", b"5"]), 100, budget.hold(None)).await;
        let refused = refused
            .err()
            .map(|e| (e.code, e.status().as_u16(), e.retry_after_ms));
        assert_eq!(refused, Some((ErrorCode::Busy, 503, Some(1000))));
        assert_eq!(free(&budget), 4);
        drop(held);
        let again = read(body(&[b"1234", b"5"]), 100, budget.hold(None)).await;
        assert_eq!(again.ok().map(|b| b.len()), Some(5));
    }

    #[tokio::test]
    async fn a_key_holds_its_share_and_other_keys_go_on() {
        let budget = Budget::new(20, 8, "test");
        let key = |name: &str| budget.hold(Some(name.to_string()));
        let a1 = read(body(&[b"12345"]), 100, key("a")).await;
        let a1 = a1.unwrap_or_else(|e| panic!("{}", e.message));
        // Key a's next body finds its share (8) spent at its second frame: refused at
        // once with 503 BUSY, saying it is the key's share, and gives its 2 bytes back.
        let a2 = read(body(&[b"12", b"34"]), 100, key("a")).await;
        let a2 = a2.err().map(|e| (e.code, e.retry_after_ms, e.message));
        assert!(
            matches!(&a2, Some((ErrorCode::Busy, Some(1000), m)) if m.contains("client key")),
            "{a2:?}"
        );
        assert_eq!(
            (free(&budget), budget.keys.get("a").map(|h| *h)),
            (15, Some(5))
        );
        // Key b, and a body of no key, are read meanwhile.
        // (A copy's capacity doubles up to the body's limit: 8 here, all it holds.)
        let b = read(body(&[b"1234", b"5678"]), 8, key("b")).await;
        let b = b.unwrap_or_else(|e| panic!("{}", e.message));
        let anyone = read(body(&[b"1234"]), 100, budget.hold(None)).await;
        let anyone = anyone.unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(free(&budget), 3);
        // The total is spent before c's share is: the total's refusal, and c holds
        // nothing after it (no entry is left behind).
        let c = read(body(&[b"1234"]), 100, key("c")).await;
        let c = c.err().map(|e| (e.code, e.message));
        assert!(
            matches!(&c, Some((ErrorCode::Busy, m)) if m.starts_with("test already holds")),
            "{c:?}"
        );
        assert!(budget.keys.get("c").is_none());
        // What a key's bodies held is given back when they are dropped, its entry with it.
        drop((a1, anyone));
        assert!(budget.keys.get("a").is_none());
        assert_eq!(budget.keys.len(), 1);
        let a3 = read(body(&[b"1234567", b"8"]), 8, key("a")).await;
        assert_eq!(a3.ok().map(|b| b.len()), Some(8));
        drop(b);
        assert!(budget.keys.is_empty());
        assert_eq!(free(&budget), 20);
        // A body larger than the share is refused whatever else the key holds.
        let over = read(body(&[b"123456789"]), 100, key("d")).await;
        assert_eq!(over.err().map(|e| e.code), Some(ErrorCode::Busy));
        assert!(budget.keys.is_empty());
    }

    #[tokio::test]
    async fn json_is_an_object_and_empty_reads_as_empty() {
        let json = |frames: &[&'static [u8]]| {
            UnreadBody::data(body(frames)).json::<std::collections::BTreeMap<String, i64>>()
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
