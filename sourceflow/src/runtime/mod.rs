//! Starting a service: the [`Builder`] (`builder`), its configuration from the environment
//! (`config`), the startup plan and its checks (`plan`), and the [`Handle`] for code
//! outside handlers (`handle`).

mod builder;
pub(crate) mod config;
mod handle;
mod plan;

use std::time::Duration;

#[cfg(feature = "lambda")]
pub(crate) use builder::Assembled;
pub use builder::{builder, run, Builder};
pub use handle::{Handle, SendOptions};
pub use plan::{ListenerSummary, ServicePlan};

/// Default number of handler runs in flight per listener.
pub const DEFAULT_CONCURRENCY: usize = 10;
/// Default receives before a message goes to the dead-letter queue.
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 5;
/// Default visibility timeout of provisioned queues.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time in-flight handlers get to finish on shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default interval of queue depth sampling.
pub const DEFAULT_DEPTH_SAMPLE: Duration = Duration::from_secs(30);
/// Default long-poll wait of a receive.
pub const DEFAULT_RECEIVE_WAIT: Duration = Duration::from_secs(20);
/// Default time past one long poll that a listener may go without a poll (or, when busy,
/// a heartbeat) before health calls it stuck.
pub const DEFAULT_LIVENESS_SLACK: Duration = Duration::from_secs(30);
