//! Golden tests: each provider's documented payloads, normalized, against the published table.

use xsender_events::event::RawEnvelope;
use xsender_events::providers::{registry, Normalized, Provider, ProviderSettings};

fn provider(name: &str) -> std::sync::Arc<dyn Provider> {
    registry(&ProviderSettings::default())
        .into_iter()
        .find(|p| p.name() == name)
        .unwrap()
}

fn envelope(provider: &str, body: Vec<u8>) -> RawEnvelope {
    RawEnvelope::verified(provider, body, &["acme"])
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

#[test]
fn sendgrid_documented_examples_map_per_the_table() {
    let out = provider("sendgrid").normalize(&envelope(
        "sendgrid",
        fixture("sendgrid/docs_examples.json"),
    ));
    let summary: Vec<String> = out
        .iter()
        .map(|n| match n {
            Normalized::Event(e) => format!(
                "{}:{}{}{}",
                e.provider_event,
                e.kind.as_str(),
                e.bounce_class
                    .map(|b| format!("/{}", b.as_str()))
                    .unwrap_or_default(),
                if e.machine { "/machine" } else { "" }
            ),
            Normalized::Dead(d) => format!("dead:{}", d.reason),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "processed:sent",
            "dropped:dropped",
            "delivered:delivered",
            "deferred:deferred",
            "bounce:bounced/hard",
            "bounce:bounced/soft",
            "open:opened",
            "click:clicked",
            "spamreport:complained",
            "unsubscribe:unsubscribed",
            "group_unsubscribe:group_unsubscribed",
            "group_resubscribe:group_resubscribed",
            "dead:account_event",
        ]
    );
    // All of SendGrid's examples carry no XSender metadata: kept, keyed by message id + recipient.
    let Normalized::Event(deferred) = &out[3] else {
        panic!()
    };
    assert_eq!(
        deferred.dispatch_key, "m:14c5d75ce93.dfd.64b469:alex@example.com",
        "leading space trimmed"
    );
    assert_eq!(deferred.reason.as_deref(), Some("400 try again later"));
    let Normalized::Event(click) = &out[7] else {
        panic!()
    };
    assert_eq!(
        click.url.as_deref(),
        Some("http://example.com/blog/news.html")
    );
    assert!(click.user_agent.as_deref().unwrap().contains("iPhone"));
    let Normalized::Event(g) = &out[10] else {
        panic!()
    };
    assert_eq!(g.group_id.as_deref(), Some("10"));
}

#[test]
fn sendgrid_machine_open_and_event_keys_survive_a_changed_sg_event_id() {
    let body = br#"[{"email":"a@x.com","timestamp":1,"event":"open","sg_machine_open":true,"sg_event_id":"one","sg_message_id":"M.filter"},
{"email":"a@x.com","timestamp":1,"event":"open","sg_machine_open":true,"sg_event_id":"two","sg_message_id":"M.filter"}]"#;
    let out = provider("sendgrid").normalize(&envelope("sendgrid", body.to_vec()));
    let keys: Vec<&str> = out
        .iter()
        .map(|n| match n {
            Normalized::Event(e) => {
                assert!(e.machine);
                e.event_key.as_str()
            }
            Normalized::Dead(d) => panic!("{d:?}"),
        })
        .collect();
    assert_eq!(
        keys[0], keys[1],
        "a retry with a new sg_event_id is the same happening"
    );
}

#[test]
fn sendgrid_never_panics_on_hostile_items() {
    let p = provider("sendgrid");
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    for body in [
        b"[1, \"x\", null, [], {}]".to_vec(),
        br#"[{"email": 5, "event": "open", "timestamp": 1}]"#.to_vec(),
        br#"[{"email": "a@x.com", "event": "open", "timestamp": 1e400}]"#.to_vec(),
        br#"[{"email": "a@x.com", "event": "open", "timestamp": 99999999999999999999}]"#.to_vec(),
        br#"[{"email": "not an address", "event": "open", "timestamp": 1}]"#.to_vec(),
        b"[{\"email\": \"a@x.com\", \"event\": \"\xff\xfe\", \"timestamp\": 1}]".to_vec(),
        nested.into_bytes(),
        b"".to_vec(),
    ] {
        let out = p.normalize(&envelope("sendgrid", body.clone()));
        assert!(
            !out.is_empty(),
            "nothing vanishes: {}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        for n in &out {
            if let Normalized::Event(e) = n {
                panic!("hostile item became an event: {e:?}");
            }
        }
    }
}
