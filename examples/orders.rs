//! An orders service on sourceflow.
//!
//! `CreateOrder` (FIFO, ordered per order) → `create_order` raises `OrderCreated` →
//! `request_payment` sends `ProcessPayment` → `process_payment` raises `PaymentProcessed` →
//! the read model (`project_*`) keeps an in-memory view of every order, and answers the
//! `GetOrder` query (`get_order`), in process. A payment over the card limit is rejected
//! for good (dead-lettered with the reason); an outage of the card network (`Gateway`) is
//! retried with backoff.
//!
//! Its own tests (`tests/orders/main.rs`, `cargo test -p sourceflow --features testing
//! --test orders`) run this file's service with `sourceflow::testing`.
//!
//! Its command line is sourceflow's operator command line (`sourceflow::cli`) plus the
//! demo, which runs when no command is given:
//!
//! ```text
//! cargo run --example orders                     # demo on the embedded transport, then exit
//! cargo run --example orders -- --telemetry      # also print the trace tree and the metrics
//! cargo run --example orders -- serve            # serve until Ctrl-C / SIGTERM
//! cargo run --example orders -- topology         # queues, topics, subscriptions, listeners
//! cargo run --example orders -- iam-policy       # the IAM policy this service needs
//! cargo run --example orders -- export cloudformation --out orders.json
//! cargo run --example orders -- export asyncapi
//! SOURCEFLOW_TRANSPORT=aws cargo run --example orders -- validate
//! SOURCEFLOW_TRANSPORT=aws cargo run --example orders -- dlq redrive orders.fifo
//! cargo run --example orders -- --help
//! RUST_LOG=sourceflow=debug cargo run --example orders
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, query, Context, Reject, State};
use tokio::sync::{Mutex, Notify};
use tracing::Instrument;

// ---- messages ------------------------------------------------------------------------

/// Place an order. FIFO: the commands of one order are handled in the order sent.
/// Encrypted: the card number never travels in clear.
#[command(queue = "orders.fifo", name = "orders.CreateOrder.v1", encrypt)]
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

impl Projection {
    /// The row of one order, if the view has it.
    pub async fn order(&self, order_id: u64) -> Option<OrderView> {
        self.orders.lock().await.get(&order_id).cloned()
    }
}

// ---- the card network (shared state) ---------------------------------------------------

/// The most a card is charged at once: a payment above it is refused for good.
pub const CARD_LIMIT_CENTS: u64 = 1_000_000;

/// The card network `process_payment` charges through, handed to it as `State<Gateway>`.
/// It approves every charge, except during an outage ([`Gateway::fail_next`]), when a
/// charge fails and its message is retried with backoff.
#[derive(Clone, Default)]
pub struct Gateway {
    outages: Arc<AtomicU32>,
}

impl Gateway {
    /// Fails the next `calls` charges, as an outage of the card network would.
    pub fn fail_next(&self, calls: u32) {
        self.outages.store(calls, Ordering::SeqCst);
    }

    fn charge(&self, _payment: &ProcessPayment) -> sourceflow::Result<()> {
        let outage = self
            .outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match outage {
            Ok(_) => Err(sourceflow::Error::Other("card network unavailable".into())),
            Err(_) => Ok(()),
        }
    }
}

/// The service: the builder `main` runs (with the operator command line's options on
/// top), and that the example's tests start with `sourceflow::testing::TestApp`.
pub fn service(projection: Projection, gateway: Gateway) -> sourceflow::Builder {
    sourceflow::builder().state(projection).state(gateway)
}

// ---- queries (the read side) ----------------------------------------------------------

/// One order as the read model shows it; `None` for an order it has not seen.
#[query(response = Option<OrderView>, name = "orders.GetOrder")]
#[derive(Debug, Clone)]
pub struct GetOrder {
    pub order_id: u64,
}

/// Answers `GetOrder` from the projection, in process: no queue is involved.
#[handler]
pub async fn get_order(
    q: GetOrder,
    State(view): State<Projection>,
) -> sourceflow::Result<Option<OrderView>> {
    Ok(view.order(q.order_id).await)
}

// ---- handlers ------------------------------------------------------------------------

