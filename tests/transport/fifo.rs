//! FIFO queues: order per message group, a group held back while one of its messages is in
//! flight, the deduplication window, the group id they require, and a group's order kept
//! through a partial failure of a call.
//!
//! Not tested, on purpose: returning a *later* message of a group (visibility zero) while
//! the head is still in flight. SQS then still delivers nothing of the group until the head
//! is done; LocalStack 4.9.2 delivers the returned message, so the case cannot be checked
//! against the emulator.

use std::time::Duration;

use tokio::time::Instant;

use sourceflow::transport::{EntryError, SNS_MAX_MESSAGE_BYTES, SQS_MAX_MESSAGE_BYTES};

use crate::world::{bodies, failures, fifo_msg, msg, sized, World, PATIENCE};

#[tokio::test]
async fn fifo_keeps_order_per_group_and_holds_a_group_while_in_flight() {
    let w = World::new().await;
    let q = w.fifo_queue("order").await;
    w.t.send(
        &q,
        vec![
            fifo_msg("a1", "a", "a1"),
            fifo_msg("b1", "b", "b1"),
            fifo_msg("a2", "a", "a2"),
            fifo_msg("b2", "b", "b2"),
            fifo_msg("a3", "a", "a3"),
        ],
    )
    .await
    .expect("send");
    let head = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("a head of group");
    let group = head.group_id.as_deref().expect("a group id").to_string();
    assert_eq!(
        &*head.body,
        format!("{group}1"),
        "the head of its group comes first"
    );
    let (held, other) = if group == "a" {
        (vec!["a2", "a3"], vec!["b1", "b2"])
    } else {
        (vec!["b2"], vec!["a1", "a2", "a3"])
    };
    // Everything of the other group, in order; nothing of the held one.
    let rest = w.drain(&q, other.len(), PATIENCE).await;
    assert_eq!(bodies(&rest), other, "the other group, in order");
    w.nothing_until(
        &q,
        Instant::now() + Duration::from_secs(2),
        "a group whose head is in flight",
    )
    .await;
    w.delete(&q, std::slice::from_ref(&head)).await;
    let released = w.drain(&q, held.len(), PATIENCE).await;
    assert_eq!(
        bodies(&released),
        held,
        "the held group, in order, once its head is done"
    );
}

#[tokio::test]
async fn a_returned_head_comes_back_before_the_rest_of_its_group() {
    let w = World::new().await;
    let q = w.fifo_queue("return-head").await;
    w.t.send(
        &q,
        vec![fifo_msg("g1", "g", "g1"), fifo_msg("g2", "g", "g2")],
    )
    .await
    .expect("send");
    let head = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the head");
    assert_eq!(&*head.body, "g1");
    w.t.change_visibility(&q, vec![head.receipt.clone()], Duration::ZERO)
        .await
        .expect("return the head");
    let again = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the head again");
    assert_eq!(&*again.body, "g1");
    assert_eq!(again.receive_count, 2);
    w.delete(&q, &[again]).await;
    let next = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the second");
    assert_eq!(&*next.body, "g2");
    w.delete(&q, &[next]).await;
}

#[tokio::test]
async fn a_duplicate_deduplication_id_is_accepted_and_dropped() {
    let w = World::new().await;
    let q = w.fifo_queue("dedup").await;
    w.t.send(
        &q,
        vec![
            fifo_msg("first", "g", "d1"),
            fifo_msg("duplicate", "g", "d1"),
            fifo_msg("second", "g", "d2"),
        ],
    )
    .await
    .expect("a duplicate is accepted");
    let got = w.drain(&q, 2, PATIENCE).await;
    assert_eq!(bodies(&got), ["first", "second"]);
    // The window outlives the message: a resend of d1 after its delete is dropped too.
    w.t.send(&q, vec![fifo_msg("resent", "g", "d1")])
        .await
        .expect("send again");
    w.nothing_until(
        &q,
        Instant::now() + Duration::from_secs(2),
        "a deduplication id seen a moment ago",
    )
    .await;
}

#[tokio::test]
async fn a_fifo_message_without_a_group_is_refused() {
    let w = World::new().await;
    let q = w.fifo_queue("no-group").await;
    let mut groupless = msg("no group");
    groupless.dedup_id = Some("x".to_string());
    let s = failures(
        w.t.send(
            &q,
            vec![
                fifo_msg("one", "g", "one"),
                groupless,
                fifo_msg("two", "g", "two"),
            ],
        )
        .await,
    );
    assert!(matches!(s[..], [(1, EntryError::Refused(_))]), "{s:?}");
    let got = w.drain(&q, 2, PATIENCE).await;
    assert_eq!(bodies(&got), ["one", "two"]);
}

/// A FIFO message of group `group` one byte over `limit`.
fn oversize(limit: usize, group: &str) -> sourceflow::envelope::OutgoingMessage {
    let mut m = sized(limit + 1);
    m.group_id = Some(group.to_string());
    m.dedup_id = Some(format!("{group}-oversize"));
    m
}

/// What a call with a refused message of group `a` in the middle must report: the refused
/// one, and the later message of its group held back (retryable); group `b` is untouched.
fn assert_held(s: &[(usize, EntryError)]) {
    assert!(
        matches!(
            s,
            [(1, EntryError::Refused(_)), (2, EntryError::Transient(why))] if why.contains("held back")
        ),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_refused_message_holds_back_the_rest_of_its_group_in_the_call() {
    let w = World::new().await;
    let q = w.fifo_queue("hold").await;
    let s = failures(
        w.t.send(
            &q,
            vec![
                fifo_msg("a1", "a", "a1"),
                oversize(SQS_MAX_MESSAGE_BYTES, "a"),
                fifo_msg("a3", "a", "a3"),
                fifo_msg("b1", "b", "b1"),
            ],
        )
        .await,
    );
    assert_held(&s);
    let got = w.drain(&q, 2, PATIENCE).await;
    let mut got = bodies(&got);
    got.sort();
    assert_eq!(got, ["a1", "b1"], "a3 did not overtake the refused message");
    w.nothing_until(
        &q,
        Instant::now() + Duration::from_secs(2),
        "a held message",
    )
    .await;
}

#[tokio::test]
async fn a_refused_publish_holds_back_the_rest_of_its_group_in_the_call() {
    let w = World::new().await;
    let (topic, queues) = w.topic_with("hold", true, &[("held", &[])]).await;
    let s = failures(
        w.t.publish(
            &topic,
            vec![
                fifo_msg("a1", "a", "a1"),
                oversize(SNS_MAX_MESSAGE_BYTES, "a"),
                fifo_msg("a3", "a", "a3"),
                fifo_msg("b1", "b", "b1"),
            ],
        )
        .await,
    );
    assert_held(&s);
    let got = w.drain(&queues[0], 2, PATIENCE).await;
    let mut got = bodies(&got);
    got.sort();
    assert_eq!(got, ["a1", "b1"], "a3 did not overtake the refused message");
    w.nothing_until(
        &queues[0],
        Instant::now() + Duration::from_secs(2),
        "a held message",
    )
    .await;
}
