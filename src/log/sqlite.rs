//! The embedded log: one SQLite file (WAL, `synchronous=FULL`). All writes go through one
//! writer thread that takes every request waiting in its queue into a single transaction, so
//! concurrent webhook requests share one fsync (group commit). Readers use their own
//! connections, which WAL lets run beside the writer; a background thread checkpoints the WAL,
//! so the writer only starts it over, between groups, once it passes its bound (`wal.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, Notify};

use super::wal::{Checkpointer, WalBound};
use super::{
    DeadLetterLog, EnvelopeLog, EventLog, EventQuery, EventSearch, LogError, NormalizedBatch,
    NormalizerLog, Offset, Record,
};
use crate::avro;
use crate::event::{DeadLetter, DeliveryEvent, RawEnvelope};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS envelopes (seq INTEGER PRIMARY KEY, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    recipient TEXT NOT NULL,
    message_id TEXT,
    occurred_at_ms INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    envelope_seq INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_recipient ON events (tenant, recipient, seq);
CREATE INDEX IF NOT EXISTS events_by_message ON events (tenant, message_id, seq);
CREATE INDEX IF NOT EXISTS events_by_received ON events (received_at_ms);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    envelope_seq INTEGER NOT NULL,
    envelope_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    item TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (stage TEXT PRIMARY KEY, seq INTEGER NOT NULL);
";

/// How long readers sleep without a wake-up before looking again (other processes may write).
const POLL: Duration = Duration::from_millis(250);
/// Most requests folded into one group commit.
const MAX_GROUP: usize = 2048;
/// How often the checkpointer copies the WAL into the database file (see `Checkpointer`: with
/// SQLite's automatic checkpoint, every few groups one of them waited for megabytes of writes
/// and two more fsyncs before its webhooks could be answered).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// WAL size past which the writer checkpoints once so the WAL can start over (see `WalBound`):
/// about four seconds of SendGrid batches at the peak BENCHMARKS.md measures, so that the disk
/// holds about that much beside the log (the WAL file keeps this size), and the writer waits
/// for it rarely.
const MAX_WAL_BYTES: u64 = 256 << 20;

enum Write {
    Append(Vec<u8>, oneshot::Sender<Result<Offset, LogError>>),
    Normalized(NormalizedBatch, oneshot::Sender<Result<(), LogError>>),
}

pub struct SqliteLog {
    path: PathBuf,
    writer: mpsc::Sender<Write>,
    reader: Mutex<Connection>,
    envelopes_appended: Arc<Notify>,
    events_appended: Arc<Notify>,
    append_timeout: Duration,
    _checkpointer: Checkpointer,
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")?;
    Ok(c)
}

/// The writer's busy handler: a short, even poll instead of SQLite's default backoff (waits of
/// 1, 2, 5 ... 100 ms). The writer meets a busy database in `WalBound`'s checkpoint, which
/// waits for a moment when no reader is in the WAL; readers come and go within a millisecond,
/// and every webhook answer waits while the writer does, so it looks again within 200 us
/// rather than after a backoff of tens of milliseconds. Gives up after `WRITER_BUSY_TRIES`
/// polls, as `busy_timeout(5 s)` did.
fn writer_busy(tries: i32) -> bool {
    std::thread::sleep(WRITER_BUSY_POLL);
    tries < WRITER_BUSY_TRIES
}

const WRITER_BUSY_POLL: Duration = Duration::from_micros(200);
const WRITER_BUSY_TRIES: i32 = 25_000;

impl SqliteLog {
    /// Opens (creating if needed) the log at `path`. `append_timeout` bounds how long a webhook
    /// waits for durability before it is answered 503.
    pub fn open(path: &Path, append_timeout: Duration) -> Result<Arc<SqliteLog>, LogError> {
        let conn = connect(path).map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        conn.busy_handler(Some(writer_busy)).map_err(unavailable)?;
        // 16 MiB of page cache for the writer (SQLite's default is 2 MiB): the events table's
        // indexes take inserts all over, and re-reading their pages was a syscall each.
        conn.execute_batch("PRAGMA cache_size=-16384;")
            .map_err(unavailable)?;
        // Each normalizer batch runs in a savepoint, whose journal of the pages it changes
        // SQLite spills to a temporary file past 64 KiB: a page write and read back per page.
        // In memory it stays a copy.
        conn.execute_batch("PRAGMA temp_store=MEMORY;")
            .map_err(unavailable)?;
        let checkpointer = Checkpointer::start(
            &conn,
            connect(path).map_err(unavailable)?,
            CHECKPOINT_EVERY,
            MAX_WAL_BYTES,
        )
        .map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(16 * 1024);
        let envelopes_appended = Arc::new(Notify::new());
        let events_appended = Arc::new(Notify::new());
        {
            let (ea, ev) = (envelopes_appended.clone(), events_appended.clone());
            let bound = checkpointer.bound();
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || writer_loop(conn, rx, ea, ev, bound))
                .map_err(unavailable)?;
        }
        Ok(Arc::new(SqliteLog {
            path: path.to_path_buf(),
            writer: tx,
            reader: Mutex::new(connect(path).map_err(unavailable)?),
            envelopes_appended,
            events_appended,
            append_timeout,
            _checkpointer: checkpointer,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a read on a connection of its own thread; readers never block the async runtime.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = me.reader.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(unavailable)?
    }

    async fn send<T>(
        &self,
        w: Write,
        rx: oneshot::Receiver<Result<T, LogError>>,
    ) -> Result<T, LogError> {
        let fut = async {
            self.writer
                .send(w)
                .await
                .map_err(|_| unavailable("log writer stopped"))?;
            rx.await.map_err(|_| unavailable("log writer stopped"))?
        };
        tokio::time::timeout(self.append_timeout, fut)
            .await
            .map_err(|_| {
                unavailable(format!("no durable write within {:?}", self.append_timeout))
            })?
    }
}

fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Write>,
    envelopes: Arc<Notify>,
    events: Arc<Notify>,
    bound: WalBound,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
        let mut appends = Vec::new();
        let mut normalized = Vec::new();
        for w in group {
            match w {
                Write::Append(bytes, reply) => appends.push((bytes, reply)),
                Write::Normalized(batch, reply) => normalized.push((batch, reply)),
            }
        }
        match commit_group(&mut conn, &appends, &normalized) {
            Ok((first_seq, outcomes)) => {
                for (i, (_, reply)) in appends.into_iter().enumerate() {
                    let _ = reply.send(Ok(first_seq + i as i64));
                }
                let mut any_events = false;
                for ((_, reply), outcome) in normalized.into_iter().zip(outcomes) {
                    any_events |= outcome.is_ok();
                    let _ = reply.send(outcome);
                }
                envelopes.notify_waiters();
                if any_events {
                    events.notify_waiters();
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, reply) in appends {
                    let _ = reply.send(Err(LogError::Unavailable(msg.clone())));
                }
                for (_, reply) in normalized {
                    let _ = reply.send(Err(LogError::Unavailable(msg.clone())));
                }
            }
        }
        // Everyone in the group has been answered: the next group waits instead, for once.
        bound.after_commit(&conn);
    }
}

type PendingAppend = (Vec<u8>, oneshot::Sender<Result<Offset, LogError>>);
type PendingNormalized = (NormalizedBatch, oneshot::Sender<Result<(), LogError>>);

/// Everything waiting in the queue goes into one transaction, so the whole group costs one
/// fsync (`synchronous=FULL`): envelopes first, then each normalizer batch in a savepoint of its
/// own, so a batch that fails is rolled back alone and the others still commit. Nobody is
/// answered before the commit returns: a 2xx still means the envelope is durable.
fn commit_group(
    conn: &mut Connection,
    appends: &[PendingAppend],
    normalized: &[PendingNormalized],
) -> rusqlite::Result<(Offset, Vec<Result<(), LogError>>)> {
    let mut tx = conn.transaction()?;
    let first = {
        let mut st = tx.prepare_cached("INSERT INTO envelopes (record) VALUES (?1)")?;
        let mut first = None;
        for (bytes, _) in appends {
            st.execute([bytes])?;
            first.get_or_insert(tx.last_insert_rowid());
        }
        first.unwrap_or(0)
    };
    let mut outcomes = Vec::with_capacity(normalized.len());
    for (batch, _) in normalized {
        let sp = tx.savepoint()?;
        let r = insert_normalized(&sp, batch);
        if r.is_ok() {
            sp.commit()?;
        }
        // Dropping an uncommitted savepoint rolls it back.
        outcomes.push(r);
    }
    tx.commit()?;
    Ok((first, outcomes))
}

fn insert_normalized(tx: &Connection, batch: &NormalizedBatch) -> Result<(), LogError> {
    {
        let mut ev = tx
            .prepare_cached(
                "INSERT INTO events (tenant, recipient, message_id, occurred_at_ms, received_at_ms, envelope_seq, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(unavailable)?;
        let mut bytes = Vec::with_capacity(512);
        for (env_seq, e) in &batch.events {
            bytes.clear();
            avro::encode_event_into(&mut bytes, e);
            ev.execute(params![
                e.tenant,
                e.recipient,
                e.message_id,
                e.occurred_at_ms,
                e.received_at_ms,
                env_seq,
                bytes
            ])
            .map_err(unavailable)?;
        }
        let mut dl = tx
            .prepare_cached(
                "INSERT INTO dead_letters (envelope_seq, envelope_id, provider, reason, detail, item, received_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(unavailable)?;
        for (env_seq, d) in &batch.dead_letters {
            dl.execute(params![
                env_seq,
                d.envelope_id,
                d.provider,
                d.reason,
                d.detail,
                d.item,
                d.received_at_ms
            ])
            .map_err(unavailable)?;
        }
        // The checkpoint moves in the same transaction as the output: exactly-once normalizing.
        tx.prepare_cached(
            "INSERT INTO checkpoints (stage, seq) VALUES ('normalizer', ?1)
             ON CONFLICT(stage) DO UPDATE SET seq = excluded.seq",
        )
        .and_then(|mut st| st.execute([batch.upto]))
        .map_err(unavailable)?;
    }
    Ok(())
}

fn decode_rows<T>(
    rows: Vec<(Offset, Vec<u8>)>,
    decode: impl Fn(&[u8]) -> Result<T, avro::AvroError>,
) -> Result<Vec<Record<T>>, LogError> {
    rows.into_iter()
        .map(|(offset, bytes)| {
            decode(&bytes)
                .map(|value| Record { offset, value })
                .map_err(|e| LogError::Corrupt {
                    offset,
                    message: e.to_string(),
                })
        })
        .collect()
}

fn seq_blob_rows(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(Offset, Vec<u8>)>, LogError> {
    let mut st = conn.prepare_cached(sql).map_err(unavailable)?;
    let rows = st
        .query_map(params, |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(unavailable)?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(unavailable)
}

async fn wait_or_poll(n: &Notify) {
    let _ = tokio::time::timeout(POLL, n.notified()).await;
}

#[async_trait]
impl EnvelopeLog for Arc<SqliteLog> {
    async fn append(&self, envelope: &RawEnvelope) -> Result<Offset, LogError> {
        let bytes = avro::encode_envelope(envelope).map_err(unavailable)?;
        let (tx, rx) = oneshot::channel();
        self.send(Write::Append(bytes, tx), rx).await
    }
}

#[async_trait]
impl NormalizerLog for Arc<SqliteLog> {
    async fn normalizer_checkpoint(&self) -> Result<Offset, LogError> {
        self.read(|c| {
            c.query_row(
                "SELECT seq FROM checkpoints WHERE stage = 'normalizer'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map(|o| o.unwrap_or(0))
            .map_err(unavailable)
        })
        .await
    }

    async fn envelope_head(&self) -> Result<Offset, LogError> {
        self.read(|c| {
            c.query_row("SELECT COALESCE(MAX(seq), 0) FROM envelopes", [], |r| {
                r.get(0)
            })
            .map_err(unavailable)
        })
        .await
    }

    async fn read_envelopes(
        &self,
        after: Offset,
        max: usize,
    ) -> Result<Vec<Record<RawEnvelope>>, LogError> {
        self.read(move |c| {
            let rows = seq_blob_rows(
                c,
                "SELECT seq, record FROM envelopes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                params![after, max as i64],
            )?;
            decode_rows(rows, avro::decode_envelope)
        })
        .await
    }

    async fn commit_normalized(&self, batch: NormalizedBatch) -> Result<(), LogError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Write::Normalized(batch, tx))
            .await
            .map_err(|_| unavailable("log writer stopped"))?;
        rx.await.map_err(|_| unavailable("log writer stopped"))?
    }

    async fn envelopes_appended(&self) {
        wait_or_poll(&self.envelopes_appended).await
    }
}

#[async_trait]
impl EventLog for Arc<SqliteLog> {
    async fn read_events(
        &self,
        after: Offset,
        max: usize,
    ) -> Result<Vec<Record<DeliveryEvent>>, LogError> {
        self.read(move |c| {
            let rows = seq_blob_rows(
                c,
                "SELECT seq, record FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                params![after, max as i64],
            )?;
            decode_rows(rows, avro::decode_event)
        })
        .await
    }

    async fn head(&self) -> Result<Offset, LogError> {
        self.read(|c| {
            c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
                .map_err(unavailable)
        })
        .await
    }

    async fn offset_at(&self, time_ms: i64) -> Result<Offset, LogError> {
        self.read(move |c| {
            c.query_row(
                "SELECT COALESCE(MIN(seq), (SELECT COALESCE(MAX(seq), 0) + 1 FROM events)) FROM events WHERE received_at_ms >= ?1",
                [time_ms],
                |r| r.get(0),
            )
            .map_err(unavailable)
        })
        .await
    }

    async fn events_appended(&self) {
        wait_or_poll(&self.events_appended).await
    }
}

#[async_trait]
impl EventSearch for Arc<SqliteLog> {
    async fn query_events(&self, q: EventQuery) -> Result<Vec<Record<DeliveryEvent>>, LogError> {
        self.read(move |c| {
            let rows = seq_blob_rows(
                c,
                "SELECT seq, record FROM events
                 WHERE tenant = ?1 AND seq > ?2
                   AND (?3 IS NULL OR recipient = ?3)
                   AND (?4 IS NULL OR message_id = ?4)
                   AND (?5 IS NULL OR occurred_at_ms >= ?5)
                   AND (?6 IS NULL OR occurred_at_ms < ?6)
                 ORDER BY seq LIMIT ?7",
                params![
                    q.tenant,
                    q.after,
                    q.recipient,
                    q.message_id,
                    q.since_ms,
                    q.until_ms,
                    q.limit as i64
                ],
            )?;
            decode_rows(rows, avro::decode_event)
        })
        .await
    }
}

#[async_trait]
impl DeadLetterLog for Arc<SqliteLog> {
    async fn dead_letters(
        &self,
        after: Offset,
        limit: usize,
    ) -> Result<Vec<Record<DeadLetter>>, LogError> {
        self.read(move |c| {
            let mut st = c
                .prepare_cached(
                    "SELECT d.seq, d.provider, d.reason, d.detail, d.item, d.received_at_ms, d.envelope_id
                     FROM dead_letters d WHERE d.seq > ?1 ORDER BY d.seq LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = st
                .query_map(params![after, limit as i64], |r| {
                    Ok(Record {
                        offset: r.get(0)?,
                        value: DeadLetter {
                            provider: r.get(1)?,
                            reason: r.get(2)?,
                            detail: r.get(3)?,
                            item: r.get(4)?,
                            received_at_ms: r.get(5)?,
                            envelope_id: r.get(6)?,
                        },
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(unavailable)
        })
        .await
    }

    async fn dead_letter_counts(&self) -> Result<Vec<(String, String, u64)>, LogError> {
        self.read(|c| {
            let mut st = c
                .prepare_cached("SELECT provider, reason, COUNT(*) FROM dead_letters GROUP BY provider, reason ORDER BY provider, reason")
                .map_err(unavailable)?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))
                .map_err(unavailable)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(unavailable)
        })
        .await
    }
}
