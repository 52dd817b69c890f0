//! The AWS transport's data plane against the emulator: every batch call reports per entry,
//! coalesced callers hear only about their own entries, batches are split by bytes, and
//! what SQS or SNS would refuse is refused before the wire (the emulator would accept it).

use std::time::Duration;

use sourceflow::envelope::OutgoingMessage;
use sourceflow::transport::aws::{AwsTransport, RequestCounter};
use sourceflow::transport::{EntryError, Receive, ReceivedMessage, Transport, MAX_DELAY};

use super::{enabled, prefix};

fn raw(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.into(),
        attributes: vec![("sourceflow.type".into(), "raw".into())].into(),
        group_id: None,
        dedup_id: None,
        delay: None,
        wire_name: "raw".into(),
        message_id: format!("m{}", fastrand::u64(..)),
    }
}

/// A transport whose SQS and SNS requests are counted.
async fn counted() -> (AwsTransport, RequestCounter) {
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let counter = RequestCounter::new();
    (
        AwsTransport::from_sdk_config_counted(&cfg, &counter),
        counter,
    )
}

/// Creates a queue named `{prefix}-{name}` and caches its URL.
async fn queue(t: &AwsTransport, name: &str) -> String {
    let queue = format!("{}-{name}", prefix());
    let mut req = t.sqs().create_queue().queue_name(&queue);
    if queue.ends_with(".fifo") {
        req = req
            .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::ContentBasedDeduplication,
                "false",
            );
    }
    req.send().await.expect("queue");
    t.queue_url(&queue).await.expect("url");
    queue
}

/// Receives until `n` messages came or a few empty receives in a row.
async fn receive_n(t: &AwsTransport, queue: &str, n: usize) -> Vec<ReceivedMessage> {
    let mut got = Vec::new();
    let mut empty = 0;
    while got.len() < n && empty < 3 {
        let batch = t
            .receive(
                queue,
                Receive {
                    max: 10,
                    wait: Duration::from_secs(1),
                    visibility: Duration::from_secs(60),
                },
            )
            .await
            .expect("receive");
        if batch.is_empty() {
            empty += 1;
        }
        got.extend(batch);
    }
    got
}

async fn depth(t: &AwsTransport, queue: &str) -> usize {
    t.queue_depth(queue)
        .await
        .expect("depth")
        .expect("known")
        .total()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_with_a_garbage_receipt_fails_only_that_entry() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let q = queue(&t, "delete-partial").await;
    t.send(&q, vec![raw("a"), raw("b")]).await.expect("send");
    let got = receive_n(&t, &q, 2).await;
    assert_eq!(got.len(), 2);
    let err = t
        .delete(
            &q,
            vec![
                got[0].receipt.clone(),
                "garbage".into(),
                got[1].receipt.clone(),
            ],
        )
        .await
        .expect_err("the garbage receipt fails");
    assert_eq!(err.total, 3);
    assert_eq!(err.failed, vec![(1, EntryError::InvalidReceipt)], "{err}");
    assert_eq!(depth(&t, &q).await, 0, "both valid messages are gone");
}

