//! Mailgun and Mailjet end to end: documented payloads in over HTTP, rows out of the read API.

mod common;

use common::{fixture, now_secs, Backend, Harness, TenantSpec};
use serde_json::{json, Value};

const MAILGUN_EVENTS: &[&str] = &[
    "accepted",
    "delivered",
    "opened",
    "clicked",
    "unsubscribed",
    "complained",
    "failed_permanent",
    "failed_temporary",
    "rejected",
    "stored",
];

fn event_data(name: &str) -> Value {
    let v: Value = serde_json::from_slice(&fixture(&format!("mailgun/{name}.json"))).unwrap();
    v.get("event-data").cloned().unwrap_or(v)
}

fn token() -> String {
    format!("{:050x}", rand::random::<u128>())
}

async fn post_mailgun(h: &Harness, data: &Value) -> (u16, Value) {
    let body = h.mailgun_body("acme", data, now_secs(), &token());
    h.post_raw("/api/webhook/email/mailgun", "application/json", &[], body)
        .await
}

/// Every documented Mailgun event, attributed by user-variables, projects per the table.
async fn mailgun_documented_events_project_per_the_table(backend: Backend) {
    let h = backend.start(vec![TenantSpec::new("acme")]).await;
    let mut expected = Vec::new();
    for (i, name) in MAILGUN_EVENTS.iter().enumerate() {
        let mut data = event_data(name);
        // XSender's user-variables, so each documented event lands on its own dispatch.
        data["user-variables"] =
            json!({"xs_tenant": "acme", "xs_campaign": "mg", "xs_dispatch": format!("mg-{i}")});
        if data.get("recipient").is_none() {
            data["recipient"] = json!(format!("rejected{i}@example.com"));
        }
        let (s, b) = post_mailgun(&h, &data).await;
        assert_eq!(s, 200, "{name}: {b}");
        expected.push((format!("mg-{i}"), *name));
    }
    h.settle().await;
    let rows = common::by_dispatch(&h.recipients("acme", "mg").await);
    let status = |i: usize| {
        rows[&format!("d:mg-{i}")]["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let table = [
        ("accepted", "Sent"),
        ("delivered", "Delivered"),
        ("opened", "Delivered"),
        ("clicked", "Delivered"),
        ("unsubscribed", "Delivered"),
        ("complained", "Complained"),
        ("failed_permanent", "Bounced"),
        ("failed_temporary", "Deferred"),
    ];
    for (name, want) in table {
        let i = MAILGUN_EVENTS.iter().position(|n| *n == name).unwrap();
        assert_eq!(status(i), want, "{name}");
    }
    let opened = &rows[&format!(
        "d:mg-{}",
        MAILGUN_EVENTS.iter().position(|n| *n == "opened").unwrap()
    )];
    assert!(
        opened["opens"].as_u64().unwrap() + opened["machine_opens"].as_u64().unwrap() == 1,
        "{opened}"
    );
    let clicked = &rows[&format!(
        "d:mg-{}",
        MAILGUN_EVENTS.iter().position(|n| *n == "clicked").unwrap()
    )];
    assert!(
        clicked["last_click_url"].is_string() || clicked["bot_clicks"] == 1,
        "{clicked}"
    );
    // Suppressions: the permanent failure and the complaint and the unsubscribe; not the temporary one.
    let recipient = |name: &str| {
        event_data(name)["recipient"]
            .as_str()
            .unwrap()
            .to_lowercase()
    };
    for (name, reason) in [
        ("failed_permanent", "hard_bounce"),
        ("complained", "complaint"),
        ("unsubscribed", "unsubscribe"),
    ] {
        let (s, b) = h
            .get("acme", &format!("/api/v1/suppressions/{}", recipient(name)))
            .await;
        assert_eq!(s, 200, "{name}: {b}");
        assert!(
            b["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["reason"] == reason),
            "{name}: {b}"
        );
    }
    if recipient("failed_temporary") != recipient("failed_permanent") {
        assert_eq!(
            h.get(
                "acme",
                &format!("/api/v1/suppressions/{}", recipient("failed_temporary"))
            )
            .await
            .0,
            404
        );
    }
}

/// A replayed token, a stale timestamp and a wrong key each get 401 with a reason, over HTTP.
async fn mailgun_replays_stale_and_forged_requests_are_refused(backend: Backend) {
    let h = backend.start(vec![TenantSpec::new("acme")]).await;
    let data = event_data("delivered");
    let tok = token();
    let body = h.mailgun_body("acme", &data, now_secs(), &tok);
    let (s, _) = h
        .post_raw(
            "/api/webhook/email/mailgun",
            "application/json",
            &[],
            body.clone(),
        )
        .await;
    assert_eq!(s, 200);
    let before = h.envelope_count();
    let (s, b) = h
        .post_raw("/api/webhook/email/mailgun", "application/json", &[], body)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (401, Some("replayed_token")),
        "{b}"
    );
    let stale = h.mailgun_body("acme", &data, now_secs() - 3600, &token());
    let (s, b) = h
        .post_raw("/api/webhook/email/mailgun", "application/json", &[], stale)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (401, Some("stale_timestamp")),
        "{b}"
    );
    let mut forged: Value =
        serde_json::from_slice(&h.mailgun_body("acme", &data, now_secs(), &token())).unwrap();
    forged["signature"]["signature"] = json!(common::mailgun_signature(
        "not-the-key",
        forged["signature"]["timestamp"].as_str().unwrap(),
        forged["signature"]["token"].as_str().unwrap()
    ));
    let (s, b) = h
        .post_raw(
            "/api/webhook/email/mailgun",
            "application/json",
            &[],
            serde_json::to_vec(&forged).unwrap(),
        )
        .await;
    assert_eq!(s, 401, "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("signing key"),
        "{b}"
    );
    // Legacy form-encoded webhooks are told how to switch.
    let (s, b) = h
        .post_raw(
            "/api/webhook/email/mailgun",
            "application/x-www-form-urlencoded",
            &[],
            b"event=delivered".to_vec(),
        )
        .await;
    assert_eq!(s, 415, "{b}");
    assert_eq!(h.envelope_count(), before, "refusals wrote nothing");
}

