//! One test's world: the transport under test, a name prefix of its own, and helpers that
//! provision and observe queues through the `Transport` trait only.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use sourceflow::envelope::{attr, OutgoingMessage};
use sourceflow::transport::{
    BatchError, DeadLetterSpec, EntryError, QueueSettings, QueueSpec, Receive, ReceivedMessage,
    SubscriptionSpec, TopicSpec, Topology, Transport,
};
use sourceflow::MemoryTransport;

/// Longest any single expectation may take (an emulator can be slow to answer).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How much earlier than its due time an emulator may appear to deliver, measured from
/// this side (the broker's clock starts a little after ours, and answers travel).
pub const SLACK: Duration = Duration::from_millis(300);

/// The wire name of the suite's plain messages.
pub const PLAIN: &str = "transport.Plain.v1";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The transport under test and a name prefix unique to one test.
pub struct World {
    pub t: Arc<dyn Transport>,
    prefix: String,
}

impl World {
    /// A fresh world: the transport named by `SOURCEFLOW_TEST_TRANSPORT` (default
    /// `memory`).
    pub async fn new() -> World {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("tr{}-{n}-", std::process::id() % 100_000);
        let kind =
            std::env::var("SOURCEFLOW_TEST_TRANSPORT").unwrap_or_else(|_| "memory".to_string());
        let t: Arc<dyn Transport> = match kind.as_str() {
            "memory" => Arc::new(MemoryTransport::new()),
            #[cfg(feature = "aws")]
            "aws" => {
                check_loopback();
                Arc::new(
                    sourceflow::transport::aws::AwsTransport::from_env()
                        .await
                        .expect("AWS transport from the environment"),
                )
            }
            other => panic!("SOURCEFLOW_TEST_TRANSPORT={other} is not a transport this build has"),
        };
        World { t, prefix }
    }

    /// The full name of `base` in this world.
    pub fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Provisions `topology`.
    pub async fn provision(&self, topology: Topology) {
        self.t.provision(&topology).await.expect("provision");
    }

    /// A standard queue whose default visibility timeout is `default_visibility`.
    pub async fn queue(&self, base: &str, default_visibility: Duration) -> String {
        let name = self.name(base);
        self.provision(Topology {
            queues: vec![spec(&name, false, default_visibility, None)],
            ..Default::default()
        })
        .await;
        name
    }

    /// A FIFO queue (`base` without `.fifo`).
    pub async fn fifo_queue(&self, base: &str) -> String {
        let name = self.name(&format!("{base}.fifo"));
        self.provision(Topology {
            queues: vec![spec(&name, true, Duration::from_secs(30), None)],
            ..Default::default()
        })
        .await;
        name
    }

    /// A queue and its dead-letter queue, messages moving after `max_receive_count`
    /// receives; returns (queue, dead-letter queue).
    pub async fn queue_with_dlq(
        &self,
        base: &str,
        fifo: bool,
        max_receive_count: u32,
    ) -> (String, String) {
        let suffix = if fifo { ".fifo" } else { "" };
        let q = self.name(&format!("{base}{suffix}"));
        let dlq = self.name(&format!("{base}-dlq{suffix}"));
        let vis = Duration::from_secs(30);
        self.provision(Topology {
            queues: vec![
                spec(&dlq, fifo, vis, None),
                spec(
                    &q,
                    fifo,
                    vis,
                    Some(DeadLetterSpec {
                        queue: dlq.clone(),
                        max_receive_count,
                    }),
                ),
            ],
            ..Default::default()
        })
        .await;
        (q, dlq)
    }

    /// A topic and queues subscribed to it, each with its type filter (empty: all);
    /// returns (topic, queues).
    pub async fn topic_with(
        &self,
        base: &str,
        fifo: bool,
        subscribers: &[(&str, &[&str])],
    ) -> (String, Vec<String>) {
        let suffix = if fifo { ".fifo" } else { "" };
        let topic = self.name(&format!("{base}{suffix}"));
        let queues: Vec<String> = subscribers
            .iter()
            .map(|(q, _)| self.name(&format!("{q}{suffix}")))
            .collect();
        self.provision(Topology {
            queues: queues
                .iter()
                .map(|q| spec(q, fifo, Duration::from_secs(30), None))
                .collect(),
            topics: vec![TopicSpec::new(topic.clone())],
            subscriptions: queues
                .iter()
                .zip(subscribers)
                .map(|(q, (_, types))| {
                    SubscriptionSpec::new(topic.clone(), q.clone()).types(types.iter().copied())
                })
                .collect(),
            ..Default::default()
        })
        .await;
        (topic, queues)
    }

    /// One receive.
    pub async fn receive(&self, queue: &str, request: Receive) -> Vec<ReceivedMessage> {
        self.t.receive(queue, request).await.expect("receive")
    }

