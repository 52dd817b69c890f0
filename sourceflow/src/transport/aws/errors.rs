//! Broker errors a person reads in one line: the operation, the resource, the AWS error
//! code and the AWS message.
//!
//! The SDK's own `Display` says little ("service error") and its `Debug` is a dump of
//! headers, bodies and HTTP types. [`AwsError`] keeps what matters: for a service error the
//! code and message (`ProvideErrorMetadata`), for a failure on the way what kind it was
//! (timeout, connection, unreadable answer) and its innermost cause. The raw response is
//! logged at `debug` level only.
//!
//! ```text
//! SendMessageBatch on aws failed: queue `shop-orders`: AWS.SimpleQueueService.NonExistentQueue: The specified queue does not exist.
//! ```

use std::fmt;

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

use crate::error::{EntryError, Error};

/// Longest AWS message kept in an error (they are short; this bounds a hostile one).
const MAX_TEXT: usize = 400;

/// What an SQS/SNS/STS call was about, for the error line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resource {
    /// A queue, by name.
    Queue(String),
    /// A topic, by name.
    Topic(String),
    /// A subscription of a queue to a topic.
    Subscription {
        /// Topic name.
        topic: String,
        /// Queue name.
        queue: String,
    },
    /// The caller's account (STS).
    Account,
    /// An S3 bucket (the claim check's), by name.
    Bucket(String),
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Queue(q) => write!(f, "queue `{q}`"),
            Resource::Topic(t) => write!(f, "topic `{t}`"),
            Resource::Subscription { topic, queue } => {
                write!(f, "subscription of queue `{queue}` to topic `{topic}`")
            }
            Resource::Account => f.write_str("the account"),
            Resource::Bucket(b) => write!(f, "bucket `{b}`"),
        }
    }
}

/// How a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// AWS answered with an error.
    Service {
        /// The AWS error code (`AWS.SimpleQueueService.NonExistentQueue`, `NotFound`, …).
        code: String,
        /// The AWS message.
        message: String,
        /// The HTTP status of the answer.
        status: u16,
    },
    /// No answer within the configured timeout.
    Timeout,
    /// The request did not reach AWS, or no answer came back (connection refused or reset,
    /// DNS, TLS).
    Dispatch(String),
    /// An answer came that could not be read.
    Response(Option<u16>),
    /// The request could not be built (a bug or an invalid parameter).
    Construction(String),
}

/// One failed call to AWS, displayed in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AwsError {
    /// What the call was about.
    pub(crate) resource: Resource,
    /// How it failed.
    pub(crate) failure: Failure,
}

impl AwsError {
    /// The AWS error code of a service error.
    pub(crate) fn code(&self) -> Option<&str> {
        match &self.failure {
            Failure::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True when AWS says the queue does not exist.
    pub(crate) fn is_missing_queue(&self) -> bool {
        self.code().is_some_and(is_missing_queue_code)
    }

    /// True when AWS says the topic (or another SNS resource) does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        self.code()
            .is_some_and(|c| c == "NotFound" || c == "NotFoundException")
    }

    /// The failure without the resource: what an entry's error says.
    pub(crate) fn detail(&self) -> String {
        self.failure.to_string()
    }

    /// This error as sourceflow's [`Error`] for `operation`: a missing queue or topic
    /// becomes [`Error::QueueDoesNotExist`] / [`Error::TopicDoesNotExist`].
    pub(crate) fn into_error(self, operation: &str) -> Error {
        match &self.resource {
            Resource::Queue(q) if self.is_missing_queue() => Error::QueueDoesNotExist(q.clone()),
            Resource::Topic(t) if self.is_not_found() => Error::TopicDoesNotExist(t.clone()),
            _ => Error::Transport {
                transport: "aws",
                operation: operation.to_string(),
                source: Box::new(self),
            },
        }
    }

    /// What every entry of a batch call that failed as a whole gets: the destination is
    /// missing, else transient (the SDK already retried the call).
    pub(crate) fn entry_error(&self) -> EntryError {
        match &self.resource {
            Resource::Queue(q) if self.is_missing_queue() => {
                EntryError::NoSuchDestination(q.clone())
            }
            Resource::Topic(t) if self.is_not_found() => EntryError::NoSuchDestination(t.clone()),
            _ => EntryError::Transient(self.detail()),
        }
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.resource, self.failure)?;
        if let Some(hint) = self.hint() {
            write!(f, " — {hint}")?;
        }
        Ok(())
    }
}

