//! Health: a structured report of everything a running service depends on, and (with the
//! `health-http` feature) an HTTP endpoint serving it for load balancers and Kubernetes.
//!
//! ```json
//! {"status":"degraded","service":"orders","transport":"aws","checks":[
//!   {"name":"transport","status":"healthy","detail":"8 queues, 2 topics, 2 subscriptions present"},
//!   {"name":"listener orders.fifo","status":"healthy","detail":"last successful poll 0.4 s ago"},
//!   {"name":"dead-letter queue orders-dlq.fifo","status":"degraded","detail":"3 messages waiting"},
//!   {"name":"idempotency store memory","status":"healthy","detail":"120 records"}]}
//! ```
//!
//! The overall status is the worst of the checks: `unhealthy` when the broker is unreachable
//! or a resource is missing, a listener has not polled successfully within its bound, or the
//! idempotency store fails; `degraded` when a dead-letter queue holds messages. A listener
//! whose handler slots are all taken by long handlers is healthy while their heartbeat runs:
//! busy is not dead.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How healthy something is; ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Working.
    Healthy,
    /// Working, but something needs attention (e.g. messages in a dead-letter queue).
    Degraded,
    /// Not working.
    Unhealthy,
}

/// One check of a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// What was checked (`transport`, `listener orders.fifo`, …).
    pub name: String,
    /// Its status.
    pub status: Status,
    /// What was found, for a person.
    pub detail: String,
}

/// The health of a running service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// The worst status of the checks.
    pub status: Status,
    /// The service name.
    pub service: String,
    /// The transport name.
    pub transport: String,
    /// Every check.
    pub checks: Vec<HealthCheck>,
}

impl HealthReport {
    pub(crate) fn new(service: &str, transport: &str, checks: Vec<HealthCheck>) -> Self {
        HealthReport {
            status: checks
                .iter()
                .map(|c| c.status)
                .max()
                .unwrap_or(Status::Healthy),
            service: service.to_string(),
            transport: transport.to_string(),
            checks,
        }
    }

    /// The check with this name.
    pub fn check(&self, name: &str) -> Option<&HealthCheck> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// Whether a listener's loop is alive: it polls, or all its handler slots are taken by
/// handlers whose heartbeat runs.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    last_poll_millis: AtomicU64,
    last_beat_millis: AtomicU64,
    /// Pollers waiting for a free handler slot.
    waiting: AtomicUsize,
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn age(millis: &AtomicU64) -> Duration {
    Duration::from_millis(now_millis().saturating_sub(millis.load(Ordering::Relaxed)))
}

impl Liveness {
    pub(crate) fn new() -> Arc<Self> {
        let l = Liveness::default();
        l.polled();
        l.beat();
        Arc::new(l)
    }

    /// A receive returned (messages or not).
    pub(crate) fn polled(&self) {
        self.last_poll_millis.store(now_millis(), Ordering::Relaxed);
    }

    /// The heartbeat ran while handlers held messages.
    pub(crate) fn beat(&self) {
        self.last_beat_millis.store(now_millis(), Ordering::Relaxed);
    }

    /// A poller starts (`true`) or stops (`false`) waiting for a free handler slot. Getting
    /// one is progress of the loop, like a poll: the receive it starts next is judged from
    /// here, not from the poll before the wait.
    pub(crate) fn waiting_for_slot(&self, waiting: bool) {
        if waiting {
            self.beat();
            self.waiting.fetch_add(1, Ordering::Relaxed);
        } else {
            self.polled();
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Healthy when a poll returned within `bound`, or when every slot is taken by
    /// handlers and the heartbeat beat within `bound`; with a line saying which.
    pub(crate) fn judge(&self, bound: Duration) -> (Status, String) {
        let poll = age(&self.last_poll_millis);
        if poll <= bound {
            return (
                Status::Healthy,
                format!("last successful poll {:.1} s ago", poll.as_secs_f64()),
            );
        }
        let beat = age(&self.last_beat_millis);
        if self.waiting.load(Ordering::Relaxed) > 0 && beat <= bound {
            return (
                Status::Healthy,
                format!(
                    "busy: every handler slot is taken; heartbeat {:.1} s ago",
                    beat.as_secs_f64()
                ),
            );
        }
        (
            Status::Unhealthy,
            format!("no successful poll for {:.1} s", poll.as_secs_f64()),
        )
    }
}

/// Serves the health report over HTTP: `GET /health` (the report; 200, or 503 when
/// unhealthy), `GET /health/ready` (same status code, no body), `GET /health/live` (200 while
/// the process runs).
#[cfg(feature = "health-http")]
pub fn router(handle: crate::Handle) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;

    fn code(s: Status) -> StatusCode {
        match s {
            Status::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::OK,
        }
    }
    let h1 = handle.clone();
    axum::Router::new()
        .route(
            "/health",
            get(move || {
                let h = h1.clone();
                async move {
                    let report = h.health().await;
                    (code(report.status), axum::Json(report))
                }
            }),
        )
        .route(
            "/health/ready",
            get(move || {
                let h = handle.clone();
                async move { code(h.health().await.status) }
            }),
        )
        .route("/health/live", get(|| async { StatusCode::OK }))
}

/// Binds `addr` and serves [`router`] until the handle shuts down.
#[cfg(feature = "health-http")]
pub async fn serve(handle: crate::Handle, addr: std::net::SocketAddr) -> crate::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        crate::Error::Config(format!("cannot bind the health endpoint to {addr}: {e}"))
    })?;
    tracing::info!(%addr, "health endpoint listening on /health, /health/ready, /health/live");
    let stopped = handle.clone();
    axum::serve(listener, router(handle))
        .with_graceful_shutdown(async move { stopped.stopped().await })
        .await
        .map_err(|e| crate::Error::Other(Box::new(e)))
}
