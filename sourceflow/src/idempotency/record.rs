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
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// An existing record that a claim could not take, read back to tell why.
pub(crate) struct Existing {
    pub payload_hash: String,
    pub state: String,
    /// An in-progress record has a token while a worker holds it; a claim released with
    /// [`Release::Failed`](super::Release::Failed) or [`Release::Returned`](super::Release::Returned)
    /// has none (and is claimable at once).
    pub token: Option<String>,
    /// The handler attempts recorded (`None`: a record written before they were counted).
    pub attempts: Option<i64>,
    pub lease_until: Option<i64>,
    pub expires_at: Option<i64>,
    pub outbox: Option<String>,
    /// The clock the record is judged by, at the time of the read.
    pub now: i64,
}

/// Which record a claim takes, which decides the attempt count it writes. The SQL stores
/// decide this inside their one statement (`CASE`); DynamoDB, whose writes cannot branch,
/// computes the count from the record it found and writes it with a condition that holds
/// only while the record is still the one it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// The key is absent: a new record, no attempts recorded.
    Absent,
    /// In progress under `token`, whose lease ran out: its worker reached the handlers and
    /// died holding the claim, so that attempt counts (`attempts + 1`). The token names
    /// this claim alone: while it is there, the count is the one read.
    Crashed {
        /// The dead worker's token.
        token: String,
        /// The attempts recorded before it (`None`: none).
        attempts: Option<i64>,
    },
    /// Released as failed or returned: the release settled the count (kept).
    Released {
        /// The attempts recorded (`None`: none).
        attempts: Option<i64>,
    },
    /// A completion past its expiry: the key starts again (attempts 0).
    Expired,
}

/// What to answer when a claim's write changed nothing.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Answer(Claim),
    /// The record is gone or claimable now: write again, expecting this kind of record.
    Take(Takeover),
}

fn classify(existing: Option<Existing>, payload_hash: &str) -> Verdict {
    let Some(e) = existing else {
        return Verdict::Take(Takeover::Absent); // deleted meanwhile
    };
    let completed = e.state == COMPLETED;
    if completed && e.expires_at.is_none_or(|t| t <= e.now) {
        // Expired: the key is free, whatever payload the old record had.
        return Verdict::Take(Takeover::Expired);
    }
    if e.payload_hash != payload_hash {
        return Verdict::Answer(Claim::Mismatch);
    }
    if completed {
        return Verdict::Answer(match dispatching(&e) {
            // Its worker is still sending what it stored: wait for it rather than send
            // the messages a second time.
            Some(lease_left) => Claim::InProgress { lease_left },
            None => Claim::Completed {
                undispatched: e.outbox,
            },
        });
    }
    let Some(token) = e.token else {
        // Released: claimable at once, whatever the clocks say of its lease.
        return Verdict::Take(Takeover::Released {
            attempts: e.attempts,
        });
    };
    match e.lease_until {
        Some(until) if until > e.now => Verdict::Answer(Claim::InProgress {
            lease_left: Duration::from_millis(u64::try_from(until - e.now).unwrap_or(0)),
        }),
        // The lease ran out (meanwhile, or long ago: a dead worker's claim).
        _ => Verdict::Take(Takeover::Crashed {
            token,
            attempts: e.attempts,
        }),
    }
}

/// The time left on a completed record's dispatch lease: the completing worker stored an
/// outbox and has not yet recorded the end of its dispatch (see
/// [`IdempotencyStore::complete`](super::IdempotencyStore::complete)).
fn dispatching(e: &Existing) -> Option<Duration> {
    let until = e.lease_until.filter(|_| e.outbox.is_some())?;
    (until > e.now).then(|| Duration::from_millis(u64::try_from(until - e.now).unwrap_or(0)))
}

/// The answer when every attempt raced with a change of the record: another worker is busy
/// with the key, so the caller waits and asks again.
const CONTENDED: Claim = Claim::InProgress {
    lease_left: Duration::ZERO,
};