/// The embedded replay guard holds `replay_cache_entries` live tokens: one more gets a 503
/// (Mailgun retries it) whose reason names the setting, and nothing of it is stored.
#[tokio::test]
async fn a_full_replay_cache_answers_503_naming_its_setting() {
    let h = Harness::embedded_with(vec![TenantSpec::new("acme")], |c| {
        c.replay_cache_entries = 2;
    })
    .await;
    let data = event_data("delivered");
    for _ in 0..2 {
        let (s, b) = post_mailgun(&h, &data).await;
        assert_eq!(s, 200, "{b}");
    }
    let before = h.envelope_count();
    let (s, b) = post_mailgun(&h, &data).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (503, Some("replay_guard_unavailable")),
        "{b}"
    );
    let m = b["message"].as_str().unwrap();
    assert!(m.contains("replay_cache_entries"), "{m}");
    assert_eq!(
        h.envelope_count(),
        before,
        "the refused request wrote nothing"
    );
}

/// Mailjet: credentials required; a grouped array of mixed events projects; a MessageID past
/// 2^53 survives to the API digit for digit.
async fn mailjet_grouped_events_project_and_big_ids_survive(backend: Backend) {
    let h = backend.start(vec![TenantSpec::new("acme")]).await;
    let (api_key, _, _) = h.tenant("acme").mailjet.clone().unwrap();
    let payload = |d: &str| {
        json!({"xs_tenant": "acme", "xs_campaign": "mj", "xs_dispatch": d, "mj_api_key": api_key})
            .to_string()
    };
    // Built by hand so the ids stay JSON integers with more than 15 significant digits.
    let body = format!(
        r#"[{{"event":"sent","time":1433333949,"MessageID":19421777835146490,"Message_GUID":"g1","email":"ann@example.com","mj_campaign_id":7257,"mj_contact_id":4,"customcampaign":"","CustomID":"","Payload":{p1},"smtp_reply":"sent (250 2.0.0 OK)"}},
{{"event":"open","time":1433334001,"MessageID":19421777835146490,"Message_GUID":"g1","email":"ann@example.com","mj_campaign_id":7257,"mj_contact_id":4,"customcampaign":"","CustomID":"","Payload":{p1},"ip":"127.0.0.1","geo":"US","agent":"Mozilla/5.0"}},
{{"event":"click","time":1433334100,"MessageID":19421777835146490,"Message_GUID":"g1","email":"ann@example.com","mj_campaign_id":7257,"mj_contact_id":4,"customcampaign":"","CustomID":"","Payload":{p1},"url":"https://mailjet.com","ip":"127.0.0.1","geo":"US","agent":"Mozilla/5.0"}},
{{"event":"bounce","time":1430812195,"MessageID":1152921521845838572,"Message_GUID":"g2","email":"bad@example.com","mj_campaign_id":0,"mj_contact_id":0,"customcampaign":"","CustomID":"","Payload":{p2},"blocked":false,"hard_bounce":true,"error_related_to":"recipient","error":"user unknown","comment":"Host or domain name not found."}},
{{"event":"spam","time":1430812195,"MessageID":13792286917004336,"Message_GUID":"g3","email":"cross@example.com","mj_campaign_id":1,"mj_contact_id":2,"customcampaign":"","CustomID":"","Payload":{p3},"source":"JMRPP"}},
{{"event":"unsub","time":1433334941,"MessageID":20547674933128000,"Message_GUID":"g4","email":"leave@example.com","mj_campaign_id":1,"mj_contact_id":2,"customcampaign":"","CustomID":"","Payload":{p4},"mj_list_id":1,"ip":"127.0.0.1","geo":"FR","agent":"Mozilla/5.0"}},
{{"event":"blocked","time":1430812195,"MessageID":13792286917004337,"Message_GUID":"g5","email":"blk@example.com","mj_campaign_id":1,"mj_contact_id":2,"customcampaign":"","CustomID":"","Payload":{p5},"error_related_to":"recipient","error":"user unknown"}}]"#,
        p1 = Value::from(payload("j-1")),
        p2 = Value::from(payload("j-2")),
        p3 = Value::from(payload("j-3")),
        p4 = Value::from(payload("j-4")),
        p5 = Value::from(payload("j-5")),
    );
    // Without credentials, or with wrong ones: refused, nothing written.
    let (s, b) = h
        .post_raw(
            "/api/webhook/email/mailjet",
            "application/json",
            &[],
            body.clone().into_bytes(),
        )
        .await;
    assert_eq!(s, 401, "{b}");
    let wrong = (
        "authorization",
        format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "mj-acme:wrong")
        ),
    );
    assert_eq!(
        h.post_raw(
            "/api/webhook/email/mailjet",
            "application/json",
            &[wrong],
            body.clone().into_bytes()
        )
        .await
        .0,
        401
    );
    assert_eq!(h.envelope_count(), 0);

    let (s, b) = h
        .post_raw(
            "/api/webhook/email/mailjet",
            "application/json",
            &[h.mailjet_auth("acme")],
            body.into_bytes(),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    h.settle().await;
    let rows = common::by_dispatch(&h.recipients("acme", "mj").await);
    let st = |d: &str| {
        rows[&format!("d:{d}")]["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (st("j-1"), st("j-2"), st("j-3"), st("j-4"), st("j-5")),
        (
            "Delivered".into(),
            "Bounced".into(),
            "Complained".into(),
            "Delivered".into(),
            "Dropped".into()
        )
    );
    assert_eq!(rows["d:j-1"]["opens"], 1);
    assert_eq!(rows["d:j-1"]["last_click_url"], "https://mailjet.com");
    assert_eq!(
        rows["d:j-1"]["message_id"], "19421777835146490",
        "17-digit MessageID exact"
    );
    assert_eq!(
        rows["d:j-2"]["message_id"], "1152921521845838572",
        "19-digit MessageID exact"
    );
    for (email, reason) in [
        ("bad@example.com", "hard_bounce"),
        ("cross@example.com", "complaint"),
        ("leave@example.com", "unsubscribe"),
    ] {
        let (s, b) = h
            .get("acme", &format!("/api/v1/suppressions/{email}"))
            .await;
        assert_eq!(s, 200, "{email}: {b}");
        assert_eq!(b["reasons"][0]["reason"], reason);
    }
    let (_, ev) = h
        .get("acme", "/api/v1/events?message_id=1152921521845838572")
        .await;
    assert_eq!(ev["items"].as_array().unwrap().len(), 1, "{ev}");
}

backend_tests!(
    mailgun_documented_events_project_per_the_table,
    mailgun_replays_stale_and_forged_requests_are_refused,
    mailjet_grouped_events_project_and_big_ids_survive,
);
