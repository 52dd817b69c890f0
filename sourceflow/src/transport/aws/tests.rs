//! The batch calls through real SDK clients on a scripted AWS ([`fake`](super::fake)):
//! which entries each call carries, and what each caller hears.

use std::sync::Arc;

use super::batcher::{Batchers, Flush};
use super::fake::{Fake, Reply, Request};
use super::sns::PublishFlush;
use super::sqs::{DeleteFlush, SendFlush, VisibilityFlush};
use crate::envelope::OutgoingMessage;
use crate::error::EntryError;

const URL: &str = "http://sqs.fake/000000000000/q";

fn msg(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.into(),
        attributes: vec![("sourceflow.type".into(), "t".into())].into(),
        group_id: None,
        dedup_id: None,
        delay: None,
        wire_name: "t".into(),
        message_id: format!("id-{body}"),
    }
}

fn bodies(r: &Request) -> Vec<String> {
    r.entries()
        .iter()
        .filter_map(|e| e.get("MessageBody").and_then(|b| b.as_str()))
        .map(|b| b.chars().take(2).collect())
        .collect()
}

fn send_flush(fake: &Fake) -> SendFlush {
    SendFlush {
        sqs: fake.sqs(),
        queue: "q".into(),
        url: URL.into(),
    }
}

#[tokio::test]
async fn transiently_failed_entries_are_sent_again_alone_under_their_own_ids() {
    let fake = Fake::new(vec![
        Reply::Fail(vec![
            ("1", "InternalError", false),
            ("3", "ServiceUnavailable", false),
        ]),
        Reply::Fail(vec![("3", "InternalError", false)]),
    ]);
    let messages = (0..5).map(|i| msg(&format!("m{i}"))).collect();
    assert_eq!(send_flush(&fake).flush(messages).await, vec![]);
    let r = fake.requests();
    assert!(r.iter().all(|r| r.operation == "SendMessageBatch"), "{r:?}");
    assert_eq!(r.len(), 3);
    assert_eq!(bodies(&r[0]), ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(
        r[1].ids(),
        ["1", "3"],
        "only the failed entries, nothing accepted"
    );
    assert_eq!(bodies(&r[1]), ["m1", "m3"]);
    assert_eq!(r[2].ids(), ["3"]);
}

#[tokio::test]
async fn coalesced_callers_hear_only_their_own_refusals_and_transient_failures() {
    // Caller A gives 3 entries (combined 0-2), caller B 2 (combined 3-4). AWS refuses
    // combined 1 (a sender fault) and keeps failing combined 3 on its side.
    let keeps_failing = || Reply::Fail(vec![("3", "InternalError", false)]);
    let fake = Fake::new(vec![
        Reply::Fail(vec![
            ("1", "InvalidMessageContents", true),
            ("3", "InternalError", false),
        ]),
        keeps_failing(),
        keeps_failing(),
        keeps_failing(),
    ]);
    let batchers: Arc<Batchers<SendFlush>> = Arc::new(Batchers::default());
    let (a, b) = tokio::join!(
        batchers.submit("q", vec![msg("a0"), msg("a1"), msg("a2")], || send_flush(
            &fake
        )),
        batchers.submit("q", vec![msg("b0"), msg("b1")], || send_flush(&fake)),
    );
    assert_eq!(
        a,
        vec![(
            1,
            EntryError::Refused("InvalidMessageContents: scripted".into())
        )]
    );
    assert_eq!(
        b,
        vec![(0, EntryError::Transient("InternalError: scripted".into()))],
        "re-indexed to B's own input"
    );
    let r = fake.requests();
    assert_eq!(r.len(), 4, "one shared call and three retries: {r:?}");
    assert_eq!(bodies(&r[0]), ["a0", "a1", "a2", "b0", "b1"]);
    for retry in &r[1..] {
        assert_eq!(bodies(retry), ["b0"], "the refused entry is not retried");
    }
}

#[tokio::test]
async fn a_call_failing_as_a_whole_fails_each_entry_in_one_line() {
    let fake = Fake::new(vec![Reply::Error(500, "InternalError")]);
    let out = send_flush(&fake).flush(vec![msg("x"), msg("y")]).await;
    assert_eq!(out.len(), 2);
    for (_, e) in &out {
        assert_eq!(
            e,
            &EntryError::Transient("InternalError: scripted failure".into())
        );
    }
    assert_eq!(
        fake.requests().len(),
        1,
        "the SDK retries calls, not sourceflow"
    );

    let fake = Fake::new(vec![Reply::Error(400, "QueueDoesNotExist")]);
    let out = send_flush(&fake).flush(vec![msg("x")]).await;
    assert_eq!(out, vec![(0, EntryError::NoSuchDestination("q".into()))]);
}

#[tokio::test]
async fn batches_are_split_at_ten_entries_and_one_mib() {
    let fake = Fake::new(vec![]);
    let big: Vec<_> = (0..10)
        .map(|i| msg(&format!("{i}{}", "x".repeat(200 * 1024))))
        .collect();
    assert_eq!(send_flush(&fake).flush(big).await, vec![]);
    let sizes: Vec<usize> = fake.requests().iter().map(|r| r.ids().len()).collect();
    assert_eq!(sizes, [5, 5]);

    let fake = Fake::new(vec![]);
    let small: Vec<_> = (0..23).map(|i| msg(&format!("{i}"))).collect();
    assert_eq!(send_flush(&fake).flush(small).await, vec![]);
    let sizes: Vec<usize> = fake.requests().iter().map(|r| r.ids().len()).collect();
    assert_eq!(sizes, [10, 10, 3]);
}

#[tokio::test]
async fn an_invalid_receipt_is_not_retried_even_without_sender_fault() {
    // LocalStack reports ReceiptHandleIsInvalid with SenderFault=false.
    let fake = Fake::new(vec![Reply::Fail(vec![(
        "1",
        "ReceiptHandleIsInvalid",
        false,
    )])]);
    let flush = DeleteFlush {
        sqs: fake.sqs(),
        queue: "q".into(),
        url: URL.into(),
    };
    let out = flush
        .flush(vec!["r0".into(), "garbage".into(), "r2".into()])
        .await;
    assert_eq!(out, vec![(1, EntryError::InvalidReceipt)]);
    let r = fake.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].operation, "DeleteMessageBatch");
}

