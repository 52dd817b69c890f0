// Every supported handler shape compiles.
use sourceflow::{Context, State};

#[sourceflow::command(queue = "orders.fifo")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CreateOrder {
    #[entity_id]
    pub order_id: u64,
}

#[sourceflow::command(queue = "payments")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProcessPayment {
    pub order_id: u64,
}

#[sourceflow::command(queue = "audit")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Audit {
    pub line: String,
}

#[sourceflow::command(queue = "io")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WriteFile {
    pub path: String,
}

#[sourceflow::command(queue = "notifications")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Notify {
    pub to: String,
}

#[sourceflow::event(topic = "order-events")]
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OrderCreated {
    pub order_id: u64,
}

#[derive(Clone)]
pub struct Db;

#[derive(Clone)]
pub struct Mailer;

// The message, the context, and the result.
#[sourceflow::handler]
async fn create_order(cmd: CreateOrder, ctx: &Context) -> sourceflow::Result<()> {
    ctx.raise(OrderCreated {
        order_id: cmd.order_id,
    })
    .await
}

// Only the message, returning nothing.
#[sourceflow::handler]
async fn audit(_cmd: Audit) {}

// State, in any position, one or two of them.
#[sourceflow::handler]
async fn process_payment(
    _cmd: ProcessPayment,
    State(_db): State<Db>,
    ctx: &Context,
    _mailer: State<Mailer>,
) -> sourceflow::Result<()> {
    let _ = ctx.message_id();
    Ok(())
}

// Any error type convertible into a boxed error.
#[sourceflow::handler]
async fn write_file(cmd: WriteFile) -> Result<(), std::io::Error> {
    let _ = cmd.path;
    Ok(())
}

// A boxed error works too.
#[sourceflow::handler]
async fn notify(cmd: Notify) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if cmd.to.is_empty() {
        return Err("nobody to notify".into());
    }
    Ok(())
}

// Several handlers for one event, one with its own subscriber queue.
#[sourceflow::handler]
async fn request_payment(evt: OrderCreated, ctx: &Context) -> sourceflow::Result<()> {
    ctx.send(ProcessPayment {
        order_id: evt.order_id,
    })
    .await
}

#[sourceflow::handler(queue = "order-projection")]
async fn project(_evt: OrderCreated, State(_db): State<Db>) -> sourceflow::Result<()> {
    Ok(())
}

// Outside handlers, the handle sends commands and raises events.
async fn endpoint(app: sourceflow::Handle) -> sourceflow::Result<()> {
    app.send(ProcessPayment { order_id: 1 }).await?;
    app.raise(OrderCreated { order_id: 1 }).await?;
    Ok(())
}

fn main() {
    let _ = endpoint;
    let names: Vec<&str> = sourceflow::registry::handler_routes()
        .map(|h| h.name)
        .collect();
    for expected in [
        "create_order",
        "audit",
        "process_payment",
        "write_file",
        "notify",
        "request_payment",
        "project",
    ] {
        assert!(names.contains(&expected), "{expected} is registered");
    }
    // The functions stay callable directly, e.g. in unit tests.
    let _ = audit(Audit {
        line: String::new(),
    });
}
