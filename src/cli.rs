//! Command line: `keyward serve` and `keyward migrate`. Every `serve` flag has an
//! environment twin (the flag wins); both end up in one [`RawConfig`] map for
//! [`Config::from_raw`](crate::config::Config::from_raw) to validate.
//!
//! Secrets are not flags ([`config::NOT_FLAGS`]): they, and every `…_FILE` twin, are read
//! from the environment only. The database and Redis URLs stay flags for URLs without a
//! password; a flag holding one is refused, because the command line is public.

use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigError, RawConfig};

/// Shown under `keyward serve --help`: the settings that have no flag.
const SECRETS_HELP: &str = "\
Secrets are read from the environment only, never from flags (any local user can read a
command line): KEYWARD_ADMIN_TOKEN, KEYWARD_DATA_TOKEN (each at least 16 characters),
KEYWARD_ENCRYPTION_KEY, KEYWARD_ENCRYPTION_KEYS_PREVIOUS, and a database or Redis URL
holding a password. Each of these, and KEYWARD_DATABASE_URL and KEYWARD_REDIS_URL, can
instead be read from a file named by its _FILE twin (e.g. KEYWARD_ADMIN_TOKEN_FILE).";

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
    #[command(after_help = SECRETS_HELP)]
    Serve(Box<ServeArgs>),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Ask the keyward at KEYWARD_LISTEN for a health path; exit 0 on 200 (for exec probes).
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The path to ask for
    #[arg(default_value = "/readyz")]
    pub path: String,
    /// The data plane address [default: 127.0.0.1:8080]
    #[arg(long, env = config::LISTEN)]
    pub listen: Option<String>,
}

// The two URL flags have no clap `env`: `raw_from` reads the environment itself, so that
// it knows whether a URL came from the (public) command line.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Secrets given on the command line (which any local user can read) are refused
    /// with one line naming their variable, instead of clap's "unexpected argument".
    #[arg(long = "admin-token", hide = true, value_name = "REFUSED")]
    pub admin_token_flag: Option<String>,
    #[arg(long = "data-token", hide = true, value_name = "REFUSED")]
    pub data_token_flag: Option<String>,
    #[arg(long = "encryption-key", hide = true, value_name = "REFUSED")]
    pub encryption_key_flag: Option<String>,
    #[arg(long = "encryption-keys-previous", hide = true, value_name = "REFUSED")]
    pub encryption_keys_previous_flag: Option<String>,
    /// Data plane address [default: 127.0.0.1:8080]
    #[arg(long, env = config::LISTEN)]
    pub listen: Option<String>,
    /// Admin API address [default: 127.0.0.1:8081]
    #[arg(long, env = config::ADMIN_LISTEN)]
    pub admin_listen: Option<String>,
    /// postgres://… or sqlite:…, without a password (env: KEYWARD_DATABASE_URL)
    /// [default: sqlite://keyward.db]
    #[arg(long)]
    pub database_url: Option<String>,
    /// redis://… or rediss://… (TLS), without a password (env: KEYWARD_REDIS_URL) [default: counters in process]
    #[arg(long)]
    pub redis_url: Option<String>,
    /// PEM file of CA certificates trusted for rediss:// beside the system roots
    #[arg(long, env = config::REDIS_CA_FILE)]
    pub redis_ca_file: Option<String>,
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
    /// JSON price for models without one, e.g. {"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10} [default: none: PRICE_UNKNOWN for keys with a balance]
    #[arg(long, env = config::DEFAULT_PRICE)]
    pub default_price: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// postgres://… or sqlite:…, without a password (env: KEYWARD_DATABASE_URL or
    /// KEYWARD_DATABASE_URL_FILE) [default: sqlite://keyward.db]
    #[arg(long)]
    pub database_url: Option<String>,
}

/// The `--database-url` and `--redis-url` flags with their variables.
const URL_FLAGS: [(&str, &str); 2] = [
    ("database-url", config::DATABASE_URL),
    ("redis-url", config::REDIS_URL),
];

