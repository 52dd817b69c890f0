//! Delays: a standard queue holds a delayed message back for its delay, up to SQS's 15
//! minutes; FIFO queues and topics take no per-message delay. A refused entry does not
//! keep its neighbours from being sent.

use std::time::Duration;

use tokio::time::Instant;

use sourceflow::transport::{EntryError, MAX_DELAY};

use crate::world::{bodies, delayed, failures, fifo_msg, msg, World, PATIENCE};

#[tokio::test]
async fn a_delayed_message_is_not_delivered_before_its_delay() {
    let w = World::new().await;
    let q = w.queue("delayed", Duration::from_secs(30)).await;
    let sent = Instant::now();
    w.t.send(
        &q,
        vec![delayed("late", Duration::from_secs(2)), msg("now")],
    )
    .await
    .expect("send");
    let first = w
        .first_before(&q, sent + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the undelayed message");
    assert_eq!(&*first.body, "now");
    let late = w
        .first_before(&q, sent + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the delayed message");
    assert_eq!(&*late.body, "late");
    let after = late.received_at - sent;
    assert!(
        after >= Duration::from_secs(2),
        "delivered {after:?} after the send"
    );
    w.delete(&q, &[first, late]).await;
}

#[tokio::test]
async fn a_delay_over_fifteen_minutes_is_refused() {
    let w = World::new().await;
    let q = w.queue("delay-901", Duration::from_secs(30)).await;
    let s = failures(
        w.t.send(
            &q,
            vec![
                msg("one"),
                delayed("too late", MAX_DELAY + Duration::from_secs(1)),
                msg("two"),
            ],
        )
        .await,
    );
    assert!(
        matches!(&s[..], [(1, EntryError::Refused(why))] if why.contains("900")),
        "{s:?}"
    );
    let got = w.drain(&q, 2, PATIENCE).await;
    let mut b = bodies(&got);
    b.sort();
    assert_eq!(b, ["one", "two"]);
}

#[tokio::test]
async fn a_delay_on_a_fifo_queue_is_refused() {
    let w = World::new().await;
    let q = w.fifo_queue("delay-fifo").await;
    let mut late = fifo_msg("late", "g", "late");
    late.delay = Some(Duration::from_secs(1));
    let s = failures(
        w.t.send(
            &q,
            vec![
                fifo_msg("one", "g", "one"),
                late,
                // Of another group: a later message of `g` would be held back behind the
                // refused one (fifo.rs tests that).
                fifo_msg("two", "h", "two"),
            ],
        )
        .await,
    );
    assert!(matches!(s[..], [(1, EntryError::Refused(_))]), "{s:?}");
    let got = w.drain(&q, 2, PATIENCE).await;
    let mut b = bodies(&got);
    b.sort();
    assert_eq!(b, ["one", "two"]);
}

#[tokio::test]
async fn a_delay_on_publish_is_refused() {
    let w = World::new().await;
    let (topic, queues) = w.topic_with("delay-topic", false, &[("sub", &[])]).await;
    let s = failures(
        w.t.publish(
            &topic,
            vec![
                msg("one"),
                delayed("late", Duration::from_secs(1)),
                msg("two"),
            ],
        )
        .await,
    );
    assert!(matches!(s[..], [(1, EntryError::Refused(_))]), "{s:?}");
    let got = w.drain(&queues[0], 2, PATIENCE).await;
    let mut b = bodies(&got);
    b.sort();
    assert_eq!(b, ["one", "two"]);
}
