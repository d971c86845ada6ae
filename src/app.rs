//! Wires the stages: `serve` runs ingress, normalizer and projector (or one of them, `role`)
//! over the configured log (SQLite files in the data folder, or Kafka topics) and projection
//! store (SQLite in the data folder, or a CQL cluster); `rebuild` replays the events log into a
//! fresh projection generation of the configured store and switches to it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{LogKind, ProjectionStoreKind, ServeConfig};
use crate::event::DeliveryEvent;
use crate::ingress::{self, ratelimit::Limiter, AppState};
use crate::log::kafka::topology::Admin;
use crate::log::kafka::{KafkaLog, KafkaSettings};
use crate::log::sqlite::SqliteLog;
use crate::log::{
    DeadLetterLog, EnvelopeLog, EventLog, EventSearch, LagProbe, LogError, NormalizerLog, Offset,
    Record, StageLag,
};
use crate::projection::cql::CqlProjections;
use crate::projection::sqlite::SqliteProjections;
use crate::projection::{Batch, Partition, Positions, ProjectionStore};
use crate::providers::replay_cql::CqlReplayGuard;
use crate::providers::{registry, MemoryReplayGuard, ProviderSettings, ReplayGuard};
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
        Ok(Lag {
            normalizer: self.state.lag.normalizer().await?.records,
            projector: self.state.lag.projector().await?.records,
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

/// The adapters' settings. Single-use tokens are recorded in the CQL keyspace when projections
/// live there (every ingress replica shares it, see `CqlReplayGuard`), otherwise in this
/// process's memory (the embedded default: one process).
pub async fn provider_settings(cfg: &ServeConfig) -> anyhow::Result<ProviderSettings> {
    let replay_guard: Arc<dyn ReplayGuard> = match cfg.projection_store {
        // Only ingress spends tokens; the other roles never call the guard.
        ProjectionStoreKind::Cql if cfg.role.runs_ingress() => Arc::new(
            CqlReplayGuard::open(&cfg.cql_settings())
                .await
                .context("opening the CQL replay guard")?,
        ),
        _ => Arc::new(MemoryReplayGuard::new(cfg.replay_cache_entries)),
    };
    Ok(ProviderSettings {
        timestamp_tolerance: Duration::from_secs(cfg.timestamp_tolerance_secs),
        replay_guard,
    })
}

/// The log side of a `serve`: one backend behind the traits the rest uses.
enum Backend {
    Sqlite(Arc<SqliteLog>),
    Kafka(Arc<KafkaLog>),
}

struct Logs {
    backend: Backend,
    envelopes: Arc<dyn EnvelopeLog>,
    search: Arc<dyn EventSearch>,
    dead_letters: Arc<dyn DeadLetterLog>,
    lag: Arc<dyn LagProbe>,
}

impl Logs {
    async fn open(cfg: &ServeConfig, store: Arc<dyn ProjectionStore>) -> anyhow::Result<Logs> {
        Ok(match cfg.log {
            LogKind::Sqlite => {
                let log = SqliteLog::open(
                    &cfg.data_dir.join("log.db"),
                    Duration::from_millis(cfg.append_timeout_ms),
                )
                .context("opening the event log")?;
                Logs {
                    envelopes: Arc::new(log.clone()),
                    search: Arc::new(log.clone()),
                    dead_letters: Arc::new(log.clone()),
                    lag: Arc::new(EmbeddedLag {
                        log: log.clone(),
                        store,
                    }),
                    backend: Backend::Sqlite(log),
                }
            }
            LogKind::Kafka => {
                let settings = kafka_settings(cfg)?;
                check_topology(&settings, cfg).await?;
                let log = Arc::new(
                    KafkaLog::open(settings.clone())
                        .await
                        .context("opening the Kafka log")?,
                );
                Logs {
                    envelopes: log.clone(),
                    search: log.clone(),
                    dead_letters: log.clone(),
                    lag: Arc::new(crate::log::kafka::lag::KafkaLag::new(settings, store)?),
                    backend: Backend::Kafka(log),
                }
            }
        })
    }
}

fn kafka_settings(cfg: &ServeConfig) -> anyhow::Result<KafkaSettings> {
    Ok(cfg.kafka_settings()?)
}

/// Refuses a cluster whose topics are missing or differ from the topology.
async fn check_topology(settings: &KafkaSettings, cfg: &ServeConfig) -> anyhow::Result<()> {
    settings.topology.check_body_limit(cfg.max_body_bytes)?;
    let admin = Admin::connect(&settings.client_config(), Duration::from_secs(10))?;
    let drift = admin.drift(&settings.topology).await?;
    if !drift.is_empty() {
        let file = cfg
            .kafka_topology
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the built-in topology/topics.toml".into());
        anyhow::bail!(
            "the Kafka topics at {} differ from {file}:\n  - {}\nrun `xsender-events topology apply` with the same settings{}",
            settings.brokers,
            drift.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n  - "),
            if drift.iter().all(|d| d.repairable()) { "" } else { " (partition counts and replication it reports but does not change)" }
        );
    }
    Ok(())
}

/// Lags on the embedded log: sequence heads against checkpoints.
struct EmbeddedLag {
    log: Arc<SqliteLog>,
    store: Arc<dyn ProjectionStore>,
}

#[async_trait]
impl LagProbe for EmbeddedLag {
    async fn normalizer(&self) -> Result<StageLag, LogError> {
        let log = &self.log;
        let (head, cp) = (
            log.envelope_head().await?,
            log.normalizer_checkpoint().await?,
        );
        let oldest = log.read_envelopes(cp, 1).await?;
        Ok(StageLag {
            records: head - cp,
            oldest_received_at_ms: oldest.first().map(|r| r.value.received_at_ms),
        })
    }

    async fn projector(&self) -> Result<StageLag, LogError> {
        let cp = self
            .store
            .checkpoint()
            .await
            .map_err(|e| LogError::Unavailable(e.to_string()))?;
        let head = self.log.head().await?;
        let oldest = self.log.read_events(cp, 1).await?;
        Ok(StageLag {
            records: head - cp,
            oldest_received_at_ms: oldest.first().map(|r| r.value.received_at_ms),
        })
    }

    async fn events_written(&self) -> Result<i64, LogError> {
        self.log.head().await
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
    if cfg.log == LogKind::Sqlite || cfg.projection_store == ProjectionStoreKind::Sqlite {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data folder {}", cfg.data_dir.display()))?;
    }
    let projections = open_projections(&cfg).await?;
    let settings = provider_settings(&cfg).await?;
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
    if cfg.role.runs_ingress() && tenants.snapshot().is_empty() {
        tracing::warn!("no tenants configured: every webhook will be refused (401) until one is added (tenants file or admin API)");
    }
    let logs = Logs::open(&cfg, projections.clone()).await?;
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
        envelopes: logs.envelopes.clone(),
        lag: logs.lag.clone(),
        events: logs.search.clone(),
        dead_letters: logs.dead_letters.clone(),
        projections: projections.clone(),
        replay_guard: settings.replay_guard.clone(),
        limiter,
        trust_forwarded_for: cfg.trust_forwarded_for,
        admin_token: cfg.admin_token.clone(),
        max_body_bytes: cfg.max_body_bytes,
        metrics: metrics.clone(),
        ready: false.into(),
        role: cfg.role,
    });

    let (trigger, shutdown) = shutdown::channel();
    let mut tasks = Vec::new();
    // Every role serves HTTP: probes and /metrics everywhere, webhooks and APIs on ingress.
    tasks.push(tokio::spawn(ingress::serve(
        listener,
        state.clone(),
        shutdown.clone(),
        Duration::from_secs(cfg.shutdown_grace_secs),
    )));
    let normalizer = Normalizer::new(&providers, metrics.clone());
    match &logs.backend {
        Backend::Sqlite(log) => {
            tasks.push(tokio::spawn(normalizer.run(
                Arc::new(log.clone()),
                cfg.normalizer_batch,
                shutdown.clone(),
            )));
            tasks.push(tokio::spawn(projector::run(
                Arc::new(log.clone()),
                projections,
                cfg.projector_batch,
                shutdown.clone(),
            )));
        }
        Backend::Kafka(log) => {
            if cfg.role.runs_normalizer() {
                tasks.push(tokio::spawn(crate::stages::kafka::run_normalizer(
                    log.clone(),
                    normalizer,
                    cfg.normalizer_batch,
                    shutdown.clone(),
                )));
            }
            if cfg.role.runs_projector() {
                tasks.push(tokio::spawn(crate::stages::kafka::run_projector(
                    log.settings().clone(),
                    log.wire().clone(),
                    projections,
                    cfg.projector_batch,
                    shutdown.clone(),
                )));
            }
        }
    }
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
    tracing::info!(%addr, role = cfg.role.as_str(), log = ?cfg.log, data_dir = %cfg.data_dir.display(), projections = ?cfg.projection_store, "xsender-events serving");
    Ok(Running {
        addr,
        readiness_drain: Duration::from_secs(cfg.readiness_drain_secs),
        state,
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
#[derive(Debug, Clone)]
pub enum RebuildFrom {
    Start,
    /// The embedded log's event offset.
    Offset(Offset),
    /// Kafka: the offset to start from in each partition (unlisted partitions from their start).
    Offsets(BTreeMap<Partition, i64>),
    /// The first event logged at or after this time (ms).
    Time(i64),
}

#[derive(Debug)]
pub struct RebuildReport {
    pub generation: i64,
    /// Where the replay started (per partition; the embedded log is partition 0).
    pub start: Positions,
    pub events: u64,
    pub dropped: Vec<i64>,
    pub elapsed: Duration,
}

/// Replays the events log into a fresh generation of the configured projection store, then
/// switches readers and the live projector to it. Safe while `serve` runs with the same
/// configuration.
pub async fn rebuild(
    cfg: &ServeConfig,
    from: RebuildFrom,
    drop_old: bool,
    progress: bool,
) -> anyhow::Result<RebuildReport> {
    cfg.validate()?;
    let store = open_projections(cfg).await?;
    let started = Instant::now();
    let (generation, start, events) = match cfg.log {
        LogKind::Sqlite => rebuild_embedded(cfg, &store, from, progress).await?,
        LogKind::Kafka => rebuild_kafka(cfg, &store, from, progress).await?,
    };
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

async fn rebuild_embedded(
    cfg: &ServeConfig,
    store: &Arc<dyn ProjectionStore>,
    from: RebuildFrom,
    progress: bool,
) -> anyhow::Result<(i64, Positions, u64)> {
    let path = cfg.data_dir.join("log.db");
    if !path.exists() {
        anyhow::bail!(
            "no event log at {}: pass --data-dir of a folder `serve` has used",
            path.display()
        );
    }
    let log = SqliteLog::open(&path, Duration::from_secs(10)).context("opening the event log")?;
    let start = match from {
        RebuildFrom::Start => 1,
        RebuildFrom::Offset(o) => o.max(1),
        RebuildFrom::Offsets(m) => match m.into_iter().collect::<Vec<_>>().as_slice() {
            [(0, o)] => o + 1,
            _ => anyhow::bail!("the embedded log has one partition: give --from-offset N"),
        },
        RebuildFrom::Time(t) => log.offset_at(t).await?,
    };
    let head = log.head().await?;
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
    let tail = move |partition: Partition,
                     after: Offset,
                     max: usize|
          -> Result<Vec<Record<DeliveryEvent>>, String> {
        if partition != 0 {
            return Ok(Vec::new());
        }
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
    Ok((generation, Positions::from([(0, start)]), events))
}

/// Kafka: reads every partition of the events topic from the chosen offsets up to the ends
/// seen at the start into the new generation, then lets the store catch up each partition's
/// tail and switch.
async fn rebuild_kafka(
    cfg: &ServeConfig,
    store: &Arc<dyn ProjectionStore>,
    from: RebuildFrom,
    progress: bool,
) -> anyhow::Result<(i64, Positions, u64)> {
    use crate::log::kafka::replay;
    let settings = kafka_settings(cfg)?;
    check_topology(&settings, cfg).await?;
    let log = KafkaLog::open(settings.clone())
        .await
        .context("opening the Kafka log")?;
    let wire = log.wire().clone();
    let ends = {
        let s = settings.clone();
        tokio::task::spawn_blocking(move || replay::event_partitions(&s)).await??
    };
    let starts: BTreeMap<Partition, i64> = match from {
        RebuildFrom::Start => ends.iter().map(|(p, (low, _))| (*p, *low)).collect(),
        RebuildFrom::Offsets(m) => {
            if let Some(p) = m.keys().find(|p| !ends.contains_key(p)) {
                anyhow::bail!(
                    "partition {p} is not a partition of {} (it has {})",
                    settings.topology.topics.events.name,
                    ends.len()
                );
            }
            ends.iter()
                .map(|(p, (low, _))| (*p, m.get(p).copied().unwrap_or(*low).max(*low)))
                .collect()
        }
        RebuildFrom::Offset(_) => anyhow::bail!(
            "on Kafka give an offset per partition: --from-offset 0:1200,1:1187,… (partitions not listed start at their beginning)"
        ),
        RebuildFrom::Time(t) => {
            let s = settings.clone();
            let parts: Vec<Partition> = ends.keys().copied().collect();
            tokio::task::spawn_blocking(move || {
                let c = s.reader()?;
                crate::log::kafka::offsets_for_time(
                    &c,
                    &s.topology.topics.events.name,
                    parts,
                    t,
                    s.produce_timeout,
                )
            })
            .await??
        }
    };
    // A checkpoint is the last record offset folded (Kafka offset + 1), so the generation
    // starting at Kafka offset `o` has checkpoint `o` and `create_generation` takes `o + 1`.
    let start: Positions = starts.iter().map(|(p, o)| (*p, o + 1)).collect();
    let generation = store.create_generation(&start).await?;
    let highs: BTreeMap<Partition, i64> = ends.iter().map(|(p, (_, h))| (*p, *h)).collect();
    let total: i64 = highs
        .iter()
        .map(|(p, h)| (h - starts.get(p).copied().unwrap_or(0)).max(0))
        .sum();
    let mut bar = crate::progress::Progress::new("rebuild", total as u64, progress);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(4);
    let reader = {
        let (settings, wire, starts, highs) = (settings.clone(), wire.clone(), starts, highs);
        tokio::task::spawn_blocking(move || {
            replay::read_range(&settings, &wire, &starts, &highs, 5000, |b| {
                tx.blocking_send(b)
                    .map_err(|_| LogError::Unavailable("rebuild stopped".into()))
            })
        })
    };
    let mut events = 0u64;
    while let Some(batch) = rx.recv().await {
        let n = batch.len() as u64;
        store.apply_to(generation, batch).await?;
        events += n;
        bar.advance(n);
    }
    reader.await??;
    bar.finish();
    let tail = replay::tail_reader(settings, wire)?;
    store
        .switch_to(generation, ends.keys().copied().collect(), tail)
        .await?;
    Ok((generation, start, events))
}
