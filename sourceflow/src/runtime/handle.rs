//! The handle of a running service.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::envelope::SendMeta;
use crate::error::{Error, Result};
use crate::health::{HealthCheck, HealthReport, Liveness, Status};
use crate::idempotency::{self, IdempotencyStatsSnapshot, IdempotencyStore};
use crate::listener::DrainReport;
use crate::message::{Command, Event, Message};
use crate::naming::Naming;
use crate::telemetry::{self, Metrics};
use crate::transport::{Topology, Transport};

/// Options for [`Handle::send_with`] and [`Handle::raise_with`].
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    meta: SendMeta,
    /// User-defined headers ([`crate::headers`]): `Debug` shows their names only.
    headers: crate::headers::Outgoing,
}

impl SendOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the message into an existing conversation.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.meta.correlation_id = Some(id.into());
        self
    }

    /// The send's metadata.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(crate) fn into_meta(self) -> SendMeta {
        self.meta
    }

    /// Pins the message id; a retried send with the same id is deduplicated on FIFO queues.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.meta.message_id = Some(id.into());
        self
    }

    /// Adds a message attribute: a string, a number (`Number`) or a string array
    /// (`String.Array`), carried as an SQS/SNS message attribute of that type. Subscription
    /// filters (`#[handler(filter = ..)]`) match on it and the receiving handler reads it
    /// with [`Context::attribute`](crate::Context::attribute).
    ///
    /// Checked at the call ([`Error::InvalidAttribute`](crate::Error::InvalidAttribute)):
    /// SQS's name rules (up to 256 of `A-Z a-z 0-9 _ - .`, no leading, trailing or double
    /// period, not `AWS.`/`Amazon.`), names sourceflow sets itself (`sourceflow.*`,
    /// `content-type`, `traceparent`, `tracestate`), a name set twice, an empty string, a
    /// number SQS would refuse, and the count: a message carries at most 10 attributes on
    /// SQS, of which sourceflow keeps 5 to 9 (the type, content type, sequence number,
    /// correlation id, entity id, trace context, encryption format and the dead-letter
    /// reason, as they apply).
    ///
    /// ```
    /// use sourceflow::{AttributeValue, SendOptions};
    ///
    /// let options = SendOptions::new()
    ///     .attribute("region", "eu-west-1")
    ///     .attribute("amount", 42)
    ///     .attribute("tags", ["gift", "express"]);
    /// # let _ = options;
    /// ```
    pub fn attribute(
        mut self,
        name: impl Into<String>,
        value: impl Into<crate::envelope::AttributeValue>,
    ) -> Self {
        self.meta.attributes.push((name.into(), value.into()));
        self
    }

    /// Adds a header ([`crate::headers`]): application metadata such as a tenant or user
    /// id, read by the receiving handler with [`Context::header`](crate::Context::header)
    /// and by [middleware](crate::middleware). All headers of a message travel in one
    /// message attribute, so any number of them costs one of SQS's 10 attribute slots.
    ///
    /// Checked at the call: names are 1 to 128 characters of `a-z 0-9 _ - .`
    /// (case-insensitive; [`Error::InvalidHeader`](crate::Error::InvalidHeader)), a name is
    /// set once, and the headers' slot must fit beside sourceflow's own attributes and
    /// those set with [`attribute`](Self::attribute)
    /// ([`Error::TooManyAttributes`](crate::Error::TooManyAttributes)). Inside a handler, a
    /// header set here overrides the one propagated from the message being handled.
    ///
    /// ```
    /// use sourceflow::SendOptions;
    ///
    /// let options = SendOptions::new()
    ///     .header("tenant", "acme")
    ///     .header("user", "u-42");
    /// // `Debug` shows header names, never their values.
    /// assert!(!format!("{options:?}").contains("acme"));
    /// ```
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.set.push((name.into(), value.into()));
        self
    }

    /// Inside a handler: copies every header of the message being handled onto this one
    /// (those set with [`header`](Self::header) win). To pass some headers on from every
    /// handler, use [`Builder::propagate_header`](crate::Builder::propagate_header).
    pub fn propagate_headers(mut self) -> Self {
        self.headers.propagate_all = true;
        self
    }

    /// Takes the headers out of the options (what is left goes to
    /// [`for_handler`](Self::for_handler)).
    pub(crate) fn take_headers(&mut self) -> crate::headers::Outgoing {
        std::mem::take(&mut self.headers)
    }

    /// The attributes set so far, and the delay, for a message produced inside a handler;
    /// an error when an option that only a [`Handle`] honours was set.
    pub(crate) fn for_handler(self) -> Result<SendMeta> {
        if self.meta.correlation_id.is_some() || self.meta.message_id.is_some() {
            return Err(Error::Unsupported(
                "inside a handler the correlation id and message id of a produced message come from the message being handled; set only attributes and a delay in these options".into(),
            ));
        }
        Ok(self.meta)
    }

    /// Delays delivery by `d`, of any length: a command to a standard queue, or an event
    /// (held back on each subscriber queue). Up to SQS's 15 minutes the broker delays a
    /// command itself; a longer delay, or any delay of an event, is held back by the
    /// receiving listeners until due ([`crate::schedule`]): never delivered early, its
    /// message id unchanged. FIFO queues and topics take no per-message delay: a delay to
    /// one is refused at the call with [`Error::Unsupported`](crate::Error::Unsupported).
    pub fn delay(mut self, d: Duration) -> Self {
        self.meta.delay = Some(d);
        self
    }

    /// Delivers no earlier than `at` ([`delay`](Self::delay) by the time left; a time
    /// passed is no delay).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// let tomorrow = SystemTime::now() + Duration::from_secs(24 * 3600);
    /// let options = sourceflow::SendOptions::new().deliver_at(tomorrow);
    /// # let _ = options;
    /// ```
    pub fn deliver_at(self, at: std::time::SystemTime) -> Self {
        self.delay(crate::schedule::until(at))
    }
}

