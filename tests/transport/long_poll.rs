//! Abandoned long polls, as SQS has them: a receive whose caller stops waiting goes on on
//! the broker's side until its wait ends, and a message it takes meanwhile is received
//! (its count goes up) and stays invisible for that receive's visibility timeout.

use std::time::Duration;

use tokio::time::Instant;

use crate::world::{msg, rx, World, PATIENCE, SLACK};

#[tokio::test]
async fn an_abandoned_long_poll_takes_a_message_that_stays_in_flight() {
    let w = World::new().await;
    let q = w.queue("abandoned", Duration::from_secs(30)).await;
    let poll =
        w.t.receive(&q, rx(10, Duration::from_secs(10), Duration::from_secs(3)));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), poll)
            .await
            .is_err(),
        "nothing to receive yet"
    );
    let sent = Instant::now();
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    // Let the abandoned poll, still waiting on the broker's side, take it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.nothing_until(
        &q,
        sent + Duration::from_secs(2),
        "a message the abandoned poll took",
    )
    .await;
    let back = w
        .first_before(&q, sent + PATIENCE, Duration::from_secs(30))
        .await
        .expect("back after the abandoned poll's visibility timeout");
    assert!(
        back.received_at - sent + SLACK >= Duration::from_secs(3),
        "back {:?} after the send",
        back.received_at - sent
    );
    assert_eq!(back.receive_count, 2, "the abandoned poll received it once");
    w.delete(&q, &[back]).await;
}

#[tokio::test]
async fn an_abandoned_long_poll_ends_with_its_wait() {
    let w = World::new().await;
    let q = w.queue("abandoned-ends", Duration::from_secs(30)).await;
    let started = Instant::now();
    let poll =
        w.t.receive(&q, rx(10, Duration::from_secs(2), Duration::from_secs(30)));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), poll)
            .await
            .is_err(),
        "nothing to receive yet"
    );
    // A second after its wait ended, the abandoned poll takes nothing more.
    tokio::time::sleep_until(started + Duration::from_secs(3)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    // The time an abandoned poll that still waited would need to take it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message, for the next receive");
    assert_eq!(m.receive_count, 1);
    w.delete(&q, &[m]).await;
}
