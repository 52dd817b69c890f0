//! One invocation: the batch's records split into units (a record, or a FIFO group's
//! records in order), run concurrently up to the service's concurrency, each record
//! through the listener's stages; the response lists the records that must come back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use futures_util::StreamExt;

use super::record::{queue_of, received, RecordError};
use super::Inner;
use crate::listener::{group_in_order, Listener, RecordOutcome, Unit};
use crate::transport::ReceivedMessage;

/// Handles the batch (see the module docs).
pub(super) async fn handle(
    inner: &Inner,
    event: SqsEvent,
    deadline: Option<SystemTime>,
) -> Result<SqsBatchResponse, RecordError> {
    let at = tokio::time::Instant::now();
    let mut position = HashMap::with_capacity(event.records.len());
    let mut failed: Vec<String> = Vec::new();
    let mut by_listener: Vec<(Arc<Listener>, Vec<ReceivedMessage>)> = Vec::new();
    for (i, r) in event.records.iter().enumerate() {
        let msg = received(i, r, at)?;
        position.insert(msg.broker_id.clone(), i);
        let queue = r.event_source_arn.as_deref().map(queue_of).unwrap_or("");
        let Some(listener) = inner.listeners.iter().find(|l| &**l.queue() == queue) else {
            tracing::error!(queue, broker_id = %msg.broker_id, "a record from a queue this function has no handlers for; it comes back (check the event source mappings)");
            failed.push(msg.broker_id.to_string());
            continue;
        };
        match by_listener
            .iter_mut()
            .find(|(l, _)| Arc::ptr_eq(l, listener))
        {
            Some((_, msgs)) => msgs.push(msg),
            None => by_listener.push((listener.clone(), vec![msg])),
        }
    }
    let units = by_listener.into_iter().flat_map(|(l, mut msgs)| {
        let units = match l.is_fifo() {
            true => {
                let mut units = Vec::new();
                group_in_order(&mut msgs, &mut units);
                units
            }
            false => msgs.into_iter().map(|m| smallvec::smallvec![m]).collect(),
        };
        units.into_iter().map(move |u| (l.clone(), u))
    });
    let mut runs = futures_util::stream::iter(units)
        .map(|(l, unit)| run_unit(l, unit, deadline, inner.margin))
        .buffer_unordered(inner.concurrency.max(1));
    while let Some(f) = runs.next().await {
        failed.extend(f);
    }
    failed.sort_by_key(|id| position.get(id.as_str()).copied().unwrap_or(usize::MAX));
    let mut response = SqsBatchResponse::default();
    response.set_failures(failed);
    Ok(response)
}

/// Runs a unit's records in order; returns the ids of those that must come back. At the
/// first failure (or when the deadline is near) the rest are handed back, not run.
async fn run_unit(
    listener: Arc<Listener>,
    unit: Unit,
    deadline: Option<SystemTime>,
    margin: Duration,
) -> Vec<String> {
    let hold = listener.hold(&unit);
    for (i, msg) in unit.iter().enumerate() {
        if let Some(left) = deadline
            .map(|d| d.duration_since(SystemTime::now()).unwrap_or_default())
            .filter(|left| *left <= margin)
        {
            tracing::warn!(queue = %listener.queue(), records = unit.len() - i, left_ms = left.as_millis() as u64, "the invocation's deadline is near; handing back the records not started");
            return hand_back(&listener, &unit[i..], Duration::ZERO).await;
        }
        if let RecordOutcome::Failed { after } = listener.process_record(msg, &hold).await {
            let mut failed = vec![msg.broker_id.to_string()];
            failed.extend(hand_back(&listener, &unit[i + 1..], after).await);
            return failed;
        }
    }
    Vec::new()
}

/// Hands records back untouched, visible after `after` (a FIFO group behind a failure,
/// with it; what the deadline left, at once); their ids.
async fn hand_back(listener: &Listener, rest: &[ReceivedMessage], after: Duration) -> Vec<String> {
    listener.give_back_after(rest, after).await;
    rest.iter().map(|m| m.broker_id.to_string()).collect()
}
