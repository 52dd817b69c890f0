//! Moving dead letters back to the queue they came from (an operator's action, not part of
//! the data path).

use std::borrow::Cow;
use std::time::Duration;

use crate::envelope::{attr, OutgoingMessage};
use crate::error::Result;
use crate::transport::{Receive, Transport};

/// How long a redriven batch stays invisible in the dead-letter queue while it is copied.
const REDRIVE_VISIBILITY: Duration = Duration::from_secs(60);

/// Moves every message of `dead_letter_queue` back to `source_queue` — body, attributes
/// (without the dead-letter reason) and FIFO group id kept — and returns how many moved.
/// Each message is sent before it is deleted, so a failure midway duplicates rather than
/// loses; receivers are idempotent by message id.
pub async fn redrive(
    transport: &dyn Transport,
    dead_letter_queue: &str,
    source_queue: &str,
) -> Result<usize> {
    let mut moved = 0;
    loop {
        let request = Receive {
            max: 10,
            wait: Duration::from_secs(1),
            visibility: REDRIVE_VISIBILITY,
        };
        let batch = transport.receive(dead_letter_queue, request).await?;
        if batch.is_empty() {
            return Ok(moved);
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut receipts = Vec::with_capacity(batch.len());
        for m in batch {
            let wire_name = crate::envelope::attribute(&m.attributes, attr::TYPE)
                .map_or(Cow::Borrowed("redriven"), |t| Cow::Owned(t.to_string()));
            out.push(OutgoingMessage {
                body: m.body,
                attributes: m
                    .attributes
                    .iter()
                    .filter(|(k, _)| k != attr::DLQ_REASON)
                    .cloned()
                    .collect(),
                // A fresh deduplication id: the original one may still be in the window.
                dedup_id: m
                    .group_id
                    .as_ref()
                    .map(|_| format!("redrive-{}", m.broker_id)),
                group_id: m.group_id.map(|g| g.to_string()),
                delay: None,
                wire_name,
                message_id: m.broker_id.to_string(),
            });
            receipts.push(m.receipt);
        }
        // Delete exactly what was sent: a refused entry stays in the dead-letter queue.
        let sent = transport.send(source_queue, out).await;
        if let Err(e) = &sent {
            let failed: std::collections::HashSet<usize> = e.failed_indices().collect();
            receipts = receipts
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(i))
                .map(|(_, r)| r)
                .collect();
        }
        let n = receipts.len();
        if n > 0 {
            transport.delete(dead_letter_queue, receipts).await?;
        }
        moved += n;
        sent?;
        tracing::info!(
            from = dead_letter_queue,
            to = source_queue,
            moved = n,
            "redrove messages"
        );
    }
}
