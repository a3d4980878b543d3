//! Configuration: every setting is an environment variable (also a `serve` flag).
//!
//! Parsing is separate from reading: [`Config::from_raw`] takes a map of variable name →
//! text, so tests hand it a map and `main` hands it what clap read from flags and the
//! environment. Every bad value is reported (all of them, not only the first), each as
//! one line that starts with the variable's name. Secret values never appear in those
//! lines, nor in `Debug` output.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::crypto;
use crate::db::Backend;

pub const LISTEN: &str = "KEYWARD_LISTEN";
pub const ADMIN_LISTEN: &str = "KEYWARD_ADMIN_LISTEN";
pub const ADMIN_TOKEN: &str = "KEYWARD_ADMIN_TOKEN";
pub const DATA_TOKEN: &str = "KEYWARD_DATA_TOKEN";
pub const DATABASE_URL: &str = "KEYWARD_DATABASE_URL";
pub const REDIS_URL: &str = "KEYWARD_REDIS_URL";
pub const ENCRYPTION_KEY: &str = "KEYWARD_ENCRYPTION_KEY";
pub const ENCRYPTION_KEYS_PREVIOUS: &str = "KEYWARD_ENCRYPTION_KEYS_PREVIOUS";
pub const ON_BACKEND_ERROR: &str = "KEYWARD_ON_BACKEND_ERROR";
pub const LOG_FORMAT: &str = "KEYWARD_LOG_FORMAT";
pub const KEY_PREFIX: &str = "KEYWARD_KEY_PREFIX";
pub const EXPIRY_INTERVAL_S: &str = "KEYWARD_EXPIRY_INTERVAL_S";
pub const EXPIRY_AUTO_DELETE: &str = "KEYWARD_EXPIRY_AUTO_DELETE";
pub const SHUTDOWN_GRACE_S: &str = "KEYWARD_SHUTDOWN_GRACE_S";
pub const LEASE_TTL_S: &str = "KEYWARD_LEASE_TTL_S";
pub const DEFAULT_ESTIMATED_TOKENS: &str = "KEYWARD_DEFAULT_ESTIMATED_TOKENS";
pub const REDIS_PREFIX: &str = "KEYWARD_REDIS_PREFIX";
pub const KEY_CACHE_TTL_S: &str = "KEYWARD_KEY_CACHE_TTL_S";
pub const NEGATIVE_CACHE_TTL_S: &str = "KEYWARD_NEGATIVE_CACHE_TTL_S";
pub const REPORT_DEDUPE_TTL_S: &str = "KEYWARD_REPORT_DEDUPE_TTL_S";
pub const ACCOUNTING_CLAIM_IDLE_S: &str = "KEYWARD_ACCOUNTING_CLAIM_IDLE_S";
pub const PROVIDER_COOLDOWN_S: &str = "KEYWARD_PROVIDER_COOLDOWN_S";
pub const PROVIDER_COOLDOWN_MAX_S: &str = "KEYWARD_PROVIDER_COOLDOWN_MAX_S";
pub const PROVIDER_SUSPEND_S: &str = "KEYWARD_PROVIDER_SUSPEND_S";
pub const PRICES_FILE: &str = "KEYWARD_PRICES_FILE";

pub const DEFAULT_DATABASE_URL: &str = "sqlite://keyward.db";

/// Admin tokens shorter than this start with a warning (not an error: local trials).
const RECOMMENDED_TOKEN_LEN: usize = 16;

/// Variable name → raw text, as read from flags or the environment.
pub type RawConfig = BTreeMap<&'static str, String>;

/// What to do when Redis or the database cannot answer on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorPolicy {
    Deny,
    Allow,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One bad setting: the variable and why, never its value when it is a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.var, self.reason)
    }
}

