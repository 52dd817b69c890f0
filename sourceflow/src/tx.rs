//! Transactional handlers: a handler's writes to its database, the message's inbox record
//! and the messages it sends commit together, once.
//!
//! A handler asks for the transaction with an argument `tx: &mut Tx<Postgres>` (or
//! `Tx<Sqlite>`), does its writes in it, and sends or raises through its
//! [`Context`](crate::Context) as usual:
//!
//! ```ignore
//! use sourceflow::{handler, Context, Tx};
//! use sqlx::Postgres;
//!
//! #[handler]
//! async fn place_order(cmd: PlaceOrder, tx: &mut Tx<Postgres>, ctx: &Context) -> sourceflow::Result<()> {
//!     sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
//!         .bind(&cmd.order_id)
//!         .bind(cmd.total)
//!         .execute(&mut **tx)
//!         .await?;
//!     ctx.raise(OrderPlaced { order_id: cmd.order_id }).await
//! }
//! ```
//!
//! The listener opens the transaction on the pool of the SQL idempotency store (the
//! PostgreSQL or SQLite store; share that pool with the rest of the application with
//! [`PostgresIdempotencyStore::from_pool`](crate::idempotency::PostgresIdempotencyStore::from_pool)
//! or [`Builder::postgres`](crate::Builder::postgres)), and in it:
//!
//! 1. claims the message: the insert of its inbox record (`sourceflow_idempotency`), which
//!    no other transaction sees before the commit and which a concurrent delivery of the same
//!    message waits on (PostgreSQL: the row lock; SQLite: the database's write lock);
//! 2. runs the handlers, handing each the same transaction;
//! 3. marks the record completed, with the messages the handlers sent or raised;
//! 4. commits — the one commit of the message;
//!
//! and only then dispatches those messages and deletes the message. A crash before the
//! commit leaves no trace: the database rolls the transaction back, and the redelivery runs
//! the handlers on a clean slate. After the commit, the completed record makes every
//! redelivery a duplicate, which dispatches what the first delivery may not have sent (with
//! the same message ids, so receivers deduplicate) and is acknowledged; one that arrives
//! while the first delivery is still dispatching waits for it (the claim's lease covers the
//! dispatch) instead of sending the messages a second time. A handler that
//! returns `Err` or panics rolls back everything it wrote; the failed attempt is then
//! recorded outside the transaction, so that the retry budget is spent as with any handler.
//!
//! Handlers of one message that ask for no transaction run in it too (they just do not see
//! it); a message whose handlers ask for none takes the usual path (claim, run, complete).
//!
//! On SQLite, a transaction holds the database's single write lock from the claim to the
//! commit: transactional handlers on one SQLite file run one at a time, whatever the
//! listener's concurrency. PostgreSQL runs them side by side.

use crate::error::InvokeError;
use crate::Context;

/// The PostgreSQL database (sqlx's), for `Tx<Postgres>`.
#[cfg(feature = "postgres")]
pub use sqlx::Postgres;
/// The SQLite database (sqlx's), for `Tx<Sqlite>`.
#[cfg(feature = "sqlite")]
pub use sqlx::Sqlite;

/// The transaction a transactional handler is given: `tx: &mut Tx<Postgres>`.
///
/// It is `sqlx`'s own [`Transaction`](sqlx::Transaction): run queries with
/// `.execute(&mut **tx)`. The handler cannot commit or roll it back (both take it by
/// value); the listener does, once the handlers have returned.
pub type Tx<DB> = sqlx::Transaction<'static, DB>;

/// The databases a transactional handler can ask for: those of sourceflow's SQL
/// idempotency stores.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a database sourceflow runs transactional handlers on",
    label = "transactional handlers take `&mut Tx<Postgres>` or `&mut Tx<Sqlite>`",
    note = "enable sourceflow's `postgres` or `sqlite` feature, and use the matching idempotency store"
)]
pub trait TxDatabase: sqlx::Database + sealed::Sealed {
    /// Which one.
    const KIND: TxKind;

    #[doc(hidden)]
    fn into_slot(tx: Tx<Self>) -> TxSlot;

    #[doc(hidden)]
    fn from_slot(slot: TxSlot) -> Result<Tx<Self>, TxSlot>;

