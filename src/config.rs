//! Configuration: every setting is an environment variable; the non-secret ones are
//! also `serve` flags.
//!
//! Each setting is declared once, in [`SETTINGS`] below (variable, flag, default,
//! accepted values, secret or not, help): the parser reads each setting by its
//! declaration ([`declared`]), [`crate::cli`] builds the `serve` flags and their help
//! from it, `Debug` redacts by it, and the README's Configuration table is its rendering
//! ([`markdown_table`], held to the README by tests/cli.rs). Adding a setting is one
//! entry there, plus the [`Config`] field that carries its parsed value.
//!
//! Parsing is separate from reading: [`Config::from_raw`] takes a map of variable name →
//! text, so tests hand it a map and `main` hands it what [`crate::cli`] read from flags
//! and the environment. Every bad value is reported (all of them, not only the first),
//! each as one line that starts with the variable's name. Secret values never appear in
//! those lines, nor in `Debug` output.
//!
//! Secrets (the tokens, the encryption keys, URLs that may hold a password) are never
//! command-line flags, which any local user reads in `/proc/<pid>/cmdline`: they come
//! from the environment or from a file named by their `…_FILE` twin
//! ([`Setting::file_twin`]), which [`Config::from_raw`] reads.
//!
//! Over 400 lines because the declaration table (one entry per setting, about 170 lines)
//! sits beside the [`Config`] it fills; the parser, the renderings and the unit tests
//! are in `config/`.

mod parse;
mod setting;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::crypto;
use crate::db::Backend;
pub use parse::url_has_password;
use parse::{database, redis_url_is_usable, Parser};
use setting::settings;
pub use setting::{Exposure, Fallback, Kind, Setting};

