//! Messages that can never be handled are moved aside with a reason; good ones keep flowing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::envelope::attr;
use sourceflow::naming::Naming;
use sourceflow::{command, handler, State};

use crate::harness::{dlq_reason, eventually, Harness};

#[command(queue = "poison-inbox", name = "tests.Greeting.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Greeting {
    to: String,
    times: u32,
}

#[derive(Clone, Default)]
struct Count(Arc<AtomicU32>);

#[handler]
async fn greet(_cmd: Greeting, State(c): State<Count>) -> sourceflow::Result<()> {
    c.0.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dlq_while_good_ones_flow() {
    let h = Harness::new().await;
    let count = Count::default();
    let app = h
        .service("poison", module_path!())
        .state(count.clone())
        .start()
        .await
        .expect("start");
    let queue = app.queue_of::<Greeting>();
    let ty = "tests.Greeting.v1";

    for i in 0..10 {
        app.send(Greeting {
            to: format!("friend {i}"),
            times: 1,
        })
        .await
        .expect("send");
    }
    // 1. not JSON at all
    h.send_raw(&queue, "this is not json", &[(attr::TYPE, ty)], None)
        .await;
    // 2. no type attribute
    h.send_raw(
        &queue,
        r#"{"v":1,"type":"tests.Greeting.v1","id":"x","payload":{"to":"a","times":1}}"#,
        &[("other", "1")],
        None,
    )
    .await;
    // 3. a wire name nobody knows
    h.send_raw(
        &queue,
        r#"{"v":1,"type":"tests.Nope.v9","id":"y","payload":{}}"#,
        &[(attr::TYPE, "tests.Nope.v9")],
        None,
    )
    .await;
    // 4. a known type whose payload does not fit it
    h.send_raw(
        &queue,
        r#"{"v":1,"type":"tests.Greeting.v1","id":"z","payload":{"to":7}}"#,
        &[(attr::TYPE, ty)],
        None,
    )
    .await;
    // 5. an envelope version from the future
    h.send_raw(
        &queue,
        r#"{"v":99,"type":"tests.Greeting.v1","id":"w","payload":{"to":"a","times":1}}"#,
        &[(attr::TYPE, ty)],
        None,
    )
    .await;
    for i in 10..20 {
        app.send(Greeting {
            to: format!("friend {i}"),
            times: 1,
        })
        .await
        .expect("send");
    }

    eventually("all 20 good messages handled", || async {
        count.0.load(Ordering::SeqCst) == 20
    })
    .await;
    let dead = h.drain(&Naming::dead_letter(&queue), 5).await;
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|m| dlq_reason(m).unwrap_or("<no reason>").to_string())
        .collect();
    reasons.sort();
    assert_eq!(dead.len(), 5, "reasons: {reasons:#?}");
    let expect = [
        "undecodable message: body is not a sourceflow JSON envelope",
        "undecodable message: missing message attribute `sourceflow.type`",
        "unknown message type `tests.Nope.v9`",
        "payload does not decode as `tests.Greeting.v1`",
        "undecodable message: envelope version 99 is not supported",
    ];
    for e in expect {
        assert!(
            reasons.iter().any(|r| r.starts_with(e)),
            "no DLQ reason starting with {e:?} in {reasons:#?}"
        );
    }
    // The bodies are kept as they were.
    assert!(dead.iter().any(|m| &*m.body == "this is not json"));
    h.assert_empty(&queue, Duration::from_millis(200)).await;
    assert_eq!(count.0.load(Ordering::SeqCst), 20);
    app.shutdown().await.expect("shutdown");
}
