//! Checks every durable idempotency store must pass, shared by the SQL and DynamoDB tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use sourceflow::idempotency::{
    purge_expired_in_batches, spawn_cleanup, Claim, Cleanup, IdempotencyStore, Release, DEFAULT_TTL,
};

pub const LEASE: Duration = Duration::from_secs(30);

/// Completes `done` (with an outbox a failed dispatch left: its dispatch lease ended) and
/// leaves `busy` in progress; returns the in-progress token.
pub async fn completed_and_in_progress(store: &dyn IdempotencyStore) -> String {
    let Claim::Acquired { token, .. } = store.claim("done", "h", LEASE).await.expect("claim")
    else {
        panic!("claim done");
    };
    assert!(store
        .complete("done", &token, DEFAULT_TTL, Some("[\"out\"]"))
        .await
        .expect("complete"));
    store
        .set_outbox("done", Some("[\"out\"]"))
        .await
        .expect("the dispatch failed");
    let Claim::Acquired { token, .. } = store.claim("busy", "h", LEASE).await.expect("claim")
    else {
        panic!("claim busy");
    };
    token
}

/// After a restart, the completed key is still completed (its outbox kept), and the
/// in-progress claim still belongs to its token.
pub async fn assert_after_restart(store: &dyn IdempotencyStore, in_progress: String) {
    assert_eq!(
        store.claim("done", "h", LEASE).await.expect("claim"),
        Claim::Completed {
            undispatched: Some("[\"out\"]".into())
        },
        "a completed key is not processed again after a restart"
    );
    assert!(matches!(
        store.claim("busy", "h", LEASE).await.expect("claim"),
        Claim::InProgress { .. }
    ));
    assert!(store
        .complete("busy", &in_progress, DEFAULT_TTL, None)
        .await
        .expect("complete"));
    if store.size_is_exact() {
        assert_eq!(store.size().await.expect("size"), 2);
    }
}

/// 2,500 expired rows are purged in 3 batches of at most 1,000; live records stay; the
/// spawned cleanup task purges rows that expire later. `insert_expired(from, to)` writes the
/// records `expired:{from..=to}`, alternately completions that expired long ago and claims
/// abandoned long ago (in progress with a token, lease over since 1970); `count` counts the
/// records exactly.
pub async fn cleans_up_in_batches<S, F, Fut, C, CFut>(store: Arc<S>, insert_expired: F, count: C)
where
    S: IdempotencyStore,
    F: Fn(i64, i64) -> Fut,
    Fut: std::future::Future<Output = ()>,
    C: Fn() -> CFut,
    CFut: std::future::Future<Output = u64>,
{
    // Live records: 10 completed, 5 in progress: one with a lease that ran out a moment ago
    // (not abandoned for an hour: a claim takes it over and counts its attempt), one
    // released after a failed attempt, three live.
    for i in 0..10 {
        let key = format!("live:{i}");
        let Claim::Acquired { token, .. } = store.claim(&key, "h", LEASE).await.expect("claim")
        else {
            panic!("claim {key}");
        };
        assert!(store
            .complete(&key, &token, DEFAULT_TTL, None)
            .await
            .expect("complete"));
    }
    for i in 0..5 {
        // Live leases outlast the test (inserting and purging thousands of items on the
        // emulator takes a while).
        let lease = if i == 0 {
            Duration::from_millis(1)
        } else {
            Duration::from_secs(600)
        };
        let key = format!("busy:{i}");
        let Claim::Acquired { token, .. } = store.claim(&key, "h", lease).await.expect("claim")
        else {
            panic!("claim {key}");
        };
        if i == 1 {
            store
                .release(&key, &token, Release::Failed)
                .await
                .expect("release");
        }
    }
    insert_expired(1, 2_500).await;
    assert_eq!(count().await, 2_515);

    let done = purge_expired_in_batches(&*store, 1_000)
        .await
        .expect("purge");
    assert_eq!(
        done,
        Cleanup {
            purged: 2_500,
            batches: 3
        }
    );
    assert_eq!(count().await, 15, "live records stay");
    assert_eq!(
        store.claim("live:3", "h", LEASE).await.expect("claim"),
        Claim::Completed { undispatched: None }
    );
    for (key, why) in [
        (
            "busy:0",
            "the lately expired lease stayed, and its worker's attempt counts",
        ),
        (
            "busy:1",
            "the released claim stayed, with its failed attempt",
        ),
    ] {
        assert!(
            matches!(
                store.claim(key, "h", LEASE).await.expect("claim"),
                Claim::Acquired { attempt: 2, .. }
            ),
            "{key}: {why}"
        );
    }
    assert!(matches!(
        store.claim("busy:2", "h", LEASE).await.expect("claim"),
        Claim::InProgress { .. }
    ));

    // The periodic task purges what expires later, in batches too.
    insert_expired(2_501, 4_000).await;
    let task = spawn_cleanup(store.clone(), Duration::from_millis(100), 1_000);
    // 60 s: on moto, serialised and sharing two loaded cores with the other tests, 1,500
    // deletions and the counting scans took longer than 20 s; a task that does not purge
    // still fails here.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = count().await;
        if left == 15 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cleanup task did not purge the expired rows: {left} rows left, 15 expected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
}

