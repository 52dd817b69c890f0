//! The handler context carries the incoming message's metadata, and follow-up messages
//! carry the conversation on.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, Context, SendOptions, State};

use crate::harness::{eventually, Harness};

#[command(queue = "ctx-orders.fifo", name = "tests.PlaceOrder.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlaceOrder {
    #[entity_id]
    order_id: u64,
}

#[event(topic = "ctx-order-events", name = "tests.OrderPlaced.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    #[entity_id]
    order_id: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Seen {
    message_id: String,
    correlation_id: String,
    causation_id: Option<String>,
    entity_id: Option<String>,
    receive_count: u32,
    wire_name: String,
    service: String,
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn push(&self, ctx: &Context) {
        self.0.lock().expect("log lock").push(Seen {
            message_id: ctx.message_id().to_string(),
            correlation_id: ctx.correlation_id().to_string(),
            causation_id: ctx.causation_id().map(str::to_string),
            entity_id: ctx.entity_id().map(str::to_string),
            receive_count: ctx.receive_count(),
            wire_name: ctx.wire_name().to_string(),
            service: ctx.service().to_string(),
        });
    }
    fn all(&self) -> Vec<Seen> {
        self.0.lock().expect("log lock").clone()
    }
}

#[handler]
async fn place(cmd: PlaceOrder, ctx: &Context, State(log): State<Log>) -> sourceflow::Result<()> {
    log.push(ctx);
    ctx.raise(OrderPlaced {
        order_id: cmd.order_id,
    })
    .await
}

#[handler]
async fn placed(
    _evt: OrderPlaced,
    ctx: &Context,
    State(log): State<Log>,
) -> sourceflow::Result<()> {
    log.push(ctx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_correlation_flow_through_handlers() {
    let h = Harness::new().await;
    let log = Log::default();
    let app = h
        .service("ctx", module_path!())
        .state(log.clone())
        .start()
        .await
        .expect("start");
    let conversation = "web-request-123";
    let cmd_id = app
        .send_with(
            PlaceOrder { order_id: 77 },
            SendOptions::new().correlation_id(conversation),
        )
        .await
        .expect("send");
    eventually("command and event handled", || async {
        log.all().len() >= 2
    })
    .await;
    let seen = log.all();
    let cmd = seen
        .iter()
        .find(|s| s.wire_name == "tests.PlaceOrder.v1")
        .expect("command");
    let evt = seen
        .iter()
        .find(|s| s.wire_name == "tests.OrderPlaced.v1")
        .expect("event");
    assert_eq!(cmd.message_id, cmd_id);
    assert_eq!(cmd.correlation_id, conversation);
    assert_eq!(cmd.causation_id, None);
    assert_eq!(cmd.entity_id.as_deref(), Some("77"));
    assert_eq!(cmd.receive_count, 1);
    assert_eq!(cmd.service, "ctx");
    assert_eq!(evt.correlation_id, conversation, "correlation carried on");
    assert_eq!(
        evt.causation_id.as_deref(),
        Some(cmd_id.as_str()),
        "caused by the command"
    );
    assert_ne!(evt.message_id, cmd_id);
    assert_eq!(evt.entity_id.as_deref(), Some("77"));
    app.shutdown().await.expect("shutdown");
}

/// A handler's future is allocated for each message it handles, and holds the future of
/// every `send` and `raise` it awaits. glibc's allocator serves an allocation over 1 KiB
/// from its large bins, after consolidating its heap under the arena lock, which the other
/// worker threads then wait on (see the throughput bench). A message that is not sealed is
/// encoded without awaiting anything, so the boxed future of the throughput bench's
/// command handler (the same here: it raises one event), as its route runs it, stays under
/// that line (1,776 bytes when the encoding's state was part of it).
#[test]
fn a_handlers_future_that_raises_stays_under_a_kibibyte() {
    let route = sourceflow::__private::inventory::iter::<sourceflow::__private::HandlerRoute>
        .into_iter()
        .find(|r| r.module_path == sized::PATH)
        .expect("the route of `sized::place_order`");
    let ctx = sourceflow::testing::TestContext::for_message::<sized::PlaceOrder>();
    let handler = std::mem::size_of_val(&*(route.invoke)(&ctx));
    assert!(handler < 1024, "the handler's future: {handler} bytes");
}

/// The throughput bench's command handler, in a module no service of these tests runs.
mod sized {
    use serde::{Deserialize, Serialize};
    use sourceflow::{command, event, handler, Context};

    pub const PATH: &str = module_path!();

    #[command(queue = "ctx-sized-orders.fifo", name = "tests.SizedPlaceOrder.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct PlaceOrder {
        #[entity_id]
        pub customer: u64,
        pub order: u64,
        pub sent_nanos: u64,
        pub note: String,
    }

    #[event(topic = "ctx-sized-order-events", name = "tests.SizedOrderPlaced.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct OrderPlaced {
        #[entity_id]
        pub customer: u64,
        pub order: u64,
        pub sent_nanos: u64,
    }

    #[handler]
    async fn place_order(cmd: PlaceOrder, ctx: &Context) -> sourceflow::Result<()> {
        ctx.raise(OrderPlaced {
            customer: cmd.customer,
            order: cmd.order,
            sent_nanos: cmd.sent_nanos,
        })
        .await
    }
}
