//! Per-entry results: a call of several entries reports exactly the ones it did not do, and
//! does every other one.

use std::time::Duration;

use tokio::time::Instant;

use sourceflow::transport::{EntryError, SQS_MAX_MESSAGE_BYTES};

use crate::world::{bodies, failures, msg, rx, sized, World, PATIENCE};

#[tokio::test]
async fn a_send_reports_only_the_refused_entry() {
    let w = World::new().await;
    let q = w.queue("send-batch", Duration::from_secs(30)).await;
    let r =
        w.t.send(
            &q,
            vec![msg("first"), sized(SQS_MAX_MESSAGE_BYTES + 1), msg("third")],
        )
        .await;
    let e = r.expect_err("the oversize entry fails");
    assert_eq!(e.total, 3);
    assert!(
        matches!(e.failed[..], [(1, EntryError::Refused(_))]),
        "{e:?}"
    );
    let got = w.collect(&q, 2, PATIENCE, Duration::from_secs(30)).await;
    let mut b = bodies(&got);
    b.sort();
    assert_eq!(b, ["first", "third"]);
    w.delete(&q, &got).await;
}

#[tokio::test]
async fn a_delete_reports_only_the_invalid_receipt() {
    let w = World::new().await;
    let q = w.queue("delete-batch", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("a"), msg("b")]).await.expect("send");
    let got = w.collect(&q, 2, PATIENCE, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 2);
    let taken = got.iter().map(|m| m.received_at).max().expect("two");
    let d = failures(
        w.t.delete(
            &q,
            vec![
                got[0].receipt.clone(),
                "garbage".into(),
                got[1].receipt.clone(),
            ],
        )
        .await,
    );
    assert!(matches!(d[..], [(1, EntryError::InvalidReceipt)]), "{d:?}");
    w.nothing_until(
        &q,
        taken + Duration::from_secs(4),
        "past the visibility of two deleted messages",
    )
    .await;
}

#[tokio::test]
async fn a_visibility_change_reports_only_the_invalid_receipt() {
    let w = World::new().await;
    let q = w.queue("cmv-batch", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("a")]).await.expect("send");
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message");
    let c = failures(
        w.t.change_visibility(
            &q,
            vec!["garbage".into(), m.receipt.clone()],
            Duration::ZERO,
        )
        .await,
    );
    assert!(matches!(c[..], [(0, EntryError::InvalidReceipt)]), "{c:?}");
    let again = w
        .first_before(
            &q,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .await
        .expect("the valid entry was applied");
    w.delete(&q, &[again]).await;
}

#[tokio::test]
async fn an_unknown_destination_fails_every_entry() {
    let w = World::new().await;
    let queue = w.name("never-provisioned");
    let s = failures(w.t.send(&queue, vec![msg("a"), msg("b")]).await);
    assert!(
        matches!(
            s[..],
            [
                (0, EntryError::NoSuchDestination(_)),
                (1, EntryError::NoSuchDestination(_))
            ]
        ),
        "{s:?}"
    );
    let topic = w.name("never-provisioned-topic");
    let p = failures(w.t.publish(&topic, vec![msg("a"), msg("b")]).await);
    assert!(
        matches!(
            p[..],
            [
                (0, EntryError::NoSuchDestination(_)),
                (1, EntryError::NoSuchDestination(_))
            ]
        ),
        "{p:?}"
    );
}

/// `receive_into` appends after what the caller's vector holds (the listener's pollers keep
/// one vector each and receive into it), at most `max` per call, and a long poll that finds
/// nothing leaves the vector as it was.
#[tokio::test]
async fn a_receive_into_appends_to_the_callers_vector() {
    let w = World::new().await;
    let q = w.queue("receive-into", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("a"), msg("b"), msg("c")])
        .await
        .expect("send");
    let request = rx(2, Duration::from_secs(1), Duration::from_secs(30));
    let mut got = Vec::with_capacity(10);
    let deadline = Instant::now() + PATIENCE;
    while got.len() < 3 && Instant::now() < deadline {
        let held: Vec<String> = bodies(&got).iter().map(|b| b.to_string()).collect();
        w.t.receive_into(&q, request, &mut got)
            .await
            .expect("receive");
        assert!(got.len() >= held.len(), "the vector lost what it held");
        assert!(got.len() - held.len() <= 2, "at most `max` per receive");
        assert_eq!(
            bodies(&got[..held.len()]),
            held.iter().map(String::as_str).collect::<Vec<_>>(),
            "what the vector held stays in front"
        );
    }
    let mut b = bodies(&got);
    b.sort();
    assert_eq!(b, ["a", "b", "c"]);
    let had = got.len();
    w.t.receive_into(&q, request, &mut got)
        .await
        .expect("a receive of an empty queue");
    assert_eq!(got.len(), had, "an empty long poll appends nothing");
    w.delete(&q, &got).await;
}
