//! The transactional outbox, for code outside handlers: store a command or an event in the
//! application's own transaction, and the running service sends it once the transaction
//! has committed — never for a transaction that rolled back, never lost after a commit.
//!
//! ```ignore
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!     .bind(&order.id)
//!     .bind(order.total)
//!     .execute(&mut *tx)
//!     .await?;
//! sourceflow::outbox::send(&mut tx, CreateOrder { order_id: order.id.clone() }).await?;
//! tx.commit().await?; // the order and the command, both or neither
//! ```
//!
//! The message goes into the table `sourceflow_outbox` (created by the SQL idempotency
//! store's embedded migrations, on PostgreSQL or SQLite: open the store, or give the
//! builder the pool with [`Builder::postgres`](crate::Builder::postgres) /
//! [`Builder::sqlite`](crate::Builder::sqlite)). The relay of every service started with
//! that store (see [`relay`]) takes committed rows, sends them, and deletes them once the
//! broker accepted them. Several instances relay side by side without sending a row twice
//! in normal operation; after a crash between the send and the delete a row is sent again
//! with the same message id, which FIFO deduplication and the receivers' idempotency
//! absorb.
//!
//! Order: the messages of one FIFO message group (one entity) are sent in the order their
//! transactions committed — two transactions storing messages of one group wait for each
//! other on PostgreSQL (a row of `sourceflow_outbox_keys`), as they would on any row both
//! update, and SQLite has one writer anyway — and no two relays send one group's messages
//! at the same time.
//!
//! Destinations are stored with their full names (the environment prefix applied), so any
//! relay on the database sends a row where its writer meant it.
//!
//! Types declared `encrypt` are refused ([`Error::Unsupported`]): their payloads would
//! wait in the database in clear. Send them from a handler.

pub(crate) mod relay;
mod sql;

use crate::envelope::{self, OutgoingMessage, SendMeta};
use crate::error::{Error, Result};
use crate::message::{Command, Event, Message, MessageKind};
use crate::naming::Naming;
use crate::runtime::SendOptions;
use crate::tx::{Tx, TxDatabase};

pub use relay::RelaySettings;

/// The table the outbox keeps its messages in.
pub const TABLE: &str = "sourceflow_outbox";

/// Stores `command` in `tx`: sent to its queue after the commit. Returns its message id.
/// The queue is named with the environment prefix of `SOURCEFLOW_PREFIX`, as a service's
/// builder names it by default; a process running services under another prefix uses
/// [`Handle::outbox`](crate::Handle::outbox).
pub async fn send<DB: TxDatabase, C: Command>(tx: &mut Tx<DB>, command: C) -> Result<String> {
    Outbox::from_env()?.send(tx, command).await
}

/// Stores `event` in `tx`: published to its topic after the commit. Returns its message id.
/// Names as [`send`] does.
pub async fn raise<DB: TxDatabase, E: Event>(tx: &mut Tx<DB>, event: E) -> Result<String> {
    Outbox::from_env()?.raise(tx, event).await
}

/// Stores messages in a transaction, naming their destinations as one environment does.
#[derive(Debug, Clone)]
pub struct Outbox {
    naming: Naming,
}

impl Outbox {
    /// Names destinations with `naming` (a service's: [`Handle::outbox`](crate::Handle::outbox)).
    pub fn new(naming: Naming) -> Self {
        Outbox { naming }
    }

    /// Names destinations with the prefix of `SOURCEFLOW_PREFIX` (none when unset).
    pub fn from_env() -> Result<Self> {
        Ok(Outbox::new(Naming::new(
            crate::runtime::config::resolve_prefix(None)?,
        )))
    }

    /// Stores `command` in `tx`: sent to its queue after the commit. Returns its message id.
    pub async fn send<DB: TxDatabase, C: Command>(
        &self,
        tx: &mut Tx<DB>,
        command: C,
    ) -> Result<String> {
        self.store(tx, &command, SendOptions::new()).await
    }

    /// Stores `event` in `tx`: published after the commit. Returns its message id.
    pub async fn raise<DB: TxDatabase, E: Event>(
        &self,
        tx: &mut Tx<DB>,
        event: E,
    ) -> Result<String> {
        self.store(tx, &event, SendOptions::new()).await
    }

