//! Errors returned by sourceflow, and the failure a handler reports.

use std::fmt;

/// A boxed error from user code or a dependency.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with sourceflow's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in sourceflow.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The routes linked into this binary cannot run together; every problem is listed.
    #[error("sourceflow cannot start, the routes in this binary are inconsistent:\n{0}")]
    Topology(TopologyProblems),

    /// Configuration from the environment or the builder is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A message is larger than its destination accepts.
    #[error(
        "{wire_name} message is {size} bytes, but {destination} accepts at most {limit} bytes (larger messages: see `sourceflow::claim_check`)"
    )]
    MessageTooLarge {
        /// Wire name of the message type.
        wire_name: String,
        /// Queue or topic the message was going to.
        destination: String,
        /// Encoded size in bytes (body plus attributes).
        size: usize,
        /// The destination's limit in bytes.
        limit: usize,
    },

    /// A message could not be serialized.
    #[error("cannot serialize {wire_name}: {source}")]
    Serialize {
        /// Wire name of the message type.
        wire_name: &'static str,
        /// The serde error.
        source: serde_json::Error,
    },

    /// An entity id breaks the FIFO `MessageGroupId` rules.
    #[error("invalid entity id on {wire_name}: {reason}")]
    InvalidEntityId {
        /// Wire name of the message type.
        wire_name: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A message attribute set by the producer would be refused by SQS or SNS, or is
    /// sourceflow's own.
    #[error("{wire_name}: message attribute `{name}`: {reason}")]
    InvalidAttribute {
        /// Wire name of the message type.
        wire_name: &'static str,
        /// The attribute's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A header set by the producer has a name or value that sourceflow or SQS refuses
    /// (see [`headers`](crate::headers)).
    #[error("header `{name}`: {reason}")]
    InvalidHeader {
        /// The header's name, as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The message's headers need one more message attribute (`sourceflow.headers`) than
    /// fits beside sourceflow's own and the producer's attributes within SQS's limit.
    #[error(
        "{wire_name}: a message carries at most {limit} message attributes on SQS; sourceflow keeps {} on this one ({}; the last when dead-lettered), your {} headers ({}) travel together in one more (`sourceflow.headers`), and your {} attributes ({}) leave no room for it: set at most {} attributes beside headers",
        .framework.len(), .framework.join(", "), .headers.len(), .headers.join(", "),
        .attributes.len(), .attributes.join(", "), .limit.saturating_sub(.framework.len() + 1)
    )]
    TooManyAttributes {
        /// Wire name of the message type.
        wire_name: String,
        /// Most attributes SQS takes on one message.
        limit: usize,
        /// The attributes sourceflow keeps on this message (the dead-letter reason's slot
        /// included).
        framework: Vec<String>,
        /// The names of the headers set.
        headers: Vec<String>,
        /// The names of the producer's attributes.
        attributes: Vec<String>,
    },

    /// A message was sent with an option its destination does not support.
    #[error("{0}")]
    Unsupported(String),

    /// The queue does not exist (it was not provisioned).
    #[error("queue `{0}` does not exist")]
    QueueDoesNotExist(String),

    /// The topic does not exist (it was not provisioned).
    #[error("topic `{0}` does not exist")]
    TopicDoesNotExist(String),

    /// A receipt handle is stale: the message was received again, deleted, or returned.
    #[error("receipt handle for a message on `{0}` is no longer valid")]
    InvalidReceipt(String),

    /// The runtime has shut down; nothing more can be sent through this handle.
    #[error("the sourceflow runtime has shut down")]
    ShutDown,

    /// Entries of a batch call (send, publish, delete, visibility change) were not done;
    /// every entry it does not list was.
    #[error(transparent)]
    Batch(#[from] BatchError),

    /// A call to the transport failed.
    #[error("{operation} on {transport} failed: {source}")]
    Transport {
        /// Transport name (`memory`, `aws`).
        transport: &'static str,
        /// What was being done (`SendMessageBatch`, `Publish`, ...).
        operation: String,
        /// The underlying error.
        source: BoxError,
    },

    /// A call to an idempotency store failed.
    #[error("{operation} on the {store} idempotency store failed: {source}")]
    Store {
        /// Store name (`sqlite`, `postgres`, ...).
        store: &'static str,
        /// What was being done (`claim`, `complete`, `migrate`, ...).
        operation: &'static str,
        /// The underlying error.
        source: BoxError,
    },

    /// No handler of this service answers the query (see [`query`](mod@crate::query)).
    #[error("no handler answers the query `{0}` in this service: add a #[handler] that takes it and returns its response (if there is one, `handlers_in(..)` or `query_handlers(..)` left it out)")]
    NoQueryHandler(&'static str),

    /// The handler of a query panicked.
    #[error("the handler {handler} of query `{query}` panicked: {message}")]
    QueryPanicked {
        /// The query's name.
        query: &'static str,
        /// The handler (`module::function`).
        handler: String,
        /// The panic's message.
        message: String,
    },

    /// A user-level failure, e.g. returned from a handler with `?`.
    #[error(transparent)]
    Other(BoxError),
}

impl Error {
    /// Wraps any error, for handlers that return `sourceflow::Result`.
    pub fn other(err: impl Into<BoxError>) -> Self {
        Error::Other(err.into())
    }
}

/// Why one entry of a batch call to a transport was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The broker refused the entry and would refuse it again (AWS: a sender fault such as
    /// an invalid parameter or an oversize message). Retrying cannot help.
    #[error("refused: {0}")]
    Refused(String),
    /// Not done because of a fault on the broker's side or on the way (AWS: a server
    /// fault, throttling, a failed or timed-out call). A retry may succeed.
    #[error("not done: {0}")]
    Transient(String),
    /// The receipt handle is not valid (never issued, or of a message that is gone).
    #[error("the receipt handle is not valid")]
    InvalidReceipt,
    /// The queue or topic does not exist.
    #[error("`{0}` does not exist")]
    NoSuchDestination(String),
}

impl EntryError {
    /// True when retrying the entry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, EntryError::Transient(_))
    }
}

