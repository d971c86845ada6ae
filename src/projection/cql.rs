//! The cluster projection store: ScyllaDB (Apache Cassandra in tests) through the `scylla`
//! driver, with the same behaviour as the embedded store.
//!
//! # Tables
//!
//! `schemas/cql/0NN_*.cql` are applied in order by `xsender-events migrate` (recorded in
//! `schema_migrations`); `open` refuses to start on a keyspace that is behind. The per-generation
//! tables come from `schemas/cql/generation.cql` with a `_g<N>` suffix: `dispatches_g<N>` (by
//! tenant + dispatch key), `campaign_recipients_g<N>` (partition per tenant + campaign,
//! clustered by dispatch key), `seen_g<N>` (tenant + event key), `suppressions_g<N>` (partition
//! per tenant, clustered by email + reason) and `contacts_g<N>`. `projection_generations` lists
//! the generations, `projection_checkpoints` keeps each generation's checkpoint per log
//! partition, and `projection_current` is the single row naming the generation that readers and
//! the live projector use. Every statement is prepared and names its keyspace, so the driver's
//! default load balancing routes it to a replica of its partition; all run at the driver's
//! default LOCAL_QUORUM, so a checkpoint or a switch written is what the next read in the data
//! center sees. The keyspace also holds `tenants` (`src/tenants/cql.rs`) and `replay_tokens`
//! (`src/providers/replay_cql.rs`, whose lightweight transactions run Paxos at SERIAL).
//!
//! # Checkpoints per log partition
//!
//! `projection_checkpoints` (`003_projection_checkpoints.cql`) has one CQL partition per
//! generation and a clustering row per log partition: moving a log partition's checkpoint is a
//! single-row write, reading all of a generation's checkpoints one partition read. A
//! `map<int, bigint>` column on `projection_generations` would have done the same with
//! `SET checkpoints[?] = ?`, but adding a column takes `ALTER TABLE … ADD`, which fails when
//! run twice (its `IF NOT EXISTS` form is a recent Cassandra addition, not CQL this project
//! relies on ScyllaDB to accept), while every schema file must survive `migrate` running it
//! again after a crash before it was recorded; a new table is a `CREATE TABLE IF NOT EXISTS`
//! like every other file. The table also keeps the checkpoints apart from collection semantics
//! (a map rewritten whole leaves a tombstone, and is always read whole).
//!
//! Keyspaces migrated before it kept one checkpoint in `projection_generations.checkpoint`. It
//! is read as log partition 0 of a generation with no partition-0 row in the new table, so a
//! deployment resumes exactly where it was; the first batch then writes partition 0's row,
//! which wins from there on. New generations leave the old column empty.
//!
//! # Crash safety without multi-partition transactions
//!
//! CQL cannot write a batch's rows and its checkpoint atomically, so a batch is applied in an
//! order where a kill at *any* point leaves state that re-applying the same events (the
//! projector resumes from the checkpoint, which only moves last) turns into exactly what an
//! uninterrupted run gives:
//!
//! 1. Read the `seen` claims of the batch's event keys. A key already claimed by *another*
//!    dispatch is a duplicate and skipped entirely (each event key counts once per tenant, as
//!    in the embedded store); in-batch claims go to the earliest offset, so a replay decides
//!    the same way.
//! 2. Read the touched dispatch rows. Each row carries `applied`, the event keys folded into
//!    its `state`, written in the same single-partition write as the state. An event whose key
//!    is in `applied` is not folded again: this, not `seen`, is what prevents double counting
//!    when a row was written but the rest of the batch was lost.
//! 3. Write, as absolute values: first the deletes of stale campaign copies (a dispatch whose
//!    campaign id changed), then each dispatch's campaign copy and the dispatch row itself,
//!    the suppressions and the contacts. Suppression and contact merges are min/max merges, so
//!    merging an event twice is harmless; campaign copies are derived from the dispatch row
//!    and rewritten for every touched dispatch, so a lost copy is repaired by the replay.
//! 4. Write the new `seen` claims, then 5. the checkpoints. A claim only ever makes the replay
//!    skip the same key on *another* dispatch (which must be skipped anyway); for its own
//!    dispatch the row's `applied` decides, so a claim whose row was lost loses nothing.
//!
//! A batch may carry runs of several log partitions. Every run is checked against its
//! partition's checkpoint (read once, at the start) before anything is written, so a
//! [`StoreError::Gap`] in any partition writes nothing. The runs are folded together, and each
//! moved partition's checkpoint is written only after *all* rows and claims of the batch, one
//! single-row write per partition: a kill between two of them leaves the partitions whose
//! checkpoint did not land to be replayed, which step 2 makes harmless, while the others are
//! skipped because everything of theirs was written.
//!
//! `tests/cql_store.rs` kills a batch after some dispatch rows, before the claims, before the
//! checkpoints and between the checkpoints of a multi-partition batch, restarts with other
//! batch boundaries, and compares every read with an uninterrupted run (and with the embedded
//! store); moving a checkpoint write earlier makes it fail.
//!
//! `applied` grows with the distinct events of one dispatch (a handful of deliveries, opens and
//! clicks in practice), which bounds the row.
//!
//! # Generations and the switch
//!
//! A rebuild fills fresh `_g<N>` tables, catches up with the log, and then updates the single
//! `projection_current` row: the switch is one single-partition write, so every reader sees
//! either the old or the new generation, never a mix. Readers and the live projector read the
//! current generation per operation (per batch for the projector). There is no global write
//! lock: a projector batch that read the old generation just before the switch may still be
//! written into the old generation after it. That is harmless: nobody reads the old generation
//! any more, and on its next batch the projector reads the new generation's own checkpoints (or
//! gets [`StoreError::Gap`] and re-reads), so the events the catch-up did not see are folded
//! into the new generation by the live projector. The catch-up runs each log partition it is
//! given until the log returns nothing for it. One projector per generation is assumed
//! (the single-writer design of `serve`), and one rebuild at a time; `drop_old` removes the
//! other generations' tables. A read that named the old generation just before the switch and
//! reaches its tables after `drop_old` fails; it is then retried on the generation that is
//! current now (see `on_current!`), so a rebuild with `--drop-old` fails no read. A projector
//! batch that hits dropped tables fails and is retried from the new generation's checkpoint.
//!
//! # Partitions to watch
//!
//! `suppressions_g<N>` has one partition per tenant (the list is paginated per tenant), and the
//! status filter of the recipients query is applied while paging through the campaign's
//! partition; both are fine at XSender's sizes and would get a bucket column if a tenant's
//! suppression list grew into the millions.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;

