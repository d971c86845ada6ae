//! Wires the stages: `serve` runs ingress, normalizer and projector in one process over SQLite
//! files in the data folder, with projections either there too (the embedded default) or in a
//! CQL cluster (`projection_store = "cql"`); `rebuild` replays the events log into a fresh
//! projection generation of the configured store and switches to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{ProjectionStoreKind, ServeConfig};
use crate::event::DeliveryEvent;
use crate::ingress::{self, ratelimit::Limiter, AppState};
use crate::log::sqlite::SqliteLog;
use crate::log::{EventLog, Offset, Record};
use crate::projection::cql::CqlProjections;
use crate::projection::sqlite::SqliteProjections;
use crate::projection::{Batch, Partition, Positions, ProjectionStore};
use crate::providers::{registry, ProviderSettings};
use crate::shutdown::{self, Trigger};
use crate::stages::{normalizer::Normalizer, projector};
use crate::tenants::{
    CqlTenantStore, SqliteTenantStore, TenantDirectory, TenantStore, TenantsFile,
};

/// A running server; dropping it does not stop it: call [`Running::stop`].
pub struct Running {
    pub addr: SocketAddr,
    readiness_drain: Duration,
    pub state: Arc<AppState>,
    log: Arc<SqliteLog>,
    trigger: Trigger,
    tasks: Vec<JoinHandle<()>>,
}

/// How far behind each stage is, in records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag {
    pub normalizer: i64,
    pub projector: i64,
}

impl Lag {
    pub fn is_zero(&self) -> bool {
        self.normalizer == 0 && self.projector == 0
    }
}

impl Running {
    pub async fn lag(&self) -> anyhow::Result<Lag> {
        use crate::log::NormalizerLog;
        let normalizer = self.log.envelope_head().await? - self.log.normalizer_checkpoint().await?;
        let projector = self.log.head().await? - self.state.projections.checkpoint().await?;
        Ok(Lag {
            normalizer,
            projector,
        })
    }

    /// Graceful stop: readiness off, stop accepting, finish in-flight requests, stop stages.
    pub async fn stop(self) {
        self.state.ready.store(false, Ordering::Relaxed);
        tokio::time::sleep(self.readiness_drain).await;
        self.trigger.fire();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub fn provider_settings(cfg: &ServeConfig) -> ProviderSettings {
    ProviderSettings {
        timestamp_tolerance: Duration::from_secs(cfg.timestamp_tolerance_secs),
        // Embedded default: the in-memory replay cache (one process).
        ..ProviderSettings::default()
    }
}

/// Starts everything and returns once the server accepts connections.
pub async fn start(cfg: ServeConfig) -> anyhow::Result<Running> {
    start_with(cfg, registry).await
}

/// [`start`] with the adapters chosen by `providers` (given the shared settings): how tests put
/// a fake certificate fetcher behind the SES adapter without any switch in production config.
pub async fn start_with(
    cfg: ServeConfig,
    providers: impl FnOnce(&ProviderSettings) -> Vec<Arc<dyn crate::providers::Provider>>,
) -> anyhow::Result<Running> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data folder {}", cfg.data_dir.display()))?;
    let log = SqliteLog::open(
        &cfg.data_dir.join("log.db"),
        Duration::from_millis(cfg.append_timeout_ms),
    )
    .context("opening the event log")?;
    let projections = open_projections(&cfg).await?;
    let settings = provider_settings(&cfg);
    let providers = providers(&settings);
    let file = match cfg.tenants_path() {
        Some(p) => {
            tracing::info!(path = %p.display(), "loading tenants file");
            Some(TenantsFile::load(&p)?)
        }
        None => None,
    };
    // In the cluster deployment tenants live beside the projections, shared by every `serve`.
    let tenant_store: Arc<dyn TenantStore> = match cfg.projection_store {
        ProjectionStoreKind::Sqlite => {
            Arc::new(SqliteTenantStore::open(&cfg.data_dir.join("tenants.db"))?)
        }
        ProjectionStoreKind::Cql => Arc::new(
            CqlTenantStore::open(&cfg.cql_settings())
                .await
                .context("opening the CQL tenant store")?,
        ),
    };
    let tenants = Arc::new(TenantDirectory::open(tenant_store, providers.clone(), file).await?);
    if tenants.snapshot().is_empty() {
        tracing::warn!("no tenants configured: every webhook will be refused (401) until one is added (tenants file or admin API)");
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;

    let limiter = Limiter::new(
        NonZeroU32::new(cfg.rate_limit_per_second).context("rate_limit_per_second")?,
        NonZeroU32::new(cfg.rate_limit_burst).context("rate_limit_burst")?,
    );
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let state = Arc::new(AppState {
        providers: providers
            .iter()
            .map(|p| (p.name(), p.clone()))
            .collect::<HashMap<_, _>>(),
        tenants,
        envelopes: Arc::new(log.clone()),
        normalizer_log: Arc::new(log.clone()),
        events: Arc::new(log.clone()),
        dead_letters: Arc::new(log.clone()),
        projections: projections.clone(),
        replay_guard: settings.replay_guard.clone(),
        limiter,
        trust_forwarded_for: cfg.trust_forwarded_for,
        admin_token: cfg.admin_token.clone(),
        max_body_bytes: cfg.max_body_bytes,
        metrics: metrics.clone(),
        ready: false.into(),
    });

    let (trigger, shutdown) = shutdown::channel();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(ingress::serve(
        listener,
        state.clone(),
        shutdown.clone(),
        Duration::from_secs(cfg.shutdown_grace_secs),
    )));
    tasks.push(tokio::spawn(
        Normalizer::new(&providers, metrics.clone()).run(
            Arc::new(log.clone()),
            cfg.normalizer_batch,
            shutdown.clone(),
        ),
    ));
    tasks.push(tokio::spawn(projector::run(
        Arc::new(log.clone()),
        projections,
        cfg.projector_batch,
        shutdown.clone(),
    )));
    {
        let (state, mut shutdown) = (state.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => state.limiter.prune(),
                    _ = shutdown.wait() => return,
                }
            }
        }));
    }
    state.ready.store(true, Ordering::Relaxed);
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), projections = ?cfg.projection_store, "xsender-events serving");
    Ok(Running {
        addr,
        readiness_drain: Duration::from_secs(cfg.readiness_drain_secs),
        state,
        log,
        trigger,
        tasks,
    })
}

