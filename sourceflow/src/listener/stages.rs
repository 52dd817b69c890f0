//! The stages a received message goes through:
//! `decode → due → route → fetch → decrypt → claim → invoke → commit` (`due` holds back a
//! message received before its due time: [`crate::schedule`]; `fetch` reads a payload the
//! claim check stored: [`crate::claim_check`]).
//!
//! Each stage returns the next stage's input, or the [`Disposition`] that ends the
//! message's way (`Err`, so that `?` chains them). No stage calls the broker to settle a
//! message: that is [`settle`](super::settle)'s job alone.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tracing::Instrument;

use super::disposition::{Ack, Cause, DeadLetterKind, Disposition, Redelay, Retry};
use super::heartbeat::{ClaimRef, Hold};
use super::Listener;
use crate::claim_check::{self, RestoreError};
use crate::context::Context;
use crate::dispatch::{self, Pending, Undispatched};
use crate::encryption::{self, DecryptError};
use crate::envelope::{self, attr, Incoming};
use crate::error::{BoxError, InvokeError};
use crate::idempotency::{self, Claim};
use crate::middleware::{self, Failed, Invocation};
use crate::outcome::Verdict;
use crate::registry::HandlerRoute;
use crate::telemetry;
use crate::transport::ReceivedMessage;

pub(super) type Stage<T> = Result<T, Disposition>;

/// What a message's way left for [`settle`](super::settle) besides the disposition.
#[derive(Debug)]
pub(crate) struct Track {
    /// The wire name as a metric attribute (`unknown` for types not linked in).
    pub wire: &'static str,
    /// The claim this delivery holds and has not completed.
    pub claim: Option<ClaimRef>,
    /// The handler attempt this delivery is.
    pub attempt: u32,
    /// Retries of this delivery that kept the message (FIFO, later messages in hand).
    pub in_place: u32,
    /// The claim of a transaction that was rolled back (or never committed): what its
    /// settling still has to record outside it.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub tx_claim: Option<super::tx::TxClaim>,
}

impl Track {
    pub(crate) fn new(in_place: u32) -> Self {
        Track {
            wire: telemetry::UNKNOWN_WIRE_NAME,
            claim: None,
            attempt: 1,
            in_place,
            #[cfg(any(feature = "postgres", feature = "sqlite"))]
            tx_claim: None,
        }
    }
}

/// Why a handler run did not succeed.
enum Failure {
    /// The payload does not decode as the handler's type.
    Decode(String),
    /// The handler returned an error (or asked for state it was not given).
    Error { handler: String, error: BoxError },
    /// The handler (or a layer around it) panicked.
    Panic { handler: String, message: String },
    /// A middleware layer around the handler returned an error of its own.
    Layer { handler: String, error: BoxError },
}

impl Listener {
    /// Runs the stages; `Ok` and `Err` both carry the disposition.
    ///
    /// `decoded` is the first stage's result, [`decode`], which the caller runs before it
    /// creates the message's span (so the span is born with the message's fields).
    pub(crate) async fn pipeline(
        &self,
        msg: &ReceivedMessage,
        decoded: Stage<Incoming>,
        hold: &Hold,
        track: &mut Track,
    ) -> Stage<Disposition> {
        let env = decoded?;
        self.due(msg, &env)?;
        let handlers = self.route(&env, track)?;
        let env = self.fetch(msg, env).await?;
        let env = self.decrypt(msg, env).await?;
        #[cfg(any(feature = "postgres", feature = "sqlite"))]
        if let Some(pool) = &self.tx_pool {
            if handlers.iter().any(|h| h.tx.is_some()) {
                return self.transactional(pool, msg, env, handlers, track).await;
            }
        }
        self.claim(msg, &env, hold, track).await?;
        let outbox = self.invoke(msg, env, handlers, track).await?;
        Ok(self.commit(outbox, hold, track).await)
    }

    /// Holds back a message received before its due time ([`crate::schedule`]): it is sent
    /// again to wait out the rest. (Nothing sends a FIFO queue a due time: there, order
    /// comes first and the attribute is ignored.)
    fn due(&self, msg: &ReceivedMessage, env: &Incoming) -> Stage<()> {
        match crate::schedule::remaining(&msg.attributes) {
            Some(left) if !self.fifo => Err(Disposition::Redelay(Redelay {
                left,
                wire_name: env.wire_name().to_string(),
                message_id: env.id().to_string(),
            })),
            _ => Ok(()),
        }
    }

