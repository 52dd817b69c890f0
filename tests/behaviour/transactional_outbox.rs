//! The transactional outbox (`sourceflow::outbox`), for code outside handlers: messages
//! stored in a transaction that commits go out, in commit order per entity on a FIFO
//! queue; those of a transaction that rolls back never do; two relays on one database
//! send each row once. SQLite and PostgreSQL (a database of its own per test, so that
//! other tests' relays on the shared one never see these rows).
//!
//! The consumers run without idempotency, so that every delivery is counted.

#![cfg(any(feature = "sqlite", feature = "postgres"))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, handler, Handle, State};

use crate::harness::{eventually, Harness};

#[command(queue = "ob-orders.fifo", name = "tests.ob.PlaceOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    #[entity_id]
    pub customer: String,
    pub n: u32,
}

#[command(queue = "ob-mail", name = "tests.ob.SendMail.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendMail {
    pub n: u32,
}

#[command(queue = "ob-secret", name = "tests.ob.Secret.v1", encrypt)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Secret {
    pub n: u32,
}

/// What the consumer saw: per customer, the order numbers in arrival order; per mail,
/// its deliveries.
#[derive(Clone, Default)]
pub struct Seen {
    orders: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    mails: Arc<Mutex<HashMap<u32, u32>>>,
}

pub mod consumer {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn place(cmd: PlaceOrder, State(seen): State<Seen>) -> sourceflow::Result<()> {
        seen.orders
            .lock()
            .expect("seen")
            .entry(cmd.customer)
            .or_default()
            .push(cmd.n);
        Ok(())
    }

    #[handler]
    async fn mail(cmd: SendMail, State(seen): State<Seen>) -> sourceflow::Result<()> {
        *seen.mails.lock().expect("seen").entry(cmd.n).or_default() += 1;
        Ok(())
    }
}

/// A module without handlers: a service of it only relays.
pub mod relay_only {
    pub const MODULE: &str = module_path!();
}

/// One database for both suites: begin a transaction, write a row in it.
#[derive(Clone)]
pub enum Db {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

impl Db {
    fn relay(&self, h: &Harness, name: &str) -> sourceflow::Builder {
        let b =
            h.service(name, relay_only::MODULE)
                .outbox_relay(sourceflow::outbox::RelaySettings {
                    poll_interval: Duration::from_millis(50),
                    // Short, so that a row left undeleted would be sent again within the test.
                    lease: Duration::from_secs(2),
                    ..Default::default()
                });
        match self {
            #[cfg(feature = "sqlite")]
            Db::Sqlite(p) => b.sqlite(p.clone()),
            #[cfg(feature = "postgres")]
            Db::Postgres(p) => b.postgres(p.clone()),
        }
    }

    /// Saves order `n` and stores its command in the same transaction; commits or rolls back.
    async fn save_order(&self, app: &Handle, customer: &str, n: u32, commit: bool) {
        let cmd = PlaceOrder {
            customer: customer.into(),
            n,
        };
        match self {
            #[cfg(feature = "sqlite")]
            Db::Sqlite(p) => {
                let mut tx = p.begin().await.expect("begin");
                sqlx::query("INSERT INTO ob_orders (customer, n) VALUES (?1, ?2)")
                    .bind(customer)
                    .bind(i64::from(n))
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                app.outbox().send(&mut tx, cmd).await.expect("outbox send");
                finish(tx, commit).await;
            }
            #[cfg(feature = "postgres")]
            Db::Postgres(p) => {
                let mut tx = p.begin().await.expect("begin");
                sqlx::query("INSERT INTO ob_orders (customer, n) VALUES ($1, $2)")
                    .bind(customer)
                    .bind(i64::from(n))
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                app.outbox().send(&mut tx, cmd).await.expect("outbox send");
                finish(tx, commit).await;
            }
        }
    }

    async fn mail(&self, app: &Handle, n: u32) {
        match self {
            #[cfg(feature = "sqlite")]
            Db::Sqlite(p) => {
                let mut tx = p.begin().await.expect("begin");
                app.outbox()
                    .send(&mut tx, SendMail { n })
                    .await
                    .expect("outbox send");
                tx.commit().await.expect("commit");
            }
            #[cfg(feature = "postgres")]
            Db::Postgres(p) => {
                let mut tx = p.begin().await.expect("begin");
                app.outbox()
                    .send(&mut tx, SendMail { n })
                    .await
                    .expect("outbox send");
                tx.commit().await.expect("commit");
            }
        }
    }

