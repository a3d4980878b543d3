//! Small helpers with no concern of their own: polling until a condition holds, the
//! operations an OpenAPI document lists, and this machine's own non-loopback address.

use std::time::Duration;

use serde_json::Value;

/// Polls `check` until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(method, path)` of every operation of an OpenAPI document, the method as the
/// document spells it (lower case).
pub fn openapi_operations(doc: &Value) -> std::collections::BTreeSet<(String, String)> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect()
}

/// This machine's own non-loopback IPv4 address (the one its route to the outside
/// leaves from; a UDP `connect` sends nothing): a connection from it to a listener on
/// `0.0.0.0` is a remote peer's, not loopback's. Panics, saying so, on a machine that
/// has none: a test of remote peers cannot run there and must not pass.
pub fn own_address() -> std::net::IpAddr {
    let found = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("10.255.255.255:1")?;
            socket.local_addr()
        })
        .map(|addr| addr.ip());
    match found {
        Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip,
        other => panic!(
            "this machine has no non-loopback IPv4 address ({other:?}): tests of remote peers need one (`ip -4 addr`)"
        ),
    }
}
