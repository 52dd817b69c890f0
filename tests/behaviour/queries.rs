//! Queries: answered in process by their one handler, with `State<T>`, from a handle and
//! from inside a handler; errors, panics and a missing handler are typed errors; queries
//! are traced and counted, and nothing is provisioned for them.
//!
//! Two handlers for one query type are a startup error: that binary-wide case lives in
//! `tests/startup_checks.rs`, which links deliberately inconsistent routes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use serde::{Deserialize, Serialize};
use sourceflow::{command, handler, query, Builder, Context, Error, State};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::harness::{counter, eventually, recordings, telemetry, Harness};

/// A service of `h` running the message and query handlers of `module` only.
fn service(h: &Harness, name: &str, module: &'static str) -> Builder {
    h.service(name, module)
        .query_handlers(move |q| q.module_path == module)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    pub account: u64,
    pub cents: i64,
}

/// The read model the query handlers answer from.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<HashMap<u64, i64>>>);

impl Ledger {
    fn set(&self, account: u64, cents: i64) {
        self.0.lock().expect("ledger").insert(account, cents);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("account {0} is closed")]
pub struct AccountClosed(pub u64);

#[query(response = Balance, name = "tests.GetBalance")]
pub struct GetBalance {
    pub account: u64,
}

/// Declared, but no handler answers it anywhere in this binary.
#[query(response = u64)]
pub struct Unanswered;

// ---- state, answers, errors --------------------------------------------------------

mod answers {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[handler]
    async fn get_balance(
        q: GetBalance,
        State(ledger): State<Ledger>,
    ) -> Result<Balance, AccountClosed> {
        match ledger.0.lock().expect("ledger").get(&q.account) {
            Some(cents) => Ok(Balance {
                account: q.account,
                cents: *cents,
            }),
            None => Err(AccountClosed(q.account)),
        }
    }

    #[query(response = String)]
    pub struct Explode;

