//! One webhook's spans from all three stages arrive in one trace at a real OpenTelemetry
//! Collector on loopback (built from `tools/otelcol` by `scripts/otelcol.sh`, which
//! `scripts/test.sh` runs first).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{free_port, spawn_server_with_env, wait_until, Backend, SendGridSigner};

#[derive(Debug, Default, Clone)]
struct Span {
    trace: String,
    parent: String,
    id: String,
    name: String,
}

/// Spans from the debug exporter's detailed output.
fn spans(log: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let mut cur: Option<Span> = None;
    for line in log.lines() {
        let field = |label: &str| {
            line.trim_start()
                .strip_prefix(label)
                .map(|v| v.trim_start_matches([' ', ':']).trim().to_string())
        };
        if line.starts_with("Span #") {
            out.extend(cur.take());
            cur = Some(Span::default());
        } else if let Some(s) = cur.as_mut() {
            if let Some(v) = field("Trace ID") {
                s.trace = v;
            } else if let Some(v) = field("Parent ID") {
                s.parent = v;
            } else if let Some(v) = field("ID ") {
                s.id = v;
            } else if let Some(v) = field("Name") {
                s.name = v;
            }
        }
    }
    out.extend(cur);
    out
}

// On Kafka the trace context crosses two topics inside the Avro records.
backend_tests!(one_webhook_is_one_trace_across_all_three_stages);

async fn one_webhook_is_one_trace_across_all_three_stages(backend: Backend) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log_path = dir.path().join("otelcol.log");
    let out = std::process::Command::new(root.join("scripts/otelcol.sh"))
        .args(["start", &port.to_string(), log_path.to_str().unwrap()])
        .output()
        .expect("scripts/otelcol.sh runs");
    assert!(
        out.status.success(),
        "the collector must start (scripts/otelcol.sh build): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let collector_pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Stop(String);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/otelcol.sh"),
            )
            .args(["stop", &self.0])
            .status();
        }
    }
    let _stop = Stop(collector_pid);

    let signer = SendGridSigner::random();
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(&tenants, format!("[tenants.acme]\napi_token = \"trace-test-token-0123456789\"\n[tenants.acme.sendgrid]\nverification_key = \"{}\"\n", signer.verification_key())).unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let args = backend.serve_args(&tenants).await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut child, base) = spawn_server_with_env(
        dir.path(),
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let body = br#"[{"email":"a@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"T1.filter","xs_campaign":"c","xs_dispatch":"traced"},
{"email":"a@example.com","timestamp":1764750060,"event":"open","sg_message_id":"T1.filter","xs_campaign":"c","xs_dispatch":"traced"}]"#;
    let http = reqwest::Client::new();
    let r = common::send_sendgrid(&http, &base, &signer, body.to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until(Duration::from_secs(20), || async {
        let r = http
            .get(format!("{base}/api/v1/dispatches/traced"))
            .bearer_auth("trace-test-token-0123456789")
            .send()
            .await
            .unwrap();
        r.status() == 200 && r.json::<serde_json::Value>().await.unwrap()["events"] == 2
    })
    .await;
    // SIGTERM flushes the exporter on the way out.
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().unwrap().to_string())
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();

    let mut found: Vec<Span> = Vec::new();
    wait_until(Duration::from_secs(20), || {
        found = spans(&std::fs::read_to_string(&log_path).unwrap_or_default());
        let names: Vec<&str> = found.iter().map(|s| s.name.as_str()).collect();
        let ok = ["webhook", "normalize", "project"]
            .iter()
            .all(|n| names.contains(n));
        async move { ok }
    })
    .await;
    let by_name: HashMap<&str, &Span> = found.iter().map(|s| (s.name.as_str(), s)).collect();
    let (w, n, p) = (by_name["webhook"], by_name["normalize"], by_name["project"]);
    assert!(!w.trace.is_empty());
    assert_eq!(
        (n.trace.as_str(), p.trace.as_str()),
        (w.trace.as_str(), w.trace.as_str()),
        "one trace: {found:#?}"
    );
    assert_eq!(n.parent, w.id, "normalize is a child of the webhook span");
    assert_eq!(p.parent, n.id, "project is a child of normalize");
}
