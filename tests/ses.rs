//! Amazon SES via SNS through the whole pipeline over HTTP: SNS-signed notifications carrying
//! SES's documented event records in, rows out. The certificate fetcher is a fake serving a
//! locally generated test certificate (real AWS-signed messages are verified in the adapter's
//! own tests); everything else is the production path.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use common::{fixture, Backend, Harness, TenantSpec};
use hyper::header::HeaderValue;
use rsa::pkcs8::DecodePrivateKey;
use serde_json::{json, Value};
use sha2::Digest;
use xsender_events::providers::ses::sns::{Envelope, FetchError, SnsHttp};
use xsender_events::providers::ses::Ses;
use xsender_events::providers::{registry, Provider};

const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:xsender-ses-events";
const CERT_URL: &str =
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-local-test-signer.pem";

/// Serves the local test certificate at `CERT_URL`; counts fetches; confirms nothing.
struct FakeSns {
    cert_fetches: AtomicUsize,
}

#[async_trait]
impl SnsHttp for FakeSns {
    async fn fetch_certificate(&self, url: &url::Url) -> Result<Vec<u8>, FetchError> {
        self.cert_fetches.fetch_add(1, Ordering::SeqCst);
        if url.as_str() == CERT_URL {
            Ok(fixture("ses/local_signer_cert.pem"))
        } else {
            Err(FetchError::Refused(format!("GET {url}: 404")))
        }
    }
    async fn confirm_subscription(&self, url: &url::Url) -> Result<String, FetchError> {
        Err(FetchError::Refused(format!("not in this test: {url}")))
    }
}

backend_tests!(ses_documented_events_project_per_the_table);

async fn start(backend: Backend, fake: Arc<FakeSns>) -> Harness {
    let mut acme = TenantSpec::new("acme");
    acme.ses_topics = vec![TOPIC.to_string()];
    backend
        .start_with_providers(vec![acme], move |settings| {
            registry(settings)
                .into_iter()
                .map(|p| {
                    if p.name() == "ses" {
                        Arc::new(Ses::with_http(fake.clone())) as Arc<dyn Provider>
                    } else {
                        p
                    }
                })
                .collect()
        })
        .await
}

/// An SNS Notification carrying `message`, signed (SignatureVersion 2) with the test key.
fn notification(message: &str, id: usize) -> Vec<u8> {
    let mut m = json!({
        "Type": "Notification",
        "MessageId": format!("00000000-0000-4000-8000-{id:012}"),
        "TopicArn": TOPIC,
        "Message": message,
        "Timestamp": "2026-12-03T10:00:00.000Z",
        "SignatureVersion": "2",
        "Signature": "AAAA",
        "SigningCertURL": CERT_URL,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    });
    let mut headers = hyper::HeaderMap::new();
    headers.insert(
        "x-amz-sns-message-type",
        HeaderValue::from_static("Notification"),
    );
    let env = Envelope::parse(m.to_string().as_bytes(), &headers).unwrap();
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(
        std::str::from_utf8(&fixture("ses/local_signer_key.pem")).unwrap(),
    )
    .unwrap();
    let digest = sha2::Sha256::digest(env.string_to_sign().as_bytes());
    let sig = key
        .sign(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &digest)
        .unwrap();
    m["Signature"] = Value::String(base64::engine::general_purpose::STANDARD.encode(sig));
    serde_json::to_vec(&m).unwrap()
}

async fn post(h: &Harness, body: Vec<u8>) -> (u16, Value) {
    h.post_raw(
        "/api/webhook/email/ses",
        "text/plain; charset=UTF-8",
        &[("x-amz-sns-message-type", "Notification".to_string())],
        body,
    )
    .await
}

/// Each documented SES event record, tagged for XSender, projects per the table; a
/// multi-recipient bounce suppresses exactly the bounced recipients.
async fn ses_documented_events_project_per_the_table(backend: Backend) {
    let fake = Arc::new(FakeSns {
        cert_fetches: AtomicUsize::new(0),
    });
    let h = start(backend, fake.clone()).await;
    let records: serde_json::Map<String, Value> =
        serde_json::from_slice(&fixture("ses/ses_event_publishing.json")).unwrap();
    let table = [
        ("Send", "Sent"),
        ("Delivery", "Delivered"),
        ("Bounce", "Bounced"),
        ("Complaint", "Complained"),
        ("Open", "Delivered"),
        ("Click", "Delivered"),
        ("Reject", "Dropped"),
        ("DeliveryDelay", "Deferred"),
    ];
    for (i, (event_type, _)) in table.iter().enumerate() {
        let mut rec = records[*event_type].clone();
        rec["mail"]["tags"]["xs_tenant"] = json!(["acme"]);
        rec["mail"]["tags"]["xs_campaign"] = json!(["ses"]);
        rec["mail"]["tags"]["xs_dispatch"] = json!([format!("s-{i}")]);
        let (s, b) = post(&h, notification(&rec.to_string(), i)).await;
        assert_eq!(s, 200, "{event_type}: {b}");
    }
    // A bounce of a message sent to three recipients, two of whom bounced permanently.
    let mut bounce = records["Bounce"].clone();
    bounce["mail"]["destination"] =
        json!(["one@example.com", "two@example.com", "three@example.com"]);
    bounce["bounce"]["bouncedRecipients"] = json!([
        {"emailAddress": "one@example.com", "action": "failed", "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"},
        {"emailAddress": "two@example.com", "action": "failed", "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"}
    ]);
    bounce["mail"]["messageId"] = json!("multi-recipient-message");
    assert_eq!(post(&h, notification(&bounce.to_string(), 99)).await.0, 200);
    // One altered byte: refused, nothing written.
    let before = h.envelope_count();
    let mut tampered = notification(&records["Delivery"].to_string(), 7);
    let pos = tampered
        .windows(9)
        .position(|w| w == b"Delivery\\")
        .unwrap_or(40);
    tampered[pos] ^= 0x20;
    let (s, b) = post(&h, tampered).await;
    assert_eq!(s, 401, "{b}");
    assert_eq!(h.envelope_count(), before);
    h.settle().await;

    let rows = common::by_dispatch(&h.recipients("acme", "ses").await);
    for (i, (event_type, want)) in table.iter().enumerate() {
        assert_eq!(rows[&format!("d:s-{i}")]["status"], *want, "{event_type}");
    }
    let click = &rows["d:s-5"];
    assert!(
        click["last_click_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("http")),
        "{click}"
    );
    for (email, suppressed) in [
        ("one@example.com", true),
        ("two@example.com", true),
        ("three@example.com", false),
    ] {
        let (s, _) = h
            .get("acme", &format!("/api/v1/suppressions/{email}"))
            .await;
        assert_eq!(s == 200, suppressed, "{email}");
    }
    assert_eq!(
        fake.cert_fetches.load(Ordering::SeqCst),
        1,
        "the certificate is fetched once and cached"
    );
}
