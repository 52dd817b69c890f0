//! The function handler in process, on batches received from the emulator.

use std::time::Duration;

use sourceflow::SendOptions;

use super::app::{self, Item, Step};
use super::{enabled, failures, function, id_of, invocation, prefix, sender, Sqs};

fn item(id: &str, fail: u32, reject: bool) -> Item {
    Item {
        id: id.to_string(),
        fail,
        reject,
    }
}

/// Successes, a failure, a rejection, a poison record and a duplicate: only the failure
/// comes back; the rejection and the poison are dead-lettered with their reasons; the
/// duplicate is acknowledged without running. The failure, received again at its attempt
/// limit, is dead-lettered too and reported done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_reports_exactly_the_records_that_must_come_back() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let f = function(&p, true).await;
    let app = sender(&p).await;
    let sqs = Sqs::new().await;
    let queue = format!("{p}-lambda-items");
    let id = |s: &str| format!("{p}-{s}");
    app.send_with(
        item(&id("ok-1"), 0, false),
        SendOptions::new().message_id(id("m-ok-1")),
    )
    .await
    .expect("send");
    app.send(item(&id("ok-2"), 0, false)).await.expect("send");
    app.send(item(&id("fail"), 9, false)).await.expect("send");
    app.send(item(&id("reject"), 0, true)).await.expect("send");
    sqs.send_raw(&queue, &format!("poison {p}-poison"), &Default::default())
        .await;
    // The same message again (same id and payload), as a producer's retry would send it.
    app.send_with(
        item(&id("ok-1"), 0, false),
        SendOptions::new().message_id(id("m-ok-1")),
    )
    .await
    .expect("send");

    let event = sqs.event(&queue, 6, Duration::from_secs(10)).await;
    assert_eq!(event.records.len(), 6, "the whole batch was received");
    let failed = id_of(&event, &id("fail"));
    let response = f.handle(invocation(event)).await.expect("handled");

    assert_eq!(failures(&response), vec![failed.clone()]);
    assert_eq!(app::runs(&id("ok-1")), 1, "the duplicate did not run");
    assert_eq!(app::runs(&id("ok-2")), 1);
    assert_eq!(app::runs(&id("fail")), 1);
    assert_eq!(app::runs(&id("reject")), 1);
    let mut reasons = sqs.reasons(&format!("{queue}-dlq"), 2).await;
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("item refused for good"), "{reasons:?}");
    assert!(reasons[1].starts_with("undecodable message"), "{reasons:?}");

    // Only the failure is left, back after its one-second backoff (not after the queue's
    // 30-second visibility timeout): the successes were deleted, the others moved.
    let again = sqs.event(&queue, 2, Duration::from_secs(6)).await;
    assert_eq!(again.records.len(), 1, "only the failure came back");
    assert_eq!(
        again.records[0].message_id.as_deref(),
        Some(failed.as_str())
    );
    assert_eq!(
        again.records[0]
            .attributes
            .get("ApproximateReceiveCount")
            .map(String::as_str),
        Some("2")
    );
    // Its second attempt is its last (max_receive_count 2): dead-lettered, reported done.
    let response = f.handle(invocation(again)).await.expect("handled");
    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(app::runs(&id("fail")), 2);
    let reasons = sqs.reasons(&format!("{queue}-dlq"), 3).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("item failed on attempt 2")),
        "{reasons:?}"
    );
}

/// FIFO: a failure in group A fails it and the rest of A in the batch, unrun; group B
/// carries on. Received again, A comes back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_failure_fails_the_rest_of_its_group_and_only_its_group() {
    if !enabled() {
        return;
    }
    let p = prefix();
    // Idempotency off: a redelivery must run the handler again, visibly.
    let f = function(&p, false).await;
    let app = sender(&p).await;
    let sqs = Sqs::new().await;
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let step = |group: &str, n, fail| Step {
        group: group.to_string(),
        n,
        fail,
    };
    for s in [
        step(&a, 1, false),
        step(&b, 1, false),
        step(&a, 2, true),
        step(&b, 2, false),
        step(&a, 3, false),
    ] {
        app.send(s).await.expect("send");
    }
    let queue = format!("{p}-lambda-steps.fifo");
    let event = sqs.event(&queue, 5, Duration::from_secs(10)).await;
    assert_eq!(event.records.len(), 5, "the whole batch in one receive");
    let (a2, a3) = (
        id_of(&event, &format!("\"{a}\",\"n\":2")),
        id_of(&event, &format!("\"{a}\",\"n\":3")),
    );
    let response = f.handle(invocation(event)).await.expect("handled");

    assert_eq!(failures(&response), vec![a2.clone(), a3.clone()]);
    assert_eq!(
        app::order(&a),
        vec![format!("{a}1"), format!("{a}2")],
        "a3 did not run"
    );
    assert_eq!(app::order(&b), vec![format!("{b}1"), format!("{b}2")]);

    let again = sqs.event(&queue, 2, Duration::from_secs(8)).await;
    let ids: Vec<_> = again
        .records
        .iter()
        .filter_map(|r| r.message_id.clone())
        .collect();
    assert_eq!(ids, vec![a2, a3], "the group comes back in order");
    let response = f.handle(invocation(again)).await.expect("handled");
    assert_eq!(failures(&response), Vec::<String>::new());
    let ran: Vec<String> = [1, 2, 2, 3].iter().map(|n| format!("{a}{n}")).collect();
    assert_eq!(app::order(&a), ran);
}