use super::{
    plan, start_checkpoints, Batch, Generation, GenerationInfo, Partition, Plan, Positions,
    ProjectionStore, RecipientsQuery, StoreError, TailReader,
};
use crate::event::DeliveryEvent;
use crate::fold::{
    apply_contact, contact_change_of, fold_dispatch, merge_suppression, suppression_of, ContactRow,
    DispatchRow, SuppressionRow,
};
use crate::log::{Offset, Record};

/// The numbered schema files, in order: `(version, name, CQL)`.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "001_projection_meta",
        include_str!("../../schemas/cql/001_projection_meta.cql"),
    ),
    (
        2,
        "002_tenants",
        include_str!("../../schemas/cql/002_tenants.cql"),
    ),
    (
        3,
        "003_projection_checkpoints",
        include_str!("../../schemas/cql/003_projection_checkpoints.cql"),
    ),
    (
        4,
        "004_replay_tokens",
        include_str!("../../schemas/cql/004_replay_tokens.cql"),
    ),
];

const GENERATION_TABLES: &str = include_str!("../../schemas/cql/generation.cql");
const TABLES: [&str; 5] = [
    "dispatches",
    "campaign_recipients",
    "seen",
    "suppressions",
    "contacts",
];
/// How many reads or writes of one batch are in flight at once.
const PARALLEL: usize = 32;

/// Where the cluster store lives.
#[derive(Debug, Clone)]
pub struct CqlSettings {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The replication map of `CREATE KEYSPACE`, e.g.
    /// `{'class': 'SimpleStrategy', 'replication_factor': 1}`.
    pub replication: String,
}

impl CqlSettings {
    pub fn validate(&self) -> Result<(), CqlError> {
        if self.nodes.is_empty() {
            return Err(CqlError::Invalid(
                "cql_nodes is empty: name at least one node, e.g. 127.0.0.1:9042".into(),
            ));
        }
        let ks = &self.keyspace;
        if ks.is_empty()
            || ks.len() > 48
            || !ks
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            || !ks.as_bytes()[0].is_ascii_lowercase()
        {
            return Err(CqlError::Invalid(format!(
                "cql_keyspace {ks:?} must be 1-48 lower-case letters, digits or '_', starting with a letter"
            )));
        }
        let r = self.replication.trim();
        if !(r.starts_with('{') && r.ends_with('}') && r.contains("'class'")) || r.contains(';') {
            return Err(CqlError::Invalid(format!(
                "cql_replication {r:?} must be a CQL replication map such as \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}} or \
                 {{'class': 'NetworkTopologyStrategy', 'dc1': 3}}"
            )));
        }
        Ok(())
    }

