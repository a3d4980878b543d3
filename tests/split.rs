//! A deployment spread over a Redis Cluster: tenants on shards whose slots
//! spread evenly over the masters, each pool on its own slot, and an admission with
//! selection as two atomic steps on two masters that give back what one side took when
//! the other refuses or fails (`limits::redis::split`).
//!
//! (Over 400 lines: each test drives a private three-master cluster through the typed
//! script contracts, which take many lines per call; they share its helpers here.)
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::PrivateCluster;
use keyward::limits::redis::RedisCounters;
use keyward::limits::scripts::pick::{PickArgs, PickKeys, PickReply};
use keyward::limits::scripts::pool_report::{PoolReportArgs, PoolReportKeys};
use keyward::limits::scripts::report::{request_entries, ReportArgs, ReportKeys};
use keyward::limits::scripts::unpick::{self, UnpickArgs, UnpickKeys};
use keyward::limits::scripts::{self, source, KeySpace};
use keyward::limits::{
    AdmitRequest, CounterError, Decision, Denial, LeaseId, Pick, QuotaEntry, QuotaKind,
    SelectRequest, Tenant, Verdict,
};
use keyward::pool::cache::{Candidate, Roster};

fn request<'a>(lease: &'a LeaseId, rpm: i64, pool: Option<&'a Roster>) -> AdmitRequest<'a> {
    AdmitRequest {
        lease,
        rpm: Some(rpm),
        tpm: None,
        // Counted leases (a limit never reached): the tests read the lease set to see
        // that every cancel ran (a light admission would record none).
        concurrency: Some(1_000_000),
        tokens: 10,
        lease_ttl_ms: 300_000,
        provider: "openai",
        model: "gpt-4o",
        api_format: "openai_chat",
        balance: None,
        hold_micros: 0,
        pool,
        quotas: &[],
    }
}

fn pool_of(provider: &str, rpm: i64) -> Roster {
    Roster::new(vec![Candidate {
        id: uuid::Uuid::new_v4().to_string(),
        provider: provider.to_string(),
        label: "only".into(),
        priority: 0,
        max_rpm: Some(rpm),
        max_tpm: None,
        value: "sk-upstream".into(),
    }])
}

