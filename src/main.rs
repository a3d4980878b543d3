//! The `keyward` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use keyward::cli::{Cli, Command};
use keyward::config::{self, Config, LogFormat};
use keyward::{app, db, telemetry};

/// mimalloc rather than the system allocator: a decision allocates a few dozen small,
/// short-lived buffers (HTTP, JSON, the Redis command), and glibc's malloc and free were
/// a quarter of keyward's CPU under load (measured with perf, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyward: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => {
            let config = match Config::from_raw(&args.raw()) {
                Ok(config) => config,
                Err(errors) => {
                    for e in errors {
                        eprintln!("keyward: {e}");
                    }
                    return ExitCode::from(2);
                }
            };
            telemetry::init(config.log_format);
            runtime.block_on(app::serve(config))
        }
        Command::Migrate(args) => {
            let url = args
                .database_url
                .unwrap_or_else(|| config::DEFAULT_DATABASE_URL.into());
            if db::Backend::of_url(&url).is_none() {
                eprintln!(
                    "keyward: {}: must start with postgres://, postgresql:// or sqlite:",
                    config::DATABASE_URL
                );
                return ExitCode::from(2);
            }
            telemetry::init(LogFormat::Text);
            runtime.block_on(async {
                let db = db::Db::connect(&url).await?;
                db.migrate().await?;
                db.close().await;
                tracing::info!("migrations applied");
                Ok(())
            })
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
