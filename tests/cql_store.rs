//! The CQL projection store against the embedded one, at the store interface: the same events
//! give the same rows through every read, and a projector killed mid-batch (at each point of
//! the CQL write order) and restarted gives exactly the rows of an uninterrupted run, also with
//! batches that carry several log partitions.
//! Needs a CQL node: `scripts/cassandra.sh start`.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use xsender_events::event::{BounceClass, DeliveryEvent, EventKind};
use xsender_events::fold::DispatchStatus;
use xsender_events::log::Record;
use xsender_events::projection::cql::{CqlProjections, CqlSettings, CrashPoint};
use xsender_events::projection::sqlite::SqliteProjections;
use xsender_events::projection::{Batch, Positions, ProjectionStore, RecipientsQuery, StoreError};

const TENANTS: [&str; 2] = ["acme", "globex"];
const CAMPAIGNS: [&str; 3] = ["spring", "summer", "fall"];

fn event(i: u64, tenant: &str, dispatch: u64, kind: EventKind) -> DeliveryEvent {
    let campaign = (dispatch % 4 != 3).then(|| CAMPAIGNS[(dispatch % 3) as usize].to_string());
    let recipient = format!("r{}@example.com", dispatch % 9);
    let dispatch_key = match &campaign {
        Some(_) => DeliveryEvent::attributed_dispatch_key(&format!("d-{dispatch:02}")),
        None => DeliveryEvent::fallback_dispatch_key(Some(&format!("M{dispatch}")), &recipient),
    };
    DeliveryEvent {
        trace_parent: None,
        event_key: format!("k{i}"),
        tenant: tenant.to_string(),
        provider: "sendgrid".to_string(),
        kind,
        dispatch_id: campaign.as_ref().map(|_| format!("d-{dispatch:02}")),
        dispatch_key,
        campaign_id: campaign,
        message_id: Some(format!("M{dispatch}")),
        recipient,
        occurred_at_ms: 1_764_750_000_000 + ((i * 7919) % 1000) as i64 * 1000,
        received_at_ms: 1_764_750_000_000,
        envelope_id: format!("env-{}", i / 5),
        provider_event: kind.as_str().to_string(),
        provider_event_id: None,
        bounce_class: (kind == EventKind::Bounced).then_some(if !i.is_multiple_of(3) {
            BounceClass::Hard
        } else {
            BounceClass::Soft
        }),
        reason: matches!(kind, EventKind::Bounced | EventKind::Dropped)
            .then(|| format!("reason {i}")),
        smtp_status: None,
        url: (kind == EventKind::Clicked).then(|| format!("https://example.com/{}", i % 3)),
        user_agent: None,
        ip: None,
        machine: kind == EventKind::Opened && i.is_multiple_of(5),
        group_id: matches!(
            kind,
            EventKind::GroupUnsubscribed | EventKind::GroupResubscribed
        )
        .then(|| format!("g{}", i % 2)),
    }
}

/// A deterministic log: every kind, several tenants and campaigns, unattributed dispatches,
/// exact duplicates (same key, same dispatch) and a key reused on another dispatch.
fn log() -> Vec<Record<DeliveryEvent>> {
    let kinds = [
        EventKind::Sent,
        EventKind::Delivered,
        EventKind::Opened,
        EventKind::Clicked,
        EventKind::Opened,
        EventKind::Bounced,
        EventKind::Deferred,
        EventKind::Complained,
        EventKind::Unsubscribed,
        EventKind::GroupUnsubscribed,
        EventKind::GroupResubscribed,
        EventKind::Dropped,
        EventKind::Clicked,
        EventKind::Other,
    ];
    let mut evs = Vec::new();
    for i in 0..150u64 {
        let tenant = TENANTS[(i % 7 % 2) as usize];
        let kind = kinds[(i * 5 % kinds.len() as u64) as usize];
        evs.push(event(i, tenant, i * 3 % 23, kind));
        if i % 11 == 0 {
            // An ESP retry: the same happening again.
            evs.push(event(i, tenant, i * 3 % 23, kind));
        }
        if i % 17 == 0 {
            // The same key on another dispatch: counted once, on the first.
            evs.push(event(i, tenant, (i * 3 + 1) % 23, kind));
        }
    }
    evs.into_iter()
        .enumerate()
        .map(|(n, value)| Record {
            offset: n as i64 + 1,
            value,
        })
        .collect()
}

