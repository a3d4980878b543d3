//! Command line: `keyward serve` and `keyward migrate`. Every `serve` flag has an
//! environment twin (the flag wins); both end up in one [`RawConfig`] map for
//! [`Config::from_raw`](crate::config::Config::from_raw) to validate.

use clap::{Args, Parser, Subcommand};

use crate::config::{self, RawConfig};

#[derive(Debug, Parser)]
#[command(
    name = "keyward",
    version,
    about = "Rate-limiting and key-pool sidecar for LLM API gateways"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the data plane and the admin API (migrations are applied first).
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
}

// Secret-bearing settings hide their environment value from `--help`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data plane address [default: 0.0.0.0:8080]
    #[arg(long, env = config::LISTEN)]
    pub listen: Option<String>,
    /// Admin API address [default: 0.0.0.0:8081]
    #[arg(long, env = config::ADMIN_LISTEN)]
    pub admin_listen: Option<String>,
    /// Bearer token of the admin API (unset: admin API disabled)
    #[arg(long, env = config::ADMIN_TOKEN, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bearer token for /v1/select and reports without a lease (unset: those are refused)
    #[arg(long, env = config::DATA_TOKEN, hide_env_values = true)]
    pub data_token: Option<String>,
    /// postgres://… or sqlite:… [default: sqlite://keyward.db]
    #[arg(long, env = config::DATABASE_URL, hide_env_values = true)]
    pub database_url: Option<String>,
    /// redis://… (unset: counters in process)
    #[arg(long, env = config::REDIS_URL, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Base64 of 32 bytes (embedded shape: generated into a 0600 file if unset)
    #[arg(long, env = config::ENCRYPTION_KEY, hide_env_values = true)]
    pub encryption_key: Option<String>,
    /// Comma-separated older keys that can still decrypt
    #[arg(long, env = config::ENCRYPTION_KEYS_PREVIOUS, hide_env_values = true)]
    pub encryption_keys_previous: Option<String>,
    /// deny | allow | local [default: deny]
    #[arg(long, env = config::ON_BACKEND_ERROR)]
    pub on_backend_error: Option<String>,
    /// text | json [default: text]
    #[arg(long, env = config::LOG_FORMAT)]
    pub log_format: Option<String>,
    /// Prefix of generated client keys [default: sk-kw-]
    #[arg(long, env = config::KEY_PREFIX)]
    pub key_prefix: Option<String>,
    /// Seconds between expiry passes, 0 = off [default: 60]
    #[arg(long, env = config::EXPIRY_INTERVAL_S)]
    pub expiry_interval_s: Option<String>,
    /// Expiry deletes keys without their own auto_delete_on_expiry [default: false]
    #[arg(long, env = config::EXPIRY_AUTO_DELETE)]
    pub expiry_auto_delete: Option<String>,
    /// Seconds in-flight requests get to finish on shutdown [default: 10]
    #[arg(long, env = config::SHUTDOWN_GRACE_S)]
    pub shutdown_grace_s: Option<String>,
    /// Seconds an unreported lease holds its slot [default: 300]
    #[arg(long, env = config::LEASE_TTL_S)]
    pub lease_ttl_s: Option<String>,
    /// Tokens reserved when a request gives no estimate [default: 1000]
    #[arg(long, env = config::DEFAULT_ESTIMATED_TOKENS)]
    pub default_estimated_tokens: Option<String>,
    /// Redis key prefix and hash tag of this deployment [default: kw]
    #[arg(long, env = config::REDIS_PREFIX)]
    pub redis_prefix: Option<String>,
    /// Seconds a key record is served from the in-process cache [default: 60]
    #[arg(long, env = config::KEY_CACHE_TTL_S)]
    pub key_cache_ttl_s: Option<String>,
    /// Seconds an unknown key is remembered as unknown [default: 5]
    #[arg(long, env = config::NEGATIVE_CACHE_TTL_S)]
    pub negative_cache_ttl_s: Option<String>,
    /// Seconds after a lease's expiry that its report is accepted (a repeat: "duplicate") [default: 600]
    #[arg(long, env = config::REPORT_DEDUPE_TTL_S)]
    pub report_dedupe_ttl_s: Option<String>,
    /// Seconds before another replica's unapplied queue entries are taken over [default: 30]
    #[arg(long, env = config::ACCOUNTING_CLAIM_IDLE_S)]
    pub accounting_claim_idle_s: Option<String>,
    /// Seconds a provider key cools down after a 429 without retry_after_s [default: 60]
    #[arg(long, env = config::PROVIDER_COOLDOWN_S)]
    pub provider_cooldown_s: Option<String>,
    /// Longest cooldown a report authorized by a lease may set [default: 3600]
    #[arg(long, env = config::PROVIDER_COOLDOWN_MAX_S)]
    pub provider_cooldown_max_s: Option<String>,
    /// Seconds a provider key is suspended after a 401/403 [default: 600]
    #[arg(long, env = config::PROVIDER_SUSPEND_S)]
    pub provider_suspend_s: Option<String>,
    /// JSON file of model prices keyed by provider/model, stored at start-up
    #[arg(long, env = config::PRICES_FILE)]
    pub prices_file: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// postgres://… or sqlite:… [default: sqlite://keyward.db]
    #[arg(long, env = config::DATABASE_URL, hide_env_values = true)]
    pub database_url: Option<String>,
}

