//! Request extractors that fail with the contract's error body instead of axum's plain
//! text: bodies (size-limited, read only once the caller's proof was checked, and within a
//! budget of bytes held: the data plane's, shared out by peer address, or the admin
//! API's own), JSON objects, query strings, path ids.

use std::net::IpAddr;
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
/// every remote data-plane connection at once holds half of [`MAX_BODIES_HELD`].
pub const MAX_DATA_BODY_BYTES: usize = 8 * 1024;

/// The most bytes of request bodies the data plane holds at once for remote peers (any
/// address but loopback), over all their requests. Each frame of a body takes its size
/// from this budget as it arrives and gives it back when the body is dropped or parsed;
/// a frame that finds it spent gets 503 `BUSY` at once. Without it, a caller whose proof
/// is inside the body (`/v1/admit`, `/v1/report`) could make keyward hold 256 KiB per
/// connection, 4,096 connections long.
pub const MAX_BODIES_HELD: usize = 64 * 1024 * 1024;

/// The most of [`MAX_BODIES_HELD`] one remote peer (one IP address, IPv4-mapped IPv6
/// counted as its IPv4 address) holds at once: eight `/authz` bodies of 1 MiB, so at least
/// eight addresses are needed to spend the budget. Beyond it that peer's next frame gets
/// 503 `BUSY` while other peers' requests go on. Every data-plane body counts, whatever
/// its proof and wherever it is (`/v1/admit` and `/v1/report` too): the peer is known
/// before any body is read. Shared out by peer, not by client key: one user may hold many
/// keys, and a key's share could be filled by its own tenant to refuse the proxy's
/// reports of that key's requests; as with connections (`KEYWARD_MAX_CONNECTIONS_PER_PEER`),
/// one attacker pod has one address.
pub const MAX_BODIES_HELD_PER_PEER: usize = MAX_BODIES_HELD / 8;

/// The most bytes of request bodies the data plane holds at once for loopback peers
/// (127.0.0.0/8, `::1`, IPv4-mapped loopback): the proxy beside keyward, which sends the
/// real traffic and its reports. A budget of its own that remote peers cannot touch, and
/// no share within it: every loopback request comes from the same proxy (and the
/// probes), so there is no one to keep apart.
pub const MAX_LOOPBACK_BODIES_HELD: usize = 64 * 1024 * 1024;

/// The most bytes of request bodies the admin API holds at once: a budget of its own,
/// so the data plane can never make the operator's calls fail, nor the reverse (64 bodies
/// of the largest size, [`MAX_BODY_BYTES`]; admin callers hold the admin token and are
/// few).
pub const MAX_ADMIN_BODIES_HELD: usize = 16 * 1024 * 1024;

/// The address of the peer a request came from, put in each request's extensions by the
/// listener when it accepted the connection; the data plane's bodies are counted by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub IpAddr);

impl Peer {
    /// The peer of a request that has none in its extensions: a remote peer of the
    /// unspecified address, so it is held to the strictest budget. Every request through
    /// the listeners has its peer; only a router called directly (a test) has none.
    const UNKNOWN: Peer = Peer(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));

    /// The peer of `req` (see [`Peer::UNKNOWN`] for a request without one).
    fn of(req: &Request) -> Peer {
        req.extensions()
            .get::<Peer>()
            .copied()
            .unwrap_or(Peer::UNKNOWN)
    }
}

/// The data plane's budget: [`MAX_BODIES_HELD`] for remote peers, with
/// [`MAX_BODIES_HELD_PER_PEER`] per peer, and [`MAX_LOOPBACK_BODIES_HELD`] for loopback.
static DATA_BODIES: LazyLock<Budget> = LazyLock::new(|| {
    Budget::new(
        MAX_BODIES_HELD,
        Some(MAX_BODIES_HELD_PER_PEER),
        Some(MAX_LOOPBACK_BODIES_HELD),
        "keyward",
    )
});

/// The admin API's budget: [`MAX_ADMIN_BODIES_HELD`] for every caller, loopback or not
/// (every caller holds the same token, so there is no share to keep apart).
static ADMIN_BODIES: LazyLock<Budget> =
    LazyLock::new(|| Budget::new(MAX_ADMIN_BODIES_HELD, None, None, "the admin API"));

/// Bytes of request bodies held at once: a total for remote peers with a share of it per
/// peer address, and a total of loopback's own.
struct Budget {
    /// What is left of the remote peers' total (every peer's, without `loopback`).
    remote: Semaphore,
    remote_total: usize,
    /// The most one remote peer holds of `remote`; `None`: no share.
    share: Option<usize>,
    /// What is left of loopback's own total; `None`: loopback draws on `remote`.
    loopback: Option<Semaphore>,
    loopback_total: usize,
    /// The bytes each remote peer's bodies hold, for peers with a body in flight only: an
    /// entry is removed when it falls to 0, so the map is as large as the peers sending.
    peers: DashMap<IpAddr, usize>,
    /// Who answers `BUSY` when a total is spent, for its message.
    whose: &'static str,
}