/// A whole batch delivered again (copies of its messages: same envelopes, new receipts)
/// is acknowledged without running anything twice — and, with idempotency off, runs again
/// (so it is idempotency that keeps it from running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_again_is_acknowledged_without_running_again() {
    if !enabled() {
        return;
    }
    for idempotent in [true, false] {
        let p = prefix();
        let f = function(&p, idempotent).await;
        let app = sender(&p).await;
        let sqs = Sqs::new().await;
        let queue = format!("{p}-lambda-items");
        let ids: Vec<String> = (0..3).map(|i| format!("{p}-item-{i}")).collect();
        for i in &ids {
            app.send(item(i, 0, false)).await.expect("send");
        }
        let first = sqs.event(&queue, 3, Duration::from_secs(10)).await;
        assert_eq!(first.records.len(), 3);
        let response = f.handle(invocation(first.clone())).await.expect("handled");
        assert_eq!(failures(&response), Vec::<String>::new());
        for r in &first.records {
            sqs.send_raw(
                &queue,
                r.body.as_deref().unwrap_or_default(),
                &r.message_attributes,
            )
            .await;
        }
        let second = sqs.event(&queue, 3, Duration::from_secs(10)).await;
        assert_eq!(second.records.len(), 3, "the copies were received");
        let response = f.handle(invocation(second)).await.expect("handled");
        assert_eq!(failures(&response), Vec::<String>::new());
        let want = if idempotent { 1 } else { 2 };
        for i in &ids {
            assert_eq!(app::runs(i), want, "idempotency {idempotent}: runs of {i}");
        }
    }
}

/// A dead letter the broker does not take (its dead-letter queue is gone) is reported
/// failed: reported done, the event source mapping would delete it unmoved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_dead_letter_move_fails_comes_back() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let f = function(&p, false).await;
    let sqs = Sqs::new().await;
    let queue = format!("{p}-lambda-items");
    let dlq = sqs.url(&format!("{queue}-dlq")).await;
    sqs.sqs
        .delete_queue()
        .queue_url(dlq)
        .send()
        .await
        .expect("delete the dead-letter queue");
    sqs.send_raw(&queue, "poison", &Default::default()).await;
    let event = sqs.event(&queue, 1, Duration::from_secs(10)).await;
    let poison = id_of(&event, "poison");
    let response = f.handle(invocation(event)).await.expect("handled");
    assert_eq!(failures(&response), vec![poison]);
}

/// Records that would start within the deadline margin (2 s) of the invocation's deadline
/// are handed back unrun, visible at once, and reported failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_near_the_deadline_are_handed_back_unrun() {
    if !enabled() {
        return;
    }
    let p = prefix();
    let f = function(&p, false).await;
    let app = sender(&p).await;
    let sqs = Sqs::new().await;
    let queue = format!("{p}-lambda-items");
    let ids: Vec<String> = (0..2).map(|i| format!("{p}-late-{i}")).collect();
    for i in &ids {
        app.send(item(i, 0, false)).await.expect("send");
    }
    let event = sqs.event(&queue, 2, Duration::from_secs(10)).await;
    let all: Vec<String> = event
        .records
        .iter()
        .filter_map(|r| r.message_id.clone())
        .collect();
    assert_eq!(all.len(), 2);
    let mut late = invocation(event);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    late.context.deadline = (now + Duration::from_secs(1)).as_millis() as u64;
    let response = f.handle(late).await.expect("handled");
    assert_eq!(failures(&response), all);
    for i in &ids {
        assert_eq!(app::runs(i), 0, "{i} did not run");
    }
    let again = sqs.event(&queue, 2, Duration::from_secs(4)).await;
    assert_eq!(again.records.len(), 2, "handed back at once");
}