fn admitted(d: &Decision) -> bool {
    matches!(d.verdict, Verdict::Admitted { .. })
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The slot of a key's hash tag.
fn slot_of(name: &str) -> u32 {
    let open = name.find('{').unwrap();
    let close = open + name[open..].find('}').unwrap();
    scripts::slot(&name[open + 1..close])
}

/// `cmd`'s answer, asked again (for up to 5 s) while the cluster connection is still
/// replacing connections a test had a master drop.
async fn ask<T: redis::FromRedisValue>(redis: &RedisCounters, cmd: &redis::Cmd) -> T {
    let mut last = None;
    for _ in 0..50 {
        let answer = match redis.conn().await {
            Ok(mut conn) => cmd.query_async(&mut conn).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match answer {
            Ok(answer) => return answer,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no answer: {last:?}");
}

/// What a window hash counts now (its `s`; 0 when it does not exist).
async fn window_sum(redis: &RedisCounters, name: &str) -> i64 {
    let sum: Option<i64> = ask(redis, redis::cmd("HGET").arg(name).arg("s")).await;
    sum.unwrap_or(0)
}

async fn leases_held(redis: &RedisCounters, key_id: &str) -> i64 {
    ask(redis, redis::cmd("ZCARD").arg(redis.key(key_id, "leases"))).await
}

/// EVALSHA calls each master has served so far.
async fn evalsha_calls(cluster: &PrivateCluster) -> Vec<i64> {
    let mut out = Vec::new();
    for port in &cluster.ports {
        let mut conn = PrivateCluster::node(*port).await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        let calls = info
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap());
        out.push(calls);
    }
    out
}

/// A provider whose pool tag is on another master than `key_id`'s shard.
async fn provider_apart_from(
    cluster: &PrivateCluster,
    redis: &RedisCounters,
    key_id: &str,
) -> String {
    let client_master = cluster.owner_of(slot_of(&redis.key(key_id, "rpm"))).await;
    loop {
        let provider = common::unique_prefix();
        let pool_master = cluster
            .owner_of(slot_of(&redis.space().pool_tag(&provider)))
            .await;
        if pool_master != client_master {
            return provider;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_keys_spread_their_admissions_over_every_master() {
    let cluster = PrivateCluster::start().await;
    let redis = Arc::new(
        RedisCounters::connect(&cluster.url, &common::unique_prefix(), 600_000)
            .await
            .unwrap(),
    );
    // The tags' slots (checked by the servers themselves) lie in their equal ranges.
    let mut conn = PrivateCluster::node(cluster.ports[0]).await;
    let space = redis.space();
    for shard in 0..space.shard_count() {
        let tag = space.tag(shard);
        let slot: u32 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{tag}:x"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(slot, slot_of(tag));
        assert_eq!(slot / 1024, u32::from(shard), "{tag}");
    }
    let before = evalsha_calls(&cluster).await;
    let keys: Vec<String> = (0..1_000).map(|_| key()).collect();
    for chunk in keys.chunks(50) {
        let admits = chunk.iter().map(|k| {
            let redis = redis.clone();
            async move {
                let lease = LeaseId::new(k);
                redis.admit(&request(&lease, 10, None)).await.unwrap()
            }
        });
        for d in futures_util::future::join_all(admits).await {
            assert!(admitted(&d));
        }
    }
    let after = evalsha_calls(&cluster).await;
    let calls: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: i64 = calls.iter().sum();
    eprintln!("EVALSHA calls per master: {calls:?}");
    assert!(total >= 1_000, "{calls:?}");
    for c in &calls {
        let share = *c as f64 / total as f64;
        assert!((0.23..=0.43).contains(&share), "shares of {calls:?}");
    }
}

/// Three replicas of one deployment (one prefix) on `cluster`.
async fn three_replicas(cluster: &PrivateCluster) -> Vec<Arc<RedisCounters>> {
    let prefix = common::unique_prefix();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let r = RedisCounters::connect(&cluster.url, &prefix, 600_000)
            .await
            .unwrap();
        replicas.push(Arc::new(r));
    }
    replicas
}

/// `rounds` admissions with selection of one key, from three replicas at once: how many
/// were admitted, and what each side counts afterwards.
async fn burst(
    replicas: &[Arc<RedisCounters>],
    key_id: &str,
    client_rpm: i64,
    pool: &Arc<Roster>,
    rounds: usize,
) -> (usize, usize) {
    let tasks: Vec<_> = (0..rounds)
        .map(|i| {
            let (redis, pool, key_id) = (replicas[i % 3].clone(), pool.clone(), key_id.to_string());
            tokio::spawn(async move {
                let lease = LeaseId::new(&key_id);
                redis.admit(&request(&lease, client_rpm, Some(&pool))).await
            })
        })
        .collect();
    let (mut admitted_n, mut failed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(d) if admitted(&d) => admitted_n += 1,
            Ok(d) => assert!(
                matches!(
                    d.verdict,
                    Verdict::Denied {
                        reason: Denial::Requests | Denial::PoolExhausted,
                        ..
                    }
                ),
                "{d:?}"
            ),
            Err(_) => failed += 1,
        }
    }
    for r in replicas {
        r.settled().await;
    }
    (admitted_n, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admit_with_select_is_exact_across_three_replicas_on_two_masters() {
    let cluster = PrivateCluster::start().await;
    let replicas = three_replicas(&cluster).await;
    let r0 = replicas[0].clone();
    // The client's limit below the pool's, then the pool's below the client's.
    for (client_rpm, pool_rpm) in [(40, 90), (90, 40)] {
        let k = key();
        let provider = provider_apart_from(&cluster, &r0, &k).await;
        let pool = Arc::new(pool_of(&provider, pool_rpm));
        let (in_burst, failed) = burst(&replicas, &k, client_rpm, &pool, 200).await;
        assert_eq!(failed, 0);
        let expected = client_rpm.min(pool_rpm) as usize;
        assert!(
            in_burst <= expected,
            "over-admitted: {in_burst} of {expected}"
        );
        // A refusal by one side may briefly hold the other side's unit (until its
        // compensation lands), so a burst of simultaneous requests can admit fewer than
        // the limits; once they have landed, nothing is held: the rest of the capacity
        // admits one by one, up to exactly the limit.
        let mut admitted_n = in_burst;
        loop {
            let lease = LeaseId::new(&k);
            let d = r0
                .admit(&request(&lease, client_rpm, Some(&pool)))
                .await
                .unwrap();
            r0.settled().await;
            if !admitted(&d) {
                break;
            }
            admitted_n += 1;
        }
        eprintln!("client {client_rpm}, pool {pool_rpm}: {in_burst} admitted in the burst, {admitted_n} in all");
        assert_eq!(admitted_n, expected, "client {client_rpm}, pool {pool_rpm}");
        // Everything one side took for a refusal of the other was given back.
        let pk_rpm = r0.space().provider_key(&provider, &pool[0].id, "rpm");
        assert_eq!(window_sum(&r0, &pk_rpm).await, expected as i64);
        assert_eq!(window_sum(&r0, &r0.key(&k, "rpm")).await, expected as i64);
        assert_eq!(leases_held(&r0, &k).await, expected as i64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_one_side_gives_the_other_sides_units_back() {
    let cluster = PrivateCluster::start().await;
    let redis = RedisCounters::connect(&cluster.url, &common::unique_prefix(), 600_000)
        .await
        .unwrap();
    // The pool refuses (its only key used up): the client's units come back, so it
    // admits up to its limit at once.
    let k = key();
    let provider = provider_apart_from(&cluster, &redis, &k).await;
    let pool = pool_of(&provider, 1);
    let select = SelectRequest {
        provider: &provider,
        candidates: &pool,
        tokens: 0,
    };
    assert_eq!(redis.select(&select).await.unwrap(), Pick::Picked(0));
    let lease = LeaseId::new(&k);
    let d = redis.admit(&request(&lease, 2, Some(&pool))).await.unwrap();
    assert!(
        matches!(
            d.verdict,
            Verdict::Denied {
                reason: Denial::PoolExhausted,
                ..
            }
        ),
        "{d:?}"
    );
    assert_eq!(
        (d.usage.requests_used, d.usage.in_flight),
        (0, 0),
        "as the one-step decision"
    );
    redis.settled().await;
    assert_eq!(leases_held(&redis, &k).await, 0);
    for _ in 0..2 {
        let lease = LeaseId::new(&k);
        assert!(admitted(
            &redis.admit(&request(&lease, 2, None)).await.unwrap()
        ));
    }
    let lease = LeaseId::new(&k);
    assert!(!admitted(
        &redis.admit(&request(&lease, 2, None)).await.unwrap()
    ));

    // The client refuses (its limit used up): the pick's units come back.
    let k = key();
    let provider = provider_apart_from(&cluster, &redis, &k).await;
    let pool = pool_of(&provider, 5);
    let lease = LeaseId::new(&k);
    assert!(admitted(
        &redis.admit(&request(&lease, 1, None)).await.unwrap()
    ));
    let lease = LeaseId::new(&k);
    let d = redis.admit(&request(&lease, 1, Some(&pool))).await.unwrap();
    assert!(
        matches!(
            d.verdict,
            Verdict::Denied {
                reason: Denial::Requests,
                ..
            }
        ),
        "{d:?}"
    );
    redis.settled().await;
    let pk_rpm = redis.space().provider_key(&provider, &pool[0].id, "rpm");
    assert_eq!(window_sum(&redis, &pk_rpm).await, 0);
}

/// Runs `lua/unpick.lua` once for pick `p` of lease `token`: whether it gave anything back.
async fn unpick_once(
    conn: &mut keyward::limits::conn::Conn,
    space: &KeySpace,
    provider: &str,
    p: &PickReply,
    token: &str,
) -> bool {
    let script = redis::Script::new(source::UNPICK);
    let mut call = script.prepare_invoke();
    UnpickKeys::new(space, provider, &p.picked, token).push(&mut call);
    UnpickArgs {
        picked: &p.picked,
        second: p.taken.second,
        requests: p.requests,
        tokens: p.taken.tokens,
        previous: &p.previous,
        score: &p.score,
        time_shift_ms: 0,
        now_ms: 0,
    }
    .push(&mut call);
    let reply: Vec<redis::Value> = call.invoke_async(conn).await.unwrap();
    unpick::parse(&reply).unwrap()
}

/// The compensating scripts themselves, run twice: the second run gives nothing back (it
/// would give back another admission's units).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensations_give_back_once() {
    let cluster = PrivateCluster::start().await;
    let redis = RedisCounters::connect(&cluster.url, &common::unique_prefix(), 600_000)
        .await
        .unwrap();
    let space: &KeySpace = redis.space();
    let mut conn = redis.conn().await.unwrap();

    // Two picks of one key, then the first given back twice: one pick still counts.
    let provider = common::unique_prefix();
    let pool = pool_of(&provider, 10);
    assert_eq!(
        redis
            .select(&SelectRequest {
                provider: &provider,
                candidates: &pool,
                tokens: 0,
            })
            .await
            .unwrap(),
        Pick::Picked(0),
        "the pool is synced"
    );
    let pick_script = redis::Script::new(source::PICK);
    let mut picks = Vec::new();
    for _ in 0..2 {
        let mut call = pick_script.prepare_invoke();
        PickKeys::new(space, &provider).push(&mut call);
        PickArgs {
            tokens: 0,
            pool_version: pool.version(),
            time_shift_ms: 0,
            now_ms: 0,
        }
        .push(&mut call);
        let reply: Vec<redis::Value> = call.invoke_async(&mut conn).await.unwrap();
        picks.push(PickReply::parse(&reply).unwrap());
        // Picks in one millisecond write the same pick time, and then unpick.lua cannot
        // tell whether a later pick moved it (it then puts back the earlier time: a key
        // looks less recently picked by a millisecond, nothing else).
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let pk_rpm = space.provider_key(&provider, &pool[0].id, "rpm");
    assert_eq!(window_sum(&redis, &pk_rpm).await, 3);
    let token = LeaseId::new(&key()).token;
    let mut gave = Vec::new();
    for _ in 0..2 {
        gave.push(unpick_once(&mut conn, space, &provider, &picks[0], &token).await);
    }
    assert_eq!(gave, [true, false]);
    assert_eq!(window_sum(&redis, &pk_rpm).await, 2);
    // The last pick given back puts its key's pick time back: pick.lua answers the score
    // as it wrote it ('%d'), unpick.lua compares it with ZSCORE's text as a number.
    let p = &picks[1];
    let token = LeaseId::new(&key()).token;
    assert!(unpick_once(&mut conn, space, &provider, p, &token).await);
    let order: Option<f64> = redis::cmd("ZSCORE")
        .arg(space.pool(&provider, "order"))
        .arg(&p.picked)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(order, Some(p.previous.parse::<f64>().unwrap()));
    assert_eq!(window_sum(&redis, &pk_rpm).await, 1);

    // Two admissions of a key with a per-minute quota entry, then the first cancelled
    // twice: one admission still counts, in the key's window and in the entry's.
    let k = key();
    let quotas = [QuotaEntry {
        counter: uuid::Uuid::new_v4().simple().to_string(),
        kind: QuotaKind::RequestsPerMinute,
        limit: 100,
        seed: None,
    }];
    let mut leases = Vec::new();
    for _ in 0..2 {
        let lease = LeaseId::new(&k);
        let d = redis
            .admit(&AdmitRequest {
                quotas: &quotas,
                // Light (no lease record): its cancel takes its data from the lease.
                concurrency: None,
                ..request(&lease, 10, None)
            })
            .await
            .unwrap();
        assert!(d.light.is_some(), "{d:?}");
        let Verdict::Admitted { expires_at_ms } = d.verdict else {
            panic!("{d:?}")
        };
        leases.push((lease, expires_at_ms, d.light));
    }
    let shard = space.shard_of(Tenant::Key(&k));
    let report_script = redis::Script::new(source::REPORT);
    let (lease, expiry, light) = &leases[0];
    let mut codes = Vec::new();
    for _ in 0..2 {
        let mut call = report_script.prepare_invoke();
        let record_id = lease.to_string();
        ReportKeys::new(space, shard, &k, &record_id).push(&mut call);
        let entries = request_entries(space, shard, &quotas);
        for (key, _) in &entries {
            key.push(&mut call);
        }
        ReportArgs {
            lease_token: &lease.token,
            record_id: &record_id,
            key_id: &k,
            has_tokens: true,
            prompt: 0,
            completion: 0,
            cost: 0,
            guard_ttl_ms: 600_000,
            model: "",
            provider_key: "",
            latency_ms: String::new(),
            status: String::new(),
            time_shift_ms: 0,
            lease_expiry: *expiry,
            cached: 0,
            cache_write: 0,
            reasoning: 0,
            usage_source: "reported",
            now_ms: 0,
            cancel: true,
            requests: true,
            light: scripts::report::light_arg(light.as_ref()),
        }
        .push(&mut call);
        for (_, args) in &entries {
            args.push(&mut call);
        }
        let reply: Vec<redis::Value> = call.invoke_async(&mut conn).await.unwrap();
        codes.push(scripts::report::ReportCode::parse(&reply).unwrap());
    }
    use scripts::report::ReportCode;
    assert_eq!(codes, [ReportCode::Recorded, ReportCode::Duplicate]);
    assert_eq!(window_sum(&redis, &redis.key(&k, "rpm")).await, 1);
    let rm = format!("{}:rm", space.quota(shard, &quotas[0].counter));
    assert_eq!(window_sum(&redis, &rm).await, 1);
    assert_eq!(
        leases_held(&redis, &k).await,
        0,
        "light admissions record no lease"
    );
    // A cancel queues no usage record.
    assert!(common::stream_records(&redis).await.is_empty());
}

/// The pool's master drops every connection again and again during a burst: each
/// admission is answered by the failure policy (deny: an error) or decided, and what
/// the client's side (on the other master) took for an admission that failed on the
/// pool's side is given back: its window and its leases count the admitted ones only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_master_dropping_connections_leaks_nothing_on_the_clients_master() {
    let cluster = PrivateCluster::start().await;
    let replicas = three_replicas(&cluster).await;
    let r0 = replicas[0].clone();
    let k = key();
    let provider = provider_apart_from(&cluster, &r0, &k).await;
    let pool = Arc::new(pool_of(&provider, 1_000));
    let pool_master = cluster
        .owner_of(slot_of(&r0.space().pool_tag(&provider)))
        .await;
    // Synced first: the burst's failures are the killer's, not a sync's.
    let lease = LeaseId::new(&key());
    assert!(admitted(
        &r0.admit(&request(&lease, 1_000, Some(&pool)))
            .await
            .unwrap()
    ));

    let killer = tokio::spawn(async move {
        let mut conn = PrivateCluster::node(pool_master).await;
        let mut killed = 0;
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let n: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut conn)
                .await;
            killed += n.unwrap_or(0);
        }
        killed
    });
    let mut admitted_n = 0;
    let mut failed = 0;
    for _ in 0..4 {
        let (a, f) = burst(&replicas, &k, 1_000, &pool, 100).await;
        admitted_n += a;
        failed += f;
    }
    let killed = killer.await.unwrap();
    assert!(killed > 0, "the pool's master dropped no connection");
    eprintln!("admitted {admitted_n}, failed {failed}, connections killed {killed}");
    // The client's side: every admitted request holds its slot and its unit in the
    // window (every cancel ran), and a failed admission holds them only when its own
    // script's answer was lost: the cluster client replaces its connections when one
    // master drops them, and a script in flight to the client's master then times out
    // after it ran, so nothing says what to give back. That is rare (a failed cancel
    // would leave units for most of the failed admissions) and bounded: the slot until
    // its lease expires, the unit until its second leaves the window.
    for r in &replicas {
        r.settled().await;
    }
    let rpm = r0.key(&k, "rpm");
    let slots = leases_held(&r0, &k).await - admitted_n as i64;
    let units = window_sum(&r0, &rpm).await - admitted_n as i64;
    eprintln!("held beyond the admitted: {slots} slots, {units} window units");
    for held in [slots, units] {
        assert!(
            (0..=failed as i64 / 2).contains(&held),
            "held {slots} slots and {units} units beyond the admitted, failed {failed}"
        );
    }
    r0.time_shift().advance(301_000); // past the leases' expiry (300 s) and the window
    let again = LeaseId::new(&k);
    // The burst's failures may have opened r0's circuit breaker (for a second).
    let mut d = r0.admit(&request(&again, 1, None)).await;
    for _ in 0..50 {
        if !matches!(d, Err(CounterError::CircuitOpen)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        d = r0.admit(&request(&again, 1, None)).await;
    }
    let d = d.unwrap();
    assert!(admitted(&d));
    assert_eq!(d.usage.in_flight, 1, "a slot outlived its lease");
    assert_eq!(window_sum(&r0, &rpm).await, 1, "a unit outlived its second");
    // The pool's side (the probe's pick aside): at least the admitted ones. A pick whose
    // answer was lost with its connection (or that the cluster client sent again on a
    // new one) holds its unit until its second leaves the window.
    let pk_rpm = r0.space().provider_key(&provider, &pool[0].id, "rpm");
    let held = window_sum(&r0, &pk_rpm).await - 1;
    eprintln!("the pool's key counts {held}");
    assert!(
        held >= admitted_n as i64,
        "pool counts {held}, admitted {admitted_n}"
    );
}

/// A replica started with another shard count than the one Redis records refuses, naming
/// the setting; the same count starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_shard_count_than_redis_holds_refuses_to_start() {
    let url = common::redis_url();
    let prefix = common::unique_prefix();
    let connect = |shards| {
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            RedisCounters::connect(&url, &prefix, 600_000)
                .await
                .unwrap()
                .with_shards(shards)
        }
    };
    connect(16).await.check_layout().await.unwrap();
    connect(16).await.check_layout().await.unwrap();
    let refused = connect(8).await.check_layout().await.unwrap_err();
    assert!(
        refused.to_string().contains("KEYWARD_REDIS_SHARDS"),
        "{refused}"
    );
    common::delete_prefix(&url, &prefix).await;
}

/// Records queued by the one-tag layout before (in `{<prefix>}:usage`) are applied by the
/// new writers, which read it beside the shards' streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_tag_layouts_stream_is_drained() {
    use common::{Cluster, Shape};
    let c = Cluster::start_n(Shape::Distributed, 1, |raw| {
        // The writer looks for the legacy stream again at each claim round.
        raw.insert(keyward::config::ACCOUNTING_CLAIM_IDLE_S, "1".into());
    })
    .await;
    let keyward::limits::Counters::Redis(redis) = &c.servers[0].state.counters else {
        panic!("distributed shape without Redis");
    };
    let legacy = redis.stream_keys().last().unwrap().clone();
    assert_eq!(legacy, format!("{}:usage", redis.space().legacy_tag()));
    let mut conn = redis.conn().await.unwrap();
    keyward::accounting::stream::ensure_group(&mut conn, &legacy)
        .await
        .unwrap();
    let id = format!("legacy-{}", uuid::Uuid::new_v4().simple());
    common::queue_usage_record(&mut conn, &legacy, &id).await;
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&c.db.url).await.unwrap();
    let stored = common::eventually(30, || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE id = $1")
            .bind(&id)
            .fetch_one(&db)
            .await
            .ok()?;
        (n == 1).then_some(n)
    })
    .await;
    assert_eq!(stored, 1);
    let left: i64 = redis::cmd("XLEN")
        .arg(&legacy)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "applied entries leave the stream");
    c.stop().await;
}

/// A replica whose pool is older than the one in Redis is told so by the pick (it
/// reloads and asks again, under a new lease id): what its client's side took meanwhile
/// is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outdated_pool_gives_the_clients_units_back() {
    let cluster = PrivateCluster::start().await;
    let redis = RedisCounters::connect(&cluster.url, &common::unique_prefix(), 600_000)
        .await
        .unwrap();
    let k = key();
    let provider = provider_apart_from(&cluster, &redis, &k).await;
    let newer = pool_of(&provider, 10);
    let older = Roster::stamped(
        vec![Candidate {
            max_rpm: Some(5),
            ..newer[0].clone()
        }],
        newer.stamp() - 1_000,
    );
    let select = SelectRequest {
        provider: &provider,
        candidates: &newer,
        tokens: 0,
    };
    assert_eq!(redis.select(&select).await.unwrap(), Pick::Picked(0));
    let lease = LeaseId::new(&k);
    let outdated = redis.admit(&request(&lease, 5, Some(&older))).await;
    assert!(
        matches!(
            outdated,
            Err(keyward::limits::CounterError::PoolOutdated { .. })
        ),
        "{outdated:?}"
    );
    redis.settled().await;
    assert_eq!(window_sum(&redis, &redis.key(&k, "rpm")).await, 0);
    assert_eq!(leases_held(&redis, &k).await, 0);
}

