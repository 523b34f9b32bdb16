//! ephemerald: a node agent that runs Kubernetes ephemeral containers
//! through the node's CRI runtime, the way the kubelet does. This crate is
//! the agent alone; the lab (local API server, fake CRI, containerd testbed,
//! demo, bench) is the `ephemerald-testbed` crate in `testbed/`, which
//! depends on this one and never the other way round.
//!
//! # The path of one ephemeral container
//!
//! 1. **Watch.** `kubectl debug` appends the container to the pod's spec.
//!    The pod watch ([`reconcile::watch`]: a `kube` controller over the pods
//!    with `spec.nodeName` = this node) sees the change, stamps it, and runs
//!    a pass of the pod at once (the fast path). Changes a pass does not
//!    read (labels, annotations, conditions) trigger nothing.
//! 2. **Observe.** The pass ([`reconcile::agent`]) reads what the runtime
//!    holds for the pod over the CRI ([`reconcile::observe`], through the
//!    client in [`cri`]).
//! 3. **Plan.** [`reconcile::plan`] (pure) decides per container: start,
//!    resume a half-done start, refuse with the kubelet's waiting reason, or
//!    nothing — gated by the API server's rules ([`validation`]), the mode
//!    ([`reconcile::mode`]) and the per-pod backoff ([`reconcile::memory`]).
//! 4. **Execute.** [`reconcile::execute`] ensures the image
//!    ([`reconcile::image`]), turns the spec into the CRI config the kubelet
//!    would send ([`reconcile::translate`], with the objects it refers to
//!    read by [`reconcile::refs`] through [`k8s`]), creates and starts the
//!    container, and records the kubelet's Events ([`k8s`]).
//! 5. **Status.** The pass observes again; [`reconcile::status`] (pure)
//!    computes `ephemeralContainerStatuses`; [`k8s`] writes `pods/status`
//!    when it changed. [`reconcile::timeline`] stamps every step.
//! 6. **Exit.** The runtime's exit event ([`events`]) reaches the exit
//!    forwarder ([`reconcile::exits`]), which requeues the pod; its next
//!    pass writes `terminated`. A periodic resync is the safety net; a pass
//!    that fails is retried with per-pod backoff.
//!
//! Around the path: [`observe`] serves `/healthz`, `/readyz`, `/metrics`
//! and `/timelines`; [`config`] holds the flags; [`backoff`] the two retry
//! policies; [`kubelet`] the kubelet's names, labels and directory layout.
//! [`run`] starts the parts — the mode watcher, the health server, the exit
//! forwarder, the pod watch — and stops them. `docs/ARCHITECTURE.md` maps
//! the crates and modules and says where each kind of change goes.

pub mod backoff;
pub mod config;
pub mod cri;
pub mod events;
pub mod host;
pub mod k8s;
pub mod kubelet;
pub mod observe;
pub mod reconcile;
pub mod validation;

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, Mode};
use crate::cri::{CriClient, Runtime};
use crate::k8s::{Cluster, K8sError, KubeCluster};
use crate::observe::{Health, Metrics, SharedHealth};
use crate::reconcile::agent::Agent;
use crate::reconcile::exits;
use crate::reconcile::mode::{self, ModeGate};
use crate::reconcile::watch::PodWatch;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable (exit code 64).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// No Kubernetes client could be built.
    #[error(transparent)]
    K8s(#[from] K8sError),
    /// The CRI endpoint is unusable.
    #[error(transparent)]
    Cri(#[from] cri::CriError),
    /// The health listener could not bind.
    #[error("cannot serve /healthz, /readyz and /metrics on {addr} (--metrics-addr)")]
    Health {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it could not be bound.
        #[source]
        source: std::io::Error,
    },
    /// The pod watch ended although no shutdown was asked for.
    #[error("the pod controller stopped unexpectedly")]
    ControllerStopped,
}

/// Builds a client from the kubeconfig, or in-cluster / default config.
pub async fn kube_client(config: &Config) -> Result<kube::Client, K8sError> {
    let cfg = match &config.kubeconfig {
        Some(path) => {
            let bad = |source| K8sError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(bad)?
        }
        None => kube::Config::infer().await.map_err(K8sError::Infer)?,
    };
    kube::Client::try_from(cfg).map_err(K8sError::Config)
}

/// Handles to a running agent, for the demo and tests.
pub struct Handles {
    /// The agent (timelines, memory).
    pub agent: Arc<Agent>,
}

/// Runs the agent until `shutdown` is cancelled; returns after running
/// reconciles finished. Containers are never stopped on the way out: the
/// agent does not own the pod's lifecycle.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let client = kube_client(&config).await?;
    run_with_client(config, client, shutdown, |_| {}).await
}

/// [`run`] with a given client; `started` receives the agent once it exists.
pub async fn run_with_client(
    config: Config,
    client: kube::Client,
    shutdown: CancellationToken,
    started: impl FnOnce(Handles),
) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::default());
    let cri_errors = metrics.clone();
    let runtime: Arc<dyn Runtime> = Arc::new(
        CriClient::new(&config.cri_endpoint)?
            .with_timeout(config.runtime_request_timeout)
            .with_error_hook(Arc::new(move |rpc, code| {
                cri_errors.error("cri", rpc, &format!("{code:?}"))
            })),
    );
    run_inner(config, client, runtime, metrics, shutdown, started).await
}