impl Budget {
    fn new(
        remote: usize,
        share: Option<usize>,
        loopback: Option<usize>,
        whose: &'static str,
    ) -> Budget {
        Budget {
            remote: Semaphore::new(remote),
            remote_total: remote,
            share,
            loopback: loopback.map(Semaphore::new),
            loopback_total: loopback.unwrap_or(0),
            peers: DashMap::new(),
            whose,
        }
    }

    /// A hold of nothing yet for a body of `peer`: on loopback's budget when there is
    /// one, else on the remote one and within the peer's share.
    fn hold(&self, peer: Peer) -> Held<'_> {
        // One peer whether it connects over IPv4 or IPv4-mapped IPv6.
        let ip = peer.0.to_canonical();
        let (pool, peer) = match &self.loopback {
            Some(loopback) if ip.is_loopback() => (loopback, None),
            _ => (&self.remote, self.share.map(|_| ip)),
        };
        Held {
            budget: self,
            pool,
            permit: None,
            peer,
            bytes: 0,
        }
    }

    /// Adds `n` to what `peer` holds, if that stays within the share.
    fn take_share(&self, peer: IpAddr, share: usize, n: usize) -> bool {
        // The peer's address is the map's key as it is: no allocation per frame.
        {
            let mut held = self.peers.entry(peer).or_insert(0);
            if *held + n <= share {
                *held += n;
                return true;
            }
        }
        // Refused: an entry made just now for a peer holding nothing goes again.
        self.peers.remove_if(&peer, |_, held| *held == 0);
        false
    }

    /// Takes `n` back from what `peer` holds; the entry goes when it falls to 0.
    fn give_back(&self, peer: IpAddr, n: usize) {
        if n == 0 {
            return;
        }
        let emptied = match self.peers.get_mut(&peer) {
            Some(mut held) => {
                *held = held.saturating_sub(n);
                *held == 0
            }
            None => false,
        };
        // Another body of the peer may have taken bytes since: only an empty entry goes.
        if emptied {
            self.peers.remove_if(&peer, |_, held| *held == 0);
        }
    }

    /// The answer when the total `pool` draws on is spent.
    fn spent(&self, pool: &Semaphore) -> ApiError {
        let loopback = self
            .loopback
            .as_ref()
            .is_some_and(|l| std::ptr::eq(l, pool));
        let (total, whom) = match (loopback, self.loopback.is_some()) {
            (true, _) => (self.loopback_total, " for loopback peers"),
            (false, true) => (self.remote_total, " for remote peers"),
            (false, false) => (self.remote_total, ""),
        };
        busy(format!(
            "{} already holds {} MiB of request bodies{whom}; retry shortly",
            self.whose,
            total / (1024 * 1024)
        ))
    }

    /// The answer when `peer`'s share is spent.
    fn share_spent(&self, peer: IpAddr, share: usize) -> ApiError {
        busy(format!(
            "the requests from this peer address ({peer}) already hold {} MiB of request bodies, its share of the {} MiB {} holds for remote peers; retry shortly",
            share / (1024 * 1024),
            self.remote_total / (1024 * 1024),
            self.whose,
        ))
    }
}

/// 503 `BUSY` with a retry hint: bodies held come back within the request bound (10 s).
fn busy(message: String) -> ApiError {
    let mut error = ApiError::new(ErrorCode::Busy, message);
    error.retry_after_ms = Some(1000);
    error
}

/// What one body holds of a [`Budget`], given back (to its peer's share too) when dropped.
struct Held<'a> {
    budget: &'a Budget,
    /// The total it draws on: loopback's or the remote peers'.
    pool: &'a Semaphore,
    permit: Option<SemaphorePermit<'a>>,
    /// The remote peer whose share it counts in, when the budget has shares.
    peer: Option<IpAddr>,
    /// The bytes taken, from the total and from the peer's share alike.
    bytes: usize,
}

