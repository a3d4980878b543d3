//! Unit tests of the parser: defaults, errors naming their variable, `_FILE` twins,
//! redaction, and the declarations' own consistency.
use super::*;

fn parse(pairs: &[(&'static str, &str)]) -> Result<Config, Vec<ConfigError>> {
    let raw: RawConfig = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
    Config::from_raw(&raw)
}

#[test]
fn defaults_are_the_embedded_shape() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8081");
    assert_eq!(c.database_url, "sqlite://keyward.db");
    assert_eq!(c.backend, Backend::Sqlite);
    assert_eq!(c.on_backend_error, BackendErrorPolicy::Deny);
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.admin_token.is_none() && c.redis_url.is_none());
    assert_eq!(c.expiry_interval, Some(Duration::from_secs(60)));
    assert!(c.warnings()[0].starts_with(ADMIN_TOKEN));
}

#[test]
fn each_bad_value_is_one_line_naming_its_variable() {
    let errors = parse(&[
        (LISTEN, "nonsense"),
        (ON_BACKEND_ERROR, "maybe"),
        (LOG_FORMAT, "xml"),
        (ENCRYPTION_KEY, "c2hvcnQ="),
        (REDIS_URL, "http://x"),
        (EXPIRY_INTERVAL_S, "-1"),
        (KEY_PREFIX, "has space"),
    ])
    .unwrap_err();
    let vars: Vec<&str> = errors.iter().map(|e| e.var).collect();
    assert_eq!(
        vars,
        [
            LISTEN,
            REDIS_URL,
            ENCRYPTION_KEY,
            ON_BACKEND_ERROR,
            LOG_FORMAT,
            KEY_PREFIX,
            EXPIRY_INTERVAL_S
        ]
    );
    for e in &errors {
        let line = e.to_string();
        assert!(line.starts_with(e.var), "{line}");
        assert!(!line.contains('\n'));
    }
}

#[test]
fn postgres_requires_an_encryption_key_and_urls_are_not_echoed() {
    let errors = parse(&[(DATABASE_URL, "postgres://u:hunter2@db/k")]).unwrap_err();
    assert_eq!(errors[0].var, ENCRYPTION_KEY);
    let errors = parse(&[(DATABASE_URL, "mysql://u:hunter2@db/k")]).unwrap_err();
    assert_eq!(errors[0].var, DATABASE_URL);
    assert!(!errors[0].to_string().contains("hunter2"));
}

#[test]
fn the_prices_file_is_read_and_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("prices.json");
    std::fs::write(
        &good,
        r#"{"openai/gpt-4o": {"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10}}"#,
    )
    .unwrap();
    let c = parse(&[(PRICES_FILE, good.to_str().unwrap())]).unwrap();
    assert_eq!(c.prices.len(), 1);
    assert_eq!(c.prices[0].2.input, 2_500_000);
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"openai/gpt-4o": {"input_per_mtok_usd": 0.1234567}}"#,
    )
    .unwrap();
    let missing = dir.path().join("missing.json");
    for (path, says) in [(&bad, "6 decimal"), (&missing, "cannot read")] {
        let errors = parse(&[(PRICES_FILE, path.to_str().unwrap())]).unwrap_err();
        assert_eq!(errors.len(), 1);
        let line = errors[0].to_string();
        assert!(line.starts_with(PRICES_FILE), "{line}");
        assert!(line.contains(says) && !line.contains('\n'), "{line}");
    }
}

#[test]
fn secrets_are_not_in_debug_output() {
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let c = parse(&[
        (ADMIN_TOKEN, "very-secret-admin-token"),
        (ENCRYPTION_KEY, key),
        (ENCRYPTION_KEYS_PREVIOUS, key),
        (REDIS_URL, "redis://:pw-secret@localhost"),
    ])
    .unwrap();
    let debug = format!("{c:?}");
    for secret in ["very-secret-admin-token", key, "pw-secret"] {
        assert!(!debug.contains(secret), "{debug}");
    }
    assert_eq!(c.previous_keys.len(), 1);
}

#[test]
fn tokens_shorter_than_16_characters_are_refused() {
    for var in [ADMIN_TOKEN, DATA_TOKEN] {
        let errors = parse(&[(var, "fifteen-chars-x")]).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].var, var);
        assert!(!errors[0].to_string().contains("fifteen"), "{}", errors[0]);
        assert!(parse(&[(var, "sixteen-chars-xx")]).is_ok());
        assert_eq!(parse(&[(var, "sixteen chars xx")]).unwrap_err()[0].var, var);
    }
}

#[test]
fn a_file_twin_gives_the_value_without_its_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "from-a-file-0123456789\n").unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\r\n").unwrap();
    let c = parse(&[
        (declared::ADMIN_TOKEN.file, token.to_str().unwrap()),
        (declared::ENCRYPTION_KEY.file, key.to_str().unwrap()),
    ])
    .unwrap();
    assert_eq!(c.admin_token.as_deref(), Some("from-a-file-0123456789"));
    assert_eq!(c.encryption_key.unwrap()[1], 1);
}

