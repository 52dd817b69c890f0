//! The linked handlers as an AWS Lambda function fed by an SQS event source mapping
//! (feature `lambda`).
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> Result<(), sourceflow::lambda::Error> {
//!     sourceflow::lambda::run().await
//! }
//! ```
//!
//! [`run_with`] takes a [`Builder`](crate::Builder), to select a subset of the handlers
//! ([`handlers_in`](crate::Builder::handlers_in) a module, or
//! [`handlers`](crate::Builder::handlers) of one queue) and to give state, stores and
//! layers as for a long-running service.
//!
//! Every record goes through the listener's own stages — decode, route, decrypt, claim,
//! invoke, commit (the outbox dispatched) — and is settled by the listener with the
//! record's receipt handle, which is the event source mapping's and so real: a success is
//! deleted, a failure's visibility is set to its backoff, a permanent failure, an
//! undecodable or tampered record and one at its attempt limit are moved to the
//! dead-letter queue with the reason. The response then lists in `batchItemFailures`
//! (the mapping needs `FunctionResponseTypes: [ReportBatchItemFailures]`) the records that
//! must come back: those retried, handed back, or whose move to the dead-letter queue
//! failed. On a FIFO queue the records of one message group run in order, and at the first
//! failure in a group that record and every later record of the group in the batch are
//! reported failed (the later ones not run, handed back at once); other groups carry on.
//!
//! Cold start: everything — the SDK clients, the idempotency store, the key provider — is
//! built once per execution environment, before the runtime asks for the first
//! invocation; no provisioning call is made unless `SOURCEFLOW_PROVISION` asks for one
//! (`assume` is the default here, so the function's role needs no `CreateQueue`).
//!
//! No heartbeat runs: the function's timeout, below the queue's visibility timeout (the
//! CloudFormation export checks it), bounds the whole batch, so no record's visibility or
//! claim lease can run out while it is handled; and a task between invocations would run
//! in a frozen execution environment. Records that would start after the invocation's
//! deadline minus a margin ([`Function::deadline_margin`]) are handed back and reported
//! failed instead.

mod batch;
mod record;

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::LambdaEvent;

use crate::listener::Listener;
use crate::runtime::Builder;

pub use record::RecordError;

/// Why the function could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service could not be built (configuration, routes, stores, keys).
    #[error("the Lambda function cannot start: {0}")]
    Start(#[from] crate::Error),
    /// The Lambda runtime client failed (the runtime API could not be reached).
    #[error("the Lambda runtime failed: {0}")]
    Runtime(lambda_runtime::Error),
}

/// A `Lambda-Runtime-Deadline-Ms` below this (September 2001) is not a time: a context
/// built by hand has 0, and `cargo lambda watch` 1.9 sends the timeout (600000) instead of
/// the deadline. Such an invocation has no known deadline.
const EPOCH_MS_2001: u64 = 1_000_000_000_000;

/// How long before the invocation's deadline no record is started (default).
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// Runs the handlers linked into the binary, configured from the environment, as a Lambda
/// function until the execution environment ends.
pub async fn run() -> Result<(), Error> {
    run_with(crate::builder()).await
}

/// Runs the service `builder` configures as a Lambda function.
pub async fn run_with(builder: Builder) -> Result<(), Error> {
    Function::new(builder).await?.serve().await
}

/// The function: the service's listeners, built once per execution environment, and the
/// handler of each invocation ([`handle`](Self::handle)).
#[derive(Clone)]
pub struct Function {
    inner: Arc<Inner>,
}

struct Inner {
    listeners: Vec<Arc<Listener>>,
    concurrency: usize,
    margin: Duration,
    // Kept for the function's lifetime: the listeners' stop token (never cancelled).
    _parts: crate::runtime::Assembled,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues: Vec<&str> = self.inner.listeners.iter().map(|l| &**l.queue()).collect();
        f.debug_struct("Function")
            .field("queues", &queues)
            .field("concurrency", &self.inner.concurrency)
            .finish_non_exhaustive()
    }
}

impl Function {
    /// Builds the service as `builder` says — on the AWS transport from the environment
    /// unless the builder has one, provisioning as `SOURCEFLOW_PROVISION` says, `assume`
    /// (no calls) when it is unset.
    pub async fn new(builder: Builder) -> Result<Self, crate::Error> {
        let builder = match builder.has_transport() {
            true => builder,
            false => builder.transport(transport_from_env().await?),
        };
        let parts = builder.assemble().await?;
        Ok(Function {
            inner: Arc::new(Inner {
                listeners: parts.listeners.clone(),
                concurrency: parts.concurrency(),
                margin: DEFAULT_DEADLINE_MARGIN,
                _parts: parts,
            }),
        })
    }

    /// No record starts later than this before the invocation's deadline (default
    /// [`DEFAULT_DEADLINE_MARGIN`]): those are handed back and reported failed, so that a
    /// timeout does not fail the whole batch.
    pub fn deadline_margin(self, margin: Duration) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(i) => i,
            Err(shared) => return Function { inner: shared },
        };
        inner.margin = margin;
        Function {
            inner: Arc::new(inner),
        }
    }

    /// The queues whose records this function handles (their names, prefix included).
    pub fn queues(&self) -> Vec<String> {
        self.inner
            .listeners
            .iter()
            .map(|l| l.queue().to_string())
            .collect()
    }

    /// Handles one invocation: every record through the stages, the response listing
    /// those that must come back (a context whose deadline is not a time, see
    /// [`deadline_margin`](Self::deadline_margin), has none). An error (the whole batch comes back) only when a record
    /// lacks its `messageId` or receipt handle, which an SQS event source mapping always
    /// sets.
    pub async fn handle(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> Result<SqsBatchResponse, RecordError> {
        let deadline = (event.context.deadline >= EPOCH_MS_2001).then(|| event.context.deadline());
        batch::handle(&self.inner, event.payload, deadline).await
    }

    /// Serves invocations from the Lambda runtime API (`AWS_LAMBDA_RUNTIME_API`) until
    /// the execution environment ends.
    pub async fn serve(self) -> Result<(), Error> {
        let f = self;
        lambda_runtime::run(lambda_runtime::service_fn(move |e| {
            let f = f.clone();
            async move { f.handle(e).await.map_err(lambda_runtime::Error::from) }
        }))
        .await
        .map_err(Error::Runtime)
    }
}

/// The AWS transport from the standard configuration chain, provisioning as
/// `SOURCEFLOW_PROVISION` says and making no calls when it is unset.
async fn transport_from_env() -> Result<crate::transport::aws::AwsTransport, crate::Error> {
    use crate::transport::aws::{AwsTransport, ProvisionMode};
    let mode = match std::env::var("SOURCEFLOW_PROVISION") {
        Ok(m) if !m.is_empty() => m.parse()?,
        _ => ProvisionMode::Assume,
    };
    let cfg = crate::transport::aws::load_sdk_config().await?;
    Ok(AwsTransport::from_sdk_config(&cfg).provision_mode(mode))
}
