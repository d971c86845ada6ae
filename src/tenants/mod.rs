//! Tenants: who may write and read what. A tenant has an id, an API token for the read API and
//! per-provider credentials. They come from a TOML file at start and from the admin API at run
//! time, and are persisted by the backend ([`store`]). Secrets never leave through `Debug`, logs
//! or responses.

pub mod cql;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::providers::{Credentials, Provider, Rejection};
use crate::secret::Secret;

pub use cql::CqlTenantStore;
pub use store::{SqliteTenantStore, TenantStore};

/// One tenant as configured: `[tenants.<id>]` in the tenants file, or the JSON body of
/// `PUT /api/admin/tenants/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantConfig {
    /// Bearer token for this tenant's read API (`/api/v1/...`). Without one, the tenant's data
    /// cannot be read through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<Secret>,
    /// One section per provider (`sendgrid`, …); each provider checks its own fields.
    #[serde(flatten)]
    pub providers: BTreeMap<String, serde_json::Value>,
}

/// The tenants file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("tenants file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("tenants file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("tenant '{tenant}': {message}")]
    Invalid { tenant: String, message: String },
    #[error("tenant store: {0}")]
    Store(String),
}

impl TenantsFile {
    pub fn load(path: &std::path::Path) -> Result<TenantsFile, TenantError> {
        let text = std::fs::read_to_string(path).map_err(|source| TenantError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| TenantError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }
}

/// A tenant ready for use: credentials parsed once.
pub struct Tenant {
    pub id: String,
    pub config: TenantConfig,
    credentials: BTreeMap<String, Credentials>,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("id", &self.id)
            .field("providers", &self.credentials.keys())
            .finish()
    }
}

/// Tenant ids appear in URLs and keys: keep them plain.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "tenant id '{id}' must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'"
        ));
    }
    Ok(())
}

impl Tenant {
    /// Checks and prepares a tenant against the registered providers.
    pub fn prepare(
        id: &str,
        config: TenantConfig,
        providers: &[Arc<dyn Provider>],
    ) -> Result<Tenant, TenantError> {
        let invalid = |message: String| TenantError::Invalid {
            tenant: id.to_string(),
            message,
        };
        validate_id(id).map_err(invalid)?;
        if let Some(t) = &config.api_token {
            if t.expose().len() < 16 {
                return Err(invalid("api_token must be at least 16 characters".into()));
            }
        }
        let mut credentials = BTreeMap::new();
        for (name, section) in &config.providers {
            let provider = providers.iter().find(|p| p.name() == name).ok_or_else(|| {
                let known: Vec<_> = providers.iter().map(|p| p.name()).collect();
                invalid(format!(
                    "unknown key or provider '{name}' (known providers: {})",
                    known.join(", ")
                ))
            })?;
            let creds = provider
                .parse_credentials(section)
                .map_err(|m| invalid(format!("[{name}] {m}")))?;
            credentials.insert(name.clone(), creds);
        }
        Ok(Tenant {
            id: id.to_string(),
            config,
            credentials,
        })
    }

    pub fn credentials(&self, provider: &str) -> Option<&Credentials> {
        self.credentials.get(provider)
    }

    pub fn provider_names(&self) -> impl Iterator<Item = &str> {
        self.credentials.keys().map(String::as_str)
    }
}

fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// An immutable snapshot of all tenants; swapped whole when anything changes.
#[derive(Default)]
pub struct TenantSet {
    tenants: BTreeMap<String, Arc<Tenant>>,
    /// SHA-256 of each API token → tenant id. Looking up by hash keeps the comparison free of
    /// secret-dependent timing.
    by_token: HashMap<[u8; 32], String>,
}