/// [`run_with_client`] with a given runtime (tests wrap the real CRI client
/// to count or delay its calls). Exit events still come from
/// `config.containerd_socket` and from `runtime`.
pub async fn run_with_runtime(
    config: Config,
    client: kube::Client,
    runtime: Arc<dyn Runtime>,
    shutdown: CancellationToken,
    started: impl FnOnce(Handles),
) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::default());
    run_inner(config, client, runtime, metrics, shutdown, started).await
}

/// Starts the parts and runs until `shutdown`: the runtime first (the
/// agent is useless without one), then the mode, the agent, the mode
/// watcher, the health server, the exit forwarder and the pod watch. The
/// pod watch ends on shutdown once no pass runs; then every part stops.
async fn run_inner(
    config: Config,
    client: kube::Client,
    runtime: Arc<dyn Runtime>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    started: impl FnOnce(Handles),
) -> Result<(), Error> {
    let health: SharedHealth = Arc::new(Mutex::new(Health::default()));
    // Bound first: a port someone else holds is a clear error at start, not
    // probes that fail later.
    let listener = match config.metrics_addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let runtime_name = wait_for_runtime(runtime.as_ref(), &health, &shutdown).await;
    let cluster: Arc<dyn Cluster> = Arc::new(KubeCluster::new(client.clone()));
    let mut tasks = JoinSet::new();
    let gate = mode_watcher(&config, &client, &metrics, &health, &mut tasks, &shutdown).await;
    tracing::info!(node = %config.node_name, runtime = %runtime_name, "{}", gate.describe());
    metrics.starting.set(i64::from(gate.starting()));
    lock(&health).mode = gate.describe();

    let (events, _writer) =
        k8s::spawn_event_writer(client.clone(), config.node_name.clone(), shutdown.clone());
    let agent = Arc::new(Agent::new(
        runtime.clone(),
        runtime_name,
        cluster,
        Arc::new(events),
        config.dirs.clone(),
        gate,
        config.resync,
        Backoff::new(config.backoff_initial, config.backoff_max, false),
        metrics.clone(),
        health.clone(),
    ));
    started(Handles {
        agent: agent.clone(),
    });

    if let Some(listener) = listener {
        tasks.spawn(health_server(
            listener,
            health.clone(),
            metrics,
            agent.clone(),
            shutdown.clone(),
        ));
    }
    let (requeue, requeued) = mpsc::channel(256);
    let forwarder = exits::Forwarder {
        runtime,
        containerd_socket: config.containerd_socket,
        namespace: config.containerd_namespace,
        index: agent.exits.clone(),
        requeue: requeue.clone(),
    };
    forwarder.spawn(&mut tasks, shutdown.clone());
    let pod_watch = PodWatch {
        client,
        node: config.node_name,
        agent,
        health,
        resync: config.resync,
        requeue,
        requeued,
    };
    pod_watch.run(&mut tasks, shutdown.clone()).await;

    let asked = shutdown.is_cancelled();
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if asked {
        Ok(())
    } else {
        Err(Error::ControllerStopped)
    }
}

/// The mode watcher: the gate `--mode` asks for; for `auto`,
/// [`mode::auto`] follows the node's Lease and Node (its tasks in `tasks`)
/// and returns the gate after its first decision.
async fn mode_watcher(
    config: &Config,
    client: &kube::Client,
    metrics: &Arc<Metrics>,
    health: &SharedHealth,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> Arc<ModeGate> {
    match config.mode {
        Mode::Start => Arc::new(ModeGate::new(true, "--mode start")),
        Mode::Observe => Arc::new(ModeGate::new(false, "--mode observe")),
        Mode::Auto => {
            mode::auto(
                client.clone(),
                &config.node_name,
                metrics.clone(),
                health.clone(),
                tasks,
                shutdown.clone(),
            )
            .await
        }
    }
}

/// The health server's listener.
async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Health { addr, source })
}

/// The health server: `/healthz`, `/readyz`, `/metrics` and `/timelines`
/// on `--metrics-addr` until `cancel`.
async fn health_server(
    listener: tokio::net::TcpListener,
    health: SharedHealth,
    metrics: Arc<Metrics>,
    agent: Arc<Agent>,
    cancel: CancellationToken,
) {
    let timelines: observe::TimelineSource =
        Arc::new(move || serde_json::to_value(agent.timelines()).unwrap_or_default());
    if let Err(e) = observe::serve(listener, health, metrics, timelines, cancel).await {
        tracing::error!(error = %e, "health endpoint failed");
    }
}

/// Asks the runtime for its name until it answers (or shutdown); the agent
/// is useless without one, and says why while it waits.
async fn wait_for_runtime(
    runtime: &dyn Runtime,
    health: &Arc<Mutex<Health>>,
    shutdown: &CancellationToken,
) -> String {
    let mut backoff = Backoff::watch();
    loop {
        match runtime.version().await {
            Ok(v) => {
                lock(health).runtime = Ok(format!("{} {}", v.runtime_name, v.runtime_version));
                return v.runtime_name;
            }
            Err(e) => {
                tracing::error!(error = %e, "container runtime unavailable; waiting for it");
                lock(health).runtime = Err(e.to_string());
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return "unknown".into(),
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