/// Everything the read API can see, through every read of the trait.
async fn snapshot(store: &dyn ProjectionStore) -> Value {
    let mut out = serde_json::Map::new();
    out.insert(
        "checkpoint".into(),
        json!(store.checkpoint().await.unwrap()),
    );
    out.insert(
        "checkpoints".into(),
        json!(store.checkpoints().await.unwrap()),
    );
    for tenant in TENANTS {
        for campaign in CAMPAIGNS {
            for status in [
                None,
                Some(DispatchStatus::Delivered),
                Some(DispatchStatus::Bounced),
            ] {
                let mut rows = Vec::new();
                let mut after = None;
                loop {
                    let page = store
                        .recipients(RecipientsQuery {
                            tenant: tenant.into(),
                            campaign_id: campaign.into(),
                            status,
                            after: after.clone(),
                            limit: 4,
                        })
                        .await
                        .unwrap();
                    let Some(last) = page.last() else { break };
                    after = Some(last.dispatch_key.clone());
                    rows.extend(page.into_iter().map(|r| serde_json::to_value(r).unwrap()));
                }
                out.insert(format!("{tenant}/{campaign}/{status:?}"), json!(rows));
            }
        }
        for d in 0..23u64 {
            let e = event(0, tenant, d, EventKind::Sent);
            for id in [e.dispatch_id.clone().unwrap_or_default(), e.dispatch_key] {
                let row = store.dispatch(tenant, &id).await.unwrap();
                out.insert(format!("{tenant}/dispatch/{id}"), json!(row));
            }
        }
        let mut list = Vec::new();
        let mut after = None;
        loop {
            let page = store.suppressions(tenant, after.clone(), 2).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some((last.email.clone(), last.reason.as_str().to_string()));
            list.extend(page.into_iter().map(|r| serde_json::to_value(r).unwrap()));
        }
        out.insert(format!("{tenant}/suppressions"), json!(list));
        for r in 0..9 {
            let email = format!("r{r}@example.com");
            let s = store.suppressions_of(tenant, &email).await.unwrap();
            out.insert(format!("{tenant}/suppressions/{email}"), json!(s));
            let c = store.contact(tenant, &email).await.unwrap();
            out.insert(format!("{tenant}/contact/{email}"), json!(c));
        }
    }
    Value::Object(out)
}

async fn cql_store() -> (CqlSettings, CqlProjections) {
    let settings = CqlSettings {
        nodes: vec![common::cql_node()],
        keyspace: common::fresh_cql_keyspace().await,
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
    };
    let store = CqlProjections::open(&settings).await.unwrap();
    (settings, store)
}

