//! What a handler sends or raises goes out only after it returns `Ok`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, Context, State};

use crate::harness::{eventually, Harness};

#[command(queue = "outbox-commands")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reserve {
    sku: u32,
}

#[event(topic = "outbox-events")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reserved {
    sku: u32,
}

#[derive(Clone, Default)]
struct Counts {
    attempts: Arc<AtomicU32>,
    events: Arc<AtomicU32>,
}

#[handler]
async fn reserve(cmd: Reserve, ctx: &Context, State(c): State<Counts>) -> sourceflow::Result<()> {
    c.attempts.fetch_add(1, Ordering::SeqCst);
    ctx.raise(Reserved { sku: cmd.sku }).await?;
    ctx.raise(Reserved {
        sku: cmd.sku + 1000,
    })
    .await?;
    if ctx.receive_count() == 1 {
        // Fails after raising: the events must not be published.
        return Err(sourceflow::Error::other("stock service timed out"));
    }
    Ok(())
}

#[handler]
async fn on_reserved(_evt: Reserved, State(c): State<Counts>) -> sourceflow::Result<()> {
    c.events.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_sends_nothing_and_the_retry_sends_once() {
    let h = Harness::new().await;
    let counts = Counts::default();
    let app = h
        .service("outbox", module_path!())
        .state(counts.clone())
        .start()
        .await
        .expect("start");
    app.send(Reserve { sku: 7 }).await.expect("send");
    eventually("the retry's two events", || async {
        counts.events.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts.attempts.load(Ordering::SeqCst), 2);
    assert_eq!(
        counts.events.load(Ordering::SeqCst),
        2,
        "only the successful attempt's events were published"
    );
    app.shutdown().await.expect("shutdown");
}

// ---- a dispatch that fails after the handler succeeded --------------------------------

mod flaky {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "outbox-flaky-commands")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Ship {
        pub parcel: u32,
    }

    #[event(topic = "outbox-flaky-events")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Shipped {
        pub parcel: u32,
    }

    #[handler]
    async fn ship(cmd: Ship, ctx: &Context, State(c): State<Counts>) -> sourceflow::Result<()> {
        c.attempts.fetch_add(1, Ordering::SeqCst);
        ctx.raise(Shipped { parcel: cmd.parcel }).await
    }

    #[handler]
    async fn shipped(_evt: Shipped, State(c): State<Counts>) -> sourceflow::Result<()> {
        c.events.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dispatch_is_retried_without_running_the_handler_again() {
    let h = Harness::new().await;
    let counts = Counts::default();
    let app = h
        .service("outbox-flaky", flaky::MODULE)
        .transport({
            let t = crate::harness::Faulty::new(h.transport.clone());
            t.fail_publishes.store(1, Ordering::SeqCst);
            t
        })
        .state(counts.clone())
        .start()
        .await
        .expect("start");
    app.send(flaky::Ship { parcel: 1 }).await.expect("send");
    // Promptly: nobody is sending what the failed publish left, so the retry must not wait
    // for a dispatch lease (the claim's, as long as the visibility timeout: 30 s).
    let arrived = eventually("the event arrives after the failed publish", || async {
        counts.events.load(Ordering::SeqCst) >= 1
    });
    tokio::time::timeout(Duration::from_secs(15), arrived)
        .await
        .expect("the retry sent the event without waiting for a lease");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counts.attempts.load(Ordering::SeqCst),
        1,
        "the handler ran once"
    );
    assert_eq!(
        counts.events.load(Ordering::SeqCst),
        1,
        "the event went out once"
    );
    let stats = app.idempotency_stats().expect("stats");
    assert_eq!(stats.duplicates, 1, "the retry was recognised as completed");
    app.shutdown().await.expect("shutdown");
}

mod refused {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "outbox-refused-commands", name = "tests.Pack.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Pack {
        pub parcel: u32,
    }

    #[event(topic = "outbox-refused-events", name = "tests.Packed.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Packed {
        pub parcel: u32,
    }

    #[handler]
    async fn pack(cmd: Pack, ctx: &Context, State(c): State<Counts>) -> sourceflow::Result<()> {
        c.attempts.fetch_add(1, Ordering::SeqCst);
        ctx.raise(Packed { parcel: cmd.parcel }).await
    }
}

/// What a handler raised and the broker refuses can never go out: the message goes to the
/// dead-letter queue with the reason, after one run of the handler (retrying cannot help).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dispatch_dead_letters_the_message_with_the_reason() {
    let h = Harness::new().await;
    let counts = Counts::default();
    let transport = crate::harness::Faulty::new(h.transport.clone());
    transport.refuse_publishes.store(1, Ordering::SeqCst);
    let app = h
        .service("outbox-refused", refused::MODULE)
        .transport(transport)
        .state(counts.clone())
        .start()
        .await
        .expect("start");
    app.send(refused::Pack { parcel: 1 }).await.expect("send");
    let dlq = sourceflow::naming::Naming::dead_letter(&app.queue_of::<refused::Pack>());
    let dead = h.drain(&dlq, 1).await;
    assert_eq!(dead.len(), 1);
    let reason = crate::harness::dlq_reason(&dead[0]).expect("reason");
    assert!(
        reason.contains("were refused") && reason.contains("InvalidParameterValue"),
        "{reason}"
    );
    assert_eq!(
        counts.attempts.load(Ordering::SeqCst),
        1,
        "the handler ran once"
    );
    app.shutdown().await.expect("shutdown");
}

