//! SES adapter tests. Signature tests use real AWS-signed SNS messages and the AWS
//! certificates that signed them (tests/fixtures/ses/, from AWS's own SDK test suites); the
//! certificate fetcher is a fake that serves those PEMs and counts calls. The confirmation
//! round trip uses a message signed here with a local test key (AWS's messages point at real
//! AWS) and a local HTTPS server standing in for SNS.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hyper::http::{HeaderMap, HeaderValue};
use rsa::pkcs8::DecodePrivateKey;
use rsa::RsaPrivateKey;

use super::sns::*;
use super::*;
use crate::fold::{Projections, SuppressionReason};
use crate::tenants::{Tenant, TenantConfig};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ses/");
const CERT_7FF: &str =
    "https://sns.us-east-2.amazonaws.com/SimpleNotificationService-7ff5318490ec183fbaddaa2a969abfda.pem";
const CERT_BB7: &str =
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-bb750dd426d95ee9390147a5624348ee.pem";
/// Where the fake fetcher serves the locally generated signer's certificate.
const CERT_LOCAL: &str =
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-local-test-signer.pem";
const LOCAL_TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:xsender-ses-events";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIX}{name}")).unwrap()
}

fn fixture_messages(name: &str) -> Vec<Value> {
    serde_json::from_str::<Vec<Value>>(&fixture(name)).unwrap()
}

/// Serves the fixture certificates, counts every request, and either answers confirmations
/// itself or hands them to a real HTTPS client (for the local stand-in round trip).
struct FakeHttp {
    certs: HashMap<String, Vec<u8>>,
    cert_calls: AtomicUsize,
    confirm_calls: AtomicUsize,
    confirm_via: Option<ReqwestSnsHttp>,
    delay: Duration,
}

impl FakeHttp {
    fn new() -> FakeHttp {
        let mut certs = HashMap::new();
        certs.insert(
            CERT_7FF.to_string(),
            fixture("SimpleNotificationService-7ff5318490ec183fbaddaa2a969abfda.pem").into_bytes(),
        );
        certs.insert(
            CERT_BB7.to_string(),
            fixture("SimpleNotificationService-bb750dd426d95ee9390147a5624348ee.pem").into_bytes(),
        );
        certs.insert(
            CERT_LOCAL.to_string(),
            fixture("local_signer_cert.pem").into_bytes(),
        );
        FakeHttp {
            certs,
            cert_calls: AtomicUsize::new(0),
            confirm_calls: AtomicUsize::new(0),
            confirm_via: None,
            delay: Duration::ZERO,
        }
    }

    fn calls(&self) -> (usize, usize) {
        (
            self.cert_calls.load(Ordering::SeqCst),
            self.confirm_calls.load(Ordering::SeqCst),
        )
    }
}

#[async_trait]
impl SnsHttp for FakeHttp {
    async fn fetch_certificate(&self, url: &url::Url) -> Result<Vec<u8>, FetchError> {
        self.cert_calls.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.certs
            .get(url.as_str())
            .cloned()
            .ok_or_else(|| FetchError::Refused(format!("GET {url}: HTTP 404")))
    }

    async fn confirm_subscription(&self, url: &url::Url) -> Result<String, FetchError> {
        self.confirm_calls.fetch_add(1, Ordering::SeqCst);
        match &self.confirm_via {
            Some(real) => real.confirm_subscription(url).await,
            None => Ok("<ConfirmSubscriptionResponse><ConfirmSubscriptionResult><SubscriptionArn>arn:aws:sns:fake:sub</SubscriptionArn></ConfirmSubscriptionResult></ConfirmSubscriptionResponse>".into()),
        }
    }
}

fn ses_with(http: Arc<FakeHttp>) -> Ses {
    Ses::with_http(http)
}

/// Tenants as `(id, topics)`, each with `[tenants.<id>.ses] topic_arns = topics`.
fn tenant_set(list: &[(&str, &[&str])]) -> TenantSet {
    let providers: Vec<Arc<dyn Provider>> =
        vec![Arc::new(Ses::with_http(Arc::new(FakeHttp::new())))];
    let tenants = list
        .iter()
        .map(|(id, topics)| {
            let mut cfg = TenantConfig::default();
            cfg.providers
                .insert("ses".into(), serde_json::json!({ "topic_arns": topics }));
            Tenant::prepare(id, cfg, &providers).unwrap()
        })
        .collect();
    TenantSet::new(tenants).unwrap()
}

fn headers_for(body: &Value) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(t) = body.get("Type").and_then(Value::as_str) {
        h.insert(MESSAGE_TYPE_HEADER, HeaderValue::from_str(t).unwrap());
    }
    h.insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    h
}

async fn verify_raw(
    ses: &Ses,
    set: &TenantSet,
    headers: &HeaderMap,
    body: &[u8],
    route_tenant: Option<&str>,
) -> Result<Verified, Rejection> {
    let req = WebhookRequest {
        headers,
        body,
        route_tenant,
        now_ms: 1_700_000_000_000,
    };
    ses.verify(&req, set).await
}

async fn verify_msg(ses: &Ses, set: &TenantSet, msg: &Value) -> Result<Verified, Rejection> {
    verify_raw(
        ses,
        set,
        &headers_for(msg),
        msg.to_string().as_bytes(),
        None,
    )
    .await
}

fn topic_of(msg: &Value) -> &str {
    msg["TopicArn"].as_str().unwrap()
}

// ---------------------------------------------------------------- signatures (real AWS)

#[tokio::test]
async fn real_aws_notifications_verify_with_both_signature_versions() {
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let mut msgs = fixture_messages("sns_notifications_php_ruby.json");
    msgs.extend(fixture_messages("sns_notification_java_sdk.json"));
    let topics: Vec<&str> = msgs.iter().map(topic_of).collect();
    let set = tenant_set(&[("acme", &topics)]);
    let mut versions = BTreeSet::new();
    for m in &msgs {
        let v = verify_msg(&ses, &set, m)
            .await
            .unwrap_or_else(|r| panic!("{}: {r}", m["MessageId"]));
        assert_eq!(v.tenants, vec!["acme".to_string()]);
        assert_eq!(v.default_tenant.as_deref(), Some("acme"));
        versions.insert(m["SignatureVersion"].as_str().unwrap().to_string());
    }
    assert_eq!(versions.len(), 2, "fixtures cover SignatureVersion 1 and 2");
    // 5 messages, 2 distinct certificates: each fetched once, then cached.
    assert_eq!(http.calls(), (2, 0));
}

