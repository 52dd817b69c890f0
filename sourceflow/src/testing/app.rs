//! [`TestApp`]: the user's real service on a recording transport, with `send`/`raise` that
//! return once everything they caused has settled.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::messages::{DeadLetter, DeadLettered, Messages, Recorded};
use super::recorder::{Recorder, Tracked};
use super::{InFlight, InFlightState, TestError};
use crate::message::{Command, Event, Message, MessageKind};
use crate::runtime::{Builder, Handle, SendOptions};
use crate::transport::Transport;
use crate::MemoryTransport;

/// How long [`TestApp`] waits for work to settle unless told otherwise.
pub const DEFAULT_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the live harness waits with nothing happening before it calls the service
/// settled (SQS counts are approximate; see [`TestApp::start_live`]).
pub const DEFAULT_QUIET_PERIOD: Duration = Duration::from_secs(1);

/// A running service under test. See the [module documentation](super).
pub struct TestApp {
    handle: Handle,
    recorder: Arc<Recorder>,
    /// The embedded broker, whose exact counts say when the queues are empty; `None` live.
    memory: Option<MemoryTransport>,
    queues: HashSet<String>,
    timeout: Duration,
    quiet: Duration,
}

impl std::fmt::Debug for TestApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApp")
            .field("service", &self.handle.service())
            .field("live", &self.memory.is_none())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Whether the service has settled, and if not, whether to look again on a timer.
enum Check {
    Settled,
    /// Wait for the next broker call (or `Some` pause, when what is pending changes
    /// without one).
    Pending(Option<Duration>),
}

impl TestApp {
    /// Starts the service `builder` describes — the same builder `main` uses, with its
    /// state, retry policy and settings — on a fresh embedded broker of its own (a
    /// transport set on the builder is replaced), and returns once it listens.
    pub async fn start(builder: Builder) -> Result<TestApp, TestError> {
        let memory = MemoryTransport::new();
        Self::start_on(builder, Arc::new(memory.clone()), Some(memory)).await
    }

    /// Starts the service on the AWS transport configured from the environment
    /// (`AWS_ENDPOINT_URL` for an emulator), with the same API as [`start`](Self::start),
    /// so that one test can run both ways.
    ///
    /// SQS reports only approximate counts, so the live harness keeps its own account: it
    /// calls the service settled when every message it saw go out to one of the service's
    /// queues has been received and deleted or dead-lettered, no retry is pending, and
    /// nothing has happened for a quiet period ([`quiet_period`](Self::quiet_period),
    /// default 1 s). A message that reaches the service's queues some other way (another
    /// process, a redrive) is not in that account. Time control does not apply: the
    /// emulator's clock is its own.
    #[cfg(feature = "aws")]
    pub async fn start_live(builder: Builder) -> Result<TestApp, TestError> {
        let aws = crate::transport::aws::AwsTransport::from_env().await?;
        Self::start_on(builder, Arc::new(aws), None).await
    }

    async fn start_on(
        builder: Builder,
        transport: Arc<dyn Transport>,
        memory: Option<MemoryTransport>,
    ) -> Result<TestApp, TestError> {
        let recorder = Arc::new(Recorder::new(transport));
        let handle = builder.transport_arc(recorder.clone()).start().await?;
        recorder.attach(handle.dispatcher().clone(), handle.topology());
        Ok(TestApp {
            queues: handle.listened_queues().into_iter().collect(),
            handle,
            recorder,
            memory,
            timeout: DEFAULT_SETTLE_TIMEOUT,
            quiet: DEFAULT_QUIET_PERIOD,
        })
    }