pub(super) struct HandleInner {
    pub(super) dispatcher: Arc<Dispatcher>,
    pub(super) topology: Topology,
    pub(super) naming: Naming,
    pub(super) stop: CancellationToken,
    pub(super) listeners: Mutex<Vec<JoinHandle<DrainReport>>>,
    pub(super) listener_info: Vec<ListenerInfo>,
    /// The periodic purge of expired idempotency records.
    pub(super) cleanup: Mutex<Option<JoinHandle<()>>>,
    pub(super) idempotency: Option<Arc<idempotency::Settings>>,
    /// The transactional outbox's relay, if one runs.
    pub(super) relay: Mutex<Option<JoinHandle<()>>>,
}

pub(super) struct ListenerInfo {
    pub(super) queue: String,
    pub(super) dead_letter_queue: String,
    pub(super) liveness: Arc<Liveness>,
    pub(super) bound: Duration,
}

/// How long a health check waits for the broker or a store.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Samples queue and dead-letter queue depths into the `sourceflow.queue.depth` gauge.
pub(super) async fn sample_depths(
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    queues: Vec<(String, String)>,
    every: Duration,
    stop: CancellationToken,
) {
    use opentelemetry::KeyValue;
    loop {
        for (queue, dlq) in &queues {
            for (name, kind) in [(queue, "source"), (dlq, "dead_letter")] {
                if let Ok(Some(d)) = transport.queue_depth(name).await {
                    for (state, n) in [
                        ("visible", d.visible),
                        ("in_flight", d.in_flight),
                        ("delayed", d.delayed),
                    ] {
                        metrics.queue_depth.record(
                            n as u64,
                            &[
                                KeyValue::new("messaging.destination.name", name.clone()),
                                KeyValue::new("sourceflow.queue.kind", kind),
                                KeyValue::new("sourceflow.state", state),
                            ],
                        );
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// A running service, for code outside handlers (an HTTP endpoint, a test): send commands,
/// raise events, inspect the topology, shut down. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    pub(super) inner: Arc<HandleInner>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("service", &self.service())
            .field("transport", &self.inner.dispatcher.transport().name())
            .finish()
    }
}

/// What the test harness (`sourceflow::testing`) reads of a running service.
#[cfg(feature = "testing")]
impl Handle {
    /// The queues this service's listeners receive from.
    pub(crate) fn listened_queues(&self) -> Vec<String> {
        let info = &self.inner.listener_info;
        info.iter().map(|l| l.queue.clone()).collect()
    }

    /// The service's dispatcher (its destinations and encryption settings).
    pub(crate) fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.inner.dispatcher
    }
}

impl Handle {
    /// Sends a command now; returns its message id.
    pub async fn send<C: Command>(&self, command: C) -> Result<String> {
        self.send_with(command, SendOptions::default()).await
    }

    /// Sends a command with options; returns its message id.
    pub async fn send_with<C: Command>(&self, command: C, options: SendOptions) -> Result<String> {
        self.dispatch(&command, options).await
    }

    /// Publishes an event now; returns its message id.
    pub async fn raise<E: Event>(&self, event: E) -> Result<String> {
        self.raise_with(event, SendOptions::default()).await
    }

    /// Publishes an event with options; returns its message id.
    pub async fn raise_with<E: Event>(&self, event: E, options: SendOptions) -> Result<String> {
        self.dispatch(&event, options).await
    }

    /// Answers a query with the handler this service runs for it, in process: nothing goes
    /// through a queue. Works after [`shutdown`](Self::shutdown) too (a query only reads).
    /// See [`query`](mod@crate::query).
    pub async fn query<Q: crate::Query>(&self, query: Q) -> Result<Q::Response> {
        crate::query::ask(&self.inner.dispatcher, query).await
    }

    /// Sends many commands of one type in as few broker calls as the broker allows (on
    /// SQS, `SendMessageBatch` of 10); returns their message ids, in order.
    ///
    /// Nothing is sent when one of them cannot be encoded or is refused before sending
    /// (its size, say). When the broker does not take some of them, the error is an
    /// [`Error::Batch`](crate::Error::Batch) whose [`failed`](crate::transport::BatchError::failed)
    /// entries are indices into `commands`: those were not sent, every other one was —
    /// resend exactly those. On a FIFO queue the commands of one group keep this order.
    ///
    /// ```no_run
    /// # #[sourceflow::command(queue = "jobs")]
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # struct Job { n: u32 }
    /// # async fn demo(app: sourceflow::Handle) -> sourceflow::Result<()> {
    /// let ids = app.send_all((0..100).map(|n| Job { n })).await?;
    /// assert_eq!(ids.len(), 100);
    /// # Ok(()) }
    /// ```
    ///
    /// The commands are collected before the returned future starts, so that it holds no
    /// iterator (whose closures would otherwise keep the future from being `Send`).
    pub fn send_all<C: Command>(
        &self,
        commands: impl IntoIterator<Item = C>,
    ) -> impl std::future::Future<Output = Result<Vec<String>>> + Send + '_ {
        self.dispatch_all(commands.into_iter().collect())
    }

    /// Raises many events of one type in as few broker calls as the broker allows (on SNS,
    /// `PublishBatch` of 10); returns their message ids, in order. Failures as for
    /// [`send_all`](Self::send_all).
    pub fn raise_all<E: Event>(
        &self,
        events: impl IntoIterator<Item = E>,
    ) -> impl std::future::Future<Output = Result<Vec<String>>> + Send + '_ {
        self.dispatch_all(events.into_iter().collect())
    }

    async fn dispatch_all<M: Message>(&self, messages: Vec<M>) -> Result<Vec<String>> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShutDown);
        }
        let dispatcher = &self.inner.dispatcher;
        let trace = telemetry::current_trace_context();
        let mut ids = Vec::with_capacity(messages.len());
        let mut pending = Vec::with_capacity(messages.len());
        for msg in messages {
            let mut meta = SendMeta::default();
            if let Some((tp, ts)) = &trace {
                meta.traceparent = Some(tp.clone());
                meta.tracestate = ts.clone();
            }
            let out = dispatcher.encode(&msg, meta).await?;
            ids.push(out.message_id.clone());
            pending.push(dispatcher.pending::<M>(out)?);
        }
        match dispatcher.flush(pending).await {
            Ok(()) => Ok(ids),
            Err(u) => Err(Error::Batch(u.error)),
        }
    }

    async fn dispatch<M: Message>(&self, msg: &M, options: SendOptions) -> Result<String> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShutDown);
        }
        let headers = options
            .headers
            .resolve(crate::headers::Headers::default())?;
        let mut meta = options.meta;
        if meta.traceparent.is_none() {
            if let Some((tp, ts)) = telemetry::current_trace_context() {
                meta.traceparent = Some(tp);
                meta.tracestate = ts;
            }
        }
        let out = self
            .inner
            .dispatcher
            .encode_with_headers(msg, meta, &headers)
            .await?;
        let id = out.message_id.clone();
        let pending = self.inner.dispatcher.pending::<M>(out)?;
        self.inner.dispatcher.dispatch(pending).await?;
        Ok(id)
    }

    /// This service's name.
    pub fn service(&self) -> &str {
        self.inner.dispatcher.service()
    }

    /// The transport in use.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.inner.dispatcher.transport().clone()
    }

    /// What was provisioned at startup.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Resource naming (prefix) of this service.
    pub fn naming(&self) -> &Naming {
        &self.inner.naming
    }

    /// The full name of the queue a command type is sent to.
    pub fn queue_of<C: Command>(&self) -> String {
        self.inner.naming.resource(C::DESTINATION)
    }

    /// The full name of the topic an event type is published to.
    pub fn topic_of<E: Event>(&self) -> String {
        self.inner.naming.resource(E::DESTINATION)
    }

    /// The full name of the queue through which this service receives `E`.
    pub fn subscriber_queue_of<E: Event>(&self) -> String {
        self.inner.naming.subscriber(self.service(), E::DESTINATION)
    }

    /// Stops receiving, lets in-flight handlers finish within the shutdown timeout, and
    /// returns unfinished messages to their queues. A second call returns an empty report.
    pub async fn shutdown(&self) -> Result<DrainReport> {
        self.inner.stop.cancel();
        if let Some(cleanup) = self.inner.cleanup.lock().take() {
            cleanup.abort();
        }
        let relay = self.inner.relay.lock().take();
        if let Some(relay) = relay {
            // It finishes the cycle under way: what it sent is deleted, not sent again.
            if let Err(e) = relay.await {
                tracing::error!(error = %e, "the outbox relay failed");
            }
        }
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.listeners.lock());
        let mut report = DrainReport::default();
        for t in tasks {
            match t.await {
                Ok(r) => report += r,
                Err(e) => tracing::error!(error = %e, "a listener task failed"),
            }
        }
        tracing::info!(
            service = %self.service(),
            finished = report.finished,
            returned = report.returned,
            abandoned = report.abandoned,
            "sourceflow stopped"
        );
        Ok(report)
    }

    /// Stores messages in the application's transaction for this service's relay (or any
    /// relay on the database) to send after the commit, named as this service names them.
    /// See [`crate::outbox`].
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub fn outbox(&self) -> crate::outbox::Outbox {
        crate::outbox::Outbox::new(self.inner.naming.clone())
    }

    /// Messages waiting in the transactional outbox ([`crate::outbox`]) of this service's
    /// database: stored by committed transactions and not yet accepted by the broker.
    /// `None` when the idempotency store is not a SQL one.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub async fn outbox_backlog(&self) -> Result<Option<u64>> {
        let Some(pool) = self
            .inner
            .idempotency
            .as_ref()
            .and_then(|i| i.store.sql_pool())
        else {
            return Ok(None);
        };
        let n = crate::outbox::backlog(&pool)
            .await
            .map_err(|e| crate::Error::Store {
                store: pool.kind().store(),
                operation: "outbox backlog",
                source: Box::new(e),
            })?;
        Ok(Some(u64::try_from(n).unwrap_or(0)))
    }

    /// Idempotency counters (checks, duplicates, unique, deferred, mismatches), if
    /// idempotent processing is on.
    pub fn idempotency_stats(&self) -> Option<IdempotencyStatsSnapshot> {
        self.inner.idempotency.as_ref().map(|i| i.stats.snapshot())
    }

    /// The idempotency store in use, if any.
    pub fn idempotency_store(&self) -> Option<Arc<dyn IdempotencyStore>> {
        self.inner.idempotency.as_ref().map(|i| i.store.clone())
    }

    /// Checks the broker, every resource of the topology, each listener, each dead-letter
    /// queue and the idempotency store. See [`health`](crate::health).
    pub async fn health(&self) -> HealthReport {
        let inner = &self.inner;
        let transport = inner.dispatcher.transport();
        let mut checks = Vec::new();
        let t = &inner.topology;
        let check = match tokio::time::timeout(HEALTH_TIMEOUT, transport.missing(t)).await {
            Ok(Ok(missing)) if missing.is_empty() => HealthCheck {
                name: "transport".into(),
                status: Status::Healthy,
                detail: format!(
                    "{} queues, {} topics, {} subscriptions present",
                    t.queues.len(),
                    t.topics.len(),
                    t.subscriptions.len()
                ),
            },
            Ok(Ok(missing)) => HealthCheck {
                name: "transport".into(),
                status: Status::Unhealthy,
                detail: format!("missing: {}", missing.join(", ")),
            },
            Ok(Err(e)) => HealthCheck {
                name: "transport".into(),
                status: Status::Unhealthy,
                detail: format!("unreachable: {e}"),
            },
            Err(_) => HealthCheck {
                name: "transport".into(),
                status: Status::Unhealthy,
                detail: format!("no answer within {HEALTH_TIMEOUT:?}"),
            },
        };
        checks.push(check);
        let stopped = self.is_shut_down();
        for l in &inner.listener_info {
            let (status, detail) = if stopped {
                (Status::Unhealthy, "stopped (shutting down)".to_string())
            } else {
                l.liveness.judge(l.bound)
            };
            checks.push(HealthCheck {
                name: format!("listener {}", l.queue),
                status,
                detail,
            });
            let depth =
                tokio::time::timeout(HEALTH_TIMEOUT, transport.queue_depth(&l.dead_letter_queue))
                    .await;
            let (status, detail) = match depth {
                Ok(Ok(Some(d))) if d.total() > 0 => {
                    (Status::Degraded, format!("{} messages waiting", d.total()))
                }
                Ok(Ok(Some(_))) => (Status::Healthy, "empty".to_string()),
                Ok(Ok(None)) => (Status::Healthy, "depth unknown".to_string()),
                Ok(Err(e)) => (Status::Unhealthy, format!("unreachable: {e}")),
                Err(_) => (Status::Unhealthy, "no answer".to_string()),
            };
            checks.push(HealthCheck {
                name: format!("dead-letter queue {}", l.dead_letter_queue),
                status,
                detail,
            });
        }
        if let Some(idem) = &inner.idempotency {
            let (status, detail) =
                match tokio::time::timeout(HEALTH_TIMEOUT, idem.store.size()).await {
                    Ok(Ok(n)) => (Status::Healthy, format!("{n} records")),
                    Ok(Err(e)) => (Status::Unhealthy, format!("unreachable: {e}")),
                    Err(_) => (Status::Unhealthy, "no answer".to_string()),
                };
            checks.push(HealthCheck {
                name: format!("idempotency store {}", idem.store.name()),
                status,
                detail,
            });
        }
        if let Some(enc) = inner.dispatcher.encryption() {
            let (status, detail) =
                match tokio::time::timeout(HEALTH_TIMEOUT, enc.encryptor.check_key()).await {
                    Ok(Ok(detail)) => (Status::Healthy, detail),
                    Ok(Err(e)) => (Status::Unhealthy, e.to_string()),
                    Err(_) => (Status::Unhealthy, "no answer".to_string()),
                };
            checks.push(HealthCheck {
                name: "encryption key".into(),
                status,
                detail,
            });
        }
        HealthReport::new(self.service(), transport.name(), checks)
    }

    /// What differs between the broker and this service's topology, changing nothing:
    /// missing resources, differing attributes of what it owns and of its subscriptions,
    /// and stale subscriptions of its queues (see [`Finding`](crate::topology::Finding)).
    pub async fn inspect(&self) -> Result<Vec<crate::topology::Finding>> {
        self.inner
            .dispatcher
            .transport()
            .inspect(&self.inner.topology)
            .await
    }

    /// Removes the stale subscriptions [`inspect`](Self::inspect) finds — subscriptions of
    /// this service's queues to topics no handler of it needs any more — and returns them
    /// as `(topic, queue)`. Nothing else is removed; startup never removes anything.
    pub async fn prune(&self) -> Result<Vec<(String, String)>> {
        let transport = self.inner.dispatcher.transport();
        let mut removed = Vec::new();
        for f in transport.inspect(&self.inner.topology).await? {
            if let crate::topology::Finding::Stale { topic, queue } = f {
                transport.unsubscribe(&topic, &queue).await?;
                removed.push((topic, queue));
            }
        }
        Ok(removed)
    }

    /// The IAM policy this service needs (see [`iam`](crate::iam)): its consumed queues,
    /// dead-letter queues, command queues, topics and KMS key, for `scope`'s account and
    /// region.
    pub fn iam_policy(&self, mut scope: crate::iam::IamScope) -> serde_json::Value {
        if scope.kms_key.is_none() {
            scope.kms_key = self
                .inner
                .dispatcher
                .encryption()
                .and_then(|e| e.encryptor.key_arn());
        }
        if scope.idempotency_table.is_none() {
            scope.idempotency_table = self
                .inner
                .idempotency
                .as_ref()
                .and_then(|i| i.store.dynamodb_table().map(str::to_string));
        }
        crate::iam::policy(&self.inner.topology, &scope)
    }

    /// Moves the messages of `queue`'s dead-letter queue back to `queue` (full name, as
    /// from [`queue_of`](Self::queue_of) or [`subscriber_queue_of`](Self::subscriber_queue_of)),
    /// keeping FIFO group ids; returns how many moved.
    pub async fn redrive(&self, queue: &str) -> Result<usize> {
        crate::redrive::redrive(
            self.inner.dispatcher.transport().as_ref(),
            &Naming::dead_letter(queue),
            queue,
        )
        .await
    }

    /// Resolves once shutdown has begun.
    pub async fn stopped(&self) {
        self.inner.stop.cancelled().await
    }

    /// True once shutdown has begun.
    pub fn is_shut_down(&self) -> bool {
        self.inner.stop.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_a_handler_only_attributes_and_a_delay_apply() {
        let meta = SendOptions::new()
            .attribute("region", "eu")
            .delay(Duration::from_secs(1))
            .for_handler()
            .expect("attributes and a delay are fine");
        assert_eq!(meta.attributes.len(), 1);
        assert_eq!(meta.delay, Some(Duration::from_secs(1)));
        for pinned in [
            SendOptions::new().message_id("m"),
            SendOptions::new().correlation_id("c"),
        ] {
            let e = pinned
                .for_handler()
                .expect_err("ids come from the handled message");
            assert!(
                e.to_string()
                    .contains("come from the message being handled"),
                "{e}"
            );
        }
    }
}
