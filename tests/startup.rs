//! Start-up safety in-process: a keyring that decrypts none of the stored secrets stops
//! start-up and, in a replica that started before they were stored, cannot rotate
//! anything away; and the embedded writer's health decides whether reports are acknowledged.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{error_code, Backend, TestServer};
use keyward::config;
use reqwest::Method;
use serde_json::json;

on_both_backends!(rotation_with_a_keyring_that_decrypts_nothing_is_refused_and_changes_nothing);

const RIGHT: &str = common::ENCRYPTION_KEY;
const WRONG: &str = "ZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=";

async fn rotation_with_a_keyring_that_decrypts_nothing_is_refused_and_changes_nothing(b: Backend) {
    let db = Arc::new(common::TestDb::new(b).await);
    let with_key = |key: &str| {
        let mut raw = common::base_config(&db);
        raw.insert(config::ENCRYPTION_KEY, key.to_string());
        raw
    };
    // A replica with the wrong key (a mistyped variable) that started before anything
    // was stored: start-up had nothing to try its key on.
    let wrong = TestServer::start_on(db.clone(), with_key(WRONG)).await;
    let first = TestServer::start_on(db.clone(), with_key(RIGHT)).await;
    let (client_key, secret) = first.create_key(json!({})).await;
    let added = first
        .admin(
            Method::POST,
            "/admin/providers/openai/keys",
            Some(json!({"label": "main", "value": "sk-upstream-secret"})),
        )
        .await;
    assert_eq!(added.status, 201, "{}", added.body);
    first.stop().await;

    // Its rotation would re-encrypt nothing it can read: refused.
    let r = wrong
        .admin(Method::POST, "/admin/encryption/rotate", None)
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(error_code(&r), "KEYRING_MISMATCH");
    wrong.stop().await;
    // A replica started with the wrong key now (a lost key file replaced, a mistyped
    // variable) stops at start-up, naming the variable.
    let refused = keyward::app::build(&config::Config::from_raw(&with_key(WRONG)).unwrap())
        .await
        .err()
        .expect("started with a key that decrypts none of the stored secrets")
        .to_string();
    assert!(
        refused.starts_with("KEYWARD_ENCRYPTION_KEY: decrypts none of the stored secrets"),
        "{refused}"
    );

    // With the right key again, every key is active and its secret readable.
    let right = TestServer::start_on(db.clone(), with_key(RIGHT)).await;
    let id = client_key["id"].as_str().unwrap();
    let key = right
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(key.body["is_active"], true, "{}", key.body);
    let revealed = right
        .admin(Method::POST, &format!("/admin/keys/{id}/reveal"), None)
        .await;
    assert_eq!(revealed.body["secret"].as_str(), Some(secret.as_str()));
    let pool = right
        .admin(Method::GET, "/admin/providers/openai/keys", None)
        .await;
    assert_eq!(pool.body["keys"][0]["is_active"], true, "{}", pool.body);
    let admitted = right.admit(json!({"key": secret})).await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    // And rotating with the right keyring still works.
    let r = right
        .admin(Method::POST, "/admin/encryption/rotate", None)
        .await;
    assert_eq!(r.body, json!({"reencrypted": 2, "failed": 0}));
    right.stop().await;
}
