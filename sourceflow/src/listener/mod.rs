//! The listener: where a received message goes.
//!
//! One listener per queue the service consumes. Its pollers ([`poll`]) run at most
//! `concurrency` handlers, ask for a full batch whenever one can start (what cannot start
//! yet waits for a slot, kept invisible by the heartbeat: at most one batch per poller),
//! and under load are paced ([`pacer`]) so that each receive returns a fuller batch. Each
//! receive becomes units of work ([`unit`]): a single message, or on a FIFO queue the
//! messages of one group, in order (groups run in parallel), each handed with its slot to
//! one of the listener's `concurrency` long-lived workers. Every message then goes
//! through the [`stages`]:
//!
//! ```text
//! decode → due → route → fetch → decrypt → claim → invoke → commit
//! ```
//!
//! (or, for a message whose handlers take a transaction, the [`tx`] stages, which claim,
//! invoke and complete in one transaction of the idempotency store's database)
//!
//! each of which returns the next stage's input or a [`disposition`]: acknowledge, retry
//! (a handler failure, which spends an attempt, or an infrastructure fault, which does
//! not), dead-letter with a reason, or give back untouched. [`settle`] alone turns a
//! disposition into broker calls, claim releases, metrics and a log line. The
//! [`heartbeat`] is a task of its own that keeps what the listener holds invisible and its
//! claims leased while handlers run.
//!
//! Shutdown: the pollers stop receiving, await the receive in flight and give back what it
//! returns; units finish within the shutdown timeout, handing back what they did not start;
//! at the deadline, what is still held is taken from the heartbeat, the units are
//! abandoned, and those messages are handed back too. Nothing stays invisible because of
//! this process.

mod disposition;
mod heartbeat;
mod ledger;
mod pacer;
mod poll;
mod settle;
mod stages;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod tx;
mod unit;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::Dispatcher;
use crate::health::Liveness;
use crate::idempotency::{self, Release};
use crate::outcome::PermanentErrors;
use crate::registry::HandlerRoute;
use crate::retry::RetryPolicy;
use crate::telemetry::QueueAttributes;
use crate::transport::{Transport, MAX_BATCH_ENTRIES};

use heartbeat::Heartbeat;
use ledger::Ledger;
#[cfg(feature = "lambda")]
pub(crate) use unit::{group_in_order, RecordOutcome, Unit};

/// What a listener did while shutting down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Messages whose handling finished (acknowledged or dead-lettered) after shutdown began.
    pub finished: usize,
    /// Messages handed back untouched, visible at once: not started when shutdown began,
    /// or returned by the receive that was in flight.
    pub returned: usize,
    /// Messages whose handlers were still running at the shutdown deadline: abandoned and
    /// handed back, visible at once.
    pub abandoned: usize,
}

impl std::ops::AddAssign for DrainReport {
    fn add_assign(&mut self, o: Self) {
        self.finished += o.finished;
        self.returned += o.returned;
        self.abandoned += o.abandoned;
    }
}

/// Counts of what happened after shutdown began.
#[derive(Debug, Default)]
pub(crate) struct Drain {
    finished: AtomicUsize,
    returned: AtomicUsize,
}