impl TenantSet {
    pub fn new(tenants: Vec<Tenant>) -> Result<TenantSet, TenantError> {
        let mut set = TenantSet::default();
        for t in tenants {
            if let Some(tok) = &t.config.api_token {
                if let Some(other) = set
                    .by_token
                    .insert(token_hash(tok.expose().as_bytes()), t.id.clone())
                {
                    return Err(TenantError::Invalid {
                        tenant: t.id.clone(),
                        message: format!("api_token is the same as tenant '{other}'s; every tenant needs its own"),
                    });
                }
            }
            set.tenants.insert(t.id.clone(), Arc::new(t));
        }
        Ok(set)
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.tenants.values()
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn by_api_token(&self, token: &str) -> Option<&Arc<Tenant>> {
        let id = self.by_token.get(&token_hash(token.as_bytes()))?;
        self.tenants.get(id)
    }

    /// The tenants a request for `provider` could belong to, with their credentials. With a
    /// tenant in the URL only that tenant, and it must have credentials (fail closed).
    pub fn candidates(
        &self,
        provider: &str,
        route_tenant: Option<&str>,
    ) -> Result<Vec<(String, Credentials)>, Rejection> {
        match route_tenant {
            Some(id) => {
                let t = self.get(id).ok_or_else(|| Rejection::unknown_tenant(id))?;
                let c = t.credentials(provider).ok_or_else(|| {
                    Rejection::new(
                        hyper::StatusCode::UNAUTHORIZED,
                        "no_credentials",
                        format!("tenant '{id}' has no {provider} credentials configured, so the request cannot be verified: add [tenants.{id}.{provider}]"),
                    )
                })?;
                Ok(vec![(id.to_string(), c.clone())])
            }
            None => Ok(self
                .tenants
                .values()
                .filter_map(|t| t.credentials(provider).map(|c| (t.id.clone(), c.clone())))
                .collect()),
        }
    }
}

/// The live tenant directory: a snapshot for readers, a store behind it for writes.
pub struct TenantDirectory {
    current: ArcSwap<TenantSet>,
    store: Arc<dyn TenantStore>,
    providers: Vec<Arc<dyn Provider>>,
    /// Serialises writers so a reload never races a put.
    write: tokio::sync::Mutex<()>,
}

impl TenantDirectory {
    /// Loads the persisted tenants, after upserting those from the file (the file wins for the
    /// ids it names, so an install can be configured as code).
    pub async fn open(
        store: Arc<dyn TenantStore>,
        providers: Vec<Arc<dyn Provider>>,
        file: Option<TenantsFile>,
    ) -> Result<TenantDirectory, TenantError> {
        if let Some(file) = file {
            for (id, cfg) in &file.tenants {
                Tenant::prepare(id, cfg.clone(), &providers)?;
            }
            for (id, cfg) in file.tenants {
                store.put(&id, &cfg).await?;
            }
        }
        let dir = TenantDirectory {
            current: ArcSwap::from_pointee(TenantSet::default()),
            store,
            providers,
            write: tokio::sync::Mutex::new(()),
        };
        dir.reload().await?;
        Ok(dir)
    }

    pub fn snapshot(&self) -> Arc<TenantSet> {
        self.current.load_full()
    }

    /// Rebuilds the snapshot from the store (also picks up changes made by other processes).
    pub async fn reload(&self) -> Result<(), TenantError> {
        let all = self.store.load_all().await?;
        let mut prepared = Vec::with_capacity(all.len());
        for (id, cfg) in all {
            prepared.push(Tenant::prepare(&id, cfg, &self.providers)?);
        }
        self.current.store(Arc::new(TenantSet::new(prepared)?));
        Ok(())
    }

    /// Creates or replaces a tenant. Validated before anything is stored.
    pub async fn put(&self, id: &str, config: TenantConfig) -> Result<(), TenantError> {
        let _w = self.write.lock().await;
        let tenant = Tenant::prepare(id, config.clone(), &self.providers)?;
        // The whole new set must be consistent (unique tokens) before it is persisted.
        let snapshot = self.snapshot();
        let mut others: Vec<Tenant> = Vec::new();
        for t in snapshot.iter().filter(|t| t.id != id) {
            others.push(Tenant::prepare(&t.id, t.config.clone(), &self.providers)?);
        }
        others.push(tenant);
        TenantSet::new(others)?;
        self.store.put(id, &config).await?;
        self.reload().await
    }

    pub async fn delete(&self, id: &str) -> Result<bool, TenantError> {
        let _w = self.write.lock().await;
        let existed = self.store.delete(id).await?;
        self.reload().await?;
        Ok(existed)
    }
}
