//! Criterion benches of the hot paths, each beside the primitive that bounds it, measured in the
//! same run on the same bytes (`scripts/bench-report.py` prints the ratios):
//! - `sendgrid/*`: verify + split + normalize a signed batch of 1, 100, 1000 events, against
//!   one ECDSA P-256 verification and a bare `serde_json::Value` parse of the same body;
//! - `fold`: folding 1000 events into projections;
//! - `mailgun/*`, `mailjet/*`: verify + split + normalize one documented event (fixtures in
//!   `tests/fixtures/`), against HMAC-SHA256 (Mailgun's signature) and a bare
//!   `serde_json::Value` parse of the same body;
//! - `ses/*`: verify + split + normalize one SNS-wrapped SES event signed with the local test
//!   key (`tests/fixtures/ses/local_signer_*.pem`, certificate served by an in-process fake
//!   fetcher, cached after the first request as in production), against one RSA-2048 PKCS#1
//!   v1.5 verification and a `serde_json::Value` parse of the same body;
//! - `projection`: the projector's SQLite apply of 1000 fresh events against the bare SQLite
//!   row inserts it implies (same tables, keys and indexes);
//! - `log`: appending envelopes to the embedded log (group commit) against a bare SQLite insert.

use std::sync::Arc;
use std::time::Duration;

/// The server's allocator (`src/bin/xsender-events.rs`), so the benches measure what `serve`
/// runs: with glibc's malloc, allocation was ~13 % of an SES request's profile.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use base64::Engine;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use xsender_events::event::{DeliveryEvent, RawEnvelope};
use xsender_events::fold::Projections;
use xsender_events::log::EnvelopeLog;
use xsender_events::providers::ses::sns::{
    public_key_from_pem, Envelope, FetchError, SnsHttp, MESSAGE_TYPE_HEADER,
};
use xsender_events::providers::ses::Ses;
use xsender_events::providers::{registry, Normalized, Provider, ProviderSettings, WebhookRequest};
use xsender_events::tenants::{Tenant, TenantConfig, TenantSet};

fn batch(n: usize) -> Vec<u8> {
    let items: Vec<String> = (0..n)
        .map(|i| {
            let kind = ["delivered", "open", "click", "processed"][i % 4];
            format!(
                r#"{{"email":"user{i}@example.com","timestamp":1764750000,"smtp-id":"<M{i}@ismtpd0001p1iad1.sendgrid.net>","event":"{kind}","category":["newsletter"],"sg_event_id":"ZXZlbnQt{i}","sg_message_id":"M{i}.filterdrecv-5bd8c7b8d-7xkqz-1-6750A1B2-3.0","useragent":"Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X)","ip":"203.0.113.9","url":"https://shop.example.com/p/{i}","xs_tenant":"acme","xs_campaign":"spring","xs_dispatch":"d-{i}"}}"#
            )
        })
        .collect();
    format!("[{}]\r\n", items.join(",\r\n")).into_bytes()
}

