//! One record the database refuses never stops accounting: it is set aside as a dead
//! letter (listed by the admin API, counted in `/metrics`, re-playable), and the records
//! queued behind it are applied. The refusal comes from a test-only trigger in the test's
//! own database, not from weakening keyward's input checks.
#![allow(clippy::unwrap_used)]

mod common;

use common::{eventually, Backend, Cluster, Shape, TestDb, TestServer};
use keyward::accounting::apply_batch;
use keyward::usage::{dead_letters, UsageRecord, UsageSource};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::{AnyPool, Executor};

/// Makes the test's database refuse every usage row whose model is `poison`.
async fn poison_trigger(url: &str, shape: Shape) -> AnyPool {
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(url).await.unwrap();
    let sql = match shape {
        Shape::Distributed => {
            "CREATE FUNCTION kw_test_poison() RETURNS trigger AS $$ BEGIN \
               IF NEW.model = 'poison' THEN RAISE EXCEPTION 'poisoned record refused by a test trigger'; END IF; \
               RETURN NEW; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER kw_test_poison BEFORE INSERT ON usage_records \
               FOR EACH ROW EXECUTE FUNCTION kw_test_poison();"
        }
        Shape::Embedded => {
            "CREATE TRIGGER kw_test_poison BEFORE INSERT ON usage_records \
               WHEN NEW.model = 'poison' \
               BEGIN SELECT RAISE(ABORT, 'poisoned record refused by a test trigger'); END;"
        }
    };
    pool.execute(sql).await.unwrap();
    pool
}

/// The value of a counter or gauge without labels in a Prometheus scrape.
fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Admits one request for `secret` and reports it with `model`; returns the lease id.
async fn admit_and_report(s: &TestServer, secret: &str, model: &str) -> String {
    let admitted = s.admit(json!({"key": secret})).await;
    assert_eq!(admitted.status, 200, "{}", admitted.body);
    let lease = admitted.body["lease_id"].as_str().unwrap().to_string();
    let reported = s
        .data_post(
            "/v1/report",
            json!({"lease_id": lease, "model": model, "prompt_tokens": 10,
                   "completion_tokens": 5, "cost_usd": 0.01}),
        )
        .await;
    assert_eq!(reported.status, 200, "{}", reported.body);
    assert_eq!(reported.body["recorded"], true);
    lease
}

async fn key_totals(s: &TestServer, id: &str) -> (i64, i64) {
    let key = s
        .admin(Method::GET, &format!("/admin/keys/{id}"), None)
        .await;
    assert_eq!(key.status, 200, "{}", key.body);
    (
        key.body["total_requests"].as_i64().unwrap(),
        key.body["total_tokens"].as_i64().unwrap(),
    )
}

async fn dead_letters(s: &TestServer) -> Value {
    let list = s
        .admin(Method::GET, "/admin/accounting/dead-letters?limit=10", None)
        .await;
    assert_eq!(list.status, 200, "{}", list.body);
    list.body
}

