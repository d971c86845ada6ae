//! Tenants persisted in the CQL keyspace (`tenants` table, `schemas/cql/002_tenants.cql`), used
//! with `projection_store = "cql"` so every `serve` of a cluster deployment shares them.

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::store::TenantStore;
use super::{TenantConfig, TenantError};
use crate::projection::cql::{connect_migrated, prepare_statement, CqlError, CqlSettings};

pub struct CqlTenantStore {
    session: Session,
    load_all: PreparedStatement,
    get: PreparedStatement,
    put: PreparedStatement,
    delete: PreparedStatement,
}

fn store_err(e: impl std::fmt::Display) -> TenantError {
    TenantError::Store(e.to_string())
}

impl CqlTenantStore {
    pub async fn open(settings: &CqlSettings) -> Result<CqlTenantStore, CqlError> {
        let session = connect_migrated(settings).await?;
        let ks = &settings.keyspace;
        let prepare = |cql: &'static str| {
            let (session, cql) = (&session, cql.replace("{ks}", ks));
            async move { prepare_statement(session, &cql, true).await }
        };
        Ok(CqlTenantStore {
            load_all: prepare("SELECT id, config FROM {ks}.tenants").await?,
            get: prepare("SELECT id FROM {ks}.tenants WHERE id = ?").await?,
            put: prepare("INSERT INTO {ks}.tenants (id, config) VALUES (?, ?)").await?,
            delete: prepare("DELETE FROM {ks}.tenants WHERE id = ?").await?,
            session,
        })
    }
}

#[async_trait]
impl TenantStore for CqlTenantStore {
    async fn load_all(&self) -> Result<Vec<(String, TenantConfig)>, TenantError> {
        let r = self
            .session
            .execute_unpaged(&self.load_all, ())
            .await
            .map_err(store_err)?
            .into_rows_result()
            .map_err(store_err)?;
        let mut out = Vec::new();
        for row in r.rows::<(String, Option<String>)>().map_err(store_err)? {
            let (id, json) = row.map_err(store_err)?;
            let cfg: TenantConfig =
                serde_json::from_str(json.as_deref().unwrap_or("{}")).map_err(store_err)?;
            out.push((id, cfg));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn put(&self, id: &str, config: &TenantConfig) -> Result<(), TenantError> {
        let json = serde_json::to_string(config).map_err(store_err)?;
        self.session
            .execute_unpaged(&self.put, (id, json))
            .await
            .map_err(store_err)?;
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<bool, TenantError> {
        // Writers are serialised by the tenant directory; read-then-delete needs no LWT.
        let existed = self
            .session
            .execute_unpaged(&self.get, (id,))
            .await
            .map_err(store_err)?
            .into_rows_result()
            .map_err(store_err)?
            .rows_num()
            > 0;
        self.session
            .execute_unpaged(&self.delete, (id,))
            .await
            .map_err(store_err)?;
        Ok(existed)
    }
}