    fn migrate_hint(&self) -> String {
        format!(
            "xsender-events migrate --cql-nodes {} --cql-keyspace {}",
            self.nodes.join(","),
            self.keyspace
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CqlError {
    #[error("cannot connect to the CQL nodes {nodes}: {message}")]
    Connect { nodes: String, message: String },
    #[error("CQL keyspace {keyspace} has no projection schema: run `{hint}`")]
    NoSchema { keyspace: String, hint: String },
    #[error("CQL keyspace {keyspace} is at schema version {found}, this build needs {needed}: run `{hint}`")]
    SchemaBehind {
        keyspace: String,
        found: i32,
        needed: i32,
        hint: String,
    },
    #[error("CQL keyspace {keyspace} is at schema version {found}, newer than this build knows ({known}): upgrade xsender-events")]
    SchemaAhead {
        keyspace: String,
        found: i32,
        known: i32,
    },
    #[error("CQL {what}: {message}")]
    Query { what: String, message: String },
    #[error("invalid CQL settings: {0}")]
    Invalid(String),
}

fn q(what: &str) -> impl Fn(&dyn std::fmt::Display) -> CqlError + '_ {
    move |e| CqlError::Query {
        what: what.to_string(),
        message: e.to_string(),
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl From<CqlError> for StoreError {
    fn from(e: CqlError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// The statements of a schema file: comments dropped, split on `;`.
fn statements(cql: &str) -> Vec<String> {
    let text: String = cql
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

async fn connect(settings: &CqlSettings) -> Result<Session, CqlError> {
    settings.validate()?;
    SessionBuilder::new()
        .known_nodes(&settings.nodes)
        .connection_timeout(Duration::from_secs(5))
        .build()
        .await
        .map_err(|e| CqlError::Connect {
            nodes: settings.nodes.join(","),
            message: e.to_string(),
        })
}

async fn keyspace_exists(session: &Session, keyspace: &str) -> Result<bool, CqlError> {
    let r = session
        .query_unpaged(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (keyspace,),
        )
        .await
        .map_err(|e| q("reading system_schema")(&e))?
        .into_rows_result()
        .map_err(|e| q("reading system_schema")(&e))?;
    Ok(r.rows_num() > 0)
}

async fn applied_versions(session: &Session, ks: &str) -> Result<BTreeSet<i32>, CqlError> {
    let r = session
        .query_unpaged(format!("SELECT version FROM {ks}.schema_migrations"), ())
        .await
        .map_err(|e| q("reading schema_migrations")(&e))?
        .into_rows_result()
        .map_err(|e| q("reading schema_migrations")(&e))?;
    let rows = r
        .rows::<(i32,)>()
        .map_err(|e| q("reading schema_migrations")(&e))?;
    rows.map(|row| row.map(|(v,)| v))
        .collect::<Result<_, _>>()
        .map_err(|e| q("reading schema_migrations")(&e))
}

async fn run_ddl(session: &Session, cql: &str, what: &str) -> Result<(), CqlError> {
    for st in statements(cql) {
        session
            .query_unpaged(st.as_str(), ())
            .await
            .map_err(|e| q(what)(&e))?;
    }
    Ok(())
}

async fn create_generation_tables(
    session: &Session,
    ks: &str,
    g: Generation,
) -> Result<(), CqlError> {
    run_ddl(
        session,
        &GENERATION_TABLES
            .replace("{ks}", ks)
            .replace("{g}", &g.to_string()),
        &format!("creating the tables of generation {g}"),
    )
    .await
}

/// `xsender-events migrate`: creates the keyspace (with the configured replication), applies
/// the schema files it has not applied yet, and creates generation 1 on a fresh keyspace.
/// Returns the versions it applied. Safe to run again.
pub async fn migrate(settings: &CqlSettings) -> Result<Vec<i32>, CqlError> {
    let session = connect(settings).await?;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}",
                settings.keyspace, settings.replication
            ),
            (),
        )
        .await
        .map_err(|e| q("creating the keyspace")(&e))?;
    session
        .use_keyspace(&settings.keyspace, false)
        .await
        .map_err(|e| q("using the keyspace")(&e))?;
    session
        .query_unpaged(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text, applied_at_ms bigint)",
            (),
        )
        .await
        .map_err(|e| q("creating schema_migrations")(&e))?;
    let ks = &settings.keyspace;
    let done = applied_versions(&session, ks).await?;
    let mut applied = Vec::new();
    for (version, name, cql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        run_ddl(&session, cql, &format!("applying {name}.cql")).await?;
        session
            .query_unpaged(
                // Literals, not bind values: this session has `USE` set for the unqualified
                // schema files, and preparing on it draws an ambiguity warning.
                format!(
                    "INSERT INTO {ks}.schema_migrations (version, name, applied_at_ms) VALUES ({version}, '{name}', {})",
                    chrono::Utc::now().timestamp_millis()
                ),
                (),
            )
            .await
            .map_err(|e| q("recording a migration")(&e))?;
        applied.push(*version);
    }
    let current = session
        .query_unpaged(
            format!("SELECT gen FROM {ks}.projection_current WHERE id = 1"),
            (),
        )
        .await
        .map_err(|e| q("reading projection_current")(&e))?
        .into_rows_result()
        .map_err(|e| q("reading projection_current")(&e))?
        .rows_num();
    if current == 0 {
        create_generation_tables(&session, ks, 1).await?;
        session
            .query_unpaged(
                format!("INSERT INTO {ks}.projection_generations (gen, checkpoint) VALUES (1, 0)"),
                (),
            )
            .await
            .map_err(|e| q("creating generation 1")(&e))?;
        session
            .query_unpaged(
                format!("INSERT INTO {ks}.projection_current (id, gen) VALUES (1, 1)"),
                (),
            )
            .await
            .map_err(|e| q("creating generation 1")(&e))?;
    }
    Ok(applied)
}

/// Connects with the keyspace selected, after checking `migrate` has brought it to the schema
/// this build needs (the error names the command to run).
pub(crate) async fn connect_migrated(settings: &CqlSettings) -> Result<Session, CqlError> {
    let session = connect(settings).await?;
    let needed = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    let no_schema = || CqlError::NoSchema {
        keyspace: settings.keyspace.clone(),
        hint: settings.migrate_hint(),
    };
    if !keyspace_exists(&session, &settings.keyspace).await? {
        return Err(no_schema());
    }
    // Statements name their keyspace (no `USE`): prepared statements stay unambiguous.
    let found = applied_versions(&session, &settings.keyspace)
        .await
        .map_err(|_| no_schema())?
        .last()
        .copied()
        .unwrap_or(0);
    if found < needed {
        return Err(CqlError::SchemaBehind {
            keyspace: settings.keyspace.clone(),
            found,
            needed,
            hint: settings.migrate_hint(),
        });
    }
    if found > needed {
        return Err(CqlError::SchemaAhead {
            keyspace: settings.keyspace.clone(),
            found,
            known: needed,
        });
    }
    Ok(session)
}

/// A point in [`CqlProjections::apply`] where a test makes the batch fail as if the process had
/// been killed there (the writes before it landed, none after).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After this many dispatch rows (with their campaign copies); nothing else written.
    AfterDispatchRows(usize),
    /// After every row, before the seen claims and the checkpoint.
    BeforeSeen,
    /// After rows and seen claims, before the checkpoints.
    BeforeCheckpoint,
    /// After this many of the batch's partition checkpoints (in partition order).
    AfterCheckpoints(usize),
}

struct Meta {
    current: PreparedStatement,
    /// The single checkpoint of keyspaces migrated before 003, read as partition 0; also
    /// whether the generation exists.
    old_checkpoint: PreparedStatement,
    checkpoints: PreparedStatement,
    set_checkpoint: PreparedStatement,
    delete_checkpoint: PreparedStatement,
    delete_checkpoints: PreparedStatement,
    generations: PreparedStatement,
    insert_generation: PreparedStatement,
    set_current: PreparedStatement,
    delete_generation: PreparedStatement,
}

/// Prepared statements over one generation's tables.
struct GenStatements {
    get_dispatch: PreparedStatement,
    put_dispatch: PreparedStatement,
    put_recipient: PreparedStatement,
    del_recipient: PreparedStatement,
    get_seen: PreparedStatement,
    put_seen: PreparedStatement,
    get_suppression: PreparedStatement,
    put_suppression: PreparedStatement,
    get_contact: PreparedStatement,
    put_contact: PreparedStatement,
    recipients: PreparedStatement,
    recipients_limit: PreparedStatement,
    suppressions_of: PreparedStatement,
    suppressions_first: PreparedStatement,
    suppressions_after: PreparedStatement,
}

/// Runs a read on the current generation. A read that fails because a rebuild switched
/// generations and dropped the old tables between reading `projection_current` and the query
/// is retried on the new generation, so a rebuild with `--drop-old` fails no read.
macro_rules! on_current {
    ($self:ident, |$st:ident| $body:expr) => {{
        let stale = $self
            .stale_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut g = match stale {
            Some(g) => g,
            None => $self.current_gen().await?,
        };
        let mut tries = 0;
        loop {
            let r = match $self.statements(g).await {
                Ok($st) => $body,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => break Ok(v),
                Err(e) => {
                    tries += 1;
                    let now = $self.current_gen().await?;
                    if now == g || tries >= 3 {
                        break Err(e);
                    }
                    g = now;
                }
            }
        }
    }};
}

pub struct CqlProjections {
    session: Arc<Session>,
    keyspace: String,
    meta: Meta,
    gens: tokio::sync::Mutex<HashMap<Generation, Arc<GenStatements>>>,
    crash: std::sync::Mutex<Option<CrashPoint>>,
    stale_read: std::sync::Mutex<Option<Generation>>,
}

/// Prepares `cql`, marked idempotent (the driver may retry it) or not; shared by every CQL
/// store (projections, tenants, replay guard).
pub(crate) async fn prepare_statement(
    session: &Session,
    cql: &str,
    idempotent: bool,
) -> Result<PreparedStatement, CqlError> {
    let mut p = session.prepare(cql).await.map_err(|e| CqlError::Query {
        what: format!("preparing `{cql}`"),
        message: e.to_string(),
    })?;
    p.set_is_idempotent(idempotent);
    Ok(p)
}

async fn prepare(
    session: &Session,
    cql: String,
    idempotent: bool,
) -> Result<PreparedStatement, StoreError> {
    prepare_statement(session, &cql, idempotent)
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))
}

