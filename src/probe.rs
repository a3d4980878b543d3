//! `keyward probe /readyz`: asks the keyward running beside it (at `KEYWARD_LISTEN`)
//! for a health path and exits 0 on a 200.
//!
//! For Kubernetes probes of a sidecar that listens on the pod's loopback, which the
//! kubelet's `httpGet` cannot reach: an `exec` probe runs this inside the container.
//! Plain blocking HTTP/1.0 over `std::net`, no runtime and no client library.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long one probe waits to connect, and then for the answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Where to reach the data plane: its configured address, with an unspecified IP
/// (`0.0.0.0`, `::`) replaced by the loopback.
pub fn target(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// `Ok` when `GET path` at `addr` answers 200; otherwise why not, in one line.
pub fn probe(addr: SocketAddr, path: &str) -> Result<(), String> {
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("`{path}` is not a path like /readyz"));
    }
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(TIMEOUT)))
        .and_then(|_| write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"))
        .map_err(|e| format!("cannot ask {addr}: {e}"))?;
    let mut head = [0u8; 32];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no answer from {addr} within {} s",
                    TIMEOUT.as_secs()
                ))
            }
            Err(e) => return Err(format!("no answer from {addr}: {e}")),
        }
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    let status = status_line.split_whitespace().nth(1).unwrap_or("none");
    if status == "200" {
        Ok(())
    } else {
        Err(format!("{path} answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_address_is_probed_on_the_loopback() {
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(target(any).to_string(), "127.0.0.1:8080");
        let any6: SocketAddr = "[::]:8080".parse().unwrap();
        assert_eq!(target(any6).to_string(), "[::1]:8080");
        let own: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(target(own), own);
    }

    #[test]
    fn a_path_with_spaces_or_no_slash_is_refused_without_connecting() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(probe(addr, "readyz").unwrap_err().contains("not a path"));
        assert!(probe(addr, "/a b").unwrap_err().contains("not a path"));
        assert!(probe(addr, "/readyz")
            .unwrap_err()
            .contains("cannot connect"));
    }
}
