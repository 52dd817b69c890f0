//! Handler middleware (`sourceflow::middleware`): tower layers around every handler or the
//! handlers of one type. A layer's rejection is a typed outcome of the delivery core: a
//! `Reject` dead-letters the message with its reason and the handler never runs; a
//! `RetryAfter` or an ordinary error retries it. Layers run in the order added, those for
//! every handler outside those of one type.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::middleware::{self, Next, Request};
use sourceflow::naming::Naming;
use sourceflow::{command, handler, BoxError, Reject, RetryAfter, SendOptions, State};

use crate::harness::{dlq_reason, eventually, Harness};

/// What ran, in order: layers (`name:before`, `name:after:ok|err`) and handlers.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, s: impl Into<String>) {
        self.0.lock().expect("log").push(s.into());
    }
    pub fn all(&self) -> Vec<String> {
        self.0.lock().expect("log").clone()
    }
    pub fn count(&self, s: &str) -> usize {
        self.all().iter().filter(|e| *e == s).count()
    }
    pub fn clear(&self) {
        self.0.lock().expect("log").clear();
    }
}

#[command(queue = "mw-orders", name = "tests.PlaceOrder.mw.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlaceOrder {
    id: u32,
    /// 0 is refused by the validation layer; 99 by the handler itself.
    quantity: u32,
}

#[command(queue = "mw-notes", name = "tests.Note.mw.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Note {
    id: u32,
}

#[handler]
async fn place_order(cmd: PlaceOrder, State(log): State<Log>) -> sourceflow::Result<()> {
    log.push(format!("handler:order:{}", cmd.id));
    if cmd.quantity == 99 {
        return Err(Reject::new("out of stock").into());
    }
    Ok(())
}

#[command(queue = "mw-slow", name = "tests.Slow.mw.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Slow {
    id: u32,
}

