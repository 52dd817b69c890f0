//! Per-entry outcomes of one batch call, and the retry of the entries that may succeed.
//!
//! A batch call to SQS or SNS (`SendMessageBatch`, `PublishBatch`, `DeleteMessageBatch`,
//! `ChangeMessageVisibilityBatch`) answers per entry. [`with_retries`] calls again with the
//! entries that failed transiently only (`SenderFault=false`, throttling or a server
//! fault), with exponential backoff and jitter, a few times; an entry that was done is
//! never sent again. What fails for good is reported at once: a sender fault as
//! [`EntryError::Refused`], an invalid receipt as [`EntryError::InvalidReceipt`]. A call
//! that fails as a whole (after the SDK's own retries) fails every entry it carried.

use std::future::Future;
use std::time::Duration;

use super::batcher::Failures;
use super::errors::{is_server_code, is_throttling_code, one_line};
use crate::error::EntryError;

/// An entry AWS reports failed (`BatchResultErrorEntry`, in SQS and SNS alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryFailure {
    /// The entry's id in the request (its index, as text).
    pub(crate) id: String,
    /// The AWS error code.
    pub(crate) code: String,
    /// The AWS message.
    pub(crate) message: Option<String>,
    /// AWS's verdict: the request was at fault, not the service.
    pub(crate) sender_fault: bool,
}

/// The per-entry answer of one batch call: ids that succeeded and entries that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    /// Ids of the entries done.
    pub(crate) succeeded: Vec<String>,
    /// Entries not done.
    pub(crate) failed: Vec<EntryFailure>,
}

/// How often and how patiently failed entries are tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Calls at most, the first included.
    pub(crate) attempts: u32,
    /// Pause before the first retry; doubled for each further one.
    pub(crate) base: Duration,
    /// Longest pause.
    pub(crate) cap: Duration,
}

/// Four calls at most, pauses of about 50, 100 and 200 ms (jittered).
pub(crate) const POLICY: Policy = Policy {
    attempts: 4,
    base: Duration::from_millis(50),
    cap: Duration::from_secs(1),
};