impl ServeArgs {
    pub fn raw(&self) -> RawConfig {
        [
            (config::LISTEN, &self.listen),
            (config::ADMIN_LISTEN, &self.admin_listen),
            (config::ADMIN_TOKEN, &self.admin_token),
            (config::DATA_TOKEN, &self.data_token),
            (config::DATABASE_URL, &self.database_url),
            (config::REDIS_URL, &self.redis_url),
            (config::ENCRYPTION_KEY, &self.encryption_key),
            (
                config::ENCRYPTION_KEYS_PREVIOUS,
                &self.encryption_keys_previous,
            ),
            (config::ON_BACKEND_ERROR, &self.on_backend_error),
            (config::LOG_FORMAT, &self.log_format),
            (config::KEY_PREFIX, &self.key_prefix),
            (config::EXPIRY_INTERVAL_S, &self.expiry_interval_s),
            (config::EXPIRY_AUTO_DELETE, &self.expiry_auto_delete),
            (config::SHUTDOWN_GRACE_S, &self.shutdown_grace_s),
            (config::LEASE_TTL_S, &self.lease_ttl_s),
            (
                config::DEFAULT_ESTIMATED_TOKENS,
                &self.default_estimated_tokens,
            ),
            (config::REDIS_PREFIX, &self.redis_prefix),
            (config::KEY_CACHE_TTL_S, &self.key_cache_ttl_s),
            (config::NEGATIVE_CACHE_TTL_S, &self.negative_cache_ttl_s),
            (config::REPORT_DEDUPE_TTL_S, &self.report_dedupe_ttl_s),
            (
                config::ACCOUNTING_CLAIM_IDLE_S,
                &self.accounting_claim_idle_s,
            ),
            (config::PROVIDER_COOLDOWN_S, &self.provider_cooldown_s),
            (
                config::PROVIDER_COOLDOWN_MAX_S,
                &self.provider_cooldown_max_s,
            ),
            (config::PROVIDER_SUSPEND_S, &self.provider_suspend_s),
            (config::PRICES_FILE, &self.prices_file),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|v| (name, v)))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every `serve` flag (and so its environment twin) must reach the configuration: a
    /// flag missing from `raw()` would be accepted and silently ignored.
    #[test]
    fn every_serve_flag_reaches_the_configuration() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        let mut argv = vec!["keyward".to_string(), "serve".to_string()];
        let mut vars = Vec::new();
        for arg in serve.get_arguments() {
            if let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) {
                argv.push(format!("--{long}"));
                argv.push(format!("value-of-{long}"));
                vars.push((env.to_string_lossy().into_owned(), long.to_string()));
            }
        }
        assert!(vars.len() >= 20, "the serve flags were not found");
        let Command::Serve(args) = Cli::try_parse_from(&argv).expect("parses").command else {
            panic!("not serve");
        };
        let raw = args.raw();
        for (var, long) in vars {
            assert_eq!(
                raw.get(var.as_str()).map(String::as_str),
                Some(format!("value-of-{long}").as_str()),
                "--{long} / {var} does not reach the configuration"
            );
        }
    }
}
