//! The orders service with its read model in SQLite, exactly once: transactional handlers
//! and the transactional outbox.
//!
//! An "HTTP endpoint" ([`place_order_endpoint`]) saves an order and stores its
//! `PlaceOrder` command in one SQLite transaction (`sourceflow::outbox`): both or neither.
//! `place_order` marks the order placed and raises `OrderPlaced` in the transaction it is
//! given (`&mut Tx<Sqlite>`), which also holds the message's claim: its write, the claim and
//! the event commit together, once. `project_totals` keeps a per-customer total in the
//! same database the same way. One request fails after saving its order: its transaction
//! rolls back, and no command goes out.
//!
//! ```text
//! cargo run --example orders_sqlite --features sqlite
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::idempotency::SqliteIdempotencyStore;
use sourceflow::tx::Sqlite;
use sourceflow::{command, event, handler, Context, Handle, Tx};
use sqlx::SqlitePool;

/// Place an order (FIFO: one order's commands in order).
#[command(queue = "sqlite-orders.fifo", name = "orders.PlaceOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlaceOrder {
    #[entity_id]
    pub order_id: String,
    pub customer: String,
    pub amount_cents: i64,
}

/// An order was placed.
#[event(topic = "sqlite-order-events", name = "orders.OrderPlaced.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    #[entity_id]
    pub order_id: String,
    pub customer: String,
    pub amount_cents: i64,
}

#[handler]
async fn place_order(
    cmd: PlaceOrder,
    tx: &mut Tx<Sqlite>,
    ctx: &Context,
) -> sourceflow::Result<()> {
    sqlx::query("UPDATE orders SET status = 'placed' WHERE id = ?1 AND status = 'received'")
        .bind(&cmd.order_id)
        .execute(&mut **tx)
        .await
        .map_err(sourceflow::Error::other)?;
    println!("[orders] {} placed", cmd.order_id);
    ctx.raise(OrderPlaced {
        order_id: cmd.order_id,
        customer: cmd.customer,
        amount_cents: cmd.amount_cents,
    })
    .await
}

#[handler]
async fn project_totals(evt: OrderPlaced, tx: &mut Tx<Sqlite>) -> sourceflow::Result<()> {
    sqlx::query(
        "INSERT INTO customer_totals (customer, orders, cents) VALUES (?1, 1, ?2)
         ON CONFLICT (customer) DO UPDATE SET orders = orders + 1, cents = cents + excluded.cents",
    )
    .bind(&evt.customer)
    .bind(evt.amount_cents)
    .execute(&mut **tx)
    .await
    .map_err(sourceflow::Error::other)?;
    println!("[totals] {} +{} cents", evt.customer, evt.amount_cents);
    Ok(())
}

/// What an HTTP handler would do: save the order and store its command, atomically.
/// `fail_after_saving` stands for an error later in the request.
async fn place_order_endpoint(
    pool: &SqlitePool,
    app: &Handle,
    order: PlaceOrder,
    fail_after_saving: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id, customer, cents, status) VALUES (?1, ?2, ?3, 'received')")
        .bind(&order.order_id)
        .bind(&order.customer)
        .bind(order.amount_cents)
        .execute(&mut *tx)
        .await?;
    let id = order.order_id.clone();
    app.outbox().send(&mut tx, order).await?;
    if fail_after_saving {
        tx.rollback().await?;
        return Err(format!("request for {id} failed after saving; rolled back").into());
    }
    tx.commit().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sourceflow=warn".into()),
        )
        .init();
    let path = std::env::temp_dir().join(format!("sourceflow-orders-{}.db", std::process::id()));
    let store =
        SqliteIdempotencyStore::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?;
    let pool = store.pool().clone();
    for ddl in [
        "CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL, cents INTEGER NOT NULL, status TEXT NOT NULL)",
        "CREATE TABLE customer_totals (customer TEXT PRIMARY KEY, orders INTEGER NOT NULL, cents INTEGER NOT NULL)",
    ] {
        sqlx::query(ddl).execute(&pool).await?;
    }
    println!("read model and claims in {}", path.display());

    // The embedded transport by default; the store's pool is the one handlers write in.
    let app = sourceflow::builder()
        .service("orders-sqlite")
        .handlers_in(module_path!())
        .sqlite(pool.clone())
        .start()
        .await?;

    let orders = [
        ("o-1", "ada", 1_250, false),
        ("o-2", "bob", 990, false),
        ("o-3", "ada", 4_000, true),
        ("o-4", "ada", 300, false),
    ];
    for (id, customer, cents, fail) in orders {
        let order = PlaceOrder {
            order_id: id.into(),
            customer: customer.into(),
            amount_cents: cents,
        };
        match place_order_endpoint(&pool, &app, order, fail).await {
            Ok(()) => println!("[http]   {id} accepted"),
            Err(e) => println!("[http]   {e}"),
        }
    }

    // Wait until the three accepted orders are placed and projected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let projected: i64 =
            sqlx::query_scalar("SELECT coalesce(sum(orders), 0) FROM customer_totals")
                .fetch_one(&pool)
                .await?;
        if projected >= 3 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the orders were not projected within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM orders ORDER BY id")
        .fetch_all(&pool)
        .await?;
    println!("\norders: {rows:?}");
    let totals: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT customer, orders, cents FROM customer_totals ORDER BY customer")
            .fetch_all(&pool)
            .await?;
    println!("totals: {totals:?}");
    assert_eq!(rows.len(), 3, "the rolled-back order was never saved");
    assert!(rows.iter().all(|(_, s)| s == "placed"));
    assert_eq!(
        totals,
        vec![("ada".into(), 2, 1_550), ("bob".into(), 1, 990)]
    );
    println!("outbox backlog: {:?}", app.outbox_backlog().await?);
    app.shutdown().await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
