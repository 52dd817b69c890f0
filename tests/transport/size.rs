//! Size limits, counted as SQS and SNS count them (body plus attribute names, types and
//! values): a queue takes 1 MiB, a topic 256 KiB; one byte more is refused, that entry only.

use sourceflow::transport::{EntryError, SNS_MAX_MESSAGE_BYTES, SQS_MAX_MESSAGE_BYTES};

use crate::world::{failures, msg, sized, World, PATIENCE};

#[tokio::test]
async fn a_queue_takes_one_mib_and_refuses_a_byte_more() {
    let w = World::new().await;
    let q = w
        .queue("size-sqs", std::time::Duration::from_secs(30))
        .await;
    let s = failures(
        w.t.send(
            &q,
            vec![
                sized(SQS_MAX_MESSAGE_BYTES),
                sized(SQS_MAX_MESSAGE_BYTES + 1),
                msg("small"),
            ],
        )
        .await,
    );
    assert!(matches!(s[..], [(1, EntryError::Refused(_))]), "{s:?}");
    let got = w.drain(&q, 2, PATIENCE).await;
    let mut lengths: Vec<usize> = got.iter().map(|m| m.body.len()).collect();
    lengths.sort();
    let full = sized(SQS_MAX_MESSAGE_BYTES).body.len();
    assert_eq!(lengths, [5, full], "the small one and the full one, whole");
}

#[tokio::test]
async fn a_topic_takes_256_kib_and_refuses_a_byte_more() {
    let w = World::new().await;
    let (topic, queues) = w.topic_with("size-sns", false, &[("sub", &[])]).await;
    let p = failures(
        w.t.publish(
            &topic,
            vec![
                sized(SNS_MAX_MESSAGE_BYTES),
                sized(SNS_MAX_MESSAGE_BYTES + 1),
                msg("small"),
            ],
        )
        .await,
    );
    assert!(matches!(p[..], [(1, EntryError::Refused(_))]), "{p:?}");
    let got = w.drain(&queues[0], 2, PATIENCE).await;
    let mut lengths: Vec<usize> = got.iter().map(|m| m.body.len()).collect();
    lengths.sort();
    let full = sized(SNS_MAX_MESSAGE_BYTES).body.len();
    assert_eq!(lengths, [5, full], "the small one and the full one, whole");
}