/// A dispatch row as loaded for a batch: the fold's state and the event keys in it.
#[derive(Default)]
struct Loaded {
    old_campaign: Option<String>,
    state: Option<DispatchRow>,
    applied: BTreeSet<String>,
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s)
        .map_err(|e| StoreError::Invalid(format!("stored row does not decode: {e}")))
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(unavailable)
}

impl CqlProjections {
    /// Connects and checks the schema; fails with the `migrate` command to run when the
    /// keyspace is missing or behind.
    pub async fn open(settings: &CqlSettings) -> Result<CqlProjections, CqlError> {
        let session = connect_migrated(settings).await?;
        let ks = settings.keyspace.clone();
        let p = |cql: &str, idem: bool| prepare(&session, cql.replace("{ks}", &ks), idem);
        let meta = async {
            Ok::<_, StoreError>(Meta {
                current: p("SELECT gen FROM {ks}.projection_current WHERE id = 1", true).await?,
                old_checkpoint: p(
                    "SELECT checkpoint FROM {ks}.projection_generations WHERE gen = ?",
                    true,
                )
                .await?,
                checkpoints: p(
                    "SELECT part, checkpoint FROM {ks}.projection_checkpoints WHERE gen = ?",
                    true,
                )
                .await?,
                set_checkpoint: p(
                    "UPDATE {ks}.projection_checkpoints SET checkpoint = ? WHERE gen = ? AND part = ?",
                    true,
                )
                .await?,
                delete_checkpoint: p(
                    "DELETE FROM {ks}.projection_checkpoints WHERE gen = ? AND part = ?",
                    true,
                )
                .await?,
                delete_checkpoints: p(
                    "DELETE FROM {ks}.projection_checkpoints WHERE gen = ?",
                    true,
                )
                .await?,
                generations: p(
                    "SELECT gen, checkpoint FROM {ks}.projection_generations",
                    true,
                )
                .await?,
                insert_generation: p(
                    "INSERT INTO {ks}.projection_generations (gen) VALUES (?)",
                    true,
                )
                .await?,
                set_current: p(
                    "UPDATE {ks}.projection_current SET gen = ? WHERE id = 1",
                    true,
                )
                .await?,
                delete_generation: p(
                    "DELETE FROM {ks}.projection_generations WHERE gen = ?",
                    true,
                )
                .await?,
            })
        }
        .await
        .map_err(|e| q("preparing statements")(&e))?;
        Ok(CqlProjections {
            session: Arc::new(session),
            keyspace: settings.keyspace.clone(),
            meta,
            gens: Default::default(),
            crash: Default::default(),
            stale_read: Default::default(),
        })
    }

    /// Test hook: the next `apply` stops at `point` as if the process were killed there.
    #[doc(hidden)]
    pub fn crash_next_apply(&self, point: CrashPoint) {
        *self.crash.lock().unwrap_or_else(|p| p.into_inner()) = Some(point);
    }

    /// Test hook: the next read uses generation `g` as if it had read `projection_current`
    /// just before a switch (the race a rebuild with `--drop-old` has with readers).
    #[doc(hidden)]
    pub fn read_stale_generation_once(&self, g: Generation) {
        *self.stale_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(g);
    }

    fn crash_at(&self, hit: impl Fn(CrashPoint) -> bool) -> Result<(), StoreError> {
        let mut c = self.crash.lock().unwrap_or_else(|p| p.into_inner());
        match *c {
            Some(point) if hit(point) => {
                *c = None;
                Err(StoreError::Unavailable(format!(
                    "injected crash at {point:?}"
                )))
            }
            _ => Ok(()),
        }
    }