impl Policy {
    /// The pause after failed call number `attempt` (0 for the first): exponential, capped,
    /// with jitter between half and all of it so that callers do not retry in step.
    pub(crate) fn pause(&self, attempt: u32) -> Duration {
        let full = self
            .base
            .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
            .min(self.cap);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// What becomes of an entry AWS reports failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// May succeed on retry.
    Retry(EntryError),
    /// Fails for good.
    Final(EntryError),
}

/// Codes of entries that are wrong in themselves: no retry can help, whatever `SenderFault`
/// says (LocalStack reports `InvalidMessageContents` with `SenderFault=false`).
fn is_invalid_entry_code(code: &str) -> bool {
    code.contains("Invalid")
        || code.contains("MissingParameter")
        || code.contains("TooLong")
        || code.contains("NotDistinct")
        || code.contains("UnsupportedOperation")
        || code.contains("Validation")
}

/// Sorts a failed entry: invalid receipts and sender faults are final, the rest (server
/// faults, throttling) may be retried. The codes decide before the `SenderFault` flag:
/// LocalStack reports `ReceiptHandleIsInvalid` and `InvalidMessageContents` with
/// `SenderFault=false`, and throttling may come as a sender fault.
pub(crate) fn classify(f: &EntryFailure) -> Verdict {
    let text = match &f.message {
        Some(m) if !m.is_empty() => one_line(&format!("{}: {m}", f.code)),
        _ => one_line(&f.code),
    };
    if f.code.contains("ReceiptHandleIsInvalid")
        || f.code.contains("InvalidReceiptHandle")
        || f.code.contains("MessageNotInflight")
    {
        Verdict::Final(EntryError::InvalidReceipt)
    } else if is_invalid_entry_code(&f.code) {
        Verdict::Final(EntryError::Refused(text))
    } else if !f.sender_fault || is_throttling_code(&f.code) || is_server_code(&f.code) {
        Verdict::Retry(EntryError::Transient(text))
    } else {
        Verdict::Final(EntryError::Refused(text))
    }
}

/// Runs one batch call of `n` entries, and again for those that failed transiently, as
/// `policy` says. `call` gets the indices (0..n) of the entries to carry, and must use
/// each index, as text, as the entry's id. Returns the entries not done, by index, in
/// index order.
pub(crate) async fn with_retries<F, Fut>(n: usize, policy: Policy, mut call: F) -> Failures
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: Future<Output = Result<Answer, EntryError>>,
{
    let mut failures: Failures = Vec::new();
    let mut pending: Vec<usize> = (0..n).collect();
    let mut attempt = 0;
    while !pending.is_empty() {
        let last = attempt + 1 >= policy.attempts;
        let answer = match call(pending.clone()).await {
            Ok(answer) => answer,
            Err(e) => {
                failures.extend(pending.drain(..).map(|i| (i, e.clone())));
                break;
            }
        };
        let index = |id: &str| id.parse::<usize>().ok().filter(|i| pending.contains(i));
        let mut retry = Vec::new();
        let mut answered: Vec<usize> = answer.succeeded.iter().filter_map(|id| index(id)).collect();
        for f in &answer.failed {
            let Some(i) = index(&f.id) else {
                tracing::debug!(id = %f.id, "AWS reported a failure for an entry it was not given");
                continue;
            };
            answered.push(i);
            match classify(f) {
                Verdict::Retry(e) if last => failures.push((i, e)),
                Verdict::Retry(_) => retry.push(i),
                Verdict::Final(e) => failures.push((i, e)),
            }
        }
        // An entry in neither list: AWS did not say. It may have been done, so it is not
        // sent again; the caller hears it as transient.
        for i in &pending {
            if !answered.contains(i) {
                failures.push((
                    *i,
                    EntryError::Transient("AWS reported no result for this entry".into()),
                ));
            }
        }
        retry.sort_unstable();
        retry.dedup();
        pending = retry;
        if !pending.is_empty() {
            tokio::time::sleep(policy.pause(attempt)).await;
        }
        attempt += 1;
    }
    failures.sort_by_key(|(i, _)| *i);
    failures.dedup_by_key(|(i, _)| *i);
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    fn failure(id: usize, code: &str, sender_fault: bool) -> EntryFailure {
        EntryFailure {
            id: id.to_string(),
            code: code.into(),
            message: Some("why".into()),
            sender_fault,
        }
    }

    const FAST: Policy = Policy {
        attempts: 4,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(2),
    };

    /// A fake batch call: answers from a script, and records which entries each call carried.
    #[derive(Clone, Default)]
    struct Script {
        calls: Arc<Mutex<Vec<Vec<usize>>>>,
        /// Per call: the ids to fail, and how (`None` for the call failing as a whole).
        answers: Arc<Mutex<VecDeque<Option<Vec<EntryFailure>>>>>,
    }

    impl Script {
        fn new(answers: Vec<Option<Vec<EntryFailure>>>) -> Self {
            Script {
                calls: Default::default(),
                answers: Arc::new(Mutex::new(answers.into())),
            }
        }

        fn call(&self, pending: Vec<usize>) -> impl Future<Output = Result<Answer, EntryError>> {
            self.calls.lock().unwrap().push(pending.clone());
            let next = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Some(vec![]));
            async move {
                let failed = next.ok_or_else(|| EntryError::Transient("call failed".into()))?;
                let failed: Vec<EntryFailure> = failed
                    .into_iter()
                    .filter(|f| pending.contains(&f.id.parse().unwrap()))
                    .collect();
                let succeeded = pending
                    .iter()
                    .map(|i| i.to_string())
                    .filter(|id| !failed.iter().any(|f| &f.id == id))
                    .collect();
                Ok(Answer { succeeded, failed })
            }
        }

        fn calls(&self) -> Vec<Vec<usize>> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn only_the_transiently_failed_entries_are_sent_again() {
        // 5 entries: 1 and 3 fail on the server's side, then 3 again, then both succeed.
        let s = Script::new(vec![
            Some(vec![
                failure(1, "InternalError", false),
                failure(3, "InternalError", false),
            ]),
            Some(vec![failure(3, "ServiceUnavailable", false)]),
        ]);
        let out = with_retries(5, FAST, |p| s.call(p)).await;
        assert_eq!(out, vec![]);
        assert_eq!(s.calls(), vec![vec![0, 1, 2, 3, 4], vec![1, 3], vec![3]]);
    }

    #[tokio::test]
    async fn sender_faults_and_invalid_receipts_fail_at_once_and_are_not_retried() {
        let s = Script::new(vec![Some(vec![
            failure(0, "InvalidMessageContents", false),
            failure(1, "ReceiptHandleIsInvalid", false),
            failure(2, "InternalError", false),
        ])]);
        let out = with_retries(4, FAST, |p| s.call(p)).await;
        assert_eq!(
            out,
            vec![
                (0, EntryError::Refused("InvalidMessageContents: why".into())),
                (1, EntryError::InvalidReceipt),
            ]
        );
        assert_eq!(s.calls(), vec![vec![0, 1, 2, 3], vec![2]]);
    }

    #[tokio::test]
    async fn throttling_is_retried_even_as_a_sender_fault() {
        let s = Script::new(vec![Some(vec![failure(1, "RequestThrottled", true)])]);
        assert_eq!(with_retries(2, FAST, |p| s.call(p)).await, vec![]);
        assert_eq!(s.calls(), vec![vec![0, 1], vec![1]]);
    }

    #[tokio::test]
    async fn what_still_fails_after_the_last_attempt_is_transient() {
        let always = || Some(vec![failure(2, "InternalError", false)]);
        let s = Script::new(vec![always(), always(), always(), always(), always()]);
        let out = with_retries(3, FAST, |p| s.call(p)).await;
        assert_eq!(
            out,
            vec![(2, EntryError::Transient("InternalError: why".into()))]
        );
        assert_eq!(s.calls().len(), FAST.attempts as usize);
        assert!(s.calls()[1..].iter().all(|c| c == &vec![2]));
    }

    #[tokio::test]
    async fn a_call_failing_as_a_whole_fails_only_the_entries_it_carried() {
        // The first call takes 0 and 2 and fails 1; the retry of 1 fails as a whole.
        let s = Script::new(vec![Some(vec![failure(1, "InternalError", false)]), None]);
        let out = with_retries(3, FAST, |p| s.call(p)).await;
        assert_eq!(out, vec![(1, EntryError::Transient("call failed".into()))]);
        assert_eq!(s.calls(), vec![vec![0, 1, 2], vec![1]]);
    }

    #[tokio::test]
    async fn an_entry_aws_does_not_mention_is_transient_and_not_sent_again() {
        let calls = Arc::new(Mutex::new(0));
        let out = with_retries(2, FAST, |_| {
            *calls.lock().unwrap() += 1;
            async {
                Ok(Answer {
                    succeeded: vec!["0".into(), "7".into()],
                    failed: vec![],
                })
            }
        })
        .await;
        assert_eq!(
            out,
            vec![(
                1,
                EntryError::Transient("AWS reported no result for this entry".into())
            )]
        );
        assert_eq!(*calls.lock().unwrap(), 1);
    }

    #[test]
    fn pauses_grow_are_capped_and_jittered() {
        let p = Policy {
            attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(350),
        };
        for _ in 0..50 {
            let first = p.pause(0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = p.pause(2);
            assert!(third >= Duration::from_millis(175) && third <= Duration::from_millis(350));
            assert!(p.pause(40) <= Duration::from_millis(350));
        }
    }
}
