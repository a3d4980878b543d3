//! The OpenAPI 3.0 documents of the two listeners, served at `/openapi.json` on each.
//!
//! Invariant: the documents, the route tables [`DATA_ROUTES`] / [`ADMIN_ROUTES`] and the
//! routers agree. `tests/openapi.rs` checks that each document's operations are its
//! table, that the table's paths are the `.route(…)` calls of the router's source (both
//! directions), and that every operation answers on a live server. Every error answer
//! is the `Error` schema (the `default` response).
//!
//! Longer than 400 lines: one document is one value built in one place; the quota
//! parts (limit sets, users, quota views) live in `openapi/quotas.rs`.

use serde_json::{json, Value};

mod quotas;

/// `(method, path)` of every data-plane operation.
pub const DATA_ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/admit"),
    ("post", "/v1/select"),
    ("post", "/v1/report"),
    ("post", "/v1/report/upstream"),
    ("post", "/v1/leases/{lease_id}/renew"),
    ("get", "/authz/{path}"),
    ("post", "/authz/{path}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// `(method, path)` of every admin operation.
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("post", "/admin/keys"),
    ("get", "/admin/keys"),
    ("get", "/admin/keys/standalone"),
    ("post", "/admin/keys/expire"),
    ("get", "/admin/keys/{id}"),
    ("patch", "/admin/keys/{id}"),
    ("delete", "/admin/keys/{id}"),
    ("post", "/admin/keys/{id}/reveal"),
    ("post", "/admin/keys/{id}/balance"),
    ("get", "/admin/keys/{id}/stats"),
    ("get", "/admin/keys/{id}/quota"),
    ("get", "/admin/users"),
    ("put", "/admin/users/{user_id}"),
    ("patch", "/admin/users/{user_id}"),
    ("get", "/admin/users/{user_id}"),
    ("delete", "/admin/users/{user_id}"),
    ("get", "/admin/users/{user_id}/quota"),
    ("post", "/admin/providers/{provider}/keys"),
    ("get", "/admin/providers/{provider}/keys"),
    ("patch", "/admin/provider-keys/{id}"),
    ("delete", "/admin/provider-keys/{id}"),
    ("get", "/admin/provider-keys/{id}/usage"),
    ("post", "/admin/provider-keys/{id}/reset"),
    ("get", "/admin/prices"),
    ("put", "/admin/prices/{provider}/{model}"),
    ("delete", "/admin/prices/{provider}/{model}"),
    ("post", "/admin/encryption/rotate"),
    ("get", "/admin/accounting/dead-letters"),
    ("post", "/admin/accounting/dead-letters/{id}/replay"),
    ("get", "/admin/alerts"),
    ("get", "/openapi.json"),
];

fn s(t: &str) -> Value {
    json!({"type": t})
}

fn nullable(t: &str) -> Value {
    json!({"type": t, "nullable": true})
}

fn strings() -> Value {
    json!({"type": "array", "items": {"type": "string"}, "nullable": true})
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn body(schema: Value) -> Value {
    json!({"required": false, "content": {"application/json": {"schema": schema}}})
}

/// An operation: its summary, an optional JSON body, and its success answer.
fn op(
    summary: &str,
    request: Option<Value>,
    status: &str,
    answer: Value,
    params: Vec<Value>,
) -> Value {
    let mut o = json!({
        "summary": summary,
        "responses": {
            status: {"description": "success", "content": {"application/json": {"schema": answer}}},
            "default": {"description": "the contract's error body", "content": {"application/json": {"schema": reference("Error")}}},
        },
    });
    if let Some(request) = request {
        o["requestBody"] = body(request);
    }
    if !params.is_empty() {
        o["parameters"] = json!(params);
    }
    o
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

fn query(name: &str, schema: Value) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema})
}

fn object(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

/// A success answer: these fields always present, more may be added later.
fn answer(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required})
}

