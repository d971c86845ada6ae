//! The embedded projection store: one SQLite file, one set of tables per generation
//! (`dispatches_<g>`, `seen_by_time_<g>`, `suppressions_<g>`, `contacts_<g>`), and a `current`
//! row that names the generation readers and the projector use.
//!
//! `seen_by_time_<g>` holds the event keys already folded, led by the event's time: event keys
//! are hashes, so a table ordered by them takes every insert on a random page (one 4 KiB page
//! written to the WAL, and again by the checkpoint, per event); led by time, inserts land at the
//! end of the b-tree as events arrive. That keeps the dedupe exact because every provider's
//! event key binds the event's time (see `DeliveryEvent::event_key`): two copies of one event
//! share both. Generations created before this kept their keys in `seen_<g>`, by key alone:
//! such a generation is still checked against it (read only) until a rebuild replaces it.
//!
//! `generations` lists the generations; `checkpoints` holds each generation's checkpoint per
//! log partition, moved in the transaction that folds the batch. Data folders written before
//! checkpoints were per partition kept a single `generations.checkpoint`: `open` carries it
//! over as partition 0 (once: an existing row is never overwritten), so such a deployment
//! resumes exactly where it was. The old column is no longer read after that and new
//! generations write 0 into it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    plan, start_checkpoints, Batch, Generation, GenerationInfo, Partition, Plan, Positions,
    ProjectionStore, RecipientsQuery, StoreError, TailReader,
};
use crate::event::DeliveryEvent;
use crate::fold::{
    apply_contact, contact_change_of, fold_dispatch, merge_suppression, suppression_of, ContactRow,
    DispatchRow, SuppressionRow,
};
use crate::log::Offset;

const META: &str = "
CREATE TABLE IF NOT EXISTS generations (gen INTEGER PRIMARY KEY, checkpoint INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS current (id INTEGER PRIMARY KEY CHECK (id = 1), gen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (gen INTEGER NOT NULL, part INTEGER NOT NULL,
    checkpoint INTEGER NOT NULL, PRIMARY KEY (gen, part)) WITHOUT ROWID;
";

/// The single checkpoint of data folders from before `checkpoints`, as partition 0.
/// Idempotent: runs at every open and never overwrites a partition-0 row.
const CARRY_OVER: &str = "INSERT OR IGNORE INTO checkpoints (gen, part, checkpoint)
    SELECT gen, 0, checkpoint FROM generations WHERE checkpoint > 0";

fn tables_sql(g: Generation) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS dispatches_{g} (
            tenant TEXT NOT NULL, dispatch_key TEXT NOT NULL, campaign_id TEXT, dispatch_id TEXT,
            status TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (tenant, dispatch_key)) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS dispatches_{g}_campaign ON dispatches_{g} (tenant, campaign_id, dispatch_key);
         CREATE INDEX IF NOT EXISTS dispatches_{g}_id ON dispatches_{g} (tenant, dispatch_id);
         CREATE TABLE IF NOT EXISTS seen_by_time_{g} (tenant TEXT NOT NULL, occurred_at_ms INTEGER NOT NULL,
            event_key TEXT NOT NULL, PRIMARY KEY (tenant, occurred_at_ms, event_key)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS suppressions_{g} (tenant TEXT NOT NULL, email TEXT NOT NULL, reason TEXT NOT NULL,
            state TEXT NOT NULL, PRIMARY KEY (tenant, email, reason)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS contacts_{g} (tenant TEXT NOT NULL, email TEXT NOT NULL, state TEXT NOT NULL,
            PRIMARY KEY (tenant, email)) WITHOUT ROWID;"
    )
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(10))?;
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")?;
    Ok(c)
}

pub struct SqliteProjections {
    writer: Arc<Mutex<Connection>>,
    readers: Vec<Arc<Mutex<Connection>>>,
    next_reader: std::sync::atomic::AtomicUsize,
}

impl SqliteProjections {
    pub fn open(path: &Path) -> Result<SqliteProjections, StoreError> {
        let conn = connect(path).map_err(unavailable)?;
        conn.execute_batch(META).map_err(unavailable)?;
        let tx = conn.unchecked_transaction().map_err(unavailable)?;
        let current: Option<i64> = tx
            .query_row("SELECT gen FROM current", [], |r| r.get(0))
            .optional()
            .map_err(unavailable)?;
        if current.is_none() {
            tx.execute_batch(&tables_sql(1)).map_err(unavailable)?;
            tx.execute(
                "INSERT OR IGNORE INTO generations (gen, checkpoint) VALUES (1, 0)",
                [],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT OR IGNORE INTO checkpoints (gen, part, checkpoint) VALUES (1, 0, 0)",
                [],
            )
            .map_err(unavailable)?;
            tx.execute("INSERT INTO current (id, gen) VALUES (1, 1)", [])
                .map_err(unavailable)?;
        }
        tx.execute(CARRY_OVER, []).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        // The projector's connection: 16 MiB of page cache (default 2 MiB), so the rows a batch
        // reads and rewrites stay in memory instead of being read back with a syscall each.
        conn.execute_batch("PRAGMA cache_size=-16384;")
            .map_err(unavailable)?;
        let readers = (0..4)
            .map(|_| connect(path).map(|c| Arc::new(Mutex::new(c))))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(unavailable)?;
        Ok(SqliteProjections {
            writer: Arc::new(Mutex::new(conn)),
            readers,
            next_reader: Default::default(),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.writer.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(unavailable)?
    }

    /// Runs a read in one transaction (a consistent snapshot across a generation switch) on
    /// the current generation.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, Generation) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let i = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % self.readers.len();
        let conn = self.readers[i].clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = c.transaction().map_err(unavailable)?;
            let g = current_gen(&tx)?;
            f(&tx, g)
        })
        .await
        .map_err(unavailable)?
    }
}