#[tokio::test]
async fn the_same_receipt_twice_never_shares_a_call() {
    let fake = Fake::new(vec![]);
    let flush = DeleteFlush {
        sqs: fake.sqs(),
        queue: "q".into(),
        url: URL.into(),
    };
    assert_eq!(
        flush.flush(vec!["a".into(), "b".into(), "a".into()]).await,
        vec![]
    );
    let ids: Vec<Vec<String>> = fake.requests().iter().map(Request::ids).collect();
    assert_eq!(ids, [vec!["0", "1"], vec!["0"]]);
}

#[tokio::test]
async fn visibility_changes_with_different_timeouts_share_a_call() {
    let fake = Fake::new(vec![]);
    let flush = VisibilityFlush {
        sqs: fake.sqs(),
        queue: "q".into(),
        url: URL.into(),
    };
    assert_eq!(
        flush
            .flush(vec![("r1".into(), 0), ("r2".into(), 300)])
            .await,
        vec![]
    );
    let r = fake.requests();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].operation, "ChangeMessageVisibilityBatch");
    let timeouts: Vec<i64> = r[0]
        .entries()
        .iter()
        .filter_map(|e| e.get("VisibilityTimeout").and_then(|t| t.as_i64()))
        .collect();
    assert_eq!(timeouts, [0, 300]);
}

#[tokio::test]
async fn failed_publish_entries_are_retried_alone() {
    let fake = Fake::new(vec![Reply::Fail(vec![("1", "InternalError", false)])]);
    let flush = PublishFlush {
        sns: fake.sns(),
        topic: "events".into(),
        arn: "arn:aws:sns:us-east-1:000000000000:events".into(),
    };
    assert_eq!(
        flush.flush(vec![msg("e0"), msg("e1"), msg("e2")]).await,
        vec![]
    );
    let r = fake.requests();
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r.iter().all(|r| r.operation == "PublishBatch"));
    assert!(
        r[1].body
            .contains("PublishBatchRequestEntries.member.1.Id=1")
            && !r[1].body.contains("member.2."),
        "only the failed entry: {}",
        r[1].body
    );
}

#[tokio::test]
async fn publishes_are_split_at_256_kib() {
    let fake = Fake::new(vec![]);
    let flush = PublishFlush {
        sns: fake.sns(),
        topic: "events".into(),
        arn: "arn:aws:sns:us-east-1:000000000000:events".into(),
    };
    let big: Vec<_> = (0..3)
        .map(|i| msg(&format!("{i}{}", "x".repeat(100 * 1024))))
        .collect();
    assert_eq!(flush.flush(big).await, vec![]);
    assert_eq!(fake.requests().len(), 2, "100 + 100 KiB, then 100 KiB");
}

#[test]
fn the_request_counter_reads_the_operation_of_sqs_and_sns_requests() {
    use super::operation_of;
    assert_eq!(
        operation_of(Some("AmazonSQS.ReceiveMessage"), Some(b"{}"), "POST"),
        "ReceiveMessage"
    );
    assert_eq!(
        operation_of(
            None,
            Some(b"Action=PublishBatch&Version=2010-03-31&TopicArn=x"),
            "POST"
        ),
        "PublishBatch"
    );
    assert_eq!(
        operation_of(None, Some(b"Version=2010-03-31&Action=Subscribe"), "POST"),
        "Subscribe"
    );
    assert_eq!(operation_of(None, None, "POST"), "unknown");
    assert_eq!(operation_of(None, Some(b"Action=x"), "PUT"), "PutObject");
    assert_eq!(operation_of(None, None, "GET"), "GetObject");
}