/// What the live projector does: read from the checkpoint, apply a batch.
async fn project(store: &dyn ProjectionStore, log: &[Record<DeliveryEvent>], batch: usize) {
    loop {
        let cp = store.checkpoint().await.unwrap();
        let next: Vec<_> = log
            .iter()
            .filter(|r| r.offset > cp)
            .take(batch)
            .cloned()
            .collect();
        if next.is_empty() {
            return;
        }
        store.apply(Batch::single(0, next)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_rows_as_the_embedded_store_and_exact_after_a_kill_at_any_point() {
    let log = log();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteProjections::open(&dir.path().join("p.db")).unwrap();
    project(&sqlite, &log, 16).await;
    let expected = snapshot(&sqlite).await;
    assert!(expected.to_string().contains("HardBounce"));

    // Uninterrupted CQL run: identical to the embedded store through every read.
    let (_, clean) = cql_store().await;
    project(&clean, &log, 16).await;
    let clean_rows = snapshot(&clean).await;
    assert_eq!(clean_rows, expected);

    // Killed at each point of the write order, one kill per batch, each followed by a
    // restart (a new store instance resuming from the stored checkpoint) with other batch
    // boundaries.
    let (settings, mut store) = cql_store().await;
    let kills = [
        CrashPoint::AfterDispatchRows(0),
        CrashPoint::AfterDispatchRows(3),
        CrashPoint::BeforeSeen,
        CrashPoint::BeforeCheckpoint,
        CrashPoint::AfterDispatchRows(7),
        CrashPoint::BeforeSeen,
    ];
    let mut killed = 0;
    for (n, point) in kills.into_iter().enumerate() {
        let cp = store.checkpoint().await.unwrap();
        let batch: Vec<_> = log
            .iter()
            .filter(|r| r.offset > cp)
            .take(16 + n)
            .cloned()
            .collect();
        store.crash_next_apply(point);
        let err = store.apply(Batch::single(0, batch)).await.unwrap_err();
        assert!(err.to_string().contains("injected crash"), "{err}");
        killed += 1;
        assert_eq!(
            store.checkpoint().await.unwrap(),
            cp,
            "the checkpoint moves last"
        );
        store = CqlProjections::open(&settings).await.unwrap();
        // Part of the way on, then the next kill.
        let cp = store.checkpoint().await.unwrap();
        let next: Vec<_> = log
            .iter()
            .filter(|r| r.offset > cp)
            .take(5)
            .cloned()
            .collect();
        store.apply(Batch::single(0, next)).await.unwrap();
    }
    assert_eq!(killed, 6);
    project(&store, &log, 13).await;
    assert_eq!(snapshot(&store).await, clean_rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_generation_gives_the_same_rows_and_old_ones_drop() {
    let log = log();
    let (settings, store) = cql_store().await;
    project(&store, &log[..100], 16).await;
    let g = store
        .create_generation(&Positions::from([(0, 1)]))
        .await
        .unwrap();
    assert_eq!(g, 2);
    store
        .apply_to(g, Batch::single(0, log[..40].to_vec()))
        .await
        .unwrap();
    // The live projector goes on writing generation 1 while the rebuild catches up.
    project(&store, &log, 16).await;
    let before = snapshot(&store).await;
    // A reader in another process, its generation-1 statements prepared before the switch.
    let other = CqlProjections::open(&settings).await.unwrap();
    assert_eq!(snapshot(&other).await, before);
    let tail_log = log.clone();
    store
        .switch_to(
            g,
            vec![0],
            Box::new(move |part, after, max| {
                assert_eq!(part, 0);
                Ok(tail_log
                    .iter()
                    .filter(|r| r.offset > after)
                    .take(max)
                    .cloned()
                    .collect())
            }),
        )
        .await
        .unwrap();
    let gens = store.generations().await.unwrap();
    assert_eq!(gens.len(), 2);
    assert!(gens[1].current);
    assert_eq!(
        gens[1].checkpoints,
        Positions::from([(0, log.len() as i64)])
    );
    assert_eq!(snapshot(&store).await, before);
    assert_eq!(store.drop_old().await.unwrap(), vec![1]);
    assert_eq!(snapshot(&store).await, before);
    // A reader that picked generation 1 just before the switch reaches its dropped tables: the
    // read is retried on the current generation instead of failing.
    other.read_stale_generation_once(1);
    assert_eq!(snapshot(&other).await, before);
    store.read_stale_generation_once(1);
    assert_eq!(snapshot(&store).await, before);
    // A batch that straddles the new checkpoint is a gap only when it skips ahead.
    let extra = Record {
        offset: log.len() as i64 + 5,
        value: event(999, "acme", 1, EventKind::Opened),
    };
    assert!(matches!(
        store.apply(Batch::single(0, vec![extra])).await,
        Err(StoreError::Gap { partition: 0, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_names_the_migrate_command_when_the_schema_is_missing() {
    let settings = CqlSettings {
        nodes: vec![common::cql_node()],
        keyspace: "xs_never_migrated".into(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
    };
    let err = CqlProjections::open(&settings)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("xsender-events migrate --cql-nodes") && err.contains("xs_never_migrated"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_names_the_migrate_command_when_the_schema_is_behind() {
    let (settings, _store) = cql_store().await;
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(common::cql_node())
        .build()
        .await
        .unwrap();
    let last = xsender_events::projection::cql::MIGRATIONS
        .last()
        .unwrap()
        .0;
    session
        .query_unpaged(
            format!(
                "DELETE FROM {}.schema_migrations WHERE version = {last}",
                settings.keyspace
            ),
            (),
        )
        .await
        .unwrap();
    let err = CqlProjections::open(&settings)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("needs {last}")) && err.contains("xsender-events migrate"),
        "{err}"
    );
    // `migrate` brings it up to date again (its files are idempotent).
    let applied = xsender_events::projection::cql::migrate(&settings)
        .await
        .unwrap();
    assert_eq!(applied, vec![last]);
    CqlProjections::open(&settings).await.unwrap();
}

type Logs = BTreeMap<i32, Vec<Record<DeliveryEvent>>>;

/// `log()` spread over 3 log partitions by event key (every copy of a key in one partition, as
/// the log must key them), offsets from 1 in each partition.
fn partitioned_log() -> Logs {
    let mut out = Logs::new();
    for r in log() {
        let n: i32 = r.value.event_key[1..].parse().unwrap();
        let part = out.entry(n % 3).or_default();
        part.push(Record {
            offset: part.len() as i64 + 1,
            value: r.value,
        });
    }
    out
}

/// A batch of the given runs: `(partition, after, count)`.
fn runs(logs: &Logs, spec: &[(i32, i64, usize)]) -> Batch {
    Batch {
        parts: spec
            .iter()
            .map(|(p, after, n)| {
                let run = logs[p]
                    .iter()
                    .filter(|r| r.offset > *after)
                    .take(*n)
                    .cloned()
                    .collect();
                (*p, run)
            })
            .collect(),
    }
}

fn ends(logs: &Logs) -> Positions {
    logs.iter().map(|(p, l)| (*p, l.len() as i64)).collect()
}

/// The rows of folding every partition in one batch, in the embedded store.
async fn sequential_rows(logs: &Logs) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteProjections::open(&dir.path().join("p.db")).unwrap();
    sqlite
        .apply(Batch {
            parts: logs.iter().map(|(p, l)| (*p, l.clone())).collect(),
        })
        .await
        .unwrap();
    snapshot(&sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_several_partitions_move_each_skip_replays_and_write_nothing_on_a_gap() {
    let logs = partitioned_log();
    let (_, store) = cql_store().await;
    // Two partitions in one batch: both move.
    store
        .apply(runs(&logs, &[(0, 0, 10), (1, 0, 6)]))
        .await
        .unwrap();
    assert_eq!(
        store.checkpoints().await.unwrap(),
        Positions::from([(0, 10), (1, 6)])
    );
    assert_eq!(store.checkpoint().await.unwrap(), 10);
    let before = snapshot(&store).await;
    // Replaying an applied run, alone or beside another partition's, changes nothing.
    store.apply(runs(&logs, &[(1, 0, 6)])).await.unwrap();
    store
        .apply(runs(&logs, &[(1, 2, 4), (0, 0, 10)]))
        .await
        .unwrap();
    assert_eq!(snapshot(&store).await, before);
    // A gap in one partition is reported with the partition, and nothing of the batch is
    // written: not partition 0's run before it, nor partition 2's after it.
    let mut batch = runs(&logs, &[(0, 10, 5), (1, 7, 3), (2, 0, 5)]);
    assert_eq!(batch.len(), 13);
    let err = store.apply(batch.clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Gap {
                partition: 1,
                first: 8,
                checkpoint: 6
            }
        ),
        "{err}"
    );
    assert_eq!(snapshot(&store).await, before);
    // With partition 1's run from its checkpoint the same batch goes through.
    batch.parts[1] = runs(&logs, &[(1, 6, 3)]).parts.remove(0);
    store.apply(batch).await.unwrap();
    assert_eq!(
        store.checkpoints().await.unwrap(),
        Positions::from([(0, 15), (1, 9), (2, 5)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_starts_per_partition_and_switch_to_catches_each_up() {
    let logs = Arc::new(partitioned_log());
    let (_, store) = cql_store().await;
    let g = store
        .create_generation(&Positions::from([(0, 1), (1, 5), (2, 0), (3, 10)]))
        .await
        .unwrap();
    assert_eq!(g, 2);
    let gens = store.generations().await.unwrap();
    assert!(gens[0].current && !gens[1].current);
    assert_eq!(gens[0].checkpoints, Positions::from([(0, 0)]));
    assert_eq!(
        gens[1].checkpoints,
        Positions::from([(0, 0), (1, 4), (2, 0), (3, 9)])
    );
    // Each partition continues from its own start: below it is a replay, beyond it a gap.
    store.apply_to(g, runs(&logs, &[(1, 0, 3)])).await.unwrap();
    assert!(matches!(
        store.apply_to(g, runs(&logs, &[(1, 5, 3)])).await,
        Err(StoreError::Gap {
            partition: 1,
            first: 6,
            checkpoint: 4
        })
    ));
    store
        .apply_to(g, runs(&logs, &[(1, 4, 3), (2, 0, 1)]))
        .await
        .unwrap();
    assert_eq!(
        store.generations().await.unwrap()[1].checkpoints,
        Positions::from([(0, 0), (1, 7), (2, 1), (3, 9)])
    );
    // A generation from the start of every partition, caught up by the switch.
    let g = store
        .create_generation(&Positions::from([(0, 1), (1, 1), (2, 1)]))
        .await
        .unwrap();
    assert_eq!(g, 3);
    store
        .apply_to(g, runs(&logs, &[(0, 0, 20), (2, 0, 7)]))
        .await
        .unwrap();
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tail_logs, tail_calls) = (logs.clone(), calls.clone());
    store
        .switch_to(
            g,
            vec![0, 1, 2],
            Box::new(move |part, after, max| {
                tail_calls.lock().unwrap().push((part, after));
                Ok(tail_logs[&part]
                    .iter()
                    .filter(|r| r.offset > after)
                    .take(max.min(25))
                    .cloned()
                    .collect())
            }),
        )
        .await
        .unwrap();
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.first(), Some(&(0, 20)), "from the checkpoint");
    assert!(
        calls.contains(&(1, 0)) && calls.contains(&(2, 7)),
        "{calls:?}"
    );
    assert_eq!(store.checkpoints().await.unwrap(), ends(&logs));
    let gens = store.generations().await.unwrap();
    assert_eq!(
        gens.iter()
            .map(|g| (g.generation, g.current))
            .collect::<Vec<_>>(),
        vec![(1, false), (2, false), (3, true)]
    );
    assert_eq!(snapshot(&store).await, sequential_rows(&logs).await);
    assert_eq!(store.drop_old().await.unwrap(), vec![1, 2]);
    assert_eq!(store.generations().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_checkpoint_of_an_older_keyspace_is_partition_0() {
    let log = log();
    let (settings, store) = cql_store().await;
    project(&store, &log[..30], 16).await;
    // As a keyspace written before 003: the checkpoint only in projection_generations.
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(common::cql_node())
        .build()
        .await
        .unwrap();
    let ks = &settings.keyspace;
    for cql in [
        format!("DELETE FROM {ks}.projection_checkpoints WHERE gen = 1"),
        format!("UPDATE {ks}.projection_generations SET checkpoint = 30 WHERE gen = 1"),
    ] {
        session.query_unpaged(cql, ()).await.unwrap();
    }
    let store = CqlProjections::open(&settings).await.unwrap();
    assert_eq!(
        store.checkpoints().await.unwrap(),
        Positions::from([(0, 30)])
    );
    assert_eq!(
        store.generations().await.unwrap()[0].checkpoints,
        Positions::from([(0, 30)])
    );
    assert!(matches!(
        store.apply(Batch::single(0, log[31..40].to_vec())).await,
        Err(StoreError::Gap {
            partition: 0,
            first: 32,
            checkpoint: 30
        })
    ));
    // It resumes right after; from then on partition 0's own row counts.
    project(&store, &log, 16).await;
    assert_eq!(store.checkpoint().await.unwrap(), log.len() as i64);
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteProjections::open(&dir.path().join("p.db")).unwrap();
    project(&sqlite, &log, 16).await;
    assert_eq!(snapshot(&store).await, snapshot(&sqlite).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_partitions_with_replays_and_kills_give_the_sequential_rows() {
    let logs = partitioned_log();
    let expected = sequential_rows(&logs).await;
    let ends = ends(&logs);

    // Killed between the checkpoints of a 3-partition batch: the partitions whose checkpoint
    // landed are done, the others replay.
    let (settings, store) = cql_store().await;
    store
        .apply(runs(&logs, &[(0, 0, 4), (1, 0, 4), (2, 0, 4)]))
        .await
        .unwrap();
    store.crash_next_apply(CrashPoint::AfterCheckpoints(1));
    let err = store
        .apply(runs(&logs, &[(2, 4, 9), (0, 4, 9), (1, 4, 9)]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected crash"), "{err}");
    assert_eq!(
        store.checkpoints().await.unwrap(),
        Positions::from([(0, 13), (1, 4), (2, 4)]),
        "partition order, after every row"
    );
    let mut store = CqlProjections::open(&settings).await.unwrap();

    // Then random interleavings of per-partition chunks, several to a batch, re-deliveries
    // from before the checkpoint, and kills anywhere in the write order.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut kills = 0;
    let mut batches = 0;
    loop {
        let cps = store.checkpoints().await.unwrap();
        let open: Vec<i32> = ends
            .iter()
            .filter(|(p, end)| cps.get(p).copied().unwrap_or(0) < **end)
            .map(|(p, _)| *p)
            .collect();
        if open.is_empty() {
            break;
        }
        let mut spec = Vec::new();
        let mut planned = cps.clone();
        for _ in 0..rng.gen_range(1..=3) {
            let part = open[rng.gen_range(0..open.len())];
            let cp = planned.get(&part).copied().unwrap_or(0);
            let from = if rng.gen_bool(0.3) {
                rng.gen_range(0..=cp)
            } else {
                cp
            };
            let n = rng.gen_range(1..=12);
            spec.push((part, from, n));
            planned.insert(part, (from + n as i64).min(ends[&part]).max(cp));
        }
        if rng.gen_bool(0.2) {
            store.crash_next_apply(match rng.gen_range(0..5) {
                0 => CrashPoint::AfterDispatchRows(rng.gen_range(0..5)),
                1 => CrashPoint::BeforeSeen,
                2 => CrashPoint::BeforeCheckpoint,
                _ => CrashPoint::AfterCheckpoints(rng.gen_range(0..3)),
            });
        }
        batches += 1;
        match store.apply(runs(&logs, &spec)).await {
            Ok(()) => {}
            Err(e) => {
                assert!(e.to_string().contains("injected crash"), "{e}");
                kills += 1;
                store = CqlProjections::open(&settings).await.unwrap();
            }
        }
        assert!(batches < 1000);
    }
    assert!(kills >= 3, "{kills} kills in {batches} batches");
    assert_eq!(store.checkpoints().await.unwrap(), ends);
    assert_eq!(snapshot(&store).await, expected);
}
