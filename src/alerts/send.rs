//! One webhook POST: a fresh HTTP/1.1 connection (TLS by rustls with the system roots
//! for `https://`), the signed JSON body, the status back. Alerts are rare, so a
//! connection per delivery costs nothing that matters and keeps no pool to manage.
//!
//! The signature is `x-keyward-signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`: the receiver recomputes it over the raw body and refuses an old `t`
//! (docs/api.md, "Webhooks", has the recipe).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, Uri};
use hmac::{Hmac, Mac};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The whole exchange (connect, TLS, request, status) must finish within this.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Where alerts are sent: a parsed `http://` or `https://` URL.
#[derive(Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    /// `host[:port]` as the URL gives it, for the `host` header.
    authority: String,
    /// Path and query, the request target.
    target: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Endpoint {
    // The path and query may hold a token: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why a URL cannot be a webhook endpoint (the URL itself is not repeated: it may hold a
/// token).
pub fn check_url(url: &str) -> Result<(), String> {
    parse(url).map(|_| ())
}

fn parse(url: &str) -> Result<(Uri, bool, String, u16), String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| "is not a URL (expected http://host[:port]/path or https://…)".to_string())?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("must start with http:// or https://".into()),
    };
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err(
            "must not carry credentials before the host (put a token in the path or query instead)"
                .into(),
        );
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err("has no host".into());
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if port == 0 {
        return Err("has port 0".into());
    }
    Ok((uri.clone(), tls, host.to_string(), port))
}

impl Endpoint {
    /// Parses a URL checked by [`check_url`]; for `https://`, builds the TLS client with
    /// the system's roots (read once, here).
    pub fn new(url: &str) -> Result<Endpoint, String> {
        let (uri, tls, host, port) = parse(url)?;
        let tls = if tls {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "cannot read some of the system's root certificates");
            }
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let target = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(Endpoint {
            host,
            port,
            authority,
            target,
            tls,
        })
    }

    /// POSTs one alert; the status the receiver answered, or why there was none (an
    /// error text that holds neither the URL nor the secret).
    pub async fn post(
        &self,
        secret: &[u8],
        id: &str,
        body: &str,
        now_s: i64,
    ) -> Result<u16, String> {
        let request = Request::post(self.target.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("keyward/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-keyward-alert-id", id)
            .header("x-keyward-signature", signature(secret, now_s, body))
            .body(Body::from(body.to_string()))
            .map_err(|e| format!("building the request: {e}"))?;
        match tokio::time::timeout(TIMEOUT, self.exchange(request)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} s", TIMEOUT.as_secs())),
        }
    }

    async fn exchange(&self, request: Request<Body>) -> Result<u16, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => send(TokioIo::new(tcp), request).await,
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                send(TokioIo::new(stream), request).await
            }
        }
    }
}

async fn send<IO>(io: IO, request: Request<Body>) -> Result<u16, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    // The connection is driven beside the request, and ends with it (or at the timeout).
    tokio::spawn(tokio::time::timeout(TIMEOUT, connection));
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    Ok(response.status().as_u16())
}

/// `t=<now_s>,v1=<hex HMAC-SHA256(secret, "<now_s>.<body>")>`.
pub fn signature(secret: &[u8], now_s: i64, body: &str) -> String {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(format!("{now_s}.").as_bytes());
    mac.update(body.as_bytes());
    format!("t={now_s},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_other_than_http_and_https_are_refused() {
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(check_url("https://hooks.example.com/x?token=abc").is_ok());
        for bad in [
            "ftp://example.com/",
            "example.com/hook",
            "http://user:pw@example.com/",
            "http:///x",
            "",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let e = check_url("https://a:b@example.com/").unwrap_err();
        assert!(!e.contains("a:b"), "{e}");
    }

    #[test]
    fn the_signature_is_the_documented_hmac() {
        // Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac secret-of-16-chars
        let sig = signature(b"secret-of-16-chars", 1_700_000_000, "{}");
        assert_eq!(
            sig,
            "t=1700000000,v1=0697daecccb07d8201dae7bfbcf2dcbe1110628b1c0574a7559644220763429d"
        );
    }
}
