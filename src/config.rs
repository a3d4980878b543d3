//! Configuration: every setting is an environment variable; the non-secret ones are
//! also `serve` flags.
//!
//! Parsing is separate from reading: [`Config::from_raw`] takes a map of variable name →
//! text, so tests hand it a map and `main` hands it what [`crate::cli`] read from flags
//! and the environment. Every bad value is reported (all of them, not only the first),
//! each as one line that starts with the variable's name. Secret values never appear in
//! those lines, nor in `Debug` output.
//!
//! Secrets (the tokens, the encryption keys, URLs that may hold a password) are never
//! command-line flags, which any local user reads in `/proc/<pid>/cmdline`: they come
//! from the environment or from a file named by their `…_FILE` twin ([`FILE_TWINS`]),
//! which [`Config::from_raw`] reads.

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
pub const DEFAULT_PRICE: &str = "KEYWARD_DEFAULT_PRICE";
/// CA certificates (PEM) trusted for `rediss://` beside the system roots. Not a secret's
/// `_FILE` twin: its file is read here, as `KEYWARD_PRICES_FILE`'s is.
pub const REDIS_CA_FILE: &str = "KEYWARD_REDIS_CA_FILE";

pub const ADMIN_TOKEN_FILE: &str = "KEYWARD_ADMIN_TOKEN_FILE";
pub const DATA_TOKEN_FILE: &str = "KEYWARD_DATA_TOKEN_FILE";
pub const DATABASE_URL_FILE: &str = "KEYWARD_DATABASE_URL_FILE";
pub const REDIS_URL_FILE: &str = "KEYWARD_REDIS_URL_FILE";
pub const ENCRYPTION_KEY_FILE: &str = "KEYWARD_ENCRYPTION_KEY_FILE";
pub const ENCRYPTION_KEYS_PREVIOUS_FILE: &str = "KEYWARD_ENCRYPTION_KEYS_PREVIOUS_FILE";

/// Each setting that may hold a secret, and the variable naming a file that holds its
/// value instead (for Kubernetes and Docker secrets mounted as files).
pub const FILE_TWINS: [(&str, &str); 6] = [
    (ADMIN_TOKEN, ADMIN_TOKEN_FILE),
    (DATA_TOKEN, DATA_TOKEN_FILE),
    (DATABASE_URL, DATABASE_URL_FILE),
    (REDIS_URL, REDIS_URL_FILE),
    (ENCRYPTION_KEY, ENCRYPTION_KEY_FILE),
    (ENCRYPTION_KEYS_PREVIOUS, ENCRYPTION_KEYS_PREVIOUS_FILE),
];

/// Secrets that have no command-line flag at all. The two URLs keep theirs, refused
/// when the URL holds a password ([`url_has_password`]).
pub const NOT_FLAGS: [&str; 4] = [
    ADMIN_TOKEN,
    DATA_TOKEN,
    ENCRYPTION_KEY,
    ENCRYPTION_KEYS_PREVIOUS,
];

pub const DEFAULT_DATABASE_URL: &str = "sqlite://keyward.db";

