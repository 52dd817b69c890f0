//! SNS publishing: `PublishBatch` calls of at most 10 entries and 256 KiB in total.
//!
//! Publishes are coalesced like sends: handlers that raise one event each under
//! concurrency would otherwise make one call per event (a request is what AWS bills), and
//! the batcher keeps each caller's entries in order, which a FIFO topic needs.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;

use super::batcher::{in_group_order, Failures, Flush};
use super::errors::{aws_error, Resource};
use super::retry::{with_retries, Answer, EntryFailure, POLICY};
use crate::envelope::OutgoingMessage;
use crate::error::EntryError;
use crate::transport::SNS_MAX_MESSAGE_BYTES;

/// Most bytes one `PublishBatch` carries, all entries together.
pub(crate) const SNS_MAX_BATCH_BYTES: usize = 256 * 1024;

/// Why SNS would refuse `m` on `topic`, checked before the wire.
pub(crate) fn check_publish(
    topic: &str,
    m: &OutgoingMessage,
) -> std::result::Result<(), EntryError> {
    if let Err(e) = m.check_size(topic, SNS_MAX_MESSAGE_BYTES) {
        return Err(EntryError::Refused(e.to_string()));
    }
    m.check_attributes().map_err(EntryError::Refused)?;
    if let Some(d) = m.delay {
        return Err(EntryError::Refused(format!(
            "SNS topics take no per-message delay ({} to `{topic}` wants {d:?})",
            m.wire_name
        )));
    }
    Ok(())
}

fn publish_entry(
    id: usize,
    m: &OutgoingMessage,
) -> std::result::Result<PublishBatchRequestEntry, EntryError> {
    let mut attributes = HashMap::with_capacity(m.attributes.len());
    for (k, v) in m.attributes.iter() {
        let a = MessageAttributeValue::builder()
            .data_type(v.data_type())
            .string_value(v.as_str())
            .build()
            .map_err(|e| EntryError::Refused(format!("invalid attribute: {e}")))?;
        attributes.insert(k.to_string(), a);
    }
    let mut e = PublishBatchRequestEntry::builder()
        .id(id.to_string())
        .message(&*m.body)
        .set_message_attributes(Some(attributes));
    if let Some(g) = &m.group_id {
        e = e.message_group_id(g);
    }
    if let Some(d) = &m.dedup_id {
        e = e.message_deduplication_id(d);
    }
    e.build()
        .map_err(|e| EntryError::Refused(format!("invalid entry: {e}")))
}

/// Publishes to one topic: what a publish batcher gathered.
pub(crate) struct PublishFlush {
    pub(crate) sns: Client,
    pub(crate) topic: String,
    pub(crate) arn: String,
}

#[async_trait]
impl Flush for PublishFlush {
    type Entry = OutgoingMessage;

    async fn flush(&self, messages: Vec<OutgoingMessage>) -> Failures {
        in_group_order(&messages, SNS_MAX_BATCH_BYTES, |carry| {
            self.publish_batch(&messages, carry)
        })
        .await
    }
}

impl PublishFlush {
    /// One `PublishBatch` call (and its retries) for the entries `carry` of `messages`;
    /// failures by index into `messages`.
    async fn publish_batch(&self, messages: &[OutgoingMessage], carry: Vec<usize>) -> Failures {
        let built: Vec<_> = carry
            .iter()
            .enumerate()
            .map(|(k, i)| publish_entry(k, &messages[*i]))
            .collect();
        let done = with_retries(carry.len(), POLICY, |pending| {
            let mut entries = Vec::with_capacity(pending.len());
            let mut unbuilt = Vec::new();
            for k in pending {
                match &built[k] {
                    Ok(e) => entries.push(e.clone()),
                    Err(e) => unbuilt.push(EntryFailure {
                        id: k.to_string(),
                        code: "InvalidEntry".into(),
                        message: Some(e.to_string()),
                        sender_fault: true,
                    }),
                }
            }
            let call = self
                .sns
                .publish_batch()
                .topic_arn(&self.arn)
                .set_publish_batch_request_entries(Some(entries));
            async move {
                let out = call.send().await.map_err(|e| {
                    aws_error("PublishBatch", Resource::Topic(self.topic.clone()), &e).entry_error()
                })?;
                let mut failed: Vec<EntryFailure> = out
                    .failed()
                    .iter()
                    .map(|f| EntryFailure {
                        id: f.id().to_string(),
                        code: f.code().to_string(),
                        message: f.message().map(str::to_string),
                        sender_fault: f.sender_fault(),
                    })
                    .collect();
                failed.extend(unbuilt);
                Ok(Answer {
                    succeeded: out
                        .successful()
                        .iter()
                        .filter_map(|s| s.id().map(str::to_string))
                        .collect(),
                    failed,
                })
            }
        })
        .await;
        done.into_iter().map(|(k, e)| (carry[k], e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_with_a_delay_or_over_256_kib_is_refused() {
        let mut m = OutgoingMessage {
            body: "{}".into(),
            attributes: Vec::new().into(),
            group_id: None,
            dedup_id: None,
            delay: Some(std::time::Duration::from_secs(5)),
            wire_name: "t".into(),
            message_id: "m".into(),
        };
        assert!(matches!(
            check_publish("events", &m),
            Err(EntryError::Refused(why)) if why.contains("SNS topics take no per-message delay")
        ));
        m.delay = None;
        assert_eq!(check_publish("events", &m), Ok(()));
        m.body = "x".repeat(SNS_MAX_MESSAGE_BYTES + 1).into();
        assert!(check_publish("events", &m).is_err());
    }
}