impl AwsError {
    /// What to do, where sourceflow knows.
    fn hint(&self) -> Option<&'static str> {
        let Failure::Service { code, message, .. } = &self.failure else {
            return match self.failure {
                Failure::Dispatch(_) | Failure::Timeout => {
                    Some("check AWS_ENDPOINT_URL (or the network) and that the service is up")
                }
                _ => None,
            };
        };
        match code.as_str() {
            "InvalidParameter" if message.contains("already exists with different attributes") => Some(
                "the subscription exists with other attributes (another deploy changed it meanwhile?): start again; `validate` shows the difference",
            ),
            "AccessDenied" | "AccessDeniedException" | "AuthorizationError" => {
                Some("the role lacks a permission: compare it with the service's `iam-policy`")
            }
            "AWS.SimpleQueueService.QueueDeletedRecently" | "QueueDeletedRecently" => {
                Some("SQS refuses a queue's name for 60 s after it was deleted: wait and start again")
            }
            "InvalidClientTokenId" | "UnrecognizedClientException" | "SignatureDoesNotMatch" | "ExpiredToken" => {
                Some("the AWS credentials are missing, wrong or expired")
            }
            c if is_missing_queue_code(c) => Some(
                "provision it (SOURCEFLOW_PROVISION=create, or deploy the exported template) or check SOURCEFLOW_PREFIX",
            ),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Service {
                code,
                message,
                status,
            } => {
                if message.is_empty() {
                    write!(f, "{code} (HTTP {status})")
                } else {
                    write!(f, "{code}: {message}")
                }
            }
            Failure::Timeout => f.write_str("no answer within the timeout"),
            Failure::Dispatch(cause) => write!(f, "cannot reach AWS: {cause}"),
            Failure::Response(Some(status)) => {
                write!(f, "unreadable answer (HTTP {status})")
            }
            Failure::Response(None) => f.write_str("unreadable answer"),
            Failure::Construction(why) => write!(f, "request not built: {why}"),
        }
    }
}

impl std::error::Error for AwsError {}

/// The one-line error of a failed SDK call on `resource`; the raw response goes to the
/// `debug` log only. The error type is shared by every SDK crate (SQS, SNS, STS).
pub(crate) fn aws_error<E>(
    operation: &'static str,
    resource: Resource,
    e: &SdkError<E, HttpResponse>,
) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let Some(raw) = e.raw_response() {
        tracing::debug!(operation, %resource, response = ?raw, "AWS call failed");
    }
    let failure = match e {
        SdkError::ServiceError(s) => {
            let meta = s.err().meta();
            Failure::Service {
                code: one_line(meta.code().unwrap_or("UnknownError")),
                message: one_line(meta.message().unwrap_or("")),
                status: s.raw().status().as_u16(),
            }
        }
        SdkError::TimeoutError(_) => Failure::Timeout,
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_timeout() {
                "timeout"
            } else if d.is_io() {
                "connection failed"
            } else if d.is_user() {
                "invalid request"
            } else {
                "dispatch failure"
            };
            match root_cause(e) {
                Some(cause) => Failure::Dispatch(format!("{kind} ({cause})")),
                None => Failure::Dispatch(kind.to_string()),
            }
        }
        SdkError::ResponseError(r) => Failure::Response(Some(r.raw().status().as_u16())),
        SdkError::ConstructionFailure(_) => {
            Failure::Construction(root_cause(e).unwrap_or_else(|| "unknown reason".into()))
        }
        _ => Failure::Construction(one_line(&e.to_string())),
    };
    AwsError { resource, failure }
}