mod mid_dispatch {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "outbox-mid-commands", name = "tests.Book.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Book {
        pub seat: u32,
    }

    #[event(topic = "outbox-mid-events", name = "tests.Booked.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Booked {
        pub seat: u32,
    }

    #[handler]
    async fn book(cmd: Book, ctx: &Context, State(c): State<Counts>) -> sourceflow::Result<()> {
        c.attempts.fetch_add(1, Ordering::SeqCst);
        ctx.raise(Booked { seat: cmd.seat }).await
    }

    /// The same in a transaction that outlasts the visibility timeout (the heartbeat keeps
    /// the message; nothing renews a claim made inside a transaction).
    #[cfg(feature = "sqlite")]
    pub mod slow_tx {
        use super::*;
        use sourceflow::Tx;

        pub const MODULE: &str = module_path!();

        #[command(queue = "outbox-mid-tx-commands", name = "tests.BookInTx.v1")]
        #[derive(Debug, Clone, Serialize, Deserialize)]
        pub struct BookInTx {
            pub seat: u32,
        }

        #[handler]
        async fn book_in_tx(
            cmd: BookInTx,
            _tx: &mut Tx<sqlx::Sqlite>,
            ctx: &Context,
            State(c): State<Counts>,
        ) -> sourceflow::Result<()> {
            c.attempts.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(3)).await;
            ctx.raise(Booked { seat: cmd.seat }).await
        }
    }

    pub mod consumer {
        use super::*;

        pub const MODULE: &str = module_path!();

        #[handler]
        async fn booked(_evt: Booked, State(c): State<Counts>) -> sourceflow::Result<()> {
            c.events.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A duplicate that arrives while the first delivery's event is out but its publish has
    /// not answered yet (so the store still holds the outbox) waits for that dispatch to
    /// end, then is acknowledged as a duplicate: the event goes out once. The consumer runs
    /// without idempotency, so a second copy would be counted.
    pub async fn a_duplicate_waits_for_the_dispatch_in_flight<C: sourceflow::Command + Clone>(
        h: &Harness,
        app: sourceflow::Builder,
        cmd: C,
    ) {
        let seen = Counts::default();
        let consumer = h
            .service("outbox-mid-consumer", consumer::MODULE)
            .without_idempotency()
            .state(seen.clone())
            .start()
            .await
            .expect("consumer");
        let counts = Counts::default();
        let late = crate::harness::Faulty::new(h.transport.clone());
        late.late_publish_ms.store(1_500, Ordering::SeqCst);
        let app = app
            .transport(late.clone())
            .state(counts.clone())
            .start()
            .await
            .expect("start");
        let id = format!("{}-seat-1", h.prefix);
        let send = || {
            app.send_with(
                cmd.clone(),
                sourceflow::SendOptions::new().message_id(id.clone()),
            )
        };
        send().await.expect("send");
        eventually("the event is out", || async {
            seen.events.load(Ordering::SeqCst) >= 1
        })
        .await;
        send().await.expect("the duplicate");
        eventually("the duplicate is recognised", || async {
            app.idempotency_stats().expect("stats").duplicates >= 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            counts.attempts.load(Ordering::SeqCst),
            1,
            "the handler ran once"
        );
        assert_eq!(
            seen.events.load(Ordering::SeqCst),
            1,
            "the duplicate sent the event again while the first dispatch was in flight"
        );
        late.late_publish_ms.store(0, Ordering::SeqCst);
        app.shutdown().await.expect("shutdown");
        consumer.shutdown().await.expect("shutdown");
    }
}

/// On the default (in-memory) store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_mid_dispatch_waits_for_it_in_memory() {
    let h = Harness::new().await;
    let app = h.service("outbox-mid", mid_dispatch::MODULE);
    mid_dispatch::a_duplicate_waits_for_the_dispatch_in_flight(
        &h,
        app,
        mid_dispatch::Book { seat: 1 },
    )
    .await;
}

/// On a durable store, which holds the outbox from the completion until the dispatch ends.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_mid_dispatch_waits_for_it_on_sqlite() {
    let h = Harness::new().await;
    let store = crate::harness::fresh_sqlite("mid-dispatch").await;
    let app = h
        .service("outbox-mid", mid_dispatch::MODULE)
        .idempotency(store);
    mid_dispatch::a_duplicate_waits_for_the_dispatch_in_flight(
        &h,
        app,
        mid_dispatch::Book { seat: 1 },
    )
    .await;
}

/// In a transaction longer than the visibility timeout: the dispatch lease starts at the
/// commit, not at the claim made inside the transaction (whose lease has run out by then).
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_mid_dispatch_waits_for_it_after_a_long_transaction() {
    let h = Harness::new().await;
    let store = crate::harness::fresh_sqlite("mid-dispatch-tx").await;
    let app = h
        .service("outbox-mid-tx", mid_dispatch::slow_tx::MODULE)
        .idempotency(store)
        .visibility_timeout(Duration::from_secs(2));
    let cmd = mid_dispatch::slow_tx::BookInTx { seat: 2 };
    mid_dispatch::a_duplicate_waits_for_the_dispatch_in_flight(&h, app, cmd).await;
}