    async fn statements(&self, g: Generation) -> Result<Arc<GenStatements>, StoreError> {
        let mut gens = self.gens.lock().await;
        if let Some(s) = gens.get(&g) {
            return Ok(s.clone());
        }
        let (s, ks) = (&self.session, &self.keyspace);
        let st = Arc::new(GenStatements {
            get_dispatch: prepare(s, format!("SELECT campaign_id, state, applied FROM {ks}.dispatches_g{g} WHERE tenant = ? AND dispatch_key = ?"), true).await?,
            put_dispatch: prepare(s, format!("INSERT INTO {ks}.dispatches_g{g} (tenant, dispatch_key, campaign_id, status, state, applied) VALUES (?, ?, ?, ?, ?, ?)"), true).await?,
            put_recipient: prepare(s, format!("INSERT INTO {ks}.campaign_recipients_g{g} (tenant, campaign_id, dispatch_key, status, state) VALUES (?, ?, ?, ?, ?)"), true).await?,
            del_recipient: prepare(s, format!("DELETE FROM {ks}.campaign_recipients_g{g} WHERE tenant = ? AND campaign_id = ? AND dispatch_key = ?"), true).await?,
            get_seen: prepare(s, format!("SELECT dispatch_key FROM {ks}.seen_g{g} WHERE tenant = ? AND event_key = ?"), true).await?,
            put_seen: prepare(s, format!("INSERT INTO {ks}.seen_g{g} (tenant, event_key, dispatch_key) VALUES (?, ?, ?)"), true).await?,
            get_suppression: prepare(s, format!("SELECT state FROM {ks}.suppressions_g{g} WHERE tenant = ? AND email = ? AND reason = ?"), true).await?,
            put_suppression: prepare(s, format!("INSERT INTO {ks}.suppressions_g{g} (tenant, email, reason, state) VALUES (?, ?, ?, ?)"), true).await?,
            get_contact: prepare(s, format!("SELECT state FROM {ks}.contacts_g{g} WHERE tenant = ? AND email = ?"), true).await?,
            put_contact: prepare(s, format!("INSERT INTO {ks}.contacts_g{g} (tenant, email, state) VALUES (?, ?, ?)"), true).await?,
            recipients: {
                let mut p = prepare(s, format!("SELECT status, state FROM {ks}.campaign_recipients_g{g} WHERE tenant = ? AND campaign_id = ? AND dispatch_key > ?"), true).await?;
                p.set_page_size(1000);
                p
            },
            recipients_limit: prepare(s, format!("SELECT state FROM {ks}.campaign_recipients_g{g} WHERE tenant = ? AND campaign_id = ? AND dispatch_key > ? LIMIT ?"), true).await?,
            suppressions_of: prepare(s, format!("SELECT state FROM {ks}.suppressions_g{g} WHERE tenant = ? AND email = ?"), true).await?,
            suppressions_first: prepare(s, format!("SELECT state FROM {ks}.suppressions_g{g} WHERE tenant = ? LIMIT ?"), true).await?,
            suppressions_after: prepare(s, format!("SELECT state FROM {ks}.suppressions_g{g} WHERE tenant = ? AND (email, reason) > (?, ?) LIMIT ?"), true).await?,
        });
        gens.insert(g, st.clone());
        Ok(st)
    }

    async fn current_gen(&self) -> Result<Generation, StoreError> {
        let r = self
            .session
            .execute_unpaged(&self.meta.current, ())
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        let (g,) = r
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(unavailable)?
            .ok_or_else(|| {
                StoreError::Invalid(
                    "projection_current is empty: run `xsender-events migrate`".into(),
                )
            })?;
        g.ok_or_else(|| StoreError::Invalid("projection_current has no generation".into()))
    }

    /// The checkpoints of generation `g`, with the old single checkpoint as partition 0 when
    /// there is no row for partition 0 (see the module doc).
    async fn checkpoints_of(&self, g: Generation) -> Result<Positions, StoreError> {
        let (old, rows) = futures::try_join!(
            async {
                let r = self
                    .session
                    .execute_unpaged(&self.meta.old_checkpoint, (g,))
                    .await
                    .map_err(unavailable)?
                    .into_rows_result()
                    .map_err(unavailable)?;
                let row = r
                    .maybe_first_row::<(Option<i64>,)>()
                    .map_err(unavailable)?
                    .ok_or_else(|| StoreError::Invalid(format!("generation {g} does not exist")))?;
                Ok::<_, StoreError>(row.0)
            },
            self.partition_checkpoints(g)
        )?;
        let mut out = rows;
        if let Some(old) = old {
            out.entry(0).or_insert(old);
        }
        Ok(out)
    }