#[test]
fn a_file_twin_beside_its_variable_or_unreadable_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "the-content-must-not-show").unwrap();
    let errors = parse(&[
        (ADMIN_TOKEN, "a-token-of-sixteen-chars"),
        (declared::ADMIN_TOKEN.file, secret.to_str().unwrap()),
    ])
    .unwrap_err();
    assert_eq!(errors.len(), 1);
    let line = errors[0].to_string();
    assert!(
        line.starts_with(ADMIN_TOKEN) && line.contains(declared::ADMIN_TOKEN.file),
        "{line}"
    );

    let missing = dir.path().join("missing");
    let errors = parse(&[(declared::REDIS_URL.file, missing.to_str().unwrap())]).unwrap_err();
    let line = errors[0].to_string();
    assert_eq!(errors[0].var, declared::REDIS_URL.file);
    assert!(line.contains(missing.to_str().unwrap()), "{line}");

    // A file that is not a valid value is reported under the variable, without its content.
    let errors = parse(&[(declared::DATA_TOKEN.file, secret.to_str().unwrap())]);
    assert!(errors.is_ok(), "25 printable characters are a valid token");
    std::fs::write(&secret, "short-secret").unwrap();
    let errors = parse(&[(declared::DATA_TOKEN.file, secret.to_str().unwrap())]).unwrap_err();
    assert_eq!(errors[0].var, DATA_TOKEN);
    assert!(!errors[0].to_string().contains("short-secret"));
}

#[test]
fn passwords_in_urls_are_recognised() {
    for url in [
        "postgres://u:pw@db/k",
        "postgresql://u:@db/k",
        "redis://:pw@localhost:6379",
        "rediss://user:pw@h:6380/0",
        "redis+cluster://:pw@a:1,b:2",
        "postgres://u@db/k?sslmode=require&password=pw",
    ] {
        assert!(url_has_password(url), "{url}");
    }
    for url in [
        "postgres://postgres@127.0.0.1:5432/k",
        "redis://localhost:6379",
        "redis+cluster://a:1,b:2",
        "sqlite://keyward.db",
        "sqlite::memory:",
        "postgres://db/k?user=u",
    ] {
        assert!(!url_has_password(url), "{url}");
    }
}

#[test]
fn a_redis_port_out_of_range_is_a_config_error() {
    for url in [
        "redis://:pw-secret@localhost:99999",
        "redis+cluster://a:7000,b:99999",
        "redis://:6379",
    ] {
        let errors = parse(&[(REDIS_URL, url)]).unwrap_err();
        assert_eq!(errors[0].var, REDIS_URL, "{url}");
        assert!(!errors[0].to_string().contains("pw-secret"));
    }
    assert!(parse(&[(REDIS_URL, "redis+cluster://a:7000,b:7001")]).is_ok());
}

/// The flag rule `--help` and the README promise: `KEYWARD_LEASE_TTL_S` is
/// `--lease-ttl-s`; and a `_FILE` twin is its variable with `_FILE`.
#[test]
fn every_flag_is_its_variable_in_lower_case() {
    for s in SETTINGS {
        let rest = s.var.strip_prefix("KEYWARD_").expect("KEYWARD_ prefix");
        assert_eq!(s.flag, rest.to_lowercase().replace('_', "-"), "{}", s.var);
        assert_eq!(s.file, format!("{}_FILE", s.var));
    }
    let vars: std::collections::BTreeSet<&str> = SETTINGS.iter().map(|s| s.var).collect();
    assert_eq!(vars.len(), SETTINGS.len(), "a variable declared twice");
}

/// Every declared setting is read by `from_raw` by its declared kind: a bad value of
/// its kind is one error naming it (a declaration the parser never reads would pass
/// silently, and a reader of the wrong kind says so).
#[test]
fn every_declared_setting_is_read_and_refuses_a_bad_value() {
    for s in SETTINGS {
        let bad = match s.kind {
            Kind::Addr => "nowhere",
            Kind::Token => "short",
            Kind::DatabaseUrl => "mysql://db/k",
            Kind::RedisUrl => "http://cache:6379",
            Kind::Key | Kind::Keys => "%%%",
            Kind::Choice(_) => "perhaps",
            Kind::Name { .. } => "has space",
            Kind::Whole { .. } => "-1",
            Kind::Bool => "perhaps",
            Kind::File => "/nonexistent/keyward-settings-test",
            Kind::Price => "{",
            Kind::HttpUrl => "ftp://hooks.example.com/keyward",
        };
        let Err(errors) = parse(&[(s.var, bad)]) else {
            panic!(
                "{}: `{bad}` was accepted; is it read in Config::from_raw by its kind?",
                s.var
            );
        };
        assert_eq!(errors.len(), 1, "{}: {errors:?}", s.var);
        assert_eq!(errors[0].var, s.var);
        assert!(!errors[0].reason.contains("declared as"), "{}", errors[0]);
    }
}