impl Held<'_> {
    /// Takes `n` more bytes: from the peer's share first, then from the total.
    fn take(&mut self, n: usize) -> Result<(), ApiError> {
        let budget = self.budget;
        let n32 = u32::try_from(n).map_err(|_| budget.spent(self.pool))?;
        if let (Some(peer), Some(share)) = (self.peer, budget.share) {
            if !budget.take_share(peer, share, n) {
                return Err(budget.share_spent(peer, share));
            }
        }
        let permit = match self.pool.try_acquire_many(n32) {
            Ok(permit) => permit,
            Err(_) => {
                if let Some(peer) = self.peer {
                    budget.give_back(peer, n);
                }
                return Err(budget.spent(self.pool));
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
        if let Some(peer) = self.peer {
            self.budget.give_back(peer, self.bytes);
        }
    }
}

/// A request body not read yet: the handler checks whatever proof the headers carry
/// first, then reads it with [`UnreadBody::json`] or [`UnreadBody::bytes`], within the
/// data plane's budget, counted by the request's [`Peer`]. (An extractor that reads,
/// such as `Bytes` or [`DataBody`], has read the whole body before the handler runs,
/// whoever sent it.)
pub struct UnreadBody {
    body: Body,
    budget: &'static Budget,
    peer: Peer,
}

impl<S: Send + Sync> FromRequest<S> for UnreadBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(UnreadBody::data(req))
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
    /// The body of data-plane request `req`, counted by its peer: in loopback's budget
    /// ([`MAX_LOOPBACK_BODIES_HELD`]) or in the remote peers' ([`MAX_BODIES_HELD`]) and
    /// its peer's share of it ([`MAX_BODIES_HELD_PER_PEER`]).
    fn data(req: Request) -> UnreadBody {
        let peer = Peer::of(&req);
        UnreadBody {
            body: req.into_body(),
            budget: &DATA_BODIES,
            peer,
        }
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
        read(self.body, limit, self.budget.hold(self.peer)).await
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
        let peer = Peer::of(&req);
        let body = UnreadBody {
            body: req.into_body(),
            budget: &ADMIN_BODIES,
            peer,
        };
        body.json().await.map(AdminBody)
    }
}

