//! End-to-end behaviour of the pipeline: signed webhooks in, projections out through the read
//! API. Each scenario runs once per backend (see `backend_tests!`).

mod common;

use std::collections::BTreeMap;

use common::{by_dispatch, fixture, reorder_batch, Backend, Harness, TenantSpec};
use serde_json::{json, Value};

fn acme() -> Vec<TenantSpec> {
    vec![TenantSpec::new("acme")]
}

async fn rows(h: &Harness) -> BTreeMap<String, Value> {
    by_dispatch(&h.recipients("acme", "camp-1").await)
}

/// The published table, on a realistic signed batch.
async fn signed_batch_projects_the_published_effects(backend: Backend) {
    let h = backend.start(acme()).await;
    let (status, body) = h
        .post_sendgrid("acme", &fixture("sendgrid/campaign_batch.json"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"], 17);
    h.settle().await;
    let r = rows(&h).await;
    assert_eq!(r.len(), 7, "{r:#?}");

    let alice = &r["d:d-1"];
    assert_eq!(alice["status"], "Delivered");
    assert_eq!(alice["email"], "alice@example.com");
    assert_eq!(alice["delivered_at"], "2025-12-03T08:20:03.000Z");
    assert_eq!(
        alice["opened_at"], "2025-12-03T08:22:00.000Z",
        "the human open, not the machine one"
    );
    assert_eq!(alice["clicked_at"], "2025-12-03T08:22:10.000Z");
    assert_eq!(
        (
            alice["opens"].as_u64(),
            alice["machine_opens"].as_u64(),
            alice["clicks"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(
        alice["last_click_url"],
        "https://shop.example.com/sale?utm=1"
    );

    let bob = &r["d:d-2"];
    assert_eq!(bob["status"], "Bounced");
    assert_eq!(bob["email"], "bob@example.com", "addresses are lower-cased");
    assert_eq!(bob["bounce"]["class"], "hard");
    assert!(bob["bounce_reason"]
        .as_str()
        .unwrap()
        .starts_with("550 5.1.1"));

    assert_eq!(r["d:d-3"]["status"], "Complained");
    assert_eq!(r["d:d-4"]["status"], "Delivered");
    assert_eq!(
        r["d:d-5"]["status"], "SoftBounced",
        "blocked is a soft bounce"
    );
    assert_eq!(r["d:d-6"]["status"], "Dropped");
    assert_eq!(r["d:d-6"]["drop_reason"], "Bounced Address");
    assert_eq!(
        r["d:d-7"]["status"], "Delivered",
        "a group unsubscribe proves delivery"
    );

    // Suppressions: hard bounce, complaint, unsubscribe; never the soft bounce or the deferral.
    for (email, reason) in [
        ("bob@example.com", "hard_bounce"),
        ("carol@example.com", "complaint"),
        ("dave@example.com", "unsubscribe"),
    ] {
        let (s, b) = h
            .get("acme", &format!("/api/v1/suppressions/{email}"))
            .await;
        assert_eq!(s, 200, "{email}: {b}");
        assert_eq!(b["reasons"][0]["reason"], reason);
    }
    for email in ["erin@example.com", "alice@example.com", "frank@example.com"] {
        let (s, _) = h
            .get("acme", &format!("/api/v1/suppressions/{email}"))
            .await;
        assert_eq!(s, 404, "{email} must not be suppressed");
    }
    let (_, list) = h.get("acme", "/api/v1/suppressions?limit=2").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let (_, rest) = h
        .get(
            "acme",
            &format!(
                "/api/v1/suppressions?limit=2&cursor={}",
                list["next_cursor"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);

    // Contacts: dave unsubscribed; erin left group 10 only.
    let (_, dave) = h.get("acme", "/api/v1/contacts/dave@example.com").await;
    assert_eq!(dave["unsubscribed"], true);
    let (_, erin) = h.get("acme", "/api/v1/contacts/erin%40example.com").await;
    assert_eq!(erin["unsubscribed"], false);
    assert_eq!(
        erin["groups"],
        json!([{"group_id": "10", "unsubscribed": true, "changed_at": "2025-12-03T08:31:40.000Z"}])
    );

    // The other application's event is kept, unattributed, under its message id + recipient.
    let (s, grace) = h
        .get("acme", "/api/v1/dispatches/m:ZzOther007:grace@example.com")
        .await;
    assert_eq!(s, 200, "{grace}");
    assert_eq!(grace["status"], "Delivered");
    assert_eq!(grace["campaign_id"], Value::Null);

    // Dispatch by id, and the normalized events of a recipient.
    let (s, d1) = h.get("acme", "/api/v1/dispatches/d-1").await;
    assert_eq!((s, &d1["events"]), (200, &json!(5)));
    let (_, ev) = h
        .get("acme", "/api/v1/events?recipient=alice@example.com")
        .await;
    let kinds: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sent", "delivered", "opened", "opened", "clicked"]);
    let (_, ev) = h
        .get(
            "acme",
            "/api/v1/events?message_id=AbCdEf002&since=2025-12-03T08:20:02Z",
        )
        .await;
    assert_eq!(ev["items"].as_array().unwrap().len(), 1, "{ev}");

    // The broken item is dead-lettered with its reason; the rest of the batch went through.
    let (s, dl) = h
        .admin(reqwest::Method::GET, "/api/admin/dead-letters", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(dl["items"].as_array().unwrap().len(), 1, "{dl}");
    assert_eq!(dl["items"][0]["reason"], "missing_field");
    assert_eq!(
        dl["counts"],
        json!([{"provider": "sendgrid", "reason": "missing_field", "count": 1}])
    );
}

/// Retries and reordering change nothing.
async fn duplicates_and_reordering_give_the_same_rows(backend: Backend) {
    let batch = fixture("sendgrid/campaign_batch.json");
    let h = backend.start(acme()).await;
    assert_eq!(h.post_sendgrid("acme", &batch).await.0, 200);
    h.settle().await;
    let first = rows(&h).await;
    assert_eq!(
        h.post_sendgrid("acme", &batch).await.0,
        200,
        "a retry is accepted"
    );
    h.settle().await;
    assert_eq!(
        rows(&h).await,
        first,
        "the same batch posted again changes nothing"
    );

    let h2 = backend.start(acme()).await;
    let reversed = reorder_batch(&batch, |v| v.reverse());
    assert_ne!(reversed, batch);
    assert_eq!(h2.post_sendgrid("acme", &reversed).await.0, 200);
    // And one more time, split into single-event requests in a scrambled order.
    let items: Vec<Box<serde_json::value::RawValue>> = serde_json::from_slice(&batch).unwrap();
    for i in [3, 0, 16, 8, 1, 12, 5, 9, 2, 14, 6, 11, 4, 15, 10, 7, 13] {
        let one = format!("[{}]\r\n", items[i].get());
        assert_eq!(h2.post_sendgrid("acme", one.as_bytes()).await.0, 200);
    }
    h2.settle().await;
    assert_eq!(
        rows(&h2).await,
        first,
        "reverse order and scattered retries give the same rows"
    );
}

/// Every refusal says why, and writes nothing.
async fn rejections_are_explained_and_write_nothing(backend: Backend) {
    let h = backend
        .start(vec![
            TenantSpec::new("acme"),
            TenantSpec::without_key("nokey"),
        ])
        .await;
    let batch = fixture("sendgrid/campaign_batch.json");
    let signer = h.tenant("acme").signer.as_ref().unwrap();
    let now = common::now_secs();
    let url = |p: &str| format!("{}{}", h.base, p);

    // Bad signature: signed by another key.
    let other = common::SendGridSigner::random();
    let (s, b) = h
        .post_sendgrid_signed("/api/webhook/email/sendgrid", &other, now, &batch)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (401, Some("bad_signature")),
        "{b}"
    );
    assert!(b["message"].as_str().unwrap().contains("does not verify"));
    // One flipped byte in the body.
    let ts = now.to_string();
    let sig = signer.sign(&ts, &batch);
    let mut tampered = batch.clone();
    let pos = tampered.iter().position(|b| *b == b'5').unwrap();
    tampered[pos] = b'6';
    let r = h
        .http
        .post(url("/api/webhook/email/sendgrid"))
        .header("content-type", "application/json")
        .header("x-twilio-email-event-webhook-timestamp", &ts)
        .header("x-twilio-email-event-webhook-signature", &sig)
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Stale timestamp (a replay of a genuinely signed request).
    let (s, b) = h
        .post_sendgrid_signed("/api/webhook/email/sendgrid", signer, now - 3600, &batch)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (401, Some("stale_timestamp")),
        "{b}"
    );
    // A tenant without a key, addressed directly: fail closed.
    let (s, b) = h
        .post_sendgrid_signed("/api/webhook/email/sendgrid/nokey", signer, now, &batch)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (401, Some("no_credentials")),
        "{b}"
    );
    assert!(b["message"].as_str().unwrap().contains("nokey"));
    // The right key but the wrong tenant's URL.
    let (s, _) = h
        .post_sendgrid_signed("/api/webhook/email/sendgrid/unknown", signer, now, &batch)
        .await;
    assert_eq!(s, 404);
    // Missing signature headers.
    let r = h
        .http
        .post(url("/api/webhook/email/sendgrid"))
        .header("content-type", "application/json")
        .body(batch.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("Signed Event Webhook"));
    // Malformed JSON → 400; wrong method → 405; wrong media type → 415; too large → 413.
    let (s, b) = h
        .post_sendgrid_signed("/api/webhook/email/sendgrid", signer, now, b"[{\"event\":")
        .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("malformed")), "{b}");
    let (s, _) = h
        .post_sendgrid_signed(
            "/api/webhook/email/sendgrid",
            signer,
            now,
            b"\"just a string\"",
        )
        .await;
    assert_eq!(s, 400);
    let r = h
        .http
        .get(url("/api/webhook/email/sendgrid"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = h
        .http
        .post(url("/api/webhook/email/sendgrid"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert!(r.text().await.unwrap().contains("application/json"));
    // Declared too large: refused before reading the body.
    let head = "POST /api/webhook/email/sendgrid HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 17000000\r\n\r\n";
    assert!(common::raw_http(&h.base, head.as_bytes())
        .await
        .starts_with("HTTP/1.1 413"));
    // Chunked, no length: cut off when the limit is crossed.
    let mut chunked = b"POST /api/webhook/email/sendgrid HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..17 {
        chunked.extend_from_slice(b"100000\r\n");
        chunked.extend(std::iter::repeat_n(b' ', 0x100000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert!(common::raw_http(&h.base, &chunked)
        .await
        .starts_with("HTTP/1.1 413"));
    // Unknown provider.
    let r = h
        .http
        .post(url("/api/webhook/email/postmarkk"))
        .header("content-type", "application/json")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("unknown provider"));

    assert_eq!(h.envelope_count(), 0, "no rejected request wrote anything");
}

/// One tenant can never write or read another's rows.
async fn tenants_are_isolated(backend: Backend) {
    let h = backend
        .start(vec![TenantSpec::new("acme"), TenantSpec::new("globex")])
        .await;
    // acme's signed batch claims one event for globex.
    let body = br#"[{"email":"x@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"Q1.filter","xs_tenant":"globex","xs_campaign":"camp-1","xs_dispatch":"g-1"},
{"email":"y@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"Q2.filter","xs_tenant":"acme","xs_campaign":"camp-1","xs_dispatch":"a-1"}]
"#;
    assert_eq!(h.post_sendgrid("acme", body).await.0, 200);
    h.settle().await;
    assert_eq!(
        h.recipients("globex", "camp-1").await.len(),
        0,
        "nothing written for globex"
    );
    let acme_rows = h.recipients("acme", "camp-1").await;
    assert_eq!(acme_rows.len(), 1);
    assert_eq!(acme_rows[0]["dispatch_id"], "a-1");
    let (_, dl) = h
        .admin(reqwest::Method::GET, "/api/admin/dead-letters", None)
        .await;
    assert_eq!(dl["items"][0]["reason"], "tenant_not_verified", "{dl}");
    // globex's token cannot read acme's dispatch.
    assert_eq!(h.get("globex", "/api/v1/dispatches/a-1").await.0, 404);
    assert_eq!(h.get("acme", "/api/v1/dispatches/a-1").await.0, 200);
    // No token, or a wrong one: 401.
    let r = h
        .http
        .get(format!("{}/api/v1/dispatches/a-1", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .http
        .get(format!("{}/api/v1/dispatches/a-1", h.base))
        .bearer_auth("nope-nope-nope-nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Tenants sharing one SendGrid account (one key): `xs_tenant` attributes each event; events
/// that name no tenant cannot be attributed and are dead-lettered, not guessed.
async fn shared_account_attributes_by_metadata(backend: Backend) {
    let shared = common::SendGridSigner::random();
    let key = shared.verification_key();
    let h = backend
        .start(vec![TenantSpec::new("acme"), TenantSpec::new("globex")])
        .await;
    for id in ["acme", "globex"] {
        let token = h.tenant(id).api_token.clone();
        let (s, b) = h
            .admin(
                reqwest::Method::PUT,
                &format!("/api/admin/tenants/{id}"),
                Some(json!({"api_token": token, "sendgrid": {"verification_key": key}})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let body = br#"[{"email":"x@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"Q1.filter","xs_tenant":"globex","xs_campaign":"c","xs_dispatch":"g-1"},
{"email":"y@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"Q2.filter","xs_tenant":"acme","xs_campaign":"c","xs_dispatch":"a-1"},
{"email":"z@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"Q3.filter"}]
"#;
    let (s, b) = h
        .post_sendgrid_signed(
            "/api/webhook/email/sendgrid",
            &shared,
            common::now_secs(),
            body,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    h.settle().await;
    assert_eq!(h.recipients("globex", "c").await[0]["dispatch_id"], "g-1");
    assert_eq!(h.recipients("acme", "c").await[0]["dispatch_id"], "a-1");
    let (_, dl) = h
        .admin(reqwest::Method::GET, "/api/admin/dead-letters", None)
        .await;
    assert_eq!(dl["items"][0]["reason"], "unattributable", "{dl}");
    // With the per-tenant URL the same unnamed event is attributed to that tenant.
    let (s, _) = h
        .post_sendgrid_signed(
            "/api/webhook/email/sendgrid/globex",
            &shared,
            common::now_secs(),
            body,
        )
        .await;
    assert_eq!(s, 200);
    h.settle().await;
    assert_eq!(
        h.get("globex", "/api/v1/dispatches/m:Q3:z@example.com")
            .await
            .0,
        200
    );
}

/// Tenants managed at run time; secrets never come back out; changes persist.
async fn admin_api_manages_tenants_without_leaking_secrets(backend: Backend) {
    let mut h = backend.start(vec![]).await;
    let signer = common::SendGridSigner::random();
    let key = signer.verification_key();
    // Without tenants, webhooks fail closed.
    let (s, b) = h
        .post_sendgrid_signed(
            "/api/webhook/email/sendgrid",
            &signer,
            common::now_secs(),
            b"[]",
        )
        .await;
    assert_eq!(s, 401, "{b}");
    assert!(b["message"]
        .as_str()
        .unwrap()
        .contains("no tenant has a SendGrid verification key"));
    // Bad admin token; bad credentials are refused with a reason.
    let r = h
        .http
        .get(format!("{}/api/admin/tenants", h.base))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (s, b) = h
        .admin(
            reqwest::Method::PUT,
            "/api/admin/tenants/acme",
            Some(json!({"sendgrid": {"verification_key": "bm9wZQ=="}})),
        )
        .await;
    assert_eq!(s, 422, "{b}");
    assert!(b["message"].as_str().unwrap().contains("P-256"), "{b}");
    let (s, b) = h
        .admin(
            reqwest::Method::PUT,
            "/api/admin/tenants/acme",
            Some(json!({"sendgird": {}})),
        )
        .await;
    assert_eq!(s, 422);
    assert!(b["message"].as_str().unwrap().contains("sendgird"));
    // Create, then use.
    let token = "acme-read-token-0123456789";
    let (s, b) = h
        .admin(
            reqwest::Method::PUT,
            "/api/admin/tenants/acme",
            Some(json!({"api_token": token, "sendgrid": {"verification_key": key}})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(
        b,
        json!({"id": "acme", "providers": ["sendgrid"], "has_api_token": true})
    );
    let (_, list) = h
        .admin(reqwest::Method::GET, "/api/admin/tenants", None)
        .await;
    let text = list.to_string();
    assert!(
        !text.contains(&key) && !text.contains(token),
        "secrets leaked: {text}"
    );
    let body = br#"[{"email":"a@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"M1.filter","xs_campaign":"c","xs_dispatch":"d"}]"#;
    assert_eq!(
        h.post_sendgrid_signed(
            "/api/webhook/email/sendgrid",
            &signer,
            common::now_secs(),
            body
        )
        .await
        .0,
        200
    );
    // Persisted: a restart with the same stores (and no tenants file) keeps the tenant.
    h.stop().await;
    let mut cfg = h.config.clone();
    cfg.tenants_file = None;
    h.running = Some(xsender_events::app::start(cfg).await.unwrap());
    h.base = format!("http://{}", h.running.as_ref().unwrap().addr);
    assert_eq!(
        h.post_sendgrid_signed(
            "/api/webhook/email/sendgrid",
            &signer,
            common::now_secs(),
            body
        )
        .await
        .0,
        200
    );
    h.settle().await;
    let r = h
        .http
        .get(format!("{}/api/v1/dispatches/d", h.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Deleted: its webhooks fail closed again.
    assert_eq!(
        h.admin(reqwest::Method::DELETE, "/api/admin/tenants/acme", None)
            .await
            .0,
        200
    );
    assert_eq!(
        h.post_sendgrid_signed(
            "/api/webhook/email/sendgrid",
            &signer,
            common::now_secs(),
            body
        )
        .await
        .0,
        401
    );
}

/// The read API is rate limited per client; webhooks never are.
async fn read_api_is_rate_limited_and_webhooks_are_not(backend: Backend) {
    let h = backend
        .start_with(acme(), |c| {
            c.rate_limit_per_second = 1;
            c.rate_limit_burst = 3;
        })
        .await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = h
            .http
            .get(format!("{}/api/v1/dispatches/x", h.base))
            .bearer_auth(&h.tenant("acme").api_token)
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
        }
        codes.push(r.status().as_u16());
    }
    assert!(codes.contains(&429), "{codes:?}");
    for i in 0..30 {
        let body = format!(
            r#"[{{"email":"a{i}@example.com","timestamp":1764750000,"event":"delivered","xs_dispatch":"d{i}"}}]"#
        );
        assert_eq!(h.post_sendgrid("acme", body.as_bytes()).await.0, 200);
    }
    // Behind a trusted proxy, clients are told apart by X-Forwarded-For.
    let h2 = Harness::embedded_with(acme(), |c| {
        c.rate_limit_per_second = 1;
        c.rate_limit_burst = 2;
        c.trust_forwarded_for = true;
    })
    .await;
    let get = |ip: &'static str| {
        h2.http
            .get(format!("{}/api/v1/dispatches/x", h2.base))
            .bearer_auth(&h2.tenant("acme").api_token)
            .header("x-forwarded-for", ip)
            .send()
    };
    for _ in 0..2 {
        assert_eq!(get("203.0.113.1").await.unwrap().status(), 404);
    }
    assert_eq!(get("203.0.113.1").await.unwrap().status(), 429);
    assert_eq!(
        get("203.0.113.2, 10.0.0.1").await.unwrap().status(),
        404,
        "another client has its own bucket"
    );
    // Probes are not rate limited either.
    for _ in 0..10 {
        assert_eq!(
            h.http
                .get(format!("{}/healthz", h.base))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
}

/// A rebuild while the API serves gives identical rows and no failed read.
async fn rebuild_while_serving_gives_identical_rows(backend: Backend) {
    let h = backend.start(acme()).await;
    let batch = fixture("sendgrid/campaign_batch.json");
    assert_eq!(h.post_sendgrid("acme", &batch).await.0, 200);
    for i in 0..200 {
        let body = format!(
            r#"[{{"email":"bulk{i}@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"B{i}.filter","xs_campaign":"camp-1","xs_dispatch":"bulk-{i:03}"}},{{"email":"bulk{i}@example.com","timestamp":1764750100,"event":"open","sg_message_id":"B{i}.filter","xs_campaign":"camp-1","xs_dispatch":"bulk-{i:03}"}}]"#
        );
        assert_eq!(h.post_sendgrid("acme", body.as_bytes()).await.0, 200);
    }
    h.settle().await;
    let before = rows(&h).await;
    assert_eq!(before.len(), 207);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (http, base, token, stop) = (
            h.http.clone(),
            h.base.clone(),
            h.tenant("acme").api_token.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .get(format!(
                        "{base}/api/v1/campaigns/camp-1/recipients?limit=1000"
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "a read failed during the rebuild");
                let n = r.json::<Value>().await.unwrap()["items"]
                    .as_array()
                    .unwrap()
                    .len();
                assert_eq!(n, 207, "a read saw a partial projection");
                reads += 1;
            }
            reads
        })
    };
    let report = xsender_events::app::rebuild(
        &h.config,
        xsender_events::app::RebuildFrom::Start,
        true,
        false,
    )
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.await.unwrap();
    assert!(reads > 0);
    assert_eq!(report.generation, 2);
    assert_eq!(report.dropped, vec![1]);
    assert_eq!(rows(&h).await, before, "rebuilt rows are identical");
    // The live projector now writes the new generation.
    let body = br#"[{"email":"late@example.com","timestamp":1764750000,"event":"delivered","xs_campaign":"camp-1","xs_dispatch":"late"}]"#;
    assert_eq!(h.post_sendgrid("acme", body).await.0, 200);
    h.settle().await;
    assert_eq!(rows(&h).await.len(), 208);
    // The admin view: the embedded log's checkpoint as `checkpoint` and per partition.
    let (status, body) = h
        .admin(reqwest::Method::GET, "/api/admin/projections", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let gens = body["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 1, "{body}");
    assert_eq!(gens[0]["generation"], 2);
    assert_eq!(gens[0]["current"], true);
    // Per log partition (one on the embedded log, the topic's partitions on Kafka), adding up
    // to every event logged: 216 from the batch and the bulk, and the late one.
    let checkpoints = gens[0]["checkpoints"].as_object().unwrap();
    let total: i64 = checkpoints.values().map(|v| v.as_i64().unwrap()).sum();
    let written = h
        .running
        .as_ref()
        .unwrap()
        .state
        .lag
        .events_written()
        .await
        .unwrap();
    assert_eq!((total, written), (417, 417), "{body}");
    assert_eq!(
        gens[0]["checkpoint"],
        checkpoints.get("0").cloned().unwrap_or(json!(0)),
        "`checkpoint` is partition 0's"
    );
}

/// An event bigger than a typical broker's 1 MiB record limit (a click on a URL of 1.5 MiB,
/// within SendGrid's body limit) is projected like any other, and the pipeline goes on.
async fn an_event_of_megabytes_is_projected_and_the_pipeline_goes_on(backend: Backend) {
    let h = backend.start(acme()).await;
    let url = format!("https://example.com/?q={}", "x".repeat(1536 * 1024));
    let big = format!(
        r#"[{{"email":"big@example.com","timestamp":1764750090,"event":"click","url":"{url}","sg_message_id":"BIG.filter","xs_campaign":"camp-1","xs_dispatch":"big"}}]"#
    );
    let (status, body) = h.post_sendgrid("acme", big.as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let after = r#"[{"email":"next@example.com","timestamp":1764750100,"event":"delivered","sg_message_id":"NEXT.filter","xs_campaign":"camp-1","xs_dispatch":"next"}]"#;
    assert_eq!(h.post_sendgrid("acme", after.as_bytes()).await.0, 200);
    h.settle().await;
    let (status, row) = h.get("acme", "/api/v1/dispatches/big").await;
    assert_eq!(status, 200);
    assert_eq!(row["clicks"], 1);
    assert_eq!(
        row["last_click_url"].as_str().map(str::len),
        Some(url.len()),
        "the whole URL is kept"
    );
    let (status, row) = h.get("acme", "/api/v1/dispatches/next").await;
    assert_eq!((status, row["status"].as_str()), (200, Some("Delivered")));
    let (_, dead) = h
        .admin(reqwest::Method::GET, "/api/admin/dead-letters", None)
        .await;
    assert_eq!(dead["items"].as_array().map(Vec::len), Some(0), "{dead}");
}

backend_tests!(
    an_event_of_megabytes_is_projected_and_the_pipeline_goes_on,
    signed_batch_projects_the_published_effects,
    duplicates_and_reordering_give_the_same_rows,
    rejections_are_explained_and_write_nothing,
    tenants_are_isolated,
    shared_account_attributes_by_metadata,
    admin_api_manages_tenants_without_leaking_secrets,
    read_api_is_rate_limited_and_webhooks_are_not,
    rebuild_while_serving_gives_identical_rows,
);
