//! `Handle::send_all` / `raise_all`: many messages of one type in one call to the
//! transport (which batches them by ten on AWS), each delivered once, ids in order; what
//! the broker did not take is named by index; what cannot be sent sends nothing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::transport::EntryError;
use sourceflow::{command, event, Error};

use crate::harness::{eventually, Faulty, Harness};

#[command(queue = "bulk-jobs", name = "tests.BulkJob.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub n: u32,
    pub data: String,
}

#[event(topic = "bulk-events", name = "tests.BulkDone.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    pub n: u32,
}

/// Message id → payload numbers seen with it.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<HashMap<String, Vec<u32>>>>);

mod handlers {
    use super::{Done, Job, Seen};
    use sourceflow::{handler, Context, State};

    pub const MODULE: &str = module_path!();

    #[handler]
    async fn job(cmd: Job, ctx: &Context, State(s): State<Seen>) {
        let mut seen = s.0.lock().expect("seen");
        seen.entry(ctx.message_id().to_string())
            .or_default()
            .push(cmd.n);
    }

    #[handler]
    async fn done(evt: Done, ctx: &Context, State(s): State<Seen>) {
        let mut seen = s.0.lock().expect("seen");
        seen.entry(ctx.message_id().to_string())
            .or_default()
            .push(1000 + evt.n);
    }
}

fn job(n: u32) -> Job {
    Job {
        n,
        data: "x".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_all_sends_in_one_call_and_each_arrives_once_with_its_id() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let counting = Faulty::new(h.transport.clone());
    let app = h
        .service("bulk", handlers::MODULE)
        .transport(counting.clone())
        .state(seen.clone())
        .without_idempotency()
        .start()
        .await
        .expect("start");
    let ids = app.send_all((0..25).map(job)).await.expect("send_all");
    assert_eq!(ids.len(), 25);
    assert_eq!(counting.sends.load(Ordering::SeqCst), 1, "one call for 25");
    assert_eq!(counting.sent_entries.load(Ordering::SeqCst), 25);
    eventually("all 25 handled", || async {
        seen.0.lock().expect("seen").len() == 25
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.0.lock().expect("seen").clone();
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(
            seen.get(id),
            Some(&vec![n as u32]),
            "job {n} once, with its id"
        );
    }
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_all_sends_nothing_when_one_cannot_be_sent() {
    let h = Harness::new().await;
    let counting = Faulty::new(h.transport.clone());
    let app = h
        .service("bulk-bad", handlers::MODULE)
        .transport(counting.clone())
        .state(Seen::default())
        .start()
        .await
        .expect("start");
    let mut jobs: Vec<Job> = (0..5).map(job).collect();
    jobs[3].data = "y".repeat(1024 * 1024 + 1);
    let err = app.send_all(jobs).await.expect_err("one is too large");
    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err}");
    assert_eq!(counting.sends.load(Ordering::SeqCst), 0, "nothing sent");
    h.assert_empty(&app.queue_of::<Job>(), Duration::from_millis(300))
        .await;
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raise_all_names_what_the_broker_did_not_take() {
    let h = Harness::new().await;
    let seen = Seen::default();
    let faulty = Faulty::new(h.transport.clone());
    let app = h
        .service("bulk-events", handlers::MODULE)
        .transport(faulty.clone())
        .state(seen.clone())
        .start()
        .await
        .expect("start");
    let ids = app
        .raise_all((0..12).map(|n| Done { n }))
        .await
        .expect("raise_all");
    eventually("all 12 events handled", || async {
        seen.0.lock().expect("seen").len() == 12
    })
    .await;
    assert!(ids
        .iter()
        .all(|id| seen.0.lock().expect("seen").contains_key(id)));
    faulty.fail_publishes.store(1, Ordering::SeqCst);
    let err = app
        .raise_all((0..3).map(|n| Done { n }))
        .await
        .expect_err("the broker failed the publish");
    let Error::Batch(batch) = &err else {
        panic!("not a batch error: {err}");
    };
    assert_eq!(batch.failed_indices().collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(
        matches!(batch.error_of(0), Some(EntryError::Transient(_))),
        "{err}"
    );
    app.shutdown().await.expect("shutdown");
}
