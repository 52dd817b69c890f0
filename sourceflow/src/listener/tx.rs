//! The stages of a message whose handlers take a transaction (see [`crate::tx`]):
//!
//! ```text
//! decode → due → route → decrypt → begin → claim in tx → invoke in tx → complete in tx → commit → dispatch
//! ```
//!
//! Everything up to the commit is one transaction on the idempotency store's database:
//! a crash, an error or a panic before it leaves no trace of the handlers' writes nor of
//! the claim. What a rolled-back attempt must still record (its failure counts; a dead
//! letter clears the record) is written by [`settle`](super::settle) after the rollback,
//! from [`Track::tx_claim`](super::stages::Track).

use super::disposition::{Ack, Disposition};
use super::stages::{Stage, Track};
use super::Listener;
use crate::dispatch::{self, Pending};
use crate::envelope::Incoming;
use crate::idempotency::sql::in_tx;
use crate::idempotency::{self, Claim, Release};
use crate::registry::HandlerRoute;
use crate::transport::ReceivedMessage;
use crate::tx::{SqlPool, TxSlot};

/// A claim made inside a transaction that did not commit.
#[derive(Debug, Clone)]
pub(crate) struct TxClaim {
    pub key: String,
    pub payload_hash: String,
}

impl Listener {
    /// Runs the transactional stages; `Ok` and `Err` both carry the disposition.
    pub(super) async fn transactional(
        &self,
        pool: &SqlPool,
        msg: &ReceivedMessage,
        env: Incoming,
        handlers: &[&'static HandlerRoute],
        track: &mut Track,
    ) -> Stage<Disposition> {
        let Some(idem) = self.idempotency.clone() else {
            // The startup check makes a transactional handler need the SQL store.
            return Err(self.infrastructure(msg, "no idempotency store for a transaction".into()));
        };
        let key = self.key_of(&idem, &env)?;
        let hash = idempotency::payload_hash(env.payload());
        let (tx, token) = self
            .claim_in_tx(pool, &idem, msg, &env, &key, &hash, track)
            .await?;
        track.tx_claim = Some(TxClaim {
            key: key.clone(),
            payload_hash: hash,
        });
        let ctx = self.invocation(self.context(msg, env));
        ctx.give_tx(tx);
        let ran = self.run_all(handlers, &ctx, track).await;
        // A handler that panicked with the transaction in hand dropped it: rolled back.
        let Some(mut tx) = ctx.take_tx() else {
            ran?;
            return Err(self.infrastructure(msg, "the transaction was lost by a handler".into()));
        };
        if let Err(d) = ran {
            rollback(tx, &key).await;
            return Err(d);
        }
        let outbox = ctx.take_outbox();
        let stored = (!outbox.is_empty()).then(|| dispatch::encode_outbox(&outbox));
        let ttl = idem.ttl_for(track.wire);
        match in_tx::complete(
            &mut tx,
            &key,
            &token,
            ttl,
            stored.as_deref(),
            self.visibility_timeout,
        )
        .await
        {
            Ok(true) => {}
            Ok(false) => {
                rollback(tx, &key).await;
                return Err(
                    self.infrastructure(msg, "the claim vanished inside its transaction".into())
                );
            }
            Err(e) => {
                rollback(tx, &key).await;
                return Err(self.infrastructure(msg, format!("completing the claim failed: {e}")));
            }
        }
        self.commit_tx(msg, tx, &key, outbox, track).await
    }

    /// Opens the transaction and claims the message in it. A duplicate of a completed
    /// message or a mismatch ends here (after rolling back); one in progress elsewhere is
    /// waited for, as on the usual path.
    #[allow(clippy::too_many_arguments)]
    async fn claim_in_tx(
        &self,
        pool: &SqlPool,
        idem: &idempotency::Settings,
        msg: &ReceivedMessage,
        env: &Incoming,
        key: &str,
        hash: &str,
        track: &mut Track,
    ) -> Stage<(TxSlot, String)> {
        let unavailable = |e: crate::Error| {
            self.infrastructure(
                msg,
                format!("idempotency store `{}` unavailable: {e}", idem.store.name()),
            )
        };
        let mut waits = 0u32;
        loop {
            let mut tx = in_tx::begin(pool).await.map_err(unavailable)?;
            let claimed = match in_tx::claim(&mut tx, key, hash, self.visibility_timeout).await {
                Ok(c) => c,
                Err(e) => {
                    rollback(tx, key).await;
                    return Err(unavailable(e));
                }
            };
            if waits == 0 || !matches!(claimed, Claim::InProgress { .. }) {
                idem.stats.record(&claimed);
            }
            match claimed {
                Claim::Acquired { token, attempt } => {
                    track.attempt = attempt;
                    return Ok((tx, token));
                }
                Claim::InProgress { lease_left } => {
                    rollback(tx, key).await;
                    if waits == 0 {
                        tracing::info!(queue = %self.queue, key, "duplicate of a message in progress elsewhere; waiting for it");
                    }
                    waits += 1;
                    self.wait_for_claim(waits, lease_left).await?;
                }
                other => {
                    rollback(tx, key).await;
                    return Err(self.not_claimed(other, key, env).await);
                }
            }
        }
    }

    /// Commits — the message's one commit — then dispatches what the handlers produced.
    /// A commit whose outcome is unknown (the connection broke) is retried as an
    /// infrastructure fault: the redelivery finds the record completed (a duplicate, whose
    /// stored messages it sends) or absent (a clean slate).
    async fn commit_tx(
        &self,
        msg: &ReceivedMessage,
        tx: TxSlot,
        key: &str,
        outbox: Vec<Pending>,
        track: &mut Track,
    ) -> Stage<Disposition> {
        crate::failpoints::pause(crate::failpoints::BEFORE_COMMIT).await;
        if let Err(e) = tx.commit().await {
            // Whatever happened, nothing is left to release.
            track.tx_claim = None;
            return Err(self.infrastructure(msg, format!("the commit failed: {e}")));
        }
        track.tx_claim = None;
        if outbox.is_empty() {
            return Ok(Disposition::Ack(Ack::Success));
        }
        Ok(self.dispatch_stored(key, outbox, Ack::Success).await)
    }

    /// After a rollback: records what the disposition says outside the transaction.
    pub(super) async fn release_rolled_back(&self, claim: &TxClaim, why: Release) {
        let Some(pool) = &self.tx_pool else {
            return;
        };
        if let Err(e) = in_tx::release_rolled_back(pool, &claim.key, &claim.payload_hash, why).await
        {
            tracing::warn!(key = %claim.key, error = %e, "could not record the rolled-back attempt; it is not counted");
        }
    }
}

/// Rolls back (a failure only means the connection is gone, which rolls back too).
async fn rollback(tx: TxSlot, key: &str) {
    if let Err(e) = tx.rollback().await {
        tracing::debug!(key, error = %e, "rollback failed; the database rolls the transaction back with the connection");
    }
}
