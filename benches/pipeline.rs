//! Criterion benches of the hot paths, each beside the primitive that bounds it, measured in the
//! same run on the same bytes (`scripts/bench-report.py` prints the ratios):
//! - `sendgrid/*`: verify + split + normalize a signed batch of 1, 100, 1000 events, against
//!   one ECDSA P-256 verification and a bare `serde_json::Value` parse of the same body;
//! - `fold`: folding 1000 events into projections;
//! - `log`: appending envelopes to the embedded log (group commit) against a bare SQLite insert.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::EncodePublicKey;
use xsender_events::event::RawEnvelope;
use xsender_events::fold::Projections;
use xsender_events::log::EnvelopeLog;
use xsender_events::providers::{registry, Normalized, ProviderSettings, WebhookRequest};
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
            g.bench_function("primitive_ecdsa_p256_verify", |b| {
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

criterion_group!(benches, sendgrid, fold, log);
criterion_main!(benches);
