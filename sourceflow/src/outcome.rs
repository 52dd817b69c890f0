//! What a handler's error says about its message: retry it (the default), never retry it
//! ([`Reject`]), or retry it after a given delay ([`RetryAfter`]).

use std::any::TypeId;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{BoxError, Error};

/// A handler's verdict that its message can never succeed: it goes to the dead-letter
/// queue at once, with this reason in `sourceflow.dlq_reason`, without further attempts.
///
/// A handler returns `Result<(), E>` for any error type. An ordinary error is a failed
/// attempt: the message comes back after the configured backoff, and the attempt that
/// reaches `max_receive_count` moves it to the dead-letter queue. Two error types steer it
/// otherwise:
///
/// ```
/// use std::time::Duration;
/// use sourceflow::{command, handler, Reject, RetryAfter};
///
/// #[command(queue = "doc-outcome-payments")]
/// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
/// pub struct ChargeCard {
///     pub cents: u64,
///     pub expired: bool,
///     pub gateway_busy: bool,
/// }
///
/// #[handler]
/// async fn charge(cmd: ChargeCard) -> sourceflow::Result<()> {
///     if cmd.expired {
///         // Retrying cannot help: to the dead-letter queue at once, with this reason.
///         return Err(Reject::new("card expired").into());
///     }
///     if cmd.gateway_busy {
///         // A failed attempt, retried after the delay the gateway asked for.
///         return Err(RetryAfter::new(Duration::from_secs(30), "gateway rate limit").into());
///     }
///     Ok(())
/// }
/// ```
///
/// An error type of your own can be marked permanent once, for every handler, with
/// [`Builder::permanent_error`](crate::Builder::permanent_error): a handler that returns it
/// (or an error whose [`source`](std::error::Error::source) chain contains it) is rejected
/// like [`Reject`]. The dead-letter reason is the error's `Display` text: keep payload
/// values out of it.
#[derive(Debug)]
pub struct Reject {
    reason: String,
    source: Option<BoxError>,
}

impl Reject {
    /// Rejects the message with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Reject {
            reason: reason.into(),
            source: None,
        }
    }

    /// Rejects the message with `reason`, keeping `source` as the cause.
    pub fn because(reason: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Reject {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }

    /// The reason given.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for Reject {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<Reject> for Error {
    fn from(r: Reject) -> Self {
        Error::Other(Box::new(r))
    }
}

/// A failed attempt that asks to be retried after `after` instead of the configured
/// backoff (a rate limit that says when to come back, say). It still counts as an attempt.
/// See [`Reject`] for an example.
#[derive(Debug)]
pub struct RetryAfter {
    after: Duration,
    reason: String,
}

impl RetryAfter {
    /// Retry after `after` (at most 12 hours), because of `reason`.
    pub fn new(after: Duration, reason: impl Into<String>) -> Self {
        RetryAfter {
            after,
            reason: reason.into(),
        }
    }

    /// The delay asked for.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (retry asked in {:.1} s)",
            self.reason,
            self.after.as_secs_f64()
        )
    }
}

impl std::error::Error for RetryAfter {}

impl From<RetryAfter> for Error {
    fn from(r: RetryAfter) -> Self {
        Error::Other(Box::new(r))
    }
}

/// What a handler's error asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// An ordinary failed attempt: the configured backoff.
    Retry,
    /// A failed attempt, retried after this delay.
    RetryAfter(Duration),
    /// Never retried: to the dead-letter queue.
    Reject,
}

/// Recognises a user's error type among the errors of a handler.
type Matcher = Arc<dyn Fn(&(dyn std::error::Error + 'static)) -> bool + Send + Sync>;

/// The error types the service treats as permanent, besides [`Reject`].
#[derive(Clone, Default)]
pub(crate) struct PermanentErrors {
    types: Vec<(TypeId, Matcher)>,
}

impl PermanentErrors {
    /// Marks `E` as permanent.
    pub(crate) fn add<E: std::error::Error + 'static>(&mut self) {
        if self.types.iter().any(|(id, _)| *id == TypeId::of::<E>()) {
            return;
        }
        let matcher: Matcher = Arc::new(|e| e.is::<E>());
        self.types.push((TypeId::of::<E>(), matcher));
    }

    /// Reads a handler's error: the first [`Reject`], [`RetryAfter`] or permanent type
    /// along its source chain decides (looking through `sourceflow::Error::Other`).
    pub(crate) fn verdict(&self, err: &(dyn std::error::Error + 'static)) -> Verdict {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
        let mut depth = 0;
        while let Some(e) = current {
            if e.is::<Reject>() || self.types.iter().any(|(_, is)| is(e)) {
                return Verdict::Reject;
            }
            if let Some(r) = e.downcast_ref::<RetryAfter>() {
                return Verdict::RetryAfter(r.after);
            }
            depth += 1;
            if depth > 32 {
                break;
            }
            // `Error::Other` is transparent: its `source` skips the error it wraps.
            current = match e.downcast_ref::<Error>() {
                Some(Error::Other(inner)) => Some(inner.as_ref()),
                _ => e.source(),
            };
        }
        Verdict::Retry
    }
}

impl fmt::Debug for PermanentErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermanentErrors")
            .field("types", &self.types.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct CardExpired;
    impl fmt::Display for CardExpired {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("card expired")
        }
    }
    impl std::error::Error for CardExpired {}

    #[derive(Debug)]
    struct Wrapper(BoxError);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "while charging: {}", self.0)
        }
    }
    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.0.as_ref())
        }
    }

    fn verdict_of(p: &PermanentErrors, e: BoxError) -> Verdict {
        p.verdict(e.as_ref())
    }

    #[test]
    fn reads_rejections_delays_and_marked_types_through_wrappers() {
        let mut p = PermanentErrors::default();
        assert_eq!(
            verdict_of(&p, Box::new(std::io::Error::other("x"))),
            Verdict::Retry
        );
        assert_eq!(verdict_of(&p, Box::new(Reject::new("no"))), Verdict::Reject);
        let via_error: Error = Reject::new("no").into();
        assert_eq!(verdict_of(&p, Box::new(via_error)), Verdict::Reject);
        let later: Error = RetryAfter::new(Duration::from_secs(7), "busy").into();
        assert_eq!(
            verdict_of(&p, Box::new(later)),
            Verdict::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(verdict_of(&p, Box::new(CardExpired)), Verdict::Retry);
        p.add::<CardExpired>();
        assert_eq!(verdict_of(&p, Box::new(CardExpired)), Verdict::Reject);
        let wrapped = Wrapper(Box::new(Error::other(CardExpired)));
        assert_eq!(verdict_of(&p, Box::new(wrapped)), Verdict::Reject);
    }
}
