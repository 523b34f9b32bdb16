//! What the agent shows about itself: Prometheus metrics and the health
//! endpoints (`/healthz` live, `/readyz` ready with the mode and why not,
//! `/metrics`, `/timelines`), served on `--metrics-addr`.
//!
//! Phase names of `ephemerald_start_phase_seconds` (see [`phase`]) follow
//! one container from the watch event to its terminated status.
//!
//! Owns: the metric names, the health state and its HTTP server (plain
//! hyper, no framework). Must not reach into the agent: what it serves comes
//! in as values and closures ([`TimelineSource`]).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
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

/// Labels of the phase histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// One of [`phase`].
    pub phase: String,
}

/// The phases of one ephemeral container's life that are timed.
pub mod phase {
    /// Watch event received → CreateContainer issued (the agent's own cost).
    pub const EVENT_TO_CREATE: &str = "event_to_create";
    /// Image present or pulled.
    pub const IMAGE: &str = "image";
    /// CreateContainer.
    pub const CREATE: &str = "create";
    /// StartContainer.
    pub const START: &str = "start";
    /// StartContainer returned → running status accepted by the API server.
    pub const START_TO_STATUS: &str = "start_to_status";
    /// Container exit (the runtime's `finished_at`) → terminated status
    /// accepted by the API server.
    pub const EXIT_TO_STATUS: &str = "exit_to_status";
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `cri` or `api`.
    pub source: String,
    /// The CRI RPC or the API verb (`watch`, `patch status`, …).
    pub call: String,
    /// gRPC code name, HTTP status code, or `transport`.
    pub code: String,
}

/// Labels of the mode gauge: the mode and the rule that decided it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// `starting` or `observing`.
    pub mode: String,
    /// The rule (`lease_renewed`, `no_kubelet`, `flag`, …).
    pub rule: String,
}

/// Labels of the mode change counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeChangeLabels {
    /// The mode changed to: `starting` or `observing`.
    pub to: String,
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
    /// 1 for the current mode and the rule that decided it (one series).
    pub mode: Family<ModeLabels, Gauge>,
    /// Changes of the mode after the first decision.
    pub mode_changes: Family<ModeChangeLabels, Counter>,
    /// Pods with ephemeral containers whose latest watch event has not been
    /// reconciled yet.
    pub queue_depth: Gauge,
    /// Times the pod watch started over with a new list.
    pub watch_restarts: Counter,
    /// Failed API and CRI calls by code.
    pub errors: Family<ErrorLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ephemerald");
        let starts = Family::<StartLabels, Counter>::default();
        let seen_to_running = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        // 100 µs to ~100 s: the agent's own phases are sub-millisecond.
        let phases = Family::<PhaseLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0001, 2.0, 21))) as fn() -> Histogram,
        );
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let status_patches = Counter::default();
        let starting = Gauge::default();
        let mode = Family::<ModeLabels, Gauge>::default();
        let mode_changes = Family::<ModeChangeLabels, Counter>::default();
        let queue_depth = Gauge::default();
        let watch_restarts = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
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
            "Time per phase, from the watch event to the terminated status",
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
        registry.register(
            "mode",
            "1 for the current mode and the rule that decided it",
            mode.clone(),
        );
        registry.register(
            "mode_changes",
            "Changes of the mode after the first decision, by the mode changed to",
            mode_changes.clone(),
        );
        registry.register(
            "reconcile_queue_depth",
            "Pods with ephemeral containers waiting for a reconcile",
            queue_depth.clone(),
        );
        registry.register(
            "watch_restarts",
            "Pod watch restarts (new lists after the first)",
            watch_restarts.clone(),
        );
        registry.register(
            "errors",
            "Failed API server and CRI calls by code",
            errors.clone(),
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
            mode,
            mode_changes,
            queue_depth,
            watch_restarts,
            errors,
        }
    }
}

impl Metrics {
    /// Records a duration of one [`phase`].
    pub fn phase(&self, phase: &str, seconds: f64) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.into(),
            })
            .observe(seconds);
    }

    /// Counts a failed call.
    pub fn error(&self, source: &str, call: &str, code: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                source: source.into(),
                call: call.into(),
                code: code.into(),
            })
            .inc();
    }

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
/// ephemeral container's timeline, whoever started it) until cancelled;
/// then lets the requests in flight finish.
///
/// Plain HTTP/1 on hyper (already in the tree for the Kubernetes client and
/// gRPC): four fixed GET routes need no web framework.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: SharedHealth,
    metrics: Arc<Metrics>,
    timelines: TimelineSource,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz, /metrics, /timelines");
    let endpoints = Arc::new(Endpoints {
        health,
        metrics,
        timelines,
    });
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: say so and give
                    // the process a moment instead of spinning on accept.
                    tracing::warn!(error = %e, "health endpoint: accept failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let (endpoints, cancel) = (endpoints.clone(), cancel.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = endpoints.answer(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                // A client that never finishes its request head is dropped
                // after hyper's default 30 s, which needs a timer.
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// What the health endpoint reads to answer.
struct Endpoints {
    health: SharedHealth,
    metrics: Arc<Metrics>,
    timelines: TimelineSource,
}

impl Endpoints {
    /// The answer to one request: GET (or HEAD) of a known path, else 404
    /// or 405.
    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<String> {
        let path = req.uri().path();
        if !matches!(path, "/healthz" | "/readyz" | "/metrics" | "/timelines") {
            return plain(StatusCode::NOT_FOUND);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = plain(StatusCode::METHOD_NOT_ALLOWED);
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET,HEAD"));
            return response;
        }
        let (code, content_type, body) = match path {
            "/readyz" => {
                let (ok, body) = self
                    .health
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .readiness();
                let code = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, TEXT, body)
            }
            "/metrics" => (StatusCode::OK, TEXT, self.metrics.encode()),
            "/timelines" => (
                StatusCode::OK,
                JSON,
                serde_json::to_string(&(self.timelines)()).unwrap_or_default(),
            ),
            _ => (StatusCode::OK, TEXT, "ok\n".to_string()),
        };
        let mut response = Response::new(body);
        *response.status_mut() = code;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// An empty answer with `code`.
fn plain(code: StatusCode) -> Response<String> {
    let mut response = Response::new(String::new());
    *response.status_mut() = code;
    response
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
        m.phase(phase::EVENT_TO_CREATE, 0.0004);
        m.error("cri", "StartContainer", "Unknown");
        m.watch_restarts.inc();
        m.queue_depth.set(3);
        let text = m.encode();
        assert!(text.contains("ephemerald_reconciles_total 1"), "{text}");
        assert!(
            text.contains(r#"ephemerald_start_phase_seconds_count{phase="event_to_create"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ephemerald_errors_total{source="cri",call="StartContainer",code="Unknown"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("ephemerald_watch_restarts_total 1"), "{text}");
        assert!(
            text.contains("ephemerald_reconcile_queue_depth 3"),
            "{text}"
        );
    }
}
