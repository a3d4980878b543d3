//! The Limitador yardstick: the `limitador` library (0.14, the code limitador-server
//! runs: its in-memory storage, and its Redis storage `AsyncRedisStorage` with its Lua
//! scripts) behind a minimal hyper HTTP/1.1 server, so `cargo bench --bench admit` can
//! measure Limitador beside keyward where no limitador-server binary can be had.
//!
//! It takes the command line the bench gives limitador-server:
//!
//! ```text
//! limitador-yardstick --http-ip IP --http-port P [--rls-ip IP --rls-port P] LIMITS.yaml memory
//! limitador-yardstick --http-ip IP --http-port P [--rls-ip IP --rls-port P] LIMITS.yaml redis URL
//! ```
//!
//! (no gRPC: the RLS address is accepted and ignored) and answers `POST
//! /check_and_report` as limitador-server does: a JSON body `{"namespace", "values",
//! "delta"}`, the values bound as `descriptors[0]`, `check_rate_limited_and_update`, 200
//! when admitted and 429 when limited (body `null` both), 500 on a storage error. Like
//! limitador-server, the in-memory mode calls the blocking `RateLimiter` on the request's
//! thread and the Redis mode the `AsyncRateLimiter`.
//!
//! Threads: one worker per core by default, as limitador-server's HTTP workers;
//! `LIMITADOR_THREADS=1` runs one thread (keyward's default shape) and `N` runs `N`.
//! `--version` prints the label the bench gives its rows.
//! The limits file is read by a minimal parser of the shape the bench writes (a list of
//! limits with `namespace`, `max_value`, `seconds`, optional `name`, and empty
//! `conditions` and `variables`): anything else is refused at start.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use limitador::limit::{Context, Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;
use limitador::{AsyncRateLimiter, RateLimiter};

/// limitador-server's in-memory counter cache size (it only bounds counters with
/// variables; the bench's one limit has none).
const CACHE_SIZE: u64 = 10_000;

/// The limiter of each storage mode, as limitador-server holds it.
enum Limiter {
    Blocking(RateLimiter),
    Async(AsyncRateLimiter),
}

/// `POST /check_and_report`'s body (limitador-server's `CheckAndReportInfo`).
#[derive(serde::Deserialize)]
struct CheckAndReport {
    namespace: String,
    values: HashMap<String, String>,
    delta: u64,
}

struct Args {
    http: String,
    limits: String,
    storage: String,
    redis_url: Option<String>,
}

fn usage(error: &str) -> ! {
    eprintln!("limitador-yardstick: {error}\nusage: limitador-yardstick --http-ip IP --http-port P [--rls-ip IP --rls-port P] LIMITS.yaml (memory | redis URL)");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let (mut ip, mut port, mut positional) = ("0.0.0.0".to_string(), "8080".to_string(), vec![]);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--http-ip" | "--http-port" | "--rls-ip" | "--rls-port" => {
                let value = args
                    .next()
                    .unwrap_or_else(|| usage(&format!("{arg} needs a value")));
                match arg.as_str() {
                    "--http-ip" => ip = value,
                    "--http-port" => port = value,
                    _ => {} // no gRPC server: the RLS address is not used
                }
            }
            flag if flag.starts_with("--") => usage(&format!("unknown option {flag}")),
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    let limits = positional.next().unwrap_or_else(|| usage("no limits file"));
    let storage = positional.next().unwrap_or_else(|| "memory".to_string());
    let redis_url = positional.next();
    match (storage.as_str(), &redis_url) {
        ("memory", None) | ("redis", Some(_)) => {}
        _ => usage("the storage is `memory` or `redis URL`"),
    }
    Args {
        http: format!("{ip}:{port}"),
        limits,
        storage,
        redis_url,
    }
}

