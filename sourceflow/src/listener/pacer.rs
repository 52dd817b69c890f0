//! Receive pacing: under load, a short pause before the next receive so that it returns a
//! fuller batch — on AWS a receive costs one request however many messages it returns.
//!
//! SQS answers a receive as soon as anything is there, so pollers that receive again at
//! once each take the one or two messages that arrived meanwhile. After a receive that
//! came back *at once* (within [`AT_ONCE`]: the messages were waiting) with a partial
//! batch, the listener is *paced*: its pollers receive one at a time (a receive still out
//! after the linger, a long poll on a queue that ran dry, holds nobody back), each after a pause
//! of about the time the rest of a batch takes to arrive at the rate just seen, never
//! longer than the listener's linger (the builder's `receive_linger`, by default the
//! transport's: zero on the embedded broker, where a receive costs nothing). A full batch
//! (a backlog: all pollers receive at once again), an empty receive or one that had to
//! wait (light load) ends the pacing, so an idle or lightly loaded service sees no added
//! latency.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A receive answered within this long found messages waiting.
pub(crate) const AT_ONCE: Duration = Duration::from_millis(50);

/// The pacing of one listener's pollers.
pub(crate) struct Pacer {
    max_linger: Duration,
    state: Mutex<State>,
    /// While paced, the one receive in flight holds it.
    turn: std::sync::Arc<Semaphore>,
}

struct State {
    paced: bool,
    /// When the last receive of any poller returned.
    last_return: Instant,
    /// No poller receives before this.
    quiet_until: Instant,
}

impl Pacer {
    pub(crate) fn new(max_linger: Duration) -> Self {
        let now = Instant::now();
        Pacer {
            max_linger,
            state: Mutex::new(State {
                paced: false,
                last_return: now,
                quiet_until: now,
            }),
            turn: std::sync::Arc::new(Semaphore::new(1)),
        }
    }

    /// Waits for this poller's turn to receive: at once unless paced; while paced, after
    /// the other receive in flight (at most the linger: a receive still out by then is a
    /// long poll on a queue that ran dry, which must not hold the others back — an
    /// emulator may not wake it when messages come back) and the pause. Keep what it
    /// returns until the receive is done.
    pub(crate) async fn wait(&self) -> Option<OwnedSemaphorePermit> {
        if self.max_linger.is_zero() || !self.state.lock().paced {
            return None;
        }
        let turn = tokio::time::timeout(self.max_linger, self.turn.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let until = self.state.lock().quiet_until;
        if until > Instant::now() {
            tokio::time::sleep_until(until).await;
        }
        turn
    }

    /// Notes a receive that asked for `asked`, got `got` and took `took`.
    pub(crate) fn received(&self, asked: usize, got: usize, took: Duration) {
        if self.max_linger.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut st = self.state.lock();
        let window = now.saturating_duration_since(st.last_return);
        st.last_return = now;
        let pause = linger(asked, got, took, window, self.max_linger);
        st.paced = !pause.is_zero();
        if st.paced {
            st.quiet_until = st.quiet_until.max(now + pause);
        }
    }
}

/// The pause after a receive of `got` of `asked` that took `took`, `window` after the one
/// before it: the time the rest of a batch takes at the rate `got / window`, at most `max`.
fn linger(asked: usize, got: usize, took: Duration, window: Duration, max: Duration) -> Duration {
    if got == 0 || got >= asked || took > AT_ONCE {
        return Duration::ZERO;
    }
    let missing = (asked - got) as f64;
    window.mul_f64(missing / got as f64).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_millis(50);

    #[test]
    fn a_partial_batch_found_waiting_pauses_for_the_rest_of_a_batch() {
        // 2 of 10 in 10 ms: 8 more take about 40 ms at that rate.
        assert_eq!(linger(10, 2, 5 * MS, 10 * MS, MAX), 40 * MS);
        // 5 of 10 in 2 ms: 2 ms.
        assert_eq!(linger(10, 5, MS, 2 * MS, MAX), 2 * MS);
        // Capped: one message after a long gap.
        assert_eq!(linger(10, 1, MS, Duration::from_secs(3), MAX), MAX);
    }

    #[test]
    fn a_full_an_empty_or_a_waiting_receive_pauses_nothing() {
        assert_eq!(linger(10, 10, MS, 10 * MS, MAX), Duration::ZERO);
        assert_eq!(linger(10, 0, MS, 10 * MS, MAX), Duration::ZERO);
        assert_eq!(linger(10, 1, AT_ONCE + MS, 10 * MS, MAX), Duration::ZERO);
        assert_eq!(linger(10, 1, MS, 10 * MS, Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn paced_pollers_take_turns_after_the_pause() {
        let p = std::sync::Arc::new(Pacer::new(MAX));
        assert!(p.wait().await.is_none(), "not paced before a partial batch");
        tokio::time::advance(10 * MS).await;
        p.received(10, 2, MS);
        let start = Instant::now();
        let turn = p.wait().await;
        assert!(turn.is_some());
        assert_eq!(start.elapsed(), 40 * MS);
        // A second poller waits for the first one's receive...
        let second = tokio::spawn({
            let p = p.clone();
            async move { p.wait().await.is_some() }
        });
        tokio::time::advance(10 * MS).await;
        assert!(!second.is_finished(), "one receive at a time while paced");
        drop(turn);
        assert!(second.await.expect("second poller"), "it took the turn");
        // ...but not for a receive still out after the linger (a long poll).
        let held = p.wait().await;
        assert!(held.is_some());
        let third = tokio::spawn({
            let p = p.clone();
            async move { p.wait().await.is_some() }
        });
        tokio::time::advance(MAX + MS).await;
        assert!(!third.await.expect("third poller"), "went without the turn");
        // A receive that had to wait ends the pacing.
        p.received(10, 1, Duration::from_secs(1));
        drop(held);
        assert!(p.wait().await.is_none(), "pacing ended");
    }
}
