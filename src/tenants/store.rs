//! Where tenants persist. The embedded store is a SQLite file in the data folder.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{TenantConfig, TenantError};

#[async_trait]
pub trait TenantStore: Send + Sync {
    async fn load_all(&self) -> Result<Vec<(String, TenantConfig)>, TenantError>;
    async fn put(&self, id: &str, config: &TenantConfig) -> Result<(), TenantError>;
    /// Returns whether the tenant existed.
    async fn delete(&self, id: &str) -> Result<bool, TenantError>;
}

pub struct SqliteTenantStore {
    conn: Arc<Mutex<Connection>>,
}

fn store_err(e: impl std::fmt::Display) -> TenantError {
    TenantError::Store(e.to_string())
}

impl SqliteTenantStore {
    pub fn open(path: &Path) -> Result<Self, TenantError> {
        let conn = Connection::open(path).map_err(store_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, config TEXT NOT NULL);",
        )
        .map_err(store_err)?;
        Ok(SqliteTenantStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, TenantError> + Send + 'static,
    ) -> Result<T, TenantError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(store_err)?
    }
}

#[async_trait]
impl TenantStore for SqliteTenantStore {
    async fn load_all(&self) -> Result<Vec<(String, TenantConfig)>, TenantError> {
        self.with(|c| {
            let mut st = c
                .prepare("SELECT id, config FROM tenants ORDER BY id")
                .map_err(store_err)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(store_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, json) = row.map_err(store_err)?;
                let cfg: TenantConfig = serde_json::from_str(&json).map_err(store_err)?;
                out.push((id, cfg));
            }
            Ok(out)
        })
        .await
    }

    async fn put(&self, id: &str, config: &TenantConfig) -> Result<(), TenantError> {
        let id = id.to_string();
        let json = serde_json::to_string(config).map_err(store_err)?;
        self.with(move |c| {
            c.execute(
                "INSERT INTO tenants (id, config) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET config = excluded.config",
                params![id, json],
            )
            .map_err(store_err)?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<bool, TenantError> {
        let id = id.to_string();
        self.with(move |c| {
            Ok(c.execute("DELETE FROM tenants WHERE id = ?1", [id])
                .map_err(store_err)?
                > 0)
        })
        .await
    }
}