fn current_gen(c: &Connection) -> Result<Generation, StoreError> {
    c.query_row("SELECT gen FROM current", [], |r| r.get(0))
        .map_err(unavailable)
}

fn checkpoints_of(c: &Connection, g: Generation) -> Result<Positions, StoreError> {
    c.query_row("SELECT 1 FROM generations WHERE gen = ?1", [g], |_| Ok(()))
        .optional()
        .map_err(unavailable)?
        .ok_or_else(|| StoreError::Invalid(format!("generation {g} does not exist")))?;
    let mut st = c
        .prepare_cached("SELECT part, checkpoint FROM checkpoints WHERE gen = ?1")
        .map_err(unavailable)?;
    let rows = st
        .query_map([g], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(unavailable)?;
    rows.collect::<rusqlite::Result<Positions>>()
        .map_err(unavailable)
}

fn set_checkpoints(c: &Connection, g: Generation, moved: &Positions) -> Result<(), StoreError> {
    let mut st = c
        .prepare_cached(
            "INSERT INTO checkpoints (gen, part, checkpoint) VALUES (?1, ?2, ?3)
             ON CONFLICT (gen, part) DO UPDATE SET checkpoint = excluded.checkpoint",
        )
        .map_err(unavailable)?;
    for (part, checkpoint) in moved {
        st.execute(params![g, part, checkpoint])
            .map_err(unavailable)?;
    }
    Ok(())
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(unavailable)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Invalid(format!("stored row does not decode: {e}")))
}

/// The lookup of generation `g`'s keys from before `seen_by_time_<g>`, if it has them.
fn legacy_seen(c: &Connection, g: Generation) -> Result<Option<String>, StoreError> {
    let table = format!("seen_{g}");
    let exists = c
        .prepare_cached("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1")
        .and_then(|mut st| st.exists([&table]))
        .map_err(unavailable)?;
    Ok(exists.then(|| format!("SELECT 1 FROM {table} WHERE tenant = ?1 AND event_key = ?2")))
}