#[tokio::test]
async fn one_altered_byte_is_401_with_a_reason() {
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    for (i, original) in fixture_messages("sns_notifications_php_ruby.json")
        .into_iter()
        .enumerate()
    {
        let set = tenant_set(&[("acme", &[topic_of(&original)])]);
        assert!(verify_msg(&ses, &set, &original).await.is_ok());
        // One byte of the signed Message ("Hello world" → "Hello worle").
        let mut m = original.clone();
        m["Message"] = Value::String("Hello worle".into());
        let r = verify_msg(&ses, &set, &m).await.unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{i}");
        assert_eq!(r.code, "bad_signature");
        assert!(r.message.contains("does not verify"), "{}", r.message);
        // One byte of the signed Timestamp.
        let mut m = original.clone();
        let ts = m["Timestamp"].as_str().unwrap().replace("2022", "2023");
        m["Timestamp"] = Value::String(ts);
        assert_eq!(
            verify_msg(&ses, &set, &m).await.unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        // One byte of the signature itself.
        let mut m = original.clone();
        let mut sig = B64.decode(m["Signature"].as_str().unwrap()).unwrap();
        sig[10] ^= 1;
        m["Signature"] = Value::String(B64.encode(sig));
        let r = verify_msg(&ses, &set, &m).await.unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.message.contains("SignatureVersion"), "{}", r.message);
    }
    // The two certificates were each fetched once across all of it.
    assert_eq!(http.calls(), (1, 0));
}

#[tokio::test]
async fn a_signature_from_another_aws_certificate_is_401() {
    // Real AWS message signed under a certificate we do not have; pointing it at the other
    // (real, AWS) certificate must fail.
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let mut m = fixture_messages("sns_notification_java_sdk.json").remove(0);
    m["SigningCertURL"] = Value::String(CERT_7FF.into());
    let set = tenant_set(&[("acme", &[topic_of(&m)])]);
    let r = verify_msg(&ses, &set, &m).await.unwrap_err();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A certificate URL on the right host that does not exist: refused, with the reason.
    m["SigningCertURL"] = Value::String(
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-nope.pem".into(),
    );
    let r = verify_msg(&ses, &set, &m).await.unwrap_err();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.message.contains("404"), "{}", r.message);
}

#[tokio::test]
async fn real_subscription_confirmation_is_verified_then_confirmed_once() {
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let m = fixture_messages("sns_subscription_confirmation.json").remove(0);
    let set = tenant_set(&[
        ("acme", &[topic_of(&m)]),
        ("other", &["arn:aws:sns:us-east-1:123456789012:x"]),
    ]);
    let v = verify_msg(&ses, &set, &m).await.unwrap();
    assert_eq!(v.tenants, vec!["acme".to_string()]);
    assert_eq!(http.calls(), (1, 1));
    // SNS resends a confirmation until answered; a confirmed token is not fetched again.
    verify_msg(&ses, &set, &m).await.unwrap();
    assert_eq!(http.calls(), (1, 1));
    let report = ses.sns_confirmations().unwrap();
    assert_eq!(report.items.len(), 2);
    assert_eq!(
        report.items[0].outcome,
        ConfirmationOutcome::AlreadyConfirmed
    );
    assert_eq!(report.items[1].outcome, ConfirmationOutcome::Confirmed);
    assert_eq!(report.items[1].detail, "arn:aws:sns:fake:sub");
    assert_eq!(report.items[1].tenants, vec!["acme".to_string()]);
    assert_eq!(report.items[1].topic_arn, topic_of(&m));
    assert_eq!(report.counters.confirmed, 1);
    // The token confirms a subscription: it never leaves through the admin view.
    let shown = serde_json::to_string(&report).unwrap();
    assert!(!shown.contains(m["Token"].as_str().unwrap()));

    // Altered: refused before any confirmation.
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let mut bad = m.clone();
    bad["Token"] = Value::String(format!("{}0", m["Token"].as_str().unwrap()));
    let r = verify_msg(&ses, &set, &bad).await.unwrap_err();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(http.calls(), (1, 0));
}

// ---------------------------------------------------------------- local signer

fn local_key() -> RsaPrivateKey {
    RsaPrivateKey::from_pkcs8_pem(&fixture("local_signer_key.pem")).unwrap()
}

/// An SNS message of type `ty` for the local test topic, signed (SignatureVersion 2) by the
/// local test key whose certificate the fake fetcher serves at [`CERT_LOCAL`].
fn local_signed(ty: &str, subscribe_url: &str, fields: &[(&str, &str)]) -> Value {
    let mut m = serde_json::json!({
        "Type": ty,
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "TopicArn": LOCAL_TOPIC,
        "Message": format!("You have chosen to subscribe to the topic {LOCAL_TOPIC}.\nTo confirm the subscription, visit the SubscribeURL included in this message."),
        "Timestamp": "2026-01-02T03:04:05.678Z",
        "SignatureVersion": "2",
        "Signature": "AAAA",
        "SigningCertURL": CERT_LOCAL,
    });
    if ty != "Notification" {
        m["Token"] = Value::String("2336412f37fb687f5d51e6e2local".into());
        m["SubscribeURL"] = Value::String(subscribe_url.into());
    }
    for (k, v) in fields {
        m[*k] = Value::String(v.to_string());
    }
    sign_local(&mut m);
    m
}

fn sign_local(m: &mut Value) {
    let env = Envelope::parse(m.to_string().as_bytes(), &headers_for(m)).unwrap();
    let digest = Sha256::digest(env.string_to_sign().as_bytes());
    let sig = local_key()
        .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest)
        .unwrap();
    m["Signature"] = Value::String(B64.encode(sig));
}

fn confirm_url(base: &str) -> String {
    format!("{base}/?Action=ConfirmSubscription&TopicArn={LOCAL_TOPIC}&Token=2336412f37fb687f5d51e6e2local")
}

/// A local HTTPS server standing in for SNS's ConfirmSubscription: a fresh self-signed
/// certificate for 127.0.0.1, every request URI recorded.
struct StandInSns {
    origin: String,
    root_der: Vec<u8>,
    requests: Arc<Mutex<Vec<String>>>,
}

async fn start_stand_in_sns() -> StandInSns {
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert_der = ck.cert.der().to_vec();
    let key_der = ck.key_pair.serialize_der();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert_der.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    seen.lock().unwrap().push(req.uri().to_string());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from_static(b"<ConfirmSubscriptionResponse xmlns=\"http://sns.amazonaws.com/doc/2010-03-31/\"><ConfirmSubscriptionResult><SubscriptionArn>arn:aws:sns:us-east-1:123456789012:xsender-ses-events:0b6941c4-f150-4bbd-9b26-fbb3d3ec7a3f</SubscriptionArn></ConfirmSubscriptionResult></ConfirmSubscriptionResponse>"),
                        )))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    StandInSns {
        origin: format!("https://127.0.0.1:{port}"),
        root_der: cert_der,
        requests,
    }
}

