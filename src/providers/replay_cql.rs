//! The [`ReplayGuard`] of the cluster deployment (`projection_store = "cql"`): single-use tokens
//! recorded in the keyspace's `replay_tokens` table (`schemas/cql/004_replay_tokens.cql`), so
//! every ingress replica sharing the keyspace sees the same record and a captured, validly
//! signed request is accepted once by the whole deployment.
//!
//! `first_use` is a lightweight transaction, `INSERT … IF NOT EXISTS USING TTL ?` at SERIAL
//! consistency: Paxos makes the "absent?" check and the write one step across replicas, so of
//! any number of concurrent claims of one token exactly one reads `[applied] = true`. The row
//! is keyed by `(scope, token_hash)` (one partition per token, the 128-bit hash the memory guard
//! keeps, never the token) and lives until the token's timestamp leaves the tolerance window
//! (the TTL, at least 1 s); once it has expired the insert applies again, as the memory guard
//! forgets an expired entry. Any error is [`ReplayGuardError::Unavailable`], which ingress
//! answers with a 503 the ESP retries: the guard never guesses "first use".
//!
//! `release` deletes the row with `DELETE … IF EXISTS`, a lightweight transaction too: the
//! Cassandra and ScyllaDB documentation warn against mixing plain writes with LWTs on the same
//! rows (the plain write's timestamp is not ordered with the Paxos ballots), and the delete
//! must land after the insert it undoes. It is best effort: a failure is logged, and the token
//! stays spent until its TTL (the retry is refused as a replay, never accepted twice).

use async_trait::async_trait;
use scylla::client::session::Session;
use scylla::response::query_result::QueryResult;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::SerialConsistency;
use scylla::value::{CqlValue, Row};

use super::{replay_id, ReplayGuard, ReplayGuardError};
use crate::projection::cql::{connect_migrated, prepare_statement, CqlError, CqlSettings};

/// Cassandra's (and ScyllaDB's) largest TTL: 20 years.
const MAX_TTL_SECS: i64 = 630_720_000;

pub struct CqlReplayGuard {
    session: Session,
    claim: PreparedStatement,
    release: PreparedStatement,
}

/// How long a token's row lives: until `expires_at_ms`, rounded up to the second, at least 1 s
/// (a TTL of 0 would mean "forever"), at most the largest TTL CQL accepts.
pub(crate) fn ttl_secs(now_ms: i64, expires_at_ms: i64) -> i32 {
    let ms = expires_at_ms.saturating_sub(now_ms);
    let secs = ms.saturating_add(999) / 1000;
    secs.clamp(1, MAX_TTL_SECS) as i32
}

/// The `[applied]` column a lightweight transaction answers with (when it did not apply, the
/// existing row's columns follow it).
fn applied(result: QueryResult) -> Result<bool, String> {
    let rows = result.into_rows_result().map_err(|e| e.to_string())?;
    let name = rows.column_specs().get_by_index(0).map(|c| c.name());
    if name != Some("[applied]") {
        return Err(format!(
            "expected an [applied] column from a conditional insert, got {name:?}"
        ));
    }
    match rows.maybe_first_row::<Row>().map_err(|e| e.to_string())? {
        Some(Row { columns }) => match columns.first() {
            Some(Some(CqlValue::Boolean(b))) => Ok(*b),
            other => Err(format!("[applied] is not a boolean: {other:?}")),
        },
        None => Err("the conditional insert answered no row".into()),
    }
}

impl CqlReplayGuard {
    /// Connects and checks the schema (like the projection and tenant stores: the error names
    /// the `migrate` command to run when the keyspace is missing or behind).
    pub async fn open(settings: &CqlSettings) -> Result<CqlReplayGuard, CqlError> {
        let session = connect_migrated(settings).await?;
        let ks = &settings.keyspace;
        let prepare = |cql: String, idempotent: bool| {
            let session = &session;
            async move {
                let mut p = prepare_statement(session, &cql, idempotent).await?;
                p.set_serial_consistency(Some(SerialConsistency::Serial));
                Ok::<_, CqlError>(p)
            }
        };
        Ok(CqlReplayGuard {
            // Not idempotent: a retry of an insert that did apply would read `false` and
            // refuse the request that spent the token. A timeout is an error (503) instead.
            claim: prepare(
                format!(
                    "INSERT INTO {ks}.replay_tokens (scope, token_hash, expires_at_ms) \
                     VALUES (?, ?, ?) IF NOT EXISTS USING TTL ?"
                ),
                false,
            )
            .await?,
            release: prepare(
                format!(
                    "DELETE FROM {ks}.replay_tokens WHERE scope = ? AND token_hash = ? IF EXISTS"
                ),
                true,
            )
            .await?,
            session,
        })
    }
}

#[async_trait]
impl ReplayGuard for CqlReplayGuard {
    async fn first_use(
        &self,
        scope: &str,
        token: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<bool, ReplayGuardError> {
        let id = replay_id(scope, token);
        let result = self
            .session
            .execute_unpaged(
                &self.claim,
                (
                    scope,
                    &id[..],
                    expires_at_ms,
                    ttl_secs(now_ms, expires_at_ms),
                ),
            )
            .await
            .map_err(|e| ReplayGuardError::Unavailable(e.to_string()))?;
        applied(result).map_err(ReplayGuardError::Unavailable)
    }

    async fn release(&self, scope: &str, token: &str) {
        let id = replay_id(scope, token);
        if let Err(e) = self
            .session
            .execute_unpaged(&self.release, (scope, &id[..]))
            .await
        {
            tracing::warn!(
                error = %e,
                scope,
                "could not give a replay token back; the ESP's retry of that request will be \
                 refused as a replay until the token's window ends"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_covers_the_window_rounded_up_and_is_never_zero() {
        assert_eq!(ttl_secs(0, 600_000), 600);
        assert_eq!(ttl_secs(0, 600_001), 601);
        assert_eq!(ttl_secs(1_000, 1_001), 1);
        assert_eq!(ttl_secs(5_000, 5_000), 1, "0 would mean no TTL");
        assert_eq!(ttl_secs(5_000, 1_000), 1, "already past");
        assert_eq!(ttl_secs(i64::MIN, i64::MAX), MAX_TTL_SECS as i32);
        assert_eq!(ttl_secs(i64::MAX, i64::MIN), 1);
    }
}
