//! The alert webhook over `https://`: rustls (ring) with the system's roots, against a
//! receiver the test serves with a certificate of its own CA (made with the `openssl`
//! command line tool). The "system roots" are the CA file named by `SSL_CERT_FILE`,
//! which rustls-native-certs reads; this binary holds this one test, so setting the
//! variable touches no other test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use keyward::alerts::send::{signature, Endpoint};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate it signs for `localhost` and 127.0.0.1.
fn make_pki(dir: &Path) {
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=keyward test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
}

/// Serves `POST /hook` over TLS on port 0, recording `(alert id, signature, body)`.
async fn tls_receiver(dir: &Path, got: Arc<Mutex<Vec<(String, String, String)>>>) -> u16 {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("leaf.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("leaf.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let got = got.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let seen = (
                    header("x-keyward-alert-id"),
                    header("x-keyward-signature"),
                    body,
                );
                got.lock().unwrap().push(seen);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate hangs up here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn alerts_are_posted_over_https_to_a_receiver_the_roots_trust_only() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let got = Arc::new(Mutex::new(Vec::new()));
    let port = tls_receiver(dir.path(), got.clone()).await;
    let url = format!("https://localhost:{port}/hook?token=t0ken");
    let secret = b"https-webhook-secret-0123456789";
    let body = r#"{"id":"abc","type":"spend.threshold"}"#;

    // The system's roots do not hold the test CA: refused, and the error holds neither
    // the URL's token nor the secret.
    std::env::set_var("SSL_CERT_FILE", dir.path().join("nowhere.pem"));
    let untrusted = Endpoint::new(&url).unwrap();
    let error = untrusted
        .post(secret, "abc", body, 1_700_000_000)
        .await
        .unwrap_err();
    assert!(error.starts_with("TLS:"), "{error}");
    assert!(
        !error.contains("t0ken") && !error.contains("https-webhook"),
        "{error}"
    );
    assert!(got.lock().unwrap().is_empty());

    // With the CA among the roots: delivered, signed, to the path and query given.
    std::env::set_var("SSL_CERT_FILE", dir.path().join("ca.pem"));
    let trusted = Endpoint::new(&url).unwrap();
    let status = trusted
        .post(secret, "abc", body, 1_700_000_000)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let got = got.lock().unwrap().clone();
    assert_eq!(
        got,
        [(
            "abc".to_string(),
            signature(secret, 1_700_000_000, body),
            body.to_string()
        )]
    );
}
