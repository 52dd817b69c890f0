//! Topics: a copy of each published message for every subscribed queue whose filter policy
//! (on the `sourceflow.type` attribute) accepts it.
//!
//! A subscriber queue that refuses its copy must not keep the others from theirs; no
//! subscription that provisioning allows can refuse, so that case is a unit test of the
//! embedded transport.

use std::time::Duration;

use tokio::time::Instant;

use crate::world::{bodies, fifo_msg, typed, World, PATIENCE};

#[tokio::test]
async fn every_subscriber_gets_what_its_filter_accepts() {
    let w = World::new().await;
    let (topic, queues) = w
        .topic_with(
            "events",
            false,
            &[
                ("all", &[]),
                ("created", &["t.Created.v1"]),
                ("changes", &["t.Created.v1", "t.Changed.v1"]),
            ],
        )
        .await;
    w.t.publish(
        &topic,
        vec![
            typed("created", "t.Created.v1"),
            typed("changed", "t.Changed.v1"),
            typed("deleted", "t.Deleted.v1"),
        ],
    )
    .await
    .expect("publish");
    let expected: [&[&str]; 3] = [
        &["changed", "created", "deleted"],
        &["created"],
        &["changed", "created"],
    ];
    for (q, want) in queues.iter().zip(expected) {
        let got = w.drain(q, want.len(), PATIENCE).await;
        let mut b = bodies(&got);
        b.sort();
        assert_eq!(b, want, "`{q}`");
    }
    // Nothing more arrives: the filters dropped the rest.
    let settle = Instant::now() + Duration::from_secs(1);
    for q in &queues {
        w.nothing_until(q, settle, "after its copies").await;
    }
}

#[tokio::test]
async fn a_fifo_topic_keeps_group_order_in_every_subscriber() {
    let w = World::new().await;
    let (topic, queues) = w
        .topic_with("ordered", true, &[("one", &[]), ("two", &[])])
        .await;
    let messages = (1..=4)
        .map(|i| fifo_msg(&format!("m{i}"), "g", &format!("m{i}")))
        .collect();
    w.t.publish(&topic, messages).await.expect("publish");
    for q in &queues {
        let got = w.drain(q, 4, PATIENCE).await;
        assert_eq!(bodies(&got), ["m1", "m2", "m3", "m4"], "`{q}`");
        assert!(got.iter().all(|m| m.group_id.as_deref() == Some("g")));
    }
}