    /// The rows of `projection_checkpoints` of generation `g`.
    async fn partition_checkpoints(&self, g: Generation) -> Result<Positions, StoreError> {
        let r = self
            .session
            .execute_unpaged(&self.meta.checkpoints, (g,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        let mut out = Positions::new();
        for row in r.rows::<(Partition, Option<i64>)>().map_err(unavailable)? {
            let (part, checkpoint) = row.map_err(unavailable)?;
            out.insert(part, checkpoint.unwrap_or(0));
        }
        Ok(out)
    }

    /// Reads rows of one text column `state` and decodes them.
    async fn states<T: serde::de::DeserializeOwned>(
        &self,
        st: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
    ) -> Result<Vec<T>, StoreError> {
        let r = self
            .session
            .execute_unpaged(st, values)
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for row in r.rows::<(String,)>().map_err(unavailable)? {
            out.push(from_json(&row.map_err(unavailable)?.0)?);
        }
        Ok(out)
    }

    async fn recipients_in(
        &self,
        st: &GenStatements,
        q: &RecipientsQuery,
    ) -> Result<Vec<DispatchRow>, StoreError> {
        if q.limit == 0 {
            return Ok(Vec::new()); // CQL rejects LIMIT 0
        }
        let after = q.after.clone().unwrap_or_default();
        let Some(status) = q.status else {
            let limit = i32::try_from(q.limit).unwrap_or(i32::MAX);
            return self
                .states(
                    &st.recipients_limit,
                    (&q.tenant, &q.campaign_id, &after, limit),
                )
                .await;
        };
        // The status filter runs here over the campaign's partition, in dispatch-key order.
        let mut rows = self
            .session
            .execute_iter(st.recipients.clone(), (&q.tenant, &q.campaign_id, &after))
            .await
            .map_err(unavailable)?
            .rows_stream::<(String, String)>()
            .map_err(unavailable)?;
        let mut out = Vec::new();
        while out.len() < q.limit {
            let Some(row) = rows.next().await else { break };
            let (s, state) = row.map_err(unavailable)?;
            if s == status.as_str() {
                out.push(from_json(&state)?);
            }
        }
        Ok(out)
    }

    async fn dispatch_in(
        &self,
        st: &GenStatements,
        tenant: &str,
        id_or_key: &str,
    ) -> Result<Option<DispatchRow>, StoreError> {
        // As the embedded store: the attributed key `d:<id>` or the key itself, the smaller
        // key first when both exist.
        let mut keys = vec![
            DeliveryEvent::attributed_dispatch_key(id_or_key),
            id_or_key.to_string(),
        ];
        keys.sort();
        keys.dedup();
        for k in keys {
            let r = self
                .session
                .execute_unpaged(&st.get_dispatch, (tenant, &k))
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(unavailable)?;
            if let Some((_, Some(state), _)) = r
                .maybe_first_row::<(Option<String>, Option<String>, Option<BTreeSet<String>>)>()
                .map_err(unavailable)?
            {
                return Ok(Some(from_json(&state)?));
            }
        }
        Ok(None)
    }

    /// Applies a batch to generation `g` (see the module doc for the write order); returns
    /// the checkpoints after it.
    async fn apply_gen(&self, g: Generation, batch: &Batch) -> Result<Positions, StoreError> {
        let mut checkpoints = self.checkpoints_of(g).await?;
        // Every partition's gap is found here, before anything is written.
        let Plan { fresh, moved } = plan(&checkpoints, batch)?;
        if fresh.is_empty() {
            return Ok(checkpoints);
        }
        let fresh: Vec<&DeliveryEvent> = fresh.into_iter().map(|r| &r.value).collect();
        let st = self.statements(g).await?;
        let session = &self.session;

        // 1. Claims of the event keys.
        let keys: BTreeSet<(String, String)> = fresh
            .iter()
            .map(|e| (e.tenant.clone(), e.event_key.clone()))
            .collect();
        let mut claims: HashMap<(String, String), String> = futures::stream::iter(
            keys.into_iter()
                .map(|k| {
                    let st = st.clone();
                    async move {
                        let r = session
                            .execute_unpaged(&st.get_seen, (&k.0, &k.1))
                            .await
                            .map_err(unavailable)?
                            .into_rows_result()
                            .map_err(unavailable)?;
                        let d = r
                            .maybe_first_row::<(Option<String>,)>()
                            .map_err(unavailable)?
                            .and_then(|r| r.0);
                        Ok::<_, StoreError>(d.map(|d| (k, d)))
                    }
                })
                .collect::<Vec<_>>(),
        )
        .buffer_unordered(PARALLEL)
        .try_filter_map(|x| async move { Ok(x) })
        .try_collect()
        .await?;
        let mut new_claims = Vec::new();
        let mut accepted = Vec::new();
        for ev in fresh {
            let k = (ev.tenant.clone(), ev.event_key.clone());
            match claims.get(&k) {
                Some(d) if *d != ev.dispatch_key => continue, // counted on another dispatch
                Some(_) => {}
                None => {
                    claims.insert(k.clone(), ev.dispatch_key.clone());
                    new_claims.push((k.0, k.1, ev.dispatch_key.clone()));
                }
            }
            accepted.push(ev);
        }

        // 2. The touched rows.
        let dkeys: BTreeSet<(String, String)> = accepted
            .iter()
            .map(|e| (e.tenant.clone(), e.dispatch_key.clone()))
            .collect();
        let mut rows: HashMap<(String, String), Loaded> = futures::stream::iter(dkeys.into_iter().map(|k| {
                let st = st.clone();
                async move {
                    let r = session
                        .execute_unpaged(&st.get_dispatch, (&k.0, &k.1))
                        .await
                        .map_err(unavailable)?
                        .into_rows_result()
                        .map_err(unavailable)?;
                    let loaded = match r
                        .maybe_first_row::<(Option<String>, Option<String>, Option<BTreeSet<String>>)>()
                        .map_err(unavailable)?
                    {
                        None => Loaded::default(),
                        Some((campaign, state, applied)) => Loaded {
                            old_campaign: campaign,
                            state: state.as_deref().map(from_json).transpose()?,
                            applied: applied.unwrap_or_default(),
                        },
                    };
                    Ok::<_, StoreError>((k, loaded))
                }
            }).collect::<Vec<_>>())
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let mut supp_keys = BTreeSet::new();
        let mut contact_keys = BTreeSet::new();
        for ev in &accepted {
            if let Some(s) = suppression_of(ev) {
                supp_keys.insert((s.tenant, s.email, s.reason.as_str().to_string()));
            }
            if contact_change_of(ev).is_some() {
                contact_keys.insert((ev.tenant.clone(), ev.recipient.clone()));
            }
        }
        let mut suppressions: HashMap<(String, String, String), Option<SuppressionRow>> =
            futures::stream::iter(
                supp_keys
                    .into_iter()
                    .map(|k| {
                        let st = st.clone();
                        async move {
                            let mut v: Vec<SuppressionRow> =
                                self.states(&st.get_suppression, (&k.0, &k.1, &k.2)).await?;
                            Ok::<_, StoreError>((k, v.pop()))
                        }
                    })
                    .collect::<Vec<_>>(),
            )
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let mut contacts: HashMap<(String, String), Option<ContactRow>> = futures::stream::iter(
            contact_keys
                .into_iter()
                .map(|k| {
                    let st = st.clone();
                    async move {
                        let mut v: Vec<ContactRow> =
                            self.states(&st.get_contact, (&k.0, &k.1)).await?;
                        Ok::<_, StoreError>((k, v.pop()))
                    }
                })
                .collect::<Vec<_>>(),
        )
        .buffer_unordered(PARALLEL)
        .try_collect()
        .await?;

        // 3. Fold in memory, in offset order.
        for ev in &accepted {
            let row = rows
                .get_mut(&(ev.tenant.clone(), ev.dispatch_key.clone()))
                .expect("every accepted event's row was loaded");
            if row.applied.insert(ev.event_key.clone()) {
                row.state = Some(fold_dispatch(row.state.take(), ev));
            }
            if let Some(s) = suppression_of(ev) {
                let k = (
                    s.tenant.clone(),
                    s.email.clone(),
                    s.reason.as_str().to_string(),
                );
                let slot = suppressions.entry(k).or_default();
                *slot = Some(merge_suppression(slot.take(), s));
            }
            if let Some(change) = contact_change_of(ev) {
                let slot = contacts
                    .entry((ev.tenant.clone(), ev.recipient.clone()))
                    .or_default();
                *slot = Some(apply_contact(slot.take(), ev, change));
            }
        }

        // 4. Writes, absolute values. Stale campaign copies go first: once the dispatch row
        // names its new campaign, a replay could no longer tell which copy to delete.
        let stale: Vec<(String, String, String)> = rows
            .iter()
            .filter_map(|((t, k), l)| {
                let new = l.state.as_ref().and_then(|s| s.campaign_id.as_ref());
                match &l.old_campaign {
                    Some(old) if Some(old) != new => Some((t.clone(), old.clone(), k.clone())),
                    _ => None,
                }
            })
            .collect();
        run_all(
            stale
                .iter()
                .map(|(t, c, k)| session.execute_unpaged(&st.del_recipient, (t, c, k)))
                .collect(),
        )
        .await?;
        let mut dispatch_writes = Vec::new();
        for ((tenant, key), l) in &rows {
            let Some(state) = &l.state else { continue };
            dispatch_writes.push((tenant, key, state, json(state)?, &l.applied));
        }
        // Deterministic order, so a crash test can cut it at a row count.
        dispatch_writes.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let cut = match *self.crash.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(CrashPoint::AfterDispatchRows(n)) => n.min(dispatch_writes.len()),
            _ => dispatch_writes.len(),
        };
        run_all(
            dispatch_writes[..cut]
                .iter()
                .map(|(tenant, key, state, text, applied)| {
                    let st = st.clone();
                    async move {
                        if let Some(c) = &state.campaign_id {
                            session
                                .execute_unpaged(
                                    &st.put_recipient,
                                    (*tenant, c, *key, state.status.as_str(), text),
                                )
                                .await?;
                        }
                        session
                            .execute_unpaged(
                                &st.put_dispatch,
                                (
                                    *tenant,
                                    *key,
                                    &state.campaign_id,
                                    state.status.as_str(),
                                    text,
                                    *applied,
                                ),
                            )
                            .await
                    }
                })
                .collect(),
        )
        .await?;
        self.crash_at(|p| matches!(p, CrashPoint::AfterDispatchRows(_)))?;
        let mut supp_writes = Vec::new();
        for ((tenant, email, reason), row) in &suppressions {
            if let Some(row) = row {
                supp_writes.push((tenant, email, reason, json(row)?));
            }
        }
        run_all(
            supp_writes
                .iter()
                .map(|(t, e, r, s)| session.execute_unpaged(&st.put_suppression, (*t, *e, *r, s)))
                .collect(),
        )
        .await?;
        let mut contact_writes = Vec::new();
        for ((tenant, email), row) in &contacts {
            if let Some(row) = row {
                contact_writes.push((tenant, email, json(row)?));
            }
        }
        run_all(
            contact_writes
                .iter()
                .map(|(t, e, s)| session.execute_unpaged(&st.put_contact, (*t, *e, s)))
                .collect(),
        )
        .await?;
        self.crash_at(|p| p == CrashPoint::BeforeSeen)?;

        // 5. Claims, then 6. the checkpoints: each only after every row and claim of the
        // whole batch, whichever partitions they came from.
        run_all(
            new_claims
                .iter()
                .map(|(t, k, d)| session.execute_unpaged(&st.put_seen, (t, k, d)))
                .collect(),
        )
        .await?;
        self.crash_at(|p| p == CrashPoint::BeforeCheckpoint)?;
        let moves: Vec<(Partition, Offset)> = moved.into_iter().collect();
        let cut = match *self.crash.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(CrashPoint::AfterCheckpoints(n)) => n.min(moves.len()),
            _ => moves.len(),
        };
        run_all(
            moves[..cut]
                .iter()
                .map(|(part, checkpoint)| {
                    session.execute_unpaged(&self.meta.set_checkpoint, (checkpoint, g, part))
                })
                .collect(),
        )
        .await?;
        self.crash_at(|p| matches!(p, CrashPoint::AfterCheckpoints(_)))?;
        checkpoints.extend(moves);
        Ok(checkpoints)
    }
}

