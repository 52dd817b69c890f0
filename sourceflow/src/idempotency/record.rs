//! What the durable stores (SQL, DynamoDB) share: how an existing record that a claim could
//! not take is judged, and how durations become stored milliseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{new_token, Claim};
use crate::error::Result;

/// `state` of a claim being processed.
#[cfg_attr(not(feature = "dynamodb"), allow(dead_code))]
pub(crate) const IN_PROGRESS: &str = "in_progress";
/// `state` of a processed message.
pub(crate) const COMPLETED: &str = "completed";

/// How often a claim re-runs its insert when the record changed between the insert and the
/// read that classifies it (it was released, or its lease or expiry ran out meanwhile).
const CLAIM_ATTEMPTS: usize = 5;

/// Durations are stored as milliseconds; capped so that `now + d` never overflows.
pub(crate) fn millis(d: Duration) -> i64 {
    const CAP: i64 = i64::MAX / 4;
    i64::try_from(d.as_millis()).map_or(CAP, |ms| ms.min(CAP))
}

/// The process clock, in milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// An existing record that a claim could not take, read back to tell why.
pub(crate) struct Existing {
    pub payload_hash: String,
    pub state: String,
    pub lease_until: Option<i64>,
    pub expires_at: Option<i64>,
    pub outbox: Option<String>,
    /// The clock the record is judged by, at the time of the read.
    pub now: i64,
}

/// What to answer when a claim's insert changed nothing.
enum Verdict {
    Answer(Claim),
    /// The record is gone or claimable now: insert again.
    Retry,
}

fn classify(existing: Option<Existing>, payload_hash: &str) -> Verdict {
    let Some(e) = existing else {
        return Verdict::Retry; // released meanwhile
    };
    let completed = e.state == COMPLETED;
    if completed && e.expires_at.is_none_or(|t| t <= e.now) {
        return Verdict::Retry; // expired meanwhile: taken over by the insert
    }
    if e.payload_hash != payload_hash {
        return Verdict::Answer(Claim::Mismatch);
    }
    if completed {
        return Verdict::Answer(Claim::Completed {
            undispatched: e.outbox,
        });
    }
    match e.lease_until {
        Some(until) if until > e.now => Verdict::Answer(Claim::InProgress {
            lease_left: Duration::from_millis(u64::try_from(until - e.now).unwrap_or(0)),
        }),
        _ => Verdict::Retry, // the lease ran out meanwhile: taken over by the insert
    }
}

/// The answer when every attempt raced with a change of the record: another worker is busy
/// with the key, so the caller waits and asks again.
const CONTENDED: Claim = Claim::InProgress {
    lease_left: Duration::ZERO,
};

/// What one attempt at a claim found.
pub(crate) enum Attempt {
    /// The record was written: the claim is the caller's.
    Won,
    /// The record could not be taken; here it is, as read (`None`: gone meanwhile).
    Blocked(Option<Existing>),
}

/// A claim on a durable store: `attempt(token)` writes an in-progress record with `token`
/// in one atomic statement if the key is absent or claimable, or reports the record in the
/// way. The record tells the answer; when it changed between the write and the read, the
/// attempt is repeated (a few times, then the caller is told to wait).
pub(crate) async fn claim_with<F, Fut>(payload_hash: &str, mut attempt: F) -> Result<Claim>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<Attempt>>,
{
    for _ in 0..CLAIM_ATTEMPTS {
        let token = new_token();
        match attempt(token.clone()).await? {
            Attempt::Won => return Ok(Claim::Acquired { token, attempt: 1 }),
            Attempt::Blocked(existing) => match classify(existing, payload_hash) {
                Verdict::Answer(claim) => return Ok(claim),
                Verdict::Retry => {}
            },
        }
    }
    Ok(CONTENDED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing(state: &str, hash: &str, lease: Option<i64>, exp: Option<i64>) -> Existing {
        Existing {
            payload_hash: hash.into(),
            state: state.into(),
            lease_until: lease,
            expires_at: exp,
            outbox: Some("[]".into()),
            now: 1_000,
        }
    }

    #[test]
    fn classifies_like_the_memory_store() {
        let answer = |e, h| match classify(e, h) {
            Verdict::Answer(c) => Some(c),
            Verdict::Retry => None,
        };
        assert_eq!(answer(None, "h"), None);
        assert_eq!(
            answer(Some(existing(IN_PROGRESS, "h", Some(1_500), None)), "h"),
            Some(Claim::InProgress {
                lease_left: Duration::from_millis(500)
            })
        );
        assert_eq!(
            answer(Some(existing(IN_PROGRESS, "h", Some(900), None)), "h"),
            None
        );
        assert_eq!(
            answer(Some(existing(IN_PROGRESS, "x", Some(900), None)), "h"),
            Some(Claim::Mismatch)
        );
        assert_eq!(
            answer(Some(existing(COMPLETED, "h", None, Some(2_000))), "h"),
            Some(Claim::Completed {
                undispatched: Some("[]".into())
            })
        );
        assert_eq!(
            answer(Some(existing(COMPLETED, "x", None, Some(2_000))), "h"),
            Some(Claim::Mismatch)
        );
        assert_eq!(
            answer(Some(existing(COMPLETED, "x", None, Some(1_000))), "h"),
            None
        );
    }

    #[test]
    fn durations_never_overflow() {
        assert_eq!(millis(Duration::from_millis(1_500)), 1_500);
        // Now is about 1.7e12 ms; a capped duration leaves room for centuries more.
        assert!(millis(Duration::MAX).checked_add(1 << 50).is_some());
    }
}
