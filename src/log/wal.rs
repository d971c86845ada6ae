//! WAL checkpointing for the embedded log's SQLite file, off its writer's commit path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

/// Copies a database's WAL into its file from a thread of its own, so that the writer does not
/// pay for it inside a COMMIT: SQLite's automatic checkpoint runs in the COMMIT that crosses
/// `wal_autocheckpoint` pages, and webhook answers then waited for megabytes of page writes and
/// two fsyncs. The writer's connection sets `wal_autocheckpoint=0`; this thread runs PASSIVE
/// checkpoints, which never block the writer or readers. A PASSIVE checkpoint alone does not
/// bound the WAL: it tells the writer's `WalBound` when to start it over. Stops, after one last
/// pass, when dropped.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
    restart: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Turns off the automatic checkpoint on `writer` and starts checkpointing through `conn`
    /// (a connection of its own to the same file) every `every`; past `max_wal_bytes` of WAL,
    /// asks the writer's `WalBound` (see `bound`) to start it over.
    pub(crate) fn start(
        writer: &Connection,
        conn: Connection,
        every: Duration,
        max_wal_bytes: u64,
    ) -> Result<Checkpointer, String> {
        // The WAL keeps its size when it starts over (see `WalBound`); past the bound, SQLite
        // cuts it back to it when it does.
        writer
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit={max_wal_bytes};"
            ))
            .map_err(|e| e.to_string())?;
        let frame_bytes = 24
            + conn
                .query_row("PRAGMA page_size", [], |r| r.get::<_, u64>(0))
                .map_err(|e| e.to_string())?;
        let max_frames = (max_wal_bytes / frame_bytes).max(1);
        // SQLite syncs the database file only after a checkpoint that copied the whole WAL,
        // which a busy writer never lets happen: the pages the passes copied stayed dirty until
        // the writer's restart synced them all, 61-63 ms of every webhook answer held (perf
        // trace). Synced here after each pass, the restart finds only its own few pages.
        let db = conn
            .path()
            .filter(|p| !p.is_empty())
            .map(std::fs::File::open)
            .transpose()
            .map_err(|e| format!("opening the database file to sync it: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let restart = Arc::new(AtomicBool::new(false));
        let (flag, ask) = (stop.clone(), restart.clone());
        std::thread::Builder::new()
            .name("log-checkpoint".into())
            .spawn(move || {
                // Frames copied back as of the last pass: `copied` counts from the WAL's start,
                // so only a change means this pass wrote pages to the database file.
                let mut last_copied = 0;
                let mut pass = || {
                    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    });
                    match done {
                        // Right after a pass (copied and synced), starting over costs the writer
                        // only the frames written since: one sync of a few pages.
                        Ok((frames, copied)) => {
                            if copied > 0 && copied != last_copied {
                                if let Some(Err(e)) = db.as_ref().map(std::fs::File::sync_data) {
                                    tracing::debug!(error = %e, "log database sync failed");
                                }
                            }
                            last_copied = copied;
                            if frames.max(0) as u64 > max_frames {
                                ask.store(true, Ordering::Release);
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "log checkpoint skipped"),
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
        Ok(Checkpointer { stop, restart })
    }

    /// What the writer calls between its transactions to keep the WAL bounded.
    pub(crate) fn bound(&self) -> WalBound {
        WalBound {
            restart: self.restart.clone(),
            restarts: Default::default(),
        }
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
/// writer). So the writer itself, between two transactions and after answering, runs a RESTART
/// checkpoint when the checkpointer saw the WAL past the bound: it copies what the background
/// passes have not (little: it is asked right after a pass, whose pages are synced), waits for
/// readers to leave the old frames, and the next write starts the WAL over from its beginning.
/// RESTART rather than TRUNCATE: emptying a 256 MiB WAL took ext4 124-132 ms in `ftruncate`
/// (and the writes after it allocated the file's blocks again), with every webhook answer held
/// behind it; a restarted WAL reuses its file, which `journal_size_limit` keeps at the bound.
pub(crate) struct WalBound {
    restart: Arc<AtomicBool>,
    restarts: AtomicU64,
}

impl WalBound {
    /// Call on the writer's connection, outside a transaction. Errors are left to the next
    /// request: a busy reader only postpones the restart.
    pub(crate) fn after_commit(&self, writer: &Connection) {
        if !self.restart.swap(false, Ordering::AcqRel) {
            return;
        }
        let began = std::time::Instant::now();
        // A checkpoint that could not finish (readers stayed) says so in its first column,
        // `busy`, not as an error.
        match writer.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)) {
            Ok(0) => {
                self.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(ms = began.elapsed().as_millis() as u64, "log WAL restarted")
            }
            Ok(_) => tracing::debug!("log WAL restart postponed: readers still in the WAL"),
            Err(e) => tracing::debug!(error = %e, "log WAL restart postponed"),
        }
    }

    #[cfg(test)]
    fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

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
        let idle = Checkpointer::start(&writer, open(&path), hour, 1 << 30).unwrap();
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
        let _ckpt = Checkpointer::start(&writer, open(&path), every, 1 << 30).unwrap();
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
        let ckpt = Checkpointer::start(&writer, open(&path), every, 1 << 20).unwrap();
        let bound = ckpt.bound();
        let reader = open(&path);
        let wal = wal_of(&path);
        let mut largest = 0;
        // ~80 MiB written in all (two pages a row).
        for i in 0..10_000 {
            insert_page(&writer);
            bound.after_commit(&writer);
            if i % 100 == 0 {
                let _: i64 = reader
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .unwrap();
            }
            largest = largest.max(file_len(&wal));
        }
        assert!(largest < 24 << 20, "the WAL reached {largest} bytes");
        // About one start-over per MiB written (~80), not one per commit (10,000).
        let starts = bound.restarts();
        assert!(
            (10..1000).contains(&starts),
            "the WAL started over {starts} times"
        );
    }
}