/// Slow on its first delivery only.
#[handler]
async fn slow(
    cmd: Slow,
    ctx: &sourceflow::Context,
    State(log): State<Log>,
) -> sourceflow::Result<()> {
    log.push(format!("handler:slow:{}:start", cmd.id));
    if ctx.receive_count() == 1 {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    log.push(format!("handler:slow:{}:done", cmd.id));
    Ok(())
}

#[handler]
async fn note(cmd: Note, State(log): State<Log>) -> sourceflow::Result<()> {
    log.push(format!("handler:note:{}", cmd.id));
    Ok(())
}

fn log_of(req: &Request) -> Log {
    req.context()
        .state::<Log>()
        .cloned()
        .expect("the Log state")
}

/// Refuses an order of nothing.
async fn validate(req: Request, next: Next) -> Result<(), BoxError> {
    if let Some(cmd) = req.message::<PlaceOrder>() {
        if cmd.quantity == 0 {
            return Err(Reject::new("quantity must be at least 1").into());
        }
    }
    next.run(req).await
}

/// Needs `authorization: Bearer good`.
async fn authorise(req: Request, next: Next) -> Result<(), BoxError> {
    match req.header("authorization") {
        Some("Bearer good") => next.run(req).await,
        Some(_) => Err(Reject::new("not authorised: invalid token").into()),
        None => Err(Reject::new("not authorised: no authorization header").into()),
    }
}

type Hook = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// A layer that records `name:before` and `name:after:ok|err` around the rest.
fn recording(
    name: &'static str,
) -> middleware::FromFnLayer<impl Fn(Request, Next) -> Hook + Clone + Send + Sync + 'static> {
    middleware::from_fn(move |req: Request, next: Next| -> Hook {
        Box::pin(async move {
            let log = log_of(&req);
            log.push(format!("{name}:before"));
            let out = next.run(req).await;
            let how = match &out {
                Ok(()) => "ok",
                Err(e) if e.is::<middleware::HandlerFailed>() => "handler-failed",
                Err(_) => "err",
            };
            log.push(format!("{name}:after:{how}"));
            out
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validation_layer_dead_letters_a_malformed_command_and_its_handler_never_runs() {
    let h = Harness::new().await;
    let log = Log::default();
    let app = h
        .service("mw-validate", module_path!())
        .state(log.clone())
        .without_idempotency()
        .max_receive_count(5)
        .layer_for::<PlaceOrder>(middleware::from_fn(validate))
        .start()
        .await
        .expect("start");
    app.send(PlaceOrder { id: 1, quantity: 0 })
        .await
        .expect("send");
    app.send(PlaceOrder { id: 2, quantity: 3 })
        .await
        .expect("send");
    let dlq = Naming::dead_letter(&app.queue_of::<PlaceOrder>());
    let dead = h.drain(&dlq, 1).await;
    assert_eq!(dead.len(), 1, "the malformed command is dead-lettered");
    assert!(dead[0].body.contains(r#""id":1"#), "{}", dead[0].body);
    let reason = dlq_reason(&dead[0]).expect("reason");
    assert!(
        reason.contains("middleware rejected the message before")
            && reason.contains("place_order")
            && reason.contains("quantity must be at least 1"),
        "{reason}"
    );
    eventually("the valid command is handled", || async {
        log.count("handler:order:2") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        log.count("handler:order:1"),
        0,
        "the handler never ran for the rejected command"
    );
    h.assert_empty(&dlq, Duration::from_millis(200)).await;
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_layer_reads_the_authorization_header() {
    let h = Harness::new().await;
    let log = Log::default();
    let app = h
        .service("mw-auth", module_path!())
        .state(log.clone())
        .without_idempotency()
        .layer(middleware::from_fn(authorise))
        .start()
        .await
        .expect("start");
    app.send(Note { id: 1 }).await.expect("send");
    let bad = SendOptions::new().header("authorization", "Bearer bad");
    app.send_with(Note { id: 2 }, bad).await.expect("send");
    let good = SendOptions::new().header("Authorization", "Bearer good");
    app.send_with(Note { id: 3 }, good).await.expect("send");
    let dlq = Naming::dead_letter(&app.queue_of::<Note>());
    let mut dead = h.drain(&dlq, 2).await;
    assert_eq!(dead.len(), 2, "both unauthorised notes are dead-lettered");
    dead.sort_by_key(|m| m.body.contains(r#""id":2"#));
    for m in &dead {
        let reason = dlq_reason(m).expect("reason");
        assert!(
            reason.starts_with("middleware rejected the message before") && reason.contains("note"),
            "dead-lettered at once, as the layer's rejection: {reason}"
        );
    }
    assert!(
        dlq_reason(&dead[0])
            .expect("reason")
            .contains("not authorised: no authorization header"),
        "{:?}",
        dlq_reason(&dead[0])
    );
    assert!(
        dlq_reason(&dead[1])
            .expect("reason")
            .contains("not authorised: invalid token"),
        "{:?}",
        dlq_reason(&dead[1])
    );
    eventually("the authorised note is handled", || async {
        log.count("handler:note:3") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log.count("handler:note:1"), 0);
    assert_eq!(log.count("handler:note:2"), 0);
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_run_in_the_order_added_those_for_every_handler_outside() {
    let h = Harness::new().await;
    let log = Log::default();
    let app = h
        .service("mw-order", module_path!())
        .state(log.clone())
        .without_idempotency()
        .layer(recording("a"))
        .layer_for::<PlaceOrder>(recording("typed"))
        .layer(recording("b"))
        .start()
        .await
        .expect("start");
    app.send(PlaceOrder { id: 1, quantity: 1 })
        .await
        .expect("send");
    eventually("the first order went through the stack", || async {
        log.count("a:after:ok") == 1
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "a:before",
            "b:before",
            "typed:before",
            "handler:order:1",
            "typed:after:ok",
            "b:after:ok",
            "a:after:ok"
        ]
    );
    // The handler's own rejection reaches the layers as `HandlerFailed` and, passed on
    // unchanged, is judged as without middleware.
    log.clear();
    app.send(PlaceOrder {
        id: 2,
        quantity: 99,
    })
    .await
    .expect("send");
    let dlq = Naming::dead_letter(&app.queue_of::<PlaceOrder>());
    let dead = h.drain(&dlq, 1).await;
    let reason = dlq_reason(&dead[0]).expect("reason");
    assert!(
        reason.contains("place_order rejected the message: out of stock")
            && !reason.contains("middleware rejected"),
        "{reason}"
    );
    assert_eq!(
        log.all(),
        [
            "a:before",
            "b:before",
            "typed:before",
            "handler:order:2",
            "typed:after:handler-failed",
            "b:after:handler-failed",
            "a:after:handler-failed"
        ]
    );
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_for_one_type_wraps_only_that_types_handlers() {
    let h = Harness::new().await;
    let log = Log::default();
    let app = h
        .service("mw-typed", module_path!())
        .state(log.clone())
        .without_idempotency()
        .layer_for::<PlaceOrder>(recording("orders"))
        .start()
        .await
        .expect("start");
    app.send(Note { id: 1 }).await.expect("send");
    eventually("the note is handled", || async {
        log.count("handler:note:1") == 1
    })
    .await;
    app.send(PlaceOrder { id: 1, quantity: 1 })
        .await
        .expect("send");
    eventually("the order is handled", || async {
        log.count("orders:after:ok") == 1
    })
    .await;
    assert_eq!(
        log.all(),
        [
            "handler:note:1",
            "orders:before",
            "handler:order:1",
            "orders:after:ok"
        ]
    );
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_layer_from_the_ecosystem_fits_a_timeout_retries_a_slow_handler() {
    let h = Harness::new().await;
    let log = Log::default();
    let app = h
        .service("mw-tower", module_path!())
        .state(log.clone())
        .without_idempotency()
        .max_receive_count(5)
        .layer_for::<Slow>(
            tower::ServiceBuilder::new()
                .layer(recording("outer"))
                .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(
                    200,
                ))),
        )
        .start()
        .await
        .expect("start");
    app.send(Slow { id: 1 }).await.expect("send");
    eventually(
        "the slow handler completed on its second delivery",
        || async { log.count("handler:slow:1:done") == 1 },
    )
    .await;
    assert_eq!(
        log.all(),
        [
            "outer:before",
            "handler:slow:1:start",
            "outer:after:err",
            "outer:before",
            "handler:slow:1:start",
            "handler:slow:1:done",
            "outer:after:ok"
        ],
        "the timeout cut the first run short and the message was retried"
    );
    h.assert_empty(
        &Naming::dead_letter(&app.queue_of::<Slow>()),
        Duration::from_millis(200),
    )
    .await;
    app.shutdown().await.expect("shutdown");
}

/// Refuses the first delivery of each message for a while: an order asks to come back
/// later, a note meets an ordinary error (an authorisation service that is down).
async fn flaky(req: Request, next: Next) -> Result<(), BoxError> {
    let log = log_of(&req);
    log.push(format!("flaky:{}:{}", req.wire_name(), req.receive_count()));
    if req.receive_count() == 1 {
        if req.is::<PlaceOrder>() {
            return Err(RetryAfter::new(Duration::from_millis(300), "rate limited").into());
        }
        return Err(std::io::Error::other("the authorisation service is unavailable").into());
    }
    next.run(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_rejection_is_retried_and_then_handled() {
    let h = Harness::new().await;
    let log = Log::default();
    let app = h
        .service("mw-transient", module_path!())
        .state(log.clone())
        .without_idempotency()
        .max_receive_count(5)
        .layer(middleware::from_fn(flaky))
        .start()
        .await
        .expect("start");
    let started = std::time::Instant::now();
    app.send(PlaceOrder { id: 1, quantity: 1 })
        .await
        .expect("send");
    app.send(Note { id: 1 }).await.expect("send");
    eventually("both are handled on their second delivery", || async {
        log.count("handler:order:1") == 1 && log.count("handler:note:1") == 1
    })
    .await;
    let order = "tests.PlaceOrder.mw.v1";
    let note = "tests.Note.mw.v1";
    assert_eq!(log.count(&format!("flaky:{order}:1")), 1);
    assert_eq!(log.count(&format!("flaky:{order}:2")), 1);
    assert_eq!(log.count(&format!("flaky:{note}:1")), 1);
    assert_eq!(log.count(&format!("flaky:{note}:2")), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(280),
        "the order came back after the delay the layer asked for"
    );
    for q in [app.queue_of::<PlaceOrder>(), app.queue_of::<Note>()] {
        h.assert_empty(&Naming::dead_letter(&q), Duration::from_millis(200))
            .await;
    }
    app.shutdown().await.expect("shutdown");
}

#[cfg(feature = "sqlite")]
mod transactional {
    //! A transactional handler inside layers: its writes commit when the layers pass it,
    //! and a layer's rejection runs nothing (and writes nothing).

    use super::*;
    use sourceflow::Tx;

    #[command(queue = "mw-tx-records", name = "tests.Record.mw.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Record {
        test: String,
        id: u32,
    }

    #[handler]
    async fn record(
        cmd: Record,
        tx: &mut Tx<sqlx::Sqlite>,
        State(log): State<Log>,
    ) -> sourceflow::Result<()> {
        sqlx::query("INSERT INTO mw_tx_effects (test, id) VALUES (?1, ?2)")
            .bind(&cmd.test)
            .bind(cmd.id)
            .execute(&mut **tx)
            .await
            .map_err(sourceflow::Error::other)?;
        log.push(format!("handler:record:{}", cmd.id));
        Ok(())
    }

    async fn odd_only(req: Request, next: Next) -> Result<(), BoxError> {
        match req.message::<Record>() {
            Some(r) if r.id % 2 == 0 => Err(Reject::new("even ids are refused").into()),
            _ => next.run(req).await,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transactional_handler_commits_inside_layers() {
        let h = Harness::new().await;
        let store = crate::harness::fresh_sqlite("mw").await;
        let pool = store.pool().clone();
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS mw_tx_effects (test TEXT NOT NULL, id INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("table");
        let log = Log::default();
        let app = h
            .service("mw-tx", module_path!())
            .sqlite(pool.clone())
            .state(log.clone())
            .layer(recording("audit"))
            .layer_for::<Record>(middleware::from_fn(odd_only))
            .start()
            .await
            .expect("start");
        let test = h.prefix.clone();
        for id in [1, 2] {
            app.send(Record {
                test: test.clone(),
                id,
            })
            .await
            .expect("send");
        }
        let dlq = Naming::dead_letter(&app.queue_of::<Record>());
        let dead = h.drain(&dlq, 1).await;
        assert!(
            dlq_reason(&dead[0])
                .expect("reason")
                .contains("even ids are refused"),
            "{:?}",
            dlq_reason(&dead[0])
        );
        let rows = || async {
            sqlx::query_scalar::<_, i64>("SELECT id FROM mw_tx_effects WHERE test = ?1 ORDER BY id")
                .bind(&test)
                .fetch_all(&pool)
                .await
                .expect("rows")
        };
        eventually("the odd record committed", || async { rows().await == [1] }).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rows().await, [1], "the rejected record wrote nothing");
        assert_eq!(log.count("handler:record:1"), 1);
        assert_eq!(log.count("handler:record:2"), 0);
        assert_eq!(log.count("audit:after:ok"), 1);
        assert_eq!(log.count("audit:after:err"), 1);
        app.shutdown().await.expect("shutdown");
    }
}