    /// Finds this service's handlers for the message's type on this queue.
    fn route(&self, env: &Incoming, track: &mut Track) -> Stage<&[&'static HandlerRoute]> {
        let name = env.wire_name();
        let known = self.known.get(name).copied();
        if let Some(k) = known {
            track.wire = k;
        }
        if let Some(h) = self.handlers.get(name) {
            return Ok(h);
        }
        let service = self.dispatcher.service();
        Err(match known {
            Some(_) => Disposition::dead_letter(
                DeadLetterKind::NoHandler,
                format!(
                    "service `{service}` has no handler for `{name}` on queue `{}`",
                    self.queue
                ),
            ),
            None => Disposition::dead_letter(
                DeadLetterKind::UnknownType,
                format!("unknown message type `{name}`: no type with this wire name is linked into service `{service}`"),
            ),
        })
    }

    /// Puts a stored or compressed payload back ([`crate::claim_check`]): a missing or
    /// corrupted one dead-letters the message, a store that cannot be reached is an
    /// infrastructure fault (retried, no attempt spent).
    async fn fetch(&self, msg: &ReceivedMessage, mut env: Incoming) -> Stage<Incoming> {
        if env.claim_check.is_none() && env.payload_encoding.is_none() {
            return Ok(env);
        }
        let store = self.dispatcher.transport().object_store();
        match claim_check::restore_incoming(store.as_deref(), &mut env).await {
            Ok(()) => Ok(env),
            Err(e @ RestoreError::Unavailable(_)) => {
                Err(self.infrastructure(msg, format!("claim check: {e}")))
            }
            Err(e) => Err(Disposition::dead_letter(
                DeadLetterKind::ClaimCheck,
                format!("claim check: {e}"),
            )),
        }
    }

    /// Opens an encrypted payload; a type that requires encryption is refused in clear.
    /// Nothing after this stage sees a ciphertext.
    async fn decrypt(&self, msg: &ReceivedMessage, mut env: Incoming) -> Stage<Incoming> {
        match self.open(msg, &mut env).await {
            Ok(()) => Ok(env),
            Err(e) => Err(Disposition::dead_letter(
                DeadLetterKind::Decrypt,
                format!("decryption failed: {e}"),
            )),
        }
    }

    async fn open(&self, msg: &ReceivedMessage, env: &mut Incoming) -> Result<(), DecryptError> {
        let settings = self.dispatcher.encryption();
        let Some(format) = envelope::attribute(&msg.attributes, encryption::ATTRIBUTE) else {
            let required =
                self.encrypted.contains(env.wire_name()) || settings.is_some_and(|s| s.all);
            return match required {
                true => Err(DecryptError::Plaintext(env.wire_name().to_string())),
                false => Ok(()),
            };
        };
        if format != encryption::FORMAT_V1 {
            return Err(DecryptError::Format(format!(
                "encryption format `{format}` is not supported (this build reads `{}`)",
                encryption::FORMAT_V1
            )));
        }
        let settings = settings.ok_or(DecryptError::NoKeyProvider)?;
        let sealed: encryption::Sealed = serde_json::from_str(env.payload())
            .map_err(|e| DecryptError::Format(crate::payload::describe(&e, ".")))?;
        let destination = self
            .dispatcher
            .destination_of(env.wire_name())
            .ok_or_else(|| DecryptError::Format(format!("unknown type `{}`", env.wire_name())))?;
        let context = encryption::context(env.wire_name(), destination);
        let plaintext = settings.encryptor.open(&sealed, &context).await?;
        let json = String::from_utf8(plaintext.to_vec())
            .map_err(|_| DecryptError::Format("plaintext is not UTF-8 JSON".into()))?;
        let payload = serde_json::value::RawValue::from_string(json).map_err(|e| {
            DecryptError::Format(format!(
                "plaintext is not JSON: {}",
                crate::payload::describe(&e, ".")
            ))
        })?;
        env.set_payload(payload);
        Ok(())
    }