settings! {
    LISTEN = "KEYWARD_LISTEN" {
        flag: "listen",
        kind: Kind::Addr,
        default: Fallback::Value("127.0.0.1:8080"),
        help: "data plane address",
    }
    ADMIN_LISTEN = "KEYWARD_ADMIN_LISTEN" {
        flag: "admin-listen",
        kind: Kind::Addr,
        default: Fallback::Value("127.0.0.1:8081"),
        help: "admin API address",
    }
    MAX_CONNECTIONS_PER_PEER = "KEYWARD_MAX_CONNECTIONS_PER_PEER" {
        flag: "max-connections-per-peer",
        // At most the data plane's connections for remote peers (`http::Bounds::DATA`).
        kind: Kind::Whole { min: 1, max: 4096, unit: "connections" },
        default: Fallback::Value("1024"),
        help: "connections the data plane serves at once from one remote IP address, of its 4096 for remote peers (loopback peers have 1024 more of their own and no cap); one more is closed at once, unanswered (`keyward_connections_refused_total`); 4096 = no cap of its own",
    }
    ADMIN_TOKEN = "KEYWARD_ADMIN_TOKEN" {
        flag: "admin-token",
        exposure: Exposure::Secret,
        kind: Kind::Token,
        default: Fallback::Unset,
        help: "bearer token of the admin API; unset = the admin API refuses every call",
    }
    DATA_TOKEN = "KEYWARD_DATA_TOKEN" {
        flag: "data-token",
        exposure: Exposure::Secret,
        kind: Kind::Token,
        default: Fallback::Unset,
        help: "bearer token for `/v1/select` and reports without a lease; unset = those are refused",
    }
    DATABASE_URL = "KEYWARD_DATABASE_URL" {
        flag: "database-url",
        exposure: Exposure::Url,
        kind: Kind::DatabaseUrl,
        default: Fallback::Value("sqlite://keyward.db"),
        help: "where key records, balances and usage are kept: Postgres, or SQLite in a file",
    }
    REDIS_URL = "KEYWARD_REDIS_URL" {
        flag: "redis-url",
        exposure: Exposure::Url,
        kind: Kind::RedisUrl,
        default: Fallback::Instead("unset: counters in process"),
        help: "where counters, cooldowns and slots are kept: Redis, or a Redis Cluster",
    }
    REDIS_CA_FILE = "KEYWARD_REDIS_CA_FILE" {
        flag: "redis-ca-file",
        kind: Kind::File,
        default: Fallback::Unset,
        help: "PEM file of CA certificates trusted for `rediss://` and `rediss+cluster://` beside the system roots; set with a `KEYWARD_REDIS_URL` without TLS, it stops start-up",
    }
    ENCRYPTION_KEY = "KEYWARD_ENCRYPTION_KEY" {
        flag: "encryption-key",
        exposure: Exposure::Secret,
        kind: Kind::Key,
        default: Fallback::Instead("generated (SQLite only)"),
        help: "the key that encrypts stored secrets; required with Postgres",
    }
    ENCRYPTION_KEYS_PREVIOUS = "KEYWARD_ENCRYPTION_KEYS_PREVIOUS" {
        flag: "encryption-keys-previous",
        exposure: Exposure::Secret,
        kind: Kind::Keys,
        default: Fallback::Unset,
        help: "older keys that still decrypt (see `POST /admin/encryption/rotate`)",
    }
    ON_BACKEND_ERROR = "KEYWARD_ON_BACKEND_ERROR" {
        flag: "on-backend-error",
        kind: Kind::Choice(&["deny", "allow", "local"]),
        default: Fallback::Value("deny"),
        help: "what admissions do while Redis fails (see \"When Redis fails\")",
    }
    LOG_FORMAT = "KEYWARD_LOG_FORMAT" {
        flag: "log-format",
        kind: Kind::Choice(&["text", "json"]),
        default: Fallback::Value("text"),
        help: "how log lines are written; the level comes from `RUST_LOG` (default `info`)",
    }
    KEY_PREFIX = "KEYWARD_KEY_PREFIX" {
        flag: "key-prefix",
        kind: Kind::Name { max: 16, punct: "-_" },
        default: Fallback::Value("sk-kw-"),
        help: "prefix of generated client keys",
    }
    EXPIRY_INTERVAL_S = "KEYWARD_EXPIRY_INTERVAL_S" {
        flag: "expiry-interval-s",
        kind: Kind::Whole { min: 0, max: 86_400, unit: "seconds" },
        default: Fallback::Value("60"),
        help: "time between expiry passes; `0` turns the job off",
    }
    EXPIRY_AUTO_DELETE = "KEYWARD_EXPIRY_AUTO_DELETE" {
        flag: "expiry-auto-delete",
        kind: Kind::Bool,
        default: Fallback::Value("false"),
        help: "expiry deletes (rather than disables) keys without their own `auto_delete_on_expiry`",
    }
    THREADS = "KEYWARD_THREADS" {
        flag: "threads",
        kind: Kind::Whole { min: 0, max: 1024, unit: "threads" },
        default: Fallback::Value("1"),
        help: "threads that serve requests and run the background jobs: 1 = one thread (the least CPU per decision: no hand-offs between threads, a replica uses at most one core); 0 = one per core; more for a replica that must use several cores",
    }
    SHUTDOWN_GRACE_S = "KEYWARD_SHUTDOWN_GRACE_S" {
        flag: "shutdown-grace-s",
        kind: Kind::Whole { min: 0, max: 3_600, unit: "seconds" },
        default: Fallback::Value("10"),
        help: "how long in-flight requests may finish after SIGTERM",
    }
    LEASE_TTL_S = "KEYWARD_LEASE_TTL_S" {
        flag: "lease-ttl-s",
        kind: Kind::Whole { min: 1, max: 86_400, unit: "seconds" },
        default: Fallback::Value("300"),
        help: "how long an unreported, unrenewed lease holds its slot",
    }
    DEFAULT_ESTIMATED_TOKENS = "KEYWARD_DEFAULT_ESTIMATED_TOKENS" {
        flag: "default-estimated-tokens",
        kind: Kind::Whole { min: 0, max: 1_000_000_000_000, unit: "tokens" },
        default: Fallback::Value("1000"),
        help: "tokens reserved when a request gives no estimate",
    }
    REDIS_PREFIX = "KEYWARD_REDIS_PREFIX" {
        flag: "redis-prefix",
        kind: Kind::Name { max: 64, punct: "-_:." },
        default: Fallback::Value("kw"),
        help: "Redis key prefix: every hash tag starts with it (`{kw:…}`); deployments sharing a Redis need different prefixes",
    }
    REDIS_SHARDS = "KEYWARD_REDIS_SHARDS" {
        flag: "redis-shards",
        kind: Kind::Whole { min: 1, max: 1024, unit: "shards" },
        default: Fallback::Value("16"),
        help: "tenant shards (hash tags) a deployment's counters spread over a Redis Cluster's masters; the same value on every replica (a replica with another value than the one Redis holds in `{<prefix>}:layout` refuses to start, or goes unready; the first replica to write that key wins, see \"Spreading over a Redis Cluster\" in docs/operations.md); changing it re-homes counters",
    }
    KEY_CACHE_TTL_S = "KEYWARD_KEY_CACHE_TTL_S" {
        flag: "key-cache-ttl-s",
        kind: Kind::Whole { min: 1, max: 86_400, unit: "seconds" },
        default: Fallback::Value("60"),
        help: "how long a key record (and a provider's pool) is served from memory before it is reloaded in the background; admin changes invalidate at once",
    }
    NEGATIVE_CACHE_TTL_S = "KEYWARD_NEGATIVE_CACHE_TTL_S" {
        flag: "negative-cache-ttl-s",
        kind: Kind::Whole { min: 0, max: 3_600, unit: "seconds" },
        default: Fallback::Value("5"),
        help: "how long an unknown key is remembered as unknown",
    }
    REPORT_DEDUPE_TTL_S = "KEYWARD_REPORT_DEDUPE_TTL_S" {
        flag: "report-dedupe-ttl-s",
        kind: Kind::Whole { min: 1, max: 604_800, unit: "seconds" },
        default: Fallback::Value("600"),
        help: "how long after a lease's expiry its report is accepted (and a repeat answers `duplicate`)",
    }
    ACCOUNTING_CLAIM_IDLE_S = "KEYWARD_ACCOUNTING_CLAIM_IDLE_S" {
        flag: "accounting-claim-idle-s",
        kind: Kind::Whole { min: 1, max: 3_600, unit: "seconds" },
        default: Fallback::Value("30"),
        help: "after this long, usage queued by a replica that died is applied by another",
    }
    PROVIDER_COOLDOWN_S = "KEYWARD_PROVIDER_COOLDOWN_S" {
        flag: "provider-cooldown-s",
        kind: Kind::Whole { min: 1, max: 86_400, unit: "seconds" },
        default: Fallback::Value("60"),
        help: "provider key cooldown after an upstream 429 without `retry_after_s`",
    }
    PROVIDER_COOLDOWN_MAX_S = "KEYWARD_PROVIDER_COOLDOWN_MAX_S" {
        flag: "provider-cooldown-max-s",
        kind: Kind::Whole { min: 1, max: 86_400, unit: "seconds" },
        default: Fallback::Value("3600"),
        help: "the longest cooldown or suspension a report authorized by a lease can set, whatever its `retry_after_s` or `KEYWARD_PROVIDER_SUSPEND_S` (so a client key cannot take a pool out for long; reports with the data token may say up to 86400)",
    }
    PROVIDER_SUSPEND_S = "KEYWARD_PROVIDER_SUSPEND_S" {
        flag: "provider-suspend-s",
        kind: Kind::Whole { min: 1, max: 604_800, unit: "seconds" },
        default: Fallback::Value("600"),
        help: "provider key suspension after an upstream 401/403",
    }
    DEFAULT_PRICE = "KEYWARD_DEFAULT_PRICE" {
        flag: "default-price",
        kind: Kind::Price,
        default: Fallback::Unset,
        help: "price of a model without one of its own (the fields of `PUT /admin/prices`, e.g. `{\"input_per_mtok_usd\": 2.5, \"output_per_mtok_usd\": 10}`); unset: a key with a balance asking for such a model gets 403 `PRICE_UNKNOWN`. A bad value stops start-up",
    }
    PRICES_FILE = "KEYWARD_PRICES_FILE" {
        flag: "prices-file",
        kind: Kind::File,
        default: Fallback::Unset,
        help: "JSON file of model prices keyed by `provider/model`, stored at start-up (see \"Prices\"); a file that cannot be read or holds a bad entry stops start-up",
    }
    WEBHOOK_URL = "KEYWARD_WEBHOOK_URL" {
        flag: "webhook-url",
        exposure: Exposure::Url,
        kind: Kind::HttpUrl,
        default: Fallback::Instead("unset: spend alerts queue, unsent"),
        help: "where spend alerts are POSTed, signed (see \"Spend alerts\" in docs/api.md; unsent alerts wait in the database); a URL holding a token belongs in the environment or the `_FILE` twin",
    }
    WEBHOOK_SECRET = "KEYWARD_WEBHOOK_SECRET" {
        flag: "webhook-secret",
        exposure: Exposure::Secret,
        kind: Kind::Token,
        default: Fallback::Unset,
        help: "key of the alerts' `x-keyward-signature` (HMAC-SHA256); required with `KEYWARD_WEBHOOK_URL`",
    }
}

