//! The listener loop: where a received message goes.
//!
//! One listener per queue the service consumes. It keeps at most `concurrency` handler runs
//! in flight and asks the transport for no more messages than it can start, so nothing waits
//! in memory while invisible on the broker. On a FIFO queue the messages of one group are
//! handled one after the other, groups in parallel.
//!
//! For each message: decode the envelope (undecodable: dead-letter queue, with the reason),
//! find this service's handlers for its type (none: dead-letter queue), run them, dispatch
//! what they sent or raised, then delete the message. A failure returns the message with
//! backoff (its visibility), and the attempt that reaches the receive limit moves it to the
//! dead-letter queue with the last error as the reason.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::dispatch::{self, Dispatcher, MAX_BATCH};
use crate::encryption;
use crate::envelope;
use crate::envelope::attr;
use crate::error::InvokeError;
use crate::idempotency::{self, Claim};
use crate::message::MessageKind;
use crate::registry::HandlerRoute;
use crate::retry::RetryPolicy;
use crate::telemetry;
use crate::transport::ReceivedMessage;
use opentelemetry::KeyValue;
use tracing::Instrument;

/// What a listener did while shutting down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Messages whose handling finished after shutdown began.
    pub finished: usize,
    /// Messages handed back to the queue (visibility set to zero) unhandled.
    pub returned: usize,
}

impl std::ops::AddAssign for DrainReport {
    fn add_assign(&mut self, o: Self) {
        self.finished += o.finished;
        self.returned += o.returned;
    }
}

use crate::transport::MAX_VISIBILITY;

pub(crate) struct Listener {
    pub dispatcher: Arc<Dispatcher>,
    pub queue: Arc<str>,
    pub fifo: bool,
    pub handlers: HashMap<&'static str, Vec<&'static HandlerRoute>>,
    pub known: Arc<HashSet<&'static str>>,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub max_receive_count: u32,
    pub visibility_timeout: Duration,
    pub receive_wait: Duration,
    pub shutdown_timeout: Duration,
    pub idempotency: Option<Arc<idempotency::Settings>>,
    pub liveness: Arc<crate::health::Liveness>,
    /// Wire names declared with `encrypt`.
    pub encrypted: Arc<HashSet<&'static str>>,
}

enum Outcome {
    /// Deleted, or moved to the dead-letter queue.
    Done(&'static str),
    /// The handler failed; the error says why.
    Failed(String),
}

impl Listener {
    /// The queue as a metric attribute (cheap to clone: the name is shared).
    fn dest_attr(&self) -> KeyValue {
        KeyValue::new(
            "messaging.destination.name",
            opentelemetry::StringValue::from(self.queue.clone()),
        )
    }

