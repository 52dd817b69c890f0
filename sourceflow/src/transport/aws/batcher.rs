//! Coalescing: one batch call for what concurrent callers hand in for the same queue or
//! topic.
//!
//! Each destination and operation has a worker task. A caller hands it a *job* (its
//! entries and a reply channel) and waits. The worker takes the first job, gathers more
//! for up to [`LINGER`] or until [`MAX_BATCH_ENTRIES`] entries wait, lays the entries of
//! all jobs end to end and flushes them (the flush splits them into batch calls by count
//! and bytes, see [`chunks`]). The flush reports failures by index into that combined
//! list; [`split`] hands each caller the failures that fall in its own range, re-indexed
//! to its own input. A caller never sees a neighbour's failure.
//!
//! The worker flushes one gathering at a time: what arrives meanwhile waits in the channel
//! and makes the next gathering fuller, which is what keeps requests per message low under
//! load. A worker holds only its SDK client and the destination's URL or ARN, never the
//! transport, so it ends when the transport (and with it every sender) is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::LINGER;
use crate::envelope::OutgoingMessage;
use crate::error::EntryError;
use crate::transport::{GroupHold, MAX_BATCH_ENTRIES};

/// The entries of a call that were not done: index among the entries given, and why.
pub(crate) type Failures = Vec<(usize, EntryError)>;

/// What a worker does with what it gathered.
#[async_trait]
pub(crate) trait Flush: Send + Sync + 'static {
    /// One entry (a message, a receipt, a receipt and its timeout).
    type Entry: Send + 'static;

    /// Does `entries`, however many, and reports the failed ones by index into `entries`.
    async fn flush(&self, entries: Vec<Self::Entry>) -> Failures;
}

struct Job<E> {
    entries: Vec<E>,
    reply: oneshot::Sender<Failures>,
}

/// The workers of one operation, by destination.
pub(crate) struct Batchers<F: Flush> {
    workers: parking_lot::Mutex<HashMap<String, mpsc::UnboundedSender<Job<F::Entry>>>>,
}

impl<F: Flush> Default for Batchers<F> {
    fn default() -> Self {
        Batchers {
            workers: parking_lot::Mutex::new(HashMap::new()),
        }
    }
}

impl<F: Flush> Batchers<F> {
    /// Hands `entries` to the worker of `destination` (started with `make` when there is
    /// none) and waits for the outcome of exactly these entries, indexed as given.
    pub(crate) async fn submit(
        &self,
        destination: &str,
        entries: Vec<F::Entry>,
        make: impl FnOnce() -> F,
    ) -> Failures {
        if entries.is_empty() {
            return Vec::new();
        }
        let total = entries.len();
        let (reply, outcome) = oneshot::channel();
        let mut job = Job { entries, reply };
        let mut make = Some(make);
        // Twice at most: a worker that ended (it panicked) is replaced once.
        for _ in 0..2 {
            let tx = {
                let mut workers = self.workers.lock();
                match workers.get(destination) {
                    Some(tx) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let Some(make) = make.take() else { break };
                        let (tx, rx) = mpsc::unbounded_channel();
                        tokio::spawn(worker(make(), rx));
                        workers.insert(destination.to_string(), tx.clone());
                        tx
                    }
                }
            };
            match tx.send(job) {
                Ok(()) => {
                    drop(tx);
                    return outcome
                        .await
                        .unwrap_or_else(|_| every(total, "the batcher stopped before answering"));
                }
                Err(mpsc::error::SendError(back)) => {
                    job = back;
                    self.workers.lock().remove(destination);
                }
            }
        }
        every(total, "the batcher is not running")
    }
}

/// `total` entries, all transient with `why`.
fn every(total: usize, why: &str) -> Failures {
    (0..total)
        .map(|i| (i, EntryError::Transient(why.to_string())))
        .collect()
}