    /// Claims the message in the idempotency store (or counts the attempt without one).
    /// A duplicate of a message in progress elsewhere waits here, kept invisible by the
    /// heartbeat, until the original completes (acknowledge), fails (run it) or its lease
    /// runs out (take over): handing it back would spend a receive on waiting.
    async fn claim(
        &self,
        msg: &ReceivedMessage,
        env: &Incoming,
        hold: &Hold,
        track: &mut Track,
    ) -> Stage<()> {
        let Some(idem) = &self.idempotency else {
            track.attempt = self.ledger.attempt(msg, track.in_place);
            return Ok(());
        };
        let key = self.key_of(idem, env)?;
        let hash = idempotency::PayloadHash::of(env.payload());
        let mut waits = 0u32;
        loop {
            let claimed = idem
                .store
                .claim(&key, hash.as_str(), self.visibility_timeout)
                .await
                .map_err(|e| {
                    self.infrastructure(
                        msg,
                        format!("idempotency store `{}` unavailable: {e}", idem.store.name()),
                    )
                })?;
            let Claim::InProgress { lease_left } = claimed else {
                idem.stats.record(&claimed);
                return self.claimed(claimed, key, env, hold, track).await;
            };
            if waits == 0 {
                idem.stats.record(&claimed);
                tracing::info!(queue = %self.queue, key = %key, "duplicate of a message in progress elsewhere; waiting for it");
            }
            waits += 1;
            self.wait_for_claim(waits, lease_left).await?;
        }
    }

    /// The idempotency key of the message (a business key that does not decode: the
    /// payload is bad).
    pub(super) fn key_of(&self, idem: &idempotency::Settings, env: &Incoming) -> Stage<String> {
        let service = self.dispatcher.service();
        idem.key_for(service, env.wire_name(), env.id(), env.payload())
            .map_err(|reason| {
                Disposition::dead_letter(
                    DeadLetterKind::Payload,
                    format!("payload does not decode as `{}` (needed for its idempotency key): {reason}", env.wire_name()),
                )
            })
    }

    /// Waits before claiming again a message in progress elsewhere (`waits` so far); the
    /// stop hands it back.
    pub(super) async fn wait_for_claim(&self, waits: u32, lease_left: Duration) -> Stage<()> {
        let pause = self
            .retry
            .delay(waits)
            .min(lease_left)
            .max(Duration::from_millis(10));
        tokio::select! {
            _ = self.stop.cancelled() => Err(Disposition::Return),
            _ = tokio::time::sleep(pause) => Ok(()),
        }
    }

    async fn claimed(
        &self,
        claim: Claim,
        key: String,
        env: &Incoming,
        hold: &Hold,
        track: &mut Track,
    ) -> Stage<()> {
        match claim {
            Claim::Acquired { token, attempt } => {
                let claim = ClaimRef::new(key, token);
                hold.claimed(claim.clone());
                track.claim = Some(claim);
                track.attempt = attempt;
                Ok(())
            }
            other => Err(self.not_claimed(other, &key, env).await),
        }
    }

    /// What a claim that was not acquired means: a duplicate of a completed message, or
    /// a mismatch.
    pub(super) async fn not_claimed(&self, claim: Claim, key: &str, env: &Incoming) -> Disposition {
        match claim {
            Claim::Completed { undispatched } => self.duplicate(key, undispatched).await,
            Claim::Mismatch => Disposition::dead_letter(
                DeadLetterKind::Mismatch,
                format!(
                    "message id `{}` was already processed with a different payload (idempotency key `{key}`): refusing to treat it as a duplicate or to run it again",
                    env.id()
                ),
            ),
            // `claim` loops until another answer; `Acquired` is handled by the caller.
            Claim::InProgress { .. } | Claim::Acquired { .. } => Disposition::infrastructure(
                self.infrastructure_retry.base,
                "the idempotency claim is still in progress",
            ),
        }
    }

    /// A duplicate of a completed message: acknowledge it, after dispatching what the first
    /// worker stored but may not have sent (same ids, so receivers deduplicate).
    async fn duplicate(&self, key: &str, undispatched: Option<String>) -> Disposition {
        let Some(json) = undispatched else {
            return Disposition::Ack(Ack::Duplicate);
        };
        let outbox = match dispatch::decode_outbox(&json) {
            Ok(o) => o,
            Err(e) => {
                return Disposition::dead_letter(
                    DeadLetterKind::Refused,
                    format!(
                        "the stored messages of its completed first delivery cannot be read: {e}"
                    ),
                )
            }
        };
        self.dispatch_stored(key, outbox, Ack::Duplicate).await
    }

