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
//! idempotency store fails; `degraded` when a dead-letter queue holds messages.

use std::sync::atomic::{AtomicU64, Ordering};
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

/// When a listener last polled its queue successfully.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    last_ok_millis: AtomicU64,
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Liveness {
    pub(crate) fn new() -> Arc<Self> {
        let l = Liveness::default();
        l.polled();
        Arc::new(l)
    }

    pub(crate) fn polled(&self) {
        self.last_ok_millis.store(now_millis(), Ordering::Relaxed);
    }

    /// Time since the last successful poll.
    pub(crate) fn age(&self) -> Duration {
        Duration::from_millis(
            now_millis().saturating_sub(self.last_ok_millis.load(Ordering::Relaxed)),
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
