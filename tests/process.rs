//! The real binary as an operator runs it: start with no configuration, SIGKILL under load,
//! SIGTERM.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{spawn_server as spawn, wait_until, SendGridSigner};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_configuration_just_works() {
    let dir = tempfile::tempdir().unwrap();
    // Only the port is chosen (8080 may be taken on a shared machine); nothing else is set.
    let (mut child, base) = spawn(dir.path(), &["--listen", "127.0.0.1:0"]).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for f in ["log.db", "projections.db", "tenants.db"] {
        assert!(
            dir.path().join("data").join(f).exists(),
            "{f} created in ./data"
        );
    }
    // With no tenant configured, webhooks fail closed and say how to fix it.
    let r = http
        .post(format!("{base}/api/webhook/email/sendgrid"))
        .header("content-type", "application/json")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // SIGTERM: a clean, prompt exit.
    let pid = child.id().unwrap() as i32;
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_accepted_event() {
    sigkill_under_load(&[]).await
}

/// The same with projections in Cassandra: the kill lands wherever the projector is in its
/// non-transactional write sequence, and the restart still projects each event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_with_cql_projections_counts_each_event_once() {
    let keyspace = common::fresh_cql_keyspace().await;
    let node = common::cql_node();
    sigkill_under_load(&[
        "--projections",
        "cql",
        "--cql-nodes",
        &node,
        "--cql-keyspace",
        &keyspace,
    ])
    .await
}

/// The cluster backend: the kill lands between a delivery report and the 2xx, inside a
/// normalizer batch whose events are half produced, inside a projector batch half written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_on_kafka_counts_each_event_once() {
    let keyspace = common::fresh_cql_keyspace().await;
    let node = common::cql_node();
    let broker = common::kafka_broker();
    let namespace = common::fresh_kafka_namespace(&broker).await;
    let topology = common::local_topology();
    sigkill_under_load(&[
        "--kafka-brokers",
        &broker,
        "--kafka-topology",
        topology.to_str().unwrap(),
        "--kafka-namespace",
        &namespace,
        "--projections",
        "cql",
        "--cql-nodes",
        &node,
        "--cql-keyspace",
        &keyspace,
    ])
    .await
}

async fn sigkill_under_load(store_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(SendGridSigner::random());
    let token = "crash-test-token-0123456789";
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(&tenants, format!("[tenants.acme]\napi_token = \"{token}\"\n[tenants.acme.sendgrid]\nverification_key = \"{}\"\n", signer.verification_key())).unwrap();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--tenants",
        tenants.to_str().unwrap(),
    ];
    args.extend_from_slice(store_args);
    let (mut child, base) = spawn(dir.path(), &args).await;

    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (base, signer, accepted) = (base.clone(), signer.clone(), accepted.clone());
        workers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0.. {
                let id = format!("k-{w}-{i}");
                let body = format!(
                    r#"[{{"email":"{id}@example.com","timestamp":1764750000,"event":"delivered","sg_message_id":"{id}.filter","xs_campaign":"load","xs_dispatch":"{id}"}},
{{"email":"{id}@example.com","timestamp":1764750060,"event":"open","sg_message_id":"{id}.filter","xs_campaign":"load","xs_dispatch":"{id}"}}]
"#
                );
                let r = common::send_sendgrid(&http, &base, &signer, body).await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Ok(r) => panic!("unexpected {} before the kill", r.status()),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    wait_until(Duration::from_secs(60), || async {
        accepted.lock().unwrap().len() >= 400
    })
    .await;
    child.start_kill().unwrap(); // SIGKILL: no shutdown code runs
    child.wait().await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 400);

    let (_child, base) = spawn(dir.path(), &args).await;
    let http = reqwest::Client::new();
    for id in &accepted {
        let url = format!("{base}/api/v1/dispatches/{id}");
        wait_until(Duration::from_secs(30), || async {
            let r = http.get(&url).bearer_auth(token).send().await.unwrap();
            if r.status() != 200 {
                return false;
            }
            let row: serde_json::Value = r.json().await.unwrap();
            assert_eq!(row["status"], "Delivered", "{id}: {row}");
            row["opens"] == 1 && row["events"] == 2
        })
        .await;
    }
    eprintln!(
        "{} accepted requests, all projected exactly once after SIGKILL + restart",
        accepted.len()
    );
}