impl Drain {
    fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
    fn returned(&self) {
        self.returned.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything a listener is configured with.
pub(crate) struct ListenerConfig {
    pub dispatcher: Arc<Dispatcher>,
    pub queue: Arc<str>,
    pub dead_letter_queue: Arc<str>,
    pub fifo: bool,
    pub handlers: HashMap<&'static str, Vec<&'static HandlerRoute>>,
    /// Wire names of every type linked into the binary.
    pub known: Arc<HashSet<&'static str>>,
    /// Wire names declared with `encrypt`.
    pub encrypted: Arc<HashSet<&'static str>>,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub infrastructure_retry: RetryPolicy,
    /// Handler attempts before the dead-letter queue.
    pub max_attempts: u32,
    pub visibility_timeout: Duration,
    pub receive_wait: Duration,
    /// Longest pause of the pollers under load before a receive (see [`pacer`]).
    pub receive_linger: Duration,
    pub shutdown_timeout: Duration,
    pub idempotency: Option<Arc<idempotency::Settings>>,
    pub permanent: PermanentErrors,
    /// The handler middleware stacks (`None`: no layers, handlers run directly).
    pub middleware: Option<Arc<crate::middleware::Middleware>>,
    pub stop: CancellationToken,
    /// Where transactional handlers' transactions are opened: the SQL idempotency store's
    /// pool (checked at startup to be there when a handler of the queue takes one).
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub tx_pool: Option<crate::tx::SqlPool>,
}

pub(crate) struct Listener {
    dispatcher: Arc<Dispatcher>,
    queue: Arc<str>,
    dead_letter_queue: Arc<str>,
    fifo: bool,
    // Looked up per message: foldhash (hashbrown's default hasher), cheaper than SipHash
    // on wire names.
    handlers: foldhash::HashMap<&'static str, Vec<&'static HandlerRoute>>,
    known: foldhash::HashSet<&'static str>,
    encrypted: foldhash::HashSet<&'static str>,
    concurrency: usize,
    retry: RetryPolicy,
    infrastructure_retry: RetryPolicy,
    max_attempts: u32,
    visibility_timeout: Duration,
    receive_wait: Duration,
    shutdown_timeout: Duration,
    idempotency: Option<Arc<idempotency::Settings>>,
    permanent: PermanentErrors,
    middleware: Option<Arc<crate::middleware::Middleware>>,
    stop: CancellationToken,
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    tx_pool: Option<crate::tx::SqlPool>,
    pub(crate) liveness: Arc<Liveness>,
    heartbeat: Heartbeat,
    pacer: pacer::Pacer,
    ledger: Ledger,
    drain: Drain,
    /// The queue's metric attribute sets, built once: every per-message metric of this
    /// listener borrows them (`self.attrs.destination()` for the queue alone).
    attrs: QueueAttributes,
}

impl Listener {
    pub(crate) fn new(c: ListenerConfig) -> Arc<Self> {
        Arc::new(Listener {
            heartbeat: Heartbeat::new(c.visibility_timeout),
            pacer: pacer::Pacer::new(c.receive_linger),
            attrs: QueueAttributes::new(&c.queue, c.known.iter()),
            dispatcher: c.dispatcher,
            queue: c.queue,
            dead_letter_queue: c.dead_letter_queue,
            fifo: c.fifo,
            handlers: c.handlers.into_iter().collect(),
            known: c.known.iter().copied().collect(),
            encrypted: c.encrypted.iter().copied().collect(),
            concurrency: c.concurrency.max(1),
            retry: c.retry,
            infrastructure_retry: c.infrastructure_retry,
            max_attempts: c.max_attempts.max(1),
            visibility_timeout: c.visibility_timeout,
            receive_wait: c.receive_wait,
            shutdown_timeout: c.shutdown_timeout,
            idempotency: c.idempotency,
            permanent: c.permanent,
            middleware: c.middleware,
            stop: c.stop,
            #[cfg(any(feature = "postgres", feature = "sqlite"))]
            tx_pool: c.tx_pool,
            liveness: Liveness::new(),
            ledger: Ledger::default(),
            drain: Drain::default(),
        })
    }

    pub(crate) fn queue(&self) -> &Arc<str> {
        &self.queue
    }

    pub(crate) fn dead_letter_queue(&self) -> &Arc<str> {
        &self.dead_letter_queue
    }

    fn transport(&self) -> &Arc<dyn Transport> {
        self.dispatcher.transport()
    }

    /// Runs `concurrency` workers and `ceil(concurrency / 10)` pollers sharing one
    /// concurrency limit until the service stops, then drains (see the module docs).
    pub(crate) async fn run(self: Arc<Self>) -> DrainReport {
        let beat_done = CancellationToken::new();
        let beat = self.heartbeat.clone().run(
            self.transport().clone(),
            self.queue.clone(),
            self.idempotency.as_ref().map(|i| i.store.clone()),
            self.liveness.clone(),
            beat_done.clone(),
        );
        // The test harness tells the heartbeat's lease extensions from a retry's backoff.
        #[cfg(feature = "testing")]
        let beat = crate::testing::LEASE_EXTENSION.scope((), beat);
        let beat = tokio::spawn(beat);
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let abandon = CancellationToken::new();
        let (units, workers) = self.clone().start_workers(&abandon);
        let pollers = TaskTracker::new();
        for _ in 0..self.concurrency.div_ceil(MAX_BATCH_ENTRIES).max(1) {
            pollers.spawn(self.clone().poll(slots.clone(), units.clone()));
        }
        // The pollers hold the only senders: once they are done, the workers are too.
        drop(units);
        pollers.close();
        self.stop.cancelled().await;
        let abandoned = self.finish_units(&slots, &abandon, &workers).await;
        pollers.wait().await;
        workers.wait().await;
        beat_done.cancel();
        let _ = beat.await;
        DrainReport {
            finished: self.drain.finished.load(Ordering::Relaxed),
            returned: self.drain.returned.load(Ordering::Relaxed),
            abandoned,
        }
    }

    /// Lets running units finish within the shutdown timeout (every slot back: a unit holds
    /// one from before it is handed to a worker until it is done); at the deadline takes
    /// what they hold, abandons them and hands it back. Returns how many were abandoned.
    async fn finish_units(
        &self,
        slots: &Semaphore,
        abandon: &CancellationToken,
        workers: &TaskTracker,
    ) -> usize {
        // Every slot, once: a poller that stopped gave its own back, and one that receives
        // again finds the stop first (a unit it hands over now finds it too and gives its
        // messages back; it is not abandoned, that only happens after the deadline).
        let all = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        if tokio::time::timeout(self.shutdown_timeout, slots.acquire_many(all))
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.heartbeat.take_all();
        tracing::warn!(queue = %self.queue, unfinished = left.receipts.len(), "shutdown deadline passed; abandoning unfinished handlers and handing their messages back");
        abandon.cancel();
        // Each worker drops its unit and stops.
        workers.wait().await;
        let n = left.receipts.len();
        if n > 0 {
            if let Err(e) = self
                .transport()
                .change_visibility(&self.queue, left.receipts, Duration::ZERO)
                .await
            {
                tracing::warn!(queue = %self.queue, error = %e, "could not hand abandoned messages back; they reappear after their visibility timeout");
            }
        }
        if let Some(idem) = &self.idempotency {
            for c in left.claims {
                if let Err(e) = idem
                    .store
                    .release(&c.key, &c.token, Release::Returned)
                    .await
                {
                    tracing::warn!(key = %c.key, error = %e, "could not release an abandoned claim; the next delivery waits for its lease");
                }
            }
        }
        n
    }
}
