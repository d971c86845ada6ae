//! The cluster log on a real Kafka broker (`scripts/kafka.sh`) with projections in Cassandra:
//! topology as code, a broker stopped under load, a projector killed mid-batch, and the
//! analytics contract read by Python's confluent-kafka + fastavro. The behavioural scenarios
//! of `pipeline.rs` and `mailgun_mailjet.rs` also run on this backend (`backend_tests!`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    fixture, kafka_broker, kafka_config, local_topology, wait_until, Harness, PrivateBroker,
    TenantSpec,
};
use serde_json::Value;
use xsender_events::config::{ProjectionStoreKind, Role};

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_xsender-events"))
}

/// `xsender-events topology …` with the test broker, the single-broker topology and `ns`.
fn topology_cli(action: &str, ns: &str) -> (i32, String) {
    let out = bin()
        .args(["topology", action, "--kafka-brokers", &kafka_broker()])
        .arg("--kafka-topology")
        .arg(local_topology())
        .args(["--kafka-namespace", ns])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_apply_creates_and_repairs_and_serve_refuses_drift() {
    let ns = format!("topo{}.", rand::random::<u32>());
    let (code, err) = topology_cli("check", &ns);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("topic {ns}xsender.delivery-events.v1 is missing")),
        "{err}"
    );

    // serve refuses, naming what is wrong and the command that fixes it.
    let mut cfg = common::config(tempfile::tempdir().unwrap().path(), None);
    kafka_config(&mut cfg, &kafka_broker(), &ns);
    let e = xsender_events::app::start(cfg.clone())
        .await
        .err()
        .expect("serve refuses missing topics")
        .to_string();
    assert!(
        e.contains("is missing") && e.contains("topology apply"),
        "{e}"
    );

    let (code, err) = topology_cli("apply", &ns);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("created topic").count(), 3, "{err}");
    let (code, err) = topology_cli("apply", &ns);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("nothing to create"), "{err}");

    // Someone shortens the events topic's retention by hand: reported, refused, repaired.
    let s = cfg.kafka_settings().unwrap();
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        s.client_config().create().unwrap();
    let events = s.topology.topics.events.name.clone();
    admin
        .alter_configs(
            &[
                rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&events))
                    .set("retention.ms", "3600000"),
            ],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    // Config changes reach describe_configs after a moment.
    let mut err = String::new();
    for _ in 0..50 {
        let (code, e) = topology_cli("check", &ns);
        err = e;
        if code == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        err.contains("retention.ms is 3600000, the topology says -1"),
        "{err}"
    );
    let e = xsender_events::app::start(cfg.clone())
        .await
        .err()
        .expect("serve refuses drift")
        .to_string();
    assert!(e.contains("retention.ms"), "{e}");
    let (code, err) = topology_cli("apply", &ns);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("reset the configs"), "{err}");

    // A topic with the wrong partition count is reported and left alone (exit 1).
    let ns2 = format!("topo{}.", rand::random::<u32>());
    let wrong = format!(
        "{ns2}{}",
        s.topology.topics.events.name.trim_start_matches(&ns)
    );
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &wrong,
                3,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    let (code, err) = topology_cli("apply", &ns2);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("has 3 partitions, the topology says 12"),
        "{err}"
    );
}

/// One SendGrid open for a dispatch of its own.
fn open_event(id: &str) -> String {
    format!(
        r#"[{{"email":"{id}@example.com","timestamp":1764750060,"event":"open","sg_message_id":"{id}.filter","sg_event_id":"ev-{id}","xs_campaign":"load","xs_dispatch":"{id}"}}]"#
    )
}

/// Opens of a dispatch as the read API shows them (0 when there is no row).
async fn opens(h: &Harness, id: &str) -> u64 {
    let (status, body) = h.get("acme", &format!("/api/v1/dispatches/{id}")).await;
    match status {
        200 => body["opens"].as_u64().unwrap(),
        404 => 0,
        s => panic!("GET dispatch {id}: {s} {body}"),
    }
}