async fn poisoned_record_is_set_aside_and_the_queue_goes_on(shape: Shape) {
    let c = Cluster::start_n(shape, 1, |_| {}).await;
    let s = &c.servers[0];
    let pool = poison_trigger(&c.db.url, shape).await;
    let before = metric(&s.metrics().await, "keyward_accounting_dead_letters_total");
    let (key, secret) = s
        .create_key(json!({"rate_limit": null, "concurrent_limit": null}))
        .await;
    let id = key["id"].as_str().unwrap().to_string();

    let poisoned = admit_and_report(s, &secret, "poison").await;
    for _ in 0..100 {
        admit_and_report(s, &secret, "gpt-4o-mini").await;
    }
    // Every good record is applied, although the refused one came first.
    eventually(30, || async {
        (key_totals(s, &id).await == (100, 1500)).then_some(())
    })
    .await;
    let stats = s
        .admin(Method::GET, &format!("/admin/keys/{id}/stats"), None)
        .await;
    assert_eq!(stats.body["total_requests"], 100, "{}", stats.body);
    assert_eq!(stats.body["total_cost_usd"], json!(1));

    // The refused record is listed, with its record and the database's reason.
    let list = dead_letters(s).await;
    assert_eq!(list["total"], 1, "{list}");
    let letter = &list["dead_letters"][0];
    assert_eq!(
        letter["record_id"],
        json!(common::lease_record_id(&poisoned))
    );
    assert_eq!(letter["record"]["model"], "poison");
    assert_eq!(letter["record"]["key_id"], json!(id));
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("poisoned record"),
        "{letter}"
    );
    let after = metric(&s.metrics().await, "keyward_accounting_dead_letters_total");
    assert!(after >= before + 1.0, "dead letters {before} -> {after}");

    // Replayed while the cause is still there: refused again (409), kept.
    let path = format!(
        "/admin/accounting/dead-letters/{}/replay",
        letter["id"].as_i64().unwrap()
    );
    let refused = s.admin(Method::POST, &path, None).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(common::error_code(&refused), "REPLAY_REFUSED");
    assert!(refused.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("poisoned record"));
    let list = dead_letters(s).await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["dead_letters"][0]["attempts"], 2);

    // The cause fixed, a replay applies it once and removes it.
    let drop = match shape {
        Shape::Distributed => "DROP TRIGGER kw_test_poison ON usage_records",
        Shape::Embedded => "DROP TRIGGER kw_test_poison",
    };
    pool.execute(drop).await.unwrap();
    let replayed = s.admin(Method::POST, &path, None).await;
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    assert_eq!(replayed.body["applied"], true);
    assert_eq!(key_totals(s, &id).await, (101, 1515));
    assert_eq!(dead_letters(s).await["total"], 0);
    let again = s.admin(Method::POST, &path, None).await;
    assert_eq!(again.status, 404, "{}", again.body);
    // Reporting the same lease again stays a duplicate: nothing counted twice.
    let duplicate = s
        .data_post("/v1/report", json!({"lease_id": poisoned}))
        .await;
    assert_eq!(duplicate.body["duplicate"], true, "{}", duplicate.body);
    assert_eq!(key_totals(s, &id).await, (101, 1515));

    let bad = s
        .admin(
            Method::POST,
            "/admin/accounting/dead-letters/x/replay",
            None,
        )
        .await;
    assert_eq!(bad.status, 400);
    pool.close().await;
    c.stop().await;
}

on_both_shapes!(poisoned_record_is_set_aside_and_the_queue_goes_on);

fn record(id: &str, model: &str, cost: i64) -> UsageRecord {
    UsageRecord {
        id: id.to_string(),
        key_id: None,
        provider: Some("openai".into()),
        model: Some(model.into()),
        api_format: None,
        provider_key_id: None,
        prompt_tokens: 1,
        completion_tokens: 1,
        cost_micros: cost,
        latency_ms: None,
        upstream_status: None,
        created_at: 1_700_000_000_000,
        cached_tokens: 0,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
        source: UsageSource::Reported,
    }
}

/// The writer's batch apply, directly: a NUL in a model (Postgres refuses it) and a cost
/// past the range of totals are each set aside; the records around them are applied;
/// applying the same batch again changes nothing and sets nothing aside twice.
async fn refused_records_in_a_batch_are_found_and_set_aside(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let batch = vec![
        record("good-1", "gpt-4o", 10),
        record("nul", "gpt\0-4o", 10),
        record("huge", "gpt-4o", keyward::money::MAX_TOTAL + 1),
        record("good-2", "gpt-4o", 10),
    ];
    let applied = apply_batch(&store, &batch).await.unwrap();
    // SQLite stores a NUL in text; Postgres refuses it.
    let refused = if backend == Backend::Postgres { 2 } else { 1 };
    assert_eq!(applied.inserted, 4 - refused, "{applied:?}");
    assert_eq!(applied.dead_lettered, refused, "{applied:?}");
    let again = apply_batch(&store, &batch).await.unwrap();
    assert_eq!(again.duplicates, 4 - refused, "{again:?}");
    let letters = dead_letters::list(&store, 10).await.unwrap();
    assert_eq!(letters.len(), refused);
    assert!(letters.iter().all(|l| l.attempts == 2), "{letters:?}");
    let huge = letters.iter().find(|l| l.record_id == "huge").unwrap();
    assert!(huge.error.contains("cost"), "{huge:?}");
    if backend == Backend::Postgres {
        let nul = letters.iter().find(|l| l.record_id == "nul").unwrap();
        let kept: UsageRecord = serde_json::from_str(&nul.record).unwrap();
        assert_eq!(kept, batch[1], "the record is kept whole, NUL included");
    }
    store.close().await;
}

