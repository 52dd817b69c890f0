//! A small service whose `main` is the operator command line, for the command-line tests
//! (`tests/cli/main.rs`, and against the emulator `tests/aws/exports.rs`): a FIFO command
//! with a JSON Schema, an event without one, a command it only sends, an event handler.
//! Built only with the test-only `test-fixtures` feature (so never installed).

use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use sourceflow::schemars::JsonSchema;
use sourceflow::{command, event, handler, Context};

/// Place an order (FIFO, high throughput, tagged).
#[command(
    queue = "cli-orders.fifo",
    name = "cli.PlaceOrder.v1",
    visibility_timeout = "2m",
    high_throughput,
    tags(team = "orders")
)]
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PlaceOrder {
    /// The order.
    #[entity_id]
    pub order_id: u64,
    /// What is ordered.
    pub lines: Vec<Line>,
}

/// One line of an order: not a message, so it names the schemars crate itself.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "sourceflow::schemars")]
pub struct Line {
    /// Stock keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// An order was placed (no JSON Schema: the AsyncAPI document says so).
#[event(topic = "cli-order-events", name = "cli.OrderPlaced.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: u64,
}

/// Mail a customer: this service only sends it (its queue is send-only here).
#[command(
    queue = "cli-mail",
    name = "cli.SendMail.v1",
    delay = "30s",
    sse = "none"
)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendMail {
    /// To whom.
    pub to: String,
}

#[handler]
async fn place(cmd: PlaceOrder, ctx: &Context) -> sourceflow::Result<()> {
    println!("handled PlaceOrder #{}", cmd.order_id);
    ctx.raise(OrderPlaced {
        order_id: cmd.order_id,
    })
    .await
}

#[handler(visibility_timeout = 45)]
async fn placed(evt: OrderPlaced) {
    println!("handled OrderPlaced #{}", evt.order_id);
}

#[tokio::main]
async fn main() -> ExitCode {
    sourceflow::cli::main().await
}
