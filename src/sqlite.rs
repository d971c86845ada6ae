//! What the embedded SQLite stores (the log and the projections) share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

/// Copies a database's WAL into its file from a thread of its own, so that no writer pays for
/// it inside a COMMIT. SQLite's automatic checkpoint runs in the COMMIT that crosses
/// `wal_autocheckpoint` pages: the writer then waits for megabytes of page writes and two
/// fsyncs (in the log that held webhook answers; in the projections it was a third of a
/// rebuild's samples). The writer's connection sets `wal_autocheckpoint=0` and this thread runs
/// PASSIVE checkpoints, which never block the writer or readers. Stops, after one last pass,
/// when dropped.
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Turns off the automatic checkpoint on `writer` and starts checkpointing through `conn`
    /// (a connection of its own to the same file) every `every`.
    pub(crate) fn start(
        writer: &Connection,
        conn: Connection,
        name: &str,
        every: Duration,
    ) -> Result<Checkpointer, String> {
        writer
            .execute_batch("PRAGMA wal_autocheckpoint=0;")
            .map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let what = name.to_string();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let pass = || {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::debug!(error = %e, thread = %what, "checkpoint skipped");
                    }
                };
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    pass();
                }
                // One last pass, so a closed store leaves a small WAL behind.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn size(path: &std::path::Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    /// The writer no longer checkpoints: its WAL grows past SQLite's 1000-page threshold (where
    /// an automatic checkpoint would have restarted it at ~4 MiB) while the database file stays
    /// empty; then the thread copies the WAL into the file without anyone asking.
    #[test]
    fn the_writer_never_checkpoints_and_the_thread_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let open = || {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
            c
        };
        let writer = open();
        writer
            .execute_batch("CREATE TABLE t (v BLOB NOT NULL);")
            .unwrap();
        let idle = Checkpointer::start(
            &writer,
            open(),
            "idle-checkpoint",
            Duration::from_secs(3600),
        )
        .unwrap();
        let blob = vec![7u8; 4096];
        for _ in 0..1500 {
            writer
                .execute("INSERT INTO t (v) VALUES (?1)", [&blob])
                .unwrap();
        }
        let (wal, db) = (path.with_extension("db-wal"), path.clone());
        assert!(size(&wal) > 6 << 20, "WAL is {} bytes", size(&wal));
        assert!(size(&db) < 1 << 20, "database file is {} bytes", size(&db));
        drop(idle);

        let _ckpt = Checkpointer::start(
            &writer,
            open(),
            "test-checkpoint",
            Duration::from_millis(20),
        )
        .unwrap();
        let t = std::time::Instant::now();
        while size(&db) < 6 << 20 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(size(&db) >= 6 << 20, "database file is {} bytes", size(&db));
    }
}