on_both_backends!(
    refused_records_in_a_batch_are_found_and_set_aside,
    token_classes_and_source_are_stored_once,
);

/// An entry in the Redis usage stream that is not a usage record is kept as a dead
/// letter (with its fields), not dropped, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_stream_entry_is_kept_not_dropped() {
    let c = Cluster::start_n(Shape::Distributed, 1, |_| {}).await;
    let s = &c.servers[0];
    let keyward::limits::Counters::Redis(redis) = &s.state.counters else {
        panic!("distributed shape without Redis");
    };
    let mut conn = redis.conn().await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg(redis.stream_keys()[0].clone())
        .arg("*")
        .arg("id")
        .arg("no-timestamp")
        .arg("model")
        .arg("gpt-4o")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (key, secret) = s.create_key(json!({})).await;
    admit_and_report(s, &secret, "gpt-4o").await;
    let id = key["id"].as_str().unwrap().to_string();
    eventually(30, || async {
        (key_totals(s, &id).await.0 == 1).then_some(())
    })
    .await;
    let list = dead_letters(s).await;
    assert_eq!(list["total"], 1, "{list}");
    let letter = &list["dead_letters"][0];
    assert!(letter["record_id"].as_str().unwrap().starts_with("stream:"));
    assert_eq!(letter["record"]["id"], "no-timestamp");
    assert_eq!(letter["record"]["model"], "gpt-4o");
    c.stop().await;
}

/// A usage row's token classes and source, as stored (`id` of the record).
async fn stored_classes(db: &AnyPool, id: &str) -> (i64, i64, i64, String) {
    use sqlx::Row;
    let row = sqlx::query(
        "SELECT cached_tokens, cache_write_tokens, reasoning_tokens, source \
         FROM usage_records WHERE id = $1",
    )
    .bind(id)
    .fetch_one(db)
    .await
    .unwrap();
    (
        row.get("cached_tokens"),
        row.get("cache_write_tokens"),
        row.get("reasoning_tokens"),
        row.get("source"),
    )
}

/// The writer stores the token classes and source (once: a repeat adds nothing), a
/// class out of range is set aside like any value out of range, and a dead letter
/// written by an older release (without them) still reads back.
async fn token_classes_and_source_are_stored_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.connect().await;
    let classed = UsageRecord {
        prompt_tokens: 100,
        completion_tokens: 40,
        cached_tokens: 60,
        cache_write_tokens: 20,
        reasoning_tokens: 30,
        source: UsageSource::Parsed,
        ..record("classed", "gpt-4o", 10)
    };
    let estimated = UsageRecord {
        source: UsageSource::Estimated,
        ..record("estimated", "gpt-4o", 10)
    };
    let huge = UsageRecord {
        reasoning_tokens: keyward::money::MAX_TOTAL + 1,
        ..record("huge-class", "gpt-4o", 10)
    };
    let batch = vec![
        classed.clone(),
        estimated,
        huge,
        record("plain", "gpt-4o", 10),
    ];
    let applied = apply_batch(&store, &batch).await.unwrap();
    assert_eq!(
        (applied.inserted, applied.dead_lettered),
        (3, 1),
        "{applied:?}"
    );
    assert_eq!(apply_batch(&store, &batch).await.unwrap().duplicates, 3);
    sqlx::any::install_default_drivers();
    let sql = AnyPool::connect(&db.url).await.unwrap();
    assert_eq!(
        stored_classes(&sql, "classed").await,
        (60, 20, 30, "parsed".into())
    );
    assert_eq!(
        stored_classes(&sql, "estimated").await,
        (0, 0, 0, "estimated".into())
    );
    assert_eq!(
        stored_classes(&sql, "plain").await,
        (0, 0, 0, "reported".into())
    );
    let letters = dead_letters::list(&store, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].error.contains("token classes"), "{letters:?}");
    let kept: UsageRecord = serde_json::from_str(&letters[0].record).unwrap();
    assert_eq!(kept.reasoning_tokens, keyward::money::MAX_TOTAL + 1);
    // The JSON of a record set aside by an older release.
    let mut old = serde_json::to_value(&classed).unwrap();
    for field in [
        "cached_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "source",
    ] {
        old.as_object_mut().unwrap().remove(field);
    }
    let read: UsageRecord = serde_json::from_value(old.clone()).unwrap();
    assert_eq!(
        (read.cached_tokens, read.reasoning_tokens, read.source),
        (0, 0, UsageSource::Reported)
    );
    old["source"] = json!("guessed");
    assert!(serde_json::from_value::<UsageRecord>(old).is_err());
    assert_eq!(serde_json::to_value(&classed).unwrap()["source"], "parsed");
    sql.close().await;
    store.close().await;
}

