//! Visibility: a received message is invisible for the receive's own visibility timeout,
//! then delivered again with its receive count one higher; a visibility change applies.

use std::time::Duration;

use tokio::time::Instant;

use crate::world::{msg, rx, World, PATIENCE, SLACK};

#[tokio::test]
async fn an_in_flight_message_is_invisible_until_the_receives_visibility_ends() {
    let w = World::new().await;
    // The queue's default is 30 s: the message must come back after the receive's 2 s.
    let q = w.queue("vis-short", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let first = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(2))
        .await
        .expect("the message");
    assert_eq!(first.receive_count, 1);
    let taken = first.received_at;
    w.nothing_until(&q, taken + Duration::from_secs(1), "while in flight")
        .await;
    let again = w
        .first_before(&q, taken + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message again after its visibility timeout");
    assert_eq!(&*again.body, "m");
    assert_eq!(again.receive_count, 2);
    assert_eq!(again.broker_id, first.broker_id);
    let after = again.received_at - taken;
    assert!(
        after + SLACK >= Duration::from_secs(2),
        "redelivered {after:?} after the receive, before its 2 s visibility"
    );
    assert!(
        after < Duration::from_secs(10),
        "redelivered only {after:?} after a receive with a 2 s visibility (the queue's 30 s default?)"
    );
    w.delete(&q, &[again]).await;
}

#[tokio::test]
async fn a_receive_visibility_longer_than_the_queue_default_is_honoured() {
    let w = World::new().await;
    let q = w.queue("vis-long", Duration::from_secs(1)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let first = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(4))
        .await
        .expect("the message");
    let taken = first.received_at;
    // Well past the queue's 1 s default, still in flight.
    w.nothing_until(
        &q,
        taken + Duration::from_secs(3),
        "within the receive's 4 s",
    )
    .await;
    let again = w
        .first_before(&q, taken + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message after 4 s");
    assert!(again.received_at - taken + SLACK >= Duration::from_secs(4));
    assert_eq!(again.receive_count, 2);
    w.delete(&q, &[again]).await;
}

#[tokio::test]
async fn every_receive_counts() {
    let w = World::new().await;
    let q = w.queue("counts", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    for expected in 1..=3 {
        let m = w
            .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
            .await
            .expect("the message");
        assert_eq!(m.receive_count, expected);
        if expected < 3 {
            w.t.change_visibility(&q, vec![m.receipt.clone()], Duration::ZERO)
                .await
                .expect("return it");
        } else {
            w.delete(&q, &[m]).await;
        }
    }
}

#[tokio::test]
async fn a_zero_visibility_change_makes_the_message_visible_at_once() {
    let w = World::new().await;
    let q = w.queue("cmv-zero", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let first = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message");
    w.t.change_visibility(&q, vec![first.receipt.clone()], Duration::ZERO)
        .await
        .expect("visibility zero");
    let again = w
        .first_before(
            &q,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .await
        .expect("visible again at once, not after 30 s");
    assert_eq!(again.receive_count, 2);
    w.delete(&q, &[again]).await;
}

#[tokio::test]
async fn a_visibility_change_sets_a_new_timeout_from_now() {
    let w = World::new().await;
    let q = w.queue("cmv-extend", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let first = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(1))
        .await
        .expect("the message");
    let changed = Instant::now();
    w.t.change_visibility(&q, vec![first.receipt.clone()], Duration::from_secs(4))
        .await
        .expect("extend");
    // Its own 1 s is long over; the 4 s from the change are not.
    w.nothing_until(
        &q,
        changed + Duration::from_secs(3),
        "after an extension to 4 s",
    )
    .await;
    let again = w
        .first_before(&q, changed + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message after the extension");
    assert!(again.received_at - changed + SLACK >= Duration::from_secs(4));
    assert_eq!(again.receive_count, 2);
    w.delete(&q, &[again]).await;
}

#[tokio::test]
async fn a_receive_takes_at_most_max() {
    let w = World::new().await;
    let q = w.queue("max", Duration::from_secs(30)).await;
    w.t.send(&q, (0..5).map(|i| msg(&i.to_string())).collect())
        .await
        .expect("send");
    let got = w
        .receive(&q, rx(2, Duration::from_secs(1), Duration::from_secs(30)))
        .await;
    assert!(!got.is_empty() && got.len() <= 2, "{} messages", got.len());
    let rest = w
        .collect(&q, 5 - got.len(), PATIENCE, Duration::from_secs(30))
        .await;
    assert_eq!(got.len() + rest.len(), 5);
}