/// Gathers jobs and flushes them, until every sender is gone. Lingering pays only under
/// load: after a gathering of a single job (idle), the next one goes at once with what is
/// already waiting, so an idle service adds no latency; once a gathering found company,
/// the next one lingers up to [`LINGER`] for more.
async fn worker<F: Flush>(flush: F, mut rx: mpsc::UnboundedReceiver<Job<F::Entry>>) {
    let mut busy = false;
    while let Some(first) = rx.recv().await {
        let mut count = first.entries.len();
        let mut jobs = vec![first];
        let linger = tokio::time::sleep(if busy { LINGER } else { Duration::ZERO });
        tokio::pin!(linger);
        while count < MAX_BATCH_ENTRIES {
            tokio::select! {
                biased;
                job = rx.recv() => match job {
                    Some(job) => {
                        count += job.entries.len();
                        jobs.push(job);
                    }
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        busy = jobs.len() > 1;
        let mut entries = Vec::with_capacity(count);
        let mut lens = Vec::with_capacity(jobs.len());
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            lens.push(job.entries.len());
            entries.extend(job.entries);
            replies.push(job.reply);
        }
        let failures = flush.flush(entries).await;
        for (reply, mine) in replies.into_iter().zip(split(failures, &lens)) {
            // A caller that gave up (its future was dropped) has nobody to tell.
            let _ = reply.send(mine);
        }
    }
}

/// Splits the failures of entries laid end to end into each caller's, re-indexed to the
/// caller's own entries; `lens` are the callers' entry counts, in the order laid.
pub(crate) fn split(mut failures: Failures, lens: &[usize]) -> Vec<Failures> {
    failures.sort_by_key(|(i, _)| *i);
    let mut out: Vec<Failures> = lens.iter().map(|_| Vec::new()).collect();
    let mut starts = Vec::with_capacity(lens.len());
    let mut start = 0;
    for len in lens {
        starts.push(start);
        start += len;
    }
    for (i, e) in failures {
        // The caller whose range holds `i`: the last one starting at or before it.
        let caller = starts.partition_point(|s| *s <= i).saturating_sub(1);
        if caller < lens.len() && i < starts[caller] + lens[caller] {
            out[caller].push((i - starts[caller], e));
        }
    }
    out
}

/// Maps failures indexed among a subset of a caller's entries back to the caller's own
/// indices: `positions[k]` is where the subset's entry `k` stood.
pub(crate) fn reindex(failures: Failures, positions: &[usize]) -> Failures {
    failures
        .into_iter()
        .filter_map(|(k, e)| positions.get(k).map(|i| (*i, e)))
        .collect()
}

/// Does `messages` in the batch calls [`chunks`] cuts (at most [`MAX_BATCH_ENTRIES`] and
/// `max_bytes` each), one call after the other, keeping each FIFO group's order through
/// failures: an entry whose group already has an entry not done is held back, not sent.
/// `call` does one batch call: it gets the indices (into `messages`) to carry and reports
/// the failed ones by the same indices.
pub(crate) async fn in_group_order<F, Fut>(
    messages: &[OutgoingMessage],
    max_bytes: usize,
    mut call: F,
) -> Failures
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: Future<Output = Failures>,
{
    let sizes: Vec<usize> = messages.iter().map(OutgoingMessage::size).collect();
    let mut hold = GroupHold::default();
    let mut failures = Vec::new();
    for range in chunks(&sizes, None, MAX_BATCH_ENTRIES, max_bytes) {
        let mut carry = Vec::with_capacity(range.len());
        for i in range {
            match hold.check(&messages[i]) {
                Some(held) => failures.push((i, held)),
                None => carry.push(i),
            }
        }
        if carry.is_empty() {
            continue;
        }
        let done = call(carry).await;
        for (i, _) in &done {
            hold.stop(&messages[*i]);
        }
        failures.extend(done);
    }
    failures.sort_by_key(|(i, _)| *i);
    failures
}

/// Splits entries into batch calls: at most `max_entries` and at most `max_bytes` in total
/// each, never two entries with the same key (a receipt) in one call, order kept. An entry
/// larger than `max_bytes` gets a call of its own (and is refused there; callers check
/// sizes first).
pub(crate) fn chunks(
    sizes: &[usize],
    keys: Option<&[&str]>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, size) in sizes.iter().enumerate() {
        let full = i - start >= max_entries || (i > start && bytes + size > max_bytes);
        let repeated = keys.is_some_and(|k| k[start..i].contains(&k[i]));
        if full || repeated {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn t(why: &str) -> EntryError {
        EntryError::Transient(why.into())
    }

    fn grouped(group: Option<&str>, i: usize) -> OutgoingMessage {
        OutgoingMessage {
            body: i.to_string().into(),
            attributes: Vec::new().into(),
            group_id: group.map(str::to_string),
            dedup_id: None,
            delay: None,
            wire_name: "t".into(),
            message_id: i.to_string(),
        }
    }

    #[tokio::test]
    async fn a_failed_call_holds_back_the_later_messages_of_its_groups() {
        // 25 messages of groups a, b and none, in calls 0..10, 10..20, 20..25; the first
        // call fails message 3 (group a) and the second fails as a whole.
        let group = |i: usize| match i % 3 {
            0 => Some("a"),
            1 => Some("b"),
            _ => None,
        };
        let messages: Vec<_> = (0..25).map(|i| grouped(group(i), i)).collect();
        let mut calls = Vec::new();
        let failures = in_group_order(&messages, usize::MAX, |carry| {
            calls.push(carry.clone());
            let failed: Failures = match calls.len() {
                1 => vec![(3, t("a fault"))],
                2 => carry.iter().map(|i| (*i, t("down"))).collect(),
                _ => Vec::new(),
            };
            async move { failed }
        })
        .await;
        let a_after_3 = |i: usize| i > 3 && group(i) == Some("a");
        let second: Vec<usize> = (10..20).filter(|i| !a_after_3(*i)).collect();
        let third: Vec<usize> = (20..25).filter(|i| group(*i).is_none()).collect();
        assert_eq!(
            calls,
            vec![(0..10).collect(), second.clone(), third.clone()]
        );
        // Failed: 3; held: a's in the later calls (6 and 9 went in the same call as 3);
        // 10..20 (down) and what they hold back of b.
        let mut want: Vec<usize> = (0..25)
            .filter(|i| *i == 3 || (a_after_3(*i) && *i >= 10) || (10..20).contains(i))
            .chain((20..25).filter(|i| group(*i) == Some("b")))
            .collect();
        want.sort_unstable();
        want.dedup();
        let got: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
        assert_eq!(got, want);
        let held = failures
            .iter()
            .filter(|(_, e)| matches!(e, EntryError::Transient(w) if w.contains("held back")))
            .count();
        assert!(held > 0, "{failures:?}");
    }

    #[test]
    fn split_hands_each_caller_its_own_failures_reindexed() {
        // Callers of 3, 2 and 4 entries: combined indices 0-2, 3-4, 5-8.
        let failures = vec![(6, t("c")), (1, t("a")), (8, t("d")), (3, t("b"))];
        let out = split(failures, &[3, 2, 4]);
        assert_eq!(out[0], vec![(1, t("a"))]);
        assert_eq!(out[1], vec![(0, t("b"))]);
        assert_eq!(out[2], vec![(1, t("c")), (3, t("d"))]);
        // An empty caller in the middle gets nothing, and its neighbours stay right.
        let out = split(vec![(2, t("x"))], &[2, 0, 1]);
        assert_eq!(out, vec![vec![], vec![], vec![(0, t("x"))]]);
        // An index past every range is dropped rather than given to someone.
        assert_eq!(split(vec![(9, t("x"))], &[1, 1]), vec![vec![], vec![]]);
    }

    #[test]
    fn reindex_maps_a_subset_back_to_the_callers_positions() {
        // The caller gave 5 entries; 0 and 3 were refused before the wire, so 1, 2, 4
        // were sent as 0, 1, 2.
        let out = reindex(vec![(0, t("a")), (2, t("b"))], &[1, 2, 4]);
        assert_eq!(out, vec![(1, t("a")), (4, t("b"))]);
    }

    #[test]
    fn chunks_respect_count_bytes_and_distinct_keys() {
        let kib = 1024;
        // 10 × 200 KiB under a 1 MiB limit: 5 and 5 (5 × 200 = 1000 KiB fits).
        let sizes = vec![200 * kib; 10];
        assert_eq!(chunks(&sizes, None, 10, 1024 * kib), vec![0..5, 5..10]);
        // 25 small: 10, 10, 5.
        assert_eq!(
            chunks(&[1; 25], None, 10, 1024 * kib),
            vec![0..10, 10..20, 20..25]
        );
        // Exactly at the limit fits; one byte over starts a new call.
        assert_eq!(chunks(&[512, 512], None, 10, 1024), vec![0..2]);
        assert_eq!(chunks(&[512, 513], None, 10, 1024), vec![0..1, 1..2]);
        // An oversize entry stands alone.
        assert_eq!(
            chunks(&[10, 2000, 10], None, 10, 1024),
            vec![0..1, 1..2, 2..3]
        );
        // The same receipt twice never shares a call, order kept.
        let keys = ["a", "b", "a", "c"];
        assert_eq!(chunks(&[1; 4], Some(&keys), 10, 1024), vec![0..2, 2..4]);
        assert!(chunks(&[], None, 10, 1024).is_empty());
    }

    /// Fails the entries whose value is odd, and records the sizes of its flushes.
    struct OddFails(Arc<parking_lot::Mutex<Vec<usize>>>);

    #[async_trait]
    impl Flush for OddFails {
        type Entry = u32;
        async fn flush(&self, entries: Vec<u32>) -> Failures {
            self.0.lock().push(entries.len());
            entries
                .iter()
                .enumerate()
                .filter(|(_, v)| *v % 2 == 1)
                .map(|(i, v)| (i, t(&v.to_string())))
                .collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_caller_goes_at_once_and_company_makes_the_next_gathering_linger() {
        let flushes = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let batchers: Arc<Batchers<OddFails>> = Arc::new(Batchers::default());
        let mk = || {
            let f = flushes.clone();
            move || OddFails(f)
        };
        let start = tokio::time::Instant::now();
        batchers.submit("q", vec![2], mk()).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "idle: no linger");
        // Two callers at once (both waiting when the worker looks): one flush, and the
        // worker is busy now, so a caller right after waits for company.
        let (a, b) = tokio::join!(
            batchers.submit("q", vec![4], mk()),
            batchers.submit("q", vec![6], mk())
        );
        assert_eq!((a, b), (vec![], vec![]));
        let start = tokio::time::Instant::now();
        batchers.submit("q", vec![8], mk()).await;
        assert_eq!(start.elapsed(), LINGER, "under load: lingers for company");
        assert_eq!(*flushes.lock(), vec![1, 2, 1]);
        // That gathering was alone again: the next caller goes at once.
        let start = tokio::time::Instant::now();
        batchers.submit("q", vec![10], mk()).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn concurrent_callers_share_a_flush_and_get_only_their_own_results() {
        let flushes = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let batchers: Arc<Batchers<OddFails>> = Arc::new(Batchers::default());
        let mk = |f: &Arc<parking_lot::Mutex<Vec<usize>>>| {
            let f = f.clone();
            move || OddFails(f)
        };
        let (a, b, c) = tokio::join!(
            batchers.submit("q", vec![2, 4, 6], mk(&flushes)),
            batchers.submit("q", vec![8, 1, 10], mk(&flushes)),
            batchers.submit("q", vec![3], mk(&flushes)),
        );
        assert_eq!(a, vec![], "the first caller's entries all succeeded");
        assert_eq!(
            b,
            vec![(1, t("1"))],
            "index 1 of the second caller's own input"
        );
        assert_eq!(c, vec![(0, t("3"))]);
        assert_eq!(*flushes.lock(), vec![7], "one flush for the three callers");
    }
}