#[derive(Default)]
struct Outcomes {
    /// id → (sent at, status)
    answers: BTreeMap<String, (Instant, u16)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_under_load_gets_503_and_loses_no_accepted_event() {
    let broker = PrivateBroker::start().await;
    let h = Harness::kafka_on(&broker.addr, vec![TenantSpec::new("acme")], |c| {
        c.append_timeout_ms = 3000;
    })
    .await;
    let signer = Arc::new(h.tenant("acme").signer.clone().unwrap());
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (base, outcomes, stop, signer) = (
            h.base.clone(),
            outcomes.clone(),
            stop.clone(),
            signer.clone(),
        );
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("b-{w}-{i}");
                i += 1;
                let sent = Instant::now();
                let r = common::send_sendgrid(&http, &base, &signer, open_event(&id)).await;
                let status = r.map(|r| r.status().as_u16()).unwrap_or(0);
                outcomes.lock().unwrap().answers.insert(id, (sent, status));
                if status != 200 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let accepted = |o: &Outcomes| o.answers.values().filter(|(_, s)| *s == 200).count();
    wait_until(Duration::from_secs(60), || async {
        accepted(&outcomes.lock().unwrap()) >= 200
    })
    .await;
    broker.down().await;
    let down_at = Instant::now();
    // Load continues against the dead broker.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before_restart = Instant::now();
    broker.up().await;
    let accepted_at_restart = accepted(&outcomes.lock().unwrap());
    wait_until(Duration::from_secs(90), || async {
        accepted(&outcomes.lock().unwrap()) >= accepted_at_restart + 200
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let o = std::mem::take(&mut *outcomes.lock().unwrap());
    let while_down: Vec<_> = o
        .answers
        .iter()
        .filter(|(_, (sent, _))| *sent > down_at && *sent < before_restart)
        .collect();
    assert!(!while_down.is_empty());
    let refused = while_down.iter().filter(|(_, (_, s))| *s == 503).count();
    let wrongly_accepted: Vec<_> = while_down
        .iter()
        .filter(|(_, (_, s))| (200..300).contains(s))
        .collect();
    assert!(
        wrongly_accepted.is_empty(),
        "{} requests got 2xx while the broker was down, e.g. {:?}",
        wrongly_accepted.len(),
        wrongly_accepted
            .iter()
            .take(3)
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    );
    assert!(refused > 0, "no 503 while the broker was down");
    let accepted_ids: Vec<String> = o
        .answers
        .iter()
        .filter(|(_, (_, s))| *s == 200)
        .map(|(id, _)| id.clone())
        .collect();
    let refused_ids: Vec<String> = o
        .answers
        .iter()
        .filter(|(_, (_, s))| *s != 200)
        .map(|(id, _)| id.clone())
        .collect();
    eprintln!(
        "broker stop: {} accepted, {} requests while down ({} got 503)",
        accepted_ids.len(),
        while_down.len(),
        refused
    );
    h.settle_within(Duration::from_secs(120)).await;
    for id in &accepted_ids {
        assert_eq!(
            opens(&h, id).await,
            1,
            "accepted {id} projected exactly once"
        );
    }
    // A 503'd request may have reached the log anyway (its delivery report came too late):
    // the ESP's retry is then a duplicate the fold counts once. Never twice.
    for id in refused_ids.iter().take(200) {
        assert!(opens(&h, id).await <= 1, "{id} counted twice");
    }
}

/// Sends `n` requests (delivered + open of dispatch `{prefix}-{i}`), 8 at a time; all must be
/// accepted.
async fn send_pairs(h: &Harness, prefix: &str, n: usize) -> Vec<String> {
    let signer = Arc::new(h.tenant("acme").signer.clone().unwrap());
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let chunks: Vec<Vec<String>> = ids.chunks(n.div_ceil(8)).map(|c| c.to_vec()).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let (base, signer) = (h.base.clone(), signer.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for id in chunk {
                let body = format!(
                    r#"[{{"email":"{id}@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"{id}.filter","xs_campaign":"kill","xs_dispatch":"{id}"}},
{{"email":"{id}@example.com","timestamp":1764750060,"event":"open","sg_message_id":"{id}.filter","xs_campaign":"kill","xs_dispatch":"{id}"}}]"#
                );
                let r = common::send_sendgrid(&http, &base, &signer, body).await.unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_killed_mid_batch_counts_every_event_once() {
    // Ingress and normalizer in this process, the projector as its own process (roles).
    let h = Harness::kafka_with(vec![TenantSpec::new("acme")], |c| c.role = Role::Ingress).await;
    let mut ncfg = h.config.clone();
    ncfg.role = Role::Normalizer;
    ncfg.listen = "127.0.0.1:0".parse().unwrap();
    let normalizer = xsender_events::app::start(ncfg).await.unwrap();
    let ids = send_pairs(&h, "k", 1500).await;
    wait_until(Duration::from_secs(60), || async {
        normalizer
            .lag()
            .await
            .map(|l| l.normalizer == 0)
            .unwrap_or(false)
    })
    .await;
    let total = h.running.as_ref().unwrap().lag().await.unwrap().projector;
    assert_eq!(total, 3000, "every event on the topic, none projected yet");

    let dir = tempfile::tempdir().unwrap();
    let c = &h.config;
    assert_eq!(c.projection_store, ProjectionStoreKind::Cql);
    std::fs::write(
        dir.path().join("projector.toml"),
        format!(
            "log = \"kafka\"\nkafka_brokers = {:?}\nkafka_topology = {:?}\nkafka_namespace = {:?}\nprojection_store = \"cql\"\ncql_nodes = {:?}\ncql_keyspace = {:?}\nprojector_batch = 400\n",
            c.kafka_brokers,
            c.kafka_topology.as_ref().unwrap().display().to_string(),
            c.kafka_namespace,
            c.cql_nodes,
            c.cql_keyspace
        ),
    )
    .unwrap();
    let args = [
        "--config",
        "projector.toml",
        "--role",
        "projector",
        "--listen",
        "127.0.0.1:0",
    ];
    let lag = || async { h.running.as_ref().unwrap().lag().await.unwrap().projector };
    let mut kills = 0;
    for _ in 0..3 {
        let (mut child, _) = common::spawn_server(dir.path(), &args).await;
        let before = lag().await;
        // Kill as soon as the projector has written part of what is left: inside a batch
        // (400 events take far longer to write than the poll interval).
        wait_until(Duration::from_secs(60), || async {
            let l = lag().await;
            l < before || l == 0
        })
        .await;
        if lag().await == 0 {
            break;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        kills += 1;
    }
    assert!(
        kills >= 2,
        "the projector finished before it could be killed twice"
    );
    let (_child, _) = common::spawn_server(dir.path(), &args).await;
    wait_until(Duration::from_secs(120), || async { lag().await == 0 }).await;
    for id in &ids {
        let (status, body) = h.get("acme", &format!("/api/v1/dispatches/{id}")).await;
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(
            (
                body["status"].as_str(),
                body["opens"].as_u64(),
                body["events"].as_u64()
            ),
            (Some("Delivered"), Some(1), Some(2)),
            "{id} after {kills} kills: {body}"
        );
    }
    normalizer.stop().await;
}

/// The Python of the venv `scripts/python-env.sh` prepares (with confluent-kafka + fastavro).
fn python() -> String {
    if let Ok(p) = std::env::var("XSENDER_TEST_PYTHON") {
        return p;
    }
    let out = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-env.sh"),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "scripts/python-env.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs the analytics consumer on `topic`: the decoded records.
fn consume(h: &Harness, topic: &str, registry: Option<&str>) -> Vec<Value> {
    let mut cmd = std::process::Command::new(python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analytics/consume.py"))
        .args(["--brokers", &h.config.kafka_brokers.join(",")])
        .args(["--topic", topic])
        .arg("--schemas")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas"));
    if let Some(r) = registry {
        cmd.args(["--registry", r]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "consume.py on {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `GroupUnsubscribed` (the Avro symbol) and `group_unsubscribed` (the API's) as one.
fn kind(v: &Value) -> String {
    v.as_str().unwrap().to_lowercase().replace('_', "")
}

/// Posts the 17-item SendGrid batch and checks what Python reads back from the topics.
async fn analytics_read_the_topics(registry: Option<&str>) {
    let url = registry.map(str::to_string);
    let h = Harness::kafka_with(vec![TenantSpec::new("acme")], move |c| {
        c.schema_registry_url = url;
    })
    .await;
    let body = fixture("sendgrid/campaign_batch.json");
    let (status, answer) = h.post_sendgrid("acme", &body).await;
    assert_eq!(status, 200, "{answer}");
    // Where the envelope landed: partition and offset on the envelopes topic.
    assert!(
        answer["partition"]
            .as_i64()
            .is_some_and(|p| (0..12).contains(&p)),
        "{answer}"
    );
    assert_eq!(answer["offset"], 0, "the first record of its partition");
    h.settle().await;
    let topics = h.config.kafka_settings().unwrap().topology.topics;

    let records = consume(&h, &topics.events.name, registry);
    assert_eq!(
        records.len(),
        16,
        "16 events (the 17th item is a dead letter)"
    );
    let (status, api) = h.get("acme", "/api/v1/events?limit=100").await;
    assert_eq!(status, 200, "{api}");
    let from_api: BTreeSet<(String, String)> = api["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_key"].as_str().unwrap().to_string(),
                kind(&e["kind"]),
            )
        })
        .collect();
    let from_python: BTreeSet<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["event_key"].as_str().unwrap().to_string(),
                kind(&r["kind"]),
            )
        })
        .collect();
    assert_eq!(from_python.len(), 16);
    assert_eq!(
        from_python, from_api,
        "Python decodes exactly what the API serves"
    );
    for r in &records {
        // Keyed by tenant + dispatch: one partition owns a dispatch.
        assert_eq!(
            r["_key"].as_str().unwrap(),
            format!("acme\u{0}{}", r["dispatch_key"].as_str().unwrap())
        );
    }

    let envelopes = consume(&h, &topics.envelopes.name, registry);
    assert_eq!(envelopes.len(), 1);
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(envelopes[0]["body"].as_str().unwrap())
            .unwrap(),
        body,
        "the envelope keeps the exact bytes SendGrid signed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_every_record_with_only_the_avsc_files() {
    analytics_read_the_topics(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_the_confluent_wire_format_through_a_registry() {
    let registry = FakeRegistry::start().await;
    analytics_read_the_topics(Some(&registry.url)).await;
    let subjects = registry.subjects.lock().unwrap().clone();
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert!(
        subjects.iter().all(|s| s.ends_with("-value")),
        "{subjects:?}"
    );
}

/// The two endpoints of the Confluent Schema Registry API that producers and consumers use
/// (`POST /subjects/{subject}/versions`, `GET /schemas/ids/{id}`), in memory. The registry
/// itself is not installable here (not on Maven Central); this stands in for it.
struct FakeRegistry {
    url: String,
    subjects: Arc<Mutex<Vec<String>>>,
}

impl FakeRegistry {
    async fn start() -> FakeRegistry {
        use http_body_util::{BodyExt, Full};
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let schemas: Arc<Mutex<Vec<String>>> = Default::default();
        let subjects: Arc<Mutex<Vec<String>>> = Default::default();
        let (s2, sub2) = (schemas.clone(), subjects.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (schemas, subjects) = (s2.clone(), sub2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (schemas, subjects) = (schemas.clone(), subjects.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let post = req.method() == hyper::Method::POST;
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let answer = if post && path.ends_with("/versions") {
                                let v: Value = serde_json::from_slice(&body).unwrap();
                                let schema = v["schema"].as_str().unwrap().to_string();
                                let mut all = schemas.lock().unwrap();
                                let id = match all.iter().position(|s| *s == schema) {
                                    Some(i) => i + 1,
                                    None => {
                                        all.push(schema);
                                        all.len()
                                    }
                                };
                                subjects.lock().unwrap().push(
                                    path.trim_start_matches("/subjects/")
                                        .trim_end_matches("/versions")
                                        .to_string(),
                                );
                                serde_json::json!({ "id": id })
                            } else if let Some(id) = path.strip_prefix("/schemas/ids/") {
                                let i: usize = id.parse().unwrap();
                                serde_json::json!({ "schema": schemas.lock().unwrap()[i - 1] })
                            } else {
                                serde_json::json!({ "error_code": 404 })
                            };
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                bytes::Bytes::from(answer.to_string()),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeRegistry { url, subjects }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_on_kafka_from_offsets_and_time() {
    use xsender_events::app::{rebuild, RebuildFrom};
    let h = Harness::kafka_with(vec![TenantSpec::new("acme")], |_| {}).await;
    let ids = send_pairs(&h, "r", 60).await;
    h.settle().await;
    let live = h.recipients("acme", "kill").await;
    assert_eq!(live.len(), 60);

    // Every partition from offset 0, given explicitly: the same rows.
    let all_zero = (0..12).map(|p| (p, 0)).collect();
    let r = rebuild(&h.config, RebuildFrom::Offsets(all_zero), true, false)
        .await
        .unwrap();
    assert_eq!(r.events, 120);
    assert_eq!(h.recipients("acme", "kill").await, live);

    // From a time after every event was logged: an empty generation (nothing replayed).
    let later = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let r = rebuild(&h.config, RebuildFrom::Time(later), true, false)
        .await
        .unwrap();
    assert_eq!(r.events, 0);
    assert!(h.recipients("acme", "kill").await.is_empty());

    // From a time before: everything again, identical to the live rows.
    let r = rebuild(&h.config, RebuildFrom::Time(0), true, false)
        .await
        .unwrap();
    assert_eq!(r.events, 120);
    assert_eq!(h.recipients("acme", "kill").await, live);
    assert_eq!(ids.len(), 60);

    // Mistakes are named.
    let e = rebuild(
        &h.config,
        RebuildFrom::Offsets([(12, 0)].into()),
        false,
        false,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("partition 12 is not a partition"), "{e}");
    let e = rebuild(&h.config, RebuildFrom::Offset(5), false, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("offset per partition"), "{e}");
}

/// Starts one more process-like instance of `role` on the harness's cluster (in this process).
async fn start_role(h: &Harness, role: Role) -> xsender_events::app::Running {
    let mut c = h.config.clone();
    c.role = role;
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.projector_batch = 200;
    c.normalizer_batch = 16;
    xsender_events::app::start(c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_groups_rebalance_under_load_without_loss_or_double_counting() {
    let h = Harness::kafka_with(vec![TenantSpec::new("acme")], |c| c.role = Role::Ingress).await;
    let mut normalizers = vec![
        start_role(&h, Role::Normalizer).await,
        start_role(&h, Role::Normalizer).await,
    ];
    let mut projectors = vec![
        start_role(&h, Role::Projector).await,
        start_role(&h, Role::Projector).await,
    ];
    // Members leave and join while requests flow: every change is a rebalance of both groups.
    let sender = {
        let h2 = Harness {
            dir: tempfile::tempdir().unwrap(),
            running: None,
            base: h.base.clone(),
            http: h.http.clone(),
            tenants: vec![TenantSpec {
                signer: h.tenant("acme").signer.clone(),
                ..TenantSpec::new("acme")
            }],
            config: h.config.clone(),
        };
        tokio::spawn(async move { send_pairs(&h2, "rb", 1200).await })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        projectors.remove(0).stop().await;
        normalizers.remove(0).stop().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        projectors.push(start_role(&h, Role::Projector).await);
        normalizers.push(start_role(&h, Role::Normalizer).await);
    }
    let ids = sender.await.unwrap();
    h.settle_within(Duration::from_secs(120)).await;
    for id in &ids {
        let (status, body) = h.get("acme", &format!("/api/v1/dispatches/{id}")).await;
        if status != 200 {
            // Which stage lost it: are its events on the events topic?
            let (_, events) = h
                .get(
                    "acme",
                    &format!("/api/v1/events?recipient={id}@example.com"),
                )
                .await;
            let (_, dead) = h
                .admin(reqwest::Method::GET, "/api/admin/dead-letters", None)
                .await;
            let s = h.config.kafka_settings().unwrap();
            panic!(
                "{id}: {status} {body}; its events on the topic: {events}; dead letters: {dead}; envelopes {} events {}",
                common::topic_records(&s, &s.topology.topics.envelopes.name),
                common::topic_records(&s, &s.topology.topics.events.name)
            );
        }
        assert_eq!(
            (body["status"].as_str(), body["opens"].as_u64()),
            (Some("Delivered"), Some(1)),
            "{id}: {body}"
        );
    }
    for r in normalizers.into_iter().chain(projectors) {
        r.stop().await;
    }
}

/// Fault injection with librdkafka's mock cluster (the real broker cannot be made slow on
/// demand): a broker slower than the produce bound, or refusing writes, makes the append fail
/// within the bound — ingress answers 503 — and never report success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_refusing_broker_fails_the_append_within_the_bound() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use xsender_events::log::kafka::{KafkaLog, KafkaSettings, Topology};
    use xsender_events::log::EnvelopeLog;

    let mock = MockCluster::new(1).unwrap();
    let topology = Topology::load(&local_topology()).unwrap();
    mock.create_topic(&topology.topics.envelopes.name, 2, 1)
        .unwrap();
    let bound = Duration::from_millis(1500);
    let log = KafkaLog::open(KafkaSettings {
        brokers: mock.bootstrap_servers(),
        topology,
        properties: Default::default(),
        produce_timeout: bound,
        schema_registry_url: None,
    })
    .await
    .unwrap();
    let envelope = |i: u32| {
        let mut e =
            xsender_events::event::RawEnvelope::verified("sendgrid", b"[]".to_vec(), &["acme"]);
        e.id = format!("env-{i}");
        e
    };
    assert!(
        log.append(&envelope(0)).await.is_ok(),
        "a healthy broker takes it"
    );

    // Slower than the bound: an error after about the bound, never Ok.
    mock.broker_round_trip_time(-1, Duration::from_secs(4))
        .unwrap();
    let started = Instant::now();
    let e = log.append(&envelope(1)).await.unwrap_err().to_string();
    let took = started.elapsed();
    assert!(
        e.contains("within 1500 ms") || e.contains("timed out"),
        "{e}"
    );
    assert!(
        took < Duration::from_secs(4),
        "waited {took:?}, past the bound"
    );
    mock.broker_round_trip_time(-1, Duration::ZERO).unwrap();

    // Every produce refused with a retriable error (not enough in-sync replicas): retried until
    // the bound, then an error.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 64],
    );
    assert!(log.append(&envelope(2)).await.is_err());
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    // And it recovers.
    let mut ok = false;
    for i in 3..40 {
        if log.append(&envelope(i)).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "appends succeed again once the broker is healthy");
}