/// The limits of `text`: a YAML list of the shape limitador-server's limits files have,
/// without conditions or variables (the only shape the bench writes).
fn parse_limits(text: &str) -> Result<Vec<Limit>, String> {
    let mut entries: Vec<HashMap<String, String>> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.trim() == "---" || line.trim_start().starts_with('#') {
            continue;
        }
        let field = match line.strip_prefix("- ") {
            Some(first) => {
                entries.push(HashMap::new());
                first
            }
            None => line.trim_start(),
        };
        let (key, value) = field
            .split_once(':')
            .ok_or_else(|| format!("not a `key: value` line: {line}"))?;
        let entry = entries
            .last_mut()
            .ok_or_else(|| format!("a field outside a list entry: {line}"))?;
        let value = value.trim().trim_matches('"').to_string();
        entry.insert(key.trim().to_string(), value);
    }
    entries
        .into_iter()
        .map(|e| {
            for empty in ["conditions", "variables"] {
                if e.get(empty).is_some_and(|v| v != "[]") {
                    return Err(format!("{empty} must be [] (this server parses no others)"));
                }
            }
            let number = |k: &str| -> Result<u64, String> {
                e.get(k)
                    .ok_or_else(|| format!("a limit without {k}"))?
                    .parse()
                    .map_err(|_| format!("{k} is not a whole number"))
            };
            let namespace = e.get("namespace").ok_or("a limit without namespace")?;
            let mut limit = Limit::new(
                namespace.as_str(),
                number("max_value")?,
                number("seconds")?,
                [],
                [],
            );
            if let Some(name) = e.get("name") {
                limit.set_name(name.clone());
            }
            Ok(limit)
        })
        .collect()
}

async fn build_limiter(args: &Args, limits: Vec<Limit>) -> Result<Limiter, String> {
    let limiter = match args.storage.as_str() {
        "memory" => {
            let limiter = RateLimiter::new(CACHE_SIZE);
            limiter.configure_with(limits).map_err(|e| e.to_string())?;
            Limiter::Blocking(limiter)
        }
        _ => {
            let url = args.redis_url.as_deref().unwrap_or_default();
            let storage = AsyncRedisStorage::new(url)
                .await
                .map_err(|e| format!("redis {url}: {e}"))?;
            let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
            limiter
                .configure_with(limits)
                .await
                .map_err(|e| e.to_string())?;
            Limiter::Async(limiter)
        }
    };
    Ok(limiter)
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    if !body.is_empty() {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    response
}

async fn handle(
    limiter: Arc<Limiter>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST || request.uri().path() != "/check_and_report" {
        return Ok(reply(StatusCode::NOT_FOUND, ""));
    }
    let Ok(body) = request.into_body().collect().await else {
        return Ok(reply(StatusCode::BAD_REQUEST, ""));
    };
    let Ok(info) = serde_json::from_slice::<CheckAndReport>(&body.to_bytes()) else {
        return Ok(reply(StatusCode::BAD_REQUEST, ""));
    };
    let namespace = Namespace::from(info.namespace);
    let mut ctx = Context::default();
    ctx.list_binding("descriptors".to_string(), vec![info.values]);
    let result = match &*limiter {
        Limiter::Blocking(l) => l.check_rate_limited_and_update(&namespace, &ctx, info.delta),
        Limiter::Async(l) => {
            l.check_rate_limited_and_update(&namespace, &ctx, info.delta)
                .await
        }
    };
    Ok(match result {
        Ok(r) if r.limited => reply(StatusCode::TOO_MANY_REQUESTS, "null"),
        Ok(_) => reply(StatusCode::OK, "null"),
        Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, ""),
    })
}

async fn serve(args: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.limits)
        .map_err(|e| format!("limits file {}: {e}", args.limits))?;
    let limits = parse_limits(&text)?;
    let limiter = Arc::new(build_limiter(&args, limits).await?);
    let listener = tokio::net::TcpListener::bind(&args.http)
        .await
        .map_err(|e| format!("bind {}: {e}", args.http))?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let limiter = limiter.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |r| handle(limiter.clone(), r));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// What `--version` prints: the label the bench gives this server's rows.
const VERSION: &str = "Limitador (library 0.14, minimal HTTP server)";

fn main() {
    if std::env::args().any(|a| a == "--version") {
        println!("{VERSION}");
        return;
    }
    let args = parse_args();
    let threads: usize = std::env::var("LIMITADOR_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                builder.worker_threads(n);
            }
            builder
        }
    };
    let runtime = builder.enable_all().build().expect("a tokio runtime");
    if let Err(error) = runtime.block_on(serve(args)) {
        eprintln!("limitador-yardstick: {error}");
        std::process::exit(1);
    }
}