    async fn secret_is_refused(&self, app: &Handle) {
        let err = match self {
            #[cfg(feature = "sqlite")]
            Db::Sqlite(p) => {
                let mut tx = p.begin().await.expect("begin");
                app.outbox()
                    .send(&mut tx, Secret { n: 1 })
                    .await
                    .expect_err("encrypt refused")
            }
            #[cfg(feature = "postgres")]
            Db::Postgres(p) => {
                let mut tx = p.begin().await.expect("begin");
                app.outbox()
                    .send(&mut tx, Secret { n: 1 })
                    .await
                    .expect_err("encrypt refused")
            }
        };
        assert!(err.to_string().contains("declared `encrypt`"), "{err}");
    }
}

async fn finish<DB: sqlx::Database>(tx: sqlx::Transaction<'static, DB>, commit: bool) {
    match commit {
        true => tx.commit().await.expect("commit"),
        false => tx.rollback().await.expect("rollback"),
    }
}

async fn consumer(h: &Harness, seen: &Seen) -> Handle {
    h.service("ob-consumer", consumer::MODULE)
        .without_idempotency()
        .state(seen.clone())
        .start()
        .await
        .expect("consumer")
}

/// 60 orders of 4 customers, every tenth transaction rolled back: the 54 committed go
/// out, each customer's in the order they were saved; none of a rolled-back one.
pub async fn committed_go_out_in_order(db: Db) {
    let h = Harness::new().await;
    let seen = Seen::default();
    let consumer = consumer(&h, &seen).await;
    let relay = db.relay(&h, "ob-relay").start().await.expect("relay");
    db.secret_is_refused(&relay).await;
    let customers = ["ada", "bob", "cy", "dee"];
    for n in 0..60u32 {
        db.save_order(&relay, customers[n as usize % 4], n, n % 10 != 3)
            .await;
    }
    let count = || {
        seen.orders
            .lock()
            .expect("seen")
            .values()
            .map(Vec::len)
            .sum::<usize>()
    };
    eventually("the 54 committed orders", || async { count() >= 54 }).await;
    eventually("an empty outbox", || async {
        relay.outbox_backlog().await.ok().flatten() == Some(0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(), 54, "only the committed orders, each once");
    for (i, c) in customers.iter().enumerate() {
        let want: Vec<u32> = (0..60u32)
            .filter(|n| *n as usize % 4 == i && n % 10 != 3)
            .collect();
        assert_eq!(
            seen.orders.lock().expect("seen").get(*c),
            Some(&want),
            "{c}'s orders in commit order"
        );
    }
    relay.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
}

/// Two relays on one database, 100 messages committed while both run: each delivered once.
pub async fn two_relays_send_each_once(db: Db) {
    let h = Harness::new().await;
    let seen = Seen::default();
    let consumer = consumer(&h, &seen).await;
    let a = db.relay(&h, "ob-relay-a").start().await.expect("relay a");
    let b = db.relay(&h, "ob-relay-b").start().await.expect("relay b");
    for n in 0..100u32 {
        db.mail(if n % 2 == 0 { &a } else { &b }, n).await;
    }
    let delivered = || seen.mails.lock().expect("seen").values().sum::<u32>();
    eventually("100 mails", || async { delivered() >= 100 }).await;
    // Longer than a lease: a sent row that was not deleted would go again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mails = seen.mails.lock().expect("seen").clone();
    assert_eq!(mails.len(), 100, "every mail arrived");
    let twice: Vec<_> = mails.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
    consumer.shutdown().await.expect("shutdown");
}

#[cfg(feature = "sqlite")]
async fn sqlite_db() -> Db {
    let store = crate::harness::fresh_sqlite("ob").await;
    let pool = store.pool().clone();
    sqlx::query("CREATE TABLE ob_orders (customer TEXT NOT NULL, n INTEGER NOT NULL)")
        .execute(&pool)
        .await
        .expect("table");
    Db::Sqlite(pool)
}

/// A database of its own on the test server.
#[cfg(feature = "postgres")]
async fn postgres_db() -> Option<Db> {
    let server = crate::postgres::server_url()?;
    let url = crate::postgres::fresh_database(&server, "sf_outbox").await;
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query("CREATE TABLE ob_orders (customer TEXT NOT NULL, n BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .expect("table");
    Some(Db::Postgres(pool))
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbox_sends_committed_messages_in_order() {
    committed_go_out_in_order(sqlite_db().await).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_outbox_two_relays_send_each_once() {
    two_relays_send_each_once(sqlite_db().await).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outbox_sends_committed_messages_in_order() {
    let Some(db) = postgres_db().await else {
        return;
    };
    committed_go_out_in_order(db).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outbox_two_relays_send_each_once() {
    let Some(db) = postgres_db().await else {
        return;
    };
    two_relays_send_each_once(db).await;
}
