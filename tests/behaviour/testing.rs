//! The test harness itself (`sourceflow::testing`, feature `testing`): when it calls work
//! settled, what its timeout names, and the order of what it records. These run on the
//! embedded broker (`TestApp::start`) under a paused clock, whatever transport the suite
//! runs on; the live harness has its own test in `tests/aws`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::testing::{InFlightState, TestApp, TestError};
use sourceflow::{Message, RetryAfter, RetryPolicy, SendOptions};

use crate::harness::Harness;

/// A service of `module`'s handlers, with backoffs of seconds and no idempotency (which
/// would hide redeliveries).
async fn start(name: &str, module: &'static str) -> TestApp {
    let h = Harness::new().await;
    let builder = h
        .service(name, module)
        .retry(RetryPolicy::exponential(
            Duration::from_secs(2),
            Duration::from_secs(60),
        ))
        .without_idempotency();
    TestApp::start(builder).await.expect("start")
}

mod stuck {
    use super::*;
    use sourceflow::{command, handler};

    #[command(queue = "testing-stuck", name = "testing.Stuck")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Stuck {
        pub id: u32,
    }

    #[handler]
    async fn never_returns(_cmd: Stuck) {
        std::future::pending::<()>().await
    }

    /// A handler that never returns: the timeout names its queue, type, message id and
    /// state, in the error's one-line text too.
    #[tokio::test(start_paused = true)]
    async fn a_timeout_names_the_message_still_in_flight() {
        let app = start("testing-stuck", module_path!())
            .await
            .timeout(Duration::from_secs(5));
        let options = SendOptions::new().message_id("stuck-1");
        let err = app
            .send_with(Stuck { id: 1 }, options)
            .await
            .expect_err("a handler that never returns never settles");
        let TestError::NotSettled { in_flight, waited } = &err else {
            panic!("not a timeout: {err}");
        };
        assert!(*waited >= Duration::from_secs(5));
        assert_eq!(in_flight.len(), 1, "{in_flight:?}");
        let f = &in_flight[0];
        assert_eq!(f.queue, app.handle().queue_of::<Stuck>());
        assert_eq!(f.wire_name.as_deref(), Some(Stuck::NAME));
        assert_eq!(f.message_id.as_deref(), Some("stuck-1"));
        assert!(
            matches!(
                f.state,
                InFlightState::Handling {
                    receive_count: 1,
                    ..
                }
            ),
            "{:?}",
            f.state
        );
        let text = err.to_string();
        assert!(
            text.contains("testing-stuck")
                && text.contains("(message stuck-1) handler running for 5s"),
            "{text}"
        );
    }
}

mod long_handler {
    use super::*;
    use sourceflow::{command, handler};

    #[command(queue = "testing-long", name = "testing.Long")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Long {
        pub id: u32,
    }

    #[handler]
    async fn takes_an_hour(_cmd: Long) {
        tokio::time::sleep(Duration::from_secs(3600)).await
    }

    /// A handler that runs past its lease, which the heartbeat extends (a visibility
    /// change like a retry's), is still named as running, not as a retry.
    #[tokio::test(start_paused = true)]
    async fn a_handler_whose_lease_is_extended_is_named_running() {
        let h = Harness::new().await;
        let builder = h
            .service("testing-long", module_path!())
            .visibility_timeout(Duration::from_secs(10))
            .without_idempotency();
        let app = TestApp::start(builder)
            .await
            .expect("start")
            .timeout(Duration::from_secs(60));
        let err = app.send(Long { id: 1 }).await.expect_err("runs an hour");
        let TestError::NotSettled { in_flight, .. } = &err else {
            panic!("not a timeout: {err}");
        };
        assert_eq!(in_flight.len(), 1, "{in_flight:?}");
        assert!(
            matches!(in_flight[0].state, InFlightState::Handling { .. }),
            "{:?}",
            in_flight[0].state
        );
        assert!(err.to_string().contains("handler running for 60s"), "{err}");
    }
}

mod retry_due {
    use super::*;
    use sourceflow::{command, handler};

    #[command(queue = "testing-retry-due", name = "testing.Later")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Later {
        pub id: u32,
    }

    #[handler]
    async fn asks_for_later(_cmd: Later) -> sourceflow::Result<()> {
        Err(RetryAfter::new(Duration::from_secs(600), "come back in ten minutes").into())
    }

    /// A message waiting out a retry's backoff past the timeout is named as such, with
    /// the time left.
    #[tokio::test(start_paused = true)]
    async fn a_timeout_names_a_delayed_retry() {
        let app = start("testing-retry-due", module_path!())
            .await
            .timeout(Duration::from_secs(60));
        let options = SendOptions::new().message_id("later-1");
        let err = app
            .send_with(Later { id: 1 }, options)
            .await
            .expect_err("never settles");
        let TestError::NotSettled { in_flight, .. } = &err else {
            panic!("not a timeout: {err}");
        };
        assert_eq!(in_flight.len(), 1, "{in_flight:?}");
        let InFlightState::RetryDue { due_in } = in_flight[0].state else {
            panic!("{:?}", in_flight[0].state);
        };
        assert!(
            due_in > Duration::from_secs(500) && due_in <= Duration::from_secs(540),
            "{due_in:?}"
        );
        assert!(
            err.to_string()
                .contains("(message later-1) delayed retry due in"),
            "{err}"
        );
    }
}

