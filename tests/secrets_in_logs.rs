//! Guarantee 7: no secret reaches a log line, at any level. This binary installs a global
//! subscriber at TRACE (every crate, sqlx and hyper included) that keeps every line, runs
//! the whole admin surface on both backends, and searches the lines for each secret.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Backend, TestServer, ENCRYPTION_KEY, TOKEN};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_any_log_line() {
    let captured = common::captured_logs("trace");

    let mut secrets = vec![TOKEN.to_string(), ENCRYPTION_KEY.to_string()];
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = TestServer::start_with(backend, |raw| {
            raw.insert(keyward::config::DEFAULT_PRICE, common::DEFAULT_PRICE.into());
        })
        .await;
        let (key, secret) = s
            .create_key(json!({"user_id": "u", "is_standalone": true, "initial_balance_usd": 3}))
            .await;
        let id = key["id"].as_str().unwrap();
        let path = format!("/admin/keys/{id}");
        s.admin(Method::GET, &path, None).await;
        s.admin(Method::GET, "/admin/keys?user_id=u", None).await;
        s.admin(Method::GET, "/admin/keys/standalone", None).await;
        s.admin(Method::PATCH, &path, Some(json!({"name": "renamed"})))
            .await;
        let revealed = s.admin(Method::POST, &format!("{path}/reveal"), None).await;
        assert_eq!(revealed.body["secret"], json!(secret));
        s.admin(
            Method::POST,
            &format!("{path}/balance"),
            Some(json!({"amount_usd": 1})),
        )
        .await;
        s.admin(
            Method::POST,
            &format!("{path}/balance"),
            Some(json!({"amount_usd": -100})),
        )
        .await;
        s.admin(Method::GET, &format!("{path}/stats"), None).await;
        s.admin(Method::POST, "/admin/keys/expire", None).await;
        // The data plane and the provider pool, whose values travel in answers.
        let provider_value = format!("sk-provider-{}", uuid::Uuid::new_v4().simple());
        s.admin(
            Method::POST,
            "/admin/providers/openai/keys",
            Some(json!({"label": "p", "value": provider_value})),
        )
        .await;
        s.data_post_token("/v1/select", json!({"provider": "openai"}))
            .await;
        let admitted = s
            .admit(json!({"key": secret, "provider": "openai", "select": true}))
            .await;
        assert_eq!(
            admitted.body["provider_key"]["value"],
            json!(provider_value)
        );
        let lease = admitted.body["lease_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        s.data_post(
            "/v1/report",
            // Not 401: that would suspend the lease's (only) key, and authz below picks it.
            json!({"lease_id": lease, "upstream_status": 200}),
        )
        .await;
        let authz = s
            .client
            .post(format!("{}/authz/v1/chat/completions", s.data))
            .bearer_auth(&secret)
            .header("x-keyward-select", "true")
            .body(r#"{"model": "gpt-4o"}"#)
            .send()
            .await
            .unwrap();
        assert!(authz.headers().contains_key("x-keyward-lease"));
        s.admin(Method::GET, "/admin/providers/openai/keys", None)
            .await;
        s.admin(Method::POST, "/admin/encryption/rotate", None)
            .await;
        secrets.push(provider_value);
        s.admin(Method::DELETE, &path, None).await;
        // A caller who pastes a client key where the admin token goes.
        s.admin_raw(Method::GET, "/admin/keys", None::<String>, Some(&secret))
            .await;
        s.stop().await;
        secrets.push(secret);
    }

    let text = captured.text();
    assert!(
        text.contains("client key created"),
        "the capture saw nothing"
    );
    assert!(
        text.contains("client_key_revealed"),
        "the reveal event is logged"
    );
    assert!(
        text.lines().count() > 50,
        "TRACE capture is too thin to prove anything"
    );
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "a secret reached the logs");
        // Nor a recognisable part of it (the display prefix is public by design).
        assert!(
            !text.contains(&secret[secret.len() - 20..]),
            "part of a secret reached the logs"
        );
    }
}