/// The attempt number of a claim that found `recorded` handler attempts in its record.
pub(crate) fn attempt_number(recorded: i64) -> u32 {
    u32::try_from(recorded.max(0))
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

/// What one attempt at a claim found.
pub(crate) enum Attempt {
    /// The record was written: the claim is the caller's.
    Won {
        /// The handler attempts recorded in the record as written (before this one).
        attempts: i64,
    },
    /// The record could not be taken; here it is, as read (`None`: gone meanwhile).
    Blocked(Option<Existing>),
}

/// A claim on a durable store: `attempt(token, expected)` writes an in-progress record with
/// `token` in one atomic write if the key is absent or claimable, or reports the record in
/// the way. `expected` is the kind of record the previous attempt found
/// ([`Takeover::Absent`] at first); a store that takes every kind in one statement ignores
/// it. The record tells the answer; when it changed between the write and the read, the
/// attempt is repeated (a few times, then the caller is told to wait).
pub(crate) async fn claim_with<F, Fut>(payload_hash: &str, mut attempt: F) -> Result<Claim>
where
    F: FnMut(String, Takeover) -> Fut,
    Fut: std::future::Future<Output = Result<Attempt>>,
{
    let mut tries = ClaimTries::new(payload_hash);
    while let Some((token, expected)) = tries.next_try() {
        let found = attempt(token.clone(), expected).await?;
        if let Some(claim) = tries.judge(token, found) {
            return Ok(claim);
        }
    }
    Ok(CONTENDED)
}

/// The loop of [`claim_with`] turned inside out, for callers whose attempt borrows a
/// connection mutably (a claim inside a transaction): ask [`next_try`](Self::next_try) for
/// the token and the expected record, make the attempt, hand its result to
/// [`judge`](Self::judge); when `next_try` has no more, the answer is [`CONTENDED`].
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) struct ClaimTries<'a> {
    payload_hash: &'a str,
    expected: Option<Takeover>,
    left: usize,
}

#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
impl<'a> ClaimTries<'a> {
    pub(crate) fn new(payload_hash: &'a str) -> Self {
        ClaimTries {
            payload_hash,
            expected: Some(Takeover::Absent),
            left: CLAIM_ATTEMPTS,
        }
    }

