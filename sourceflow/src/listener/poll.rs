//! The poll loop: receive a full batch whenever a handler slot is free, hand it to units,
//! and at shutdown await the receive in flight and give back what it got.
//!
//! Receive ahead: a poller asks for [`MAX_BATCH_ENTRIES`] as soon as one slot is free, not
//! for only as many as can start — a receive costs one request however many it returns.
//! What cannot start yet waits for a slot in order (the slots are a fair semaphore, so the
//! poller's own next wait queues behind it), its visibility kept by the heartbeat from the
//! moment it is received. So each poller holds at most one batch beyond the concurrency
//! limit; at shutdown what waits is handed back at once, untouched.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::heartbeat::Hold;
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
    /// Receives until the service stops: a full batch whenever a slot is free (see the
    /// module docs).
    pub(crate) async fn poll(self: Arc<Self>, slots: Arc<Semaphore>, units: Units) {
        loop {
            // The turn first: a poller waiting out the pacing holds no slot a waiting unit
            // could use.
            let turn = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                t = self.pacer.wait() => t,
            };
            let Some(permits) = self.free_slots(&slots).await else {
                return;
            };
            let request = Receive {
                max: MAX_BATCH_ENTRIES,
                wait: self.receive_wait,
                visibility: self.visibility_timeout,
            };
            let transport = self.transport().clone();
            let sent = tokio::time::Instant::now();
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
                    self.pacer
                        .received(MAX_BATCH_ENTRIES, messages.len(), sent.elapsed());
                    drop(turn);
                    self.start(messages, permits, &slots, &units);
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

    /// Hands received messages to units: those with a slot start now, the rest wait for
    /// one in order (their visibility kept by the heartbeat meanwhile).
    fn start(
        self: &Arc<Self>,
        messages: Vec<ReceivedMessage>,
        permits: Vec<OwnedSemaphorePermit>,
        slots: &Arc<Semaphore>,
        units: &Units,
    ) {
        if messages.is_empty() {
            return;
        }
        self.dispatcher
            .metrics()
            .received
            .add(messages.len() as u64, self.attrs.destination());
        let batch = if self.fifo {
            group_in_order(messages)
        } else {
            messages.into_iter().map(|m| vec![m]).collect()
        };
        let mut permits = permits.into_iter();
        for unit in batch {
            let hold = self.heartbeat.hold(&unit);
            let permit = permits.next();
            let (this, slots, abandon) = (self.clone(), slots.clone(), units.abandon.clone());
            units.tracker.spawn(async move {
                tokio::select! {
                    _ = this.wait_and_run(unit, hold, permit, slots) => {}
                    _ = abandon.cancelled() => {}
                }
            });
        }
    }

    /// Runs a unit with its slot, or first waits for one; at shutdown a unit still waiting
    /// goes back untouched.
    async fn wait_and_run(
        self: Arc<Self>,
        unit: Vec<ReceivedMessage>,
        hold: Hold,
        permit: Option<OwnedSemaphorePermit>,
        slots: Arc<Semaphore>,
    ) {
        let permit = match permit {
            Some(p) => p,
            None => {
                let p = tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => None,
                    p = slots.acquire_owned() => p.ok(),
                };
                let Some(p) = p else {
                    drop(hold);
                    self.give_back(&unit).await;
                    return;
                };
                p
            }
        };
        self.run_unit(unit, hold).await;
        drop(permit);
    }
}