/// The entries of one batch call that were not done, each with why. Every entry the list
/// does not name was done (sent, published, deleted, changed): a caller retries exactly the
/// listed ones, never the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// The call (`SendMessageBatch`, `PublishBatch`, `DeleteMessageBatch`, …).
    pub operation: &'static str,
    /// The queue or topic.
    pub destination: String,
    /// How many entries the call was given.
    pub total: usize,
    /// The entries not done: their index among the entries given, and why; in index order.
    pub failed: Vec<(usize, EntryError)>,
}

impl BatchError {
    /// Every one of `total` entries failed for the same reason (e.g. the call itself failed).
    pub fn all(
        operation: &'static str,
        destination: impl Into<String>,
        total: usize,
        error: EntryError,
    ) -> Self {
        BatchError {
            operation,
            destination: destination.into(),
            total,
            failed: (0..total).map(|i| (i, error.clone())).collect(),
        }
    }

    /// True when a retry of the failed entries may succeed (every failure is transient).
    pub fn is_transient(&self) -> bool {
        self.failed.iter().all(|(_, e)| e.is_transient())
    }

    /// The indices of the entries that were not done.
    pub fn failed_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.failed.iter().map(|(i, _)| *i)
    }

    /// The error of entry `index`, if it failed.
    pub fn error_of(&self, index: usize) -> Option<&EntryError> {
        self.failed
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|pos| &self.failed[pos].1)
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on `{}`: {} of {} entries not done",
            self.operation,
            self.destination,
            self.failed.len(),
            self.total
        )?;
        // The distinct reasons, not one line per entry.
        let mut reasons: Vec<String> = Vec::new();
        for (_, e) in &self.failed {
            let r = e.to_string();
            if !reasons.contains(&r) {
                reasons.push(r);
            }
        }
        if !reasons.is_empty() {
            write!(f, " ({})", reasons.join("; "))?;
        }
        Ok(())
    }
}

impl std::error::Error for BatchError {}

/// The list of problems found when checking the routes at startup.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TopologyProblems(pub Vec<String>);

impl fmt::Display for TopologyProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Why an invocation of a handler did not succeed. The listener decides from this whether
/// the message is retried (a handler failure) or moved aside at once (it can never succeed).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The payload does not deserialize into the handler's message type: retrying cannot help.
    #[error("payload does not decode as {wire_name}: {reason}")]
    Decode {
        /// Wire name the message claimed.
        wire_name: String,
        /// The serde error.
        reason: String,
    },
    /// The handler asked for `State<T>` that the runtime was not given.
    #[error("no state of type {0} was given to the runtime")]
    MissingState(&'static str),
    /// The handler takes a transaction, and none was open (run outside a listener).
    #[error("the handler takes a `{0}`, and no transaction was open for it")]
    NoTransaction(&'static str),
    /// The handler takes a transaction on another database than the one open.
    #[error("the handler takes a `{wanted}`, and the transaction open is a `{found}`")]
    WrongTransaction {
        /// What the handler takes.
        wanted: &'static str,
        /// What was open.
        found: &'static str,
    },
    /// The handler returned an error.
    #[error("{0}")]
    Failed(BoxError),
}