#[tokio::test]
async fn confirmation_round_trip_against_a_local_https_stand_in() {
    let sns = start_stand_in_sns().await;
    let trust = DangerousTestTrust::new(&sns.origin, sns.root_der.clone()).unwrap();
    let mut fake = FakeHttp::new();
    fake.confirm_via = Some(ReqwestSnsHttp::with_dangerous_test_trust(&trust).unwrap());
    let http = Arc::new(fake);
    let ses = ses_with(http.clone()).with_dangerous_test_trust(trust);
    let set = tenant_set(&[("acme", &[LOCAL_TOPIC]), ("beta", &[LOCAL_TOPIC])]);

    let m = local_signed("SubscriptionConfirmation", &confirm_url(&sns.origin), &[]);
    let v = verify_msg(&ses, &set, &m).await.unwrap();
    assert_eq!(v.tenants, vec!["acme".to_string(), "beta".to_string()]);
    assert_eq!(v.default_tenant, None);
    {
        let reqs = sns.requests.lock().unwrap();
        assert_eq!(reqs.len(), 1, "confirmed exactly once: {reqs:?}");
        assert!(reqs[0].contains("Action=ConfirmSubscription"));
        assert!(reqs[0].contains("Token=2336412f37fb687f5d51e6e2local"));
    }
    let report = ses.sns_confirmations().unwrap();
    assert_eq!(report.items[0].outcome, ConfirmationOutcome::Confirmed);
    assert!(report.items[0]
        .detail
        .ends_with(":0b6941c4-f150-4bbd-9b26-fbb3d3ec7a3f"));
    assert_eq!(report.counters.confirmed, 1);

    // SNS resending the same confirmation does not confirm again.
    verify_msg(&ses, &set, &m).await.unwrap();
    assert_eq!(sns.requests.lock().unwrap().len(), 1);

    // Without the test trust the same message is refused, and nothing goes out.
    let http = Arc::new(FakeHttp::new());
    let plain = ses_with(http.clone());
    let r = verify_msg(&plain, &set, &m).await.unwrap_err();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.message.contains("SubscribeURL refused"), "{}", r.message);
    assert_eq!(http.calls(), (0, 0));
}

#[tokio::test]
async fn a_failed_confirmation_is_5xx_so_sns_retries_and_is_recorded() {
    // The stand-in's certificate is not trusted by a client built without it.
    let sns = start_stand_in_sns().await;
    let trust = DangerousTestTrust::new(&sns.origin, sns.root_der.clone()).unwrap();
    let mut fake = FakeHttp::new();
    fake.confirm_via = Some(ReqwestSnsHttp::new().unwrap());
    let http = Arc::new(fake);
    let ses = ses_with(http.clone()).with_dangerous_test_trust(trust);
    let set = tenant_set(&[("acme", &[LOCAL_TOPIC])]);
    let m = local_signed("SubscriptionConfirmation", &confirm_url(&sns.origin), &[]);
    let r = verify_msg(&ses, &set, &m).await.unwrap_err();
    assert!(r.status.is_server_error(), "{r:?}");
    assert!(r.message.contains("confirming the subscription failed"));
    let report = ses.sns_confirmations().unwrap();
    assert_eq!(report.items[0].outcome, ConfirmationOutcome::Failed);
    assert_eq!(report.counters.confirm_failed, 1);
    // A failure is not remembered: SNS's resend tries again.
    assert!(verify_msg(&ses, &set, &m).await.is_err());
    assert_eq!(http.calls().1, 2);
    assert_eq!(ses.counters().confirm_failed, 2);
}

