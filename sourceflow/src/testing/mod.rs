//! Testing your handlers (feature `testing`): run the real service in a test and wait until
//! everything a message caused has settled, or call one handler directly.
//!
//! - [`TestApp::start`] starts the service the builder describes — the same builder `main`
//!   uses — on an embedded broker of its own. [`TestApp::send`] and [`TestApp::raise`]
//!   return once the message **and everything it caused** has settled: the handlers it
//!   woke, what they sent and raised, their retries with backoff, the dispatch of their
//!   outbox. The runtime's broker calls say when that is (the service's queues hold
//!   nothing, visible, in flight or delayed, and no call is in progress); nothing sleeps.
//!   If work is still in flight after the [timeout](TestApp::timeout), the error names it:
//!   queue, wire name, message id and what it is doing (`handler running for 2s`,
//!   `retry due in 3s`).
//! - [`TestApp::sent`], [`TestApp::raised`], [`TestApp::dead_lettered`] and
//!   [`TestApp::dead_lettered_of`] return what went out, typed, in the order the broker
//!   accepted it, with the dead-letter reasons. They are recorded at the transport
//!   boundary, so what they show is what really went out.
//! - Time: the embedded broker and the listeners wait on `tokio::time`, so under
//!   `#[tokio::test(start_paused = true)]` retries, backoff, visibility timeouts and
//!   delays pass at once (the clock jumps to the next due time whenever everything waits).
//!   Keep a paused clock to services on the in-memory idempotency store: a SQL store's
//!   driver waits on real I/O, during which a paused clock may jump past timeouts.
//! - [`TestContext`] is a [`Context`](crate::Context) for calling one handler as a plain
//!   async function, with the message id, receive count and attributes the test sets; it
//!   keeps what the handler sends and raises.
//! - [`TestApp::start_live`] runs the same test against the AWS API (an emulator at
//!   `AWS_ENDPOINT_URL`, or AWS).
//!
//! Turn the feature on for tests only:
//!
//! ```toml
//! [dev-dependencies]
//! sourceflow = { version = "0.1", features = ["testing"] }
//! ```
//!
//! A whole flow, a permanent rejection and a retry with backoff, as a service's own test
//! would write them:
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use sourceflow::testing::{TestApp, TestContext};
//! use sourceflow::{command, event, handler, Context, Reject, RetryPolicy, State};
//!
//! #[command(queue = "doc-testing-orders")]
//! #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
//! pub struct PlaceOrder { pub order_id: u64, pub cents: u64 }
//!
//! #[event(topic = "doc-testing-order-events")]
//! #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
//! pub struct OrderPlaced { pub order_id: u64, pub cents: u64 }
//!
//! #[command(queue = "doc-testing-payments")]
//! #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
//! pub struct Charge { pub order_id: u64, pub cents: u64 }
//!
//! /// A card network that is down for its first `outages` calls.
//! #[derive(Clone, Default)]
//! pub struct Gateway { outages: Arc<AtomicU32> }
//!
//! #[handler]
//! async fn place_order(cmd: PlaceOrder, ctx: &Context) -> sourceflow::Result<()> {
//!     ctx.raise(OrderPlaced { order_id: cmd.order_id, cents: cmd.cents }).await
//! }
//!
//! #[handler]
//! async fn request_charge(evt: OrderPlaced, ctx: &Context) -> sourceflow::Result<()> {
//!     ctx.send(Charge { order_id: evt.order_id, cents: evt.cents }).await
//! }
//!
//! #[handler]
//! async fn charge(cmd: Charge, State(gateway): State<Gateway>) -> sourceflow::Result<()> {
//!     if cmd.cents > 100_000 {
//!         return Err(Reject::new("over the card limit").into());
//!     }
//!     let down = gateway.outages.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
//!     if down.is_ok() {
//!         return Err(sourceflow::Error::Other("card network unavailable".into()));
//!     }
//!     Ok(())
//! }
//!
//! // In a test: #[tokio::test(start_paused = true)]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), sourceflow::testing::TestError> {
//! let gateway = Gateway::default();
//! let app = TestApp::start(
//!     sourceflow::builder()
//!         .service("orders")
//!         .state(gateway.clone())
//!         .retry(RetryPolicy::exponential(Duration::from_secs(2), Duration::from_secs(60))),
//! )
//! .await?;
//!
//! // The whole flow has settled when `send` returns.
//! app.send(PlaceOrder { order_id: 1, cents: 2_500 }).await?;
//! assert_eq!(app.raised::<OrderPlaced>().assert_one(), OrderPlaced { order_id: 1, cents: 2_500 });
//! assert_eq!(app.sent::<Charge>().assert_one(), Charge { order_id: 1, cents: 2_500 });
//!
//! // A permanent rejection goes to the dead-letter queue with its reason.
//! app.send(PlaceOrder { order_id: 2, cents: 250_000 }).await?;
//! let rejected = app.dead_lettered_of::<Charge>().assert_one();
//! assert_eq!(rejected.message.order_id, 2);
//! assert!(rejected.reason.ends_with("charge rejected the message: over the card limit"));
//!
//! // Two failures, retried after seconds of backoff: instant under a paused clock.
//! gateway.outages.store(2, Ordering::SeqCst);
//! let wall = std::time::Instant::now();
//! app.send(Charge { order_id: 3, cents: 100 }).await?;
//! assert!(wall.elapsed() < Duration::from_secs(1));
//! assert_eq!(app.dead_lettered().len(), 1);
//!
//! // One handler, called as a plain async fn with a context whose metadata you set.
//! let ctx = TestContext::new().message_id("m-1").receive_count(2).attribute("tenant", "t1");
//! place_order(PlaceOrder { order_id: 7, cents: 100 }, &ctx).await?;
//! assert_eq!(ctx.raised::<OrderPlaced>().assert_one().order_id, 7);
//! # Ok(())
//! # }
//! ```

