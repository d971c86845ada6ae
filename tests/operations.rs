//! What operators rely on: exact metrics after a mixed run, and a graceful SIGTERM under load,
//! on every backend.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{fixture, now_secs, spawn_server, wait_until, Backend, SendGridSigner, TenantSpec};

/// Parses the OpenMetrics text into `name{labels} -> value`.
fn scrape(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

backend_tests!(
    metrics_count_a_mixed_run_exactly,
    sigterm_under_load_answers_everything_and_loses_nothing,
    readiness_turns_false_before_the_listener_closes,
);

async fn metrics_count_a_mixed_run_exactly(backend: Backend) {
    let h = backend.start(vec![TenantSpec::new("acme")]).await;
    let url = |p: &str| format!("{}{}", h.base, p);
    // SendGrid: one accepted batch of 17 items (16 events + 1 broken), one forged, one malformed,
    // one of the wrong media type.
    assert_eq!(
        h.post_sendgrid("acme", &fixture("sendgrid/campaign_batch.json"))
            .await
            .0,
        200
    );
    let forger = SendGridSigner::random();
    assert_eq!(
        h.post_sendgrid_signed("/api/webhook/email/sendgrid", &forger, now_secs(), b"[]")
            .await
            .0,
        401
    );
    assert_eq!(h.post_sendgrid("acme", b"[{").await.0, 400);
    let r = h
        .http
        .post(url("/api/webhook/email/sendgrid"))
        .header("content-type", "text/csv")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // An unknown provider; a Mailgun event and its replay.
    let r = h
        .http
        .post(url("/api/webhook/email/nope"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let data: serde_json::Value =
        serde_json::from_slice(&fixture("mailgun/delivered.json")).unwrap();
    let body = h.mailgun_body(
        "acme",
        &data["event-data"],
        now_secs(),
        "tok-0123456789abcdef0123456789abcdef0123456789abcd",
    );
    assert_eq!(
        h.post_raw(
            "/api/webhook/email/mailgun",
            "application/json",
            &[],
            body.clone()
        )
        .await
        .0,
        200
    );
    assert_eq!(
        h.post_raw("/api/webhook/email/mailgun", "application/json", &[], body)
            .await
            .0,
        401
    );
    h.settle().await;

    let r = h.http.get(url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let m = scrape(&r.text().await.unwrap());
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("missing {k} in {m:#?}"));
    for (outcome, n) in [
        ("accepted", 1.0),
        ("bad_signature", 1.0),
        ("malformed", 1.0),
        ("unsupported_media_type", 1.0),
    ] {
        assert_eq!(
            get(&format!(
                "xsender_webhook_requests_total{{provider=\"sendgrid\",outcome=\"{outcome}\"}}"
            )),
            n,
            "{outcome}"
        );
    }
    assert_eq!(
        get("xsender_webhook_requests_total{provider=\"unknown\",outcome=\"unknown_provider\"}"),
        1.0
    );
    assert_eq!(
        get("xsender_webhook_requests_total{provider=\"mailgun\",outcome=\"accepted\"}"),
        1.0
    );
    assert_eq!(
        get("xsender_webhook_requests_total{provider=\"mailgun\",outcome=\"replayed_token\"}"),
        1.0
    );
    assert_eq!(
        get("xsender_webhook_request_bytes_total{provider=\"sendgrid\",outcome=\"accepted\"}"),
        fixture("sendgrid/campaign_batch.json").len() as f64
    );
    let kinds = [
        ("sent", 2.0),
        ("delivered", 4.0),
        ("opened", 2.0),
        ("clicked", 1.0),
        ("bounced", 2.0),
        ("complained", 1.0),
        ("unsubscribed", 1.0),
        ("deferred", 1.0),
        ("group_unsubscribed", 1.0),
        ("dropped", 1.0),
    ];
    for (kind, n) in kinds {
        assert_eq!(
            get(&format!(
                "xsender_events_total{{provider=\"sendgrid\",kind=\"{kind}\"}}"
            )),
            n,
            "{kind}"
        );
    }
    assert_eq!(
        get("xsender_events_total{provider=\"mailgun\",kind=\"delivered\"}"),
        1.0
    );
    assert_eq!(
        get("xsender_dead_letters_total{provider=\"sendgrid\",reason=\"missing_field\"}"),
        1.0
    );
    assert_eq!(
        get("xsender_log_append_seconds_count"),
        2.0,
        "one durable append per accepted request"
    );
    for stage in ["normalizer", "projector"] {
        // Every partition of the stage's input has been caught up with.
        let prefix = format!("xsender_stage_lag_records{{stage=\"{stage}\",");
        let lags: Vec<f64> = m
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| *v)
            .collect();
        assert!(
            !lags.is_empty() && lags.iter().all(|l| *l == 0.0),
            "{stage}: {lags:?}"
        );
        if matches!(backend, Backend::Kafka) {
            // The log's offsets and ages below are the embedded log's (one partition, a
            // sequence per record); Kafka has its own per-partition offsets.
            continue;
        }
        assert_eq!(
            get(&format!(
                "xsender_stage_lag_records{{stage=\"{stage}\",partition=\"0\"}}"
            )),
            0.0
        );
        assert_eq!(
            get(&format!(
                "xsender_stage_lag_seconds{{stage=\"{stage}\",partition=\"0\"}}"
            )),
            0.0
        );
    }
    if !matches!(backend, Backend::Kafka) {
        assert_eq!(get("xsender_events_log_head"), 17.0);
        assert_eq!(
            get("xsender_projection_generation_checkpoint{generation=\"1\",partition=\"0\"}"),
            17.0
        );
    }
    // /metrics is not rate limited and needs no token.
    for _ in 0..5 {
        assert_eq!(
            h.http.get(url("/metrics")).send().await.unwrap().status(),
            200
        );
    }
}

async fn sigterm_under_load_answers_everything_and_loses_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SendGridSigner::random());
    let token = "term-test-token-0123456789";
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(&tenants, format!("[tenants.acme]\napi_token = \"{token}\"\n[tenants.acme.sendgrid]\nverification_key = \"{}\"\n", signer.verification_key())).unwrap();
    let args = backend.serve_args(&tenants).await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut child, base) = spawn_server(dir.path(), &args).await;

    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let unanswered = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (base, signer, accepted, unanswered) = (
            base.clone(),
            signer.clone(),
            accepted.clone(),
            unanswered.clone(),
        );
        workers.push(tokio::spawn(async move {
            // A new connection per request: a request either is refused a connection (the
            // server stopped listening) or gets an answer.
            let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
            for i in 0..2000 {
                let id = format!("t-{w}-{i}");
                let body = format!(r#"[{{"email":"{id}@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"{id}.filter","xs_campaign":"term","xs_dispatch":"{id}"}}]"#);
                let r = common::send_sendgrid(&http, &base, &signer, body).await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Ok(r) => assert_eq!(r.status(), 503, "only 200 or 503 during shutdown"),
                    Err(e) if e.is_connect() => return,
                    Err(e) => unanswered.lock().unwrap().push(format!("{id}: {e}")),
                }
            }
        }));
    }
    wait_until(Duration::from_secs(60), || async {
        accepted.lock().unwrap().len() >= 200
    })
    .await;
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let t = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within the bound")
        .unwrap();
    assert!(status.success(), "{status:?}");
    eprintln!("exited {:?} after SIGTERM", t.elapsed());
    for w in workers {
        w.await.unwrap();
    }
    assert!(
        unanswered.lock().unwrap().is_empty(),
        "requests without an answer: {:?}",
        unanswered.lock().unwrap()
    );
    let accepted = accepted.lock().unwrap().clone();

    let (_child, base) = spawn_server(dir.path(), &args).await;
    let http = reqwest::Client::new();
    for id in &accepted {
        let url = format!("{base}/api/v1/dispatches/{id}");
        wait_until(Duration::from_secs(30), || async {
            let r = http.get(&url).bearer_auth(token).send().await.unwrap();
            r.status() == 200 && r.json::<serde_json::Value>().await.unwrap()["events"] == 1
        })
        .await;
    }
    eprintln!(
        "{} accepted before and during SIGTERM; all projected once",
        accepted.len()
    );
}

async fn readiness_turns_false_before_the_listener_closes(backend: Backend) {
    let mut h = backend
        .start_with(vec![TenantSpec::new("acme")], |c| {
            c.readiness_drain_secs = 2
        })
        .await;
    assert_eq!(
        h.http
            .get(format!("{}/readyz", h.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let running = h.running.take().unwrap();
    let stopping = tokio::spawn(running.stop());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    wait_until(Duration::from_secs(5), || async {
        http.get(format!("{}/readyz", h.base))
            .send()
            .await
            .map(|r| r.status() == 503)
            .unwrap_or(false)
    })
    .await;
    // Not ready, but still serving webhooks while load balancers catch up.
    assert_eq!(h.post_sendgrid("acme", b"[]").await.0, 200);
    stopping.await.unwrap();
    assert!(
        http.get(format!("{}/healthz", h.base))
            .send()
            .await
            .is_err(),
        "listener closed after the drain"
    );
}
