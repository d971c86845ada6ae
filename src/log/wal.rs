//! WAL checkpointing for the embedded log's SQLite file, off its writer's commit path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

/// Copies a database's WAL into its file from a thread of its own, so that the writer does not
/// pay for it inside a COMMIT: SQLite's automatic checkpoint runs in the COMMIT that crosses
/// `wal_autocheckpoint` pages, and webhook answers then waited for megabytes of page writes and
/// two fsyncs. The writer's connection sets `wal_autocheckpoint=0`; this thread runs PASSIVE
/// checkpoints, which never block the writer or readers. A PASSIVE checkpoint alone does not
/// bound the WAL (see `WalBound`). Stops, after one last pass, when dropped.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Turns off the automatic checkpoint on `writer` and starts checkpointing through `conn`
    /// (a connection of its own to the same file) every `every`.
    pub(crate) fn start(
        writer: &Connection,
        conn: Connection,
        every: Duration,
    ) -> Result<Checkpointer, String> {
        writer
            .execute_batch("PRAGMA wal_autocheckpoint=0;")
            .map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("log-checkpoint".into())
            .spawn(move || {
                let pass = || {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %e, "log checkpoint skipped");
                    }
                };
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    pass();
                }
                // One last pass, so a closed log leaves a small WAL behind.
                pass();
            })
            .map_err(|e| e.to_string())?;
        Ok(Checkpointer { stop })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Keeps the WAL from growing with everything written. SQLite starts the WAL over only when a
/// write begins after every frame was copied back, and a writer that is always busy has always
/// appended more by the time a background checkpoint finishes (a 7-minute load run left a
/// 4 GB WAL beside the log; a RESTART checkpoint from the background thread starved behind the
/// writer). So the writer itself, between two transactions and after answering, runs a TRUNCATE
/// checkpoint once the WAL passes the bound: it copies what the background passes have not
/// (little), waits for readers to leave the old frames, and empties the file, so the next write
/// starts the WAL over. TRUNCATE rather than RESTART: a restarted WAL keeps its file size, and
/// the size is what tells the writer when to checkpoint (with RESTART it checkpointed after
/// every group once the bound was first passed, and lost a quarter of its throughput).
pub(crate) struct WalBound {
    wal: PathBuf,
    max_bytes: u64,
}

impl WalBound {
    pub(crate) fn new(db: &Path, max_bytes: u64) -> WalBound {
        WalBound {
            wal: wal_of(db),
            max_bytes,
        }
    }

    /// Call on the writer's connection, outside a transaction. Errors are left to the next
    /// call: a busy reader only postpones the restart.
    pub(crate) fn after_commit(&self, writer: &Connection) {
        if file_len(&self.wal) <= self.max_bytes {
            return;
        }
        if let Err(e) = writer.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "log WAL restart postponed");
        }
    }
}

/// The WAL file SQLite keeps beside the database `db`.
fn wal_of(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// A file's size, 0 if it does not exist (no WAL yet).
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
        c
    }

    /// A folder with a database of one table, and its writer's connection.
    fn fresh() -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let writer = open(&path);
        writer
            .execute_batch("CREATE TABLE t (v BLOB NOT NULL);")
            .unwrap();
        (dir, path, writer)
    }

    /// One commit of a 4 KiB row: two pages of WAL.
    fn insert_page(writer: &Connection) {
        writer
            .execute("INSERT INTO t (v) VALUES (?1)", [vec![7u8; 4096]])
            .unwrap();
    }

    /// The writer does not checkpoint: its WAL grows past SQLite's 1000-page threshold (where
    /// an automatic checkpoint would have started it over at ~4 MiB) while the database file
    /// stays empty; then the thread copies the WAL into the file without anyone asking.
    #[test]
    fn the_writer_never_checkpoints_and_the_thread_does() {
        let (_dir, path, writer) = fresh();
        let hour = Duration::from_secs(3600);
        let idle = Checkpointer::start(&writer, open(&path), hour).unwrap();
        for _ in 0..1500 {
            insert_page(&writer);
        }
        let wal = wal_of(&path);
        assert!(file_len(&wal) > 6 << 20, "WAL is {} bytes", file_len(&wal));
        assert!(
            file_len(&path) < 1 << 20,
            "database file is {} bytes",
            file_len(&path)
        );
        drop(idle);

        let every = Duration::from_millis(20);
        let _ckpt = Checkpointer::start(&writer, open(&path), every).unwrap();
        let t = std::time::Instant::now();
        while file_len(&path) < 6 << 20 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            file_len(&path) >= 6 << 20,
            "database file is {} bytes",
            file_len(&path)
        );
    }

    /// A writer that never pauses, and a reader beside it: past the bound the WAL is started
    /// over, so it stays near the bound instead of growing with everything written.
    #[test]
    fn a_busy_writer_keeps_the_wal_bounded() {
        let (_dir, path, writer) = fresh();
        let every = Duration::from_millis(5);
        let _ckpt = Checkpointer::start(&writer, open(&path), every).unwrap();
        let bound = WalBound::new(&path, 1 << 20);
        let reader = open(&path);
        let wal = wal_of(&path);
        let (mut largest, mut last, mut starts) = (0, 0, 0);
        // ~80 MiB written in all (two pages a row).
        for i in 0..10_000 {
            insert_page(&writer);
            bound.after_commit(&writer);
            if i % 100 == 0 {
                let _: i64 = reader
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .unwrap();
            }
            let now = file_len(&wal);
            starts += usize::from(now < last);
            (largest, last) = (largest.max(now), now);
        }
        assert!(largest < 24 << 20, "the WAL reached {largest} bytes");
        // About one start-over per MiB written (~80), not one per commit (10,000).
        assert!(
            (10..1000).contains(&starts),
            "the WAL started over {starts} times"
        );
    }
}
