//! The `xsender-events` command: `serve`, `rebuild`, `migrate`, `check-tenants`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use xsender_events::app::{self, RebuildFrom};
use xsender_events::config::{ProjectionStoreKind, ServeConfig};
use xsender_events::secret::Secret;

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
    /// Run ingress, normalizer and projector on the embedded default (SQLite in the data folder).
    Serve(ServeArgs),
    /// Replay the events log into fresh projection tables and switch to them (safe while serving).
    Rebuild(RebuildArgs),
    /// Create or upgrade the CQL projection schema (keyspace, tables) from schemas/cql/.
    Migrate(MigrateArgs),
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
    #[command(flatten)]
    store: StoreArgs,
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
    /// Replay from this event offset instead of the start.
    #[arg(long, conflicts_with = "from_time")]
    from_offset: Option<i64>,
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

async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let from = match (args.from_offset, args.from_time) {
        (Some(o), _) => RebuildFrom::Offset(o),
        (None, Some(t)) => RebuildFrom::Time(
            xsender_events::ingress::http::parse_time(&t).map_err(anyhow::Error::msg)?,
        ),
        (None, None) => RebuildFrom::Start,
    };
    let mut cfg = load_config(&args.config)?;
    args.store.apply(&mut cfg);
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if !cfg.data_dir.join("log.db").exists() {
        anyhow::bail!(
            "no event log at {}: pass --data-dir of a folder `serve` has used",
            cfg.data_dir.join("log.db").display()
        );
    }
    let r = app::rebuild(&cfg, from, args.drop_old, true).await?;
    eprintln!(
        "rebuilt generation {} from offset {}: {} events in {:.2?}{}",
        r.generation,
        r.start,
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
            Command::Serve(a) => serve(a).await,
            Command::Rebuild(a) => rebuild(a).await,
            Command::Migrate(a) => migrate(a).await,
            Command::CheckTenants { file } => check_tenants(file),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