/// Folds a batch into generation `g` inside the caller's transaction: dedupe by event key,
/// fold per row (rows touched several times in a batch are read and written once). Every
/// partition's gap is checked before anything is written; on an error the caller drops the
/// transaction, so nothing of the batch is applied. Returns the checkpoints after the batch.
fn apply_in_tx(tx: &Connection, g: Generation, batch: &Batch) -> Result<Positions, StoreError> {
    let mut checkpoints = checkpoints_of(tx, g)?;
    let Plan { fresh, moved } = plan(&checkpoints, batch)?;
    if fresh.is_empty() {
        return Ok(checkpoints);
    }
    // Ordered maps: rows are written back in key order, so consecutive upserts land on the same
    // or neighbouring b-tree pages instead of all over the table.
    let mut dispatches: BTreeMap<(String, String), DispatchRow> = BTreeMap::new();
    let mut suppressions: BTreeMap<(String, String, String), SuppressionRow> = BTreeMap::new();
    let mut contacts: BTreeMap<(String, String), ContactRow> = BTreeMap::new();
    {
        let mut seen = tx
            .prepare_cached(&format!(
                "INSERT OR IGNORE INTO seen_by_time_{g} (tenant, occurred_at_ms, event_key) VALUES (?1, ?2, ?3)"
            ))
            .map_err(unavailable)?;
        let mut seen_before = legacy_seen(tx, g)?
            .map(|sql| tx.prepare_cached(&sql))
            .transpose()
            .map_err(unavailable)?;
        let mut get_d = tx
            .prepare_cached(&format!(
                "SELECT state FROM dispatches_{g} WHERE tenant = ?1 AND dispatch_key = ?2"
            ))
            .map_err(unavailable)?;
        let mut get_s = tx
            .prepare_cached(&format!("SELECT state FROM suppressions_{g} WHERE tenant = ?1 AND email = ?2 AND reason = ?3"))
            .map_err(unavailable)?;
        let mut get_c = tx
            .prepare_cached(&format!(
                "SELECT state FROM contacts_{g} WHERE tenant = ?1 AND email = ?2"
            ))
            .map_err(unavailable)?;
        // Inserted in the table's key order, so neighbours share pages. A stable sort keeps the
        // first of two copies in one batch the one that counts, as before.
        let mut order: Vec<usize> = (0..fresh.len()).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&fresh[a].value, &fresh[b].value);
            (&x.tenant, x.occurred_at_ms, &x.event_key).cmp(&(
                &y.tenant,
                y.occurred_at_ms,
                &y.event_key,
            ))
        });
        let mut is_new = vec![false; fresh.len()];
        for i in order {
            let ev = &fresh[i].value;
            if let Some(before) = seen_before.as_mut() {
                if before
                    .exists(params![ev.tenant, ev.event_key])
                    .map_err(unavailable)?
                {
                    continue;
                }
            }
            is_new[i] = seen
                .execute(params![ev.tenant, ev.occurred_at_ms, ev.event_key])
                .map_err(unavailable)?
                > 0;
        }
        for (rec, new) in fresh.iter().zip(is_new) {
            if !new {
                continue; // a duplicate: already folded
            }
            let ev = &rec.value;
            let k = (ev.tenant.clone(), ev.dispatch_key.clone());
            let row = match dispatches.remove(&k) {
                Some(r) => Some(r),
                None => get_d
                    .query_row(params![k.0, k.1], |r| r.get::<_, String>(0))
                    .optional()
                    .map_err(unavailable)?
                    .map(|s| from_json(&s))
                    .transpose()?,
            };
            dispatches.insert(k, fold_dispatch(row, ev));
            if let Some(s) = suppression_of(ev) {
                let k = (
                    s.tenant.clone(),
                    s.email.clone(),
                    s.reason.as_str().to_string(),
                );
                let old = match suppressions.remove(&k) {
                    Some(r) => Some(r),
                    None => get_s
                        .query_row(params![k.0, k.1, k.2], |r| r.get::<_, String>(0))
                        .optional()
                        .map_err(unavailable)?
                        .map(|s| from_json(&s))
                        .transpose()?,
                };
                suppressions.insert(k, merge_suppression(old, s));
            }
            if let Some(change) = contact_change_of(ev) {
                let k = (ev.tenant.clone(), ev.recipient.clone());
                let old = match contacts.remove(&k) {
                    Some(r) => Some(r),
                    None => get_c
                        .query_row(params![k.0, k.1], |r| r.get::<_, String>(0))
                        .optional()
                        .map_err(unavailable)?
                        .map(|s| from_json(&s))
                        .transpose()?,
                };
                contacts.insert(k, apply_contact(old, ev, change));
            }
        }
    }
    let mut put_d = tx
        .prepare_cached(&format!(
            "INSERT INTO dispatches_{g} (tenant, dispatch_key, campaign_id, dispatch_id, status, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (tenant, dispatch_key) DO UPDATE SET campaign_id = excluded.campaign_id,
               dispatch_id = excluded.dispatch_id, status = excluded.status, state = excluded.state"
        ))
        .map_err(unavailable)?;
    for ((tenant, key), row) in &dispatches {
        put_d
            .execute(params![
                tenant,
                key,
                row.campaign_id,
                row.dispatch_id,
                row.status.as_str(),
                json(row)?
            ])
            .map_err(unavailable)?;
    }
    let mut put_s = tx
        .prepare_cached(&format!(
            "INSERT INTO suppressions_{g} (tenant, email, reason, state) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (tenant, email, reason) DO UPDATE SET state = excluded.state"
        ))
        .map_err(unavailable)?;
    for ((tenant, email, reason), row) in &suppressions {
        put_s
            .execute(params![tenant, email, reason, json(row)?])
            .map_err(unavailable)?;
    }
    let mut put_c = tx
        .prepare_cached(&format!(
            "INSERT INTO contacts_{g} (tenant, email, state) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant, email) DO UPDATE SET state = excluded.state"
        ))
        .map_err(unavailable)?;
    for ((tenant, email), row) in &contacts {
        put_c
            .execute(params![tenant, email, json(row)?])
            .map_err(unavailable)?;
    }
    set_checkpoints(tx, g, &moved)?;
    checkpoints.extend(moved);
    Ok(checkpoints)
}

