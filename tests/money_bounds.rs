//! Money that cannot wrap, through the real server: a report's cost has an upper bound
//! (and a refused report leaves its lease reportable), a total seeded near the top of
//! its column is never wrapped nor turned into a REAL (the record that would pass it is
//! set aside as a dead letter), and a top-up past the sane maximum is refused.
#![allow(clippy::unwrap_used)]

mod common;

use common::{error_code, eventually, Cluster, Shape, TestServer};
use reqwest::Method;
use serde_json::json;
use sqlx::{AnyPool, Executor, Row};

async fn lease(s: &TestServer, secret: &str) -> String {
    let a = s.admit(json!({"key": secret})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["lease_id"].as_str().unwrap().to_string()
}

async fn sql(url: &str, statement: &str) {
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(url).await.unwrap();
    pool.execute(statement).await.unwrap();
    pool.close().await;
}

async fn money_never_wraps(shape: Shape) {
    let c = Cluster::start_n(shape, 1, |_| {}).await;
    let s = &c.servers[0];

    // At most 1,000,000 USD per report; the refusal sets nothing, so the same lease is
    // then recorded (not answered "duplicate").
    let (_, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    let l = lease(s, &secret).await;
    for (cost, tokens) in [
        (json!(1000000.000001), 1),
        (json!(1), 1_000_000_000_001_i64),
    ] {
        let refused = s
            .data_post(
                "/v1/report",
                json!({"lease_id": l, "cost_usd": cost, "prompt_tokens": tokens}),
            )
            .await;
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert_eq!(error_code(&refused), "BAD_REQUEST");
    }
    let ok = s
        .data_post("/v1/report", json!({"lease_id": l, "cost_usd": 1000000}))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["recorded"], true, "{}", ok.body);

    // A key whose totals sit near the top of BIGINT: the record that would pass them is
    // set aside, the totals are untouched, and the key still reads (SQLite once turned
    // the sum into a REAL, and every read of the key failed).
    let (key, secret) = s.create_key(json!({"concurrent_limit": null})).await;
    let id = key["id"].as_str().unwrap().to_string();
    let near = i64::MAX - 5;
    sql(
        &c.db.url,
        &format!(
            "UPDATE client_keys SET total_cost_micros = {near}, balance_used_micros = {near}, \
             total_tokens = {near} WHERE id = '{id}'"
        ),
    )
    .await;
    let l = lease(s, &secret).await;
    let r = s
        .data_post(
            "/v1/report",
            json!({"lease_id": l, "cost_usd": 0.00001, "prompt_tokens": 10}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let letter = eventually(30, || async {
        let list = s
            .admin(Method::GET, "/admin/accounting/dead-letters", None)
            .await;
        list.body["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["record_id"] == json!(common::lease_record_id(&l)))
            .cloned()
    })
    .await;
    assert!(
        letter["error"].as_str().unwrap().contains("would pass"),
        "{letter}"
    );
    let k = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(k.status, 200, "{}", k.body);
    assert_eq!(k.body["total_tokens"], json!(near));
    assert_eq!(k.body["total_requests"], 0);
    // Still the exact integer that was there (a REAL would not decode as one).
    let pool = AnyPool::connect(&c.db.url).await.unwrap();
    let row = sqlx::query("SELECT total_cost_micros, total_tokens FROM client_keys WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(row.try_get::<i64, _>("total_cost_micros").unwrap(), near);
    assert_eq!(row.try_get::<i64, _>("total_tokens").unwrap(), near);
    pool.close().await;

    // A top-up that would take the credited total past the maximum: 422, nothing changed.
    let (key, _) = s
        .create_key(json!({"is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = key["id"].as_str().unwrap().to_string();
    sql(
        &c.db.url,
        &format!(
            "UPDATE client_keys SET balance_micros = {}, balance_used_micros = {} WHERE id = '{id}'",
            i64::MAX - 1_000_000,
            i64::MAX - 2_000_000
        ),
    )
    .await;
    let topped = s
        .admin(
            Method::POST,
            &format!("/admin/keys/{id}/balance"),
            Some(json!({"amount_usd": 2})),
        )
        .await;
    assert_eq!(topped.status, 422, "{}", topped.body);
    assert_eq!(error_code(&topped), "BALANCE_REFUSED");
    let k = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(k.status, 200, "{}", k.body);
    assert_eq!(k.body["remaining_balance_usd"], json!(1));
    c.stop().await;
}

on_both_shapes!(
    money_never_wraps,
    a_full_provider_key_total_sets_no_tenant_aside
);

/// A provider key serves every tenant: once its totals are full (lying reports of one
/// tenant could fill them), they stop there, and every tenant's usage is still applied.
async fn a_full_provider_key_total_sets_no_tenant_aside(shape: Shape) {
    let c = Cluster::start_n(shape, 1, |_| {}).await;
    let s = &c.servers[0];
    let provider = format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pk = s
        .add_provider_key(
            &provider,
            json!({"label": "shared", "value": "sk-shared-00000"}),
        )
        .await;
    let pk_id = pk["id"].as_str().unwrap().to_string();
    let near = keyward::money::MAX_TOTAL - 5;
    sql(
        &c.db.url,
        &format!("UPDATE provider_keys SET total_tokens = {near} WHERE id = '{pk_id}'"),
    )
    .await;
    let (key, secret) = s.create_key(json!({})).await;
    let id = key["id"].as_str().unwrap().to_string();
    let a = s
        .admit(json!({"key": secret, "provider": provider, "select": true}))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let lease = a.body["lease_id"].as_str().unwrap();
    let r = s
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "prompt_tokens": 100, "cost_usd": 0.5}),
        )
        .await;
    assert_eq!(r.body["recorded"], true, "{}", r.body);
    let cost = eventually(30, || async {
        let k = s
            .admin(Method::GET, &format!("/admin/keys/{id}"), None)
            .await;
        (k.body["total_cost_usd"] != 0).then(|| k.body["total_cost_usd"].clone())
    })
    .await;
    assert_eq!(cost, json!(0.5), "the tenant's usage was applied");
    let letters = s
        .admin(Method::GET, "/admin/accounting/dead-letters", None)
        .await;
    assert_eq!(letters.body["total"], 0, "{}", letters.body);
    let pool = AnyPool::connect(&c.db.url).await.unwrap();
    let row = sqlx::query("SELECT total_tokens FROM provider_keys WHERE id = $1")
        .bind(&pk_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        row.try_get::<i64, _>("total_tokens").unwrap(),
        keyward::money::MAX_TOTAL,
        "the provider key's total stops at the maximum"
    );
    pool.close().await;
    c.stop().await;
}