    /// How long [`send`](Self::send), [`raise`](Self::raise) and
    /// [`settled`](Self::settled) wait before they fail with
    /// [`TestError::NotSettled`] (default 30 s). It is `tokio` time: under a paused clock
    /// it passes as instantly as the backoffs do, so set it above the longest backoff the
    /// test waits out.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long the live harness waits with nothing happening (default 1 s); unused on the
    /// embedded broker, whose counts are exact.
    pub fn quiet_period(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// The service's [`Handle`], for what the harness does not wrap.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The embedded broker the service runs on (`None` live), for its queue counts.
    pub fn broker(&self) -> Option<&MemoryTransport> {
        self.memory.as_ref()
    }

    /// Sends a command and waits until it and everything it caused has settled; returns
    /// its message id.
    pub async fn send<C: Command>(&self, command: C) -> Result<String, TestError> {
        self.send_with(command, SendOptions::new()).await
    }

    /// [`send`](Self::send) with options (attributes, a delay, a correlation id).
    pub async fn send_with<C: Command>(
        &self,
        command: C,
        options: SendOptions,
    ) -> Result<String, TestError> {
        let id = self.handle.send_with(command, options).await?;
        self.settled().await?;
        Ok(id)
    }

    /// Publishes an event and waits until it and everything it caused has settled;
    /// returns its message id.
    pub async fn raise<E: Event>(&self, event: E) -> Result<String, TestError> {
        self.raise_with(event, SendOptions::new()).await
    }

    /// [`raise`](Self::raise) with options.
    pub async fn raise_with<E: Event>(
        &self,
        event: E,
        options: SendOptions,
    ) -> Result<String, TestError> {
        let id = self.handle.raise_with(event, options).await?;
        self.settled().await?;
        Ok(id)
    }

    /// Waits until nothing is left to do: the service's queues hold no message (visible,
    /// being handled, or waiting out a delay or a retry's backoff), no broker call is in
    /// progress, and (with a SQL store) the transactional outbox is empty. For work started
    /// some other way than [`send`](Self::send) (through [`handle`](Self::handle), an
    /// HTTP endpoint under test, ...).
    ///
    /// It is woken by the broker calls themselves, not by polling; only a pending SQL
    /// outbox is looked at on a 10 ms timer. Fails with [`TestError::NotSettled`], naming
    /// what is still in flight, after the [`timeout`](Self::timeout).
    pub async fn settled(&self) -> Result<(), TestError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        loop {
            let activity = self.recorder.activity();
            tokio::pin!(activity);
            activity.as_mut().enable();
            let pause = match self.check().await {
                Check::Settled => return Ok(()),
                Check::Pending(pause) => pause,
            };
            let timer = tokio::time::sleep(pause.unwrap_or(self.timeout));
            tokio::select! {
                _ = &mut activity => {}
                _ = timer, if pause.is_some() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(TestError::NotSettled {
                        waited: started.elapsed(),
                        in_flight: self.in_flight().await,
                    });
                }
            }
        }
    }

    async fn check(&self) -> Check {
        let Some(before) = self.recorder.idle_generation() else {
            return Check::Pending(None);
        };
        let pending = match &self.memory {
            Some(memory) => self.check_memory(memory).await,
            None => self.check_live(),
        };
        match pending {
            Check::Settled if self.recorder.idle_generation() != Some(before) => {
                Check::Pending(None)
            }
            other => other,
        }
    }

    async fn check_memory(&self, memory: &MemoryTransport) -> Check {
        let busy = self
            .queues
            .iter()
            .any(|q| memory.depth(q).is_some_and(|d| d.total() > 0));
        if busy {
            return Check::Pending(None);
        }
        match self.outbox_backlog().await {
            0 => Check::Settled,
            _ => Check::Pending(Some(Duration::from_millis(10))),
        }
    }

    fn check_live(&self) -> Check {
        if !self.recorder.tracked_on(&self.queues).is_empty() {
            return Check::Pending(None);
        }
        let quiet = self.recorder.quiet_for();
        match self.quiet.checked_sub(quiet) {
            Some(left) if !left.is_zero() => Check::Pending(Some(left)),
            _ => Check::Settled,
        }
    }

    /// Messages in the transactional outbox not yet relayed (0 without a SQL store).
    async fn outbox_backlog(&self) -> u64 {
        #[cfg(any(feature = "postgres", feature = "sqlite"))]
        if let Ok(Some(n)) = self.handle.outbox_backlog().await {
            return n;
        }
        0
    }

    /// What is still in flight, as precisely as the broker calls tell.
    async fn in_flight(&self) -> Vec<InFlight> {
        let now = Instant::now();
        // On the embedded broker, whose counts are exact, only queues that hold something.
        let holds = |q: &str| match &self.memory {
            Some(m) => m.depth(q).is_some_and(|d| d.total() > 0),
            None => true,
        };
        let mut v: Vec<InFlight> = self
            .recorder
            .tracked_on(&self.queues)
            .into_iter()
            .filter(|(queue, _, _)| holds(queue))
            .map(|(queue, id, t)| InFlight::tracked(queue, id, t, now))
            .collect();
        if let Some(memory) = &self.memory {
            let mut queues: Vec<&String> = self.queues.iter().collect();
            queues.sort();
            for q in queues {
                let Some(depth) = memory.depth(q).filter(|d| d.total() > 0) else {
                    continue;
                };
                if !v.iter().any(|f| &f.queue == q) {
                    v.push(InFlight::counted(q, depth));
                }
            }
        }
        let backlog = self.outbox_backlog().await;
        if backlog > 0 {
            v.push(InFlight {
                queue: "the transactional outbox".into(),
                wire_name: None,
                message_id: None,
                state: InFlightState::Outbox { messages: backlog },
            });
        }
        v
    }

    /// Every command sent and event raised (by the test and by handlers), in the order the
    /// broker accepted them.
    pub fn history(&self) -> Vec<Recorded> {
        self.recorder.history()
    }

    /// The commands of type `C` sent (by the test and by handlers), in order.
    ///
    /// # Panics
    /// When a recorded `C` does not decode as one.
    pub fn sent<C: Command>(&self) -> Messages<C> {
        self.typed::<C>(MessageKind::Command, "sent")
    }

    /// The events of type `E` raised (by the test and by handlers), in order.
    ///
    /// # Panics
    /// When a recorded `E` does not decode as one.
    pub fn raised<E: Event>(&self) -> Messages<E> {
        self.typed::<E>(MessageKind::Event, "raised")
    }

    fn typed<M: Message>(&self, kind: MessageKind, verb: &str) -> Messages<M> {
        let items = self
            .recorder
            .history()
            .iter()
            .filter(|r| r.kind() == kind)
            .filter_map(Recorded::payload::<M>)
            .collect();
        Messages::new(items, format!("`{}` {verb}", M::NAME))
    }

    /// Every message the service moved to a dead-letter queue, with its reason, in order.
    /// (The broker's own redrive, the safety net above sourceflow's attempts, moves a
    /// message without a reason and without a call the harness sees: it is not listed.)
    pub fn dead_lettered(&self) -> Vec<DeadLetter> {
        self.recorder.dead_letters()
    }

    /// The dead-lettered messages of type `M`, with their reasons, in order.
    ///
    /// # Panics
    /// When a dead-lettered `M` does not decode as one.
    pub fn dead_lettered_of<M: Message>(&self) -> Messages<DeadLettered<M>> {
        let items = self
            .recorder
            .dead_letters()
            .iter()
            .filter_map(|d| {
                d.payload::<M>().map(|message| DeadLettered {
                    message,
                    reason: d.reason().to_string(),
                })
            })
            .collect();
        Messages::new(items, format!("`{}` dead-lettered", M::NAME))
    }

    /// Shuts the service down gracefully (see [`Handle::shutdown`]).
    pub async fn shutdown(self) -> Result<crate::DrainReport, TestError> {
        Ok(self.handle.shutdown().await?)
    }
}

impl InFlight {
    fn tracked(queue: String, id: String, t: Tracked, now: Instant) -> Self {
        let (wire_name, state) = match t {
            Tracked::Waiting { wire_name, due } => (
                wire_name,
                match due.filter(|d| *d > now) {
                    Some(d) => InFlightState::Delayed { due_in: d - now },
                    None => InFlightState::Waiting,
                },
            ),
            Tracked::Handling {
                wire_name,
                since,
                receive_count,
            } => (
                wire_name,
                InFlightState::Handling {
                    for_: now.saturating_duration_since(since),
                    receive_count,
                },
            ),
            Tracked::RetryDue { wire_name, due } => (
                wire_name,
                InFlightState::RetryDue {
                    due_in: due.saturating_duration_since(now),
                },
            ),
        };
        InFlight {
            queue,
            wire_name: Some(wire_name),
            message_id: Some(id),
            state,
        }
    }

    fn counted(queue: &str, depth: crate::transport::QueueDepth) -> Self {
        InFlight {
            queue: queue.to_string(),
            wire_name: None,
            message_id: None,
            state: InFlightState::Counted {
                visible: depth.visible,
                in_flight: depth.in_flight,
                delayed: depth.delayed,
            },
        }
    }
}
