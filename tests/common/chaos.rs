//! Faults a test injects between keyward and Postgres: a TCP proxy it can cut
//! ([`PgProxy`]), and [`reroute`] to point a database URL at that proxy.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A TCP proxy in front of Postgres that a test can cut: while down, every proxied
/// connection is dropped and new ones are refused, as in a database outage.
pub struct PgProxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    pub async fn start(target: String) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2) = (up.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused-ish
                }
                let target = target.clone();
                let handle = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().unwrap().push(handle);
            }
        });
        PgProxy {
            port,
            up,
            connections,
            accept,
        }
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for handle in self.connections.lock().unwrap().drain(..) {
                handle.abort();
            }
        }
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_up(false);
    }
}

/// `host:port` of a postgres:// URL, and the URL with them replaced by `with`.
pub fn reroute(url: &str, with: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (host, path) = rest.split_once('/').unwrap();
    (host.to_string(), format!("{scheme}://{auth}{with}/{path}"))
}