    /// Sends the messages stored with the completed claim `key`, then clears them from the
    /// store (`done` once all went out); what did not go stays stored for the retry.
    pub(super) async fn dispatch_stored(
        &self,
        key: &str,
        outbox: Vec<Pending>,
        done: Ack,
    ) -> Disposition {
        match self.dispatcher.flush(outbox).await {
            Ok(()) => {
                self.store_outbox(key, None).await;
                Disposition::Ack(done)
            }
            Err(u) => {
                let left = dispatch::encode_outbox(&u.remaining);
                self.store_outbox(key, Some(&left)).await;
                self.undispatched(u)
            }
        }
    }

    /// Runs the handlers; a failure decides the disposition.
    async fn invoke(
        &self,
        msg: &ReceivedMessage,
        env: Incoming,
        handlers: &[&'static HandlerRoute],
        track: &Track,
    ) -> Stage<Vec<Pending>> {
        let ctx = self.invocation(self.context(msg, env));
        self.run_all(handlers, &ctx, track).await?;
        Ok(ctx.take_outbox())
    }

    /// The context as the handlers' run holds it: shared only when layers wrap them.
    pub(super) fn invocation(&self, ctx: Context) -> Invocation {
        Invocation::new(ctx, self.middleware.as_deref())
    }

    /// The context the handlers of a message share.
    pub(super) fn context(&self, msg: &ReceivedMessage, env: Incoming) -> Context {
        let trace = envelope::attribute(&msg.attributes, attr::TRACEPARENT).map(|tp| {
            let state = envelope::attribute(&msg.attributes, attr::TRACESTATE);
            (tp.to_string(), state.map(str::to_string))
        });
        Context::new(
            self.dispatcher.clone(),
            env,
            msg.receive_count,
            self.queue.clone(),
            trace,
            std::sync::Arc::clone(&msg.attributes),
        )
    }

    /// Runs the handlers in turn; the first failure decides the disposition.
    pub(super) async fn run_all(
        &self,
        handlers: &[&'static HandlerRoute],
        ctx: &Invocation,
        track: &Track,
    ) -> Stage<()> {
        for h in handlers {
            if let Err(failure) = self.run_handler(h, ctx).await {
                return Err(self.judge(failure, ctx, track.attempt));
            }
        }
        Ok(())
    }

    async fn run_handler(&self, h: &'static HandlerRoute, ctx: &Invocation) -> Result<(), Failure> {
        let metrics = self.dispatcher.metrics();
        let in_flight = self.attrs.destination();
        metrics.in_flight.add(1, in_flight);
        // Made in each branch as a temporary (a future moved from a local into another is
        // stored twice in this function's state machine).
        let work = || {
            AssertUnwindSafe(middleware::call(self.middleware.as_deref(), h, ctx)).catch_unwind()
        };
        let run = match metrics.spans() {
            None => {
                async {
                    let run = work().await;
                    if !matches!(run, Ok(Ok(()))) {
                        tracing::Span::current()
                            .record("otel.status_code", telemetry::STATUS_ERROR);
                    }
                    run
                }
                .instrument(handler_span(h, ctx))
                .await
            }
            Some(spans) => {
                let cx = spans.start(
                    "sourceflow.handler",
                    opentelemetry::trace::SpanKind::Internal,
                    handler_attributes(h, ctx),
                    &opentelemetry::Context::current(),
                );
                let run = telemetry::within(&cx, work()).await;
                telemetry::end(&cx, !matches!(run, Ok(Ok(()))));
                run
            }
        };
        metrics.in_flight.add(-1, in_flight);
        match run {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Failed::Handler(InvokeError::Decode { reason, .. }))) => {
                Err(Failure::Decode(reason))
            }
            Ok(Err(Failed::Handler(InvokeError::Failed(error)))) => Err(Failure::Error {
                handler: h.qualified_name(),
                error,
            }),
            Ok(Err(Failed::Layer(error))) => Err(Failure::Layer {
                handler: h.qualified_name(),
                error,
            }),
            Ok(Err(Failed::Handler(e))) => Err(Failure::Error {
                handler: h.qualified_name(),
                error: Box::new(e),
            }),
            Err(panic) => Err(Failure::Panic {
                handler: h.qualified_name(),
                message: panic_message(&panic),
            }),
        }
    }