    /// Runs `ceil(concurrency / 10)` pollers sharing one concurrency limit, until `stop`.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) -> DrainReport {
        let sem = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let pollers = self.concurrency.div_ceil(MAX_BATCH).max(1);
        let mut set = JoinSet::new();
        for _ in 0..pollers {
            set.spawn(self.clone().poll(sem.clone(), stop.clone()));
        }
        let mut report = DrainReport::default();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(r) => report += r,
                Err(e) => tracing::error!(queue = %self.queue, error = %e, "a poller failed"),
            }
        }
        report
    }

    async fn poll(self: Arc<Self>, sem: Arc<Semaphore>, stop: CancellationToken) -> DrainReport {
        let owned: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut tasks: JoinSet<usize> = JoinSet::new();
        let transport = self.dispatcher.transport().clone();
        loop {
            // Ask only for as many messages as can start now: wait for one free slot, then
            // take whatever else is free, up to a batch.
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut permits = vec![first];
            while permits.len() < MAX_BATCH {
                match sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            while tasks.try_join_next().is_some() {}
            let received = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                r = transport.receive(&self.queue, crate::transport::Receive { max: permits.len(), wait: self.receive_wait, visibility: self.visibility_timeout }) => r,
            };
            let messages = match received {
                Ok(m) => {
                    self.liveness.polled();
                    m
                }
                Err(e) => {
                    tracing::error!(queue = %self.queue, error = %e, "receive failed; retrying in 1 s");
                    drop(permits);
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            if messages.is_empty() {
                continue;
            }
            self.dispatcher.metrics().received.add(
                messages.len() as u64,
                &[KeyValue::new(
                    "messaging.destination.name",
                    self.queue.to_string(),
                )],
            );
            let units = if self.fifo {
                group_in_order(messages)
            } else {
                messages.into_iter().map(|m| vec![m]).collect()
            };
            for unit in units {
                // Units never outnumber messages, and messages never outnumber permits.
                let Some(p) = permits.pop() else { break };
                {
                    let mut o = owned.lock();
                    for m in &unit {
                        o.insert(m.receipt.clone());
                    }
                }
                let this = self.clone();
                let stop = stop.clone();
                let owned = owned.clone();
                tasks.spawn(async move {
                    let n = this.process_unit(unit, &stop, &owned).await;
                    drop(p);
                    n
                });
            }
        }

        // Shutdown: let in-flight work finish within the deadline, then hand back the rest.
        // (Work that finished before the stop is not part of the drain.)
        while tasks.try_join_next().is_some() {}
        let mut report = DrainReport::default();
        let deadline = tokio::time::sleep(self.shutdown_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = tasks.join_next() => match r {
                    Some(r) => report.finished += r.unwrap_or(0),
                    None => break,
                },
                _ = &mut deadline => {
                    tracing::warn!(queue = %self.queue, unfinished = tasks.len(), "shutdown deadline passed; abandoning unfinished handlers");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        let leftover: Vec<String> = owned.lock().drain().collect();
        for receipt in leftover {
            match transport
                .change_visibility(&self.queue, vec![receipt], Duration::ZERO)
                .await
            {
                Ok(()) => report.returned += 1,
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "could not return a message; it reappears after its visibility timeout")
                }
            }
        }
        report
    }

    /// Handles one unit: a single message, or one FIFO group's messages in order. Returns
    /// how many were finished (deleted or dead-lettered).
    async fn process_unit(
        &self,
        unit: Vec<ReceivedMessage>,
        stop: &CancellationToken,
        owned: &Mutex<HashSet<String>>,
    ) -> usize {
        let transport = self.dispatcher.transport();
        let mut done = 0;
        let mut local_attempts = 0u32;
        let mut idx = 0;
        while idx < unit.len() {
            if idx > 0 && stop.is_cancelled() {
                // Shutting down: what has not started goes back, in order.
                self.give_back(&unit[idx..], Duration::ZERO, owned).await;
                return done;
            }
            let msg = &unit[idx];
            match self.process_with_heartbeat(msg, &unit[idx..]).await {
                Outcome::Done(_) => {
                    owned.lock().remove(&msg.receipt);
                    done += 1;
                    idx += 1;
                    local_attempts = 0;
                }
                Outcome::Failed(error) => {
                    let attempts = msg.receive_count + local_attempts;
                    if attempts >= self.max_receive_count {
                        let reason = format!(
                            "handler failed {attempts} times (receive limit {}); last error: {error}",
                            self.max_receive_count
                        );
                        self.dead_letter(msg, "failures", &reason).await;
                        owned.lock().remove(&msg.receipt);
                        done += 1;
                        idx += 1;
                        local_attempts = 0;
                        continue;
                    }
                    let backoff = self.retry.delay(attempts);
                    tracing::warn!(
                        queue = %self.queue,
                        broker_id = %msg.broker_id,
                        attempt = attempts,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %error,
                        "handler failed; the message will be retried"
                    );
                    if idx + 1 == unit.len() {
                        // Nothing queued behind it here: hand it back with the backoff.
                        if let Err(e) = transport
                            .change_visibility(&self.queue, vec![msg.receipt.clone()], backoff)
                            .await
                        {
                            tracing::warn!(queue = %self.queue, error = %e, "could not delay the retry; it comes back after its visibility timeout");
                        }
                        owned.lock().remove(&msg.receipt);
                        return done;
                    }
                    // FIFO with later messages of the group in hand: retry here, keeping them
                    // invisible, so they neither overtake it nor burn receive counts.
                    let hold = backoff + self.visibility_timeout;
                    for m in &unit[idx..] {
                        let _ = transport
                            .change_visibility(&self.queue, vec![m.receipt.clone()], hold)
                            .await;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {
                            self.give_back(&unit[idx..], Duration::ZERO, owned).await;
                            return done;
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    local_attempts += 1;
                }
            }
        }
        done
    }

    /// Runs `process`, extending the visibility of `held` (this message and the ones queued
    /// behind it) every half visibility timeout, so a long handler keeps its message. The
    /// extensions stop after [`MAX_VISIBILITY`] in total, as SQS allows no more.
    async fn process_with_heartbeat(
        &self,
        msg: &ReceivedMessage,
        held: &[ReceivedMessage],
    ) -> Outcome {
        let claim: Mutex<Option<(String, String)>> = Mutex::new(None);
        let work = self.process(msg, &claim);
        tokio::pin!(work);
        let period = (self.visibility_timeout / 2).max(Duration::from_millis(100));
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = tokio::time::sleep(period) => {
                    if started.elapsed() + self.visibility_timeout > MAX_VISIBILITY {
                        tracing::warn!(queue = %self.queue, broker_id = %msg.broker_id, "handler has run for 12 hours; no further visibility extension");
                        continue;
                    }
                    let held_claim = claim.lock().clone();
                    if let (Some((key, token)), Some(idem)) = (held_claim, &self.idempotency) {
                        match idem.store.renew(&key, &token, self.visibility_timeout).await {
                            Ok(true) => {}
                            Ok(false) => tracing::warn!(queue = %self.queue, key = %key, "idempotency claim lost while the handler runs (its lease expired)"),
                            Err(e) => tracing::warn!(queue = %self.queue, key = %key, error = %e, "idempotency lease renewal failed"),
                        }
                    }
                    for m in held {
                        if let Err(e) = self.dispatcher.transport().change_visibility(&self.queue, vec![m.receipt.clone()], self.visibility_timeout).await {
                            tracing::warn!(queue = %self.queue, broker_id = %m.broker_id, error = %e, "visibility heartbeat failed");
                        }
                    }
                }
            }
        }
    }

    async fn give_back(
        &self,
        msgs: &[ReceivedMessage],
        after: Duration,
        owned: &Mutex<HashSet<String>>,
    ) {
        let transport = self.dispatcher.transport();
        for m in msgs {
            if let Err(e) = transport
                .change_visibility(&self.queue, vec![m.receipt.clone()], after)
                .await
            {
                tracing::warn!(queue = %self.queue, error = %e, "could not return a message; it reappears after its visibility timeout");
            }
            owned.lock().remove(&m.receipt);
        }
    }

    async fn dead_letter(&self, msg: &ReceivedMessage, kind: &'static str, reason: &str) {
        tracing::error!(
            queue = %self.queue,
            broker_id = %msg.broker_id,
            reason,
            "moving message to the dead-letter queue"
        );
        let result = self
            .dispatcher
            .transport()
            .dead_letter(
                &self.queue,
                &crate::naming::Naming::dead_letter(&self.queue),
                msg,
                reason,
            )
            .await;
        if result.is_ok() {
            self.dispatcher.metrics().dead_lettered.add(
                1,
                &[self.dest_attr(), KeyValue::new("sourceflow.reason", kind)],
            );
        }
        if let Err(e) = result {
            tracing::error!(queue = %self.queue, broker_id = %msg.broker_id, error = %e, "could not move the message to the dead-letter queue; it stays and will be redelivered");
        }
    }

    /// Processes one message inside a `sourceflow.process` span that continues the sender's
    /// trace, and records its metrics.
    async fn process(
        &self,
        msg: &ReceivedMessage,
        claim_slot: &Mutex<Option<(String, String)>>,
    ) -> Outcome {
        let span = tracing::info_span!(
            "sourceflow.process",
            otel.kind = "consumer",
            messaging.system = telemetry::messaging_system(self.dispatcher.transport().name(), MessageKind::Command),
            messaging.destination.name = %self.queue,
            messaging.operation.type = "process",
            messaging.message.id = tracing::field::Empty,
            messaging.message.conversation_id = tracing::field::Empty,
            sourceflow.wire_name = tracing::field::Empty,
            sourceflow.entity_id = tracing::field::Empty,
            sourceflow.receive_count = msg.receive_count,
            sourceflow.service = %self.dispatcher.service(),
        );
        if let Some(tp) = envelope::attribute(&msg.attributes, attr::TRACEPARENT) {
            telemetry::continue_trace(
                &span,
                tp,
                envelope::attribute(&msg.attributes, attr::TRACESTATE),
            );
        }
        let started = std::time::Instant::now();
        let mut wire: &'static str = "unknown";
        let outcome = self
            .process_inner(msg, claim_slot, &span, &mut wire)
            .instrument(span.clone())
            .await;
        let metrics = self.dispatcher.metrics();
        let attrs = [
            self.dest_attr(),
            KeyValue::new("sourceflow.wire_name", wire),
        ];
        let label = match &outcome {
            Outcome::Done(label) => *label,
            Outcome::Failed(_) => {
                metrics.processing_error.add(1, &attrs);
                "error"
            }
        };
        if label == "duplicate" {
            metrics.duplicate.add(1, &attrs);
        }
        metrics
            .processing_duration
            .record(started.elapsed().as_secs_f64(), &attrs);
        let [dest, wire] = attrs;
        metrics
            .processed
            .add(1, &[dest, wire, KeyValue::new("sourceflow.outcome", label)]);
        outcome
    }

    async fn process_inner(
        &self,
        msg: &ReceivedMessage,
        claim_slot: &Mutex<Option<(String, String)>>,
        span: &tracing::Span,
        wire: &mut &'static str,
    ) -> Outcome {
        let mut env = match envelope::decode(&msg.body, &msg.attributes) {
            Ok(e) => e,
            Err(e) => {
                self.dead_letter(msg, "undecodable", &format!("undecodable message: {e}"))
                    .await;
                return Outcome::Done("dead_lettered");
            }
        };
        span.record("messaging.message.id", env.id.as_str());
        span.record(
            "messaging.message.conversation_id",
            env.correlation_id.as_deref().unwrap_or(env.id.as_str()),
        );
        span.record("sourceflow.wire_name", env.wire_name.as_str());
        if let Some(e) = &env.entity_id {
            span.record("sourceflow.entity_id", e.as_str());
        }
        if let Some(known) = self.known.get(env.wire_name.as_str()) {
            *wire = known;
        }
        let Some(handlers) = self.handlers.get(env.wire_name.as_str()) else {
            let reason = if self.known.contains(env.wire_name.as_str()) {
                format!(
                    "service `{}` has no handler for `{}` on queue `{}`",
                    self.dispatcher.service(),
                    env.wire_name,
                    self.queue
                )
            } else {
                format!(
                    "unknown message type `{}`: no type with this wire name is linked into service `{}`",
                    env.wire_name,
                    self.dispatcher.service()
                )
            };
            let kind = if self.known.contains(env.wire_name.as_str()) {
                "no_handler"
            } else {
                "unknown_type"
            };
            self.dead_letter(msg, kind, &reason).await;
            return Outcome::Done("dead_lettered");
        };

        // Encrypted payloads are opened here; a type that requires encryption is refused in
        // clear. Nothing below sees a ciphertext.
        if let Err(e) = self.decrypt(msg, &mut env).await {
            self.dead_letter(msg, "decrypt", &format!("decryption failed: {e}"))
                .await;
            return Outcome::Done("dead_lettered");
        }

        // Claim the message before running anything.
        let mut claim: Option<(String, String)> = None;
        if let Some(idem) = &self.idempotency {
            let key = match idem.key_for(
                self.dispatcher.service(),
                &env.wire_name,
                &env.id,
                env.payload.get(),
            ) {
                Ok(key) => key,
                Err(reason) => {
                    self.dead_letter(
                        msg,
                        "payload",
                        &format!(
                            "payload does not decode as `{}` (needed for its idempotency key): {reason}",
                            env.wire_name
                        ),
                    )
                    .await;
                    return Outcome::Done("dead_lettered");
                }
            };
            let hash = idempotency::payload_hash(env.payload.get());
            // A duplicate of a message in progress elsewhere waits here, kept invisible by
            // the heartbeat, until the original completes (acknowledge), fails (run it) or
            // its lease runs out (take over). Handing it back to the queue instead would
            // spend its receive count on waiting.
            let mut waits = 0u32;
            let outcome = loop {
                let claimed = match idem.store.claim(&key, &hash, self.visibility_timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        return Outcome::Failed(format!(
                            "idempotency store `{}` unavailable: {e}",
                            idem.store.name()
                        ))
                    }
                };
                match claimed {
                    Claim::InProgress { lease_left } => {
                        if waits == 0 {
                            idem.stats.record(&claimed);
                            tracing::info!(queue = %self.queue, message_id = %env.id, key = %key, "duplicate of a message in progress elsewhere; waiting for it");
                        }
                        waits += 1;
                        let pause = self
                            .retry
                            .delay(waits)
                            .min(lease_left)
                            .max(Duration::from_millis(10));
                        tokio::time::sleep(pause).await;
                    }
                    other => break other,
                }
            };
            idem.stats.record(&outcome);
            match outcome {
                Claim::Acquired { token, .. } => {
                    *claim_slot.lock() = Some((key.clone(), token.clone()));
                    claim = Some((key, token));
                }
                // The loop above only ends on another outcome.
                Claim::InProgress { .. } => {
                    return Outcome::Failed("idempotency claim still in progress".into())
                }
                Claim::Completed { undispatched } => {
                    if let Some(json) = undispatched {
                        // The first worker completed but may not have dispatched: do it now,
                        // with the original ids, so nothing it produced is lost.
                        let flushed = match dispatch::decode_outbox(&json) {
                            Ok(outbox) => self.dispatcher.flush(outbox).await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = flushed {
                            return Outcome::Failed(format!(
                                "dispatching the stored messages of a completed duplicate failed: {e}"
                            ));
                        }
                        if let Err(e) = idem.store.set_outbox(&key, None).await {
                            tracing::warn!(key = %key, error = %e, "could not mark the outbox dispatched; it may be dispatched again (same ids)");
                        }
                    }
                    tracing::debug!(queue = %self.queue, message_id = %env.id, key = %key, "duplicate of a completed message acknowledged");
                    self.delete(msg).await;
                    return Outcome::Done("duplicate");
                }
                Claim::Mismatch => {
                    let reason = format!(
                        "message id `{}` was already processed with a different payload (idempotency key `{key}`): refusing to treat it as a duplicate or to run it again",
                        env.id
                    );
                    self.dead_letter(msg, "mismatch", &reason).await;
                    return Outcome::Done("dead_lettered");
                }
            }
        }

        let wire_name = env.wire_name.clone();
        let trace = envelope::attribute(&msg.attributes, attr::TRACEPARENT).map(|tp| {
            (
                tp.to_string(),
                envelope::attribute(&msg.attributes, attr::TRACESTATE).map(str::to_string),
            )
        });
        let ctx = Context::new(
            self.dispatcher.clone(),
            env,
            msg.receive_count,
            self.queue.clone(),
            trace,
        );
        let metrics = self.dispatcher.metrics();
        let in_flight_attrs = [self.dest_attr()];
        for h in handlers {
            metrics.in_flight.add(1, &in_flight_attrs);
            let run = AssertUnwindSafe((h.invoke)(&ctx))
                .catch_unwind()
                .instrument(tracing::info_span!(
                    "sourceflow.handler",
                    sourceflow.handler = h.name
                ))
                .await;
            metrics.in_flight.add(-1, &in_flight_attrs);
            let err = match run {
                Ok(Ok(())) => continue,
                Ok(Err(InvokeError::Decode { wire_name, reason })) => {
                    self.release(&claim).await;
                    self.dead_letter(
                        msg,
                        "payload",
                        &format!("payload does not decode as `{wire_name}`: {reason}"),
                    )
                    .await;
                    return Outcome::Done("dead_lettered");
                }
                Ok(Err(e)) => format!("{}: {e}", h.qualified_name()),
                Err(panic) => format!("{} panicked: {}", h.qualified_name(), panic_message(&panic)),
            };
            self.release(&claim).await;
            return Outcome::Failed(err);
        }
        let outbox = ctx.take_outbox();
        let durable_claim = self.idempotency.as_ref().is_some_and(|i| i.store.durable());
        if !durable_claim {
            if let (Some((key, token)), Some(idem)) = (&claim, &self.idempotency) {
                // A store that dies with the process: dispatch first, complete after.
                let backup = (!outbox.is_empty()).then(|| outbox.clone());
                if let Err(e) = self.dispatcher.flush(outbox).await {
                    // Keep what must still go out with the completion: the retry finds it
                    // and dispatches it (same ids) instead of running the handler again.
                    let stored = backup.as_deref().map(dispatch::encode_outbox);
                    if let Err(e2) = idem
                        .store
                        .complete(key, token, idem.ttl_for(&wire_name), stored.as_deref())
                        .await
                    {
                        tracing::warn!(key = %key, error = %e2, "could not record the undispatched outbox");
                    }
                    return Outcome::Failed(format!(
                        "dispatching the handler's messages failed: {e}"
                    ));
                }
                return match idem
                    .store
                    .complete(key, token, idem.ttl_for(&wire_name), None)
                    .await
                {
                    Ok(_) => {
                        self.delete(msg).await;
                        Outcome::Done("success")
                    }
                    Err(e) => Outcome::Failed(format!(
                        "idempotency store `{}` could not record completion: {e}",
                        idem.store.name()
                    )),
                };
            }
        }
        if let (Some((key, token)), Some(idem)) = (&claim, &self.idempotency) {
            let stored = (!outbox.is_empty()).then(|| dispatch::encode_outbox(&outbox));
            match idem
                .store
                .complete(key, token, idem.ttl_for(&wire_name), stored.as_deref())
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Our lease ran out and another worker took the message over; it will
                    // complete it and dispatch the same messages (same ids).
                    tracing::warn!(queue = %self.queue, key = %key, "idempotency claim was taken over before completion; leaving the message to the new owner");
                    return Outcome::Done("duplicate");
                }
                Err(e) => {
                    self.release(&claim).await;
                    return Outcome::Failed(format!(
                        "idempotency store `{}` could not record completion: {e}",
                        idem.store.name()
                    ));
                }
            }
        }
        if !outbox.is_empty() {
            if let Err(e) = self.dispatcher.flush(outbox).await {
                return Outcome::Failed(format!("dispatching the handler's messages failed: {e}"));
            }
            if let (Some((key, _)), Some(idem)) = (&claim, &self.idempotency) {
                if let Err(e) = idem.store.set_outbox(key, None).await {
                    tracing::warn!(key = %key, error = %e, "could not mark the outbox dispatched; a duplicate would dispatch it again (same ids)");
                }
            }
        }
        self.delete(msg).await;
        Outcome::Done("success")
    }

    async fn decrypt(
        &self,
        msg: &ReceivedMessage,
        env: &mut envelope::Envelope,
    ) -> Result<(), encryption::DecryptError> {
        use encryption::DecryptError;
        let marked = envelope::attribute(&msg.attributes, encryption::ATTRIBUTE);
        let settings = self.dispatcher.encryption();
        let Some(format) = marked else {
            let required =
                self.encrypted.contains(env.wire_name.as_str()) || settings.is_some_and(|s| s.all);
            return if required {
                Err(DecryptError::Plaintext(env.wire_name.clone()))
            } else {
                Ok(())
            };
        };
        if format != encryption::FORMAT_V1 {
            return Err(DecryptError::Format(format!(
                "encryption format `{format}` is not supported (this build reads `{}`)",
                encryption::FORMAT_V1
            )));
        }
        let settings = settings.ok_or(DecryptError::NoKeyProvider)?;
        let sealed: encryption::Sealed = serde_json::from_str(env.payload.get())
            .map_err(|e| DecryptError::Format(e.to_string()))?;
        let destination = self
            .dispatcher
            .destination_of(&env.wire_name)
            .ok_or_else(|| DecryptError::Format(format!("unknown type `{}`", env.wire_name)))?;
        let context = encryption::context(&env.wire_name, destination);
        let plaintext = settings.encryptor.open(&sealed, &context).await?;
        let json = String::from_utf8(plaintext.to_vec())
            .map_err(|_| DecryptError::Format("plaintext is not UTF-8 JSON".into()))?;
        env.payload = serde_json::value::RawValue::from_string(json)
            .map_err(|e| DecryptError::Format(format!("plaintext is not JSON: {e}")))?;
        Ok(())
    }

    async fn delete(&self, msg: &ReceivedMessage) {
        if let Err(e) = self
            .dispatcher
            .transport()
            .delete(&self.queue, vec![msg.receipt.clone()])
            .await
        {
            tracing::warn!(queue = %self.queue, broker_id = %msg.broker_id, error = %e, "handled, but the delete failed; the message will be delivered again");
        }
    }

    async fn release(&self, claim: &Option<(String, String)>) {
        if let (Some((key, token)), Some(idem)) = (claim, &self.idempotency) {
            if let Err(e) = idem
                .store
                .release(key, token, idempotency::Release::Failed)
                .await
            {
                tracing::warn!(key = %key, error = %e, "could not release the idempotency claim; the retry waits for its lease to expire");
            }
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Splits a FIFO batch into per-group runs, keeping the order within each group.
fn group_in_order(messages: Vec<ReceivedMessage>) -> Vec<Vec<ReceivedMessage>> {
    let mut order: Vec<Vec<ReceivedMessage>> = Vec::new();
    let mut index: HashMap<Option<String>, usize> = HashMap::new();
    for m in messages {
        match index.get(&m.group_id) {
            Some(&i) => order[i].push(m),
            None => {
                index.insert(m.group_id.clone(), order.len());
                order.push(vec![m]);
            }
        }
    }
    order
}
