//! The two HTTP listeners: the data plane and the admin API.
//!
//! [`serve`] takes already-bound listeners and a shutdown future, so tests bind port 0
//! and run real servers in-process. On shutdown both listeners stop accepting, in-flight
//! requests get the configured grace period to finish, then the call returns.

pub mod admin;
pub mod authz;
mod conns;
pub mod data;
pub mod error;
pub mod error_code;
pub mod extract;
mod linger;
pub mod openapi;
mod proof;
pub mod ratelimit;
mod report;
pub mod scan;
mod stall;
pub mod state;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use error::{ApiError, ErrorCode};
pub use state::AppState;

/// The largest total size of a request's headers; larger ones get 431 with the JSON
/// error body. (hyper itself refuses far larger ones, without a body.)
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The most bytes hyper buffers of a connection's input: an unfinished request head
/// larger than this is refused at once (a bare 431) rather than held until the header
/// bound. hyper's default (about 400 KiB) let 1,024 connections of one peer, each
/// sending an endless header block, take 400 MiB. Room for [`MAX_HEADER_BYTES`], so that
/// [`refuse_headers`] answers those in the contract's terms, and a long request line.
const MAX_READ_BUFFER: usize = MAX_HEADER_BYTES + 16 * 1024;

/// The size asked of the kernel for each accepted socket's send and receive buffers (it
/// doubles it for its own bookkeeping).
const SOCKET_BUFFER: usize = 16 * 1024;

/// The most headers a request may have; more get 431 with the JSON error body.
pub const MAX_HEADERS: usize = 100;

/// How many headers hyper parses before it refuses a request itself, with a bare 431
/// and no body. Well above [`MAX_HEADERS`], so that [`refuse_headers`] is the one that
/// answers in the contract's terms; hyper's own default is exactly 100.
const HYPER_MAX_HEADERS: usize = 1000;

/// The contract's answer to a request whose headers are too many or too large; `None`
/// for any other request. Checked in [`serve_one`] before the router sees the request
/// (an axum middleware did this before: it boxed every request's future once more).
fn refuse_headers(headers: &axum::http::HeaderMap) -> Option<axum::response::Response> {
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let message = if headers.len() > MAX_HEADERS {
        format!("the request has more than {MAX_HEADERS} headers")
    } else if size > MAX_HEADER_BYTES {
        format!("the request headers are larger than {MAX_HEADER_BYTES} bytes")
    } else {
        return None;
    };
    Some(axum::response::IntoResponse::into_response(ApiError::new(
        ErrorCode::HeadersTooLarge,
        message,
    )))
}

/// Whether the request's `Authorization: Bearer …` is the token whose SHA-256 is
/// `expected`. Digests of equal length are compared in constant time, so neither the
/// token's content nor its length leaks through timing.
fn bearer_matches(headers: &axum::http::HeaderMap, expected: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| crate::crypto::digest(token.trim().as_bytes()))
        .is_some_and(|presented| bool::from(presented.ct_eq(expected)))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

/// What one listener allows a client: how long a request may take to arrive (headers,
/// then body) and be answered, and how many connections it serves at once. Anyone on the
/// pod network reaches the data plane: without these, connections that never finish
/// their headers or body, or never read their answers, hold a file descriptor and a
/// buffer each, forever.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Headers must arrive within this of the connection opening or of the previous
    /// answer (hyper's header read timeout: an idle keep-alive connection closes then).
    pub headers: Duration,
    /// The whole request, body included, arrives and is answered within this: else 408.
    /// Writing the answer may also wait this long without progress (a client that does
    /// not read it): then the connection closes (`stall::Stall`).
    pub request: Duration,
    /// Connections from remote peers served at once; one more is closed at once,
    /// unanswered (see `conns`).
    pub remote: usize,
    /// Connections beyond `remote` that only loopback peers (the proxy beside keyward,
    /// the probes, `kubectl port-forward`) may hold: remote peers cannot take them.
    /// Loopback peers may hold any of the `remote + loopback`; with all of them in use,
    /// the next connection waits in the listen queue until one closes.
    pub loopback: usize,
}

