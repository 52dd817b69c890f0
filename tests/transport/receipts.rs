//! Receipts: what `delete` and `change_visibility` do with the latest receipt, an earlier
//! one, one of a deleted message, one whose visibility ended, and one never issued.

use std::time::Duration;

use tokio::time::Instant;

use sourceflow::transport::EntryError;

use crate::world::{failures, msg, World, PATIENCE};

#[tokio::test]
async fn deleting_twice_is_accepted_and_the_message_is_gone() {
    let w = World::new().await;
    let q = w.queue("delete-twice", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(2))
        .await
        .expect("the message");
    w.t.delete(&q, vec![m.receipt.clone()])
        .await
        .expect("delete");
    w.t.delete(&q, vec![m.receipt.clone()])
        .await
        .expect("a second delete with the same receipt is accepted");
    w.nothing_until(
        &q,
        m.received_at + Duration::from_secs(4),
        "past the visibility of a deleted message",
    )
    .await;
}

#[tokio::test]
async fn a_receipt_never_issued_is_invalid() {
    let w = World::new().await;
    let q = w.queue("garbage", Duration::from_secs(30)).await;
    let d = failures(w.t.delete(&q, vec!["garbage".into()]).await);
    assert!(matches!(d[..], [(0, EntryError::InvalidReceipt)]), "{d:?}");
    let c = failures(
        w.t.change_visibility(&q, vec!["garbage".into()], Duration::ZERO)
            .await,
    );
    assert!(matches!(c[..], [(0, EntryError::InvalidReceipt)]), "{c:?}");
}

#[tokio::test]
async fn an_earlier_receipt_is_accepted() {
    let w = World::new().await;
    let q = w.queue("stale", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let first = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(1))
        .await
        .expect("the message");
    let second = w
        .first_before(&q, first.received_at + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message again");
    assert_eq!(second.receive_count, 2);
    // SQS: "the request succeeds, but the message might not be deleted" (LocalStack does
    // delete it; the embedded transport does not). Only success is the contract, for a
    // visibility change with it too (not checked: SQS does not document it).
    let _ =
        w.t.change_visibility(&q, vec![first.receipt.clone()], Duration::ZERO)
            .await;
    w.t.delete(&q, vec![first.receipt.clone()])
        .await
        .expect("a delete with an earlier receipt succeeds");
    // Whatever the earlier receipt did, the latest one still settles the message.
    w.t.delete(&q, vec![second.receipt.clone()])
        .await
        .expect("delete with the latest receipt");
    w.nothing_until(
        &q,
        Instant::now() + Duration::from_secs(2),
        "after the delete",
    )
    .await;
}

#[tokio::test]
async fn the_latest_receipt_deletes_after_the_visibility_ended() {
    let w = World::new().await;
    let q = w.queue("expired-delete", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(1))
        .await
        .expect("the message");
    // Visible again, and nobody received it since.
    tokio::time::sleep_until(m.received_at + Duration::from_secs(2)).await;
    w.t.delete(&q, vec![m.receipt.clone()])
        .await
        .expect("delete after expiry");
    w.nothing_until(
        &q,
        Instant::now() + Duration::from_secs(2),
        "after the delete",
    )
    .await;
}

#[tokio::test]
async fn changing_the_visibility_after_it_ended_changes_nothing() {
    let w = World::new().await;
    let q = w.queue("expired-cmv", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(1))
        .await
        .expect("the message");
    tokio::time::sleep_until(m.received_at + Duration::from_secs(2)).await;
    w.t.change_visibility(&q, vec![m.receipt.clone()], Duration::from_secs(30))
        .await
        .expect("a visibility change after expiry is accepted");
    let again = w
        .first_before(
            &q,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .await
        .expect("still visible: the change had no effect");
    assert_eq!(again.receive_count, 2);
    w.delete(&q, &[again]).await;
}

#[tokio::test]
async fn changing_the_visibility_of_a_deleted_message_fails() {
    let w = World::new().await;
    let q = w.queue("deleted-cmv", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(30))
        .await
        .expect("the message");
    w.delete(&q, std::slice::from_ref(&m)).await;
    let c = failures(
        w.t.change_visibility(&q, vec![m.receipt.clone()], Duration::from_secs(5))
            .await,
    );
    assert!(matches!(c[..], [(0, _)]), "{c:?}");
}

#[tokio::test]
async fn a_visibility_over_twelve_hours_is_refused() {
    let w = World::new().await;
    let q = w.queue("cmv-12h", Duration::from_secs(30)).await;
    w.t.send(&q, vec![msg("m")]).await.expect("send");
    let m = w
        .first_before(&q, Instant::now() + PATIENCE, Duration::from_secs(2))
        .await
        .expect("the message");
    let c = failures(
        w.t.change_visibility(&q, vec![m.receipt.clone()], Duration::from_secs(43_201))
            .await,
    );
    assert!(matches!(c[..], [(0, EntryError::Refused(_))]), "{c:?}");
    // Refused means not applied: its 2 s visibility still runs out.
    let again = w
        .first_before(&q, m.received_at + PATIENCE, Duration::from_secs(30))
        .await
        .expect("back after its own 2 s");
    w.delete(&q, &[again]).await;
}
