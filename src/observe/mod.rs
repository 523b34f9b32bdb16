//! What the agent shows about itself: Prometheus metrics and the health
//! endpoints (`/healthz` live, `/readyz` ready with the mode and why not,
//! `/metrics`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Labels of the start counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartLabels {
    /// `started`, `adopted` or `failed`.
    pub result: String,
    /// Waiting reason of a failure, else empty.
    pub reason: String,
}

/// Labels of the CRI phase histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `image`, `create` or `start`.
    pub phase: String,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// Start attempts by result.
    pub starts: Family<StartLabels, Counter>,
    /// Seconds from the agent first seeing a container to it running.
    pub seen_to_running: Histogram,
    /// Seconds per start phase.
    pub phases: Family<PhaseLabels, Histogram>,
    /// Reconcile passes.
    pub reconciles: Counter,
    /// Reconcile passes that failed (runtime or API unreachable).
    pub reconcile_errors: Counter,
    /// Status writes accepted by the API server.
    pub status_patches: Counter,
    /// 1 while the agent starts containers, 0 while it only observes.
    pub starting: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ephemerald");
        let starts = Family::<StartLabels, Counter>::default();
        let seen_to_running = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let phases = Family::<PhaseLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let status_patches = Counter::default();
        let starting = Gauge::default();
        registry.register(
            "container_starts",
            "Ephemeral container start attempts",
            starts.clone(),
        );
        registry.register(
            "seen_to_running_seconds",
            "Time from the agent seeing an ephemeral container to it running",
            seen_to_running.clone(),
        );
        registry.register(
            "start_phase_seconds",
            "Time per start phase",
            phases.clone(),
        );
        registry.register("reconciles", "Reconcile passes", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes",
            reconcile_errors.clone(),
        );
        registry.register(
            "status_patches",
            "Accepted status writes",
            status_patches.clone(),
        );
        registry.register(
            "starting",
            "1 when the agent starts containers, 0 when it observes",
            starting.clone(),
        );
        Metrics {
            registry,
            starts,
            seen_to_running,
            phases,
            reconciles,
            reconcile_errors,
            status_patches,
            starting,
        }
    }
}

impl Metrics {
    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Readiness, as the agent knows it.
#[derive(Debug, Clone)]
pub struct Health {
    /// The first list of pods arrived.
    pub pods_synced: bool,
    /// The runtime's last answer, or why it did not answer.
    pub runtime: Result<String, String>,
    /// What the agent does now (`starting`, `observing: …`).
    pub mode: String,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            pods_synced: false,
            runtime: Err("not asked yet".into()),
            mode: "starting up".into(),
        }
    }
}

/// Shared health state.
pub type SharedHealth = Arc<Mutex<Health>>;

impl Health {
    /// Whether `/readyz` says ready, and its body.
    pub fn readiness(&self) -> (bool, String) {
        let mut lines = vec![format!("mode: {}", self.mode)];
        lines.push(match &self.runtime {
            Ok(v) => format!("runtime: {v}"),
            Err(e) => format!("runtime: unavailable: {e}"),
        });
        lines.push(format!(
            "pods: {}",
            if self.pods_synced {
                "synced"
            } else {
                "waiting for the first list"
            }
        ));
        (
            self.pods_synced && self.runtime.is_ok(),
            lines.join("\n") + "\n",
        )
    }
}

/// Produces the JSON served at `/timelines`.
pub type TimelineSource = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Serves `/healthz`, `/readyz`, `/metrics` and `/timelines` (each
/// ephemeral container's timeline, whoever started it) until cancelled.
pub async fn serve(
    addr: SocketAddr,
    health: SharedHealth,
    metrics: Arc<Metrics>,
    timelines: TimelineSource,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/timelines",
            get(move || {
                let t = timelines.clone();
                async move { axum::Json(t()) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(
                |State((h, _)): State<(SharedHealth, Arc<Metrics>)>| async move {
                    let (ok, body) = h.lock().unwrap_or_else(|e| e.into_inner()).readiness();
                    let code = if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, body)
                },
            ),
        )
        .route(
            "/metrics",
            get(|State((_, m)): State<(SharedHealth, Arc<Metrics>)>| async move { m.encode() }),
        )
        .with_state((health, metrics));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz, /metrics, /timelines");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_pods_and_runtime() {
        let mut h = Health {
            pods_synced: true,
            runtime: Ok("containerd 1.6.20".into()),
            mode: "starting".into(),
        };
        assert!(h.readiness().0);
        h.runtime = Err("connection refused".into());
        let (ok, body) = h.readiness();
        assert!(!ok);
        assert!(
            body.contains("runtime: unavailable: connection refused"),
            "{body}"
        );
    }

    #[test]
    fn metrics_encode() {
        let m = Metrics::default();
        m.reconciles.inc();
        let text = m.encode();
        assert!(text.contains("ephemerald_reconciles_total 1"), "{text}");
    }
}
