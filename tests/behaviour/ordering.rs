//! FIFO: ordered within a group, parallel across groups; the concurrency limit holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::{command, handler, State};

use crate::harness::{eventually, Harness};

#[command(queue = "ordering.fifo")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    #[entity_id]
    group: u32,
    seq: u32,
}

#[command(queue = "ordering-standard")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Slow {
    n: u32,
}

#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<HashMap<u32, Vec<u32>>>>,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl Recorder {
    fn enter(&self) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
    }
}

#[handler]
async fn step(cmd: Step, State(r): State<Recorder>) -> sourceflow::Result<()> {
    r.enter();
    // Give other groups a chance to interleave.
    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..500))).await;
    r.seen
        .lock()
        .expect("recorder lock")
        .entry(cmd.group)
        .or_default()
        .push(cmd.seq);
    r.leave();
    Ok(())
}

#[handler]
async fn slow(_cmd: Slow, State(r): State<Recorder>) -> sourceflow::Result<()> {
    r.enter();
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.leave();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_keeps_order_per_group_under_concurrency() {
    const GROUPS: u32 = 50;
    const PER_GROUP: u32 = 20;
    let h = Harness::new().await;
    let rec = Recorder::default();
    let app = h
        .service("ordering", module_path!())
        .state(rec.clone())
        .concurrency(10)
        .start()
        .await
        .expect("start");

    // Each group is sent in order by its own task; groups are sent concurrently.
    let mut senders = Vec::new();
    for group in 0..GROUPS {
        let app = app.clone();
        senders.push(tokio::spawn(async move {
            for seq in 0..PER_GROUP {
                app.send(Step { group, seq }).await.expect("send");
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    let total = (GROUPS * PER_GROUP) as usize;
    eventually("all 1,000 steps handled", || async {
        rec.total.load(Ordering::SeqCst) >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rec.total.load(Ordering::SeqCst),
        total,
        "no step handled twice"
    );

    let seen = rec.seen.lock().expect("recorder lock").clone();
    assert_eq!(seen.len(), GROUPS as usize);
    let expected: Vec<u32> = (0..PER_GROUP).collect();
    for (group, seqs) in &seen {
        assert_eq!(seqs, &expected, "group {group} out of order");
    }
    let max = rec.max_running.load(Ordering::SeqCst);
    assert!(
        max > 1,
        "groups must be handled in parallel (max in flight {max})"
    );
    assert!(max <= 10, "concurrency limit exceeded: {max} in flight");
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_queue_runs_up_to_the_concurrency_limit() {
    let h = Harness::new().await;
    let rec = Recorder::default();
    let app = h
        .service("ordering-std", module_path!())
        .state(rec.clone())
        .concurrency(4)
        .start()
        .await
        .expect("start");
    // All at once (coalesced into a few batch calls), so that the queue holds more than
    // the limit: sent one by one they trickle in, and on AWS the receive pacing may then
    // keep fewer than four in flight, which says nothing about the limit.
    let sends = (0..40).map(|n| app.send(Slow { n }));
    for sent in futures_util::future::join_all(sends).await {
        sent.expect("send");
    }
    eventually("all 40 handled", || async {
        rec.total.load(Ordering::SeqCst) == 40
    })
    .await;
    let max = rec.max_running.load(Ordering::SeqCst);
    assert_eq!(
        max, 4,
        "expected exactly the limit of 4 in flight at the peak, saw {max}"
    );
    app.shutdown().await.expect("shutdown");
}

mod retried_head {
    use super::*;

    pub const MODULE: &str = module_path!();

    #[command(queue = "ordering-retry.fifo")]
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Entry {
        #[entity_id]
        pub account: u32,
        pub seq: u32,
    }

    /// Successful runs in order, and how often each entry failed.
    #[derive(Clone, Default)]
    pub struct Ledger {
        pub done: Arc<Mutex<Vec<(u32, u32)>>>,
        pub failed: Arc<Mutex<HashMap<(u32, u32), u32>>>,
    }

    #[handler]
    async fn entry(cmd: Entry, State(l): State<Ledger>) -> sourceflow::Result<()> {
        // Entries 2 and 5 of every account fail twice before they go through.
        if cmd.seq == 2 || cmd.seq == 5 {
            let mut failed = l.failed.lock().expect("failed");
            let n = failed.entry((cmd.account, cmd.seq)).or_default();
            if *n < 2 {
                *n += 1;
                return Err(sourceflow::Error::other("ledger locked"));
            }
        }
        l.done.lock().expect("done").push((cmd.account, cmd.seq));
        Ok(())
    }
}

/// A failing message of a FIFO group is retried before anything behind it in its group,
/// which neither overtakes it nor spends attempts while it waits; other groups go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fifo_message_holds_its_group_until_it_succeeds() {
    use retried_head::{Entry, Ledger, MODULE};
    let h = Harness::new().await;
    let ledger = Ledger::default();
    let app = h
        .service("ordering-retry", MODULE)
        .state(ledger.clone())
        .max_receive_count(3)
        .start()
        .await
        .expect("start");
    for seq in 0..8 {
        for account in 0..3 {
            app.send(Entry { account, seq }).await.expect("send");
        }
    }
    eventually("every entry done", || async {
        ledger.done.lock().expect("done").len() == 24
    })
    .await;
    let done = ledger.done.lock().expect("done").clone();
    for account in 0..3 {
        let order: Vec<u32> = done
            .iter()
            .filter(|(a, _)| *a == account)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(order, (0..8).collect::<Vec<_>>(), "account {account}");
    }
    let dlq = sourceflow::naming::Naming::dead_letter(&app.queue_of::<Entry>());
    h.assert_empty(&dlq, Duration::from_millis(300)).await;
    app.shutdown().await.expect("shutdown");
}
