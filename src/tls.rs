//! TLS to Redis and Postgres: rustls with its ring provider, never OpenSSL.
//!
//! Postgres takes everything from its URL (`sslmode`, `sslrootcert`; sqlx trusts the
//! system roots plus `sslrootcert`). Redis takes the scheme from its URL (`rediss://`,
//! `rediss+cluster://`) and, from `KEYWARD_REDIS_CA_FILE`, CAs trusted beside the system
//! roots: the redis crate trusts either the system roots or the certificates it is given,
//! so keyward gives it both ([`roots_with_system`]). All of it is read once at start-up;
//! the hot path's connections are made before the first request and reused.

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// Makes ring rustls' process-wide provider, which the redis crate's connections use
/// (sqlx names ring itself). Idempotent; a provider installed earlier is kept.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The CA certificates of a PEM file, each checked to be usable as a trust anchor; an
/// error (one line, no file content) when one is not, or when there is none.
pub fn ca_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut store = RootCertStore::empty();
    let mut certs = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let cert = cert.map_err(|e| format!("certificate {} cannot be read: {e}", i + 1))?;
        store
            .add(cert.clone())
            .map_err(|e| format!("certificate {} is not a usable CA certificate: {e}", i + 1))?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err(
            "holds no certificate (expected PEM blocks `-----BEGIN CERTIFICATE-----`)".into(),
        );
    }
    Ok(certs)
}

/// PEM of `extra`'s CAs followed by the system's roots (those rustls can use): what the
/// redis crate is given to trust. A system store that cannot be read is logged and
/// skipped, as a missing one (a distroless image) is: `extra` is then all that is trusted.
pub fn roots_with_system(extra: &[CertificateDer<'static>]) -> Vec<u8> {
    let system = rustls_native_certs::load_native_certs();
    for error in &system.errors {
        tracing::warn!(%error, "cannot read some of the system's root certificates");
    }
    let mut usable = RootCertStore::empty();
    let system = system
        .certs
        .into_iter()
        // A root webpki cannot parse would make the redis crate refuse the whole set.
        .filter(|cert| usable.add(cert.clone()).is_ok());
    let mut out = String::new();
    for cert in extra.iter().cloned().chain(system) {
        pem_encode(&cert, &mut out);
    }
    out.into_bytes()
}

fn pem_encode(der: &[u8], out: &mut String) {
    let base64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in base64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

/// Whether a connection error is about the server's certificate (an unknown CA, a name
/// it is not valid for, an expired one): start-up then says where trust comes from.
pub fn is_certificate_error(text: &str) -> bool {
    text.to_ascii_lowercase().contains("certificate")
}

/// What a Postgres URL's TLS leaves open to anyone on the network path between keyward
/// and the database, as a warning to log at start-up; `None` when the server's
/// certificate is checked (`verify-ca`, `verify-full`), for a Unix socket or a loopback
/// host, and for anything that is not a Postgres URL.
///
/// Why: sqlx, like libpq, defaults to `sslmode=prefer`, which checks no certificate and
/// falls back to plaintext when the server (or whoever answers in its place) declines
/// TLS; `require` checks no certificate either. In both cases a pod on the path can pose
/// as the server, ask for the password in clear text and get it. The URL's `sslmode` is
/// the operator's choice (product contract, section 5), so this is said, not refused.
pub fn postgres_unverified(url: &str) -> Option<String> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    use std::str::FromStr;

    if crate::db::Backend::of_url(url) != Some(crate::db::Backend::Postgres) {
        return None;
    }
    let options = PgConnectOptions::from_str(url).ok()?;
    let host = options.get_host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if options.get_socket().is_some() || host.starts_with('/') || loopback {
        return None;
    }
    let why = match options.get_ssl_mode() {
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => return None,
        PgSslMode::Disable => "sslmode=disable sends the password and every query in plaintext",
        PgSslMode::Allow => {
            "sslmode=allow connects in plaintext first and checks no server certificate"
        }
        PgSslMode::Prefer => {
            "sslmode=prefer (the default when the URL names none) checks no server certificate and falls back to plaintext when TLS is declined"
        }
        PgSslMode::Require => "sslmode=require checks no server certificate",
    };
    Some(format!(
        "{why}: anyone on the network path can pose as the database and read its password and data; use sslmode=verify-full (with sslrootcert=<CA file> for a private CA)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_refused_and_system_roots_follow_the_extra_ones() {
        assert!(ca_certificates(b"").unwrap_err().contains("no certificate"));
        assert!(
            ca_certificates(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err()
                .contains("no certificate")
        );
        let broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(ca_certificates(broken)
            .unwrap_err()
            .contains("certificate 1"));

        // Round trip: the system roots re-encoded as PEM read back as the same roots.
        let system = rustls_native_certs::load_native_certs().certs;
        let pem = roots_with_system(&[]);
        let back: Vec<_> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .expect("valid PEM");
        assert!(back.len() <= system.len());
        assert!(back.iter().all(|c| system.contains(c)));
        if let Some(first) = back.first() {
            let with_extra = roots_with_system(std::slice::from_ref(first));
            let again = CertificateDer::pem_slice_iter(&with_extra).count();
            assert_eq!(again, back.len() + 1);
        }
    }

    #[test]
    fn a_postgres_url_that_checks_no_certificate_is_warned_about_unless_on_the_loopback() {
        for (url, said) in [
            ("postgres://u:pw@db.internal/k", "sslmode=prefer"),
            (
                "postgresql://u:pw@db.internal/k?sslmode=prefer",
                "sslmode=prefer",
            ),
            (
                "postgres://u@10.0.0.5:5432/k?sslmode=require",
                "sslmode=require",
            ),
            ("postgres://u@db.internal/k?sslmode=allow", "sslmode=allow"),
            ("postgres://u@db.internal/k?sslmode=disable", "plaintext"),
        ] {
            let warning = postgres_unverified(url).unwrap_or_default();
            assert!(warning.contains(said), "{url}: {warning:?}");
            assert!(warning.contains("verify-full"), "{url}: {warning:?}");
            // The warning is logged: it must not quote the URL or its password.
            assert!(!warning.contains("pw") && !warning.contains("db.internal"));
        }
        for url in [
            "postgres://u@db.internal/k?sslmode=verify-full",
            "postgres://u@db.internal/k?sslmode=verify-ca&sslrootcert=/ca.pem",
            "postgres://u@127.0.0.1/k",
            "postgres://u@localhost:5432/k?sslmode=disable",
            "postgres://u@[::1]/k?sslmode=require",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/k",
            "sqlite://keyward.db",
            "sqlite::memory:",
        ] {
            assert_eq!(postgres_unverified(url), None, "{url}");
        }
    }
}
