//! The SQS calls of the data plane: send, receive, delete, change visibility, dead-letter,
//! queue depth.
//!
//! Sends, deletes and visibility changes go through a batcher (see
//! [`batcher`](super::batcher)); the flushes here split what it gathered into batch calls
//! (10 entries, and for sends 1 MiB in total) and retry what failed transiently (see
//! [`retry`](super::retry)).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry,
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;

use super::batcher::{chunks, in_group_order, Failures, Flush};
use super::errors::{aws_error, sdk_error, Resource};
use super::retry::{with_retries, Answer, EntryFailure, POLICY};
use crate::envelope::{attr, AttributeValue, OutgoingMessage};
use crate::error::{EntryError, Result};
use crate::transport::{
    QueueDepth, Receipt, Receive, ReceivedMessage, MAX_BATCH_ENTRIES, MAX_DELAY, MAX_VISIBILITY,
    SQS_MAX_MESSAGE_BYTES,
};

/// Most bytes one `SendMessageBatch` carries, all entries together (body plus attributes,
/// as [`OutgoingMessage::size`] counts them).
pub(crate) const SQS_MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Longest a reason attached to a dead-lettered message is, in characters.
pub(crate) const MAX_REASON_CHARS: usize = 1000;

/// Whole seconds, rounded up.
pub(crate) fn secs_ceil(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Why SQS would refuse `m` on `queue` (checked before the wire: emulators accept some of
/// it, and one such entry must not fail its neighbours).
pub(crate) fn check_send(queue: &str, m: &OutgoingMessage) -> std::result::Result<(), EntryError> {
    if let Err(e) = m.check_size(queue, SQS_MAX_MESSAGE_BYTES) {
        return Err(EntryError::Refused(e.to_string()));
    }
    m.check_attributes().map_err(EntryError::Refused)?;
    // SQS refuses the whole batch when one entry to a FIFO queue has no group.
    if queue.ends_with(".fifo") && m.group_id.is_none() {
        return Err(EntryError::Refused(format!(
            "FIFO queue `{queue}` needs a MessageGroupId ({} has none)",
            m.wire_name
        )));
    }
    if let Some(d) = m.delay {
        if queue.ends_with(".fifo") {
            return Err(EntryError::Refused(format!(
                "FIFO queue `{queue}` takes no per-message delay ({} wants {d:?})",
                m.wire_name
            )));
        }
        if d > MAX_DELAY {
            return Err(EntryError::Refused(format!(
                "a delay of {d:?} is longer than the {} s SQS accepts",
                MAX_DELAY.as_secs()
            )));
        }
    }
    Ok(())
}

/// Why SQS would refuse a visibility timeout.
pub(crate) fn check_visibility(timeout: Duration) -> std::result::Result<i32, EntryError> {
    if timeout > MAX_VISIBILITY {
        return Err(EntryError::Refused(format!(
            "a visibility timeout of {timeout:?} is longer than the {} s SQS accepts",
            MAX_VISIBILITY.as_secs()
        )));
    }
    // At most 43,200: fits.
    Ok(secs_ceil(timeout) as i32)
}

fn failure(f: &BatchResultErrorEntry) -> EntryFailure {
    EntryFailure {
        id: f.id().to_string(),
        code: f.code().to_string(),
        message: f.message().map(str::to_string),
        sender_fault: f.sender_fault(),
    }
}

/// An SQS attribute of the value's own `DataType` (`String`, `Number`, `String.Array`).
fn sqs_attribute(v: &AttributeValue) -> std::result::Result<MessageAttributeValue, EntryError> {
    MessageAttributeValue::builder()
        .data_type(v.data_type())
        .string_value(v.as_str())
        .build()
        .map_err(|e| EntryError::Refused(format!("invalid attribute: {e}")))
}

/// The request entry for `m`, with id `id`.
fn send_entry(
    id: usize,
    m: &OutgoingMessage,
) -> std::result::Result<SendMessageBatchRequestEntry, EntryError> {
    let mut attributes = HashMap::with_capacity(m.attributes.len());
    for (k, v) in m.attributes.iter() {
        attributes.insert(k.to_string(), sqs_attribute(v)?);
    }
    let mut e = SendMessageBatchRequestEntry::builder()
        .id(id.to_string())
        .message_body(&*m.body)
        .set_message_attributes(Some(attributes));
    if let Some(g) = &m.group_id {
        e = e.message_group_id(g);
    }
    if let Some(d) = &m.dedup_id {
        e = e.message_deduplication_id(d);
    }
    if let Some(d) = m.delay {
        // Checked before: at most 900.
        e = e.delay_seconds(secs_ceil(d) as i32);
    }
    e.build()
        .map_err(|e| EntryError::Refused(format!("invalid entry: {e}")))
}

/// Sends to one queue: what a send batcher gathered.
pub(crate) struct SendFlush {
    pub(crate) sqs: Client,
    pub(crate) queue: String,
    pub(crate) url: String,
}

#[async_trait]
impl Flush for SendFlush {
    type Entry = OutgoingMessage;

    async fn flush(&self, messages: Vec<OutgoingMessage>) -> Failures {
        send_batches(&self.sqs, &self.queue, &self.url, &messages).await
    }
}

/// `SendMessageBatch` calls for `messages`: at most 10 entries and 1 MiB each, one after
/// the other in group order (see [`in_group_order`]), failed entries retried as [`POLICY`]
/// says.
pub(crate) async fn send_batches(
    sqs: &Client,
    queue: &str,
    url: &str,
    messages: &[OutgoingMessage],
) -> Failures {
    in_group_order(messages, SQS_MAX_BATCH_BYTES, |carry| {
        send_batch(sqs, queue, url, messages, carry)
    })
    .await
}

/// One `SendMessageBatch` call (and its retries) for the entries `carry` of `messages`;
/// failures by index into `messages`.
async fn send_batch(
    sqs: &Client,
    queue: &str,
    url: &str,
    messages: &[OutgoingMessage],
    carry: Vec<usize>,
) -> Failures {
    let built: Vec<_> = carry
        .iter()
        .enumerate()
        .map(|(k, i)| send_entry(k, &messages[*i]))
        .collect();
    let done = with_retries(carry.len(), POLICY, |pending| {
        let mut entries = Vec::with_capacity(pending.len());
        let mut refused = Vec::new();
        for k in pending {
            match &built[k] {
                Ok(e) => entries.push(e.clone()),
                Err(e) => refused.push((k, e.clone())),
            }
        }
        let call = sqs
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries));
        async move {
            let out = call.send().await.map_err(|e| {
                aws_error("SendMessageBatch", Resource::Queue(queue.to_string()), &e).entry_error()
            })?;
            Ok(answer(
                out.successful().iter().map(|s| s.id().to_string()),
                out.failed(),
                refused,
            ))
        }
    })
    .await;
    done.into_iter().map(|(k, e)| (carry[k], e)).collect()
}

