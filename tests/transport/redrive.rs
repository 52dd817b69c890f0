//! Dead-letter queues: the broker's redrive after `maxReceiveCount` receives, and
//! `dead_letter`, which moves a received message with its reason.

use std::time::Duration;

use tokio::time::Instant;

use sourceflow::envelope::{attr, attribute};

use crate::world::{fifo_msg, msg, World, PATIENCE, PLAIN};

#[tokio::test]
async fn a_message_received_max_receive_count_times_moves_to_the_dead_letter_queue() {
    let w = World::new().await;
    let (q, dlq) = w.queue_with_dlq("redrive", false, 2).await;
    w.t.send(&q, vec![msg("poison")]).await.expect("send");
    for expected in 1..=2 {
        let m = w
            .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
            .await
            .expect("the message");
        assert_eq!(m.receive_count, expected);
        w.t.change_visibility(&q, vec![m.receipt.clone()], Duration::ZERO)
            .await
            .expect("return it");
    }
    w.nothing_until(
        &q,
        Instant::now() + Duration::from_secs(2),
        "a message over its receive limit",
    )
    .await;
    let dead = w
        .first_before(&dlq, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message in the dead-letter queue");
    assert_eq!(&*dead.body, "poison");
    assert_eq!(attribute(&dead.attributes, attr::TYPE), Some(PLAIN));
    w.delete(&dlq, &[dead]).await;
}

#[tokio::test]
async fn dead_letter_moves_a_received_message_with_its_reason() {
    let w = World::new().await;
    let (q, dlq) = w.queue_with_dlq("moved", false, 10).await;
    w.t.send(&q, vec![msg("bad")]).await.expect("send");
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(2))
        .await
        .expect("the message");
    w.t.dead_letter(&q, &dlq, &m, "it is broken")
        .await
        .expect("dead-letter");
    let dead = w
        .first_before(&dlq, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message in the dead-letter queue");
    assert_eq!(&*dead.body, "bad");
    assert_eq!(attribute(&dead.attributes, attr::TYPE), Some(PLAIN));
    assert_eq!(
        attribute(&dead.attributes, attr::DLQ_REASON),
        Some("it is broken")
    );
    w.nothing_until(
        &q,
        m.received_at + Duration::from_secs(3),
        "past the visibility of a moved message",
    )
    .await;
    w.delete(&dlq, &[dead]).await;
}

#[tokio::test]
async fn dead_letter_keeps_the_fifo_group() {
    let w = World::new().await;
    let (q, dlq) = w.queue_with_dlq("moved-fifo", true, 10).await;
    w.t.send(
        &q,
        vec![fifo_msg("a1", "a", "a1"), fifo_msg("a2", "a", "a2")],
    )
    .await
    .expect("send");
    let head = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the head of the group");
    assert_eq!(&*head.body, "a1");
    w.t.dead_letter(&q, &dlq, &head, "no")
        .await
        .expect("dead-letter");
    let dead = w
        .first_before(&dlq, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message in the dead-letter queue");
    assert_eq!(&*dead.body, "a1");
    assert_eq!(dead.group_id.as_deref(), Some("a"));
    // The move released the group.
    let next = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the next of the group");
    assert_eq!(&*next.body, "a2");
    w.delete(&q, &[next]).await;
    w.delete(&dlq, &[dead]).await;
}
