//! The payments handlers of the orders example (`examples/orders.rs`, included as a module:
//! the same types and handlers, not a copy) as an AWS Lambda function fed by an SQS event
//! source mapping on the `payments` queue.
//!
//! ```text
//! cargo lambda watch -p sourceflow --features lambda --example orders_lambda   # local runtime API
//! cargo lambda invoke orders_lambda --data-file batch.json                     # a batch of records
//! cargo lambda build -p sourceflow --features lambda --example orders_lambda --release --arm64
//! ```
//!
//! Configured from the environment like any sourceflow service (`SOURCEFLOW_PREFIX`,
//! `SOURCEFLOW_IDEMPOTENCY`, …); no provisioning call unless `SOURCEFLOW_PROVISION` asks.
//! `ORDERS_LAMBDA_OUTAGES=n` fails the first `n` charges, as an outage of the card network
//! would (for trying partial batch responses out).

#[path = "orders.rs"]
#[allow(dead_code)]
mod orders;

#[tokio::main]
async fn main() -> Result<(), sourceflow::lambda::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sourceflow=info".into()),
        )
        .with_ansi(false)
        .without_time()
        .init();
    let gateway = orders::Gateway::default();
    if let Some(n) = std::env::var("ORDERS_LAMBDA_OUTAGES")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        gateway.fail_next(n);
    }
    let payments = orders::service(orders::Projection::default(), gateway)
        .service("payments")
        .handlers(|h| h.destination == "payments");
    sourceflow::lambda::run_with(payments).await
}
