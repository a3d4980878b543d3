//! The `keyward` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use keyward::cli::{Cli, Command};
use keyward::config::{self, Config, ConfigError, LogFormat};
use keyward::{app, telemetry};

/// mimalloc rather than the system allocator: a decision allocates a few dozen small,
/// short-lived buffers (HTTP, JSON, the Redis command), and glibc's malloc and free were
/// a quarter of keyward's CPU under load (measured with perf, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            let raw = match args.raw() {
                Ok(raw) => raw,
                Err(errors) => return config_errors(errors),
            };
            let config = match Config::from_raw(&raw) {
                Ok(config) => config,
                Err(errors) => return config_errors(errors),
            };
            telemetry::init(config.log_format);
            warn_ignored(&raw);
            // Built from the configuration: `KEYWARD_THREADS` picks its kind.
            let runtime = match config.runtime() {
                Ok(rt) => rt,
                Err(e) => return no_runtime(&e),
            };
            runtime.block_on(app::serve(config))
        }
        Command::Migrate(args) => {
            let url = match args
                .raw()
                .and_then(|raw| config::database_url_from_raw(&raw))
            {
                Ok(url) => url,
                Err(errors) => return config_errors(errors),
            };
            telemetry::init(LogFormat::Text);
            // One short job: one thread.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return no_runtime(&e),
            };
            runtime.block_on(async {
                let db = app::connect_db(&url).await?;
                db.migrate().await?;
                db.close().await;
                tracing::info!("migrations applied");
                Ok(())
            })
        }
        Command::Probe(args) => {
            let listen = match args.settings.raw().and_then(|raw| Config::from_raw(&raw)) {
                Ok(config) => config.listen,
                Err(errors) => return config_errors(errors),
            };
            return match keyward::probe::probe(keyward::probe::target(listen), &args.path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(why) => {
                    eprintln!("keyward: probe: {why}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyward: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Settings that would be ignored, each a warning naming its variable: variables named
/// like keyward's that are none of its settings (misspelt), and shards without Redis.
fn warn_ignored(raw: &config::RawConfig) {
    for variable in keyward::cli::unknown_variables(
        std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()),
    ) {
        tracing::warn!(variable, "not a keyward setting (misspelt?): ignored");
    }
    // The URL or its `_FILE` twin.
    let redis = raw.keys().any(|k| k.starts_with(config::REDIS_URL));
    if raw.contains_key(config::REDIS_SHARDS) && !redis {
        tracing::warn!(
            variable = config::REDIS_SHARDS,
            "only the Redis shape has shards ({} is unset): ignored",
            config::REDIS_URL
        );
    }
}

/// One line a bad setting, each naming its variable; exit code 2.
fn config_errors(errors: Vec<ConfigError>) -> ExitCode {
    for e in errors {
        eprintln!("keyward: {e}");
    }
    ExitCode::from(2)
}

fn no_runtime(e: &std::io::Error) -> ExitCode {
    eprintln!("keyward: cannot start the async runtime: {e}");
    ExitCode::FAILURE
}
