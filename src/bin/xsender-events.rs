//! The `xsender-events` command: `serve`, `rebuild`, `migrate`, `topology`, `check-tenants`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use xsender_events::app::{self, RebuildFrom};
use xsender_events::config::{LogKind, ProjectionStoreKind, Role, ServeConfig};
use xsender_events::secret::Secret;

/// jemalloc for the whole process, C libraries included (SQLite, librdkafka): with glibc's
/// malloc, memory freed on one thread is kept in that thread's arena, and a server with tokio
/// workers, a blocking pool, the log writer and librdkafka's threads grew to ~1.5–2× the RSS it
/// needed (BENCHMARKS.md, "Peak RSS"). jemalloc returns unused pages to the system over time.
///
/// Its options are compiled in from `.cargo/config.toml` (`MALLOC_CONF` overrides them): its
/// defaults keep freed pages for 10 s and make 4 arenas per core, so bursts (SendGrid batches,
/// normalizer and projector batches) left their peak resident; with 2 arenas and pages given
/// back after a second by jemalloc's own thread, the load harness's peak RSS went from 184 to
/// 139 MiB in a back-to-back pair, with no loss of throughput.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "xsender-events",
    version,
    about = "Email delivery events for XSender: verified ESP webhooks in, Campaign Dispatch projections out"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "XSENDER_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run ingress, normalizer and projector (or one of them, --role): on the embedded default
    /// (SQLite in the data folder) unless the log is on Kafka or projections are in CQL.
    Serve(ServeArgs),
    /// Replay the events log into fresh projection tables and switch to them (safe while serving).
    Rebuild(RebuildArgs),
    /// Create or upgrade the CQL projection schema (keyspace, tables) from schemas/cql/.
    Migrate(MigrateArgs),
    /// The Kafka topics (topology/*.toml): `apply` creates what is missing and repairs topic
    /// configs; `check` only reports drift.
    Topology(TopologyArgs),
    /// Validate a tenants file and print what it configures (no secrets).
    CheckTenants {
        /// The TOML file to check.
        file: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with any `serve` settings (see README); flags and env override it.
    #[arg(long, env = "XSENDER_CONFIG")]
    config: Option<PathBuf>,
    /// Data folder [default: ./data].
    #[arg(long, env = "XSENDER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "XSENDER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Tenants file [default: ./tenants.toml if present].
    #[arg(long, env = "XSENDER_TENANTS")]
    tenants: Option<PathBuf>,
    /// Admin API token (at least 16 characters); the admin API is off without it.
    #[arg(long, env = "XSENDER_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Largest webhook body in bytes [default: 16 MiB].
    #[arg(long, env = "XSENDER_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Allowed clock distance of signed timestamps, seconds [default: 600].
    #[arg(long, env = "XSENDER_TIMESTAMP_TOLERANCE_SECS")]
    timestamp_tolerance_secs: Option<u64>,
    /// On SIGTERM, seconds /readyz reports not-ready before the listener closes [default: 0].
    #[arg(long, env = "XSENDER_READINESS_DRAIN_SECS")]
    readiness_drain_secs: Option<u64>,
    /// On SIGTERM, seconds in-flight requests get to finish [default: 20].
    #[arg(long, env = "XSENDER_SHUTDOWN_GRACE_SECS")]
    shutdown_grace_secs: Option<u64>,
    /// Stages this process runs: all (default), ingress, normalizer or projector (the last
    /// three need --log kafka and --projections cql).
    #[arg(long, env = "XSENDER_ROLE", value_enum)]
    role: Option<Role>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// Which log; override `log` and `kafka_*` of the config file.
#[derive(Args)]
struct LogArgs {
    /// Log backend: sqlite (embedded, default) or kafka.
    #[arg(long, env = "XSENDER_LOG", value_enum)]
    log: Option<LogKind>,
    /// Kafka bootstrap brokers, comma separated (implies --log kafka) [default: 127.0.0.1:9092].
    #[arg(long, env = "XSENDER_KAFKA_BROKERS", value_delimiter = ',')]
    kafka_brokers: Option<Vec<String>>,
    /// Topology file [default: the built-in topology/topics.toml; topology/local.toml for one broker].
    #[arg(long, env = "XSENDER_KAFKA_TOPOLOGY")]
    kafka_topology: Option<PathBuf>,
    /// Prefix of every topic and consumer group name.
    #[arg(long, env = "XSENDER_KAFKA_NAMESPACE")]
    kafka_namespace: Option<String>,
    /// Confluent-compatible schema registry URL (records then use the Confluent wire format).
    #[arg(long, env = "XSENDER_SCHEMA_REGISTRY_URL")]
    schema_registry_url: Option<String>,
}

impl LogArgs {
    fn apply(self, cfg: &mut ServeConfig) {
        if let Some(v) = self.kafka_brokers {
            cfg.kafka_brokers = v;
            cfg.log = LogKind::Kafka;
        }
        if let Some(v) = self.log {
            cfg.log = v;
        }
        if let Some(v) = self.kafka_topology {
            cfg.kafka_topology = Some(v);
        }
        if let Some(v) = self.kafka_namespace {
            cfg.kafka_namespace = v;
        }
        if let Some(v) = self.schema_registry_url {
            cfg.schema_registry_url = Some(v);
        }
    }
}

#[derive(Args)]
struct TopologyArgs {
    /// apply: create missing topics, reset drifted topic configs, report what is left (exit 1
    /// when something is); check: report drift only (exit 1 when there is any).
    #[arg(value_enum)]
    action: TopologyAction,
    /// TOML file with `kafka_*` settings; flags and env override it.
    #[arg(long, env = "XSENDER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq)]
enum TopologyAction {
    Apply,
    Check,
}

/// Which projection store; override `projection_store` and `cql_*` of the config file.
#[derive(Args)]
struct StoreArgs {
    /// Projection store: sqlite (embedded, default) or cql (ScyllaDB/Cassandra).
    #[arg(long, env = "XSENDER_PROJECTIONS", value_enum)]
    projections: Option<ProjectionStoreKind>,
    /// CQL contact points, comma separated [default: 127.0.0.1:9042].
    #[arg(long, env = "XSENDER_CQL_NODES", value_delimiter = ',')]
    cql_nodes: Option<Vec<String>>,
    /// CQL keyspace [default: xsender].
    #[arg(long, env = "XSENDER_CQL_KEYSPACE")]
    cql_keyspace: Option<String>,
    /// Replication map `migrate` creates the keyspace with
    /// [default: {'class': 'SimpleStrategy', 'replication_factor': 1}].
    #[arg(long, env = "XSENDER_CQL_REPLICATION")]
    cql_replication: Option<String>,
}

impl StoreArgs {
    fn apply(self, cfg: &mut ServeConfig) {
        if let Some(v) = self.projections {
            cfg.projection_store = v;
        }
        if let Some(v) = self.cql_nodes {
            cfg.cql_nodes = v;
        }
        if let Some(v) = self.cql_keyspace {
            cfg.cql_keyspace = v;
        }
        if let Some(v) = self.cql_replication {
            cfg.cql_replication = v;
        }
    }
}

fn load_config(path: &Option<PathBuf>) -> anyhow::Result<ServeConfig> {
    Ok(match path {
        Some(p) => ServeConfig::load(p)?,
        None => ServeConfig::default(),
    })
}

#[derive(Args)]
struct MigrateArgs {
    /// TOML file with `cql_*` settings; flags and env override it.
    #[arg(long, env = "XSENDER_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct RebuildArgs {
    /// TOML file with `serve` settings (data folder, projection store); flags and env override it.
    #[arg(long, env = "XSENDER_CONFIG")]
    config: Option<PathBuf>,
    /// Data folder [default: ./data].
    #[arg(long, env = "XSENDER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Replay from this event offset instead of the start; on Kafka one per partition:
    /// `0:1200,1:1187` (partitions not listed start at their beginning).
    #[arg(long, conflicts_with = "from_time")]
    from_offset: Option<String>,
    /// Replay from the first event logged at or after this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    from_time: Option<String>,
    /// Drop the old generations' tables after switching.
    #[arg(long)]
    drop_old: bool,
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = load_config(&args.config)?;
    args.store.apply(&mut cfg);
    args.log.apply(&mut cfg);
    if let Some(v) = args.role {
        cfg.role = v;
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.tenants {
        cfg.tenants_file = Some(v);
    }
    if let Some(v) = args.admin_token {
        cfg.admin_token = Some(Secret::new(v));
    }
    if let Some(v) = args.max_body_bytes {
        cfg.max_body_bytes = v;
    }
    if let Some(v) = args.timestamp_tolerance_secs {
        cfg.timestamp_tolerance_secs = v;
    }
    if let Some(v) = args.readiness_drain_secs {
        cfg.readiness_drain_secs = v;
    }
    if let Some(v) = args.shutdown_grace_secs {
        cfg.shutdown_grace_secs = v;
    }
    let running = app::start(cfg).await?;
    // Tests and scripts read this line to learn the bound port.
    eprintln!("listening on http://{}", running.addr);
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// `N`, or `partition:offset` pairs separated by commas.
fn parse_from_offset(s: &str) -> anyhow::Result<RebuildFrom> {
    if let Ok(o) = s.trim().parse::<i64>() {
        return Ok(RebuildFrom::Offset(o));
    }
    let mut m = std::collections::BTreeMap::new();
    for pair in s.split(',') {
        let parsed = pair
            .split_once(':')
            .and_then(|(p, o)| Some((p.trim().parse::<i32>().ok()?, o.trim().parse::<i64>().ok()?)))
            .filter(|(p, o)| *p >= 0 && *o >= 0);
        let Some((p, o)) = parsed else {
            anyhow::bail!("--from-offset {s:?}: give N, or partition:offset pairs like 0:1200,1:1187 ({pair:?} is neither)");
        };
        if m.insert(p, o).is_some() {
            anyhow::bail!("--from-offset {s:?}: partition {p} is given twice");
        }
    }
    Ok(RebuildFrom::Offsets(m))
}

async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let from = match (args.from_offset, args.from_time) {
        (Some(o), _) => parse_from_offset(&o)?,
        (None, Some(t)) => RebuildFrom::Time(
            xsender_events::ingress::http::parse_time(&t).map_err(anyhow::Error::msg)?,
        ),
        (None, None) => RebuildFrom::Start,
    };
    let mut cfg = load_config(&args.config)?;
    args.store.apply(&mut cfg);
    args.log.apply(&mut cfg);
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    let r = app::rebuild(&cfg, from, args.drop_old, true).await?;
    eprintln!(
        "rebuilt generation {} from {}: {} events in {:.2?}{}",
        r.generation,
        r.start
            .iter()
            .map(|(p, o)| format!("{p}:{o}"))
            .collect::<Vec<_>>()
            .join(","),
        r.events,
        r.elapsed,
        if r.dropped.is_empty() {
            String::new()
        } else {
            format!("; dropped generations {:?}", r.dropped)
        }
    );
    Ok(())
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let mut cfg = load_config(&args.config)?;
    args.store.apply(&mut cfg);
    let settings = cfg.cql_settings();
    let applied = xsender_events::projection::cql::migrate(&settings).await?;
    if applied.is_empty() {
        eprintln!("CQL keyspace {} is up to date", settings.keyspace);
    } else {
        eprintln!(
            "CQL keyspace {}: applied schema versions {applied:?}",
            settings.keyspace
        );
    }
    Ok(())
}

async fn topology(args: TopologyArgs) -> anyhow::Result<ExitCode> {
    use xsender_events::log::kafka::topology::Admin;
    let mut cfg = load_config(&args.config)?;
    args.log.apply(&mut cfg);
    let settings = cfg.kafka_settings()?;
    let admin = Admin::connect(
        &settings.client_config(),
        std::time::Duration::from_secs(15),
    )?;
    let t = &settings.topology;
    eprintln!(
        "topology: replication {} (min in-sync {}), brokers {}",
        t.replication_factor, t.min_insync_replicas, settings.brokers
    );
    for spec in t.all() {
        eprintln!(
            "  {} — {} partitions, key: {}; written by {}, read by {}",
            spec.name,
            spec.partitions,
            spec.key,
            spec.written_by,
            spec.read_by.join(", ")
        );
    }
    eprintln!(
        "  groups: normalizer {}, projector {}",
        t.groups.normalizer, t.groups.projector
    );
    let left = match args.action {
        TopologyAction::Check => admin.drift(t).await?,
        TopologyAction::Apply => {
            let r = admin.apply(t, |step| eprintln!("  {step}")).await?;
            if r.created.is_empty() && r.reconfigured.is_empty() {
                eprintln!("nothing to create or reconfigure");
            }
            r.left
        }
    };
    for d in &left {
        eprintln!("drift: {d}");
    }
    Ok(if left.is_empty() {
        eprintln!("the cluster matches the topology");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn check_tenants(file: PathBuf) -> anyhow::Result<()> {
    let parsed = xsender_events::tenants::TenantsFile::load(&file)?;
    let providers = xsender_events::providers::registry(&Default::default());
    for (id, cfg) in parsed.tenants {
        let t = xsender_events::tenants::Tenant::prepare(&id, cfg, &providers)?;
        println!(
            "{id}: providers [{}], api token {}",
            t.provider_names().collect::<Vec<_>>().join(", "),
            if t.config.api_token.is_some() {
                "set"
            } else {
                "not set"
            }
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Flushes buffered spans when main returns.
    let _tracing = xsender_events::telemetry::init_tracing(cli.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(a) => serve(a).await.map(|_| ExitCode::SUCCESS),
            Command::Rebuild(a) => rebuild(a).await.map(|_| ExitCode::SUCCESS),
            Command::Migrate(a) => migrate(a).await.map(|_| ExitCode::SUCCESS),
            Command::Topology(a) => topology(a).await,
            Command::CheckTenants { file } => check_tenants(file).map(|_| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