#[handler]
pub async fn create_order(cmd: CreateOrder, ctx: &Context) -> sourceflow::Result<()> {
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
pub async fn request_payment(evt: OrderCreated, ctx: &Context) -> sourceflow::Result<()> {
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
pub async fn process_payment(
    cmd: ProcessPayment,
    ctx: &Context,
    State(gateway): State<Gateway>,
) -> sourceflow::Result<()> {
    if cmd.amount_cents > CARD_LIMIT_CENTS {
        // Retrying cannot help: to the dead-letter queue at once, with this reason.
        return Err(Reject::new(format!(
            "amount over the card limit of {}",
            money(CARD_LIMIT_CENTS)
        ))
        .into());
    }
    // An outage is an ordinary error: the message comes back after the retry backoff.
    gateway.charge(&cmd)?;
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
pub async fn project_order(
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
pub async fn project_payment(
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

/// The orders example: runs the demo when no command is given, else the operator command.
#[derive(Parser)]
#[command(
    name = "orders",
    about = "The sourceflow orders example: without a command, a demo on the embedded transport that exits when done; with one, sourceflow's operator commands",
    after_help = "Examples:\n  orders                      the demo\n  orders serve                serve until Ctrl-C\n  orders topology             what the routes need\n  orders export asyncapi      the AsyncAPI document"
)]
struct Args {
    /// Print the trace tree and the metrics after the demo.
    #[arg(long, global = true)]
    telemetry: bool,
    #[command(flatten)]
    options: sourceflow::cli::Options,
    #[command(subcommand)]
    command: Option<sourceflow::cli::Command>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let telemetry = telemetry::install(args.telemetry);
    let projection = Projection::default();
    let builder = args
        .options
        .apply(service(projection.clone(), Gateway::default()).meter_provider(&telemetry.meters));
    match args.command {
        Some(command) => sourceflow::cli::execute(command, builder).await,
        None => match demo(builder, projection, &telemetry, args.telemetry).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// True when the read model, asked with `GetOrder`, shows every order paid.
async fn all_paid(app: &sourceflow::Handle, orders: &[CreateOrder]) -> sourceflow::Result<bool> {
    for order in orders {
        let view = app
            .query(GetOrder {
                order_id: order.order_id,
            })
            .await?;
        if !view.is_some_and(|v| v.paid) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sends three orders and waits until the read model, asked with `GetOrder`, shows them
/// paid.
async fn demo(
    builder: sourceflow::Builder,
    projection: Projection,
    telemetry: &telemetry::Telemetry,
    show_telemetry: bool,
) -> sourceflow::Result<()> {
    let app = builder.start().await?;
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
        // Each order starts its own trace, as an HTTP request would.
        let request = tracing::info_span!("POST /orders", order_id = order.order_id);
        let id = app.send(order.clone()).instrument(request).await?;
        println!(
            "[client]   sent CreateOrder #{} as message {}",
            order.order_id,
            short(&id)
        );
    }

    // Wait until the read model shows every order paid (or give up after 30 s).
    let settled = async {
        loop {
            let changed = projection.changed.notified();
            // Asked through the `GetOrder` query, as an HTTP endpoint would.
            if all_paid(&app, &orders).await? {
                return Ok(());
            }
            changed.await;
        }
    };
    let outcome = match tokio::time::timeout(Duration::from_secs(30), settled).await {
        Ok(answered) => answered,
        Err(_) => Err(sourceflow::Error::Config(
            "the demo did not complete within 30 s".into(),
        )),
    };
    if let Err(e) = outcome {
        app.shutdown().await?;
        return Err(e);
    }

    println!("\nread model:");
    for order in &orders {
        let id = order.order_id;
        let Some(o) = app.query(GetOrder { order_id: id }).await? else {
            continue;
        };
        println!(
            "  order #{id}: {:<6} {:>8}  {}",
            o.customer,
            money(o.amount_cents),
            if o.paid { "paid" } else { "pending" }
        );
    }

    if show_telemetry {
        // Let the last spans end.
        tokio::time::sleep(Duration::from_millis(100)).await;
        telemetry.print();
    }

    let report = app.shutdown().await?;
    println!(
        "\nshut down: {} in-flight message(s) finished, {} handed back unstarted, {} abandoned at the deadline",
        report.finished, report.returned, report.abandoned
    );
    Ok(())
}

/// Optional telemetry for the demo: spans go to an in-memory OpenTelemetry exporter and are
/// printed as a tree per trace; metrics are read from an in-memory exporter. In a real
/// service, install an OTLP exporter instead (see the README).
mod telemetry {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    pub struct Telemetry {
        pub meters: SdkMeterProvider,
        metrics: InMemoryMetricExporter,
        spans: InMemorySpanExporter,
        _tracer: SdkTracerProvider,
    }

    pub fn install(on: bool) -> Telemetry {
        let spans = InMemorySpanExporter::default();
        let tracer = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let metrics = InMemoryMetricExporter::default();
        let meters = SdkMeterProvider::builder()
            .with_periodic_exporter(metrics.clone())
            .build();
        let fmt = tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "sourceflow=info".into()),
            );
        let otel = on.then(|| {
            sourceflow::telemetry::layer(tracer.tracer("orders-example"))
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        });
        tracing_subscriber::registry().with(fmt).with(otel).init();
        Telemetry {
            meters,
            metrics,
            spans,
            _tracer: tracer,
        }
    }

    impl Telemetry {
        pub fn print(&self) {
            let spans = self.spans.get_finished_spans().unwrap_or_default();
            let roots: Vec<&SpanData> = spans
                .iter()
                .filter(|s| {
                    !spans
                        .iter()
                        .any(|p| p.span_context.span_id() == s.parent_span_id)
                })
                .collect();
            println!("\ntraces ({} spans):", spans.len());
            for root in roots {
                println!("  trace {}", root.span_context.trace_id());
                print_tree(&spans, root, 2);
            }
            let _ = self.meters.force_flush();
            println!("\nmetrics:");
            let all = self.metrics.get_finished_metrics().unwrap_or_default();
            if let Some(last) = all.last() {
                for scope in last.scope_metrics() {
                    for m in scope.metrics() {
                        for (attrs, value) in points(m.data()) {
                            if m.name() == "sourceflow.queue.depth" && value == "0" {
                                continue;
                            }
                            println!("  {:<42} {:>10}  {}", m.name(), value, attrs);
                        }
                    }
                }
            }
        }
    }

    fn print_tree(spans: &[SpanData], span: &SpanData, depth: usize) {
        let took = span
            .end_time
            .duration_since(span.start_time)
            .unwrap_or_default();
        let detail: Vec<String> = span
            .attributes
            .iter()
            .filter(|kv| {
                matches!(
                    kv.key.as_str(),
                    "messaging.destination.name"
                        | "sourceflow.wire_name"
                        | "sourceflow.service"
                        | "sourceflow.handler"
                )
            })
            .map(|kv| {
                format!(
                    "{}={}",
                    kv.key.as_str().rsplit('.').next().unwrap_or(""),
                    kv.value
                )
            })
            .collect();
        println!(
            "{:indent$}{} {:.2} ms  {}",
            "",
            span.name,
            took.as_secs_f64() * 1000.0,
            detail.join(" "),
            indent = depth * 2
        );
        let mut children: Vec<&SpanData> = spans
            .iter()
            .filter(|c| {
                c.parent_span_id == span.span_context.span_id()
                    && c.span_context.trace_id() == span.span_context.trace_id()
            })
            .collect();
        children.sort_by_key(|c| c.start_time);
        for c in children {
            print_tree(spans, c, depth + 1);
        }
    }

    fn points(data: &AggregatedMetrics) -> Vec<(String, String)> {
        fn attrs<'a>(it: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> String {
            it.map(|kv| format!("{}={}", kv.key, kv.value))
                .collect::<Vec<_>>()
                .join(" ")
        }
        match data {
            AggregatedMetrics::U64(MetricData::Sum(s)) => s
                .data_points()
                .map(|p| (attrs(p.attributes()), p.value().to_string()))
                .collect(),
            AggregatedMetrics::I64(MetricData::Sum(s)) => s
                .data_points()
                .map(|p| (attrs(p.attributes()), p.value().to_string()))
                .collect(),
            AggregatedMetrics::F64(MetricData::Histogram(h)) => h
                .data_points()
                .map(|p| {
                    (
                        attrs(p.attributes()),
                        format!(
                            "n={} avg={:.3}ms",
                            p.count(),
                            p.sum() / p.count().max(1) as f64 * 1000.0
                        ),
                    )
                })
                .collect(),
            AggregatedMetrics::U64(MetricData::Gauge(g)) => g
                .data_points()
                .map(|p| (attrs(p.attributes()), p.value().to_string()))
                .collect(),
            _ => Vec::new(),
        }
    }
}
