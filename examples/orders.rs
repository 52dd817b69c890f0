//! An orders service on sourceflow.
//!
//! `CreateOrder` (FIFO, ordered per order) → `create_order` raises `OrderCreated` →
//! `request_payment` sends `ProcessPayment` → `process_payment` raises `PaymentProcessed` →
//! the read model (`project_*`) keeps an in-memory view of every order.
//!
//! ```text
//! cargo run --example orders              # demo on the embedded transport, then exit
//! cargo run --example orders -- --serve   # keep serving until Ctrl-C
//! RUST_LOG=sourceflow=debug cargo run --example orders
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, Context, State};
use tokio::sync::{Mutex, Notify};

// ---- messages ------------------------------------------------------------------------

/// Place an order. FIFO: the commands of one order are handled in the order sent.
#[command(queue = "orders.fifo", name = "orders.CreateOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateOrder {
    #[entity_id]
    pub order_id: u64,
    pub customer: String,
    pub amount_cents: u64,
    #[sensitive(card)]
    pub card_number: String,
}

/// An order was accepted.
#[event(topic = "order-events", name = "orders.OrderCreated.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCreated {
    #[entity_id]
    pub order_id: u64,
    pub customer: String,
    pub amount_cents: u64,
}

/// Charge the customer for an order.
#[command(queue = "payments", name = "payments.ProcessPayment.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessPayment {
    #[entity_id]
    pub order_id: u64,
    pub amount_cents: u64,
}

/// A payment went through.
#[event(topic = "payment-events", name = "payments.PaymentProcessed.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentProcessed {
    #[entity_id]
    pub order_id: u64,
    pub amount_cents: u64,
}

// ---- the read model (shared state) -----------------------------------------------------

/// One row of the orders view.
#[derive(Debug, Clone, Default)]
pub struct OrderView {
    pub customer: String,
    pub amount_cents: u64,
    pub paid: bool,
}

/// The in-memory projection, handed to handlers as `State<Projection>`.
#[derive(Clone, Default)]
pub struct Projection {
    orders: Arc<Mutex<BTreeMap<u64, OrderView>>>,
    changed: Arc<Notify>,
}

// ---- handlers ------------------------------------------------------------------------

#[handler]
async fn create_order(cmd: CreateOrder, ctx: &Context) -> sourceflow::Result<()> {
    // `{:?}` masks the card number: only its last four digits are printed.
    println!(
        "[orders]   CreateOrder #{} received (message {}): {:?}",
        cmd.order_id,
        short(ctx.message_id()),
        cmd
    );
    ctx.raise(OrderCreated {
        order_id: cmd.order_id,
        customer: cmd.customer,
        amount_cents: cmd.amount_cents,
    })
    .await
}

#[handler]
async fn request_payment(evt: OrderCreated, ctx: &Context) -> sourceflow::Result<()> {
    println!(
        "[payments] OrderCreated #{} → requesting payment of {} (correlation {})",
        evt.order_id,
        money(evt.amount_cents),
        short(ctx.correlation_id())
    );
    ctx.send(ProcessPayment {
        order_id: evt.order_id,
        amount_cents: evt.amount_cents,
    })
    .await
}

#[handler]
async fn process_payment(cmd: ProcessPayment, ctx: &Context) -> sourceflow::Result<()> {
    println!(
        "[payments] ProcessPayment #{} charged {}",
        cmd.order_id,
        money(cmd.amount_cents)
    );
    ctx.raise(PaymentProcessed {
        order_id: cmd.order_id,
        amount_cents: cmd.amount_cents,
    })
    .await
}

#[handler]
async fn project_order(
    evt: OrderCreated,
    State(view): State<Projection>,
) -> sourceflow::Result<()> {
    let mut orders = view.orders.lock().await;
    let row = orders.entry(evt.order_id).or_default();
    row.customer = evt.customer;
    row.amount_cents = evt.amount_cents;
    println!("[view]     order #{} recorded", evt.order_id);
    view.changed.notify_waiters();
    Ok(())
}

#[handler]
async fn project_payment(
    evt: PaymentProcessed,
    State(view): State<Projection>,
) -> sourceflow::Result<()> {
    view.orders
        .lock()
        .await
        .entry(evt.order_id)
        .or_default()
        .paid = true;
    println!("[view]     order #{} marked paid", evt.order_id);
    view.changed.notify_waiters();
    Ok(())
}

fn money(cents: u64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

// ---- main ----------------------------------------------------------------------------

#[tokio::main]
async fn main() -> sourceflow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sourceflow=info".into()),
        )
        .with_target(false)
        .init();
    let serve = std::env::args().any(|a| a == "--serve");

    let projection = Projection::default();
    let app = sourceflow::builder()
        .state(projection.clone())
        .start()
        .await?;
    println!(
        "service `{}` running on the `{}` transport",
        app.service(),
        app.transport().name()
    );

    let customers = ["ada", "grace", "linus"];
    let orders: Vec<CreateOrder> = (1..=3u64)
        .map(|id| CreateOrder {
            order_id: id,
            customer: customers[(id as usize - 1) % customers.len()].to_string(),
            amount_cents: 1_250 * id,
            card_number: format!("4111 1111 1111 {:04}", 1000 + id),
        })
        .collect();
    for order in &orders {
        let id = app.send(order.clone()).await?;
        println!(
            "[client]   sent CreateOrder #{} as message {}",
            order.order_id,
            short(&id)
        );
    }

    // Wait until the read model shows every order paid (or give up after 30 s).
    let all_paid = async {
        loop {
            let changed = projection.changed.notified();
            {
                let view = projection.orders.lock().await;
                if view.len() == orders.len() && view.values().all(|o| o.paid) {
                    return;
                }
            }
            changed.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), all_paid)
        .await
        .is_err()
    {
        eprintln!("the demo did not complete within 30 s");
        app.shutdown().await?;
        std::process::exit(1);
    }

    println!("\nread model:");
    for (id, o) in projection.orders.lock().await.iter() {
        println!(
            "  order #{id}: {:<6} {:>8}  {}",
            o.customer,
            money(o.amount_cents),
            if o.paid { "paid" } else { "pending" }
        );
    }

    if serve {
        println!("\nserving; press Ctrl-C to stop");
        tokio::signal::ctrl_c().await.ok();
    }
    let report = app.shutdown().await?;
    println!(
        "\nshut down: {} in-flight message(s) finished, {} returned to their queues",
        report.finished, report.returned
    );
    Ok(())
}