fn collect_states<T: serde::de::DeserializeOwned>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<T>, StoreError> {
    let mut st = c.prepare_cached(sql).map_err(unavailable)?;
    let rows = st
        .query_map(params, |r| r.get::<_, String>(0))
        .map_err(unavailable)?;
    let mut out = Vec::new();
    for s in rows {
        out.push(from_json(&s.map_err(unavailable)?)?);
    }
    Ok(out)
}

#[async_trait]
impl ProjectionStore for SqliteProjections {
    async fn checkpoints(&self) -> Result<Positions, StoreError> {
        self.read(checkpoints_of).await
    }

    async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.write(move |c| {
            // IMMEDIATE: take the write lock before reading which generation is current, so a
            // concurrent rebuild cannot switch between that read and our write.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let g = current_gen(&tx)?;
            apply_in_tx(&tx, g, &batch)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn recipients(&self, q: RecipientsQuery) -> Result<Vec<DispatchRow>, StoreError> {
        self.read(move |c, g| {
            collect_states(
                c,
                &format!(
                    "SELECT state FROM dispatches_{g} WHERE tenant = ?1 AND campaign_id = ?2
                       AND (?3 IS NULL OR status = ?3) AND (?4 IS NULL OR dispatch_key > ?4)
                     ORDER BY dispatch_key LIMIT ?5"
                ),
                params![
                    q.tenant,
                    q.campaign_id,
                    q.status.map(|s| s.as_str()),
                    q.after,
                    q.limit as i64
                ],
            )
        })
        .await
    }

    async fn dispatch(
        &self,
        tenant: &str,
        id_or_key: &str,
    ) -> Result<Option<DispatchRow>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id_or_key.to_string());
        self.read(move |c, g| {
            let mut rows: Vec<DispatchRow> = collect_states(
                c,
                &format!(
                    "SELECT state FROM dispatches_{g} WHERE tenant = ?1 AND (dispatch_key = ?2 OR dispatch_key = ?3)
                     ORDER BY dispatch_key LIMIT 1"
                ),
                params![tenant, DeliveryEvent::attributed_dispatch_key(&id), id],
            )?;
            Ok(rows.pop())
        })
        .await
    }

    async fn suppressions_of(
        &self,
        tenant: &str,
        email: &str,
    ) -> Result<Vec<SuppressionRow>, StoreError> {
        let (tenant, email) = (tenant.to_string(), email.to_string());
        self.read(move |c, g| {
            collect_states(
                c,
                &format!("SELECT state FROM suppressions_{g} WHERE tenant = ?1 AND email = ?2 ORDER BY reason"),
                params![tenant, email],
            )
        })
        .await
    }