/// The answer of a batch call, with the entries that could not even be built reported as
/// refused sender faults.
fn answer(
    succeeded: impl Iterator<Item = String>,
    failed: &[BatchResultErrorEntry],
    unbuilt: Vec<(usize, EntryError)>,
) -> Answer {
    let mut failed: Vec<EntryFailure> = failed.iter().map(failure).collect();
    failed.extend(unbuilt.into_iter().map(|(i, e)| EntryFailure {
        id: i.to_string(),
        code: "InvalidEntry".into(),
        message: Some(e.to_string()),
        sender_fault: true,
    }));
    Answer {
        succeeded: succeeded.collect(),
        failed,
    }
}

/// Deletes from one queue: what a delete batcher gathered (receipts).
pub(crate) struct DeleteFlush {
    pub(crate) sqs: Client,
    pub(crate) queue: String,
    pub(crate) url: String,
}

#[async_trait]
impl Flush for DeleteFlush {
    type Entry = Receipt;

    async fn flush(&self, receipts: Vec<Receipt>) -> Failures {
        let keys: Vec<&str> = receipts.iter().map(|r| &**r).collect();
        let sizes: Vec<usize> = receipts.iter().map(|r| r.len()).collect();
        let mut failures = Vec::new();
        for range in chunks(&sizes, Some(&keys), MAX_BATCH_ENTRIES, usize::MAX) {
            let offset = range.start;
            let chunk = &receipts[range];
            let done = with_retries(chunk.len(), POLICY, |pending| {
                let entries: std::result::Result<Vec<_>, _> = pending
                    .iter()
                    .map(|i| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(&*chunk[*i])
                            .build()
                    })
                    .collect();
                let call = self
                    .sqs
                    .delete_message_batch()
                    .queue_url(&self.url)
                    .set_entries(entries.ok());
                async move {
                    let out = call.send().await.map_err(|e| {
                        aws_error(
                            "DeleteMessageBatch",
                            Resource::Queue(self.queue.clone()),
                            &e,
                        )
                        .entry_error()
                    })?;
                    Ok(answer(
                        out.successful().iter().map(|s| s.id().to_string()),
                        out.failed(),
                        Vec::new(),
                    ))
                }
            })
            .await;
            failures.extend(done.into_iter().map(|(i, e)| (i + offset, e)));
        }
        failures
    }
}