/// The README's Configuration table, rendered from [`SETTINGS`].
pub fn markdown_table() -> String {
    setting::markdown_table(SETTINGS)
}

/// The text under `keyward serve --help` for the settings that have no flag.
pub fn secrets_help() -> String {
    setting::secrets_help(SETTINGS)
}

/// The shortest admin or data token accepted: a guessable token opens everything.
pub const MIN_TOKEN_LEN: usize = 16;

/// Variable name → raw text, as read from flags or the environment.
pub type RawConfig = BTreeMap<&'static str, String>;

pub use crate::limits::BackendErrorPolicy;

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
    /// `KEYWARD_THREADS`: 1 = a one-thread runtime, 0 = one worker per core, else so
    /// many workers ([`Config::runtime`]).
    pub threads: usize,
    pub shutdown_grace: Duration,
    /// At most this many of the data plane's connections from one remote IP address.
    pub max_connections_per_peer: usize,
    /// How long an unreported, unrenewed lease holds its slot.
    pub lease_ttl: Duration,
    /// Tokens reserved when a request names no estimate.
    pub default_estimated_tokens: i64,
    /// The Redis key prefix of this deployment (its hash tags start with it).
    pub redis_prefix: String,
    /// How many tenant shards (hash tags) the counters spread over.
    pub redis_shards: u16,
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
    /// Where spend alerts go (`KEYWARD_WEBHOOK_URL` with its secret); `None`: they queue.
    pub webhook: Option<crate::alerts::Webhook>,
    /// Each setting as `Debug` shows it.
    shown: Vec<(&'static str, Option<String>)>,
}