fn sendgrid(c: &mut Criterion) {
    let key = SigningKey::random(&mut rand::rngs::OsRng);
    let der = key.verifying_key().to_public_key_der().unwrap();
    let vk = base64::engine::general_purpose::STANDARD.encode(der.as_bytes());
    let providers = registry(&ProviderSettings::default());
    let sg = providers
        .iter()
        .find(|p| p.name() == "sendgrid")
        .unwrap()
        .clone();
    let cfg: TenantConfig =
        serde_json::from_value(serde_json::json!({"sendgrid": {"verification_key": vk}})).unwrap();
    let tenants = TenantSet::new(vec![Tenant::prepare("acme", cfg, &providers).unwrap()]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("sendgrid");
    for n in [1usize, 100, 1000] {
        let body = batch(n);
        let ts = chrono::Utc::now().timestamp().to_string();
        let mut msg = ts.as_bytes().to_vec();
        msg.extend_from_slice(&body);
        let sig: Signature = key.sign(&msg);
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "x-twilio-email-event-webhook-timestamp",
            ts.parse().unwrap(),
        );
        headers.insert(
            "x-twilio-email-event-webhook-signature",
            base64::engine::general_purpose::STANDARD
                .encode(sig.to_der().as_bytes())
                .parse()
                .unwrap(),
        );
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("verify_normalize/{n}"), |b| {
            b.iter(|| {
                let req = WebhookRequest {
                    headers: &headers,
                    body: &body,
                    route_tenant: None,
                    now_ms: chrono::Utc::now().timestamp_millis(),
                };
                let v = rt.block_on(sg.verify(&req, &tenants)).unwrap();
                let env = RawEnvelope {
                    trace_parent: None,
                    id: "e".into(),
                    provider: "sendgrid".into(),
                    received_at_ms: 0,
                    verified_tenants: v.tenants,
                    default_tenant: v.default_tenant,
                    content_type: None,
                    body: body.clone(),
                };
                let out = sg.normalize(&env);
                assert!(matches!(out[0], Normalized::Event(_)));
                out
            })
        });
        // The primitives on the same bytes.
        g.bench_function(format!("primitive_json_value/{n}"), |b| {
            b.iter(|| serde_json::from_slice::<serde_json::Value>(&body).unwrap())
        });
        if n == 1 {
            let vkey = *key.verifying_key();
            g.throughput(Throughput::Elements(1));
            // The primitive as the adapter runs it (`ring`), and the portable RustCrypto verify
            // it replaced, on the same message and signature.
            let point = vkey.to_encoded_point(false);
            let ring_key = ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                point.as_bytes(),
            );
            let sig_der = sig.to_der();
            g.bench_function("primitive_ecdsa_p256_verify", |b| {
                b.iter(|| ring_key.verify(&msg, sig_der.as_bytes()).unwrap())
            });
            g.bench_function("reference_p256_rustcrypto_verify", |b| {
                use p256::ecdsa::signature::Verifier;
                b.iter(|| vkey.verify(&msg, &sig).unwrap())
            });
        }
    }
    g.finish();
}

fn fold(c: &mut Criterion) {
    let providers = registry(&ProviderSettings::default());
    let sg = providers
        .iter()
        .find(|p| p.name() == "sendgrid")
        .unwrap()
        .clone();
    let env = RawEnvelope {
        trace_parent: None,
        id: "e".into(),
        provider: "sendgrid".into(),
        received_at_ms: 0,
        verified_tenants: vec!["acme".into()],
        default_tenant: Some("acme".into()),
        content_type: None,
        body: batch(1000),
    };
    let events: Vec<_> = sg
        .normalize(&env)
        .into_iter()
        .filter_map(|n| match n {
            Normalized::Event(e) => Some(*e),
            Normalized::Dead(_) => None,
        })
        .collect();
    let mut g = c.benchmark_group("fold");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("apply/1000", |b| {
        b.iter(|| {
            let mut p = Projections::default();
            for e in &events {
                p.apply(e);
            }
            p
        })
    });
    g.bench_function("primitive_avro_encode/1000", |b| {
        b.iter(|| {
            events
                .iter()
                .map(|e| xsender_events::avro::encode_event(e).unwrap().len())
                .sum::<usize>()
        })
    });
    g.finish();
}

