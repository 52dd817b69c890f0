//! An SQS record of a Lambda event, as the listener's stages take a received message.

use std::sync::Arc;

use aws_lambda_events::event::sqs::SqsMessage;

use crate::attribute::AttributeValue;
use crate::transport::ReceivedMessage;

/// Why a record of the event cannot be handled at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A field the event source mapping always sets is absent.
    #[error("SQS record {id} has no `{field}`: not an event of an SQS event source mapping")]
    Missing {
        /// The record's `messageId`, or its position in the batch when that is absent.
        id: String,
        /// The absent field.
        field: &'static str,
    },
}

/// The record as the transport would have received it: body, string and number message
/// attributes (sorted by name, as a receive returns them; binary ones are left out as
/// there), the receipt handle (the event source mapping's: deletes and visibility changes
/// with it are real), `ApproximateReceiveCount` and `MessageGroupId`.
pub(crate) fn received(
    index: usize,
    record: &SqsMessage,
    at: tokio::time::Instant,
) -> Result<ReceivedMessage, RecordError> {
    let id = record
        .message_id
        .clone()
        .ok_or_else(|| missing(format!("#{index}"), "messageId"))?;
    let receipt = record
        .receipt_handle
        .clone()
        .ok_or_else(|| missing(id.clone(), "receiptHandle"))?;
    let mut attributes: Vec<(crate::AttributeName, AttributeValue)> = record
        .message_attributes
        .iter()
        .filter_map(|(name, a)| {
            let value = a.string_value.clone()?;
            let kind = a.data_type.as_deref().unwrap_or("String");
            Some((name.clone().into(), AttributeValue::from_wire(kind, value)?))
        })
        .collect();
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(ReceivedMessage {
        receive_count: record
            .attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1),
        group_id: record
            .attributes
            .get("MessageGroupId")
            .map(|g| Arc::from(g.as_str())),
        broker_id: id.into(),
        receipt: receipt.into(),
        body: Arc::from(record.body.as_deref().unwrap_or_default()),
        attributes: attributes.into(),
        received_at: at,
    })
}

fn missing(id: String, field: &'static str) -> RecordError {
    RecordError::Missing { id, field }
}

/// The queue name of an SQS ARN (`arn:aws:sqs:region:account:name`).
pub(crate) fn queue_of(arn: &str) -> &str {
    arn.rsplit(':').next().unwrap_or(arn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::event::sqs::SqsMessageAttribute;

    fn attribute(kind: &str, value: &str) -> SqsMessageAttribute {
        let mut a = SqsMessageAttribute::default();
        a.data_type = Some(kind.into());
        a.string_value = Some(value.into());
        a
    }

    #[test]
    fn a_record_becomes_the_message_a_receive_returns() {
        let mut r = SqsMessage::default();
        r.message_id = Some("m-1".into());
        r.receipt_handle = Some("rh".into());
        r.body = Some("{}".into());
        r.attributes
            .insert("ApproximateReceiveCount".into(), "3".into());
        r.attributes.insert("MessageGroupId".into(), "g".into());
        r.message_attributes
            .insert("z".into(), attribute("String", "s"));
        r.message_attributes
            .insert("a".into(), attribute("Number", "4"));
        let mut bin = SqsMessageAttribute::default();
        bin.data_type = Some("Binary".into());
        r.message_attributes.insert("b".into(), bin);
        let m = received(0, &r, tokio::time::Instant::now()).expect("complete record");
        assert_eq!((&*m.broker_id, &*m.receipt), ("m-1", "rh"));
        assert_eq!((m.receive_count, m.group_id.as_deref()), (3, Some("g")));
        assert_eq!(
            &*m.attributes,
            &[
                ("a".into(), AttributeValue::Number("4".into())),
                ("z".into(), AttributeValue::String("s".into())),
            ]
        );
    }

    #[test]
    fn a_record_without_a_receipt_is_refused_by_name() {
        let mut r = SqsMessage::default();
        r.message_id = Some("m-1".into());
        let e = received(0, &r, tokio::time::Instant::now()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SQS record m-1 has no `receiptHandle`: not an event of an SQS event source mapping"
        );
    }

    #[test]
    fn the_queue_is_the_arns_last_part() {
        assert_eq!(
            queue_of("arn:aws:sqs:eu-west-1:000000000000:dev-orders.fifo"),
            "dev-orders.fifo"
        );
    }
}