    #[handler]
    async fn explode(_q: Explode) -> sourceflow::Result<String> {
        panic!("the read model is corrupt")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_is_answered_in_process_with_state_and_provisions_nothing() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    ledger.set(1, 1_250);
    let app = service(&h, "queries", answers::MODULE)
        .state(ledger.clone())
        .start()
        .await
        .expect("start");

    let balance = app.query(GetBalance { account: 1 }).await.expect("answer");
    assert_eq!(
        balance,
        Balance {
            account: 1,
            cents: 1_250
        }
    );
    // The handler reads the state as it is now: a query is not cached or queued.
    ledger.set(1, -5);
    let balance = app.query(GetBalance { account: 1 }).await.expect("answer");
    assert_eq!(balance.cents, -5);

    // Nothing travels: the query handler adds no queue, topic, subscription or listener to
    // what a service with no handler at all needs (the send-only queues of the binary's
    // commands).
    let bare = h
        .service("queries", answers::MODULE)
        .handlers(|_| false)
        .plan()
        .await
        .expect("plan without handlers");
    let plan = service(&h, "queries", answers::MODULE)
        .state(ledger.clone())
        .plan()
        .await
        .expect("plan");
    let names = |t: &sourceflow::topology::Topology| {
        let mut n: Vec<String> = t.queues.iter().map(|q| q.name.clone()).collect();
        n.extend(t.topics.iter().map(|t| t.name.clone()));
        n.extend(t.subscriptions.iter().map(|s| format!("{s:?}")));
        n
    };
    assert_eq!(names(app.topology()), names(&bare.topology));
    assert_eq!(names(&plan.topology), names(&bare.topology));
    assert!(
        app.topology()
            .queues
            .iter()
            .all(|q| q.ownership == sourceflow::topology::Ownership::SendOnly),
        "{:?}",
        app.topology()
    );
    assert!(plan.listeners.is_empty(), "{:?}", plan.listeners);
    app.shutdown().await.expect("shutdown");
    // A query only reads: it is answered after shutdown too, unlike a send.
    assert_eq!(
        app.query(GetBalance { account: 1 })
            .await
            .expect("answer after shutdown")
            .cents,
        -5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_panicking_query_handler_is_an_error_of_the_call() {
    let h = Harness::new().await;
    let app = service(&h, "queries", answers::MODULE)
        .state(Ledger::default())
        .start()
        .await
        .expect("start");

    let err = app
        .query(GetBalance { account: 9 })
        .await
        .expect_err("account 9 is not in the ledger");
    assert_eq!(err.to_string(), "account 9 is closed");
    let Error::Other(source) = &err else {
        panic!("a user error is Error::Other, got {err:?}");
    };
    assert!(
        matches!(
            source.downcast_ref::<AccountClosed>(),
            Some(AccountClosed(9))
        ),
        "the handler's own error type comes back: {source:?}"
    );

    let err = app
        .query(answers::Explode)
        .await
        .expect_err("the handler panics");
    let Error::QueryPanicked {
        query,
        handler,
        message,
    } = &err
    else {
        panic!("expected QueryPanicked, got {err:?}");
    };
    assert_eq!(*query, "Explode");
    assert!(handler.ends_with("answers::explode"), "{handler}");
    assert_eq!(message, "the read model is corrupt");
    // The service keeps answering.
    assert!(app.query(GetBalance { account: 9 }).await.is_err());
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_no_handler_of_the_service_answers_is_a_typed_error() {
    let h = Harness::new().await;
    let app = service(&h, "queries", answers::MODULE)
        .state(Ledger::default())
        .start()
        .await
        .expect("start");
    let err = app.query(Unanswered).await.expect_err("nobody answers");
    assert!(
        matches!(err, Error::NoQueryHandler("Unanswered")),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("no handler answers the query `Unanswered` in this service"),
        "{err}"
    );
    app.shutdown().await.expect("shutdown");

    // `handlers_in` selects query handlers by the same module prefix as message handlers.
    let ledger = Ledger::default();
    ledger.set(1, 10);
    let app = h
        .service("queries", answers::MODULE)
        .handlers_in(answers::MODULE)
        .state(ledger)
        .start()
        .await
        .expect("start");
    assert_eq!(
        app.query(GetBalance { account: 1 })
            .await
            .expect("answered by the selected module's handler")
            .cents,
        10
    );
    assert!(matches!(
        app.query(asking::Available { account: 1 }).await,
        Err(Error::NoQueryHandler("Available"))
    ));
    app.shutdown().await.expect("shutdown");

    // A handler exists in the binary, but this service's selection leaves it out: a
    // `handlers(..)` predicate sees message handlers only.
    let app = h
        .service("queries", answers::MODULE)
        .start()
        .await
        .expect("start without the query handlers (and without their state)");
    let err = app
        .query(GetBalance { account: 1 })
        .await
        .expect_err("left out");
    assert!(
        matches!(err, Error::NoQueryHandler("tests.GetBalance")),
        "{err:?}"
    );
    app.shutdown().await.expect("shutdown");
}

mod needs_state {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[derive(Clone)]
    pub struct Warehouse;

    #[query(response = u32)]
    pub struct StockOf {
        pub sku: u64,
    }

    #[handler]
    async fn stock_of(q: StockOf, _w: State<Warehouse>) -> sourceflow::Result<u32> {
        Ok(u32::try_from(q.sku).unwrap_or(0) + 2)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_handler_without_its_state_is_a_startup_error() {
    let h = Harness::new().await;
    for planned in [false, true] {
        let builder = service(&h, "queries", needs_state::MODULE);
        let err = match planned {
            true => builder.plan().await.map(|_| ()),
            false => builder.start().await.map(|_| ()),
        }
        .expect_err("the state is missing");
        let Error::Topology(problems) = &err else {
            panic!("expected a topology error, got {err:?}");
        };
        assert_eq!(problems.0.len(), 1, "{err}");
        assert!(
            problems.0[0].starts_with("query handler behaviour::queries::needs_state::stock_of (")
                && problems.0[0].contains(
                    "takes `State<behaviour::queries::needs_state::Warehouse>`, but the runtime was not given one"
                ),
            "{err}"
        );
    }
    let app = service(&h, "queries", needs_state::MODULE)
        .state(needs_state::Warehouse)
        .start()
        .await
        .expect("with its state it starts");
    assert_eq!(
        app.query(needs_state::StockOf { sku: 1 })
            .await
            .expect("answer"),
        3
    );
    app.shutdown().await.expect("shutdown");
}

// ---- a handler asks a query ---------------------------------------------------------

mod asking {
    use super::*;
    pub const MODULE: &str = module_path!();

    #[command(queue = "queries-withdraw", name = "tests.Withdraw.v1")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Withdraw {
        pub account: u64,
        pub cents: i64,
    }

    #[query(response = i64)]
    pub struct Available {
        pub account: u64,
    }

    #[handler]
    async fn available(q: Available, State(ledger): State<Ledger>) -> sourceflow::Result<i64> {
        Ok(ledger
            .0
            .lock()
            .expect("ledger")
            .get(&q.account)
            .copied()
            .unwrap_or(0))
    }

    /// What the command handler saw through its query.
    #[derive(Clone, Default)]
    pub struct Seen(pub Arc<Mutex<Vec<(u64, i64)>>>);

    #[handler]
    pub async fn withdraw(
        cmd: Withdraw,
        ctx: &Context,
        State(seen): State<Seen>,
        State(ledger): State<Ledger>,
    ) -> sourceflow::Result<()> {
        let available = ctx
            .query(Available {
                account: cmd.account,
            })
            .await?;
        seen.0.lock().expect("seen").push((cmd.account, available));
        ledger.set(cmd.account, available - cmd.cents);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_asks_a_query_through_its_context() {
    let h = Harness::new().await;
    let ledger = Ledger::default();
    ledger.set(4, 100);
    let seen = asking::Seen::default();
    let app = service(&h, "queries", asking::MODULE)
        .state(ledger.clone())
        .state(seen.clone())
        .start()
        .await
        .expect("start");
    app.send(asking::Withdraw {
        account: 4,
        cents: 30,
    })
    .await
    .expect("send");
    eventually("the handler asked its query", || async {
        !seen.0.lock().expect("seen").is_empty()
    })
    .await;
    assert_eq!(*seen.0.lock().expect("seen"), vec![(4, 100)]);
    assert_eq!(
        app.query(asking::Available { account: 4 })
            .await
            .expect("answer"),
        70
    );
    app.shutdown().await.expect("shutdown");
}

/// A handler called directly with a test context asks its query like a running one: the
/// context answers with the query handlers linked into the binary and the state it was given.
#[cfg(feature = "testing")]
#[tokio::test]
async fn a_handler_called_directly_asks_its_query_through_a_test_context() {
    let ledger = Ledger::default();
    ledger.set(9, 50);
    let seen = asking::Seen::default();
    let ctx = sourceflow::testing::TestContext::new()
        .state(ledger.clone())
        .state(seen.clone());
    asking::withdraw(
        asking::Withdraw {
            account: 9,
            cents: 20,
        },
        &ctx,
        State(seen.clone()),
        State(ledger.clone()),
    )
    .await
    .expect("the handler's query is answered");
    assert_eq!(*seen.0.lock().expect("seen"), vec![(9, 50)]);
}

// ---- spans and metrics --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_traced_and_counted() {
    let h = Harness::new().await;
    let captured = telemetry();
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let ledger = Ledger::default();
    ledger.set(77, 5);
    let app = service(&h, "queries", answers::MODULE)
        .state(ledger)
        .meter_provider(&provider)
        .start()
        .await
        .expect("start");
    // Asked under a root span of this test, so that its spans are told from other tests'.
    let root = tracing::info_span!("queries.test");
    let trace_id = root.context().span().span_context().trace_id();
    async {
        for _ in 0..2 {
            app.query(GetBalance { account: 77 }).await.expect("answer");
        }
        app.query(GetBalance { account: 78 })
            .await
            .expect_err("closed");
        assert!(app.query(answers::Explode).await.is_err());
    }
    .instrument(root)
    .await;

    provider.force_flush().expect("flush");
    let c = |outcome: &str| {
        counter(
            &exporter,
            "sourceflow.query.handled",
            &[
                ("sourceflow.query", "tests.GetBalance"),
                ("sourceflow.outcome", outcome),
            ],
        )
    };
    assert_eq!((c("success"), c("error")), (2, 1));
    assert_eq!(
        counter(
            &exporter,
            "sourceflow.query.handled",
            &[
                ("sourceflow.query", "Explode"),
                ("sourceflow.outcome", "error")
            ],
        ),
        1
    );
    assert_eq!(
        recordings(
            &exporter,
            "sourceflow.query.duration",
            &[("sourceflow.query", "tests.GetBalance")]
        ),
        3
    );

    let spans: Vec<_> = captured
        .spans
        .get_finished_spans()
        .expect("spans")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace_id && s.name == "sourceflow.query")
        .collect();
    let attr = |s: &opentelemetry_sdk::trace::SpanData, key: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let summary: Vec<(Option<String>, Option<String>, bool)> = spans
        .iter()
        .map(|s| {
            (
                attr(s, "sourceflow.query"),
                attr(s, "sourceflow.handler"),
                matches!(s.status, opentelemetry::trace::Status::Error { .. }),
            )
        })
        .collect();
    let one = |q: &str, handler: &str, failed: bool| {
        (Some(q.to_string()), Some(handler.to_string()), failed)
    };
    assert_eq!(
        summary,
        vec![
            one("tests.GetBalance", "get_balance", false),
            one("tests.GetBalance", "get_balance", false),
            one("tests.GetBalance", "get_balance", true),
            one("Explode", "explode", true),
        ]
    );
    app.shutdown().await.expect("shutdown");
}
