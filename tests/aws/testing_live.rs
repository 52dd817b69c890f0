//! The test harness against the AWS API (`TestApp::start_live`): the same calls as on the
//! embedded broker, settled by the harness's own account of what it saw go out.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sourceflow::testing::TestApp;
use sourceflow::{command, event, handler, Context, Reject, RetryPolicy};

use crate::{enabled, prefix};

#[command(queue = "live-harness-ping", name = "livetest.Ping.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping {
    pub id: u32,
}

#[event(topic = "live-harness-pong", name = "livetest.Pong.v1")]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pong {
    pub id: u32,
}

#[handler]
async fn ping(cmd: Ping, ctx: &Context) -> sourceflow::Result<()> {
    if cmd.id == 0 {
        return Err(Reject::new("ping 0 is refused").into());
    }
    ctx.raise(Pong { id: cmd.id }).await
}

#[handler]
async fn pong(_evt: Pong) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_runs_the_same_test_live() {
    if !enabled() {
        return;
    }
    let builder = sourceflow::builder()
        .service("live-harness")
        .prefix(prefix())
        .handlers(|h| h.module_path == module_path!())
        .retry(RetryPolicy::exponential(
            Duration::from_millis(100),
            Duration::from_secs(1),
        ))
        .receive_wait(Duration::from_secs(1));
    let app = TestApp::start_live(builder)
        .await
        .expect("start")
        .timeout(Duration::from_secs(60));
    app.send(Ping { id: 1 }).await.expect("settles");
    assert_eq!(app.raised::<Pong>().assert_one().id, 1);
    app.send(Ping { id: 0 }).await.expect("settles");
    let dead = app.dead_lettered_of::<Ping>().assert_one();
    assert!(
        dead.reason.ends_with("ping 0 is refused"),
        "{}",
        dead.reason
    );
    app.shutdown().await.expect("shutdown");
}
