//! A failing (or panicking) handler's message comes back and is handled again.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sourceflow::{command, handler, Context, State};

use crate::harness::{eventually, Harness};

#[command(queue = "retry-flaky")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Flaky {
    id: u32,
}

#[command(queue = "retry-panicky")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Panicky {
    id: u32,
}

#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<Vec<(u32, u32)>>>);

impl Attempts {
    fn record(&self, id: u32, receive_count: u32) {
        self.0
            .lock()
            .expect("attempts lock")
            .push((id, receive_count));
    }
    fn of(&self, id: u32) -> Vec<u32> {
        self.0
            .lock()
            .expect("attempts lock")
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, c)| *c)
            .collect()
    }
}

#[handler]
async fn flaky(cmd: Flaky, ctx: &Context, State(a): State<Attempts>) -> Result<(), std::io::Error> {
    a.record(cmd.id, ctx.receive_count());
    if ctx.receive_count() < 3 {
        return Err(std::io::Error::other("database unavailable"));
    }
    Ok(())
}

#[handler]
async fn panicky(cmd: Panicky, ctx: &Context, State(a): State<Attempts>) -> sourceflow::Result<()> {
    a.record(cmd.id, ctx.receive_count());
    if ctx.receive_count() == 1 {
        panic!("simulated crash in the middle of a handler");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handler_is_retried_until_it_succeeds() {
    let h = Harness::new().await;
    let attempts = Attempts::default();
    let app = h
        .service("retry", module_path!())
        .state(attempts.clone())
        .max_receive_count(5)
        .start()
        .await
        .expect("start");
    app.send(Flaky { id: 1 }).await.expect("send");
    eventually("third attempt", || async { attempts.of(1).len() >= 3 }).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        attempts.of(1),
        vec![1, 2, 3],
        "receive counts of the attempts"
    );
    h.assert_empty(
        &app.queue_of::<Flaky>(),
        std::time::Duration::from_millis(200),
    )
    .await;
    h.assert_empty(
        &sourceflow::naming::Naming::dead_letter(&app.queue_of::<Flaky>()),
        std::time::Duration::from_millis(200),
    )
    .await;
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_retried_and_the_listener_survives() {
    let h = Harness::new().await;
    let attempts = Attempts::default();
    let app = h
        .service("retry-panic", module_path!())
        .state(attempts.clone())
        .start()
        .await
        .expect("start");
    app.send(Panicky { id: 1 }).await.expect("send");
    eventually("retry after the panic", || async {
        attempts.of(1).len() >= 2
    })
    .await;
    // The listener is still alive: a new message is handled too.
    app.send(Panicky { id: 2 }).await.expect("send");
    eventually("second message", || async { attempts.of(2).len() >= 2 }).await;
    assert_eq!(attempts.of(1), vec![1, 2]);
    assert_eq!(attempts.of(2), vec![1, 2]);
    app.shutdown().await.expect("shutdown");
}