mod waits_for_retry {
    use super::*;
    use sourceflow::{command, event, handler, Context, State};

    #[command(queue = "testing-flaky", name = "testing.Flaky")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Flaky {
        pub id: u32,
    }

    #[event(topic = "testing-flaky-done", name = "testing.FlakyDone")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct FlakyDone {
        pub id: u32,
        pub attempt: u32,
    }

    #[derive(Clone, Default)]
    pub struct Attempts(Arc<AtomicU32>);

    #[handler]
    async fn flaky(cmd: Flaky, ctx: &Context, State(a): State<Attempts>) -> sourceflow::Result<()> {
        a.0.fetch_add(1, Ordering::SeqCst);
        if ctx.receive_count() == 1 {
            return Err(RetryAfter::new(Duration::from_secs(20), "not yet").into());
        }
        let attempt = ctx.receive_count();
        ctx.raise(FlakyDone {
            id: cmd.id,
            attempt,
        })
        .await
    }

    /// `send` returns only once the retry, 20 s of backoff later, has run and what it
    /// raised went out.
    #[tokio::test(start_paused = true)]
    async fn send_waits_for_a_delayed_retry() {
        let h = Harness::new().await;
        let attempts = Attempts::default();
        let builder = h
            .service("testing-flaky", module_path!())
            .state(attempts.clone())
            .without_idempotency();
        let app = TestApp::start(builder).await.expect("start");
        let clock = tokio::time::Instant::now();
        app.send(Flaky { id: 1 }).await.expect("settles");
        assert!(clock.elapsed() >= Duration::from_secs(20));
        assert_eq!(attempts.0.load(Ordering::SeqCst), 2);
        let done = app.raised::<FlakyDone>().assert_one();
        assert_eq!((done.id, done.attempt), (1, 2));
    }

    /// A command sent with a delay through the handle (not through the harness) is waited
    /// for by `settled`.
    #[tokio::test(start_paused = true)]
    async fn settled_waits_for_a_delayed_send() {
        let h = Harness::new().await;
        let attempts = Attempts::default();
        let builder = h
            .service("testing-flaky", module_path!())
            .state(attempts.clone())
            .without_idempotency();
        let app = TestApp::start(builder)
            .await
            .expect("start")
            .timeout(Duration::from_secs(300));
        let delayed = SendOptions::new().delay(Duration::from_secs(120));
        app.handle()
            .send_with(Flaky { id: 2 }, delayed)
            .await
            .expect("send");
        let clock = tokio::time::Instant::now();
        app.settled().await.expect("settles");
        assert!(clock.elapsed() >= Duration::from_secs(140));
        assert_eq!(attempts.0.load(Ordering::SeqCst), 2);
        app.raised::<FlakyDone>().assert_one();
    }
}

mod long_delay {
    use super::*;
    use sourceflow::{command, handler, State};

    #[command(queue = "testing-tomorrow", name = "testing.Tomorrow")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Tomorrow {
        pub id: u32,
    }

    #[derive(Clone, Default)]
    pub struct Runs(Arc<AtomicU32>);

    #[handler]
    async fn tomorrow(_cmd: Tomorrow, State(r): State<Runs>) {
        r.0.fetch_add(1, Ordering::SeqCst);
    }

    /// A delay of two days, far past SQS's 15 minutes, runs out at once on a paused clock:
    /// the message is held back again and again on the embedded broker (each time for the
    /// broker's 15 minutes), handled once when due, and recorded as sent once.
    #[tokio::test(start_paused = true)]
    async fn a_delay_of_days_settles_on_a_paused_clock() {
        let h = Harness::new().await;
        let runs = Runs::default();
        let builder = h
            .service("testing-tomorrow", module_path!())
            .state(runs.clone())
            .without_idempotency();
        let app = TestApp::start(builder)
            .await
            .expect("start")
            .timeout(Duration::from_secs(3 * 86_400));
        let clock = tokio::time::Instant::now();
        let two_days = Duration::from_secs(2 * 86_400);
        app.send_with(Tomorrow { id: 1 }, SendOptions::new().delay(two_days))
            .await
            .expect("settles when due");
        assert!(clock.elapsed() >= two_days, "{:?}", clock.elapsed());
        assert_eq!(runs.0.load(Ordering::SeqCst), 1);
        app.sent::<Tomorrow>().assert_one();
    }
}