#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    /// The data-plane token: `/v1/select` and reports without a lease need it.
    pub data_token: Option<String>,
    pub database_url: String,
    pub backend: Backend,
    pub redis_url: Option<String>,
    pub encryption_key: Option<[u8; 32]>,
    pub previous_keys: Vec<[u8; 32]>,
    pub on_backend_error: BackendErrorPolicy,
    pub log_format: LogFormat,
    pub key_prefix: String,
    /// `None` turns the periodic expiry job off.
    pub expiry_interval: Option<Duration>,
    pub expiry_auto_delete: bool,
    pub shutdown_grace: Duration,
    /// How long an unreported, unrenewed lease holds its slot.
    pub lease_ttl: Duration,
    /// Tokens reserved when a request names no estimate.
    pub default_estimated_tokens: i64,
    /// The Redis hash tag of this deployment: every key is under `{prefix}`.
    pub redis_prefix: String,
    pub key_cache_ttl: Duration,
    pub negative_cache_ttl: Duration,
    /// How long a reported lease id is remembered as reported.
    pub report_dedupe_ttl: Duration,
    /// Queue entries another replica has held this long are taken over.
    pub accounting_claim_idle: Duration,
    /// How long a provider key cools down after an upstream 429 without `retry_after_s`.
    pub provider_cooldown: Duration,
    /// The longest cooldown a report authorized by a lease can set (a client holding a
    /// key must not take a pool out for a day).
    pub provider_cooldown_max: Duration,
    /// How long a provider key is suspended after an upstream 401 or 403.
    pub provider_suspend: Duration,
    /// `(provider, model, price)` from `KEYWARD_PRICES_FILE`, read and checked here and
    /// stored at start-up (empty when unset).
    pub prices: Vec<(String, String, crate::prices::Price)>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("data_token", &self.data_token.as_ref().map(|_| "<set>"))
            .field("backend", &self.backend)
            .field("redis", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("encryption_key", &self.encryption_key.map(|_| "<set>"))
            .field("previous_keys", &self.previous_keys.len())
            .field("on_backend_error", &self.on_backend_error)
            .field("log_format", &self.log_format)
            .field("key_prefix", &self.key_prefix)
            .field("expiry_interval", &self.expiry_interval)
            .field("expiry_auto_delete", &self.expiry_auto_delete)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("lease_ttl", &self.lease_ttl)
            .field("default_estimated_tokens", &self.default_estimated_tokens)
            .field("redis_prefix", &self.redis_prefix)
            .field("key_cache_ttl", &self.key_cache_ttl)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field("report_dedupe_ttl", &self.report_dedupe_ttl)
            .field("accounting_claim_idle", &self.accounting_claim_idle)
            .field("provider_cooldown", &self.provider_cooldown)
            .field("provider_cooldown_max", &self.provider_cooldown_max)
            .field("provider_suspend", &self.provider_suspend)
            .field("prices", &self.prices.len())
            .finish()
    }
}

struct Parser<'a> {
    raw: &'a RawConfig,
    errors: Vec<ConfigError>,
}