#[test]
fn debug_shows_each_setting_by_its_declaration() {
    let c = parse(&[
        (LEASE_TTL_S, "42"),
        (DATA_TOKEN, "a-data-token-of-24-chars"),
        (DATABASE_URL, "sqlite://elsewhere.db"),
    ])
    .unwrap();
    let debug = format!("{c:?}");
    assert!(debug.contains(r#""KEYWARD_LEASE_TTL_S": "42""#), "{debug}");
    assert!(
        debug.contains(r#""KEYWARD_LISTEN": "127.0.0.1:8080""#),
        "{debug}"
    );
    assert!(
        debug.contains(r#""KEYWARD_DATA_TOKEN": "<set>""#),
        "{debug}"
    );
    assert!(
        debug.contains(r#""KEYWARD_ADMIN_TOKEN": "unset""#),
        "{debug}"
    );
    assert!(!debug.contains("elsewhere"), "{debug}");
    for s in SETTINGS {
        assert!(debug.contains(s.var), "{} missing from {debug}", s.var);
    }
}

#[test]
fn a_postgres_ca_file_that_cannot_be_read_names_the_url_and_the_file() {
    let key = (
        "KEYWARD_ENCRYPTION_KEY",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    let url = "postgres://u@db/k?sslmode=verify-full&sslrootcert=%2Fnowhere%2Fca.pem";
    let errors = parse(&[(DATABASE_URL, url), key]).unwrap_err();
    let line = errors[0].to_string();
    assert!(line.starts_with(DATABASE_URL), "{line}");
    assert!(line.contains("sslrootcert `/nowhere/ca.pem`"), "{line}");

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let url = format!("postgres://u@db/k?sslrootcert={}", ca.display());
    assert!(parse(&[(DATABASE_URL, &url), key]).is_ok());
}

#[test]
fn a_webhook_needs_an_http_url_and_a_secret_and_its_url_is_not_echoed() {
    let url = "https://hooks.example.com/services/T0/B0/tok3n-in-path";
    let errors = parse(&[(WEBHOOK_URL, url)]).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].var, WEBHOOK_SECRET);
    assert!(errors[0].reason.contains(WEBHOOK_URL), "{}", errors[0]);

    let secret = (WEBHOOK_SECRET, "a-webhook-secret-of-32-characters");
    let errors = parse(&[(WEBHOOK_URL, "ftp://tok3n@hooks.example.com/x"), secret]).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].var, WEBHOOK_URL);
    assert!(!errors[0].to_string().contains("tok3n"), "{}", errors[0]);

    let errors = parse(&[(WEBHOOK_URL, url), (WEBHOOK_SECRET, "short")]).unwrap_err();
    assert_eq!(errors[0].var, WEBHOOK_SECRET);

    let c = parse(&[(WEBHOOK_URL, url), secret]).unwrap();
    assert!(c.webhook.is_some());
    let debug = format!("{c:?}");
    assert!(
        !debug.contains("tok3n") && !debug.contains("32-characters"),
        "{debug}"
    );
    // A secret alone is fine: alerts queue until a URL is set.
    assert!(parse(&[secret]).unwrap().webhook.is_none());
}

#[test]
fn threads_pick_the_runtime() {
    use tokio::runtime::RuntimeFlavor;
    let one = parse(&[]).unwrap().runtime().unwrap();
    assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
    let three = parse(&[(THREADS, "3")]).unwrap().runtime().unwrap();
    assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
    assert_eq!(three.metrics().num_workers(), 3);
    let per_core = parse(&[(THREADS, "0")]).unwrap().runtime().unwrap();
    assert_eq!(
        per_core.handle().runtime_flavor(),
        RuntimeFlavor::MultiThread
    );
    let errors = parse(&[(THREADS, "1025")]).unwrap_err();
    assert_eq!(errors[0].var, THREADS);
}

#[test]
fn connections_per_peer_are_1_to_the_data_planes_4096_with_the_variable_named() {
    assert_eq!(parse(&[]).unwrap().max_connections_per_peer, 1024);
    let eight = parse(&[(MAX_CONNECTIONS_PER_PEER, "8")]).unwrap();
    assert_eq!(eight.max_connections_per_peer, 8);
    for bad in ["0", "4097", "many"] {
        let errors = parse(&[(MAX_CONNECTIONS_PER_PEER, bad)]).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            format!("KEYWARD_MAX_CONNECTIONS_PER_PEER: `{bad}` is not a whole number of connections from 1 to 4096")
        );
    }
}
