//! Size limits give a clear error and send nothing; delays hold delivery back (delays past
//! the broker's limit: `delays.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sourceflow::{command, event, handler, Error, SendOptions, State};

use crate::harness::{eventually, Harness};

#[command(queue = "size-uploads", name = "tests.Upload.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Upload {
    data: String,
}

#[event(topic = "size-events", name = "tests.Uploaded.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Uploaded {
    data: String,
}

#[command(queue = "size-ordered.fifo")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ordered {
    #[entity_id]
    id: u32,
}

#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<(usize, Instant)>>>);

#[handler]
async fn upload(cmd: Upload, State(a): State<Arrivals>) -> sourceflow::Result<()> {
    a.0.lock()
        .expect("lock")
        .push((cmd.data.len(), Instant::now()));
    Ok(())
}

#[handler]
async fn ordered(_cmd: Ordered) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_are_rejected_with_a_clear_error() {
    let h = Harness::new().await;
    let arrivals = Arrivals::default();
    let app = h
        .service("size", module_path!())
        .state(arrivals.clone())
        .start()
        .await
        .expect("start");

    let err = app
        .send(Upload {
            data: "x".repeat(1024 * 1024 + 1),
        })
        .await
        .expect_err("over 1 MiB");
    match &err {
        Error::MessageTooLarge {
            wire_name,
            size,
            limit,
            ..
        } => {
            assert_eq!(wire_name, "tests.Upload.v1");
            assert!(*size > 1024 * 1024);
            assert_eq!(*limit, 1024 * 1024);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("tests.Upload.v1") && text.contains("1048576"),
        "{text}"
    );

    let err = app
        .raise(Uploaded {
            data: "x".repeat(256 * 1024),
        })
        .await
        .expect_err("over 256 KiB");
    assert!(
        matches!(err, Error::MessageTooLarge { limit: 262_144, .. }),
        "{err:?}"
    );

    // A large message under the limit goes through whole.
    app.send(Upload {
        data: "y".repeat(200 * 1024),
    })
    .await
    .expect("200 KiB");
    eventually("the large upload", || async {
        !arrivals.0.lock().expect("lock").is_empty()
    })
    .await;
    assert_eq!(arrivals.0.lock().expect("lock")[0].0, 200 * 1024);
    h.assert_empty(&app.queue_of::<Upload>(), Duration::from_millis(300))
        .await;
    app.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_arrive_after_their_delay() {
    let h = Harness::new().await;
    let arrivals = Arrivals::default();
    let app = h
        .service("delay", module_path!())
        .state(arrivals.clone())
        .start()
        .await
        .expect("start");
    let sent = Instant::now();
    app.send_with(
        Upload {
            data: "later".into(),
        },
        SendOptions::new().delay(Duration::from_secs(2)),
    )
    .await
    .expect("send");
    eventually("the delayed upload", || async {
        !arrivals.0.lock().expect("lock").is_empty()
    })
    .await;
    let at = arrivals.0.lock().expect("lock")[0].1;
    assert!(
        at.duration_since(sent) >= Duration::from_millis(1900),
        "delivered after {:?}",
        at.duration_since(sent)
    );

    let err = app
        .send_with(
            Ordered { id: 1 },
            SendOptions::new().delay(Duration::from_secs(1)),
        )
        .await
        .expect_err("FIFO queues take no per-message delay");
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");

    // Beyond SQS's 15 minutes, and events: accepted and held back until due
    // (tests/behaviour/delays.rs).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        arrivals.0.lock().expect("lock").len(),
        1,
        "nothing refused was delivered"
    );
    app.shutdown().await.expect("shutdown");
}