    async fn suppressions(
        &self,
        tenant: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<SuppressionRow>, StoreError> {
        let tenant = tenant.to_string();
        let (ae, ar) = after.unzip();
        self.read(move |c, g| {
            collect_states(
                c,
                &format!(
                    "SELECT state FROM suppressions_{g} WHERE tenant = ?1
                       AND (?2 IS NULL OR email > ?2 OR (email = ?2 AND reason > ?3))
                     ORDER BY email, reason LIMIT ?4"
                ),
                params![tenant, ae, ar, limit as i64],
            )
        })
        .await
    }

    async fn contact(&self, tenant: &str, email: &str) -> Result<Option<ContactRow>, StoreError> {
        let (tenant, email) = (tenant.to_string(), email.to_string());
        self.read(move |c, g| {
            let mut rows: Vec<ContactRow> = collect_states(
                c,
                &format!("SELECT state FROM contacts_{g} WHERE tenant = ?1 AND email = ?2"),
                params![tenant, email],
            )?;
            Ok(rows.pop())
        })
        .await
    }

    async fn generations(&self) -> Result<Vec<GenerationInfo>, StoreError> {
        self.read(|c, current| {
            let mut out: BTreeMap<Generation, GenerationInfo> = BTreeMap::new();
            let mut st = c
                .prepare("SELECT gen FROM generations")
                .map_err(unavailable)?;
            for generation in st
                .query_map([], |r| r.get::<_, Generation>(0))
                .map_err(unavailable)?
            {
                let generation = generation.map_err(unavailable)?;
                out.insert(
                    generation,
                    GenerationInfo {
                        generation,
                        checkpoints: Positions::new(),
                        current: generation == current,
                    },
                );
            }
            let mut st = c
                .prepare("SELECT gen, part, checkpoint FROM checkpoints")
                .map_err(unavailable)?;
            for row in st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, Generation>(0)?,
                        r.get::<_, Partition>(1)?,
                        r.get::<_, Offset>(2)?,
                    ))
                })
                .map_err(unavailable)?
            {
                let (g, part, checkpoint) = row.map_err(unavailable)?;
                if let Some(info) = out.get_mut(&g) {
                    info.checkpoints.insert(part, checkpoint);
                }
            }
            Ok(out.into_values().collect())
        })
        .await
    }

    async fn create_generation(&self, start: &Positions) -> Result<Generation, StoreError> {
        let start = start_checkpoints(start);
        self.write(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let g: Generation = tx
                .query_row(
                    "SELECT COALESCE(MAX(gen), 0) + 1 FROM generations",
                    [],
                    |r| r.get(0),
                )
                .map_err(unavailable)?;
            tx.execute_batch(&tables_sql(g)).map_err(unavailable)?;
            // The old single checkpoint column stays 0 (see the module doc).
            tx.execute(
                "INSERT INTO generations (gen, checkpoint) VALUES (?1, 0)",
                params![g],
            )
            .map_err(unavailable)?;
            // A leftover of a generation with this number that was dropped must not count.
            tx.execute("DELETE FROM checkpoints WHERE gen = ?1", [g])
                .map_err(unavailable)?;
            set_checkpoints(&tx, g, &start)?;
            tx.commit().map_err(unavailable)?;
            Ok(g)
        })
        .await
    }

    async fn apply_to(&self, generation: Generation, batch: Batch) -> Result<(), StoreError> {
        self.write(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            apply_in_tx(&tx, generation, &batch)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn switch_to(
        &self,
        generation: Generation,
        partitions: Vec<Partition>,
        tail: TailReader,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let mut checkpoints = checkpoints_of(&tx, generation)?;
            for part in partitions {
                loop {
                    let after = checkpoints.get(&part).copied().unwrap_or(0);
                    let events = tail(part, after, 5000).map_err(StoreError::Unavailable)?;
                    if events.is_empty() {
                        break;
                    }
                    checkpoints = apply_in_tx(&tx, generation, &Batch::single(part, events))?;
                }
            }
            tx.execute("UPDATE current SET gen = ?1 WHERE id = 1", [generation])
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn drop_old(&self) -> Result<Vec<Generation>, StoreError> {
        self.write(|c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let current = current_gen(&tx)?;
            let old: Vec<Generation> = {
                let mut st = tx
                    .prepare("SELECT gen FROM generations WHERE gen <> ?1")
                    .map_err(unavailable)?;
                let rows = st.query_map([current], |r| r.get(0)).map_err(unavailable)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(unavailable)?
            };
            for g in &old {
                tx.execute_batch(&format!(
                    "DROP TABLE IF EXISTS dispatches_{g}; DROP TABLE IF EXISTS seen_by_time_{g};
                     DROP TABLE IF EXISTS seen_{g};
                     DROP TABLE IF EXISTS suppressions_{g}; DROP TABLE IF EXISTS contacts_{g};"
                ))
                .map_err(unavailable)?;
                tx.execute("DELETE FROM generations WHERE gen = ?1", [g])
                    .map_err(unavailable)?;
                tx.execute("DELETE FROM checkpoints WHERE gen = ?1", [g])
                    .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(old)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::fold::tests::ev;
    use crate::log::Record;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn rec(offset: Offset, value: DeliveryEvent) -> Record<DeliveryEvent> {
        Record { offset, value }
    }

    /// A partition's run: offsets from 1, events of their own dispatch and key per offset.
    fn run(part: Partition, n: Offset) -> Vec<Record<DeliveryEvent>> {
        let kinds = [
            EventKind::Delivered,
            EventKind::Opened,
            EventKind::Bounced,
            EventKind::Clicked,
        ];
        (1..=n)
            .map(|o| {
                let kind = kinds[(o as usize + part as usize) % kinds.len()];
                rec(
                    o,
                    ev(&format!("p{part}-{o}"), &format!("d{}", o % 3), kind, o),
                )
            })
            .collect()
    }

    fn events(batch: &[(Partition, std::ops::RangeInclusive<Offset>)]) -> Batch {
        Batch {
            parts: batch
                .iter()
                .map(|(p, r)| {
                    let all = run(*p, *r.end());
                    (*p, all[(*r.start() - 1) as usize..].to_vec())
                })
                .collect(),
        }
    }

    /// Every row of the current generation, in key order.
    fn rows(path: &Path) -> Vec<String> {
        let c = Connection::open(path).unwrap();
        let g = current_gen(&c).unwrap();
        let mut out = Vec::new();
        for (table, cols) in [
            ("dispatches", "tenant, dispatch_key, state"),
            (
                "seen_by_time",
                "tenant, event_key, CAST(occurred_at_ms AS TEXT)",
            ),
            ("suppressions", "tenant, email || '/' || reason, state"),
            ("contacts", "tenant, email, state"),
        ] {
            let mut st = c
                .prepare(&format!("SELECT {cols} FROM {table}_{g} ORDER BY 1, 2"))
                .unwrap();
            let found = st
                .query_map([], |r| {
                    Ok(format!(
                        "{table} {} {} {}",
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?
                    ))
                })
                .unwrap();
            out.extend(found.map(|r| r.unwrap()));
        }
        out
    }

    fn open(dir: &tempfile::TempDir, name: &str) -> (std::path::PathBuf, SqliteProjections) {
        let path = dir.path().join(name);
        let store = SqliteProjections::open(&path).unwrap();
        (path, store)
    }

    #[tokio::test]
    async fn a_batch_of_two_partitions_moves_both() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = open(&dir, "p.db");
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from([(0, 0)])
        );
        store
            .apply(events(&[(0, 1..=3), (1, 1..=2)]))
            .await
            .unwrap();
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from([(0, 3), (1, 2)])
        );
        assert_eq!(store.checkpoint().await.unwrap(), 3);
        let seen: Vec<_> = rows(&path)
            .into_iter()
            .filter(|r| r.starts_with("seen"))
            .collect();
        assert_eq!(seen.len(), 5, "{seen:?}");
        let gens = store.generations().await.unwrap();
        assert_eq!(gens[0].checkpoints, Positions::from([(0, 3), (1, 2)]));
    }

    #[tokio::test]
    async fn replaying_an_applied_partition_run_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = open(&dir, "p.db");
        store
            .apply(events(&[(0, 1..=4), (1, 1..=3)]))
            .await
            .unwrap();
        let before = rows(&path);
        let cps = store.checkpoints().await.unwrap();
        // Partition 1's run again, whole and in part, and partition 0's from its start.
        store.apply(events(&[(1, 1..=3)])).await.unwrap();
        store
            .apply(events(&[(1, 2..=3), (0, 1..=4), (1, 3..=3)]))
            .await
            .unwrap();
        assert_eq!(rows(&path), before);
        assert_eq!(store.checkpoints().await.unwrap(), cps);
        // A run that straddles the checkpoint folds only what is new.
        store.apply(events(&[(1, 2..=5)])).await.unwrap();
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from([(0, 4), (1, 5)])
        );
    }

    #[tokio::test]
    async fn a_gap_in_one_partition_applies_nothing_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = open(&dir, "p.db");
        store
            .apply(events(&[(0, 1..=3), (1, 1..=2)]))
            .await
            .unwrap();
        let before = rows(&path);
        let err = store
            .apply(events(&[(0, 4..=6), (1, 4..=5), (2, 1..=2)]))
            .await
            .unwrap_err();
        match err {
            StoreError::Gap {
                partition,
                first,
                checkpoint,
            } => assert_eq!((partition, first, checkpoint), (1, 4, 2)),
            e => panic!("{e}"),
        }
        assert_eq!(rows(&path), before, "partition 0's run was not folded");
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from([(0, 3), (1, 2)])
        );
        // A partition never seen starts at 0: its run must start at 1.
        assert!(matches!(
            store.apply(events(&[(7, 2..=3)])).await,
            Err(StoreError::Gap {
                partition: 7,
                first: 2,
                checkpoint: 0
            })
        ));
    }

    #[tokio::test]
    async fn create_generation_starts_each_listed_partition() {
        let dir = tempfile::tempdir().unwrap();
        let (_, store) = open(&dir, "p.db");
        let g = store
            .create_generation(&Positions::from([(0, 1), (1, 5), (2, 0), (3, 10)]))
            .await
            .unwrap();
        assert_eq!(g, 2);
        let gens = store.generations().await.unwrap();
        assert_eq!(gens.len(), 2);
        assert!(gens[0].current && !gens[1].current);
        assert_eq!(
            gens[1].checkpoints,
            Positions::from([(0, 0), (1, 4), (2, 0), (3, 9)])
        );
        // Each partition continues from its own start.
        assert!(matches!(
            store.apply_to(g, events(&[(3, 1..=11)])).await,
            Ok(())
        ));
        assert!(matches!(
            store.apply_to(g, events(&[(1, 6..=6)])).await,
            Err(StoreError::Gap { partition: 1, .. })
        ));
        store.apply_to(g, events(&[(1, 5..=6)])).await.unwrap();
        let gens = store.generations().await.unwrap();
        assert_eq!(
            gens[1].checkpoints,
            Positions::from([(0, 0), (1, 6), (2, 0), (3, 11)])
        );
        // The current generation did not move.
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from([(0, 0)])
        );
    }

    #[tokio::test]
    async fn switch_to_catches_every_partition_up() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = open(&dir, "p.db");
        let lens = [(0, 9), (1, 4), (2, 12)];
        let g = store
            .create_generation(&Positions::from([(0, 1), (1, 1), (2, 1)]))
            .await
            .unwrap();
        store
            .apply_to(g, events(&[(0, 1..=3), (2, 1..=5)]))
            .await
            .unwrap();
        let logs: BTreeMap<Partition, Vec<Record<DeliveryEvent>>> =
            lens.iter().map(|(p, n)| (*p, run(*p, *n))).collect();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen_calls = calls.clone();
        store
            .switch_to(
                g,
                vec![0, 1, 2],
                Box::new(move |part, after, max| {
                    seen_calls.lock().unwrap().push((part, after));
                    Ok(logs[&part]
                        .iter()
                        .filter(|r| r.offset > after)
                        .take(max.min(2))
                        .cloned()
                        .collect())
                }),
            )
            .await
            .unwrap();
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from(lens),
            "current after the switch, every partition caught up"
        );
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.first(), Some(&(0, 3)), "from the checkpoint");
        assert!(calls.contains(&(1, 0)) && calls.contains(&(2, 5)));
        assert!(calls.contains(&(1, 4)), "until the tail returns nothing");
        // The same rows as folding the whole logs in one batch.
        let (other, fresh) = open(&dir, "q.db");
        fresh
            .apply(events(&[(0, 1..=9), (1, 1..=4), (2, 1..=12)]))
            .await
            .unwrap();
        assert_eq!(rows(&path), rows(&other));
    }

    #[tokio::test]
    async fn a_data_folder_with_one_checkpoint_resumes_from_it_as_partition_0() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The store as it was before checkpoints per partition.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "CREATE TABLE generations (gen INTEGER PRIMARY KEY, checkpoint INTEGER NOT NULL);
                 CREATE TABLE current (id INTEGER PRIMARY KEY CHECK (id = 1), gen INTEGER NOT NULL);
                 {} {}
                 INSERT INTO generations (gen, checkpoint) VALUES (1, 7), (2, 42);
                 INSERT INTO current (id, gen) VALUES (1, 2);",
                tables_sql(1),
                tables_sql(2)
            ))
            .unwrap();
        }
        let store = SqliteProjections::open(&path).unwrap();
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from([(0, 42)])
        );
        assert_eq!(store.checkpoint().await.unwrap(), 42);
        let gens = store.generations().await.unwrap();
        assert_eq!(gens[0].checkpoints, Positions::from([(0, 7)]));
        assert!(gens[1].current);
        // It continues right after, and nowhere else.
        let next = |o: Offset| {
            Batch::single(
                0,
                vec![rec(o, ev(&format!("k{o}"), "a", EventKind::Opened, o))],
            )
        };
        assert!(matches!(
            store.apply(next(44)).await,
            Err(StoreError::Gap {
                partition: 0,
                first: 44,
                checkpoint: 42
            })
        ));
        store.apply(next(43)).await.unwrap();
        drop(store);
        // Opening again carries nothing over a second time.
        let store = SqliteProjections::open(&path).unwrap();
        assert_eq!(
            store.checkpoints().await.unwrap(),
            Positions::from([(0, 43)])
        );
        assert_eq!(
            store.generations().await.unwrap()[0].checkpoints,
            Positions::from([(0, 7)])
        );
    }

    #[tokio::test]
    async fn a_generation_keeping_its_keys_in_seen_still_dedupes_against_them_until_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = open(&dir, "old-seen.db");
        let opened = |key: &str, at: i64| ev(key, "a", EventKind::Opened, at);
        {
            // Generation 1 as stores wrote it before `seen_by_time`: keys alone, one of them
            // already folded (its time is not recorded there).
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE seen_1 (tenant TEXT NOT NULL, event_key TEXT NOT NULL,
                    PRIMARY KEY (tenant, event_key)) WITHOUT ROWID;
                 INSERT INTO seen_1 VALUES ('t1', 'k1');",
            )
            .unwrap();
        }
        store
            .apply(Batch::single(
                0,
                vec![
                    rec(1, opened("k1", 10)),
                    rec(2, opened("k2", 20)),
                    rec(3, opened("k2", 20)),
                ],
            ))
            .await
            .unwrap();
        let opens = |row: Option<DispatchRow>| row.unwrap().opens;
        assert_eq!(
            opens(store.dispatch("t1", "a").await.unwrap()),
            1,
            "k1 was folded before"
        );
        // A rebuild folds both into a new generation and drops the old tables with generation 1.
        let g = store
            .create_generation(&Positions::from([(0, 1)]))
            .await
            .unwrap();
        store
            .apply_to(
                g,
                Batch::single(0, vec![rec(1, opened("k1", 10)), rec(2, opened("k2", 20))]),
            )
            .await
            .unwrap();
        store
            .switch_to(g, vec![0], Box::new(|_, _, _| Ok(Vec::new())))
            .await
            .unwrap();
        assert_eq!(store.drop_old().await.unwrap(), vec![1]);
        assert_eq!(opens(store.dispatch("t1", "a").await.unwrap()), 2);
        let c = Connection::open(&path).unwrap();
        let left: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE 'seen%1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0, "generation 1's key tables are dropped");
    }

    /// Events over 3 partitions, every copy of an event key in one partition (as the log must
    /// key them), with ESP retries and a key reused on another dispatch.
    fn partitioned(
        spec: &[(u8, u8, usize, i64)],
    ) -> BTreeMap<Partition, Vec<Record<DeliveryEvent>>> {
        let mut logs: BTreeMap<Partition, Vec<Record<DeliveryEvent>>> = BTreeMap::new();
        for (key, dispatch, kind, at) in spec {
            let part = Partition::from(key % 3);
            let log = logs.entry(part).or_default();
            let mut e = ev(
                &format!("k{key}"),
                &format!("d{dispatch}"),
                EventKind::ALL[*kind],
                *at,
            );
            if e.kind == EventKind::Bounced {
                e.reason = Some(format!("r{at}"));
            }
            log.push(rec(log.len() as Offset + 1, e));
        }
        logs
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random interleavings of per-partition chunks, several to a batch, with random
        /// re-deliveries from before the checkpoint, give the rows of one sequential apply.
        #[test]
        fn interleaved_partitions_give_the_rows_of_a_sequential_apply(
            spec in proptest::collection::vec(
                (0u8..24, 0u8..4, 0usize..EventKind::ALL.len(), 0i64..40), 1..50),
            seed in any::<u64>(),
        ) {
            let logs = partitioned(&spec);
            let dir = tempfile::tempdir().unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (seq_path, sequential) = open(&dir, "seq.db");
            let (mixed_path, mixed) = open(&dir, "mixed.db");
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let ends: Positions = logs.iter().map(|(p, l)| (*p, l.len() as Offset)).collect();
            rt.block_on(async {
                sequential
                    .apply(Batch { parts: logs.iter().map(|(p, l)| (*p, l.clone())).collect() })
                    .await
                    .unwrap();
                let mut applied = 0;
                loop {
                    let cps = mixed.checkpoints().await.unwrap();
                    let open: Vec<Partition> = logs
                        .keys()
                        .copied()
                        .filter(|p| cps.get(p).copied().unwrap_or(0) < ends[p])
                        .collect();
                    if open.is_empty() {
                        break;
                    }
                    let mut batch = Batch::default();
                    let mut planned = cps.clone();
                    for _ in 0..rng.gen_range(1..=3) {
                        let part = open[rng.gen_range(0..open.len())];
                        let cp = planned.get(&part).copied().unwrap_or(0);
                        // Sometimes a re-delivery from before the checkpoint.
                        let from = if rng.gen_bool(0.3) { rng.gen_range(0..=cp) } else { cp };
                        let to = (from + rng.gen_range(1..=4)).min(ends[&part]);
                        let chunk = logs[&part][from as usize..to as usize].to_vec();
                        planned.insert(part, to.max(cp));
                        batch.parts.push((part, chunk));
                    }
                    mixed.apply(batch).await.unwrap();
                    applied += 1;
                    assert!(applied < 10_000);
                }
                assert_eq!(mixed.checkpoints().await.unwrap(), {
                    let mut e = ends.clone();
                    e.insert(0, ends.get(&0).copied().unwrap_or(0));
                    e
                });
            });
            prop_assert_eq!(rows(&mixed_path), rows(&seq_path));
        }
    }
}