mod large {
    use super::*;
    use sourceflow::{command, handler, State};

    #[command(queue = "testing-large", name = "testing.Large")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Large {
        pub data: String,
    }

    #[derive(Clone, Default)]
    pub struct Sizes(Arc<std::sync::Mutex<Vec<usize>>>);

    #[handler]
    async fn large(cmd: Large, State(s): State<Sizes>) {
        s.0.lock().expect("sizes").push(cmd.data.len());
    }

    /// The harness runs a service with the claim check on its embedded broker's object
    /// store, and records a stored message with its whole payload.
    #[tokio::test(start_paused = true)]
    async fn a_message_through_the_claim_check_is_recorded_whole() {
        let h = Harness::new().await;
        let sizes = Sizes::default();
        let builder = h
            .service("testing-large", module_path!())
            .state(sizes.clone())
            .claim_check(sourceflow::ClaimCheck::bucket("testing-claims"))
            .without_idempotency();
        let app = TestApp::start(builder).await.expect("start");
        let two_mib = 2 * 1024 * 1024;
        app.send(Large {
            data: "z".repeat(two_mib),
        })
        .await
        .expect("settles");
        assert_eq!(*sizes.0.lock().expect("sizes"), vec![two_mib]);
        assert_eq!(app.sent::<Large>().assert_one().data.len(), two_mib);
    }
}

mod order {
    use super::*;
    use sourceflow::{command, handler, Context};

    #[command(queue = "testing-order-start", name = "testing.Fan")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Fan {
        pub n: u32,
    }

    #[command(queue = "testing-order-a", name = "testing.ToA")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct ToA {
        pub i: u32,
    }

    #[command(queue = "testing-order-b", name = "testing.ToB")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct ToB {
        pub i: u32,
    }

    #[handler]
    async fn fan(cmd: Fan, ctx: &Context) -> sourceflow::Result<()> {
        for i in 0..cmd.n {
            ctx.send(ToA { i }).await?;
            ctx.send(ToB { i: 100 + i }).await?;
        }
        Ok(())
    }

    #[handler]
    async fn to_a(_cmd: ToA) {}

    #[handler]
    async fn to_b(_cmd: ToB) {}

    /// What a handler sends to two queues, interleaved, is recorded in its order at each
    /// destination.
    #[tokio::test(start_paused = true)]
    async fn records_are_in_order_per_destination() {
        let app = start("testing-order", module_path!()).await;
        app.send(Fan { n: 12 }).await.expect("settles");
        let a: Vec<u32> = app.sent::<ToA>().iter().map(|m| m.i).collect();
        let b: Vec<u32> = app.sent::<ToB>().iter().map(|m| m.i).collect();
        assert_eq!(a, (0..12).collect::<Vec<_>>());
        assert_eq!(b, (100..112).collect::<Vec<_>>());
        let history = app.history();
        assert_eq!(history.len(), 25);
        assert_eq!(history[0].wire_name(), Fan::NAME);
        assert!(history[1..].iter().all(|r| r.causation_id().is_some()));
    }
}

/// A message stored in the transactional outbox is work in flight until the relay has sent
/// it and its handler has run.
#[cfg(feature = "sqlite")]
mod outbox {
    use super::*;
    use sourceflow::{command, handler, State};

    #[command(queue = "testing-outbox-mail", name = "testing.OutboxMail")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct OutboxMail {
        pub n: u32,
    }

    #[derive(Clone, Default)]
    pub struct Mailed(Arc<AtomicU32>);

    #[handler]
    async fn mail(_cmd: OutboxMail, State(m): State<Mailed>) {
        m.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Real time: the SQLite driver works on a thread of its own, which a paused clock
    /// would not wait for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settled_waits_for_the_outbox_relay() {
        let path = std::env::temp_dir().join(format!("sourceflow-th-{}.db", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let store = sourceflow::idempotency::SqliteIdempotencyStore::connect(&url)
            .await
            .expect("sqlite");
        let pool = store.pool().clone();
        let h = Harness::new().await;
        let mailed = Mailed::default();
        let builder = h
            .service("testing-outbox", module_path!())
            .sqlite(pool.clone())
            .outbox_relay(sourceflow::outbox::RelaySettings {
                poll_interval: Duration::from_millis(200),
                ..Default::default()
            })
            .state(mailed.clone());
        let app = TestApp::start(builder).await.expect("start");
        let mut tx = pool.begin().await.expect("begin");
        app.handle()
            .outbox()
            .send(&mut tx, OutboxMail { n: 1 })
            .await
            .expect("outbox send");
        tx.commit().await.expect("commit");
        app.settled().await.expect("settles");
        assert_eq!(mailed.0.load(Ordering::SeqCst), 1);
        app.sent::<OutboxMail>().assert_one();
        app.shutdown().await.expect("shutdown");
        let _ = std::fs::remove_file(&path);
    }
}