impl Bounds {
    /// The data plane: answers take milliseconds; a proxy keeps a pool of connections.
    /// One remote peer holds at most `KEYWARD_MAX_CONNECTIONS_PER_PEER` of `remote`.
    pub const DATA: Bounds = Bounds {
        headers: Duration::from_secs(10),
        request: Duration::from_secs(10),
        remote: 4096,
        loopback: 1024,
    };
    /// The admin API: listings and rotations may take longer; few clients, and no cap
    /// per peer: it is reached from the network only when exposed on purpose, by the
    /// holders of its token, and a peer that fills it reaches neither the data plane nor
    /// the operator on loopback (`kubectl port-forward`).
    pub const ADMIN: Bounds = Bounds {
        headers: Duration::from_secs(10),
        request: Duration::from_secs(60),
        remote: 1024,
        loopback: 64,
    };
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Serves `router` over HTTP/1.1 on `listener` until `stop` is set, then lets every open
/// connection finish its request in flight and returns when all are closed.
///
/// A hand-written accept loop rather than `axum::serve`, which offers no way to set
/// hyper's header limit (see [`HYPER_MAX_HEADERS`]); it refuses too many or too large
/// headers ([`refuse_headers`]) before routing.
///
/// `name` names the listener in the metrics and logs; `per_peer` caps the connections of one
/// remote peer (see [`conns`]).
async fn serve_one(
    listener: TcpListener,
    router: Router,
    stop: watch::Receiver<bool>,
    name: &'static str,
    bounds: Bounds,
    per_peer: Option<usize>,
) -> std::io::Result<()> {
    static ACCEPT_FAILED: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
    // Every connection task holds a receiver; `closed()` resolves when the last is gone.
    let (all_closed, close_rx) = watch::channel(());
    let gate = conns::Gate::new(&bounds, per_peer);
    loop {
        // A slot first: at the bound, the next connection waits in the listen queue.
        let slot = tokio::select! {
            slot = gate.slot() => match slot {
                Some(slot) => slot,
                None => break,
            },
            () = stopped(stop.clone()) => break,
        };
        let (stream, held, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match gate.admit(slot, peer.ip()) {
                    Ok(held) => (stream, held, peer.ip()),
                    // Closed unanswered (dropped): see `conns` for why.
                    Err(refusal) => {
                        refused(name, refusal, peer.ip());
                        continue;
                    }
                },
                // Out of file descriptors and the like: wait instead of spinning, as
                // axum does (and log it once a second at most).
                Err(e) => {
                    if let Some(skipped) = ACCEPT_FAILED.ready() {
                        tracing::warn!(error = %e, skipped, "accepting a connection failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(stop.clone()) => break,
        };
        // Answers are small and latency matters: no Nagle delay on any connection.
        let _ = stream.set_nodelay(true);
        // The kernel's buffers for this socket, fixed rather than autotuned (which grows
        // them to megabytes): a client that pipelines requests and reads the answers
        // slowly, enough to count as progress, made the kernel hold 250 to 400 KiB per
        // connection. Answers and requests still flow at full speed over a LAN.
        let socket = socket2::SockRef::from(&stream);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let router = TowerToHyperService::new(router.clone());
        // Each request carries its peer: the body budget is shared out by it.
        let peer = extract::Peer(peer);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            use futures_util::future::{ready, Either};
            match refuse_headers(request.headers()) {
                Some(refusal) => Either::Left(ready(Ok::<_, std::convert::Infallible>(refusal))),
                None => {
                    request.extensions_mut().insert(peer);
                    let (request, ended) = linger::track(request);
                    let answer = hyper::service::Service::call(&router, request);
                    Either::Right(async move {
                        let mut response = match tokio::time::timeout(bounds.request, answer).await
                        {
                            Ok(answered) => answered?,
                            Err(_) => axum::response::IntoResponse::into_response(ApiError::new(
                                ErrorCode::RequestTimeout,
                                format!(
                                    "the request took longer than {} s to arrive and be answered",
                                    bounds.request.as_secs()
                                ),
                            )),
                        };
                        ended.close_unless_read(&mut response);
                        Ok(response)
                    })
                }
            }
        });
        let (stop, close_rx) = (stop.clone(), close_rx.clone());
        tokio::spawn(async move {
            let _held = held;
            let mut builder = http1::Builder::new();
            builder
                .max_headers(HYPER_MAX_HEADERS)
                .max_buf_size(MAX_READ_BUFFER)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(bounds.headers);
            let conn = builder.serve_connection(
                TokioIo::new(stall::Stall::new(stream, bounds.request)),
                service,
            );
            let mut conn = std::pin::pin!(conn);
            let mut stop = std::pin::pin!(stopped(stop));
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    () = &mut stop, if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    all_closed.closed().await;
    Ok(())
}

/// Counts a connection closed unanswered, and logs it (once a second at most: the peer
/// can repeat it as fast as it connects).
fn refused(listener: &'static str, refusal: conns::Refusal, peer: std::net::IpAddr) {
    static REFUSED: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
    crate::metrics::get()
        .connections_refused
        .with_label_values(&[listener, refusal.as_str()])
        .inc();
    if let Some(skipped) = REFUSED.ready() {
        tracing::warn!(
            listener,
            reason = refusal.as_str(),
            %peer,
            skipped,
            "connection refused: over its cap"
        );
    }
}

/// Serves both routers until `shutdown` completes, then drains for at most `grace`.
/// One remote peer holds at most `per_peer` of the data plane's connections.
pub async fn serve(
    state: AppState,
    data: TcpListener,
    admin: TcpListener,
    grace: Duration,
    per_peer: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let data_router = data::router(state.clone());
    let admin_router = admin::router(state.clone());
    let data_server = serve_one(
        data,
        data_router,
        stop_rx.clone(),
        "data",
        Bounds::DATA,
        Some(per_peer),
    );
    let admin_server = serve_one(
        admin,
        admin_router,
        stop_rx.clone(),
        "admin",
        Bounds::ADMIN,
        None,
    );
    let mut servers = tokio::spawn(async move { tokio::try_join!(data_server, admin_server) });

    tokio::select! {
        result = &mut servers => {
            // A server ended without being asked to: report why.
            result??;
            return Ok(());
        }
        () = shutdown => {}
    }
    tracing::info!(
        grace_s = grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    match tokio::time::timeout(grace, &mut servers).await {
        Ok(result) => {
            result??;
        }
        Err(_) => {
            tracing::warn!("grace period over with requests still in flight; closing them");
            servers.abort();
        }
    }
    Ok(())
}