#[tokio::test]
async fn concurrent_copies_of_a_confirmation_share_one_get() {
    let sns = start_stand_in_sns().await;
    let trust = DangerousTestTrust::new(&sns.origin, sns.root_der.clone()).unwrap();
    let mut fake = FakeHttp::new();
    fake.confirm_via = Some(ReqwestSnsHttp::with_dangerous_test_trust(&trust).unwrap());
    let http = Arc::new(fake);
    let ses = Arc::new(ses_with(http.clone()).with_dangerous_test_trust(trust));
    let set = Arc::new(tenant_set(&[("acme", &[LOCAL_TOPIC])]));
    let m = local_signed("SubscriptionConfirmation", &confirm_url(&sns.origin), &[]);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (ses, set, m) = (ses.clone(), set.clone(), m.clone());
            tokio::spawn(async move { verify_msg(&ses, &set, &m).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(sns.requests.lock().unwrap().len(), 1);
    assert_eq!(http.calls(), (1, 1));
    let c = ses.counters();
    assert_eq!((c.confirmed, c.already_confirmed), (1, 7));
}

#[tokio::test]
async fn unsubscribe_confirmation_is_accepted_but_never_confirmed() {
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let set = tenant_set(&[("acme", &[LOCAL_TOPIC])]);
    let m = local_signed(
        "UnsubscribeConfirmation",
        "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=arn:aws:sns:us-east-1:123456789012:xsender-ses-events&Token=2336412f37fb687f5d51e6e2local",
        &[],
    );
    let v = verify_msg(&ses, &set, &m).await.unwrap();
    assert_eq!(v.tenants, vec!["acme".to_string()]);
    assert_eq!(
        http.calls(),
        (1, 0),
        "certificate fetched, SubscribeURL never"
    );
    let report = ses.sns_confirmations().unwrap();
    assert_eq!(
        report.items[0].outcome,
        ConfirmationOutcome::UnsubscribeNotConfirmed
    );
    assert_eq!(report.counters.unsubscribe_not_confirmed, 1);
    // Even a foreign SubscribeURL cannot matter: it is never fetched.
    let mut tampered = m.clone();
    tampered["Message"] = Value::String("x".into());
    assert_eq!(
        verify_msg(&ses, &set, &tampered).await.unwrap_err().status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(http.calls().1, 0);
}

#[tokio::test]
async fn foreign_urls_cause_no_outbound_request_at_all() {
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let set = tenant_set(&[("acme", &[LOCAL_TOPIC])]);
    let foreign_subscribe = [
        "https://evil.example.com/?Action=ConfirmSubscription&Token=t",
        "https://sns.us-east-1.amazonaws.com.evil.com/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com@evil.com/?Action=ConfirmSubscription",
        "https://sns.us-east-1.amazonaws.com:444/?Action=ConfirmSubscription",
        "http://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
        "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription",
        "https://127.0.0.1:4443/?Action=ConfirmSubscription",
        "https://169.254.169.254/latest/meta-data/?Action=ConfirmSubscription",
    ];
    for u in foreign_subscribe {
        let m = local_signed("SubscriptionConfirmation", u, &[]);
        let r = verify_msg(&ses, &set, &m).await.unwrap_err();
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{u}");
        assert!(
            r.message.contains("SubscribeURL refused"),
            "{u}: {}",
            r.message
        );
    }
    let foreign_cert = [
        "https://evil.example.com/SimpleNotificationService-x.pem",
        "https://sns.us-east-1.amazonaws.com.evil.com/x.pem",
        "https://sns.us-east-1.amazonaws.com@evil.com/x.pem",
        "https://sns.us-east-1.amazonaws.com:8443/x.pem",
        "http://sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com/x.txt",
        "https://127.0.0.1/x.pem",
        "file:///etc/passwd.pem",
    ];
    for u in foreign_cert {
        for ty in ["SubscriptionConfirmation", "Notification"] {
            let m = local_signed(
                ty,
                &confirm_url("https://sns.us-east-1.amazonaws.com"),
                &[("SigningCertURL", u)],
            );
            let r = verify_msg(&ses, &set, &m).await.unwrap_err();
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{u}");
            assert!(
                r.message.contains("SigningCertURL refused"),
                "{u}: {}",
                r.message
            );
        }
    }
    assert_eq!(http.calls(), (0, 0));
}

#[tokio::test]
async fn unknown_topics_are_403_without_fetching() {
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let set = tenant_set(&[
        ("acme", &["arn:aws:sns:us-east-1:123456789012:other"]),
        ("beta", &[LOCAL_TOPIC]),
    ]);
    let m = local_signed(
        "SubscriptionConfirmation",
        &confirm_url("https://sns.us-east-1.amazonaws.com"),
        &[],
    );
    // Through acme's own URL: beta's allow-list does not count.
    let r = verify_raw(
        &ses,
        &set,
        &headers_for(&m),
        m.to_string().as_bytes(),
        Some("acme"),
    )
    .await
    .unwrap_err();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code, "unknown_topic");
    assert!(
        r.message.contains("[tenants.acme.ses] topic_arns"),
        "{}",
        r.message
    );
    let set = tenant_set(&[("acme", &["arn:aws:sns:us-east-1:123456789012:other"])]);
    let r = verify_msg(&ses, &set, &m).await.unwrap_err();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.message.contains(LOCAL_TOPIC));
    let r = verify_msg(&ses, &tenant_set(&[]), &m).await.unwrap_err();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(http.calls(), (0, 0));
}

#[tokio::test]
async fn concurrent_requests_for_one_uncached_certificate_share_one_fetch() {
    let mut fake = FakeHttp::new();
    fake.delay = Duration::from_millis(100);
    let http = Arc::new(fake);
    let ses = Arc::new(ses_with(http.clone()));
    let msgs = fixture_messages("sns_notifications_php_ruby.json");
    let topics: Vec<&str> = msgs.iter().map(topic_of).collect();
    let set = Arc::new(tenant_set(&[("acme", &topics)]));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (ses, set, m) = (ses.clone(), set.clone(), msgs[i % msgs.len()].clone());
        tasks.push(tokio::spawn(
            async move { verify_msg(&ses, &set, &m).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(http.calls(), (1, 0));
}

#[tokio::test]
async fn cert_cache_is_bounded_expires_and_forgets_failures() {
    let http = FakeHttp::new();
    let cache = CertCache::new(2, Duration::from_secs(3600));
    for u in [CERT_7FF, CERT_BB7, CERT_LOCAL] {
        cache
            .key(&url::Url::parse(u).unwrap(), &http)
            .await
            .unwrap();
    }
    assert_eq!(cache.len(), 2);
    assert_eq!(http.calls().0, 3);
    // A failure is not cached: the next request tries again.
    let missing = url::Url::parse("https://sns.us-east-1.amazonaws.com/missing.pem").unwrap();
    assert!(cache.key(&missing, &http).await.is_err());
    assert!(cache.key(&missing, &http).await.is_err());
    assert_eq!(http.calls().0, 5);
    // Expired entries are fetched again.
    let short = CertCache::new(8, Duration::from_millis(1));
    let u = url::Url::parse(CERT_7FF).unwrap();
    short.key(&u, &http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    short.key(&u, &http).await.unwrap();
    assert_eq!(http.calls().0, 7);
}

// ---------------------------------------------------------------- malformed envelopes

#[tokio::test]
async fn malformed_envelopes_are_refused_with_reasons_and_nothing_fetched() {
    let http = Arc::new(FakeHttp::new());
    let ses = ses_with(http.clone());
    let real = fixture_messages("sns_notifications_php_ruby.json").remove(1);
    let set = tenant_set(&[("acme", &[topic_of(&real), LOCAL_TOPIC])]);
    let hdr = headers_for(&real);

    let mut cases: Vec<(String, HeaderMap, Vec<u8>, StatusCode, &str)> = vec![
        (
            "not JSON".into(),
            hdr.clone(),
            b"Type=Notification".to_vec(),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
        (
            "array".into(),
            hdr.clone(),
            b"[]".to_vec(),
            StatusCode::BAD_REQUEST,
            "one JSON object",
        ),
        (
            "empty body".into(),
            hdr.clone(),
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "not valid JSON",
        ),
    ];
    for field in [
        "Type",
        "MessageId",
        "TopicArn",
        "Message",
        "Timestamp",
        "SignatureVersion",
        "Signature",
        "SigningCertURL",
    ] {
        let mut m = real.clone();
        m.as_object_mut().unwrap().remove(field);
        cases.push((
            format!("missing {field}"),
            hdr.clone(),
            m.to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            field,
        ));
    }
    for field in ["SubscribeURL", "Token"] {
        let mut m = local_signed(
            "SubscriptionConfirmation",
            &confirm_url("https://sns.us-east-1.amazonaws.com"),
            &[],
        );
        m.as_object_mut().unwrap().remove(field);
        cases.push((
            format!("confirmation missing {field}"),
            headers_for(&m),
            m.to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            field,
        ));
    }
    let mut push = |name: &str, m: Value, h: HeaderMap, status, needle: &'static str| {
        cases.push((name.into(), h, m.to_string().into_bytes(), status, needle))
    };
    let mut m = real.clone();
    m["Signature"] = Value::String("not base64!!".into());
    push(
        "bad base64 signature",
        m,
        hdr.clone(),
        StatusCode::UNAUTHORIZED,
        "base64",
    );
    let mut m = real.clone();
    m["SignatureVersion"] = Value::String("3".into());
    push(
        "signature version 3",
        m,
        hdr.clone(),
        StatusCode::BAD_REQUEST,
        "SignatureVersion",
    );
    let mut m = real.clone();
    m["TopicArn"] = Value::String("arn:aws:sns:nowhere".into());
    push(
        "bad topic arn",
        m,
        hdr.clone(),
        StatusCode::BAD_REQUEST,
        "topic ARN",
    );
    let mut m = real.clone();
    m["Type"] = Value::String("Telegram".into());
    let h = headers_for(&m);
    push(
        "unknown type",
        m,
        h,
        StatusCode::BAD_REQUEST,
        "unknown SNS message Type",
    );
    let mut m = real.clone();
    m["Timestamp"] = Value::from(12);
    push(
        "non-string field",
        m,
        hdr.clone(),
        StatusCode::BAD_REQUEST,
        "must be a string",
    );
    let mut wrong = HeaderMap::new();
    wrong.insert(
        MESSAGE_TYPE_HEADER,
        HeaderValue::from_static("SubscriptionConfirmation"),
    );
    push(
        "wrong type header",
        real.clone(),
        wrong,
        StatusCode::BAD_REQUEST,
        "must agree",
    );
    push(
        "no type header",
        real.clone(),
        HeaderMap::new(),
        StatusCode::BAD_REQUEST,
        MESSAGE_TYPE_HEADER,
    );
    let mut h = hdr.clone();
    h.insert(
        TOPIC_ARN_HEADER,
        HeaderValue::from_static("arn:aws:sns:us-east-2:295079676684:other"),
    );
    push(
        "topic header differs",
        real.clone(),
        h,
        StatusCode::BAD_REQUEST,
        "differs",
    );
    // A genuinely signed notification whose Message claims to be an SES event but is not JSON.
    let m = local_signed(
        "Notification",
        "",
        &[(
            "Message",
            "{\"eventType\":\"Bounce\",\"mail\":{\"messageId\":",
        )],
    );
    push(
        "non-JSON Message claiming to be an event",
        m.clone(),
        headers_for(&m),
        StatusCode::BAD_REQUEST,
        "does not parse",
    );
    // Raw message delivery: the bare SES record, no envelope.
    let ses_rec: Value = serde_json::from_str(&fixture("ses_event_publishing.json")).unwrap();
    push(
        "raw message delivery",
        ses_rec["Bounce"].clone(),
        HeaderMap::new(),
        StatusCode::BAD_REQUEST,
        "raw message delivery",
    );

    for (name, headers, body, status, needle) in cases {
        let r = verify_raw(&ses, &set, &headers, &body, None)
            .await
            .expect_err(&name);
        assert_eq!(r.status, status, "{name}: {r:?}");
        assert!(
            r.message.contains(needle),
            "{name}: {:?} lacks {needle:?}",
            r.message
        );
    }
    assert_eq!(http.calls(), (0, 0));
}

#[test]
fn string_to_sign_matches_the_documented_bytes() {
    let m = fixture_messages("sns_notifications_php_ruby.json").remove(0);
    let env = Envelope::parse(m.to_string().as_bytes(), &headers_for(&m)).unwrap();
    assert_eq!(
        env.string_to_sign(),
        "Message\nHello world\nMessageId\n792cda85-518f-5dd3-9163-81d851212f3a\nTimestamp\n2022-07-28T21:23:58.317Z\nTopicArn\narn:aws:sns:us-east-2:295079676684:publish-and-verify-892f85fe-4836-424d-8188-ab85bef0f362\nType\nNotification\n"
    );
}

#[test]
fn tenant_sections_are_checked() {
    let ses = Ses::with_http(Arc::new(FakeHttp::new()));
    assert!(ses
        .parse_credentials(&serde_json::json!({"topic_arns": [LOCAL_TOPIC]}))
        .is_ok());
    let e = ses
        .parse_credentials(&serde_json::json!({"topic_arns": [LOCAL_TOPIC], "secret": "x"}))
        .unwrap_err();
    assert!(e.contains("unknown field"), "{e}");
    let e = ses
        .parse_credentials(
            &serde_json::json!({"topic_arns": ["arn:aws:sqs:us-east-1:123456789012:q"]}),
        )
        .unwrap_err();
    assert!(e.contains("topic_arns"), "{e}");
    assert!(ses
        .parse_credentials(&serde_json::json!({"topic_arns": []}))
        .unwrap_err()
        .contains("empty"));
    // And from TOML, as an operator writes it.
    let file: crate::tenants::TenantsFile = toml::from_str(&format!(
        "[tenants.acme]\napi_token = \"0123456789abcdef0123\"\n[tenants.acme.ses]\ntopic_arns = [\"{LOCAL_TOPIC}\"]\n"
    ))
    .unwrap();
    let providers: Vec<Arc<dyn Provider>> = vec![Arc::new(ses)];
    let t = Tenant::prepare("acme", file.tenants["acme"].clone(), &providers).unwrap();
    assert!(t.credentials("ses").is_some());
}

// ---------------------------------------------------------------- SES events

fn raw(body: Value) -> RawEnvelope {
    RawEnvelope::verified("ses", body.to_string(), &["acme"])
}

fn notification(message: &str) -> RawEnvelope {
    raw(serde_json::json!({
        "Type": "Notification",
        "MessageId": "sns-1",
        "TopicArn": LOCAL_TOPIC,
        "Message": message,
    }))
}

fn record_env(record: &Value) -> RawEnvelope {
    notification(&record.to_string())
}

fn normalize(env: &RawEnvelope) -> Vec<Normalized> {
    Ses::with_http(Arc::new(FakeHttp::new())).normalize(env)
}

fn events(out: &[Normalized]) -> Vec<&DeliveryEvent> {
    out.iter()
        .filter_map(|n| match n {
            Normalized::Event(e) => Some(&**e),
            Normalized::Dead(_) => None,
        })
        .collect()
}

fn dead_reasons(out: &[Normalized]) -> Vec<String> {
    out.iter()
        .filter_map(|n| match n {
            Normalized::Dead(d) => Some(d.reason.clone()),
            Normalized::Event(_) => None,
        })
        .collect()
}

#[test]
fn every_event_publishing_type_maps_per_the_table() {
    let records: Map<String, Value> =
        serde_json::from_str(&fixture("ses_event_publishing.json")).unwrap();
    let table = [
        ("Send", EventKind::Sent),
        ("Delivery", EventKind::Delivered),
        ("Bounce", EventKind::Bounced),
        ("Complaint", EventKind::Complained),
        ("Open", EventKind::Opened),
        ("Click", EventKind::Clicked),
        ("Reject", EventKind::Dropped),
        ("DeliveryDelay", EventKind::Deferred),
        ("Rendering Failure", EventKind::Other),
        ("Subscription", EventKind::Unsubscribed),
    ];
    assert_eq!(records.len(), table.len());
    for (name, kind) in table {
        let out = normalize(&record_env(&records[name]));
        let evs = events(&out);
        assert_eq!(evs.len(), 1, "{name}: {out:?}");
        let e = evs[0];
        assert_eq!(e.kind, kind, "{name}");
        assert_eq!(e.provider_event, name);
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.provider_event_id.as_deref(), Some("sns-1"));
        assert!(e.occurred_at_ms > 1_400_000_000_000, "{name}");
        let mid = records[name]["mail"]["messageId"].as_str().unwrap();
        assert_eq!(e.message_id.as_deref(), Some(mid));
        // No xs_* tags in AWS's examples: the message-id + recipient fallback.
        assert_eq!(e.dispatch_key, format!("m:{mid}:{}", e.recipient));
        match name {
            "Bounce" => {
                assert_eq!(e.bounce_class, Some(BounceClass::Hard));
                assert_eq!(e.smtp_status.as_deref(), Some("5.1.1"));
                assert!(e
                    .reason
                    .as_deref()
                    .unwrap()
                    .starts_with("Permanent/General"));
            }
            "Open" => {
                assert!(e.user_agent.as_deref().unwrap().contains("iPhone"));
                assert_eq!(e.ip.as_deref(), Some("192.0.2.1"));
                assert_eq!(
                    e.occurred_at_ms,
                    parse_time_ms("2017-08-09T22:00:19.652Z").unwrap()
                );
            }
            "Click" => {
                assert_eq!(
                    e.url.as_deref(),
                    Some(
                        "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html"
                    )
                );
                assert!(e.user_agent.is_some());
                assert_eq!(e.ip.as_deref(), Some("192.0.2.1"));
            }
            "Reject" => assert_eq!(e.reason.as_deref(), Some("Bad content")),
            "DeliveryDelay" => {
                assert_eq!(e.smtp_status.as_deref(), Some("4.4.1"));
                assert!(e
                    .reason
                    .as_deref()
                    .unwrap()
                    .starts_with("TransientCommunicationFailure"));
            }
            "Complaint" => assert_eq!(e.reason.as_deref(), Some("abuse")),
            _ => {}
        }
        if name != "Bounce" {
            assert_eq!(e.bounce_class, None, "{name}");
        }
    }
}

#[test]
fn identity_notifications_map_too() {
    let records: Map<String, Value> =
        serde_json::from_str(&fixture("ses_identity_notifications.json")).unwrap();
    let expect = [
        (
            "Bounce_with_DSN",
            EventKind::Bounced,
            vec!["jane@example.com"],
        ),
        (
            "Complaint_with_feedback_report",
            EventKind::Complained,
            vec!["richard@example.com"],
        ),
        ("Delivery", EventKind::Delivered, vec!["jane@example.com"]),
    ];
    for (name, kind, rcpts) in expect {
        let out = normalize(&record_env(&records[name]));
        let evs = events(&out);
        assert!(dead_reasons(&out).is_empty(), "{name}: {out:?}");
        // mail.destination names three people; only the record's own recipients count.
        assert_eq!(
            evs.iter().map(|e| e.recipient.as_str()).collect::<Vec<_>>(),
            rcpts,
            "{name}"
        );
        assert!(evs.iter().all(|e| e.kind == kind));
    }
}

#[test]
fn the_same_bounce_in_both_shapes_is_one_happening() {
    let mut rec: Value =
        serde_json::from_str::<Map<String, Value>>(&fixture("ses_event_publishing.json")).unwrap()
            ["Bounce"]
            .clone();
    let a = normalize(&record_env(&rec));
    let obj = rec.as_object_mut().unwrap();
    obj.remove("eventType");
    obj.insert("notificationType".into(), Value::String("Bounce".into()));
    let b = normalize(&record_env(&rec));
    assert_eq!(events(&a)[0].event_key, events(&b)[0].event_key);
}

fn bounce(bounce_type: &str, sub: &str, destination: &[&str], bounced: &[(&str, &str)]) -> Value {
    serde_json::json!({
        "eventType": "Bounce",
        "mail": {
            "timestamp": "2026-01-02T03:04:05.000Z",
            "messageId": "0100018c-multi",
            "destination": destination,
            "tags": {"xs_tenant": ["acme"], "xs_campaign": ["c-9"], "xs_dispatch": ["d-42"]}
        },
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": sub,
            "timestamp": "2026-01-02T03:04:09.000Z",
            "feedbackId": "fb-1",
            "bouncedRecipients": bounced.iter().map(|(a, s)| serde_json::json!({"emailAddress": a, "status": s, "diagnosticCode": format!("smtp; 550 {s} nope")})).collect::<Vec<_>>()
        }
    })
}

#[test]
fn a_multi_recipient_bounce_suppresses_exactly_the_bounced_recipients() {
    let rec = bounce(
        "Permanent",
        "General",
        &["a@example.com", "B@Example.com", "c@example.com"],
        &[("a@example.com", "5.1.1"), ("B@Example.com", "5.1.1")],
    );
    let out = normalize(&record_env(&rec));
    let evs = events(&out);
    assert_eq!(evs.len(), 2, "{out:?}");
    let mut p = Projections::default();
    for e in &evs {
        assert_eq!(e.dispatch_id.as_deref(), Some("d-42"));
        assert_eq!(e.campaign_id.as_deref(), Some("c-9"));
        assert!(p.apply(e));
    }
    let suppressed: Vec<(&str, SuppressionReason)> = p
        .suppressions
        .values()
        .map(|s| (s.email.as_str(), s.reason))
        .collect();
    assert_eq!(
        suppressed,
        vec![
            ("a@example.com", SuppressionReason::HardBounce),
            ("b@example.com", SuppressionReason::HardBounce)
        ]
    );
    // A replay (SNS retry) of the same record changes nothing.
    for e in events(&normalize(&record_env(&rec))) {
        assert!(!p.apply(e));
    }
}

#[test]
fn transient_and_undetermined_bounces_are_soft_whatever_the_status_code() {
    for ty in ["Transient", "Undetermined"] {
        let rec = bounce(
            ty,
            "MailboxFull",
            &["a@example.com"],
            &[("a@example.com", "5.2.2")],
        );
        let out = normalize(&record_env(&rec));
        let e = events(&out)[0];
        assert_eq!(e.bounce_class, Some(BounceClass::Soft), "{ty}");
        let mut p = Projections::default();
        p.apply(e);
        assert!(p.suppressions.is_empty(), "{ty}");
    }
}

#[test]
fn subscription_without_an_opt_out_is_other() {
    let mut rec = serde_json::from_str::<Map<String, Value>>(&fixture("ses_event_publishing.json"))
        .unwrap()["Subscription"]
        .clone();
    rec["subscription"]["newTopicPreferences"] = serde_json::json!({
        "unsubscribeAll": false,
        "topicSubscriptionStatus": [{"topicName": "News", "subscriptionStatus": "OptIn"}]
    });
    assert_eq!(
        events(&normalize(&record_env(&rec)))[0].kind,
        EventKind::Other
    );
    rec["subscription"]["newTopicPreferences"]["topicSubscriptionStatus"][0]
        ["subscriptionStatus"] = Value::String("OptOut".into());
    assert_eq!(
        events(&normalize(&record_env(&rec)))[0].kind,
        EventKind::Unsubscribed
    );
}

#[test]
fn handshakes_and_the_validation_message_yield_nothing() {
    assert!(normalize(&notification(VALIDATION_MESSAGE)).is_empty());
    assert!(normalize(&notification(&format!("{VALIDATION_MESSAGE}\n"))).is_empty());
    let sub = serde_json::json!({"notificationType": "AmazonSnsSubscriptionSucceeded", "message": "You have successfully subscribed your Amazon SNS topic"});
    assert!(normalize(&record_env(&sub)).is_empty());
    for ty in ["SubscriptionConfirmation", "UnsubscribeConfirmation"] {
        assert!(normalize(&raw(serde_json::json!({"Type": ty, "Message": "x"}))).is_empty());
    }
}

#[test]
fn what_is_not_an_ses_event_is_dead_lettered_with_a_reason() {
    let cases = [
        (notification("Hello world"), "not_ses_event"),
        (notification("{\"hello\": \"world\"}"), "not_ses_event"),
        (notification("[1, 2]"), "not_ses_event"),
        (notification("{\"eventType\": \"Bounce\"}"), "missing_field"),
        (notification("{\"eventType\": \"Bounce\", \"mail\": {\"destination\": [\"a@example.com\"], \"timestamp\": \"2026-01-02T03:04:05Z\"}}"), "missing_field"),
        (notification("{\"eventType\": \"Send\", \"mail\": {\"destination\": [], \"timestamp\": \"2026-01-02T03:04:05Z\"}}"), "missing_field"),
        (notification("{\"eventType\": \"Send\", \"mail\": {\"destination\": [\"a@example.com\"], \"timestamp\": \"yesterday\"}}"), "missing_field"),
        (notification("{\"eventType\": \"Send\", \"mail\": {\"destination\": [\"not an address\"], \"timestamp\": \"2026-01-02T03:04:05Z\"}}"), "invalid_field"),
        (notification("{\"eventType\": \"Send\", \"mail\": {\"destination\": \"a@example.com\", \"timestamp\": \"2026-01-02T03:04:05Z\"}}"), "invalid_field"),
        (raw(serde_json::json!({"Type": "Notification"})), "missing_field"),
        (raw(serde_json::json!([1])), "malformed_body"),
        (raw(serde_json::json!({"Type": "Gossip"})), "malformed_body"),
        (
            RawEnvelope { body: b"\xff\xfe".to_vec(), ..notification("") },
            "malformed_body",
        ),
    ];
    for (env, reason) in cases {
        let out = normalize(&env);
        assert_eq!(dead_reasons(&out), vec![reason.to_string()], "{out:?}");
    }
}

#[test]
fn xs_tenant_must_be_a_tenant_allowing_the_topic() {
    let mut rec = bounce(
        "Permanent",
        "General",
        &["a@example.com"],
        &[("a@example.com", "5.1.1")],
    );
    rec["mail"]["tags"]["xs_tenant"] = serde_json::json!(["mallory"]);
    let out = normalize(&record_env(&rec));
    assert_eq!(dead_reasons(&out), vec!["tenant_not_verified".to_string()]);
    // Two tenants share the topic: the tag picks one.
    let mut env = record_env(&bounce(
        "Permanent",
        "General",
        &["a@example.com"],
        &[("a@example.com", "5.1.1")],
    ));
    env.verified_tenants = vec!["acme".into(), "beta".into()];
    env.default_tenant = None;
    assert_eq!(events(&normalize(&env))[0].tenant, "acme");
    // Without a tag and with two tenants, it cannot be attributed.
    let mut rec = bounce(
        "Permanent",
        "General",
        &["a@example.com"],
        &[("a@example.com", "5.1.1")],
    );
    rec["mail"].as_object_mut().unwrap().remove("tags");
    let mut env = record_env(&rec);
    env.verified_tenants = vec!["acme".into(), "beta".into()];
    env.default_tenant = None;
    assert_eq!(
        dead_reasons(&normalize(&env)),
        vec!["unattributable".to_string()]
    );
}

#[test]
fn display_names_in_destination_are_stripped() {
    let rec = serde_json::json!({"eventType": "Send", "mail": {"timestamp": "2026-01-02T03:04:05Z", "messageId": "m1", "destination": ["Jane Doe <Jane@Example.com>"]}, "send": {}});
    assert_eq!(
        events(&normalize(&record_env(&rec)))[0].recipient,
        "jane@example.com"
    );
}

// ---------------------------------------------------------------- through the HTTP stack

/// The whole server (the production SES adapter, so no test trust and a real HTTPS client):
/// SNS's `text/plain` is accepted, refusals carry their reason and write nothing, and the admin
/// API lists confirmations. Nothing here needs the network: every request is refused before
/// any certificate fetch.
#[tokio::test]
async fn webhook_route_refuses_with_reasons_writes_nothing_and_admin_lists_confirmations() {
    use crate::log::NormalizerLog;
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!("[tenants.acme.ses]\ntopic_arns = [\"{LOCAL_TOPIC}\"]\n"),
    )
    .unwrap();
    let admin = "admin-token-0123456789";
    let cfg = crate::config::ServeConfig {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        tenants_file: Some(tenants),
        admin_token: Some(crate::secret::Secret::new(admin.to_string())),
        ..Default::default()
    };
    let running = crate::app::start(cfg).await.unwrap();
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let post = |body: String, ty: &'static str, ct: &'static str| {
        client
            .post(format!("{base}/api/webhook/email/ses"))
            .header("content-type", ct)
            .header(MESSAGE_TYPE_HEADER, ty)
            .body(body)
            .send()
    };

    let foreign = local_signed(
        "SubscriptionConfirmation",
        "https://evil.example.com/?Action=ConfirmSubscription",
        &[],
    );
    let unknown_topic = local_signed(
        "Notification",
        "",
        &[("TopicArn", "arn:aws:sns:us-east-1:123456789012:not-ours")],
    );
    let cases = [
        (
            foreign.to_string(),
            "SubscriptionConfirmation",
            "text/plain; charset=UTF-8",
            401,
            "SubscribeURL refused",
        ),
        (
            unknown_topic.to_string(),
            "Notification",
            "application/json",
            403,
            "allow-list",
        ),
        (
            "{}".to_string(),
            "Notification",
            "text/plain; charset=UTF-8",
            400,
            "'Type'",
        ),
        (
            foreign.to_string(),
            "SubscriptionConfirmation",
            "application/x-www-form-urlencoded",
            415,
            "text/plain",
        ),
    ];
    for (body, ty, ct, status, needle) in cases {
        let r = post(body, ty, ct).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{needle}");
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "{text}");
    }

    let r = client
        .get(format!("{base}/api/admin/sns-confirmations"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["items"], serde_json::json!([]));
    assert_eq!(v["counters"]["ses"]["confirmed"], 0);

    running.stop().await;
    let log = crate::log::sqlite::SqliteLog::open(
        &dir.path().join("data").join("log.db"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(log.read_envelopes(0, 10).await.unwrap().is_empty());
}

// ---------------------------------------------------------------- no panics on any input

fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[a-z@. <>0-9:-]{0,24}".prop_map(Value::String),
        Just(Value::String("2026-01-02T03:04:05Z".into())),
        Just(Value::String("a@example.com".into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("emailAddress".to_string()),
                    Just("timestamp".to_string()),
                    Just("destination".to_string()),
                    Just("bouncedRecipients".to_string()),
                    Just("recipients".to_string()),
                    Just("tags".to_string()),
                    Just("xs_tenant".to_string()),
                    Just("bounceType".to_string()),
                    "[a-z]{1,6}".prop_map(|s| s),
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest::proptest! {
    #[test]
    fn normalize_and_parse_never_panic(
        ty in proptest::sample::select(vec!["Send", "Delivery", "Bounce", "Complaint", "Open", "Click", "Reject", "DeliveryDelay", "Rendering Failure", "Subscription", "Future"]),
        mail in arb_json(),
        detail in arb_json(),
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        text in ".{0,64}",
    ) {
        let key = match ty { "Rendering Failure" => "failure", "DeliveryDelay" => "deliveryDelay", t => t };
        let record = serde_json::json!({"eventType": ty, "mail": mail, key.to_lowercase(): detail.clone(), key: detail});
        let _ = normalize(&record_env(&record));
        let _ = normalize(&notification(&text));
        let _ = normalize(&RawEnvelope { body: bytes.clone(), ..notification("") });
        let _ = Envelope::parse(&bytes, &HeaderMap::new());
        let _ = Envelope::parse(text.as_bytes(), &HeaderMap::new());
    }
}

/// What a `serde_json::Value` map says of a field, in the scanner's terms.
fn value_field(obj: &serde_json::Map<String, Value>, k: &str) -> Option<String> {
    obj.get(k).map(|v| match v {
        Value::String(s) => format!("str:{s}"),
        Value::Null => "null".into(),
        _ => "other".into(),
    })
}

fn scanned_field(f: &Option<Field<'_>>) -> Option<String> {
    f.as_ref().map(|f| match f {
        Field::Str(s) => format!("str:{s}"),
        Field::Null => "null".into(),
        Field::Other => "other".into(),
    })
}

proptest::proptest! {
    /// The envelope scanner reads each field exactly as a `Value` map of the same body does
    /// (escapes decoded, a repeated key's last value, non-strings told apart from null), and
    /// calls exactly the bodies a `Value` parse rejects invalid: verification and the
    /// normalizer used `Value` before, and logs written then must normalize as they did.
    #[test]
    fn the_envelope_scanner_reads_what_a_value_map_reads(
        pairs in proptest::collection::vec((
            proptest::sample::select(vec!["Type", "Message", "MessageId", "Subject", "Token", "eventType", "x", "Signature"]),
            arb_json(),
        ), 0..8),
        escaped in "[a-z\"\\\\\n\t\u{e9}]{0,12}",
        tail in proptest::sample::select(vec!["", " ", "x", "}", ",", "\n"]),
    ) {
        // Written by hand so repeated keys reach the parsers (a `Value` map would merge them).
        let mut body = String::from("{");
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 { body.push(','); }
            let v = if *k == "Message" && i % 2 == 0 { Value::String(escaped.clone()) } else { v.clone() };
            body.push_str(&format!("{}:{}", Value::String(k.to_string()), v));
        }
        body.push('}');
        body.push_str(tail);
        let by_value = serde_json::from_slice::<Value>(body.as_bytes());
        match (Scanned::scan(body.as_bytes()), by_value) {
            (Ok(Scanned::Object(f)), Ok(Value::Object(o))) => {
                for (k, got) in [("Type", &f.ty), ("Message", &f.message), ("MessageId", &f.message_id), ("Subject", &f.subject), ("Token", &f.token), ("Signature", &f.signature)] {
                    proptest::prop_assert_eq!(scanned_field(got), value_field(&o, k), "field {} of {}", k, body);
                }
                proptest::prop_assert_eq!(f.ses_record_key, o.contains_key("eventType"));
            }
            (Err(_), Err(_)) => {}
            (Ok(Scanned::NotObject), Ok(v)) => proptest::prop_assert!(!v.is_object()),
            (a, b) => proptest::prop_assert!(false, "scanner {:?} vs Value {:?} on {}", a.is_ok(), b.map(|_| ()), body),
        }
    }
}

#[test]
fn the_envelope_scanner_borrows_plain_strings_and_tells_other_top_levels_apart() {
    let body = br#"{"Type":"Notification","Message":"{\"a\":1}","MessageAttributes":{"k":{"Type":"String"}},"Subject":null,"Token":7}"#;
    let Ok(Scanned::Object(f)) = Scanned::scan(body) else {
        panic!("an object")
    };
    assert!(matches!(
        f.ty,
        Some(Field::Str(std::borrow::Cow::Borrowed("Notification")))
    ));
    assert!(
        matches!(&f.message, Some(Field::Str(std::borrow::Cow::Owned(m))) if m == r#"{"a":1}"#)
    );
    assert!(matches!(f.subject, Some(Field::Null)));
    assert!(matches!(f.token, Some(Field::Other)));
    assert!(
        f.message_id.is_none(),
        "a nested object's Type is not the envelope's"
    );
    for other in [&b"[1,2]"[..], b"\"s\"", b"3", b"null", b"true"] {
        assert!(matches!(Scanned::scan(other), Ok(Scanned::NotObject)));
    }
    assert!(Scanned::scan(b"{\"Type\":").is_err());
}