mod app;
mod context;
mod messages;
mod recorder;

use std::time::Duration;

pub use app::{TestApp, DEFAULT_QUIET_PERIOD, DEFAULT_SETTLE_TIMEOUT};
pub use context::TestContext;
pub use messages::{DeadLetter, DeadLettered, Messages, Recorded};

tokio::task_local! {
    /// Set in the listeners' heartbeat task: its `change_visibility` calls extend the lease
    /// of a message a handler still runs, and are no retry.
    pub(crate) static LEASE_EXTENSION: ();
}

/// What can go wrong in a [`TestApp`].
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The work did not settle in time; `in_flight` says what is left.
    #[error("not settled after {waited:?}: {}", list(in_flight))]
    NotSettled {
        /// How long it waited.
        waited: Duration,
        /// What is still in flight.
        in_flight: Vec<InFlight>,
    },
    /// Starting, sending or shutting down failed.
    #[error(transparent)]
    Sourceflow(#[from] crate::Error),
}

fn list(in_flight: &[InFlight]) -> String {
    match in_flight.is_empty() {
        true => "nothing recorded in flight (a broker call was in progress)".into(),
        false => in_flight
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// One thing still in flight when a [`TestApp`] gave up waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The queue it is on (or what holds it).
    pub queue: String,
    /// Its wire name, when known.
    pub wire_name: Option<String>,
    /// Its message id, when known.
    pub message_id: Option<String>,
    /// What it is doing.
    pub state: InFlightState,
}

/// What an [`InFlight`] message is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InFlightState {
    /// Visible, waiting to be received.
    Waiting,
    /// Sent with a delay; visible in `due_in`.
    Delayed {
        /// Until it is visible.
        due_in: Duration,
    },
    /// Received: a handler has had it for `for_`.
    Handling {
        /// Since it was received.
        for_: Duration,
        /// Which delivery it is.
        receive_count: u32,
    },
    /// A failed attempt, waiting out its backoff: delivered again in `due_in`.
    RetryDue {
        /// Until it comes back.
        due_in: Duration,
    },
    /// Messages the broker counts on the queue that the harness saw no send of.
    Counted {
        /// Visible.
        visible: usize,
        /// Received and not yet settled.
        in_flight: usize,
        /// Delayed.
        delayed: usize,
    },
    /// Messages in the transactional outbox, not yet relayed.
    Outbox {
        /// How many.
        messages: u64,
    },
}

impl std::fmt::Display for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.queue)?;
        if let Some(w) = &self.wire_name {
            write!(f, " {w}")?;
        }
        if let Some(id) = &self.message_id {
            write!(f, " (message {id})")?;
        }
        match &self.state {
            InFlightState::Waiting => write!(f, " waiting to be received"),
            InFlightState::Delayed { due_in } => {
                write!(f, " delayed, visible in {}", secs(*due_in))
            }
            InFlightState::Handling {
                for_,
                receive_count,
            } => write!(
                f,
                " handler running for {} (delivery {receive_count})",
                secs(*for_)
            ),
            InFlightState::RetryDue { due_in } => {
                write!(f, " delayed retry due in {}", secs(*due_in))
            }
            InFlightState::Counted {
                visible,
                in_flight,
                delayed,
            } => write!(
                f,
                " {visible} visible, {in_flight} in flight, {delayed} delayed"
            ),
            InFlightState::Outbox { messages } => write!(f, " {messages} message(s) to relay"),
        }
    }
}

/// A duration for a person: `3s`, `1.5s`, `250ms`.
fn secs(d: Duration) -> String {
    match d.as_millis() {
        ms if ms < 1_000 => format!("{ms}ms"),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{:.1}s", ms as f64 / 1_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(state: InFlightState) -> InFlight {
        InFlight {
            queue: "payments".into(),
            wire_name: Some("payments.ProcessPayment.v1".into()),
            message_id: Some("m-1".into()),
            state,
        }
    }

    /// The timeout's one line names each message: queue, type, id, and what it is doing.
    #[test]
    fn a_timeout_reads_in_one_line() {
        let err = TestError::NotSettled {
            waited: Duration::from_secs(10),
            in_flight: vec![
                in_flight(InFlightState::RetryDue {
                    due_in: Duration::from_millis(3_000),
                }),
                in_flight(InFlightState::Handling {
                    for_: Duration::from_millis(1_500),
                    receive_count: 2,
                }),
            ],
        };
        assert_eq!(
            err.to_string(),
            "not settled after 10s: payments: payments.ProcessPayment.v1 (message m-1) delayed retry due in 3s; \
             payments: payments.ProcessPayment.v1 (message m-1) handler running for 1.5s (delivery 2)"
        );
    }

    #[test]
    fn counts_and_delays_read_as_such() {
        let counted = InFlight {
            queue: "orders.fifo".into(),
            wire_name: None,
            message_id: None,
            state: InFlightState::Counted {
                visible: 1,
                in_flight: 2,
                delayed: 0,
            },
        };
        assert_eq!(
            counted.to_string(),
            "orders.fifo: 1 visible, 2 in flight, 0 delayed"
        );
        let delayed = in_flight(InFlightState::Delayed {
            due_in: Duration::from_millis(250),
        });
        assert!(delayed.to_string().ends_with("delayed, visible in 250ms"));
    }
}