    /// Receives (without deleting) until `n` messages came or `within` passed; each stays
    /// invisible for `visibility`.
    pub async fn collect(
        &self,
        queue: &str,
        n: usize,
        within: Duration,
        visibility: Duration,
    ) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            out.extend(self.poll(queue, 10, deadline, visibility).await);
        }
        out
    }

    /// Receives and deletes until `n` messages came or `within` passed; returns them in
    /// the order they came (a FIFO group goes on only once its received messages are
    /// deleted).
    pub async fn drain(&self, queue: &str, n: usize, within: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            let got = self
                .poll(queue, 10, deadline, Duration::from_secs(30))
                .await;
            if !got.is_empty() {
                self.delete(queue, &got).await;
            }
            out.extend(got);
        }
        out
    }

    /// The first message received from `queue` before `deadline`, if any.
    pub async fn first_before(
        &self,
        queue: &str,
        deadline: Instant,
        visibility: Duration,
    ) -> Option<ReceivedMessage> {
        while Instant::now() < deadline {
            let mut got = self.poll(queue, 1, deadline, visibility).await;
            if let Some(m) = got.pop() {
                return Some(m);
            }
        }
        None
    }

    /// Asserts that `queue` delivers nothing until `until` (receives that would take
    /// something keep it for `visibility`, so a failure shows what came).
    pub async fn nothing_until(&self, queue: &str, until: Instant, what: &str) {
        while Instant::now() < until {
            let got = self.poll(queue, 10, until, Duration::from_secs(30)).await;
            assert!(
                got.is_empty(),
                "{what}: `{queue}` delivered {:?}",
                got.iter()
                    .map(|m| (&m.body, m.receive_count))
                    .collect::<Vec<_>>()
            );
        }
    }

    /// One receive of a polling loop that ends at `deadline`: a long poll of one second
    /// (SQS counts waits in whole seconds) while a second is left, then short polls a
    /// little apart, so the loop never runs past its deadline.
    async fn poll(
        &self,
        queue: &str,
        max: usize,
        deadline: Instant,
        visibility: Duration,
    ) -> Vec<ReceivedMessage> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left >= Duration::from_secs(1) {
            return self
                .receive(queue, rx(max, Duration::from_secs(1), visibility))
                .await;
        }
        let got = self
            .receive(queue, rx(max, Duration::ZERO, visibility))
            .await;
        if got.is_empty() {
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
        got
    }

    /// Deletes messages, expecting every delete to succeed.
    pub async fn delete(&self, queue: &str, messages: &[ReceivedMessage]) {
        let receipts = messages.iter().map(|m| m.receipt.clone()).collect();
        self.t.delete(queue, receipts).await.expect("delete");
    }
}

/// A queue spec.
pub fn spec(
    name: &str,
    fifo: bool,
    visibility_timeout: Duration,
    dead_letter: Option<DeadLetterSpec>,
) -> QueueSpec {
    let mut q = QueueSpec::new(name).with_settings(QueueSettings {
        visibility_timeout,
        ..QueueSettings::default()
    });
    debug_assert_eq!(q.fifo, fifo, "a FIFO queue's name ends in .fifo");
    q.dead_letter = dead_letter;
    q
}

/// A receive request.
pub fn rx(max: usize, wait: Duration, visibility: Duration) -> Receive {
    Receive {
        max,
        wait,
        visibility,
    }
}

/// A plain message for a standard queue or topic.
pub fn msg(body: &str) -> OutgoingMessage {
    typed(body, PLAIN)
}

/// A message of wire name `wire_name` (the `sourceflow.type` attribute topic filters see).
pub fn typed(body: &str, wire_name: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.into(),
        attributes: vec![(attr::TYPE.into(), wire_name.into())].into(),
        group_id: None,
        dedup_id: None,
        delay: None,
        wire_name: wire_name.to_string().into(),
        message_id: uuid::Uuid::new_v4().to_string(),
    }
}

/// A message for a FIFO queue or topic, in `group`, with deduplication id `dedup`.
pub fn fifo_msg(body: &str, group: &str, dedup: &str) -> OutgoingMessage {
    let mut m = msg(body);
    m.group_id = Some(group.to_string());
    m.dedup_id = Some(dedup.to_string());
    m
}

/// A message delivered after `delay`.
pub fn delayed(body: &str, delay: Duration) -> OutgoingMessage {
    let mut m = msg(body);
    m.delay = Some(delay);
    m
}

/// A message whose size as SQS and SNS count it (body plus attributes) is exactly `size`.
pub fn sized(size: usize) -> OutgoingMessage {
    let mut m = msg("");
    let overhead = m.size();
    m.body = "x".repeat(size - overhead).into();
    assert_eq!(m.size(), size);
    m
}

/// The entries that failed: none for `Ok`.
pub fn failures(r: Result<(), BatchError>) -> Vec<(usize, EntryError)> {
    match r {
        Ok(()) => Vec::new(),
        Err(e) => {
            assert!(
                e.failed.windows(2).all(|w| w[0].0 < w[1].0),
                "failures not in index order: {e:?}"
            );
            e.failed
        }
    }
}

/// The bodies of `messages`, in order.
pub fn bodies(messages: &[ReceivedMessage]) -> Vec<&str> {
    messages.iter().map(|m| &*m.body).collect()
}

/// A test that talks to an AWS API must only ever reach loopback, unless told it runs
/// against real AWS on purpose (`SOURCEFLOW_TEST_REAL_AWS=1`).
#[cfg(feature = "aws")]
fn check_loopback() {
    if std::env::var("SOURCEFLOW_TEST_REAL_AWS").as_deref() == Ok("1") {
        return;
    }
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
    assert!(
        endpoint.starts_with("http://127.0.0.1") || endpoint.starts_with("http://localhost"),
        "AWS_ENDPOINT_URL={endpoint:?} is not loopback; start the emulator with tests/support/emulator.sh, or set SOURCEFLOW_TEST_REAL_AWS=1 for real AWS"
    );
    assert_eq!(
        std::env::var("AWS_EC2_METADATA_DISABLED").as_deref(),
        Ok("true"),
        "set AWS_EC2_METADATA_DISABLED=true so the SDK never queries instance metadata"
    );
}