    /// A fresh token and the record the attempt expects, or `None` when the tries are spent.
    pub(crate) fn next_try(&mut self) -> Option<(String, Takeover)> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let expected = self.expected.take().unwrap_or(Takeover::Absent);
        Some((new_token(), expected))
    }

    /// The answer of an attempt made with `token`, or `None` to try again.
    pub(crate) fn judge(&mut self, token: String, found: Attempt) -> Option<Claim> {
        match found {
            Attempt::Won { attempts } => Some(Claim::Acquired {
                token,
                attempt: attempt_number(attempts),
            }),
            Attempt::Blocked(existing) => match classify(existing, self.payload_hash) {
                Verdict::Answer(claim) => Some(claim),
                Verdict::Take(kind) => {
                    self.expected = Some(kind);
                    None
                }
            },
        }
    }

    /// The answer when every try raced with a change of the record.
    pub(crate) fn contended() -> Claim {
        CONTENDED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        state: &str,
        hash: &str,
        held: bool,
        lease: Option<i64>,
        exp: Option<i64>,
    ) -> Existing {
        Existing {
            payload_hash: hash.into(),
            state: state.into(),
            token: held.then(|| "dead".to_string()),
            attempts: Some(4),
            lease_until: lease,
            expires_at: exp,
            outbox: Some("[]".into()),
            now: 1_000,
        }
    }

    #[test]
    fn classifies_like_the_memory_store() {
        let take = Verdict::Take;
        let answer = Verdict::Answer;
        let crashed = || Takeover::Crashed {
            token: "dead".into(),
            attempts: Some(4),
        };
        let released = || Takeover::Released { attempts: Some(4) };
        assert_eq!(classify(None, "h"), take(Takeover::Absent));
        // Held under a live lease: wait; under a lease that ran out: a crashed worker's.
        assert_eq!(
            classify(Some(record(IN_PROGRESS, "h", true, Some(1_500), None)), "h"),
            answer(Claim::InProgress {
                lease_left: Duration::from_millis(500)
            })
        );
        assert_eq!(
            classify(Some(record(IN_PROGRESS, "h", true, Some(900), None)), "h"),
            take(crashed())
        );
        assert_eq!(
            classify(Some(record(IN_PROGRESS, "h", true, Some(1_000), None)), "h"),
            take(crashed()),
            "a lease ends at its last millisecond"
        );
        assert_eq!(
            classify(Some(record(IN_PROGRESS, "x", true, Some(900), None)), "h"),
            answer(Claim::Mismatch)
        );
        // Released: claimable at once, even when the releasing clock ran ahead of this one.
        assert_eq!(
            classify(Some(record(IN_PROGRESS, "h", false, Some(900), None)), "h"),
            take(released())
        );
        assert_eq!(
            classify(
                Some(record(IN_PROGRESS, "h", false, Some(5_000), None)),
                "h"
            ),
            take(released())
        );
        assert_eq!(
            classify(Some(record(IN_PROGRESS, "x", false, Some(900), None)), "h"),
            answer(Claim::Mismatch),
            "a released record keeps its payload"
        );
        // Completed: a duplicate until it expires, then the key is free for any payload.
        assert_eq!(
            classify(Some(record(COMPLETED, "h", false, None, Some(2_000))), "h"),
            answer(Claim::Completed {
                undispatched: Some("[]".into())
            })
        );
        // Completed with its outbox still going out under a live lease: wait for it.
        assert_eq!(
            classify(
                Some(record(COMPLETED, "h", false, Some(1_250), Some(2_000))),
                "h"
            ),
            answer(Claim::InProgress {
                lease_left: Duration::from_millis(250)
            }),
            "a completion still dispatching its outbox"
        );
        assert_eq!(
            classify(
                Some(record(COMPLETED, "h", false, Some(1_000), Some(2_000))),
                "h"
            ),
            answer(Claim::Completed {
                undispatched: Some("[]".into())
            }),
            "a dispatch lease that ran out: the duplicate sends what is left"
        );
        let mut sent = record(COMPLETED, "h", false, Some(1_250), Some(2_000));
        sent.outbox = None;
        assert_eq!(
            classify(Some(sent), "h"),
            answer(Claim::Completed { undispatched: None }),
            "nothing left to dispatch: no lease to wait for"
        );
        assert_eq!(
            classify(
                Some(record(COMPLETED, "x", false, Some(1_250), Some(2_000))),
                "h"
            ),
            answer(Claim::Mismatch)
        );
        assert_eq!(
            classify(Some(record(COMPLETED, "x", false, None, Some(2_000))), "h"),
            answer(Claim::Mismatch)
        );
        assert_eq!(
            classify(Some(record(COMPLETED, "x", false, None, Some(1_000))), "h"),
            take(Takeover::Expired)
        );
        assert_eq!(
            classify(Some(record(COMPLETED, "h", false, None, None)), "h"),
            take(Takeover::Expired),
            "a completion without an expiry is not kept forever"
        );
    }

    #[test]
    fn attempt_numbers_start_at_one_and_saturate() {
        assert_eq!(attempt_number(0), 1);
        assert_eq!(attempt_number(2), 3);
        assert_eq!(attempt_number(-4), 1, "a corrupt count is no attempt");
        assert_eq!(attempt_number(i64::MAX), u32::MAX);
    }

    #[tokio::test]
    async fn the_loop_writes_again_expecting_what_it_found() {
        // First write: the key is expected absent, but a crashed claim is in the way; the
        // second write expects that crashed claim, and is refused because the record was
        // released meanwhile; the third takes the released record.
        let mut seen = Vec::new();
        let mut script = vec![
            Attempt::Won { attempts: 2 },
            Attempt::Blocked(Some(record(IN_PROGRESS, "h", false, Some(1_200), None))),
            Attempt::Blocked(Some(record(IN_PROGRESS, "h", true, Some(900), None))),
        ];
        let claim = claim_with("h", |token, expected| {
            seen.push((token, expected));
            let next = script.pop().expect("scripted");
            async move { Ok(next) }
        })
        .await
        .expect("claim");
        let kinds: Vec<&Takeover> = seen.iter().map(|(_, k)| k).collect();
        assert_eq!(
            kinds,
            [
                &Takeover::Absent,
                &Takeover::Crashed {
                    token: "dead".into(),
                    attempts: Some(4)
                },
                &Takeover::Released { attempts: Some(4) }
            ]
        );
        let Claim::Acquired { token, attempt } = claim else {
            panic!("acquired, got {claim:?}");
        };
        assert_eq!(
            attempt, 3,
            "the attempts the winning write recorded, plus one"
        );
        assert_eq!(token, seen[2].0, "the token of the winning write");
    }

    #[tokio::test]
    async fn a_record_that_keeps_changing_means_wait() {
        let mut writes = 0;
        let claim = claim_with("h", |_, _| {
            writes += 1;
            async { Ok(Attempt::Blocked(None)) }
        })
        .await
        .expect("claim");
        assert_eq!(claim, CONTENDED);
        assert_eq!(writes, CLAIM_ATTEMPTS);
    }

    #[test]
    fn durations_never_overflow() {
        assert_eq!(millis(Duration::from_millis(1_500)), 1_500);
        // Now is about 1.7e12 ms; a capped duration leaves room for centuries more.
        assert!(millis(Duration::MAX).checked_add(1 << 50).is_some());
    }
}
