//! The two HTTP listeners: the data plane and the admin API.
//!
//! [`serve`] takes already-bound listeners and a shutdown future, so tests bind port 0
//! and run real servers in-process. On shutdown both listeners stop accepting, in-flight
//! requests get the configured grace period to finish, then the call returns.

pub mod admin;
pub mod authz;
pub mod data;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod ratelimit;

use std::future::{Future, IntoFuture};
use std::time::Duration;

use axum::http::StatusCode;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::AppState;
use error::ApiError;

/// The largest total size of a request's headers; larger ones get 431 with the JSON
/// error body. (hyper itself refuses far larger ones, without a body.)
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Refuses requests whose headers are too large, in the contract's error format.
async fn limit_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > MAX_HEADER_BYTES {
        return axum::response::IntoResponse::into_response(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "HEADERS_TOO_LARGE",
            format!("the request headers are larger than {MAX_HEADER_BYTES} bytes"),
        ));
    }
    next.run(request).await
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
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "method not allowed on this endpoint",
    )
}

/// Serves both routers until `shutdown` completes, then drains for at most `grace`.
pub async fn serve(
    state: AppState,
    data: TcpListener,
    admin: TcpListener,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Answers are small and latency matters: no Nagle delay on any connection.
    let nodelay = |stream: &mut tokio::net::TcpStream| {
        let _ = stream.set_nodelay(true);
    };
    let (data, admin) = (data.tap_io(nodelay), admin.tap_io(nodelay));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let data_router = data::router(state.clone()).layer(axum::middleware::from_fn(limit_headers));
    let admin_router = admin::router(state.clone()).layer(axum::middleware::from_fn(limit_headers));
    let data_server = axum::serve(data, data_router)
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future();
    let admin_server = axum::serve(admin, admin_router)
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future();
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