/// Stream entries with the token classes and source are stored with them; an older
/// release's entry (without them) is stored as reported with no classes; an entry with
/// an unreadable class or source is set aside as a dead letter, and the queue goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_entries_carry_token_classes_and_bad_ones_are_set_aside() {
    let c = Cluster::start_n(Shape::Distributed, 1, |_| {}).await;
    let s = &c.servers[0];
    let keyward::limits::Counters::Redis(redis) = &s.state.counters else {
        panic!("distributed shape without Redis");
    };
    let mut conn = redis.conn().await.unwrap();
    let entry = |id: &str, extra: &[(&str, &str)]| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(redis.stream_keys()[0].clone()).arg("*");
        for (name, value) in [
            ("id", id),
            ("key", ""),
            ("provider", "openai"),
            ("model", "gpt-4o"),
            ("fmt", ""),
            ("pk", ""),
            ("pt", "100"),
            ("ct", "40"),
            ("cost", "0"),
            ("lat", ""),
            ("st", "200"),
            ("ts", "1700000000000"),
        ]
        .iter()
        .chain(extra)
        {
            cmd.arg(*name).arg(*value);
        }
        cmd
    };
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let id = |name: &str| format!("{name}-{unique}");
    for (name, extra) in [
        (
            "new",
            &[("cr", "60"), ("cw", "20"), ("rs", "30"), ("src", "parsed")][..],
        ),
        (
            "estimated",
            &[("cr", "0"), ("cw", "0"), ("rs", "0"), ("src", "estimated")][..],
        ),
        ("old", &[][..]),
        ("bad-class", &[("cr", "lots"), ("src", "parsed")][..]),
        ("bad-source", &[("cr", "1"), ("src", "guessed")][..]),
        ("negative", &[("rs", "-1")][..]),
    ] {
        let _: String = entry(&id(name), extra)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let db = c.db.connect().await;
    sqlx::any::install_default_drivers();
    let sql = AnyPool::connect(&c.db.url).await.unwrap();
    let letters = eventually(30, || async {
        let letters = dead_letters::list(&db, 10).await.unwrap();
        (letters.len() == 3).then_some(letters)
    })
    .await;
    let mut kept: Vec<String> = letters
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(&l.record).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        vec![id("bad-class"), id("bad-source"), id("negative")]
    );
    eventually(30, || async {
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE id IN ($1, $2, $3)")
                .bind(id("new"))
                .bind(id("estimated"))
                .bind(id("old"))
                .fetch_one(&sql)
                .await
                .unwrap();
        (count == 3).then_some(())
    })
    .await;
    assert_eq!(
        stored_classes(&sql, &id("new")).await,
        (60, 20, 30, "parsed".into())
    );
    assert_eq!(
        stored_classes(&sql, &id("estimated")).await,
        (0, 0, 0, "estimated".into())
    );
    assert_eq!(
        stored_classes(&sql, &id("old")).await,
        (0, 0, 0, "reported".into())
    );
    sql.close().await;
    c.stop().await;
}