    /// What a failed handler run means for the message.
    fn judge(&self, failure: Failure, ctx: &Context, attempt: u32) -> Disposition {
        match failure {
            Failure::Decode(reason) => Disposition::dead_letter(
                DeadLetterKind::Payload,
                format!("payload does not decode as `{}`: {reason}", ctx.wire_name()),
            ),
            Failure::Panic { handler, message } => {
                self.handler_retry(attempt, None, format!("{handler} panicked: {message}"))
            }
            Failure::Error { handler, error } => self.judge_error(
                error,
                attempt,
                format!("{handler} rejected the message"),
                handler,
            ),
            Failure::Layer { handler, error } => self.judge_error(
                error,
                attempt,
                format!("middleware rejected the message before {handler}"),
                format!("middleware before {handler}"),
            ),
        }
    }

    /// What an error of a handler (or of a layer around it, `who`) means: a rejection
    /// (dead-letter, the reason starting with `rejected`) or a failed attempt.
    fn judge_error(
        &self,
        error: BoxError,
        attempt: u32,
        rejected: String,
        who: String,
    ) -> Disposition {
        match self.permanent.verdict(error.as_ref()) {
            Verdict::Reject => {
                Disposition::dead_letter(DeadLetterKind::Rejected, format!("{rejected}: {error}"))
            }
            Verdict::RetryAfter(after) => {
                self.handler_retry(attempt, Some(after), format!("{who}: {error}"))
            }
            Verdict::Retry => self.handler_retry(attempt, None, format!("{who}: {error}")),
        }
    }

    /// A failed attempt: retried after the backoff (or `after`), or dead-lettered when it
    /// was the last one allowed.
    fn handler_retry(&self, attempt: u32, after: Option<Duration>, error: String) -> Disposition {
        if attempt >= self.max_attempts {
            return Disposition::dead_letter(
                DeadLetterKind::Failures,
                format!(
                    "handler failed {attempt} times (limit {}); last error: {error}",
                    self.max_attempts
                ),
            );
        }
        Disposition::Retry(Retry {
            cause: Cause::Handler { attempt },
            after: after
                .unwrap_or_else(|| self.retry.delay(attempt))
                .min(crate::transport::MAX_VISIBILITY),
            reason: error,
        })
    }

