//! The relay: sends the committed rows of the transactional outbox and deletes them once
//! the broker accepted them.
//!
//! Each cycle leases up to [`RelaySettings::batch`] due rows (a short transaction; on
//! PostgreSQL under an advisory lock, so that two relays never lease rows of one ordering
//! key), sends them in their order, deletes what was accepted, and gives the rest back
//! with a backoff (the rows of their ordering keys wait meanwhile, so the order holds).
//! A relay that dies holding a lease leaves its rows to the next relay once the lease runs
//! out; they go with their message ids, so a row sent just before the crash is a
//! duplicate that deduplication absorbs. Between cycles the relay sleeps for
//! [`RelaySettings::poll_interval`], or until PostgreSQL notifies it of a commit.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::sql::{self, Leased};
use crate::dispatch::{Dispatcher, Pending};
use crate::envelope::OutgoingMessage;
use crate::retry::RetryPolicy;
use crate::tx::SqlPool;

/// How the relay works.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Rows leased per cycle (default 100).
    pub batch: usize,
    /// How long a relay holds the rows it sends before another may take them (default
    /// 30 s): longer than a send can take.
    pub lease: Duration,
    /// Sleep between cycles that found nothing (default 250 ms; PostgreSQL's notification
    /// of a commit wakes the relay earlier).
    pub poll_interval: Duration,
    /// Backoff of rows the broker did not accept (default 100 ms doubling to 30 s).
    pub backoff: RetryPolicy,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            batch: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            backoff: RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(30)),
        }
    }
}

/// A relay of one service.
pub(crate) struct Relay {
    pub pool: SqlPool,
    pub dispatcher: Arc<Dispatcher>,
    pub settings: RelaySettings,
    pub stop: CancellationToken,
}

/// How often the relay deletes ordering keys no row uses any more.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl Relay {
    /// Relays until the service stops (finishing the cycle under way).
    pub(crate) async fn run(self) {
        let mut wake = Wake::new(&self.pool).await;
        let mut failures = 0u32;
        let mut pruned = tokio::time::Instant::now();
        while !self.stop.is_cancelled() {
            let pause = match self.cycle().await {
                Ok(n) if n >= self.settings.batch => {
                    failures = 0;
                    continue;
                }
                Ok(_) => {
                    failures = 0;
                    self.settings.poll_interval
                }
                Err(e) => {
                    failures += 1;
                    let pause = self.settings.backoff.delay(failures);
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "outbox relay: the database is unavailable");
                    pause
                }
            };
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = tokio::time::Instant::now();
                if let Err(e) = sql::prune_keys(&self.pool).await {
                    tracing::debug!(error = %e, "outbox relay: pruning ordering keys failed");
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = wake.wait(pause) => {}
            }
        }
    }

    /// One cycle: lease, send, delete or back off. Returns the rows leased.
    async fn cycle(&self) -> Result<usize, sqlx::Error> {
        let token = uuid::Uuid::new_v4().to_string();
        let rows = sql::lease(&self.pool, &token, self.settings.batch, self.settings.lease).await?;
        let n = rows.len();
        if n == 0 {
            return Ok(0);
        }
        let (pending, unsendable) = self.prepare(rows);
        for (id, reason) in &unsendable {
            tracing::error!(row = id, reason = %reason, "outbox relay: a stored message cannot be sent; it is retried with backoff");
            // Each with its own reason (a rare path: one statement per row).
            let backoff = self.settings.backoff.delay(10);
            sql::back_off(&self.pool, &token, &[*id], backoff, reason).await?;
        }
        let ids: Vec<(i64, String)> = pending
            .iter()
            .map(|(id, p)| (*id, p.message_id().to_string()))
            .collect();
        let batch: Vec<Pending> = pending.into_iter().map(|(_, p)| p).collect();
        match self.dispatcher.flush(batch).await {
            Ok(()) => {
                let sent: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
                sql::delete_sent(&self.pool, &token, &sent).await?;
            }
            Err(u) => {
                let left: std::collections::HashSet<&str> =
                    u.remaining.iter().map(|p| p.message_id()).collect();
                let (failed, sent): (Vec<_>, Vec<_>) =
                    ids.iter().partition(|(_, m)| left.contains(m.as_str()));
                let sent: Vec<i64> = sent.iter().map(|(id, _)| *id).collect();
                let failed: Vec<i64> = failed.iter().map(|(id, _)| *id).collect();
                sql::delete_sent(&self.pool, &token, &sent).await?;
                let reason = u.error.to_string();
                tracing::warn!(sent = sent.len(), failed = failed.len(), error = %reason, "outbox relay: the broker did not take every message; the rest is retried");
                sql::back_off(
                    &self.pool,
                    &token,
                    &failed,
                    self.settings.backoff.delay(1),
                    &reason,
                )
                .await?;
            }
        }
        Ok(n)
    }

    /// The rows as messages to send, and those that cannot go (with why).
    #[allow(clippy::type_complexity)]
    fn prepare(&self, rows: Vec<Leased>) -> (Vec<(i64, Pending)>, Vec<(i64, String)>) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut unsendable = Vec::new();
        for Leased { id, row } in rows {
            match self.pending(row) {
                Ok(p) => pending.push((id, p)),
                Err(reason) => unsendable.push((id, reason)),
            }
        }
        (pending, unsendable)
    }

    fn pending(&self, row: super::Row) -> Result<Pending, String> {
        if self.dispatcher.must_encrypt(false) {
            return Err(format!(
                "{}: this service encrypts every message, and the outbox keeps payloads in clear",
                row.wire_name
            ));
        }
        let attributes: Vec<(crate::AttributeName, crate::envelope::AttributeValue)> =
            serde_json::from_str(&row.attributes).map_err(|e| {
                format!(
                    "{}: its stored attributes do not decode: {e}",
                    row.wire_name
                )
            })?;
        let message = OutgoingMessage {
            body: row.body.into(),
            attributes: attributes.into(),
            group_id: row.group_id,
            dedup_id: row.dedup_id,
            delay: row
                .delay_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis),
            wire_name: Cow::Owned(row.wire_name.clone()),
            message_id: row.message_id,
        };
        crate::dispatch::pending_to(
            row.kind,
            Arc::from(row.destination),
            message,
            crate::transport::MAX_DELAY,
        )
        .map_err(|e| e.to_string())
    }
}

/// What wakes the relay: the poll interval, or on PostgreSQL a notification of a commit.
enum Wake {
    Poll,
    #[cfg(feature = "postgres")]
    Listen(Box<sqlx::postgres::PgListener>),
}

impl Wake {
    async fn new(pool: &SqlPool) -> Wake {
        match pool {
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(p) => match sqlx::postgres::PgListener::connect_with(p).await {
                Ok(mut l) => match l.listen(sql::CHANNEL).await {
                    Ok(()) => Wake::Listen(Box::new(l)),
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox relay: LISTEN failed; polling");
                        Wake::Poll
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "outbox relay: no listener connection; polling");
                    Wake::Poll
                }
            },
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(_) => Wake::Poll,
        }
    }

    async fn wait(&mut self, pause: Duration) {
        match self {
            Wake::Poll => tokio::time::sleep(pause).await,
            #[cfg(feature = "postgres")]
            Wake::Listen(l) => {
                // A lost connection reconnects inside `recv`; one that cannot waits out
                // the pause instead of spinning.
                let deadline = tokio::time::Instant::now() + pause;
                if let Ok(Err(_)) = tokio::time::timeout(pause, l.recv()).await {
                    tokio::time::sleep_until(deadline).await;
                }
            }
        }
    }
}