fn integer() -> Value {
    s("integer")
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": s("string"),
                "message": s("string"),
                "retry_after_ms": s("integer"),
                "limit": s("string"),
                // A quota's refusal (see `http::error::QuotaFields`).
                "scope": s("string"),
                "model": s("string"),
                "period": s("string"),
                "reset_at": s("string"),
            },
        }},
    })
}

fn document(title: &str, paths: Value, schemas: Value, secured: bool) -> Value {
    let mut schemas = schemas;
    schemas["Error"] = error_schema();
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {"title": title, "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {"schemas": schemas},
    });
    if secured {
        doc["components"]["securitySchemes"] =
            json!({"admin": {"type": "http", "scheme": "bearer"}});
        doc["security"] = json!([{"admin": []}]);
    }
    doc
}

/// The data plane's document.
pub fn data_plane() -> Value {
    let window = || {
        json!({"type": "object", "nullable": true, "required": ["limit", "remaining", "reset_ms"], "properties": {
            "limit": integer(), "remaining": integer(), "reset_ms": integer(),
        }})
    };
    let limits = answer(
        json!({
            "requests": window(), "tokens": window(),
            "concurrency": {"type": "object", "nullable": true, "required": ["limit", "in_flight"],
                "properties": {"limit": integer(), "in_flight": integer()}},
        }),
        &["requests", "tokens", "concurrency"],
    );
    let picked_key = answer(
        json!({"id": s("string"), "provider": s("string"), "value": s("string")}),
        &["id", "provider", "value"],
    );
    let admit = object(
        json!({
            "key": nullable("string"), "provider": nullable("string"), "model": nullable("string"),
            "api_format": nullable("string"), "estimated_tokens": {"type": "integer", "nullable": true},
            "select": s("boolean"),
        }),
        &[],
    );
    let mut nullable_key = picked_key.clone();
    nullable_key["nullable"] = json!(true);
    let admitted = json!({"type": "object", "required": ["allowed", "lease_id", "lease_expires_at", "key_id", "limits"], "properties": {
        "allowed": s("boolean"), "lease_id": s("string"), "lease_expires_at": s("string"), "key_id": s("string"),
        "provider_key": nullable_key, "limits": limits,
        "remaining_balance_usd": nullable("number"),
    }});
    let select = object(
        json!({"provider": nullable("string"), "estimated_tokens": {"type": "integer", "nullable": true}}),
        &[],
    );
    let report = object(
        json!({
            "lease_id": nullable("string"), "report_id": nullable("string"), "provider_key_id": nullable("string"), "model": nullable("string"),
            "prompt_tokens": {"type": "integer", "nullable": true}, "completion_tokens": {"type": "integer", "nullable": true},
            "cached_tokens": {"type": "integer", "nullable": true}, "cache_write_tokens": {"type": "integer", "nullable": true},
            "reasoning_tokens": {"type": "integer", "nullable": true},
            "cost_usd": nullable("number"), "latency_ms": {"type": "integer", "nullable": true},
            "upstream_status": {"type": "integer", "nullable": true}, "retry_after_s": {"type": "integer", "nullable": true},
        }),
        &[],
    );
    let any = json!({});
    let ready = answer(
        json!({"status": {"type": "string", "enum": ["ready", "not_ready"]}, "checks": s("object")}),
        &["status", "checks"],
    );
    let mut readyz = op(
        "Ready: database and Redis answer",
        None,
        "200",
        ready.clone(),
        vec![],
    );
    readyz["responses"]["503"] = json!({"description": "not ready, with each check", "content": {"application/json": {"schema": ready}}});
    let authz = op(
        "The proxy check (Envoy ext_authz, nginx auth_request)",
        None,
        "200",
        any.clone(),
        vec![path_param("path")],
    );
    // Select needs the data-plane token; a report needs it only without a lease.
    let mut select = op(
        "Pick a provider key (data-plane token)",
        Some(select),
        "200",
        answer(json!({"provider_key": picked_key}), &["provider_key"]),
        vec![],
    );
    select["security"] = json!([{"data": []}]);
    let mut report = op(
        "What did the request cost? (its lease, or the data-plane token)",
        Some(report),
        "200",
        answer(
            json!({"recorded": s("boolean"), "duplicate": s("boolean")}),
            &["recorded"],
        ),
        vec![],
    );
    report["security"] = json!([{}, {"data": []}]);
    // The proxies' report: the lease in a header, the upstream's answer in the body
    // (module `reporting::upstream` documents the format).
    let upstream = object(
        json!({
            "status": {"type": "integer", "minimum": 100, "maximum": 599},
            "api_format": nullable("string"), "path": nullable("string"),
            "headers": {"type": "object", "additionalProperties": s("string"), "maxProperties": 64},
            "head": {"type": "string", "format": "byte", "maxLength": 87384},
            "tail": {"type": "string", "format": "byte", "maxLength": 87384},
            "complete": s("boolean"), "latency_ms": {"type": "integer", "nullable": true},
        }),
        &["status"],
    );
    let mut report_upstream = op(
        "The proxies' report: the upstream's status, headers and an excerpt of its answer, whose usage keyward reads",
        Some(upstream),
        "200",
        answer(
            json!({"recorded": s("boolean"), "duplicate": s("boolean")}),
            &["recorded"],
        ),
        vec![json!({"name": "x-keyward-lease", "in": "header", "required": true, "schema": {"type": "string"}})],
    );
    report_upstream["security"] = json!([{}]);
    let mut doc = document(
        "keyward data plane",
        json!({
            "/v1/admit": {"post": op("May this key make this request now?", Some(admit), "200", admitted, vec![])},
            "/v1/select": {"post": select},
            "/v1/report": {"post": report},
            "/v1/report/upstream": {"post": report_upstream},
            "/v1/leases/{lease_id}/renew": {"post": op("Extend a live lease", None, "200",
                answer(json!({"lease_id": s("string"), "lease_expires_at": s("string")}), &["lease_id", "lease_expires_at"]),
                vec![path_param("lease_id")])},
            "/authz/{path}": {"get": authz.clone(), "post": authz},
            "/healthz": {"get": op("Alive", None, "200", answer(json!({"status": s("string")}), &["status"]), vec![])},
            "/readyz": {"get": readyz},
            "/metrics": {"get": {"summary": "Prometheus text", "responses": {"200": {"description": "metrics", "content": {"text/plain": {"schema": s("string")}}}}}},
            "/openapi.json": {"get": op("This document", None, "200", json!({"type": "object"}), vec![])},
        }),
        json!({}),
        false,
    );
    doc["components"]["securitySchemes"] =
        json!({"data": {"type": "http", "scheme": "bearer", "description": "KEYWARD_DATA_TOKEN"}});
    doc
}