    /// Records the completion and sends what the handlers produced. A store that outlives
    /// the process is completed first, with the outbox, so a crash before the dispatch
    /// loses nothing (the retry finds the outbox and sends it); a store that dies with the
    /// process is completed after a successful dispatch (same guarantee, no serialized
    /// outbox on the happy path).
    async fn commit(&self, outbox: Vec<Pending>, hold: &Hold, track: &mut Track) -> Disposition {
        let (Some(idem), Some(claim)) = (&self.idempotency, track.claim.clone()) else {
            return match self.dispatcher.flush(outbox).await {
                Ok(()) => Disposition::Ack(Ack::Success),
                Err(u) => self.undispatched(u),
            };
        };
        let ttl = idem.ttl_for(track.wire);
        if !idem.store.durable() {
            return self
                .dispatch_then_complete(outbox, &claim, ttl, hold, track)
                .await;
        }
        let stored = (!outbox.is_empty()).then(|| dispatch::encode_outbox(&outbox));
        match self
            .complete(&claim, ttl, stored.as_deref(), hold, track)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Disposition::Ack(Ack::TakenOver),
            Err(d) => return d,
        }
        if outbox.is_empty() {
            return Disposition::Ack(Ack::Success);
        }
        self.dispatch_stored(&claim.key, outbox, Ack::Success).await
    }

    /// For a store that dies with the process: dispatches, then completes the claim with
    /// what did not go out, if anything, for the retry to send (at once: no lease on it).
    async fn dispatch_then_complete(
        &self,
        outbox: Vec<Pending>,
        claim: &ClaimRef,
        ttl: Duration,
        hold: &Hold,
        track: &mut Track,
    ) -> Disposition {
        let result = self.dispatcher.flush(outbox).await;
        let left = result
            .as_ref()
            .err()
            .map(|u| dispatch::encode_outbox(&u.remaining));
        match self
            .complete(claim, ttl, left.as_deref(), hold, track)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Disposition::Ack(Ack::TakenOver),
            Err(d) => return d,
        }
        match result {
            Ok(()) => Disposition::Ack(Ack::Success),
            Err(u) => {
                // Nobody is sending it now: end the dispatch lease `complete` left on it.
                self.store_outbox(&claim.key, left.as_deref()).await;
                self.undispatched(u)
            }
        }
    }

    /// Completes the claim, retrying a failing store in place: the handlers' work is done
    /// and must not be repeated, and the heartbeat keeps the message meanwhile. Only the
    /// shutdown deadline ends the wait (the message is then handed back).
    async fn complete(
        &self,
        claim: &ClaimRef,
        ttl: Duration,
        outbox: Option<&str>,
        hold: &Hold,
        track: &mut Track,
    ) -> Result<bool, Disposition> {
        let Some(idem) = &self.idempotency else {
            return Ok(true);
        };
        let mut failures = 0u32;
        loop {
            match idem
                .store
                .complete(&claim.key, &claim.token, ttl, outbox)
                .await
            {
                Ok(done) => {
                    hold.unclaimed();
                    track.claim = None;
                    return Ok(done);
                }
                Err(e) => {
                    failures += 1;
                    let pause = self.infrastructure_retry.delay(failures);
                    tracing::warn!(queue = %self.queue, key = %claim.key, error = %e, retry_in_ms = pause.as_millis() as u64, "the handlers succeeded but the idempotency store cannot record it; retrying in place");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Replaces the stored outbox of a completed claim (`None`: all sent; JSON as stored),
    /// ending its dispatch lease.
    async fn store_outbox(&self, key: &str, remaining: Option<&str>) {
        let Some(idem) = &self.idempotency else {
            return;
        };
        if let Err(e) = idem.store.set_outbox(key, remaining).await {
            tracing::warn!(key, error = %e, "could not record what is left of the outbox; a duplicate may send it again (same ids)");
        }
    }

    /// What a failed dispatch means: refused entries can never go (dead-letter, with the
    /// outbox kept in the store for a redrive); anything else is retried without running
    /// the handlers again where a store remembers the outbox.
    fn undispatched(&self, u: Undispatched) -> Disposition {
        if u.refused() {
            return Disposition::dead_letter(
                DeadLetterKind::Refused,
                format!(
                    "the messages its handlers produced were refused: {}",
                    u.error
                ),
            );
        }
        Disposition::infrastructure(
            self.infrastructure_retry.delay(1),
            format!("dispatching the handlers' messages failed: {}", u.error),
        )
    }

    /// A retry after an infrastructure fault, paced by how often this message came back so.
    pub(crate) fn infrastructure(&self, msg: &ReceivedMessage, reason: String) -> Disposition {
        let n = self.ledger.returns(msg) + 1;
        Disposition::infrastructure(self.infrastructure_retry.delay(n), reason)
    }
}

/// Decodes the envelope (undecodable: dead-letter, with the reason).
pub(super) fn decode(msg: &ReceivedMessage) -> Stage<Incoming> {
    envelope::incoming::decode(&msg.body, &msg.attributes).map_err(|e| {
        Disposition::dead_letter(
            DeadLetterKind::Undecodable,
            format!("undecodable message: {e}"),
        )
    })
}

/// The span of one handler run: with the headers marked safe to log
/// ([`crate::headers`]), when the service marks some and the message has them.
fn handler_span(h: &HandlerRoute, ctx: &Context) -> tracing::Span {
    match ctx.safe_headers() {
        None => tracing::info_span!(
            "sourceflow.handler",
            sourceflow.handler = h.name,
            otel.status_code = tracing::field::Empty,
        ),
        Some(shown) => tracing::info_span!(
            "sourceflow.handler",
            sourceflow.handler = h.name,
            sourceflow.headers = shown,
            otel.status_code = tracing::field::Empty,
        ),
    }
}

/// The attributes of a directly made `sourceflow.handler` span: the fields of
/// [`handler_span`].
fn handler_attributes(h: &HandlerRoute, ctx: &Context) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    let mut attributes = vec![KeyValue::new("sourceflow.handler", h.name)];
    if let Some(shown) = ctx.safe_headers() {
        attributes.push(KeyValue::new("sourceflow.headers", shown));
    }
    attributes
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