// One thread: the three callers queue their deletes in one poll of the `join!` before the
// batcher's task runs. (On two worker threads the batcher may wake on the other thread
// between the first caller's enqueue and the second's and, idle, send the first alone:
// correct, and what a loaded CI machine made this test see.)
#[tokio::test]
async fn coalesced_deletes_share_one_call_and_a_garbage_receipt_fails_only_its_caller() {
    if !enabled() {
        return;
    }
    let (t, counter) = counted().await;
    let q = queue(&t, "delete-coalesced").await;
    t.send(&q, vec![raw("a"), raw("b")]).await.expect("send");
    let got = receive_n(&t, &q, 2).await;
    assert_eq!(got.len(), 2);
    counter.reset();
    // Three callers at once: their deletes are gathered into one DeleteMessageBatch.
    let (first, second, third) = tokio::join!(
        t.delete(&q, vec![got[0].receipt.clone()]),
        t.delete(&q, vec!["garbage".into()]),
        t.delete(&q, vec![got[1].receipt.clone()]),
    );
    assert_eq!(
        counter.by_operation(),
        vec![("DeleteMessageBatch".to_string(), 1)],
        "one DeleteMessageBatch for the three callers"
    );
    assert_eq!(counter.total(), 1);
    assert_eq!(
        first,
        Ok(()),
        "a neighbour's garbage receipt is not this caller's"
    );
    assert_eq!(third, Ok(()));
    let err = second.expect_err("the garbage receipt");
    assert_eq!(
        (err.total, err.failed),
        (1, vec![(0, EntryError::InvalidReceipt)]),
        "indexed in its own caller's input"
    );
    assert_eq!(depth(&t, &q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_messages_of_200_kib_are_split_by_bytes_and_all_arrive() {
    if !enabled() {
        return;
    }
    let (t, counter) = counted().await;
    let q = queue(&t, "big").await;
    let messages: Vec<OutgoingMessage> = (0..10)
        .map(|i| raw(&format!("{i}{}", "x".repeat(200 * 1024))))
        .collect();
    counter.reset();
    t.send(&q, messages).await.expect("all ten sent");
    // 10 × 200 KiB is 2 MiB: two SendMessageBatch calls of five (1,000 KiB each). The
    // emulator takes a 2 MiB batch; SQS refuses anything over 1 MiB.
    assert_eq!(
        counter.by_operation(),
        vec![("SendMessageBatch".to_string(), 2)],
        "split by bytes, not only by count"
    );
    let mut got: Vec<String> = receive_n(&t, &q, 10)
        .await
        .into_iter()
        .map(|m| m.body[..1].to_string())
        .collect();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 10, "every message arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_over_900_s_is_refused_and_its_neighbours_arrive() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let q = queue(&t, "delay").await;
    let mut late = raw("late");
    late.delay = Some(MAX_DELAY + Duration::from_secs(1));
    let err = t
        .send(&q, vec![raw("before"), late, raw("after")])
        .await
        .expect_err("901 s is refused");
    assert_eq!(err.failed_indices().collect::<Vec<_>>(), vec![1], "{err}");
    assert!(
        matches!(err.error_of(1), Some(EntryError::Refused(why)) if why.contains("900 s")),
        "{err}"
    );
    let mut bodies: Vec<String> = receive_n(&t, &q, 2)
        .await
        .into_iter()
        .map(|m| m.body.to_string())
        .collect();
    bodies.sort();
    assert_eq!(bodies, vec!["after", "before"]);
    // Not clamped to 900 s and sent either: nothing waits delayed in the queue.
    let d = t.queue_depth(&q).await.expect("depth").expect("known");
    assert_eq!(d.delayed, 0, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_on_a_fifo_queue_is_refused() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let q = queue(&t, "delay.fifo").await;
    let fifo = |body: &str| {
        let mut m = raw(body);
        m.group_id = Some("g".into());
        m.dedup_id = Some(m.message_id.clone());
        m
    };
    let mut delayed = fifo("delayed");
    delayed.delay = Some(Duration::from_secs(5));
    let err = t
        .send(&q, vec![fifo("one"), delayed, fifo("two")])
        .await
        .expect_err("refused");
    // The later message of its group is held back behind it (FIFO order first).
    assert_eq!(
        err.failed_indices().collect::<Vec<_>>(),
        vec![1, 2],
        "{err}"
    );
    // Refused here, before the wire (the emulator's own refusal reads differently).
    assert!(
        matches!(err.error_of(1), Some(EntryError::Refused(why)) if why.contains("takes no per-message delay")),
        "{err}"
    );
    assert!(
        matches!(err.error_of(2), Some(EntryError::Transient(why)) if why.contains("held back")),
        "{err}"
    );
    let bodies: Vec<String> = receive_n(&t, &q, 2)
        .await
        .into_iter()
        .map(|m| m.body.to_string())
        .collect();
    assert_eq!(bodies, vec!["one"], "nothing overtook the refused message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_a_delay_is_refused_and_its_neighbours_are_delivered() {
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let q = queue(&t, "topic-sub").await;
    let topic = format!("{q}-topic");
    let topic_arn = t
        .sns()
        .create_topic()
        .name(&topic)
        .send()
        .await
        .expect("topic")
        .topic_arn()
        .expect("arn")
        .to_string();
    let id = t.identity().await.expect("identity").clone();
    t.sns()
        .subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(id.queue_arn(&q))
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .expect("subscribe");
    let mut delayed = raw("delayed");
    delayed.delay = Some(Duration::from_secs(5));
    let err = t
        .publish(&topic, vec![raw("now"), delayed])
        .await
        .expect_err("refused");
    assert_eq!(err.failed_indices().collect::<Vec<_>>(), vec![1], "{err}");
    assert!(
        matches!(err.error_of(1), Some(EntryError::Refused(why)) if why.contains("SNS topics take no per-message delay")),
        "{err}"
    );
    let bodies: Vec<String> = receive_n(&t, &q, 2)
        .await
        .into_iter()
        .map(|m| m.body.to_string())
        .collect();
    assert_eq!(
        bodies,
        vec!["now"],
        "the neighbour was published, the delayed one not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_changes_report_per_entry_and_coalesce_with_their_own_timeouts() {
    if !enabled() {
        return;
    }
    let (t, counter) = counted().await;
    let q = queue(&t, "visibility").await;
    t.send(&q, vec![raw("a"), raw("b")]).await.expect("send");
    let got = receive_n(&t, &q, 2).await;
    assert_eq!(got.len(), 2);
    let (a, b) = if &*got[0].body == "a" {
        (&got[0], &got[1])
    } else {
        (&got[1], &got[0])
    };

    // Over 12 hours: refused before the wire, every entry of the call.
    counter.reset();
    let err = t
        .change_visibility(
            &q,
            vec![a.receipt.clone(), b.receipt.clone()],
            Duration::from_secs(12 * 3600 + 1),
        )
        .await
        .expect_err("over 12 h");
    assert_eq!(err.failed_indices().collect::<Vec<_>>(), vec![0, 1]);
    assert!(
        matches!(err.error_of(0), Some(EntryError::Refused(_))),
        "{err}"
    );
    assert_eq!(counter.total(), 0, "nothing went on the wire");

    // Two callers at once with different timeouts, and a garbage receipt: one call.
    let (back, hold) = tokio::join!(
        t.change_visibility(&q, vec![a.receipt.clone()], Duration::ZERO),
        t.change_visibility(
            &q,
            vec!["garbage".into(), b.receipt.clone()],
            Duration::from_secs(300)
        ),
    );
    assert_eq!(counter.total(), 1, "one ChangeMessageVisibilityBatch");
    assert_eq!(back, Ok(()));
    let err = hold.expect_err("garbage");
    assert_eq!(err.failed, vec![(0, EntryError::InvalidReceipt)], "{err}");
    // `a` is visible at once; `b` stays invisible for its own 300 s.
    let again = receive_n(&t, &q, 2).await;
    let bodies: Vec<&str> = again.iter().map(|m| &*m.body).collect();
    assert_eq!(bodies, vec!["a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_keeps_the_group_deduplicates_and_bounds_the_reason() {
    use sourceflow::envelope::attr;
    if !enabled() {
        return;
    }
    let t = AwsTransport::from_env().await.expect("transport");
    let q = queue(&t, "work.fifo").await;
    let dlq = queue(&t, "work-dlq.fifo").await;
    let mut m = raw("poison");
    m.group_id = Some("entity-7".into());
    m.dedup_id = Some(m.message_id.clone());
    t.send(&q, vec![m]).await.expect("send");
    let got = receive_n(&t, &q, 1).await;
    assert_eq!(got.len(), 1);
    let reason = "r".repeat(5000);
    t.dead_letter(&q, &dlq, &got[0], &reason)
        .await
        .expect("moved");
    assert_eq!(depth(&t, &q).await, 0, "the original is gone");

    // Moving the same message again (its delete had failed, say) is a duplicate on FIFO.
    let mut stale = got[0].clone();
    stale.receipt = "garbage".into();
    let err = t
        .dead_letter(&q, &dlq, &stale, "again")
        .await
        .expect_err("the delete fails");
    let text = err.to_string();
    assert!(
        text.contains(&format!("copied to `{dlq}`"))
            && text.contains("dead-lettered again")
            && !text.contains('\n'),
        "{text}"
    );

    let moved = receive_n(&t, &dlq, 2).await;
    assert_eq!(moved.len(), 1, "deduplicated by the broker's message id");
    assert_eq!(&*moved[0].body, "poison");
    assert_eq!(moved[0].group_id.as_deref(), Some("entity-7"));
    let why = moved[0]
        .attributes
        .iter()
        .find(|(k, _)| k == attr::DLQ_REASON)
        .map(|(_, v)| v.clone())
        .expect("reason attribute");
    assert_eq!(why.as_str().chars().count(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_read_in_one_line() {
    use sourceflow::transport::{QueueSpec, Topology};
    if !enabled() {
        return;
    }
    // A service error: SQS refuses the queue name.
    let t = AwsTransport::from_env().await.expect("transport");
    let bad = format!("{}-bad!name", prefix());
    let err = t
        .provision(&Topology {
            queues: vec![QueueSpec::new(bad.clone())],
            ..Default::default()
        })
        .await
        .expect_err("invalid name");
    let text = err.to_string();
    assert!(
        text.contains(&format!("queue `{bad}`")) && text.contains("on aws failed"),
        "{text}"
    );
    assert_one_line(&text);

    // Nothing listening: the SDK's dispatch failure, without its Debug dump.
    let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url("http://127.0.0.1:9")
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .load()
        .await;
    let away = AwsTransport::from_sdk_config(&cfg);
    let err = away
        .receive(
            "nowhere",
            Receive {
                max: 1,
                wait: Duration::ZERO,
                visibility: Duration::from_secs(1),
            },
        )
        .await
        .expect_err("refused connection");
    let text = err.to_string();
    assert!(
        text.starts_with("GetQueueUrl on aws failed: queue `nowhere`: cannot reach AWS"),
        "{text}"
    );
    assert_one_line(&text);
    // A send there: every entry transient, with the same one line.
    let err = away
        .send("nowhere", vec![raw("a"), raw("b")])
        .await
        .expect_err("unreachable");
    assert_eq!(err.failed.len(), 2);
    assert!(err.is_transient(), "{err}");
    assert_one_line(&err.to_string());
}

fn assert_one_line(text: &str) {
    println!("{text}");
    assert!(!text.contains('\n'), "more than one line: {text}");
    assert!(text.len() < 400, "too long: {text}");
    for dump in [
        "Error {",
        "hyper",
        "ConnectorError",
        "HttpResponse",
        "headers",
    ] {
        assert!(!text.contains(dump), "SDK internals ({dump}) in: {text}");
    }
}
