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

/// A poller's vectors for one batch, kept from one receive to the next: a full batch in a
/// fresh vector is over 1 KiB (ten 104-byte messages), which glibc serves from its large
/// bins after consolidating its heap under the arena lock (see the throughput bench).
struct Batch {
    /// What the receive got.
    messages: Vec<ReceivedMessage>,
    /// The same messages as units (per FIFO group on a FIFO queue).
    units: Vec<Unit>,
    /// The units registered with the heartbeat, waiting for their slot.
    held: Vec<(Unit, Hold)>,
    /// The handler slots taken for it.
    permits: Vec<OwnedSemaphorePermit>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            messages: Vec::with_capacity(MAX_BATCH_ENTRIES),
            units: Vec::with_capacity(MAX_BATCH_ENTRIES),
            held: Vec::with_capacity(MAX_BATCH_ENTRIES),
            permits: Vec::with_capacity(MAX_BATCH_ENTRIES),
        }
    }
}

/// Where the pollers hand their units: the listener's workers.
#[derive(Clone)]
pub(crate) struct Units {
    work: flume::Sender<Work>,
}

impl Listener {
    /// Receives until the service stops: a full batch whenever a slot is free (see the
    /// module docs).
    pub(crate) async fn poll(self: Arc<Self>, slots: Arc<Semaphore>, units: Units) {
        let mut batch = Batch::new();
        loop {
            // The turn first: a poller waiting out the pacing holds no slot a waiting unit
            // could use.
            let turn = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                t = self.pacer.wait() => t,
            };
            if !self.free_slots(&slots, &mut batch.permits).await {
                return;
            }
            let sent = tokio::time::Instant::now();
            let Some(received) = self.receive(&mut batch).await else {
                return;
            };
            match received {
                Ok(()) => {
                    self.liveness.polled();
                    self.pacer
                        .received(MAX_BATCH_ENTRIES, batch.messages.len(), sent.elapsed());
                    drop(turn);
                    if !self.start(&mut batch, &slots, &units).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(queue = %self.queue, error = %e, "receive failed; retrying in 1 s");
                    batch.permits.clear();
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Receives a batch into `batch.messages`; `None` once the service stops, after
    /// awaiting the receive in flight and giving back what it got.
    async fn receive(&self, batch: &mut Batch) -> Option<crate::error::Result<()>> {
        let request = Receive {
            max: MAX_BATCH_ENTRIES,
            wait: self.receive_wait,
            visibility: self.visibility_timeout,
        };
        let transport = self.transport().clone();
        let mut receive = transport.receive_into(&self.queue, request, &mut batch.messages);
        tokio::select! {
            biased;
            r = &mut receive => return Some(r),
            _ = self.stop.cancelled() => {}
        }
        // The shutdown waits for every slot, not for this receive.
        batch.permits.clear();
        // The broker keeps an abandoned long poll alive and hands it messages, which would
        // then stay invisible: await it, and give back what it got. (The embedded broker
        // can end it at once; SQS cannot.)
        transport.end_receives(&self.queue).await;
        let answered = tokio::time::timeout(self.receive_wait + RECEIVE_SLACK, receive).await;
        match answered {
            Ok(Ok(())) => self.give_back(&batch.messages).await,
            Ok(Err(e)) => {
                tracing::debug!(queue = %self.queue, error = %e, "the receive in flight at shutdown failed")
            }
            Err(_) => {
                tracing::warn!(queue = %self.queue, "the receive in flight at shutdown did not answer; what it may take comes back after the visibility timeout")
            }
        }
        None
    }

    /// Waits for one free handler slot, then takes whatever else is free, up to a batch,
    /// into `permits` (empty when called); `false` once the service stops.
    async fn free_slots(
        &self,
        slots: &Arc<Semaphore>,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) -> bool {
        let first = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match self.wait_for_slot(slots).await {
                Some(p) => p,
                None => return false,
            },
        };
        if self.stop.is_cancelled() {
            return false;
        }
        permits.push(first);
        while permits.len() < MAX_BATCH_ENTRIES {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        true
    }

    /// Hands received messages to units: those with a slot start now; for the rest the
    /// poller waits for a slot each, in order (their visibility kept by the heartbeat
    /// meanwhile). `false` once the service stops: what had not started went back. Leaves
    /// `batch` empty, its vectors' room kept for the next receive.
    async fn start(
        self: &Arc<Self>,
        batch: &mut Batch,
        slots: &Arc<Semaphore>,
        units: &Units,
    ) -> bool {
        let mut permits = batch.permits.drain(..);
        if batch.messages.is_empty() {
            return true;
        }
        self.dispatcher
            .metrics()
            .received
            .add(batch.messages.len() as u64, self.attrs.destination());
        if self.fifo {
            group_in_order(&mut batch.messages, &mut batch.units);
        } else {
            let one = |m| -> Unit { smallvec::smallvec![m] };
            batch.units.extend(batch.messages.drain(..).map(one));
        }
        let heartbeat = &self.heartbeat;
        batch.held.extend(batch.units.drain(..).map(|unit| {
            let hold = heartbeat.hold(&unit);
            (unit, hold)
        }));
        let mut held = batch.held.drain(..);
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
