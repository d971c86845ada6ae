//! Settings of `serve`. Every field has a default, so `xsender-events serve` runs with no
//! configuration; a TOML file (`--config`) and flags/env override them, in that order.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Folder of the embedded backend: `log.db` (envelopes, events, dead letters),
    /// `projections.db` and `tenants.db`. Created if missing.
    pub data_dir: PathBuf,
    /// Address the HTTP server binds (webhooks, read API, admin API, probes).
    pub listen: SocketAddr,
    /// Tenants file (TOML, see README). When unset, `./tenants.toml` is read if it exists.
    pub tenants_file: Option<PathBuf>,
    /// Bearer token of the admin API; the admin API is off without one. At least 16 chars.
    pub admin_token: Option<Secret>,
    /// Largest webhook body accepted; larger ones get 413. SendGrid batches stay well under
    /// this (up to ~1000 events); 16 MiB leaves room for big SES/SNS batches too.
    pub max_body_bytes: usize,
    /// How far a signed timestamp may be from our clock (SendGrid, Mailgun), in seconds.
    pub timestamp_tolerance_secs: u64,
    /// How long a webhook waits for its envelope to be durable before it gets 503.
    pub append_timeout_ms: u64,
    /// Read/admin API rate limit per client IP: sustained requests per second…
    pub rate_limit_per_second: u32,
    /// …and burst size.
    pub rate_limit_burst: u32,
    /// Behind a load balancer every client has its address: set this to rate limit by the
    /// left-most `X-Forwarded-For` address instead. Only when the proxy sets that header, or
    /// clients could pick their own bucket.
    pub trust_forwarded_for: bool,
    /// Envelopes the normalizer takes per step.
    pub normalizer_batch: usize,
    /// Events the projector folds per transaction.
    pub projector_batch: usize,
    /// On SIGTERM, how long in-flight requests get to finish.
    pub shutdown_grace_secs: u64,
    /// On SIGTERM, how long `/readyz` answers 503 while still serving, before the listener
    /// closes: time for load balancers (Kubernetes endpoints) to stop routing here.
    pub readiness_drain_secs: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("data"),
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tenants_file: None,
            admin_token: None,
            max_body_bytes: 16 * 1024 * 1024,
            timestamp_tolerance_secs: 600,
            append_timeout_ms: 10_000,
            rate_limit_per_second: 50,
            rate_limit_burst: 100,
            trust_forwarded_for: false,
            normalizer_batch: 256,
            projector_batch: 2000,
            shutdown_grace_secs: 20,
            readiness_drain_secs: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Checks values a typo could make absurd, with what to set instead.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes must be at least 1024");
        }
        if self.rate_limit_per_second == 0 || self.rate_limit_burst == 0 {
            return bad("rate_limit_per_second and rate_limit_burst must be at least 1");
        }
        if self.normalizer_batch == 0 || self.projector_batch == 0 {
            return bad("normalizer_batch and projector_batch must be at least 1");
        }
        if self.append_timeout_ms == 0 {
            return bad("append_timeout_ms must be at least 1");
        }
        if let Some(t) = &self.admin_token {
            if t.expose().len() < 16 {
                return bad("admin_token must be at least 16 characters");
            }
        }
        Ok(())
    }

    /// The tenants file to read: the configured one, else `./tenants.toml` if present.
    pub fn tenants_path(&self) -> Option<PathBuf> {
        self.tenants_file.clone().or_else(|| {
            let p = PathBuf::from("tenants.toml");
            p.exists().then_some(p)
        })
    }
}