/// Adds the environment-only settings (secrets, `…_FILE` twins) and, when its flag is
/// absent, each URL's variable. A URL flag holding a password is refused.
fn add_environment(
    raw: &mut RawConfig,
    urls: &[(&'static str, &'static str, &Option<String>)],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), Vec<ConfigError>> {
    let mut errors = Vec::new();
    for (long, var, flag) in urls {
        match flag {
            Some(url) if config::url_has_password(url) => errors.push(ConfigError {
                var,
                reason: format!(
                    "a URL with a password cannot be given as --{long} (any local user can read the command line); set {var} or {var}_FILE in the environment"
                ),
            }),
            Some(url) => {
                raw.insert(var, url.clone());
            }
            None => {
                if let Some(url) = env(var) {
                    raw.insert(var, url);
                }
            }
        }
    }
    let twins = config::FILE_TWINS.iter().map(|(_, file)| *file);
    for var in config::NOT_FLAGS.into_iter().chain(twins) {
        if let Some(value) = env(var) {
            raw.insert(var, value);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

impl MigrateArgs {
    /// `KEYWARD_DATABASE_URL` (or its `_FILE` twin) for `migrate`, by the rules of `serve`.
    pub fn raw(&self) -> Result<RawConfig, Vec<ConfigError>> {
        self.raw_from(&process_env)
    }

    pub fn raw_from(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RawConfig, Vec<ConfigError>> {
        let mut raw = RawConfig::new();
        let (long, var) = URL_FLAGS[0];
        add_environment(&mut raw, &[(long, var, &self.database_url)], env)?;
        // Only the database matters here.
        raw.retain(|name, _| *name == config::DATABASE_URL || *name == config::DATABASE_URL_FILE);
        Ok(raw)
    }
}

impl ServeArgs {
    /// Flags, then the environment: what [`Config::from_raw`](config::Config::from_raw)
    /// validates.
    pub fn raw(&self) -> Result<RawConfig, Vec<ConfigError>> {
        self.raw_from(&process_env)
    }

    pub fn raw_from(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RawConfig, Vec<ConfigError>> {
        let mut raw: RawConfig = [
            (config::LISTEN, &self.listen),
            (config::ADMIN_LISTEN, &self.admin_listen),
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
            (config::REDIS_CA_FILE, &self.redis_ca_file),
            (config::DEFAULT_PRICE, &self.default_price),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.clone().map(|v| (name, v)))
        .collect();
        let secret_flags = [
            ("admin-token", config::ADMIN_TOKEN, &self.admin_token_flag),
            ("data-token", config::DATA_TOKEN, &self.data_token_flag),
            (
                "encryption-key",
                config::ENCRYPTION_KEY,
                &self.encryption_key_flag,
            ),
            (
                "encryption-keys-previous",
                config::ENCRYPTION_KEYS_PREVIOUS,
                &self.encryption_keys_previous_flag,
            ),
        ];
        let refused: Vec<ConfigError> = secret_flags
            .iter()
            .filter(|(_, _, value)| value.is_some())
            .map(|(long, var, _)| ConfigError {
                var,
                reason: format!(
                    "a secret cannot be given as --{long} (any local user can read the command line); set {var} or {var}_FILE in the environment"
                ),
            })
            .collect();
        if !refused.is_empty() {
            return Err(refused);
        }
        let urls = [
            (URL_FLAGS[0].0, URL_FLAGS[0].1, &self.database_url),
            (URL_FLAGS[1].0, URL_FLAGS[1].1, &self.redis_url),
        ];
        add_environment(&mut raw, &urls, env)?;
        Ok(raw)
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
            let Some(long) = arg.get_long() else { continue };
            let var = match arg.get_env() {
                Some(env) => env.to_string_lossy().into_owned(),
                None => match URL_FLAGS.iter().find(|(l, _)| *l == long) {
                    Some((_, var)) => var.to_string(),
                    None => continue,
                },
            };
            argv.push(format!("--{long}"));
            argv.push(format!("value-of-{long}"));
            vars.push((var, long.to_string()));
        }
        assert!(vars.len() >= 19, "the serve flags were not found");
        let Command::Serve(args) = Cli::try_parse_from(&argv).expect("parses").command else {
            panic!("not serve");
        };
        let raw = args
            .raw_from(&|_| None)
            .expect("no password in these values");
        for (var, long) in vars {
            assert_eq!(
                raw.get(var.as_str()).map(String::as_str),
                Some(format!("value-of-{long}").as_str()),
                "--{long} / {var} does not reach the configuration"
            );
        }
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let argv = ["keyward", "serve"].iter().chain(argv);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(args) => *args,
            _ => panic!("not serve"),
        }
    }

    /// No secret is a flag: the command line is readable by every local user.
    #[test]
    fn secrets_are_not_flags_but_come_from_the_environment() {
        for flag in [
            "--admin-token",
            "--data-token",
            "--encryption-key",
            "--encryption-keys-previous",
        ] {
            // Parsed only to be refused, naming the variable to use instead.
            let argv = ["keyward", "serve", flag, "x"];
            let Command::Serve(args) = Cli::try_parse_from(argv).expect("parses").command else {
                panic!("not serve");
            };
            let errors = args
                .raw_from(&|_| None)
                .expect_err("a secret flag is refused");
            let var = format!("KEYWARD_{}", flag[2..].replace('-', "_").to_uppercase());
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].var, var.as_str(), "{flag}");
        }
        let env = |var: &str| Some(format!("env-{var}"));
        let raw = serve_args(&[]).raw_from(&env).unwrap();
        for var in config::NOT_FLAGS {
            assert_eq!(raw[var], format!("env-{var}"));
        }
        for (var, file_var) in config::FILE_TWINS {
            assert_eq!(raw[file_var], format!("env-{file_var}"));
            assert_eq!(raw[var], format!("env-{var}"));
        }
    }

    #[test]
    fn a_url_flag_with_a_password_is_refused_in_one_line() {
        let env = |_: &str| None;
        for (argv, var) in [
            (
                ["--database-url", "postgres://u:hunter2@db/k"],
                config::DATABASE_URL,
            ),
            (
                ["--redis-url", "redis://:hunter2@localhost:6379"],
                config::REDIS_URL,
            ),
        ] {
            let errors = serve_args(&argv).raw_from(&env).unwrap_err();
            assert_eq!(errors.len(), 1);
            let line = errors[0].to_string();
            assert!(line.starts_with(var), "{line}");
            assert!(line.contains(&format!("{var}_FILE")), "{line}");
            assert!(!line.contains("hunter2"), "{line}");
        }
        // Without a password the flag is a flag, and it wins over the environment.
        let env = |_: &str| Some("redis://env:6379".to_string());
        let raw = serve_args(&["--redis-url", "redis://flag:6379"])
            .raw_from(&env)
            .unwrap();
        assert_eq!(raw[config::REDIS_URL], "redis://flag:6379");

        let migrate = MigrateArgs {
            database_url: Some("postgres://u:hunter2@db/k".into()),
        };
        assert_eq!(
            migrate.raw_from(&|_| None).unwrap_err()[0].var,
            config::DATABASE_URL
        );
    }
}