/// A lease's provider-key part of its report runs once: a repeat (a cluster client
/// re-sends a script whose reply a dropped connection lost) settles nothing again.
#[tokio::test]
async fn a_repeated_pool_report_settles_once() {
    let cluster = PrivateCluster::start().await;
    let redis = RedisCounters::connect(&cluster.url, &common::unique_prefix(), 600_000)
        .await
        .unwrap();
    let space: &KeySpace = redis.space();
    let mut conn = redis.conn().await.unwrap();
    let (provider, pk) = (common::unique_prefix(), key());
    let pk_tpm = space.provider_key(&provider, &pk, "tpm");
    let time: Vec<String> = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let second: i64 = time[0].parse().unwrap();
    // The pick reserved 1,000 tokens in this second; the upstream used 100.
    let _: () = redis::cmd("HSET")
        .arg(&pk_tpm)
        .arg(second)
        .arg(1_000)
        .arg("s")
        .arg(1_000)
        .arg("lo")
        .arg(second)
        .query_async(&mut conn)
        .await
        .unwrap();
    let script = redis::Script::new(source::POOL_REPORT);
    let token = LeaseId::new(&key()).token;
    for _ in 0..2 {
        let mut call = script.prepare_invoke();
        PoolReportKeys::new(space, &provider, &pk, &token).push(&mut call);
        PoolReportArgs {
            second,
            reserved: 1_000,
            has_tokens: true,
            used: 100,
            status: "200".into(),
            cooldown_ms: 0,
            suspend_ms: 0,
            cause_source: "lease x",
            learned_cooldown_ms: 0,
            learned_keep_ms: 0,
            learned_limits: String::new(),
            time_shift_ms: 0,
            now_ms: 0,
            guarded: true,
            guard_ttl_ms: 600_000,
            lease_expiry: second * 1000 + 300_000,
        }
        .push(&mut call);
        let reply: Vec<redis::Value> = call.invoke_async(&mut conn).await.unwrap();
        keyward::limits::scripts::pool_report::parse(&reply).unwrap();
        assert_eq!(window_sum(&redis, &pk_tpm).await, 100, "settled once");
    }
}