/// Four stores on one database race 20 claims for each of 25 keys: exactly one claim per
/// key is acquired, every other one sees it in progress. The same holds when the keys exist
/// as a dead worker's claim (expired lease), a claim released after a failed or a returned
/// attempt, or an expired completion (the race is then over the takeover), and the winner's
/// attempt counts the dead worker and the failure exactly once, and the return not at all.
pub async fn one_winner_per_key(stores: Vec<Arc<dyn IdempotencyStore>>) {
    const KEYS: usize = 25;
    const CLAIMS: usize = 20;
    let race = |prefix: &'static str, expected_attempt: u32| {
        let stores = stores.clone();
        async move {
            let mut tasks = Vec::new();
            for k in 0..KEYS {
                for c in 0..CLAIMS {
                    let store = stores[(k + c) % stores.len()].clone();
                    let key = format!("{prefix}:{k}");
                    tasks.push(tokio::spawn(async move {
                        let claim = store.claim(&key, "h", LEASE).await.expect("claim");
                        (k, claim)
                    }));
                }
            }
            let mut won = [0usize; KEYS];
            for t in tasks {
                match t.await.expect("task") {
                    (k, Claim::Acquired { attempt, .. }) => {
                        won[k] += 1;
                        assert_eq!(attempt, expected_attempt, "{prefix}:{k}: the attempt");
                    }
                    (_, Claim::InProgress { .. }) => {}
                    (k, other) => panic!("{prefix}:{k}: unexpected {other:?}"),
                }
            }
            assert_eq!(won, [1; KEYS], "{prefix}: exactly one claim per key wins");
        }
    };
    race("new", 1).await;

    // Dead workers' claims, released claims and expired completions, taken over by a race.
    let short = Duration::from_millis(1);
    for k in 0..KEYS {
        for prefix in ["crashed", "failed", "returned", "expired"] {
            let key = format!("{prefix}:{k}");
            let lease = if prefix == "crashed" { short } else { LEASE };
            let Claim::Acquired { token, .. } =
                stores[0].claim(&key, "h", lease).await.expect("claim")
            else {
                panic!("claim {key}");
            };
            match prefix {
                "failed" => stores[0].release(&key, &token, Release::Failed).await,
                "returned" => stores[0].release(&key, &token, Release::Returned).await,
                "expired" => stores[0]
                    .complete(&key, &token, short, None)
                    .await
                    .map(|done| assert!(done, "complete {key}")),
                _ => Ok(()),
            }
            .expect("settle the first claim");
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    race("crashed", 2).await;
    race("failed", 2).await;
    race("returned", 1).await;
    race("expired", 1).await;
}
