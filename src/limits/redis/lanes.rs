//! The hot path's connections: a few multiplexed connections ("lanes") taken from the
//! pool once and shared by every request, so a decision is one round trip (a checkout
//! per decision would add deadpool's PING), and concurrent scripts pipeline on one
//! socket. A lane that fails with a connection error is replaced through the pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::limits::conn::{Conn, Connector};
use crate::limits::scripts::call::Call;
use crate::limits::CounterError;

/// How many multiplexed connections carry the hot path.
pub(super) const LANES: usize = 2;

/// Shared multiplexed connections, used round robin.
pub(super) struct Lanes {
    pub(super) connector: Connector,
    pub(super) lanes: Vec<Mutex<Option<Conn>>>,
    pub(super) next: AtomicUsize,
}

impl Lanes {
    /// A handle to one lane's connection (a cheap clone of a shared socket).
    pub(super) async fn get(&self) -> Result<(usize, Conn), CounterError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        if let Some(conn) = self.lanes[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok((i, conn));
        }
        // Boxed: the pool's checkout is a large future, needed only when a lane is
        // (re)opened; inline it would be part of every call's future.
        let conn = Box::pin(self.connector.take()).await?;
        *self.lanes[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok((i, conn))
    }

    /// Forgets a lane whose connection broke (and says so); the next use takes a fresh
    /// one. A socket that died (the server restarted or went away) tells that every
    /// lane's did, as they all go to the same server: all are forgotten at once, so one
    /// call fails for it rather than one per lane. A cluster connection is kept: it
    /// reconnects to each node by itself (from the initial nodes when need be), and one
    /// dead or paused master's errors must not make every request open a whole new
    /// cluster connection (discovery and a handshake with every master, the paused
    /// one's included, which would slow the healthy masters' tenants too).
    pub(super) fn broken(&self, i: usize, conn: &Conn, error: &redis::RedisError) -> bool {
        if !matches!(conn, Conn::Single(_)) {
            return false;
        }
        let forget = |lane: &Mutex<Option<Conn>>| {
            *lane.lock().unwrap_or_else(|p| p.into_inner()) = None;
        };
        // A timeout is an I/O error too, but of one call on a live socket.
        if error.is_connection_dropped() && !error.is_timeout() {
            self.lanes.iter().for_each(forget);
        } else if error.is_io_error() || error.is_unrecoverable_error() {
            forget(&self.lanes[i]);
        } else {
            return false;
        }
        true
    }

    /// Runs one script on a lane: exactly one round trip (plus a reload after NOSCRIPT).
    /// `name` labels its metrics.
    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        name: &str,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, CounterError> {
        self.measured(name, async {
            let (i, mut conn) = self.get().await?;
            call.invoke_async(&mut conn).await.map_err(|e| {
                self.broken(i, &conn, &e);
                CounterError::from(e)
            })
        })
        .await
    }

    /// [`Lanes::invoke`] for a [`Call`]: its EVALSHA written at once, the script loaded
    /// and the call sent again after a NOSCRIPT (as `redis::ScriptInvocation` does).
    pub(super) async fn call<T: redis::FromRedisValue>(
        &self,
        name: &str,
        call: &Call<'_>,
    ) -> Result<T, CounterError> {
        self.measured(name, async {
            let (i, mut conn) = self.get().await?;
            let cmd = call.evalsha();
            let result = match cmd.query_async(&mut conn).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    Box::pin(async {
                        call.script().prepare_invoke().load_async(&mut conn).await?;
                        cmd.query_async(&mut conn).await
                    })
                    .await
                }
                other => other,
            };
            result.map_err(|e| {
                self.broken(i, &conn, &e);
                CounterError::from(e)
            })
        })
        .await
    }

    /// Runs `call`, recording its duration and its failure under `name`.
    async fn measured<T>(
        &self,
        name: &str,
        call: impl std::future::Future<Output = Result<T, CounterError>>,
    ) -> Result<T, CounterError> {
        let started = std::time::Instant::now();
        let result = call.await;
        crate::metrics::script_duration(name, started.elapsed().as_secs_f64());
        if result.is_err() {
            crate::metrics::get()
                .script_errors
                .with_label_values(&[name])
                .inc();
        }
        result
    }
}
