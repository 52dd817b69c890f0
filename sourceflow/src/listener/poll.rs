//! The poll loop: receive a full batch whenever a handler slot is free, hand it to units,
//! and at shutdown await the receive in flight and give back what it got.
//!
//! Receive ahead: a poller asks for [`MAX_BATCH_ENTRIES`] as soon as one slot is free, not
//! for only as many as can start — a receive costs one request however many it returns.
//! What cannot start yet waits, its visibility kept by the heartbeat from the moment it is
//! received, and the poller itself waits for a slot for each such unit in turn before it
//! receives again. So each poller holds at most one batch beyond the concurrency limit, its
//! units start in the order received, and a poller never sits in a long poll holding a slot
//! while units it received wait for one; at shutdown what waits is handed back at once,
//! untouched.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::heartbeat::Hold;
use super::unit::{group_in_order, Unit};
use super::Listener;
use crate::transport::{Receive, ReceivedMessage, MAX_BATCH_ENTRIES};

/// How much longer than its wait a receive in flight at shutdown is awaited.
const RECEIVE_SLACK: Duration = Duration::from_secs(5);

/// A unit of work handed to a worker, with its slot.
type Work = (Unit, Hold, OwnedSemaphorePermit);

/// Where the pollers hand their units: the listener's workers.
#[derive(Clone)]
pub(crate) struct Units {
    work: flume::Sender<Work>,
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
                    // The shutdown waits for every slot, not for this receive.
                    drop(permits);
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
                    if !self.start(messages, permits, &slots, &units).await {
                        return;
                    }
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
            Err(_) => self.wait_for_slot(slots).await?,
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

    /// Hands received messages to units: those with a slot start now; for the rest the
    /// poller waits for a slot each, in order (their visibility kept by the heartbeat
    /// meanwhile). `false` once the service stops: what had not started went back.
    async fn start(
        self: &Arc<Self>,
        messages: Vec<ReceivedMessage>,
        permits: Vec<OwnedSemaphorePermit>,
        slots: &Arc<Semaphore>,
        units: &Units,
    ) -> bool {
        if messages.is_empty() {
            return true;
        }
        self.dispatcher
            .metrics()
            .received
            .add(messages.len() as u64, self.attrs.destination());
        let batch = if self.fifo {
            group_in_order(messages)
        } else {
            messages
                .into_iter()
                .map(|m| smallvec::smallvec![m])
                .collect()
        };
        let held: Vec<_> = batch
            .into_iter()
            .map(|unit| {
                let hold = self.heartbeat.hold(&unit);
                (unit, hold)
            })
            .collect();
        let mut permits = permits.into_iter();
        let mut held = held.into_iter();
        while let Some((unit, hold)) = held.next() {
            let permit = match permits.next() {
                Some(p) => p,
                None => match self.wait_for_slot(slots).await {
                    Some(p) => p,
                    None => {
                        let rest: Vec<_> = std::iter::once((unit, hold)).chain(held).collect();
                        self.give_back_waiting(rest).await;
                        return false;
                    }
                },
            };
            self.hand_over(unit, hold, permit, units).await;
        }
        true
    }

    /// Waits for a slot (for the next receive, or for a received unit that waits for one);
    /// `None` once the service stops.
    async fn wait_for_slot(&self, slots: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        self.liveness.waiting_for_slot(true);
        let permit = tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            p = slots.clone().acquire_owned() => p.ok(),
        };
        self.liveness.waiting_for_slot(false);
        permit
    }

    /// Starts the listener's `concurrency` workers, each a task that runs the units handed
    /// to it one after another until the senders are gone or the units are abandoned.
    ///
    /// Long-lived workers rather than a task per unit: a task per unit allocated the
    /// unit's whole state machine (about 3.5 KB, over-aligned) for each message, and with
    /// glibc's allocator an allocation that size takes the arena lock and consolidates
    /// the heap, which the other worker thread then waited on (see the throughput bench).
    pub(super) fn start_workers(
        self: Arc<Self>,
        abandon: &CancellationToken,
    ) -> (Units, TaskTracker) {
        // Never full: each unit in it holds one of `concurrency` slots.
        let (work, queue) = flume::bounded(self.concurrency);
        let workers = TaskTracker::new();
        for _ in 0..self.concurrency {
            workers.spawn(self.clone().work(queue.clone(), abandon.clone()));
        }
        workers.close();
        (Units { work }, workers)
    }

    /// One worker: a unit at a time, its slot given back when it is done.
    async fn work(self: Arc<Self>, queue: flume::Receiver<Work>, abandon: CancellationToken) {
        loop {
            let (unit, hold, permit) = tokio::select! {
                biased;
                _ = abandon.cancelled() => return,
                w = queue.recv_async() => match w {
                    Ok(w) => w,
                    Err(_) => return,
                },
            };
            tokio::select! {
                _ = self.run_unit(unit, hold) => {}
                _ = abandon.cancelled() => return,
            }
            drop(permit);
        }
    }

    /// Hands a unit with its slot to a worker; one whose workers are gone (abandoned at
    /// the shutdown deadline) goes back untouched.
    async fn hand_over(&self, unit: Unit, hold: Hold, permit: OwnedSemaphorePermit, units: &Units) {
        if let Err(e) = units.work.try_send((unit, hold, permit)) {
            let (unit, hold, _) = e.into_inner();
            self.give_back_waiting(vec![(unit, hold)]).await;
        }
    }

    /// At shutdown, units received but not started go back untouched.
    async fn give_back_waiting(&self, waiting: Vec<(Unit, Hold)>) {
        let mut messages = Vec::new();
        for (unit, hold) in waiting {
            drop(hold);
            messages.extend(unit);
        }
        self.give_back(&messages).await;
    }
}
