//! The poll loop: receive as much as can start now, hand it to units, and at shutdown
//! await the receive in flight and give back what it got.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::unit::group_in_order;
use super::Listener;
use crate::transport::{Receive, ReceivedMessage, MAX_BATCH_ENTRIES};

/// How much longer than its wait a receive in flight at shutdown is awaited.
const RECEIVE_SLACK: Duration = Duration::from_secs(5);

/// Where a poller's units run: a tracker to wait for them, a token to abandon them.
#[derive(Clone)]
pub(crate) struct Units {
    pub tracker: TaskTracker,
    pub abandon: CancellationToken,
}

impl Listener {
    /// Receives until the service stops. Asks only for as many messages as can start now,
    /// so nothing waits in memory while invisible on the broker.
    pub(crate) async fn poll(self: Arc<Self>, slots: Arc<Semaphore>, units: Units) {
        loop {
            let Some(permits) = self.free_slots(&slots).await else {
                return;
            };
            let request = Receive {
                max: permits.len(),
                wait: self.receive_wait,
                visibility: self.visibility_timeout,
            };
            let transport = self.transport().clone();
            let receive = transport.receive(&self.queue, request);
            tokio::pin!(receive);
            let received = tokio::select! {
                biased;
                r = &mut receive => r,
                _ = self.stop.cancelled() => {
                    // The broker keeps an abandoned long poll alive and hands it messages,
                    // which would then stay invisible: await it, and give back what it got.
                    // (The embedded broker can end it at once; SQS cannot.)
                    transport.end_receives(&self.queue).await;
                    match tokio::time::timeout(self.receive_wait + RECEIVE_SLACK, receive).await {
                        Ok(Ok(got)) => self.give_back(&got).await,
                        Ok(Err(e)) => tracing::debug!(queue = %self.queue, error = %e, "the receive in flight at shutdown failed"),
                        Err(_) => tracing::warn!(queue = %self.queue, "the receive in flight at shutdown did not answer; what it may take comes back after the visibility timeout"),
                    }
                    return;
                }
            };
            match received {
                Ok(messages) => {
                    self.liveness.polled();
                    self.start(messages, permits, &units);
                }
                Err(e) => {
                    tracing::error!(queue = %self.queue, error = %e, "receive failed; retrying in 1 s");
                    drop(permits);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Waits for one free handler slot, then takes whatever else is free, up to a batch;
    /// `None` once the service stops.
    async fn free_slots(&self, slots: &Arc<Semaphore>) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.liveness.waiting_for_slot(true);
                let p = tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => None,
                    p = slots.clone().acquire_owned() => p.ok(),
                };
                self.liveness.waiting_for_slot(false);
                p?
            }
        };
        if self.stop.is_cancelled() {
            return None;
        }
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH_ENTRIES {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        Some(permits)
    }

    /// Hands received messages to units, one slot each.
    fn start(
        self: &Arc<Self>,
        messages: Vec<ReceivedMessage>,
        mut permits: Vec<OwnedSemaphorePermit>,
        units: &Units,
    ) {
        if messages.is_empty() {
            return;
        }
        let received = [KeyValue::new(
            "messaging.destination.name",
            opentelemetry::StringValue::from(self.queue.clone()),
        )];
        self.dispatcher
            .metrics()
            .received
            .add(messages.len() as u64, &received);
        let batch = if self.fifo {
            group_in_order(messages)
        } else {
            messages.into_iter().map(|m| vec![m]).collect()
        };
        let mut batch = batch.into_iter();
        for unit in batch.by_ref() {
            // Units never outnumber messages, and a transport returns at most `max`.
            let Some(permit) = permits.pop() else {
                let extra: Vec<ReceivedMessage> = unit.into_iter().chain(batch.flatten()).collect();
                tracing::warn!(queue = %self.queue, extra = extra.len(), "the transport returned more messages than asked for; handing them back");
                let this = self.clone();
                units
                    .tracker
                    .spawn(async move { this.give_back(&extra).await });
                return;
            };
            let this = self.clone();
            let abandon = units.abandon.clone();
            units.tracker.spawn(async move {
                tokio::select! {
                    _ = this.run_unit(unit) => {}
                    _ = abandon.cancelled() => {}
                }
                drop(permit);
            });
        }
    }
}