/// Visibility changes on one queue: what a visibility batcher gathered (receipt and
/// timeout in seconds; entries with different timeouts share a call).
pub(crate) struct VisibilityFlush {
    pub(crate) sqs: Client,
    pub(crate) queue: String,
    pub(crate) url: String,
}

#[async_trait]
impl Flush for VisibilityFlush {
    type Entry = (Receipt, i32);

    async fn flush(&self, changes: Vec<(Receipt, i32)>) -> Failures {
        let keys: Vec<&str> = changes.iter().map(|(r, _)| &**r).collect();
        let sizes: Vec<usize> = changes.iter().map(|(r, _)| r.len()).collect();
        let mut failures = Vec::new();
        for range in chunks(&sizes, Some(&keys), MAX_BATCH_ENTRIES, usize::MAX) {
            let offset = range.start;
            let chunk = &changes[range];
            let done = with_retries(chunk.len(), POLICY, |pending| {
                let entries: std::result::Result<Vec<_>, _> = pending
                    .iter()
                    .map(|i| {
                        let (receipt, timeout) = &chunk[*i];
                        ChangeMessageVisibilityBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(&**receipt)
                            .visibility_timeout(*timeout)
                            .build()
                    })
                    .collect();
                let call = self
                    .sqs
                    .change_message_visibility_batch()
                    .queue_url(&self.url)
                    .set_entries(entries.ok());
                async move {
                    let out = call.send().await.map_err(|e| {
                        aws_error(
                            "ChangeMessageVisibilityBatch",
                            Resource::Queue(self.queue.clone()),
                            &e,
                        )
                        .entry_error()
                    })?;
                    Ok(answer(
                        out.successful().iter().map(|s| s.id().to_string()),
                        out.failed(),
                        Vec::new(),
                    ))
                }
            })
            .await;
            failures.extend(done.into_iter().map(|(i, e)| (i + offset, e)));
        }
        failures
    }
}

