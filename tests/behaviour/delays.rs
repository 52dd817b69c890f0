//! Delays of any length (`sourceflow::schedule`): a message due later than the broker can
//! delay it, and an event with any delay, is held back by the receiving listener until due
//! — delivered once, never early, with its message id unchanged. The broker's cap is
//! lowered to 2 s (`native_delay_cap`, test only) so that the hold-back loop runs in
//! seconds; idempotency is off, so that a second delivery would be seen.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use serde::{Deserialize, Serialize};
use sourceflow::{command, event, Builder, Error, SendOptions};

use crate::harness::{counter, eventually, Harness};

const CAP: Duration = Duration::from_secs(2);

#[command(queue = "delays-reminders", name = "tests.Remind.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Remind {
    pub n: u32,
}

#[event(topic = "delays-events", name = "tests.Expired.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expired {
    pub n: u32,
}

#[command(queue = "delays-ordered.fifo", name = "tests.DelayOrdered.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ordered {
    #[entity_id]
    pub id: u32,
}

#[event(
    topic = "delays-ordered-events.fifo",
    name = "tests.DelayOrderedEvent.v1"
)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderedEvent {
    #[entity_id]
    pub id: u32,
}

/// One delivery a handler saw: which handler, payload number, message id, when.
type Delivery = (&'static str, u32, String, Instant);

/// What the handlers saw.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<Delivery>>>);

impl Seen {
    fn all(&self) -> Vec<Delivery> {
        self.0.lock().expect("seen").clone()
    }
    fn push(&self, who: &'static str, n: u32, id: &str) {
        let at = Instant::now();
        self.0
            .lock()
            .expect("seen")
            .push((who, n, id.to_string(), at));
    }
}

mod reminders {
    use super::{Expired, Remind, Seen};
    use sourceflow::{handler, Context, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn remind(cmd: Remind, ctx: &Context, State(s): State<Seen>) -> sourceflow::Result<()> {
        s.push("remind", cmd.n, ctx.message_id());
        Ok(())
    }

    #[handler]
    async fn on_expired_here(evt: Expired, ctx: &Context, State(s): State<Seen>) {
        s.push("reminders", evt.n, ctx.message_id());
    }
}

mod audit {
    use super::{Expired, Seen};
    use sourceflow::{handler, Context, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn on_expired_there(evt: Expired, ctx: &Context, State(s): State<Seen>) {
        s.push("audit", evt.n, ctx.message_id());
    }
}

mod fifo {
    use super::{Ordered, OrderedEvent};
    use sourceflow::handler;

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn ordered(_cmd: Ordered) {}

    #[handler]
    async fn ordered_event(_evt: OrderedEvent) {}
}

/// A service of `module`'s handlers, holding delays back at most [`CAP`] a time, with a
/// short visibility timeout (a copy held back but not deleted would come back within the
/// tests' wait).
fn service(h: &Harness, name: &str, module: &'static str, seen: &Seen) -> Builder {
    h.service(name, module)
        .state(seen.clone())
        .visibility_timeout(Duration::from_secs(3))
        .native_delay_cap(CAP)
        .without_idempotency()
}

/// Hold-backs counted on `queue` (`sourceflow.message.processed`, outcome `redelayed`).
fn redelays(exporter: &InMemoryMetricExporter, provider: &SdkMeterProvider, queue: &str) -> u64 {
    provider.force_flush().expect("flush");
    counter(
        exporter,
        "sourceflow.message.processed",
        &[
            ("messaging.destination.name", queue),
            ("sourceflow.outcome", "redelayed"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_due_past_the_brokers_limit_arrives_once_when_due_with_its_id() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let app = service(&h, "delays-cmd", reminders::MODULE, &seen)
        .meter_provider(&provider)
        .start()
        .await
        .expect("start");
    let delay = Duration::from_secs(10);
    let sent = Instant::now();
    let id = app
        .send_with(Remind { n: 1 }, SendOptions::new().delay(delay))
        .await
        .expect("a 10 s delay past a 2 s cap is accepted");
    eventually("the reminder, when due", || async {
        seen.all().iter().any(|s| s.0 == "remind")
    })
    .await;
    // Two more broker delays' worth: a second copy would have arrived by then.
    tokio::time::sleep(CAP + Duration::from_millis(1500)).await;
    let got: Vec<_> = seen.all().into_iter().filter(|s| s.0 == "remind").collect();
    assert_eq!(got.len(), 1, "delivered once: {got:?}");
    let (_, n, got_id, at) = &got[0];
    assert_eq!(
        (*n, got_id.as_str()),
        (1, id.as_str()),
        "same message, same id"
    );
    let after = at.duration_since(sent);
    assert!(after >= delay, "delivered early, after {after:?}");
    let queue = app.queue_of::<Remind>();
    let held = redelays(&exporter, &provider, &queue);
    assert!(
        held >= 3,
        "held back {held} times on the way (10 s at most 2 s a time)"
    );
    h.assert_empty(&queue, Duration::from_millis(300)).await;
    // Every copy held back was deleted: none is left in flight either (it would come back
    // after the visibility timeout and be delivered again).
    let transport = app.transport();
    eventually("no copy left on the queue", || async {
        let depth = transport.queue_depth(&queue).await.expect("depth");
        depth.is_some_and(|d| d.total() == 0)
    })
    .await;
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_event_is_held_back_on_each_subscriber_queue() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let a = service(&h, "delays-a", reminders::MODULE, &seen)
        .start()
        .await
        .expect("start a");
    let b = service(&h, "delays-b", audit::MODULE, &seen)
        .start()
        .await
        .expect("start b");
    // Within the broker's cap, still held back by sourceflow: SNS takes no delay at all.
    let delay = Duration::from_secs(4);
    let sent = Instant::now();
    let id = a
        .raise_with(Expired { n: 7 }, SendOptions::new().delay(delay))
        .await
        .expect("an event with a delay is accepted");
    eventually("both subscribers", || async {
        let all = seen.all();
        ["reminders", "audit"]
            .iter()
            .all(|who| all.iter().any(|s| s.0 == *who))
    })
    .await;
    tokio::time::sleep(CAP + Duration::from_millis(1500)).await;
    let all = seen.all();
    for who in ["reminders", "audit"] {
        let got: Vec<_> = all.iter().filter(|s| s.0 == who).collect();
        assert_eq!(got.len(), 1, "{who} got it once: {got:?}");
        assert_eq!((got[0].1, got[0].2.as_str()), (7, id.as_str()), "{who}");
        let after = got[0].3.duration_since(sent);
        assert!(after >= delay, "{who} got it early, after {after:?}");
    }
    a.shutdown().await.expect("shutdown a");
    b.shutdown().await.expect("shutdown b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_at_holds_a_command_back_until_that_time() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let app = service(&h, "delays-at", reminders::MODULE, &seen)
        .start()
        .await
        .expect("start");
    let at = SystemTime::now() + Duration::from_secs(5);
    app.send_with(Remind { n: 2 }, SendOptions::new().deliver_at(at))
        .await
        .expect("send");
    eventually("the reminder", || async {
        seen.all().iter().any(|s| s.0 == "remind")
    })
    .await;
    let arrived = SystemTime::now();
    assert!(
        arrived >= at,
        "delivered {:?} early",
        at.duration_since(arrived)
    );
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_to_a_fifo_destination_is_refused_at_the_call() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let app = service(&h, "delays-fifo", fifo::MODULE, &seen)
        .start()
        .await
        .expect("start");
    let delay = SendOptions::new().delay(Duration::from_secs(1));
    let err = app
        .send_with(Ordered { id: 1 }, delay.clone())
        .await
        .expect_err("a FIFO queue takes no per-message delay");
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("FIFO queue") && m.contains("per-message delay")),
        "{err}"
    );
    let err = app
        .raise_with(OrderedEvent { id: 1 }, delay)
        .await
        .expect_err("a FIFO topic takes no per-message delay");
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("FIFO topic")),
        "{err}"
    );
    h.assert_empty(&app.queue_of::<Ordered>(), Duration::from_millis(300))
        .await;
    app.shutdown().await.expect("shutdown");
}
