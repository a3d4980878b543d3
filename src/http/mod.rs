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
pub mod ratelimit;

use std::future::{Future, IntoFuture};
use std::time::Duration;

use axum::http::StatusCode;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::AppState;
use error::ApiError;

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
    let data_server = axum::serve(data, data::router(state.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future();
    let admin_server = axum::serve(admin, admin::router(state.clone()))
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
