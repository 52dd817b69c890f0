//! The orders example's own tests, written only with `sourceflow::testing`, as a service's
//! tests would be: the service is the example's own (`orders::service`, the builder its
//! `main` runs), on an embedded broker of each test's own.
//!
//! ```text
//! cargo test -p sourceflow --features testing --test orders
//! ```

#[path = "../../examples/orders.rs"]
#[allow(dead_code)]
mod orders;

use std::time::Duration;

use orders::{
    CreateOrder, Gateway, OrderCreated, PaymentProcessed, ProcessPayment, Projection,
    CARD_LIMIT_CENTS,
};
use sourceflow::testing::{TestApp, TestContext, TestError};
use sourceflow::{RetryPolicy, State};

fn order(order_id: u64, amount_cents: u64) -> CreateOrder {
    CreateOrder {
        order_id,
        customer: "ada".into(),
        amount_cents,
        card_number: "4111 1111 1111 1111".into(),
    }
}

/// The example's service, with the retry backoff of a real deployment (seconds).
async fn start(projection: &Projection, gateway: &Gateway) -> Result<TestApp, TestError> {
    TestApp::start(
        orders::service(projection.clone(), gateway.clone())
            .service("orders")
            .retry(RetryPolicy::exponential(
                Duration::from_secs(2),
                Duration::from_secs(60),
            )),
    )
    .await
}

/// `send` returns once the whole flow has settled: the read model shows the order paid,
/// and exactly the expected messages went out, with no sleep anywhere.
#[tokio::test]
async fn an_order_flows_through_to_the_read_model() -> Result<(), TestError> {
    let (projection, gateway) = (Projection::default(), Gateway::default());
    let app = start(&projection, &gateway).await?;

    let id = app.send(order(1, 1_250)).await?;

    let view = projection.order(1).await.expect("the order is in the view");
    assert!(view.paid, "settled means the payment was projected too");
    let created = app.raised::<OrderCreated>().assert_one();
    assert_eq!(
        (
            created.order_id,
            created.customer.as_str(),
            created.amount_cents
        ),
        (1, "ada", 1_250)
    );
    let payment = app.sent::<ProcessPayment>().assert_one();
    assert_eq!((payment.order_id, payment.amount_cents), (1, 1_250));
    let paid = app.raised::<PaymentProcessed>().assert_one();
    assert_eq!((paid.order_id, paid.amount_cents), (1, 1_250));
    // The command went out encrypted; the harness reads it back.
    let sent = app.sent::<CreateOrder>().assert_one();
    assert_eq!(sent.card_number, "4111 1111 1111 1111");
    // One conversation: everything carries the command's id as its correlation id.
    let history = app.history();
    assert_eq!(history.len(), 4);
    assert!(history[1..]
        .iter()
        .all(|r| r.correlation_id() == Some(id.as_str())));
    assert!(app.dead_lettered().is_empty());
    Ok(())
}

/// A payment over the card limit is rejected for good: dead-lettered at once with its
/// reason, never retried, and nothing is raised for it.
#[tokio::test]
async fn a_payment_over_the_limit_is_dead_lettered_with_its_reason() -> Result<(), TestError> {
    let (projection, gateway) = (Projection::default(), Gateway::default());
    let app = start(&projection, &gateway).await?;

    app.send(order(2, CARD_LIMIT_CENTS + 1)).await?;

    let rejected = app.dead_lettered_of::<ProcessPayment>().assert_one();
    assert_eq!(rejected.message.order_id, 2);
    // The reason names the handler, then gives the rejection's own.
    assert!(
        rejected.reason.ends_with(
            "process_payment rejected the message: amount over the card limit of $10000.00"
        ),
        "{}",
        rejected.reason
    );
    let dead = &app.dead_lettered()[0];
    assert_eq!(dead.receive_count(), 1, "a rejection is not retried");
    assert_eq!(dead.queue(), app.handle().queue_of::<ProcessPayment>());
    app.raised::<PaymentProcessed>().assert_none();
    let view = projection.order(2).await.expect("the order is in the view");
    assert!(!view.paid);
    Ok(())
}

/// An outage of the card network: two failed charges, retried after backoffs of seconds,
/// then the payment goes through. Under a paused clock that takes no wall time.
#[tokio::test(start_paused = true)]
async fn a_retry_with_backoff_completes_at_once_under_paused_time() -> Result<(), TestError> {
    let (projection, gateway) = (Projection::default(), Gateway::default());
    let app = start(&projection, &gateway).await?;
    gateway.fail_next(2);

    let (wall, clock) = (std::time::Instant::now(), tokio::time::Instant::now());
    app.send(order(3, 500)).await?;

    // Backoffs of 1-2 s then 2-4 s (jittered) passed on the paused clock...
    assert!(
        clock.elapsed() >= Duration::from_secs(3),
        "{:?}",
        clock.elapsed()
    );
    // ...and took no wall time.
    assert!(
        wall.elapsed() < Duration::from_secs(1),
        "{:?}",
        wall.elapsed()
    );
    app.raised::<PaymentProcessed>().assert_one();
    assert!(projection.order(3).await.expect("in the view").paid);
    assert!(app.dead_lettered().is_empty());
    Ok(())
}

/// One handler called directly, as a plain async function.
#[tokio::test]
async fn process_payment_called_directly() -> sourceflow::Result<()> {
    let gateway = Gateway::default();
    let ctx = TestContext::for_message::<ProcessPayment>()
        .message_id("m-1")
        .receive_count(2);
    let cmd = ProcessPayment {
        order_id: 4,
        amount_cents: 900,
    };
    orders::process_payment(cmd, &ctx, State(gateway.clone())).await?;
    let paid = ctx.raised::<PaymentProcessed>().assert_one();
    assert_eq!((paid.order_id, paid.amount_cents), (4, 900));

    // Over the limit: a rejection, and nothing raised.
    let ctx = TestContext::new();
    let cmd = ProcessPayment {
        order_id: 5,
        amount_cents: CARD_LIMIT_CENTS + 1,
    };
    let err = orders::process_payment(cmd, &ctx, State(gateway))
        .await
        .expect_err("rejected");
    assert!(err.to_string().contains("card limit"), "{err}");
    ctx.raised::<PaymentProcessed>().assert_none();
    Ok(())
}

/// `create_order` raises `OrderCreated` for its command.
#[tokio::test]
async fn create_order_called_directly() -> sourceflow::Result<()> {
    let ctx = TestContext::for_message::<CreateOrder>();
    orders::create_order(order(6, 700), &ctx).await?;
    let created = ctx.raised::<OrderCreated>().assert_one();
    assert_eq!((created.order_id, created.amount_cents), (6, 700));
    ctx.sent::<ProcessPayment>().assert_none();
    Ok(())
}
