//! Named pause points in the data path, for fault tests only (feature `failpoints`, the
//! `fail` crate): a test configures `fail::cfg("sourceflow::before-delete", "return(5000)")`
//! and the listener pauses there for 5 s, so that the test can kill the process at that
//! exact point. Without the feature a pause point compiles to nothing.

/// After the handlers' work was committed and dispatched, before the message is deleted.
pub(crate) const BEFORE_DELETE: &str = "sourceflow::before-delete";

/// After a message not due yet was sent again (delayed), before this copy is deleted.
pub(crate) const AFTER_REDELAY_SEND: &str = "sourceflow::after-redelay-send";

/// In a transactional handler's transaction, after the handlers' writes and the inbox
/// record's completion, before the commit.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
pub(crate) const BEFORE_COMMIT: &str = "sourceflow::before-commit";

/// Pauses for the milliseconds the fail point `name` is configured to return, if any.
#[cfg(feature = "failpoints")]
pub(crate) async fn pause(name: &str) {
    let ms = fail::eval(name, |v| v.and_then(|s| s.parse::<u64>().ok()));
    if let Some(Some(ms)) = ms {
        tracing::warn!(
            fail_point = name,
            ms,
            "pausing at a fail point (test build)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn pause(_name: &str) {}
