//! Typed handler outcomes: a handler can say "this will never succeed" (straight to the
//! dead-letter queue, with its reason) or "retry after this delay".

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sourceflow::naming::Naming;
use sourceflow::{command, handler, Reject, RetryAfter, State};

use crate::harness::{dlq_reason, eventually, Harness};

#[command(queue = "outcome-cards", name = "tests.Charge.outcome.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Charge {
    id: u32,
    /// `reject`, `card-expired`, `later` or `ok`.
    what: String,
}

#[derive(Debug, thiserror::Error)]
#[error("card expired")]
struct CardExpired;

#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<(u32, Instant)>>>);

impl Runs {
    fn of(&self, id: u32) -> Vec<Instant> {
        let r = self.0.lock().expect("runs");
        r.iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, t)| *t)
            .collect()
    }
}

#[handler]
async fn charge(cmd: Charge, State(r): State<Runs>) -> sourceflow::Result<()> {
    let attempt = {
        let mut runs = r.0.lock().expect("runs");
        runs.push((cmd.id, Instant::now()));
        runs.iter().filter(|(i, _)| *i == cmd.id).count()
    };
    match cmd.what.as_str() {
        "reject" => Err(Reject::new("the order was cancelled").into()),
        "card-expired" => Err(sourceflow::Error::other(CardExpired)),
        "later" if attempt == 1 => {
            Err(RetryAfter::new(Duration::from_millis(1500), "gateway rate limit").into())
        }
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_permanent_errors_go_to_the_dlq_at_once_and_retry_after_is_honoured() {
    let h = Harness::new().await;
    let runs = Runs::default();
    let app = h
        .service("outcomes", module_path!())
        .state(runs.clone())
        .permanent_error::<CardExpired>()
        .max_receive_count(5)
        .start()
        .await
        .expect("start");
    for (id, what) in [(1, "reject"), (2, "card-expired"), (3, "later")] {
        app.send(Charge {
            id,
            what: what.into(),
        })
        .await
        .expect("send");
    }
    let dlq = Naming::dead_letter(&app.queue_of::<Charge>());
    let mut dead = h.drain(&dlq, 2).await;
    assert_eq!(dead.len(), 2, "both permanent failures are dead-lettered");
    dead.sort_by_key(|m| m.body.contains("card-expired"));
    let reasons: Vec<&str> = dead
        .iter()
        .map(|m| dlq_reason(m).expect("reason"))
        .collect();
    assert!(
        reasons[0].contains("rejected the message: the order was cancelled"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("card expired"), "{reasons:?}");
    eventually("the delayed retry ran", || async { runs.of(3).len() == 2 }).await;
    let gap = runs.of(3)[1] - runs.of(3)[0];
    assert!(
        gap >= Duration::from_millis(1400),
        "retried after the delay the handler asked for, not the 20 ms backoff: {gap:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runs.of(1).len(), 1, "a rejected message runs once");
    assert_eq!(runs.of(2).len(), 1, "a permanent error type runs once");
    h.assert_empty(&dlq, Duration::from_millis(200)).await;
    app.shutdown().await.expect("shutdown");
}