/// The shortest admin or data token accepted: a guessable token opens everything.
pub const MIN_TOKEN_LEN: usize = 16;

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
    /// The content of `KEYWARD_REDIS_CA_FILE` (PEM, checked to hold CA certificates);
    /// only with a `rediss://` or `rediss+cluster://` URL.
    pub redis_ca: Option<Vec<u8>>,
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
    /// The price of a model without one of its own (`KEYWARD_DEFAULT_PRICE`); `None`:
    /// such a model is refused (`PRICE_UNKNOWN`) for a key with a balance.
    pub default_price: Option<crate::prices::Price>,
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
            .field("redis_ca", &self.redis_ca.as_ref().map(|_| "<set>"))
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
            .field("default_price", &self.default_price)
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

    /// The text of every `…_FILE` twin's file, under the setting's own name (a file's
    /// content without its trailing newline is the value). Setting both a variable and
    /// its twin is an error; so is a file that cannot be read (its path is named, never
    /// its content).
    fn read_files(&mut self) -> RawConfig {
        let mut resolved = self.raw.clone();
        for (var, file_var) in FILE_TWINS {
            let Some(path) = self.get(file_var).map(str::to_string) else {
                continue;
            };
            resolved.remove(file_var);
            if self.get(var).is_some() {
                self.fail(
                    var,
                    format!("both {var} and {file_var} are set; set only one"),
                );
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    let text = text.strip_suffix('\r').unwrap_or(text);
                    resolved.insert(var, text.to_string());
                }
                Err(e) => self.fail(file_var, format!("cannot read `{path}`: {e}")),
            }
        }
        resolved
    }

    fn database(&mut self) -> (String, Backend) {
        let url = self
            .get(DATABASE_URL)
            .unwrap_or(DEFAULT_DATABASE_URL)
            .to_string();
        let backend = Backend::of_url(&url).unwrap_or_else(|| {
            // The URL may hold a password: do not echo it.
            self.fail(
                DATABASE_URL,
                "must start with postgres://, postgresql:// or sqlite:",
            );
            Backend::Sqlite
        });
        (url, backend)
    }

    fn addr(&mut self, var: &'static str, default: &str) -> SocketAddr {
        let text = self.get(var).unwrap_or(default).to_string();
        text.parse().unwrap_or_else(|_| {
            self.fail(
                var,
                format!("`{text}` is not a socket address like 127.0.0.1:8080"),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    /// A bearer token: at least [`MIN_TOKEN_LEN`] printable characters without spaces.
    fn token(&mut self, var: &'static str) -> Option<String> {
        let token = self.get(var).map(str::to_string)?;
        if token.chars().count() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            self.fail(
                var,
                format!("must be at least {MIN_TOKEN_LEN} printable characters without spaces (e.g. `openssl rand -hex 24`)"),
            );
        }
        Some(token)
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

/// Whether a database or Redis URL carries a password (in its user info, or as a
/// `password=` query parameter, which libpq accepts).
pub fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    let in_user_info = authority
        .rsplit_once('@')
        .is_some_and(|(user_info, _)| user_info.contains(':'));
    in_user_info
        || query
            .split('&')
            .any(|pair| pair.to_ascii_lowercase().starts_with("password="))
}

/// Whether each node of a Redis URL has a host and a port that can be used (`redis`
/// parses the URL without connecting: a port like 99999 is refused here, not at the
/// first request).
fn redis_url_is_usable(target: &crate::limits::conn::Target) -> bool {
    target
        .node_urls()
        .iter()
        .all(|node| redis::Client::open(node.as_str()).is_ok())
}

/// `raw` with every `*_FILE` twin read into its variable (see [`Parser::read_files`]),
/// and the errors of doing so.
fn with_files(raw: &RawConfig) -> (RawConfig, Vec<ConfigError>) {
    let mut p = Parser {
        raw,
        errors: Vec::new(),
    };
    let resolved = p.read_files();
    (resolved, p.errors)
}

/// `KEYWARD_DATABASE_URL` (or its file) alone, by the rules of [`Config::from_raw`]: for
/// `keyward migrate`.
pub fn database_url_from_raw(raw: &RawConfig) -> Result<String, Vec<ConfigError>> {
    let (resolved, errors) = with_files(raw);
    let mut p = Parser {
        raw: &resolved,
        errors,
    };
    let (url, _) = p.database();
    if p.errors.is_empty() {
        Ok(url)
    } else {
        Err(p.errors)
    }
}

impl Config {
    pub fn from_raw(raw: &RawConfig) -> Result<Config, Vec<ConfigError>> {
        let (resolved, errors) = with_files(raw);
        let mut p = Parser {
            raw: &resolved,
            errors,
        };
        let listen = p.addr(LISTEN, "127.0.0.1:8080");
        let admin_listen = p.addr(ADMIN_LISTEN, "127.0.0.1:8081");

        let admin_token = p.token(ADMIN_TOKEN);
        let data_token = p.token(DATA_TOKEN);

        let (database_url, backend) = p.database();

        let redis_url = p.get(REDIS_URL).map(str::to_string);
        if let Some(url) = &redis_url {
            match crate::limits::conn::Target::parse(url) {
                None => p.fail(
                    REDIS_URL,
                    "must be redis://host:port, rediss://…, or redis+cluster://host:port,host:port",
                ),
                // The URL may hold a password: do not echo it.
                Some(target) if !redis_url_is_usable(&target) => p.fail(
                    REDIS_URL,
                    "has a host or port that is not valid (a port is 1 to 65535, e.g. redis://host:6379)",
                ),
                Some(_) => {}
            }
        }
        // A CA file that would not be used is a mistake (a `redis://` URL where
        // `rediss://` was meant), not something to ignore.
        let redis_ca = p.get(REDIS_CA_FILE).map(str::to_string).and_then(|path| {
            let tls = redis_url
                .as_deref()
                .is_some_and(crate::limits::conn::Target::is_tls);
            if !tls {
                p.fail(
                    REDIS_CA_FILE,
                    format!("is set but {REDIS_URL} is not a rediss:// or rediss+cluster:// URL (the CA file is only used for TLS)"),
                );
                return None;
            }
            let checked = std::fs::read(&path)
                .map_err(|e| format!("cannot read `{path}`: {e}"))
                .and_then(|pem| {
                    crate::tls::ca_certificates(&pem)
                        .map(|_| pem)
                        .map_err(|why| format!("`{path}`: {why}"))
                });
            checked.map_err(|why| p.fail(REDIS_CA_FILE, why)).ok()
        });

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

        let default_price = p.get(DEFAULT_PRICE).map(str::to_string).and_then(|text| {
            serde_json::from_str::<crate::prices::PriceInput>(&text)
                .map_err(|e| {
                    format!("must be a JSON price like {{\"input_per_mtok_usd\": 2.5, \"output_per_mtok_usd\": 10}}: {e}")
                })
                .and_then(|input| input.validate())
                .map_err(|why| p.fail(DEFAULT_PRICE, why))
                .ok()
        });

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
            redis_ca,
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
            default_price,
        })
    }

    /// Start-up warnings that are not errors, one line each.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.admin_token.is_none() {
            out.push(format!(
                "{ADMIN_TOKEN} is not set: the admin API refuses every call until it is"
            ));
        }
        if self.data_token.is_none() {
            out.push(format!(
                "{DATA_TOKEN} is not set: /v1/select and reports without a lease are refused until it is"
            ));
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
            (ADMIN_TOKEN_FILE, token.to_str().unwrap()),
            (ENCRYPTION_KEY_FILE, key.to_str().unwrap()),
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
            (ADMIN_TOKEN_FILE, secret.to_str().unwrap()),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 1);
        let line = errors[0].to_string();
        assert!(
            line.starts_with(ADMIN_TOKEN) && line.contains(ADMIN_TOKEN_FILE),
            "{line}"
        );

        let missing = dir.path().join("missing");
        let errors = parse(&[(REDIS_URL_FILE, missing.to_str().unwrap())]).unwrap_err();
        let line = errors[0].to_string();
        assert_eq!(errors[0].var, REDIS_URL_FILE);
        assert!(line.contains(missing.to_str().unwrap()), "{line}");

        // A file that is not a valid value is reported under the variable, without its content.
        let errors = parse(&[(DATA_TOKEN_FILE, secret.to_str().unwrap())]);
        assert!(errors.is_ok(), "25 printable characters are a valid token");
        std::fs::write(&secret, "short-secret").unwrap();
        let errors = parse(&[(DATA_TOKEN_FILE, secret.to_str().unwrap())]).unwrap_err();
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
}