    /// [`send`](Self::send) with options (a pinned message id, a correlation id, a delay).
    pub async fn send_with<DB: TxDatabase, C: Command>(
        &self,
        tx: &mut Tx<DB>,
        command: C,
        options: SendOptions,
    ) -> Result<String> {
        self.store(tx, &command, options).await
    }

    /// [`raise`](Self::raise) with options (a pinned message id, a correlation id).
    pub async fn raise_with<DB: TxDatabase, E: Event>(
        &self,
        tx: &mut Tx<DB>,
        event: E,
        options: SendOptions,
    ) -> Result<String> {
        self.store(tx, &event, options).await
    }

    async fn store<DB: TxDatabase, M: Message>(
        &self,
        tx: &mut Tx<DB>,
        msg: &M,
        mut options: SendOptions,
    ) -> Result<String> {
        if M::ENCRYPT {
            return Err(Error::Unsupported(format!(
                "{} is declared `encrypt`: the transactional outbox would keep its payload in the database in clear; send it from a handler",
                M::NAME
            )));
        }
        let headers = options
            .take_headers()
            .resolve(crate::headers::Headers::default())?;
        let mut meta: SendMeta = options.into_meta();
        let user_attributes = meta.attributes.len();
        if meta.traceparent.is_none() {
            if let Some((tp, ts)) = crate::telemetry::current_trace_context() {
                meta.traceparent = Some(tp);
                meta.tracestate = ts;
            }
        }
        let mut out = envelope::encode(msg, meta)?;
        crate::headers::attach(&mut out, &headers, user_attributes)?;
        let destination = self.naming.resource(M::DESTINATION);
        crate::dispatch::check_outgoing(
            M::KIND,
            &destination,
            &mut out,
            crate::transport::MAX_DELAY,
        )?;
        let row = Row::new::<M>(out, destination)?;
        DB::insert_outbox(tx, &row)
            .await
            .map_err(|e| Error::Store {
                store: DB::KIND.store(),
                operation: "outbox insert",
                source: Box::new(e),
            })?;
        Ok(row.message_id)
    }
}

/// A message as the outbox table keeps it.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Row {
    pub(crate) message_id: String,
    pub(crate) kind: MessageKind,
    pub(crate) wire_name: String,
    pub(crate) destination: String,
    pub(crate) body: String,
    pub(crate) attributes: String,
    pub(crate) group_id: Option<String>,
    pub(crate) dedup_id: Option<String>,
    pub(crate) delay_ms: Option<i64>,
    pub(crate) ordering_key: Option<String>,
}

impl Row {
    fn new<M: Message>(out: OutgoingMessage, destination: String) -> Result<Row> {
        let attributes =
            serde_json::to_string(&out.attributes).map_err(|source| Error::Serialize {
                wire_name: M::NAME,
                source,
            })?;
        Ok(Row {
            message_id: out.message_id,
            kind: M::KIND,
            wire_name: M::NAME.to_string(),
            destination,
            body: out.body.to_string(),
            attributes,
            ordering_key: if M::FIFO { out.group_id.clone() } else { None },
            group_id: out.group_id,
            dedup_id: out.dedup_id,
            delay_ms: out
                .delay
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        })
    }
}

/// The `kind` column: `command` or `event`.
fn kind_label(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Command => "command",
        MessageKind::Event => "event",
    }
}

/// A `kind` column read back (anything but `event` is a command, as it was stored).
fn kind_of(label: &str) -> MessageKind {
    match label {
        "event" => MessageKind::Event,
        _ => MessageKind::Command,
    }
}

pub(crate) use sql::backlog;
#[cfg(feature = "postgres")]
pub(crate) use sql::insert_postgres;
#[cfg(feature = "sqlite")]
pub(crate) use sql::insert_sqlite;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_kind_reads_back_as_itself() {
        for kind in [MessageKind::Command, MessageKind::Event] {
            assert_eq!(kind_of(kind_label(kind)), kind);
        }
        assert_eq!(kind_label(MessageKind::Event), "event");
    }
}