/// Each setting as given (or its default), in the order of [`SETTINGS`]; a secret or a
/// URL only as `<set>`: the redaction comes from the declarations, so a new setting
/// cannot leak here.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (var, shown) in &self.shown {
            map.entry(var, &shown.as_deref().unwrap_or("unset"));
        }
        map.finish()
    }
}

impl Config {
    /// The async runtime `KEYWARD_THREADS` asks for. One thread by default: a decision
    /// is mostly socket reads and writes, and between workers every hand-off (request
    /// task to the redis-rs driver task and back) can be a wake-up of another thread;
    /// on one thread they stay in the scheduler, and the driver writes the commands of
    /// every ready request in one write: 22% less CPU per admission in the Redis shape
    /// (BENCHMARKS.md, "One thread").
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = match self.threads {
            1 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                // 0: tokio's default, one per core (or `TOKIO_WORKER_THREADS`).
                if n > 1 {
                    builder.worker_threads(n);
                }
                builder
            }
        };
        builder.enable_all().build()
    }
}

/// `raw` with every `*_FILE` twin read into its variable (see [`Parser::read_files`]),
/// and the errors of doing so.
fn with_files(raw: &RawConfig) -> (RawConfig, Vec<ConfigError>) {
    let mut p = Parser::new(raw, Vec::new());
    let resolved = p.read_files(SETTINGS);
    (resolved, p.errors)
}

/// `KEYWARD_DATABASE_URL` (or its file) alone, by the rules of [`Config::from_raw`]: for
/// `keyward migrate`.
pub fn database_url_from_raw(raw: &RawConfig) -> Result<String, Vec<ConfigError>> {
    let (resolved, errors) = with_files(raw);
    let mut p = Parser::new(&resolved, errors);
    let (url, _) = database(&mut p);
    if p.errors.is_empty() {
        Ok(url)
    } else {
        Err(p.errors)
    }
}