impl Parser<'_> {
    /// The trimmed value, or `None` when unset or empty.
    fn get(&self, var: &'static str) -> Option<&str> {
        self.raw
            .get(var)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn fail(&mut self, var: &'static str, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            var,
            reason: reason.into(),
        });
    }

    fn addr(&mut self, var: &'static str, default: &str) -> SocketAddr {
        let text = self.get(var).unwrap_or(default).to_string();
        text.parse().unwrap_or_else(|_| {
            self.fail(
                var,
                format!("`{text}` is not a socket address like 0.0.0.0:8080"),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    fn number(&mut self, var: &'static str, default: u64, min: u64, max: u64, unit: &str) -> u64 {
        let Some(text) = self.get(var).map(str::to_string) else {
            return default;
        };
        match text.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.fail(
                    var,
                    format!("`{text}` is not a whole number of {unit} from {min} to {max}"),
                );
                default
            }
        }
    }

    fn seconds(&mut self, var: &'static str, default: u64, max: u64) -> u64 {
        self.number(var, default, 0, max, "seconds")
    }

    fn boolean(&mut self, var: &'static str, default: bool) -> bool {
        let Some(text) = self.get(var).map(str::to_ascii_lowercase) else {
            return default;
        };
        match text.as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => {
                self.fail(var, format!("`{text}` is not true or false"));
                default
            }
        }
    }

    fn choice<T: Copy>(&mut self, var: &'static str, default: T, options: &[(&str, T)]) -> T {
        let Some(text) = self.get(var).map(str::to_ascii_lowercase) else {
            return default;
        };
        if let Some((_, value)) = options.iter().find(|(name, _)| *name == text) {
            return *value;
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        self.fail(var, format!("`{text}` is not one of {}", names.join(", ")));
        default
    }
}

impl Config {
    pub fn from_raw(raw: &RawConfig) -> Result<Config, Vec<ConfigError>> {
        let mut p = Parser {
            raw,
            errors: Vec::new(),
        };
        let listen = p.addr(LISTEN, "0.0.0.0:8080");
        let admin_listen = p.addr(ADMIN_LISTEN, "0.0.0.0:8081");

        let admin_token = p.get(ADMIN_TOKEN).map(str::to_string);
        if let Some(token) = &admin_token {
            if token.chars().any(char::is_control) {
                p.fail(ADMIN_TOKEN, "contains control characters");
            }
        }
        let data_token = p.get(DATA_TOKEN).map(str::to_string);
        if let Some(token) = &data_token {
            if token.len() < RECOMMENDED_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                p.fail(
                    DATA_TOKEN,
                    format!("must be at least {RECOMMENDED_TOKEN_LEN} printable characters without spaces"),
                );
            }
        }

        let database_url = p
            .get(DATABASE_URL)
            .unwrap_or(DEFAULT_DATABASE_URL)
            .to_string();
        let backend = Backend::of_url(&database_url).unwrap_or_else(|| {
            // The URL may hold a password: do not echo it.
            p.fail(
                DATABASE_URL,
                "must start with postgres://, postgresql:// or sqlite:",
            );
            Backend::Sqlite
        });

        let redis_url = p.get(REDIS_URL).map(str::to_string);
        if let Some(url) = &redis_url {
            if crate::limits::conn::Target::parse(url).is_none() {
                p.fail(
                    REDIS_URL,
                    "must be redis://host:port, rediss://…, or redis+cluster://host:port,host:port",
                );
            }
        }

        let encryption_key = p.get(ENCRYPTION_KEY).map(str::to_string).and_then(|text| {
            crypto::parse_key(&text)
                .map_err(|why| p.fail(ENCRYPTION_KEY, why))
                .ok()
        });
        if encryption_key.is_none()
            && backend == Backend::Postgres
            && p.get(ENCRYPTION_KEY).is_none()
        {
            p.fail(
                ENCRYPTION_KEY,
                "is required with a Postgres database (base64 of 32 random bytes, e.g. `openssl rand -base64 32`)",
            );
        }
        let mut previous_keys = Vec::new();
        if let Some(list) = p.get(ENCRYPTION_KEYS_PREVIOUS).map(str::to_string) {
            for (i, item) in list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .enumerate()
            {
                match crypto::parse_key(item) {
                    Ok(key) => previous_keys.push(key),
                    Err(why) => p.fail(ENCRYPTION_KEYS_PREVIOUS, format!("entry {}: {why}", i + 1)),
                }
            }
        }

        let on_backend_error = p.choice(
            ON_BACKEND_ERROR,
            BackendErrorPolicy::Deny,
            &[
                ("deny", BackendErrorPolicy::Deny),
                ("allow", BackendErrorPolicy::Allow),
                ("local", BackendErrorPolicy::Local),
            ],
        );
        let log_format = p.choice(
            LOG_FORMAT,
            LogFormat::Text,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        );

        let key_prefix = p.get(KEY_PREFIX).unwrap_or("sk-kw-").to_string();
        if key_prefix.len() > 16
            || !key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            p.fail(
                KEY_PREFIX,
                "must be at most 16 characters of A-Z, a-z, 0-9, - and _",
            );
        }

        let expiry_secs = p.seconds(EXPIRY_INTERVAL_S, 60, 86_400);
        let expiry_auto_delete = p.boolean(EXPIRY_AUTO_DELETE, false);
        let shutdown_grace = Duration::from_secs(p.seconds(SHUTDOWN_GRACE_S, 10, 3_600));
        let lease_ttl = Duration::from_secs(p.number(LEASE_TTL_S, 300, 1, 86_400, "seconds"));
        let default_estimated_tokens = p.number(
            DEFAULT_ESTIMATED_TOKENS,
            1_000,
            0,
            1_000_000_000_000,
            "tokens",
        ) as i64;
        let redis_prefix = p.get(REDIS_PREFIX).unwrap_or("kw").to_string();
        if redis_prefix.len() > 64
            || !redis_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b))
        {
            p.fail(
                REDIS_PREFIX,
                "must be at most 64 characters of A-Z, a-z, 0-9, -, _, : and .",
            );
        }
        let key_cache_ttl =
            Duration::from_secs(p.number(KEY_CACHE_TTL_S, 60, 1, 86_400, "seconds"));
        let negative_cache_ttl = Duration::from_secs(p.seconds(NEGATIVE_CACHE_TTL_S, 5, 3_600));
        let report_dedupe_ttl =
            Duration::from_secs(p.number(REPORT_DEDUPE_TTL_S, 600, 1, 604_800, "seconds"));
        let accounting_claim_idle =
            Duration::from_secs(p.number(ACCOUNTING_CLAIM_IDLE_S, 30, 1, 3_600, "seconds"));
        let provider_cooldown =
            Duration::from_secs(p.number(PROVIDER_COOLDOWN_S, 60, 1, 86_400, "seconds"));
        let provider_cooldown_max =
            Duration::from_secs(p.number(PROVIDER_COOLDOWN_MAX_S, 3_600, 1, 86_400, "seconds"));
        let provider_suspend =
            Duration::from_secs(p.number(PROVIDER_SUSPEND_S, 600, 1, 604_800, "seconds"));

        let prices = match p.get(PRICES_FILE).map(str::to_string) {
            None => Vec::new(),
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read `{path}`: {e}"))
                .and_then(|text| {
                    crate::prices::parse_file(&text).map_err(|why| format!("`{path}`: {why}"))
                })
                .unwrap_or_else(|why| {
                    p.fail(PRICES_FILE, why);
                    Vec::new()
                }),
        };

        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Config {
            listen,
            admin_listen,
            admin_token,
            data_token,
            database_url,
            backend,
            redis_url,
            encryption_key,
            previous_keys,
            on_backend_error,
            log_format,
            key_prefix,
            expiry_interval: (expiry_secs > 0).then(|| Duration::from_secs(expiry_secs)),
            expiry_auto_delete,
            shutdown_grace,
            lease_ttl,
            default_estimated_tokens,
            redis_prefix,
            key_cache_ttl,
            negative_cache_ttl,
            report_dedupe_ttl,
            accounting_claim_idle,
            provider_cooldown,
            provider_cooldown_max,
            provider_suspend,
            prices,
        })
    }

    /// Start-up warnings that are not errors, one line each.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.admin_token {
            None => out.push(format!(
                "{ADMIN_TOKEN} is not set: the admin API refuses every call until it is"
            )),
            Some(t) if t.len() < RECOMMENDED_TOKEN_LEN => out.push(format!(
                "{ADMIN_TOKEN} is shorter than {RECOMMENDED_TOKEN_LEN} characters; use a long random token"
            )),
            Some(_) => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&'static str, &str)]) -> Result<Config, Vec<ConfigError>> {
        let raw: RawConfig = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Config::from_raw(&raw)
    }

    #[test]
    fn defaults_are_the_embedded_shape() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:8081");
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
}