/// Shorthand: the [`Error`] of a failed SDK call.
pub(crate) fn sdk_error<E>(
    operation: &'static str,
    resource: Resource,
    e: &SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    aws_error(operation, resource, e).into_error(operation)
}

/// The innermost cause of an error, in one line (hyper and rustls errors nest deeply; the
/// innermost is the one that says "Connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = e.source()?;
    while let Some(next) = cause.source() {
        cause = next;
    }
    Some(one_line(&cause.to_string()))
}

/// `text` on one line, bounded.
pub(crate) fn one_line(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() <= MAX_TEXT {
        return collapsed;
    }
    let mut out: String = collapsed.chars().take(MAX_TEXT).collect();
    out.push('…');
    out
}

/// The SQS codes for a queue that does not exist (the JSON protocol's and the
/// query-compatible one).
pub(crate) fn is_missing_queue_code(code: &str) -> bool {
    code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist")
}

/// AWS codes of throttling, which a retry after a pause may get through whatever
/// `SenderFault` says.
pub(crate) fn is_throttling_code(code: &str) -> bool {
    code.contains("Throttl") || code.contains("TooManyRequests") || code == "RequestLimitExceeded"
}

/// AWS codes of faults on AWS's side (HTTP 5xx).
pub(crate) fn is_server_code(code: &str) -> bool {
    code.contains("InternalError")
        || code.contains("InternalFailure")
        || code.contains("ServiceUnavailable")
        || code.contains("KMSInternal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_collapses_whitespace_and_bounds_length() {
        assert_eq!(one_line("a\n  b\r\n\tc "), "a b c");
        let long = "x".repeat(1000);
        let short = one_line(&long);
        assert_eq!(short.chars().count(), MAX_TEXT + 1);
        assert!(short.ends_with('…'));
    }

    #[test]
    fn known_failures_say_what_to_do() {
        let e = AwsError {
            resource: Resource::Subscription {
                topic: "order-events".into(),
                queue: "billing-order-events".into(),
            },
            failure: Failure::Service {
                code: "InvalidParameter".into(),
                message: "Invalid parameter: Attributes Reason: Subscription already exists with different attributes".into(),
                status: 400,
            },
        };
        let line = e.to_string();
        assert!(
            line.contains("start again; `validate` shows the difference"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_service_error_reads_as_resource_code_and_message() {
        let e = AwsError {
            resource: Resource::Queue("shop-orders".into()),
            failure: Failure::Service {
                code: "AWS.SimpleQueueService.NonExistentQueue".into(),
                message: "The specified queue does not exist.".into(),
                status: 400,
            },
        };
        assert_eq!(
            e.to_string(),
            "queue `shop-orders`: AWS.SimpleQueueService.NonExistentQueue: The specified queue does not exist. \
             — provision it (SOURCEFLOW_PROVISION=create, or deploy the exported template) or check SOURCEFLOW_PREFIX"
        );
        assert!(e.is_missing_queue());
        assert_eq!(
            e.entry_error(),
            EntryError::NoSuchDestination("shop-orders".into())
        );
        assert!(matches!(
            e.into_error("SendMessageBatch"),
            Error::QueueDoesNotExist(q) if q == "shop-orders"
        ));
        let throttled = AwsError {
            resource: Resource::Topic("events".into()),
            failure: Failure::Timeout,
        };
        assert_eq!(
            throttled.entry_error(),
            EntryError::Transient("no answer within the timeout".into())
        );
        let text = throttled.into_error("PublishBatch").to_string();
        assert_eq!(
            text,
            "PublishBatch on aws failed: topic `events`: no answer within the timeout \
             — check AWS_ENDPOINT_URL (or the network) and that the service is up"
        );
    }
}