    #[doc(hidden)]
    fn insert_outbox<'a>(
        tx: &'a mut Tx<Self>,
        row: &'a crate::outbox::Row,
    ) -> futures_util::future::BoxFuture<'a, Result<(), sqlx::Error>>;
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

pub use crate::registry::TxKind;

/// A transaction in a [`Context`], whichever database it is on.
#[doc(hidden)]
#[derive(Debug)]
pub enum TxSlot {
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(Tx<sqlx::Postgres>),
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(Tx<sqlx::Sqlite>),
}

impl TxSlot {
    /// The database it is on.
    pub(crate) fn kind(&self) -> TxKind {
        match self {
            #[cfg(feature = "postgres")]
            TxSlot::Postgres(_) => TxKind::Postgres,
            #[cfg(feature = "sqlite")]
            TxSlot::Sqlite(_) => TxKind::Sqlite,
        }
    }

    /// Commits.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            #[cfg(feature = "postgres")]
            TxSlot::Postgres(tx) => tx.commit().await,
            #[cfg(feature = "sqlite")]
            TxSlot::Sqlite(tx) => tx.commit().await,
        }
    }

    /// Rolls back.
    pub(crate) async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            #[cfg(feature = "postgres")]
            TxSlot::Postgres(tx) => tx.rollback().await,
            #[cfg(feature = "sqlite")]
            TxSlot::Sqlite(tx) => tx.rollback().await,
        }
    }
}

#[cfg(feature = "postgres")]
impl TxDatabase for sqlx::Postgres {
    const KIND: TxKind = TxKind::Postgres;

    fn into_slot(tx: Tx<Self>) -> TxSlot {
        TxSlot::Postgres(tx)
    }

    fn insert_outbox<'a>(
        tx: &'a mut Tx<Self>,
        row: &'a crate::outbox::Row,
    ) -> futures_util::future::BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(crate::outbox::insert_postgres(tx, row))
    }

    fn from_slot(slot: TxSlot) -> Result<Tx<Self>, TxSlot> {
        #[allow(unreachable_patterns)]
        match slot {
            TxSlot::Postgres(tx) => Ok(tx),
            other => Err(other),
        }
    }
}

#[cfg(feature = "sqlite")]
impl TxDatabase for sqlx::Sqlite {
    const KIND: TxKind = TxKind::Sqlite;

    fn into_slot(tx: Tx<Self>) -> TxSlot {
        TxSlot::Sqlite(tx)
    }

    fn insert_outbox<'a>(
        tx: &'a mut Tx<Self>,
        row: &'a crate::outbox::Row,
    ) -> futures_util::future::BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(crate::outbox::insert_sqlite(tx, row))
    }

    fn from_slot(slot: TxSlot) -> Result<Tx<Self>, TxSlot> {
        #[allow(unreachable_patterns)]
        match slot {
            TxSlot::Sqlite(tx) => Ok(tx),
            other => Err(other),
        }
    }
}

/// The pool of a SQL idempotency store, where transactional handlers' transactions are
/// opened ([`IdempotencyStore::sql_pool`](crate::idempotency::IdempotencyStore::sql_pool)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SqlPool {
    /// A PostgreSQL pool.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
    /// A SQLite pool.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
}

impl SqlPool {
    /// The database it is on.
    pub fn kind(&self) -> TxKind {
        match self {
            #[cfg(feature = "postgres")]
            SqlPool::Postgres(_) => TxKind::Postgres,
            #[cfg(feature = "sqlite")]
            SqlPool::Sqlite(_) => TxKind::Sqlite,
        }
    }
}

/// Takes the transaction out of the context for a handler argument (generated code).
#[doc(hidden)]
pub fn take<DB: TxDatabase>(ctx: &Context) -> Result<Tx<DB>, InvokeError> {
    let Some(slot) = ctx.take_tx() else {
        return Err(InvokeError::NoTransaction(DB::KIND.type_name()));
    };
    DB::from_slot(slot).map_err(|slot| {
        let found = slot.kind();
        ctx.give_tx(slot);
        InvokeError::WrongTransaction {
            wanted: DB::KIND.type_name(),
            found: found.type_name(),
        }
    })
}

/// Puts the transaction back once the handler has returned (generated code).
#[doc(hidden)]
pub fn give<DB: TxDatabase>(ctx: &Context, tx: Tx<DB>) {
    ctx.give_tx(DB::into_slot(tx));
}