/// Opens the configured projection store (the CQL one checks its schema is migrated).
pub async fn open_projections(cfg: &ServeConfig) -> anyhow::Result<Arc<dyn ProjectionStore>> {
    Ok(match cfg.projection_store {
        ProjectionStoreKind::Sqlite => Arc::new(
            SqliteProjections::open(&cfg.data_dir.join("projections.db"))
                .context("opening projections")?,
        ),
        ProjectionStoreKind::Cql => Arc::new(
            CqlProjections::open(&cfg.cql_settings())
                .await
                .context("opening the CQL projection store")?,
        ),
    })
}

/// Where a rebuild starts replaying.
#[derive(Debug, Clone, Copy)]
pub enum RebuildFrom {
    Start,
    Offset(Offset),
    /// The first event logged at or after this time (ms).
    Time(i64),
}

#[derive(Debug)]
pub struct RebuildReport {
    pub generation: i64,
    pub start: Offset,
    pub events: u64,
    pub dropped: Vec<i64>,
    pub elapsed: Duration,
}

/// Replays the events log (in `cfg.data_dir`) into a fresh generation of the configured
/// projection store, then switches readers and the live projector to it. Safe while `serve`
/// runs with the same configuration.
pub async fn rebuild(
    cfg: &ServeConfig,
    from: RebuildFrom,
    drop_old: bool,
    progress: bool,
) -> anyhow::Result<RebuildReport> {
    cfg.validate()?;
    let log = SqliteLog::open(&cfg.data_dir.join("log.db"), Duration::from_secs(10))
        .context("opening the event log")?;
    let store = open_projections(cfg).await?;
    let started = Instant::now();
    let start = match from {
        RebuildFrom::Start => 1,
        RebuildFrom::Offset(o) => o.max(1),
        RebuildFrom::Time(t) => log.offset_at(t).await?,
    };
    let head = log.head().await?;
    // The embedded log is log partition 0 of the projection checkpoints.
    let generation = store
        .create_generation(&Positions::from([(0, start)]))
        .await?;
    let mut cp = start - 1;
    let mut events = 0u64;
    let total = (head - cp).max(0) as u64;
    let mut bar = crate::progress::Progress::new("rebuild", total, progress);
    loop {
        let batch = log.read_events(cp, 5000).await?;
        let Some(last) = batch.last().map(|r| r.offset) else {
            break;
        };
        events += batch.len() as u64;
        bar.advance(batch.len() as u64);
        store.apply_to(generation, Batch::single(0, batch)).await?;
        cp = last;
    }
    bar.finish();
    // The final catch-up runs under the store's write lock, reading the log synchronously.
    let conn = Mutex::new(
        rusqlite::Connection::open(log.path()).context("opening the event log for the switch")?,
    );
    let tail = move |part: Partition,
                     after: Offset,
                     max: usize|
          -> Result<Vec<Record<DeliveryEvent>>, String> {
        assert_eq!(part, 0, "the embedded log has only partition 0");
        let c = conn.lock().map_err(|e| e.to_string())?;
        let mut st = c
            .prepare_cached("SELECT seq, record FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map(rusqlite::params![after, max as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for row in rows {
            let (offset, bytes) = row.map_err(|e| e.to_string())?;
            out.push(Record {
                offset,
                value: crate::avro::decode_event(&bytes).map_err(|e| e.to_string())?,
            });
        }
        Ok(out)
    };
    store.switch_to(generation, vec![0], Box::new(tail)).await?;
    let dropped = if drop_old {
        store.drop_old().await?
    } else {
        Vec::new()
    };
    Ok(RebuildReport {
        generation,
        start,
        events,
        dropped,
        elapsed: started.elapsed(),
    })
}