impl Config {
    pub fn from_raw(raw: &RawConfig) -> Result<Config, Vec<ConfigError>> {
        let (resolved, errors) = with_files(raw);
        let mut p = Parser::new(&resolved, errors);
        let listen = p.addr(&declared::LISTEN);
        let admin_listen = p.addr(&declared::ADMIN_LISTEN);

        let admin_token = p.token(&declared::ADMIN_TOKEN);
        let data_token = p.token(&declared::DATA_TOKEN);

        let (database_url, backend) = database(&mut p);

        let redis_url = p.raw_text(&declared::REDIS_URL);
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

        let encryption_key = p.raw_text(&declared::ENCRYPTION_KEY).and_then(|text| {
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
        if let Some(list) = p.raw_text(&declared::ENCRYPTION_KEYS_PREVIOUS) {
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
            &declared::ON_BACKEND_ERROR,
            [
                BackendErrorPolicy::Deny,
                BackendErrorPolicy::Allow,
                BackendErrorPolicy::Local,
            ],
        );
        let log_format = p.choice(&declared::LOG_FORMAT, [LogFormat::Text, LogFormat::Json]);
        let key_prefix = p.name(&declared::KEY_PREFIX);

        let expiry_secs = p.whole(&declared::EXPIRY_INTERVAL_S);
        let expiry_auto_delete = p.boolean(&declared::EXPIRY_AUTO_DELETE);
        let threads = p.whole(&declared::THREADS) as usize;
        let shutdown_grace = p.seconds(&declared::SHUTDOWN_GRACE_S);
        let max_connections_per_peer = p.whole(&declared::MAX_CONNECTIONS_PER_PEER) as usize;
        let lease_ttl = p.seconds(&declared::LEASE_TTL_S);
        let default_estimated_tokens = p.whole(&declared::DEFAULT_ESTIMATED_TOKENS) as i64;
        let redis_prefix = p.name(&declared::REDIS_PREFIX);
        let redis_shards = p.whole(&declared::REDIS_SHARDS) as u16;
        let key_cache_ttl = p.seconds(&declared::KEY_CACHE_TTL_S);
        let negative_cache_ttl = p.seconds(&declared::NEGATIVE_CACHE_TTL_S);
        let report_dedupe_ttl = p.seconds(&declared::REPORT_DEDUPE_TTL_S);
        let accounting_claim_idle = p.seconds(&declared::ACCOUNTING_CLAIM_IDLE_S);
        let provider_cooldown = p.seconds(&declared::PROVIDER_COOLDOWN_S);
        let provider_cooldown_max = p.seconds(&declared::PROVIDER_COOLDOWN_MAX_S);
        let provider_suspend = p.seconds(&declared::PROVIDER_SUSPEND_S);

        // A CA file that would not be used is a mistake (a `redis://` URL where
        // `rediss://` was meant), not something to ignore.
        let redis_ca = p.file(&declared::REDIS_CA_FILE).and_then(|(path, pem)| {
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
            match crate::tls::ca_certificates(pem.as_bytes()) {
                Ok(_) => Some(pem.into_bytes()),
                Err(why) => {
                    p.fail(REDIS_CA_FILE, format!("`{path}`: {why}"));
                    None
                }
            }
        });

        let prices = match p.file(&declared::PRICES_FILE) {
            None => Vec::new(),
            Some((path, text)) => crate::prices::parse_file(&text).unwrap_or_else(|why| {
                p.fail(PRICES_FILE, format!("`{path}`: {why}"));
                Vec::new()
            }),
        };

        let default_price = p.raw_text(&declared::DEFAULT_PRICE).and_then(|text| {
            serde_json::from_str::<crate::prices::PriceInput>(&text)
                .map_err(|e| {
                    format!("must be a JSON price like {{\"input_per_mtok_usd\": 2.5, \"output_per_mtok_usd\": 10}}: {e}")
                })
                .and_then(|input| input.validate())
                .map_err(|why| p.fail(DEFAULT_PRICE, why))
                .ok()
        });

        let webhook = webhook(&mut p);

        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        let shown = SETTINGS.iter().map(|s| (s.var, p.shown(s))).collect();
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
            threads,
            shutdown_grace,
            max_connections_per_peer,
            lease_ttl,
            default_estimated_tokens,
            redis_prefix,
            redis_shards,
            key_cache_ttl,
            negative_cache_ttl,
            report_dedupe_ttl,
            accounting_claim_idle,
            provider_cooldown,
            provider_cooldown_max,
            provider_suspend,
            prices,
            default_price,
            webhook,
            shown,
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

/// `KEYWARD_WEBHOOK_URL` and its secret: an http(s) URL (never echoed: it may hold a
/// token), and a secret of at least [`MIN_TOKEN_LEN`] characters whenever a URL is set.
fn webhook(p: &mut Parser) -> Option<crate::alerts::Webhook> {
    let secret = p.token(&declared::WEBHOOK_SECRET);
    let url = p.raw_text(&declared::WEBHOOK_URL)?;
    if let Err(why) = crate::alerts::send::check_url(&url) {
        p.fail(WEBHOOK_URL, why);
        return None;
    }
    let Some(secret) = secret else {
        p.fail(
            WEBHOOK_SECRET,
            format!("is required when {WEBHOOK_URL} is set (at least {MIN_TOKEN_LEN} characters, e.g. `openssl rand -hex 24`): receivers check each alert's signature with it"),
        );
        return None;
    };
    crate::alerts::Webhook::new(&url, &secret)
        .map_err(|why| p.fail(WEBHOOK_URL, why))
        .ok()
}

#[cfg(test)]
mod tests;