/// Runs writes concurrently (bounded) and fails if any failed.
async fn run_all<F, T, E>(futs: Vec<F>) -> Result<(), StoreError>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    futures::stream::iter(futs)
        .buffer_unordered(PARALLEL)
        .map_err(unavailable)
        .try_for_each(|_| async { Ok(()) })
        .await
}

#[async_trait]
impl ProjectionStore for CqlProjections {
    async fn checkpoints(&self) -> Result<Positions, StoreError> {
        let g = self.current_gen().await?;
        self.checkpoints_of(g).await
    }

    async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let g = self.current_gen().await?;
        self.apply_gen(g, &batch).await.map(|_| ())
    }

    async fn recipients(&self, q: RecipientsQuery) -> Result<Vec<DispatchRow>, StoreError> {
        on_current!(self, |st| self.recipients_in(&st, &q).await)
    }

    async fn dispatch(
        &self,
        tenant: &str,
        id_or_key: &str,
    ) -> Result<Option<DispatchRow>, StoreError> {
        on_current!(self, |st| self.dispatch_in(&st, tenant, id_or_key).await)
    }

    async fn suppressions_of(
        &self,
        tenant: &str,
        email: &str,
    ) -> Result<Vec<SuppressionRow>, StoreError> {
        // Clustered by reason within the email: already in reason order.
        on_current!(self, |st| self
            .states(&st.suppressions_of, (tenant, email))
            .await)
    }

    async fn suppressions(
        &self,
        tenant: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<SuppressionRow>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new()); // CQL rejects LIMIT 0
        }
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        on_current!(self, |st| match &after {
            None => self.states(&st.suppressions_first, (tenant, limit)).await,
            Some((e, r)) => {
                self.states(&st.suppressions_after, (tenant, e, r, limit))
                    .await
            }
        })
    }

    async fn contact(&self, tenant: &str, email: &str) -> Result<Option<ContactRow>, StoreError> {
        let rows: Vec<ContactRow> = on_current!(self, |st| self
            .states(&st.get_contact, (tenant, email))
            .await)?;
        Ok(rows.into_iter().next())
    }

    async fn generations(&self) -> Result<Vec<GenerationInfo>, StoreError> {
        let current = self.current_gen().await?;
        let r = self
            .session
            .execute_unpaged(&self.meta.generations, ())
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(unavailable)?;
        let mut gens = Vec::new();
        for row in r.rows::<(i64, Option<i64>)>().map_err(unavailable)? {
            let (generation, old) = row.map_err(unavailable)?;
            gens.push((generation, old));
        }
        gens.sort_by_key(|g| g.0);
        let mut out = Vec::new();
        for (generation, old) in gens {
            let mut checkpoints = self.partition_checkpoints(generation).await?;
            if let Some(old) = old {
                checkpoints.entry(0).or_insert(old);
            }
            out.push(GenerationInfo {
                generation,
                checkpoints,
                current: generation == current,
            });
        }
        Ok(out)
    }

    async fn create_generation(&self, start: &Positions) -> Result<Generation, StoreError> {
        let g = self
            .generations()
            .await?
            .iter()
            .map(|g| g.generation)
            .max()
            .unwrap_or(0)
            + 1;
        create_generation_tables(&self.session, &self.keyspace, g).await?;
        // The checkpoints before the row that lists the generation. Rows of this number left
        // by a create_generation that died before listing it are deleted one by one rather
        // than with the whole partition: a partition tombstone could shadow the rows written
        // next (server-side timestamps from different coordinators).
        let start = start_checkpoints(start);
        let stale: Vec<Partition> = self
            .partition_checkpoints(g)
            .await?
            .into_keys()
            .filter(|p| !start.contains_key(p))
            .collect();
        run_all(
            stale
                .iter()
                .map(|p| {
                    self.session
                        .execute_unpaged(&self.meta.delete_checkpoint, (g, p))
                })
                .collect(),
        )
        .await?;
        run_all(
            start
                .iter()
                .map(|(p, c)| {
                    self.session
                        .execute_unpaged(&self.meta.set_checkpoint, (c, g, p))
                })
                .collect(),
        )
        .await?;
        self.session
            .execute_unpaged(&self.meta.insert_generation, (g,))
            .await
            .map_err(unavailable)?;
        Ok(g)
    }

    async fn apply_to(&self, generation: Generation, batch: Batch) -> Result<(), StoreError> {
        self.apply_gen(generation, &batch).await.map(|_| ())
    }

    async fn switch_to(
        &self,
        generation: Generation,
        partitions: Vec<Partition>,
        tail: TailReader,
    ) -> Result<(), StoreError> {
        // No write lock to take (see the module doc): catch up, then flip the single row.
        let tail: Arc<
            dyn Fn(Partition, Offset, usize) -> Result<Vec<Record<DeliveryEvent>>, String>
                + Send
                + Sync,
        > = Arc::from(tail);
        let mut checkpoints = self.checkpoints_of(generation).await?;
        for part in partitions {
            loop {
                let after = checkpoints.get(&part).copied().unwrap_or(0);
                let t = tail.clone();
                let events = tokio::task::spawn_blocking(move || t(part, after, 5000))
                    .await
                    .map_err(unavailable)?
                    .map_err(StoreError::Unavailable)?;
                if events.is_empty() {
                    break;
                }
                checkpoints = self
                    .apply_gen(generation, &Batch::single(part, events))
                    .await?;
            }
        }
        self.session
            .execute_unpaged(&self.meta.set_current, (generation,))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn drop_old(&self) -> Result<Vec<Generation>, StoreError> {
        let old: Vec<Generation> = self
            .generations()
            .await?
            .into_iter()
            .filter(|g| !g.current)
            .map(|g| g.generation)
            .collect();
        for g in &old {
            for t in TABLES {
                self.session
                    .query_unpaged(
                        format!("DROP TABLE IF EXISTS {}.{t}_g{g}", self.keyspace),
                        (),
                    )
                    .await
                    .map_err(unavailable)?;
            }
            self.session
                .execute_unpaged(&self.meta.delete_checkpoints, (*g,))
                .await
                .map_err(unavailable)?;
            self.session
                .execute_unpaged(&self.meta.delete_generation, (*g,))
                .await
                .map_err(unavailable)?;
            self.gens.lock().await.remove(g);
        }
        Ok(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_files_split_into_statements() {
        let all: Vec<String> = MIGRATIONS.iter().flat_map(|m| statements(m.2)).collect();
        assert!(all
            .iter()
            .all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
        let gen = statements(&GENERATION_TABLES.replace("{ks}", "ks").replace("{g}", "7"));
        assert_eq!(gen.len(), TABLES.len());
        for t in TABLES {
            assert!(
                gen.iter().any(|s| s.contains(&format!(" ks.{t}_g7 ("))),
                "{t}"
            );
        }
    }

    #[test]
    fn settings_are_checked() {
        let ok = CqlSettings {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "xsender".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        };
        ok.validate().unwrap();
        let nts = CqlSettings {
            replication: "{'class': 'NetworkTopologyStrategy', 'dc1': 3}".into(),
            ..ok.clone()
        };
        nts.validate().unwrap();
        for bad in ["", "Xs", "x-s", "x s; DROP"] {
            let s = CqlSettings {
                keyspace: bad.into(),
                ..ok.clone()
            };
            assert!(s.validate().is_err(), "{bad}");
        }
        let s = CqlSettings {
            replication: "{'class': 'SimpleStrategy'}; DROP KEYSPACE x".into(),
            ..ok
        };
        assert!(s.validate().is_err());
    }
}