fn log(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = xsender_events::log::sqlite::SqliteLog::open(
        &dir.path().join("log.db"),
        Duration::from_secs(10),
    )
    .unwrap();
    let body = batch(100);
    let env = RawEnvelope {
        trace_parent: None,
        id: "e".into(),
        provider: "sendgrid".into(),
        received_at_ms: 0,
        verified_tenants: vec!["acme".into()],
        default_tenant: Some("acme".into()),
        content_type: Some("application/json".into()),
        body: body.clone(),
    };
    let mut g = c.benchmark_group("log");
    g.sample_size(20);
    // 64 concurrent appends of a 100-event envelope: what group commit buys.
    g.throughput(Throughput::Elements(64));
    g.bench_function("append_concurrent_64", |b| {
        b.iter(|| {
            rt.block_on(async {
                let log = Arc::new(log.clone());
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let (log, env) = (log.clone(), env.clone());
                        tokio::spawn(async move { log.append(&env).await.unwrap() })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        })
    });
    // The primitive: 64 inserts of the same bytes in one transaction on a bare connection.
    let bare = rusqlite::Connection::open(dir.path().join("bare.db")).unwrap();
    bare.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE t (seq INTEGER PRIMARY KEY, record BLOB)").unwrap();
    g.bench_function("primitive_sqlite_insert_64", |b| {
        b.iter_batched(
            || (),
            |_| {
                let tx = bare.unchecked_transaction().unwrap();
                for _ in 0..64 {
                    tx.execute("INSERT INTO t (record) VALUES (?1)", [&body])
                        .unwrap();
                }
                tx.commit().unwrap();
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!("{FIX}{path}")).unwrap()
}

fn provider(providers: &[Arc<dyn Provider>], name: &str) -> Arc<dyn Provider> {
    providers.iter().find(|p| p.name() == name).unwrap().clone()
}

fn tenant_set(providers: &[Arc<dyn Provider>], cfg: serde_json::Value) -> TenantSet {
    let cfg: TenantConfig = serde_json::from_value(cfg).unwrap();
    TenantSet::new(vec![Tenant::prepare("acme", cfg, providers).unwrap()]).unwrap()
}

/// Verify, then normalize the envelope ingress would have written; returns the item count.
fn verify_normalize(
    rt: &tokio::runtime::Runtime,
    p: &Arc<dyn Provider>,
    tenants: &TenantSet,
    headers: &hyper::HeaderMap,
    body: &[u8],
    now_ms: i64,
) -> usize {
    let req = WebhookRequest {
        headers,
        body,
        route_tenant: None,
        now_ms,
    };
    let v = rt.block_on(p.verify(&req, tenants)).unwrap();
    let env = RawEnvelope {
        trace_parent: None,
        id: "e".into(),
        provider: p.name().into(),
        received_at_ms: now_ms,
        verified_tenants: v.tenants,
        default_tenant: v.default_tenant,
        content_type: None,
        body: body.to_vec(),
    };
    let out = p.normalize(&env);
    assert!(
        matches!(out[0], Normalized::Event(_)),
        "{}: {:?}",
        p.name(),
        out
    );
    out.len()
}

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

fn mailgun(c: &mut Criterion) {
    let providers = registry(&ProviderSettings::default());
    let mg = provider(&providers, "mailgun");
    let key = "mg-signing-key-acme-bench";
    let tenants = tenant_set(
        &providers,
        serde_json::json!({"mailgun": {"signing_key": key}}),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&fixture("mailgun/delivered.json")).unwrap();
    let mut data = doc["event-data"].clone();
    data["user-variables"] =
        serde_json::json!({"xs_tenant": "acme", "xs_campaign": "spring", "xs_dispatch": "d-1"});
    let headers = {
        let mut h = hyper::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h
    };
    // Each request carries a fresh single-use token (the replay guard refuses reuse), so the
    // signed bodies are made outside the timed loop.
    let mut n = 0u64;
    let mut signed = || {
        n += 1;
        let ts = chrono::Utc::now().timestamp().to_string();
        let token = format!("{n:050x}");
        let sig = hmac_hex(key.as_bytes(), &[ts.as_bytes(), token.as_bytes()]);
        serde_json::to_vec(&serde_json::json!({
            "signature": {"timestamp": ts, "token": token, "signature": sig},
            "event-data": data,
        }))
        .unwrap()
    };
    let sample = signed();
    let mut g = c.benchmark_group("mailgun");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_normalize/1", |b| {
        b.iter_batched(
            &mut signed,
            |body| {
                verify_normalize(
                    &rt,
                    &mg,
                    &tenants,
                    &headers,
                    &body,
                    chrono::Utc::now().timestamp_millis(),
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("primitive_hmac_sha256", |b| {
        b.iter(|| hmac_hex(key.as_bytes(), &[b"1764750000", &sample[..50]]))
    });
    g.bench_function("primitive_json_value/1", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(&sample).unwrap())
    });
    g.finish();
}

fn mailjet(c: &mut Criterion) {
    let providers = registry(&ProviderSettings::default());
    let mj = provider(&providers, "mailjet");
    let (api_key, user, pass) = ("mjkey-acme", "mj-acme", "mj-password-acme-0123456789");
    let tenants = tenant_set(
        &providers,
        serde_json::json!({"mailjet": {"api_key": api_key, "username": user, "password": pass}}),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut ev: serde_json::Value = serde_json::from_slice(&fixture("mailjet/open.json")).unwrap();
    ev["Payload"] = serde_json::Value::String(
        serde_json::json!({"xs_tenant": "acme", "xs_campaign": "spring", "xs_dispatch": "d-1", "mj_api_key": api_key})
            .to_string(),
    );
    let body = serde_json::to_vec(&ev).unwrap();
    let mut headers = hyper::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert(
        "authorization",
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
        .parse()
        .unwrap(),
    );
    let mut g = c.benchmark_group("mailjet");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_normalize/1", |b| {
        b.iter(|| {
            verify_normalize(
                &rt,
                &mj,
                &tenants,
                &headers,
                &body,
                chrono::Utc::now().timestamp_millis(),
            )
        })
    });
    g.bench_function("primitive_json_value/1", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(&body).unwrap())
    });
    g.finish();
}

/// Serves the local test signer's certificate, as SNS would from its allow-listed host.
struct LocalCert(Vec<u8>);

#[async_trait::async_trait]
impl SnsHttp for LocalCert {
    async fn fetch_certificate(&self, _: &url::Url) -> Result<Vec<u8>, FetchError> {
        Ok(self.0.clone())
    }
    async fn confirm_subscription(&self, _: &url::Url) -> Result<String, FetchError> {
        Err(FetchError::Refused("not in benches".into()))
    }
}

fn ses(c: &mut Criterion) {
    use rsa::pkcs8::DecodePrivateKey;
    use sha2::Digest;
    const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:xsender-ses-events";
    const CERT: &str =
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-local-test-signer.pem";
    let ses: Arc<dyn Provider> = Arc::new(Ses::with_http(Arc::new(LocalCert(fixture(
        "ses/local_signer_cert.pem",
    )))));
    let providers = vec![ses.clone()];
    let tenants = tenant_set(
        &providers,
        serde_json::json!({"ses": {"topic_arns": [TOPIC]}}),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let all: serde_json::Value =
        serde_json::from_slice(&fixture("ses/ses_event_publishing.json")).unwrap();
    let mut event = all["Delivery"].clone();
    event["mail"]["tags"]["xs_tenant"] = serde_json::json!(["acme"]);
    event["mail"]["tags"]["xs_campaign"] = serde_json::json!(["spring"]);
    event["mail"]["tags"]["xs_dispatch"] = serde_json::json!(["d-1"]);
    let mut m = serde_json::json!({
        "Type": "Notification",
        "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "TopicArn": TOPIC,
        "Message": event.to_string(),
        "Timestamp": "2026-01-02T03:04:05.678Z",
        "SignatureVersion": "2",
        "Signature": "AAAA",
        "SigningCertURL": CERT,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    });
    let mut headers = hyper::HeaderMap::new();
    headers.insert(MESSAGE_TYPE_HEADER, "Notification".parse().unwrap());
    headers.insert("content-type", "text/plain; charset=UTF-8".parse().unwrap());
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(
        std::str::from_utf8(&fixture("ses/local_signer_key.pem")).unwrap(),
    )
    .unwrap();
    let string_to_sign = Envelope::parse(m.to_string().as_bytes(), &headers)
        .unwrap()
        .string_to_sign();
    let digest = sha2::Sha256::digest(string_to_sign.as_bytes());
    let sig = key
        .sign(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &digest)
        .unwrap();
    m["Signature"] =
        serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(&sig));
    let body = m.to_string().into_bytes();
    // The adapter loads the certificate (parsed here so a broken fixture fails before the
    // benches); the primitives verify with the same key, taken from the signer's private key.
    let cert = fixture("ses/local_signer_cert.pem");
    let _ = public_key_from_pem(&cert).unwrap();
    let public = key.to_public_key();
    let pkcs1 = {
        use rsa::pkcs1::EncodeRsaPublicKey;
        public.to_pkcs1_der().unwrap().as_bytes().to_vec()
    };
    let ring_key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        pkcs1,
    );
    let mut g = c.benchmark_group("ses");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_normalize/1", |b| {
        b.iter(|| {
            verify_normalize(
                &rt,
                &ses,
                &tenants,
                &headers,
                &body,
                chrono::Utc::now().timestamp_millis(),
            )
        })
    });
    // The primitive: the RSA-2048 verification alone (hash included) of the same string and
    // signature, as the adapter runs it (`ring`), and the portable `rsa` crate's it replaced.
    g.bench_function("primitive_rsa2048_verify", |b| {
        b.iter(|| ring_key.verify(string_to_sign.as_bytes(), &sig).unwrap())
    });
    g.bench_function("reference_rsa2048_rustcrypto_verify", |b| {
        b.iter(|| {
            let d = sha2::Sha256::digest(string_to_sign.as_bytes());
            public
                .verify(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &d, &sig)
                .unwrap()
        })
    });
    g.bench_function("primitive_json_value/1", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(&body).unwrap())
    });
    g.finish();
}
/// The records' Avro codec (`src/avro.rs`) against the generic apache-avro serde path on the
/// same records, encoding and decoding: the hand-written codec's gain, measured in one run.
fn avro(c: &mut Criterion) {
    use apache_avro::{from_avro_datum, from_value, to_avro_datum, to_value};
    let events = sendgrid_events(1000);
    let encoded: Vec<Vec<u8>> = events
        .iter()
        .map(|e| xsender_events::avro::encode_event(e).unwrap())
        .collect();
    let schema = xsender_events::avro::events().schema();
    let mut g = c.benchmark_group("avro");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("encode_event/1000", |b| {
        b.iter(|| {
            events
                .iter()
                .map(|e| xsender_events::avro::encode_event(e).unwrap().len())
                .sum::<usize>()
        })
    });
    g.bench_function("decode_event/1000", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|e| {
                    xsender_events::avro::decode_event(e)
                        .unwrap()
                        .recipient
                        .len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("apache_encode_event/1000", |b| {
        b.iter(|| {
            events
                .iter()
                .map(|e| {
                    let v = to_value(e).unwrap().resolve(schema).unwrap();
                    to_avro_datum(schema, v).unwrap().len()
                })
                .sum::<usize>()
        })
    });
    g.bench_function("apache_decode_event/1000", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|e| {
                    let v = from_avro_datum(schema, &mut &e[10..], None).unwrap();
                    from_value::<DeliveryEvent>(&v).unwrap().recipient.len()
                })
                .sum::<usize>()
        })
    });
    g.finish();
}
/// The projector's SQLite apply of 1000 fresh events (each a new dispatch, the costly case),
/// against the bare SQLite inserts it cannot avoid on the same connection settings: one row in a
/// `seen`-shaped table and one in a `dispatches`-shaped table (same keys, same indexes, a state
/// string of the same length) per event, in one transaction.
fn projection(c: &mut Criterion) {
    use xsender_events::log::Record;
    use xsender_events::projection::sqlite::SqliteProjections;
    use xsender_events::projection::{Batch, ProjectionStore};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteProjections::open(&dir.path().join("projections.db")).unwrap();
    let template = sendgrid_events(1000);
    let template_at = template[0].occurred_at_ms;
    // The stored state of a freshly folded dispatch is its row as JSON.
    let state_len = serde_json::to_string(&xsender_events::fold::fold_dispatch(None, &template[0]))
        .unwrap()
        .len();
    let mut round = 0u64;
    let mut offset = 0i64;
    // Fresh keys every iteration: the same events twice would only hit the dedupe. Each batch
    // a second later than the one before, as a live stream arrives.
    let mut fresh = move || {
        round += 1;
        template
            .iter()
            .map(|e| {
                offset += 1;
                let mut e = e.clone();
                e.event_key = format!(
                    "{:032x}",
                    (round << 20) ^ offset as u64 ^ 0x9e37_79b9_7f4a_7c15
                );
                e.occurred_at_ms += round as i64 * 1000;
                e.dispatch_key = format!("d:r{round}-{}", e.dispatch_key);
                // A dispatch id names one dispatch, as XSender's do.
                e.dispatch_id = e.dispatch_id.map(|d| format!("r{round}-{d}"));
                Record { offset, value: e }
            })
            .collect::<Vec<_>>()
    };
    let mut g = c.benchmark_group("projection");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("apply/1000", |b| {
        b.iter_batched(
            &mut fresh,
            |batch| rt.block_on(store.apply(Batch::single(0, batch))).unwrap(),
            BatchSize::LargeInput,
        )
    });
    let bare = rusqlite::Connection::open(dir.path().join("bare.db")).unwrap();
    bare.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384;
         CREATE TABLE seen (tenant TEXT NOT NULL, occurred_at_ms INTEGER NOT NULL, event_key TEXT NOT NULL,
            PRIMARY KEY (tenant, occurred_at_ms, event_key)) WITHOUT ROWID;
         CREATE TABLE dispatches (tenant TEXT NOT NULL, dispatch_key TEXT NOT NULL, campaign_id TEXT, dispatch_id TEXT,
            status TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (tenant, dispatch_key)) WITHOUT ROWID;
         CREATE INDEX dispatches_campaign ON dispatches (tenant, campaign_id, dispatch_key);
         CREATE INDEX dispatches_id ON dispatches (tenant, dispatch_id);",
    )
    .unwrap();
    let state = "x".repeat(state_len);
    let mut bare_round = 0u64;
    g.bench_function("primitive_sqlite_rows/1000", |b| {
        b.iter(|| {
            bare_round += 1;
            // The events' time, a second later each batch as in `fresh`.
            let at = template_at + bare_round as i64 * 1000;
            let tx = bare.unchecked_transaction().unwrap();
            {
                let mut seen = tx
                    .prepare_cached("INSERT INTO seen (tenant, occurred_at_ms, event_key) VALUES (?1, ?2, ?3)")
                    .unwrap();
                let mut d = tx
                    .prepare_cached("INSERT INTO dispatches (tenant, dispatch_key, campaign_id, dispatch_id, status, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                    .unwrap();
                for i in 0..1000u64 {
                    let k = format!("{:032x}", (bare_round << 20) ^ i ^ 0x9e37_79b9_7f4a_7c15);
                    seen.execute(rusqlite::params!["acme", at, k]).unwrap();
                    d.execute(rusqlite::params![
                        "acme",
                        format!("d:r{bare_round}-d-{i}"),
                        "spring",
                        format!("r{bare_round}-d-{i}"),
                        "Delivered",
                        state
                    ])
                    .unwrap();
                }
            }
            tx.commit().unwrap();
        })
    });
    g.finish();
}

fn sendgrid_events(n: usize) -> Vec<DeliveryEvent> {
    let providers = registry(&ProviderSettings::default());
    let sg = provider(&providers, "sendgrid");
    let env = RawEnvelope {
        trace_parent: None,
        id: "e".into(),
        provider: "sendgrid".into(),
        received_at_ms: 0,
        verified_tenants: vec!["acme".into()],
        default_tenant: Some("acme".into()),
        content_type: None,
        body: batch(n),
    };
    sg.normalize(&env)
        .into_iter()
        .filter_map(|n| match n {
            Normalized::Event(e) => Some(*e),
            Normalized::Dead(_) => None,
        })
        .collect()
}

criterion_group! {
    name = benches;
    // Short windows: the report compares ratios measured in the same run, and the machine is
    // shared, so many short runs beat few long ones.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = sendgrid, mailgun, mailjet, ses, fold, avro, projection, log
}
criterion_main!(benches);