/// A JSON object body of at most [`MAX_DATA_BODY_BYTES`], read before the handler runs:
/// `/v1/admit` and `/v1/report`, whose proof is in the body. It counts by its peer, as
/// every data-plane body does ([`UnreadBody`]).
pub struct DataBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for DataBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        UnreadBody::data(req)
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

    /// A peer of `text`.
    fn peer(text: &str) -> Peer {
        Peer(text.parse().unwrap())
    }

    /// A budget of `remote` bytes, `share` per remote peer and `loopback` of its own.
    fn data(remote: usize, share: usize, loopback: usize) -> Budget {
        Budget::new(remote, Some(share), Some(loopback), "test")
    }

    #[tokio::test]
    async fn bodies_are_read_whole_within_their_limit() {
        let budget = Budget::new(100, None, None, "test");
        let anyone = || budget.hold(peer("10.0.0.1"));
        let read_ = read(body(&[b"{\"a\":", b"", b"1}"]), 10, anyone()).await;
        let bytes = read_.unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(&*bytes, b"{\"a\":1}");
        // The copy of a body in several frames counts its capacity (twice the first two).
        assert_eq!(budget.remote.available_permits(), 90);
        drop(bytes);
        assert_eq!(budget.remote.available_permits(), 100);
        let whole = read(body(&[b"1234", b"567", b"890"]), 10, anyone()).await;
        assert_eq!(whole.ok().map(|b| b.to_vec()), Some(b"1234567890".to_vec()));
        let too_large = read(body(&[b"123456", b"78901"]), 10, anyone()).await;
        assert_eq!(
            too_large.err().map(|e| e.code),
            Some(ErrorCode::PayloadTooLarge)
        );
        // What was taken before the refusal is given back with it.
        assert_eq!(budget.remote.available_permits(), 100);
        let empty = read(body(&[]), 10, anyone()).await;
        assert_eq!(empty.ok().map(|b| b.len()), Some(0));
        // Without shares, no peer is counted on its own.
        assert!(budget.peers.is_empty());
    }

    #[tokio::test]
    async fn a_spent_budget_refuses_at_once_and_comes_back() {
        // The admin API's shape: one total for every caller, loopback included.
        let budget = Budget::new(10, None, None, "test");
        let held = read(body(&[b"123456"]), 100, budget.hold(peer("127.0.0.1"))).await;
        let held = held.unwrap_or_else(|e| panic!("{}", e.message));
        // The second frame finds the budget spent: 503 BUSY, with a retry hint.
        let refused = read(body(&[b"1234", b"5"]), 100, budget.hold(peer("10.0.0.1"))).await;
        let refused = refused
            .err()
            .map(|e| (e.code, e.status().as_u16(), e.retry_after_ms, e.message));
        assert_eq!(
            refused,
            Some((
                ErrorCode::Busy,
                503,
                Some(1000),
                "test already holds 0 MiB of request bodies; retry shortly".to_string()
            ))
        );
        assert_eq!(budget.remote.available_permits(), 4);
        drop(held);
        let again = read(body(&[b"1234", b"5"]), 100, budget.hold(peer("::1"))).await;
        assert_eq!(again.ok().map(|b| b.len()), Some(5));
    }

    #[tokio::test]
    async fn a_remote_peer_holds_its_share_and_other_peers_go_on() {
        let budget = data(20, 8, 10);
        let from = |text: &str| budget.hold(peer(text));
        let a1 = read(body(&[b"12345"]), 100, from("10.0.0.1")).await;
        let a1 = a1.unwrap_or_else(|e| panic!("{}", e.message));
        // Peer a's next body finds its share (8) spent at its second frame: refused at
        // once with 503 BUSY, naming the peer's share, and gives its 2 bytes back. The
        // same peer over IPv4-mapped IPv6 is the same peer.
        let a2 = read(body(&[b"12", b"34"]), 100, from("::ffff:10.0.0.1")).await;
        let a2 = a2.err().map(|e| (e.code, e.retry_after_ms, e.message));
        assert!(
            matches!(&a2, Some((ErrorCode::Busy, Some(1000), m)) if m.contains("peer address (10.0.0.1)")),
            "{a2:?}"
        );
        let a = ip("10.0.0.1");
        assert_eq!(
            (
                budget.remote.available_permits(),
                budget.peers.get(&a).map(|h| *h)
            ),
            (15, Some(5))
        );
        // Peer b is read meanwhile.
        // (A copy's capacity doubles up to the body's limit: 8 here, all it holds.)
        let b = read(body(&[b"1234", b"5678"]), 8, from("10.0.0.2")).await;
        let b = b.unwrap_or_else(|e| panic!("{}", e.message));
        let b2 = read(body(&[b"1234"]), 100, from("10.0.0.2")).await;
        assert_eq!(b2.err().map(|e| e.code), Some(ErrorCode::Busy));
        assert_eq!(budget.remote.available_permits(), 7);
        // Loopback draws on its own budget: the remote peers' is untouched by it, and
        // loopback has no share (10 of its own for one body).
        let local = read(body(&[b"1234567890"]), 100, from("127.0.0.1")).await;
        let local = local.unwrap_or_else(|e| panic!("{}", e.message));
        let mapped = read(body(&[b"1"]), 100, from("::ffff:127.0.0.1")).await;
        let mapped = mapped.err().map(|e| e.message);
        assert_eq!(
            mapped.as_deref(),
            Some("test already holds 0 MiB of request bodies for loopback peers; retry shortly")
        );
        assert_eq!(budget.remote.available_permits(), 7);
        drop(local);
        // Peers c and d spend what is left of the remote total: the total's refusal,
        // and d holds nothing after it (no entry is left behind).
        let c = read(body(&[b"1234567"]), 100, from("10.0.0.3")).await;
        let c = c.unwrap_or_else(|e| panic!("{}", e.message));
        let d = read(body(&[b"1"]), 100, from("10.0.0.4")).await;
        let d = d.err().map(|e| (e.code, e.message));
        assert!(
            matches!(&d, Some((ErrorCode::Busy, m)) if m.ends_with("for remote peers; retry shortly")),
            "{d:?}"
        );
        assert!(budget.peers.get(&ip("10.0.0.4")).is_none());
        // Loopback is still served.
        let local = read(body(&[b"12345"]), 100, from("::1")).await;
        assert_eq!(local.ok().map(|b| b.len()), Some(5));
        // What a peer's bodies held is given back when they are dropped, its entry with it.
        drop((a1, c));
        assert!(budget.peers.get(&a).is_none());
        assert_eq!(budget.peers.len(), 1);
        let a3 = read(body(&[b"1234567", b"8"]), 8, from("10.0.0.1")).await;
        assert_eq!(a3.ok().map(|b| b.len()), Some(8));
        drop(b);
        assert!(budget.peers.is_empty());
        assert_eq!(budget.remote.available_permits(), 20);
        // A body larger than the share is refused whatever else the peer holds, and
        // leaves no entry behind.
        let over = read(body(&[b"123456789"]), 100, from("10.0.0.5")).await;
        assert_eq!(over.err().map(|e| e.code), Some(ErrorCode::Busy));
        assert!(budget.peers.is_empty());
        // A request without its peer (a router called directly) is a remote peer.
        assert_eq!(Peer::of(&Request::new(Body::empty())), peer("0.0.0.0"));
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test]
    async fn json_is_an_object_and_empty_reads_as_empty() {
        let json = |frames: &[&'static [u8]]| {
            let mut req = Request::new(body(frames));
            req.extensions_mut().insert(peer("127.0.0.1"));
            UnreadBody::data(req).json::<std::collections::BTreeMap<String, i64>>()
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
