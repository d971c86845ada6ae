//! The replay guard shared by ingress replicas through the CQL keyspace: two guards on their
//! own sessions (two replicas) never both accept one token, also racing; scopes are apart; a
//! released or expired token is usable again; a store that cannot answer is an error, never
//! "first use". End to end, a signed Mailgun request accepted by one server is refused as a
//! replay by another server on the same keyspace.
//! Needs a CQL node (`scripts/cassandra.sh start`); the Kafka case a broker too.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cql_node, fresh_cql_keyspace, now_secs, Backend, Harness, TenantSpec};
use serde_json::Value;
use xsender_events::app;
use xsender_events::config::Role;
use xsender_events::projection::cql::CqlSettings;
use xsender_events::providers::replay_cql::CqlReplayGuard;
use xsender_events::providers::{ReplayGuard, ReplayGuardError};

fn settings(keyspace: &str) -> CqlSettings {
    CqlSettings {
        nodes: vec![cql_node()],
        keyspace: keyspace.to_string(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".to_string(),
    }
}

/// Two replicas: a guard each, each on its own session, on one fresh keyspace.
async fn two_replicas() -> (String, Arc<CqlReplayGuard>, Arc<CqlReplayGuard>) {
    let ks = fresh_cql_keyspace().await;
    let a = CqlReplayGuard::open(&settings(&ks)).await.unwrap();
    let b = CqlReplayGuard::open(&settings(&ks)).await.unwrap();
    (ks, Arc::new(a), Arc::new(b))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn token() -> String {
    format!("{:050x}", rand::random::<u128>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_both_accept_one_token() {
    let (_, a, b) = two_replicas().await;
    let window = 600_000;
    // 16 claims of one token at once, half through each replica, several times over.
    for round in 0..4 {
        let tok = token();
        let now = now_ms();
        let claims: Vec<_> = (0..16)
            .map(|i| {
                let g = if i % 2 == 0 { a.clone() } else { b.clone() };
                let tok = tok.clone();
                tokio::spawn(async move { g.first_use("mailgun", &tok, now, now + window).await })
            })
            .collect();
        let mut answers = Vec::new();
        for c in claims {
            answers.push(c.await.unwrap());
        }
        let first = answers.iter().filter(|r| **r == Ok(true)).count();
        let replays = answers.iter().filter(|r| **r == Ok(false)).count();
        assert_eq!((first, replays), (1, 15), "round {round}: {answers:?}");
    }

    // Sequentially, through either replica.
    let tok = token();
    let now = now_ms();
    // Whether `guard` takes `tok` in `scope` as a first use, against what is expected.
    let first_use = |guard: &Arc<CqlReplayGuard>, scope: &'static str, expected: bool| {
        let (guard, tok) = (guard.clone(), tok.clone());
        async move {
            assert_eq!(
                guard.first_use(scope, &tok, now, now + window).await,
                Ok(expected),
                "{scope}"
            );
        }
    };
    first_use(&a, "mailgun", true).await;
    first_use(&b, "mailgun", false).await;
    first_use(&a, "mailgun", false).await;
    // Another scope is another namespace.
    first_use(&b, "other", true).await;
    first_use(&a, "other", false).await;
    // Given back (its request got a 503): the retry, on any replica, is a first use again.
    b.release("mailgun", &tok).await;
    first_use(&a, "mailgun", true).await;
    first_use(&b, "mailgun", false).await;
    // Releasing one scope leaves the other spent; releasing twice is harmless.
    a.release("other", &tok).await;
    a.release("other", &tok).await;
    first_use(&b, "mailgun", false).await;
    first_use(&b, "other", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_usable_again() {
    let (ks, a, b) = two_replicas().await;
    let tok = token();
    let written = Instant::now();
    let now = now_ms();
    // A 2 s TTL: the row lives between 1 and 2 s (the server counts whole seconds).
    assert_eq!(
        a.first_use("mailgun", &tok, now, now + 2_000).await,
        Ok(true)
    );
    assert_eq!(
        b.first_use("mailgun", &tok, now, now + 2_000).await,
        Ok(false)
    );
    // The row holds a 16-byte hash (the table has no column for the token) and the TTL.
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(cql_node())
        .build()
        .await
        .unwrap();
    let rows = session
        .query_unpaged(
            format!("SELECT scope, token_hash, TTL(expires_at_ms) FROM {ks}.replay_tokens"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let rows: Vec<(String, Vec<u8>, Option<i32>)> =
        rows.rows().unwrap().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "mailgun");
    assert_eq!(rows[0].1.len(), 16, "a 128-bit hash");
    assert!(matches!(rows[0].2, Some(1..=2)), "{rows:?}");
    // Once the TTL has run out the row is gone and the insert applies again.
    common::wait_until(Duration::from_secs(10), || {
        let b = b.clone();
        let tok = tok.clone();
        async move {
            let now = now_ms();
            b.first_use("mailgun", &tok, now, now + 600_000).await == Ok(true)
        }
    })
    .await;
    assert!(written.elapsed() >= Duration::from_millis(900));
    // ... and it is spent again, for its new window.
    let now = now_ms();
    assert_eq!(
        a.first_use("mailgun", &tok, now, now + 600_000).await,
        Ok(false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_answer_is_an_error_never_a_first_use() {
    let (ks, a, _) = two_replicas().await;
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(cql_node())
        .build()
        .await
        .unwrap();
    session
        .query_unpaged(format!("DROP TABLE {ks}.replay_tokens"), ())
        .await
        .unwrap();
    let now = now_ms();
    let r = a.first_use("mailgun", &token(), now, now + 600_000).await;
    assert!(matches!(r, Err(ReplayGuardError::Unavailable(_))), "{r:?}");
    // Best effort: logged, no panic.
    a.release("mailgun", &token()).await;
}

async fn post(http: &reqwest::Client, base: &str, body: Vec<u8>) -> (u16, Value) {
    let r = http
        .post(format!("{base}/api/webhook/email/mailgun"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Two servers on one keyspace: whichever accepts a signed Mailgun request first, the other
/// refuses it as a replay, also when both get it at once. With the log on Kafka the second is a
/// `--role ingress` replica beside the first (the cluster deployment); with the embedded log
/// it is a second `serve` with a data folder of its own (only the keyspace is shared).
async fn a_request_accepted_by_one_replica_is_refused_by_another(backend: Backend) {
    let h = backend.start(vec![TenantSpec::new("acme")]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = h.config.clone();
    cfg.data_dir = dir.path().join("data");
    if matches!(backend, Backend::Kafka) {
        cfg.role = Role::Ingress;
    }
    let second = app::start(cfg).await.expect("second server starts");
    let (one, two) = (h.base.clone(), format!("http://{}", second.addr));
    let http = reqwest::Client::new();
    let data = serde_json::from_slice::<Value>(&common::fixture("mailgun/delivered.json")).unwrap()
        ["event-data"]
        .clone();
    let body = |h: &Harness| h.mailgun_body("acme", &data, now_secs(), &token());
    let replayed = |(s, b): (u16, Value)| {
        assert_eq!(
            (s, b["error"].as_str()),
            (401, Some("replayed_token")),
            "{b}"
        );
    };

    let first = body(&h);
    let (s, b) = post(&http, &one, first.clone()).await;
    assert_eq!(s, 200, "{b}");
    replayed(post(&http, &two, first.clone()).await);
    replayed(post(&http, &one, first).await);

    let other = body(&h);
    let (s, b) = post(&http, &two, other.clone()).await;
    assert_eq!(s, 200, "{b}");
    replayed(post(&http, &one, other).await);

    for _ in 0..5 {
        let both = body(&h);
        let (x, y) = tokio::join!(
            post(&http, &one, both.clone()),
            post(&http, &two, both.clone())
        );
        let mut statuses = [x.0, y.0];
        statuses.sort();
        assert_eq!(statuses, [200, 401], "{x:?} {y:?}");
    }
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_a_request_accepted_by_one_replica_is_refused_by_another() {
    a_request_accepted_by_one_replica_is_refused_by_another(Backend::Cql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_request_accepted_by_one_replica_is_refused_by_another() {
    a_request_accepted_by_one_replica_is_refused_by_another(Backend::Kafka).await
}