/// One `ReceiveMessage`: the receive's own visibility timeout, the receive count and the
/// group id asked for. Never cut short here: it returns when SQS answers (or the SDK's
/// attempt timeout, longer than any long poll, fails it).
pub(crate) async fn receive(
    sqs: &Client,
    queue: &str,
    url: &str,
    request: Receive,
) -> Result<Vec<ReceivedMessage>> {
    let out = sqs
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(request.max.clamp(1, MAX_BATCH_ENTRIES) as i32)
        .wait_time_seconds(secs_ceil(request.wait).min(20) as i32)
        .visibility_timeout(secs_ceil(request.visibility).min(MAX_VISIBILITY.as_secs()) as i32)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
        .send()
        .await
        .map_err(|e| sdk_error("ReceiveMessage", Resource::Queue(queue.to_string()), &e))?;
    let received_at = tokio::time::Instant::now();
    Ok(out
        .messages()
        .iter()
        .map(|m| {
            let system = m.attributes();
            let get = |n: MessageSystemAttributeName| system.and_then(|s| s.get(&n)).cloned();
            // Binary attributes (a foreign producer's) are left out: sourceflow carries none.
            let mut attributes: Vec<(crate::AttributeName, AttributeValue)> = m
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .filter_map(|(k, v)| {
                            let value = v.string_value()?.to_string();
                            Some((
                                k.clone().into(),
                                AttributeValue::from_wire(v.data_type(), value)?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            attributes.sort_by(|a, b| a.0.cmp(&b.0));
            ReceivedMessage {
                received_at,
                broker_id: m.message_id().unwrap_or_default().into(),
                receipt: m.receipt_handle().unwrap_or_default().into(),
                body: std::sync::Arc::from(m.body().unwrap_or_default()),
                attributes: attributes.into(),
                receive_count: get(MessageSystemAttributeName::ApproximateReceiveCount)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1),
                group_id: get(MessageSystemAttributeName::MessageGroupId).map(Into::into),
            }
        })
        .collect())
}

/// `SendMessage` of a copy of `message` to the dead-letter queue, with `reason` attached
/// (cut to [`MAX_REASON_CHARS`]); on a FIFO queue in the message's own group, deduplicated
/// by the broker's message id (a second move of the same message is a duplicate).
pub(crate) async fn copy_to_dead_letter(
    sqs: &Client,
    dlq: &str,
    dlq_url: &str,
    message: &ReceivedMessage,
    reason: &str,
) -> Result<()> {
    let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
    let mut attributes: HashMap<String, MessageAttributeValue> = HashMap::new();
    let refused = |e: EntryError| crate::error::Error::Transport {
        transport: "aws",
        operation: "SendMessage".into(),
        source: format!("queue `{dlq}`: {e}").into(),
    };
    for (k, v) in message
        .attributes
        .iter()
        .filter(|(k, _)| k != attr::DLQ_REASON)
    {
        attributes.insert(k.to_string(), sqs_attribute(v).map_err(refused)?);
    }
    attributes.insert(
        attr::DLQ_REASON.to_string(),
        sqs_attribute(&AttributeValue::String(reason.into())).map_err(refused)?,
    );
    let mut req = sqs
        .send_message()
        .queue_url(dlq_url)
        .message_body(&*message.body)
        .set_message_attributes(Some(attributes));
    if dlq.ends_with(".fifo") {
        req = req
            .message_group_id(message.group_id.as_deref().unwrap_or("dead-letter"))
            .message_deduplication_id(&*message.broker_id);
    }
    req.send()
        .await
        .map_err(|e| sdk_error("SendMessage", Resource::Queue(dlq.to_string()), &e))?;
    Ok(())
}

/// `ApproximateNumberOfMessages*` of a queue.
pub(crate) async fn depth(sqs: &Client, queue: &str, url: &str) -> Result<QueueDepth> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| sdk_error("GetQueueAttributes", Resource::Queue(queue.to_string()), &e))?;
    let get = |n: QueueAttributeName| {
        out.attributes()
            .and_then(|a| a.get(&n))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(QueueDepth {
        visible: get(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: usize, delay: Option<Duration>) -> OutgoingMessage {
        OutgoingMessage {
            body: "x".repeat(body).into(),
            attributes: vec![("sourceflow.type".into(), "t".into())].into(),
            group_id: None,
            dedup_id: None,
            delay,
            wire_name: "t".into(),
            message_id: "m".into(),
        }
    }

    #[test]
    fn sends_are_checked_before_the_wire() {
        assert_eq!(check_send("q", &msg(10, Some(MAX_DELAY))), Ok(()));
        assert!(matches!(
            check_send("q", &msg(10, Some(MAX_DELAY + Duration::from_secs(1)))),
            Err(EntryError::Refused(why)) if why.contains("900 s")
        ));
        // Not even half a second over.
        assert!(check_send("q", &msg(10, Some(MAX_DELAY + Duration::from_millis(500)))).is_err());
        assert!(matches!(
            check_send("q.fifo", &msg(10, Some(Duration::from_secs(1)))),
            Err(EntryError::Refused(why)) if why.contains("FIFO")
        ));
        assert!(check_send("q", &msg(SQS_MAX_MESSAGE_BYTES, None)).is_err());
        assert!(check_send("q", &msg(SQS_MAX_MESSAGE_BYTES - 100, None)).is_ok());
    }

    #[test]
    fn visibility_timeouts_over_twelve_hours_are_refused() {
        assert_eq!(check_visibility(MAX_VISIBILITY), Ok(43_200));
        assert_eq!(check_visibility(Duration::from_millis(1500)), Ok(2));
        assert!(matches!(
            check_visibility(MAX_VISIBILITY + Duration::from_secs(1)),
            Err(EntryError::Refused(_))
        ));
    }
}