/// The admin API's document.
pub fn admin() -> Value {
    let id = || vec![path_param("id")];
    let limit = || json!({"type": "integer", "nullable": true});
    let create = object(
        json!({
            "user_id": nullable("string"), "name": nullable("string"),
            "allowed_providers": strings(), "allowed_api_formats": strings(), "allowed_models": strings(),
            "rate_limit": limit(), "tpm_limit": limit(), "concurrent_limit": limit(),
            "expire_days": limit(), "expires_at": nullable("string"), "is_standalone": {"type": "boolean", "nullable": true},
            "initial_balance_usd": nullable("number"), "auto_delete_on_expiry": {"type": "boolean", "nullable": true},
        }),
        &[],
    );
    let with_quotas = |mut schema: Value| {
        for (name, field) in quotas::key_fields().as_object().into_iter().flatten() {
            schema["properties"][name] = field.clone();
        }
        schema
    };
    let create = with_quotas(create);
    let patch = object(
        json!({
            "name": nullable("string"), "allowed_providers": strings(), "allowed_api_formats": strings(),
            "allowed_models": strings(), "rate_limit": limit(), "tpm_limit": limit(), "concurrent_limit": limit(),
            "is_active": {"type": "boolean", "nullable": true}, "expires_at": nullable("string"),
            "auto_delete_on_expiry": {"type": "boolean", "nullable": true},
        }),
        &[],
    );
    let patch = with_quotas(patch);
    let key = json!({"type": "object", "required": ["id", "is_active", "is_standalone"], "properties": {
        "id": s("string"), "user_id": nullable("string"), "name": s("string"), "prefix": s("string"),
        "rate_limit": limit(), "tpm_limit": limit(), "concurrent_limit": limit(), "is_active": s("boolean"),
        "is_standalone": s("boolean"), "balance_usd": nullable("number"), "remaining_balance_usd": nullable("number"),
    }});
    let key = with_quotas(key);
    let keys = json!({"type": "object", "required": ["keys"], "properties": {"keys": {"type": "array", "items": reference("Key")}}});
    let cause = json!({"type": "object", "nullable": true, "required": ["upstream_status", "at", "source", "from_headers"], "properties": {
        "upstream_status": nullable("integer"), "at": s("string"), "source": s("string"),
        "from_headers": s("boolean"),
    }});
    let learned = json!({"type": "object", "nullable": true, "required": ["learned_at"], "properties": {
        "remaining_requests": nullable("integer"), "remaining_tokens": nullable("integer"),
        "requests_reset_at": nullable("string"), "tokens_reset_at": nullable("string"), "learned_at": s("string"),
    }});
    let live = json!({"type": "object", "properties": {
        "requests_last_60s": s("integer"), "tokens_last_60s": s("integer"), "cooldown_remaining_ms": s("integer"),
        "suspended": s("boolean"), "suspended_remaining_ms": s("integer"),
        "cooldown_cause": cause.clone(), "suspension_cause": cause, "learned": learned,
    }});
    let provider_key = json!({"type": "object", "required": ["id", "provider", "label", "priority"], "properties": {
        "id": s("string"), "provider": s("string"), "label": s("string"), "priority": s("integer"),
        "max_rpm": limit(), "max_tpm": limit(), "is_active": s("boolean"), "live": live,
    }});
    let add_provider = object(
        json!({"label": s("string"), "value": s("string"), "priority": limit(), "max_rpm": limit(), "max_tpm": limit()}),
        &["label", "value"],
    );
    let patch_provider = object(
        json!({"label": nullable("string"), "priority": limit(), "max_rpm": limit(), "max_tpm": limit(), "is_active": {"type": "boolean", "nullable": true}}),
        &[],
    );
    let obj = || json!({"type": "object"});
    let created = answer(
        json!({"key": reference("Key"), "secret": s("string")}),
        &["key", "secret"],
    );
    let expired = answer(
        json!({"processed": integer(), "deleted": integer(), "disabled": integer()}),
        &["processed", "deleted", "disabled"],
    );
    let day = answer(
        json!({"date": s("string"), "requests": integer(), "tokens": integer(), "cost_usd": s("number"),
               "cached_tokens": integer(), "cache_write_tokens": integer(), "reasoning_tokens": integer(),
               "estimated_requests": integer()}),
        &[
            "date",
            "requests",
            "tokens",
            "cost_usd",
            "cached_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "estimated_requests",
        ],
    );
    let stats = answer(
        json!({
            "key_id": s("string"), "key_name": nullable("string"), "start": nullable("string"), "end": nullable("string"),
            "total_requests": integer(), "total_tokens": integer(), "total_cost_usd": s("number"),
            "total_cached_tokens": integer(), "total_cache_write_tokens": integer(),
            "total_reasoning_tokens": integer(), "estimated_requests": integer(),
            "avg_response_time_ms": s("number"), "daily_stats": {"type": "array", "items": day},
        }),
        &[
            "key_id",
            "total_requests",
            "total_tokens",
            "total_cost_usd",
            "total_cached_tokens",
            "total_cache_write_tokens",
            "total_reasoning_tokens",
            "estimated_requests",
            "avg_response_time_ms",
            "daily_stats",
        ],
    );
    let pool = answer(
        json!({"provider": s("string"), "keys": {"type": "array", "items": reference("ProviderKey")}}),
        &["provider", "keys"],
    );
    let minute = answer(
        json!({"minute": s("string"), "requests": integer(), "tokens": integer()}),
        &["minute", "requests", "tokens"],
    );
    let usage = answer(
        json!({"provider_key_id": s("string"), "windows": {"type": "array", "items": minute}}),
        &["provider_key_id", "windows"],
    );
    let price_input = object(
        json!({
            "input_per_mtok_usd": s("number"), "output_per_mtok_usd": s("number"),
            "cached_input_per_mtok_usd": nullable("number"), "cache_write_per_mtok_usd": nullable("number"),
        }),
        &["input_per_mtok_usd", "output_per_mtok_usd"],
    );
    let price = answer(
        json!({
            "provider": s("string"), "model": s("string"),
            "input_per_mtok_usd": s("number"), "output_per_mtok_usd": s("number"),
            "cached_input_per_mtok_usd": s("number"), "cache_write_per_mtok_usd": s("number"),
            "created_at": s("string"), "updated_at": s("string"),
        }),
        &[
            "provider",
            "model",
            "input_per_mtok_usd",
            "output_per_mtok_usd",
            "cached_input_per_mtok_usd",
            "cache_write_per_mtok_usd",
            "created_at",
            "updated_at",
        ],
    );
    let price_list = answer(
        json!({"prices": {"type": "array", "items": reference("Price")}}),
        &["prices"],
    );
    let price_deleted = answer(
        json!({"provider": s("string"), "model": s("string"), "deleted": s("boolean")}),
        &["provider", "model", "deleted"],
    );
    // The model is the rest of the path and may hold `/` (sent as `%2F` or as is).
    let price_params = || vec![path_param("provider"), path_param("model")];
    let rotated = answer(
        json!({"reencrypted": integer(), "failed": integer()}),
        &["reencrypted", "failed"],
    );
    let dead_letter = answer(
        json!({
            "id": integer(), "record_id": s("string"), "record": obj(), "error": s("string"),
            "attempts": integer(), "first_seen_at": s("string"), "last_seen_at": s("string"),
        }),
        &[
            "id",
            "record_id",
            "record",
            "error",
            "attempts",
            "first_seen_at",
            "last_seen_at",
        ],
    );
    let dead_letters = answer(
        json!({"dead_letters": {"type": "array", "items": dead_letter}, "total": integer()}),
        &["dead_letters", "total"],
    );
    let alert = answer(
        json!({
            "id": s("string"), "payload": obj(), "created_at": s("string"), "pending": s("boolean"),
            "attempts": integer(), "delivered_at": nullable("string"),
            "next_attempt_at": nullable("string"), "last_error": nullable("string"),
        }),
        &[
            "id",
            "payload",
            "created_at",
            "pending",
            "attempts",
            "delivered_at",
            "next_attempt_at",
            "last_error",
        ],
    );
    let alerts = answer(
        json!({"alerts": {"type": "array", "items": alert}, "next_cursor": nullable("string")}),
        &["alerts", "next_cursor"],
    );
    let replayed = answer(
        json!({"id": integer(), "replayed": s("boolean"), "applied": s("boolean")}),
        &["id", "replayed", "applied"],
    );
    let mut paths = json!({
            "/admin/keys": {
                "post": op("Create a client key (the secret is shown once)", Some(create), "201", created, vec![]),
                "get": op("A user's keys, newest first", None, "200", keys.clone(),
                    vec![query("user_id", s("string")), query("active", json!({"type": "string", "enum": ["true", "false"]}))]),
            },
            "/admin/keys/standalone": {"get": op("Standalone keys, newest first", None, "200", keys,
                vec![query("active", json!({"type": "string", "enum": ["true", "false"]}))])},
            "/admin/keys/expire": {"post": op("Disable or delete expired keys", Some(object(json!({"auto_delete": {"type": "boolean", "nullable": true}}), &[])), "200", expired, vec![])},
            "/admin/keys/{id}": {
                "get": op("One key", None, "200", reference("Key"), id()),
                "patch": op("Change updatable fields", Some(patch), "200", reference("Key"), id()),
                "delete": op("Disable a key", None, "200", reference("Key"), id()),
            },
            "/admin/keys/{id}/reveal": {"post": op("Show the secret (logged)", None, "200", answer(json!({"secret": s("string")}), &["secret"]), id())},
            "/admin/keys/{id}/balance": {"post": op("Credit or deduct a standalone key's balance",
                Some(object(json!({"amount_usd": s("number")}), &["amount_usd"])), "200", reference("Key"), id())},
            "/admin/keys/{id}/stats": {"get": op("Usage totals and days", None, "200", stats,
                [id(), vec![query("start", s("string")), query("end", s("string"))]].concat())},
            "/admin/providers/{provider}/keys": {
                "post": op("Add a provider key (its value is never returned)", Some(add_provider), "201", reference("ProviderKey"), vec![path_param("provider")]),
                "get": op("A provider's keys by priority, with live state", None, "200", pool, vec![path_param("provider")]),
            },
            "/admin/provider-keys/{id}": {
                "patch": op("Change a provider key", Some(patch_provider), "200", reference("ProviderKey"), id()),
                "delete": op("Remove a provider key", None, "200",
                    answer(json!({"id": s("string"), "deleted": s("boolean")}), &["id", "deleted"]), id()),
            },
            "/admin/provider-keys/{id}/usage": {"get": op("Reported usage per minute, newest first", None, "200", usage,
                [id(), vec![query("limit", s("integer"))]].concat())},
            "/admin/provider-keys/{id}/reset": {"post": op("End a provider key's cooldown and suspension now", None, "200", reference("ProviderKey"), id())},
            "/admin/prices": {"get": op("Every model price, by provider then model", None, "200", price_list, vec![])},
            "/admin/prices/{provider}/{model}": {
                "put": op("Set a model's price (USD per million tokens; cached input and cache writes default to the input price)",
                    Some(price_input), "200", reference("Price"), price_params()),
                "delete": op("Remove a model's price (404 when it has none)", None, "200", price_deleted, price_params()),
            },
            "/admin/encryption/rotate": {"post": op("Re-encrypt every secret with the current key (409 KEYRING_MISMATCH, nothing changed, when it decrypts none)", None, "200", rotated, vec![])},
            "/admin/alerts": {"get": op("Spend alerts (webhook payload and delivery state), newest first", None, "200", alerts,
                vec![query("pending", json!({"type": "string", "enum": ["true", "false"]})), query("limit", s("integer")), query("cursor", s("string"))])},
            "/admin/accounting/dead-letters": {"get": op("Usage records the database refused, newest first", None, "200", dead_letters,
                vec![query("limit", s("integer"))])},
            "/admin/accounting/dead-letters/{id}/replay": {"post": op(
                "Apply a dead letter again (idempotent); removed on success, 409 REPLAY_REFUSED when refused again",
                None, "200", replayed,
                vec![json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}})])},
            "/openapi.json": {"get": op("This document", None, "200", obj(), vec![])},
    });
    for (path, item) in quotas::paths().as_object().into_iter().flatten() {
        paths[path] = item.clone();
    }
    document(
        "keyward admin API",
        paths,
        json!({"Key": key, "ProviderKey": provider_key, "Price": price, "User": quotas::user()}),
        true,
    )
}
