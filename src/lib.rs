//! ephemerald: a node agent that runs Kubernetes ephemeral containers
//! through the node's CRI runtime, the way the kubelet does.
//!
//! The path of one ephemeral container: the pod watch (`kube` controller,
//! field selector `spec.nodeName`) → [`reconcile::agent::Agent::reconcile`]
//! → [`reconcile::observe`] → [`reconcile::plan`] → [`reconcile::execute`]
//! → [`reconcile::status`] → `pods/status` and Events ([`k8s`]). Exit events
//! ([`events`]) requeue a pod at once; a periodic resync is the safety net.
//! Pod changes that a pass does not read (labels, annotations, conditions)
//! trigger nothing ([`reconcile::agent::trigger_fingerprint`]); a failed
//! pass is retried with per-pod backoff ([`reconcile::agent::Agent::retry_delay`]).

pub mod backoff;
pub mod config;
pub mod cri;
pub mod events;
pub mod k8s;
pub mod kubelet;
pub mod observe;
pub mod reconcile;
pub mod validation;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{Config, Mode};
use crate::cri::{CriClient, Runtime};
use crate::k8s::{Cluster, K8sError, KubeCluster};
use crate::observe::{Health, Metrics};
use crate::reconcile::agent::{Agent, ModeGate, ReconcileError};

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

/// Reconcile passes at once (the controller's, and the fast path's).
const CONCURRENCY: usize = 32;

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

async fn run_inner(
    config: Config,
    client: kube::Client,
    runtime: Arc<dyn Runtime>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    started: impl FnOnce(Handles),
) -> Result<(), Error> {
    let health = Arc::new(Mutex::new(Health::default()));
    // Bound first: a port someone else holds is a clear error at start, not
    // probes that fail later.
    let listener = match config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Health { addr, source })?,
        ),
        None => None,
    };
    let runtime_name = wait_for_runtime(runtime.as_ref(), &health, &shutdown).await;
    let cluster: Arc<dyn Cluster> = Arc::new(KubeCluster::new(client.clone()));

    let mut tasks = tokio::task::JoinSet::new();
    let mode = match config.mode {
        Mode::Start => Arc::new(ModeGate::new(true, "--mode start")),
        Mode::Observe => Arc::new(ModeGate::new(false, "--mode observe")),
        // Follows the node's Lease and Node; returns after the first decision.
        Mode::Auto => {
            reconcile::mode::auto(
                client.clone(),
                &config.node_name,
                metrics.clone(),
                health.clone(),
                &mut tasks,
                shutdown.clone(),
            )
            .await
        }
    };
    tracing::info!(node = %config.node_name, runtime = %runtime_name, "{}", mode.describe());
    metrics.starting.set(i64::from(mode.starting()));
    lock(&health).mode = mode.describe();

    let (events, _writer) =
        k8s::spawn_event_writer(client.clone(), config.node_name.clone(), shutdown.clone());
    let agent = Arc::new(Agent::new(
        runtime.clone(),
        runtime_name,
        cluster.clone(),
        Arc::new(events),
        config.dirs.clone(),
        mode.clone(),
        config.resync,
        Backoff::new(config.backoff_initial, config.backoff_max, false),
        metrics.clone(),
        health.clone(),
    ));
    started(Handles {
        agent: agent.clone(),
    });

    if let Some(listener) = listener {
        let listener_health = health.clone();
        let m = metrics.clone();
        let cancel = shutdown.clone();
        let source = agent.clone();
        let timelines: observe::TimelineSource =
            Arc::new(move || serde_json::to_value(source.timelines()).unwrap_or_default());
        tasks.spawn(async move {
            if let Err(e) = observe::serve(listener, listener_health, m, timelines, cancel).await {
                tracing::error!(error = %e, "health endpoint failed");
            }
        });
    }

    // Exit events → the owning pod's ObjectRef → an immediate reconcile.
    let (exit_tx, mut exit_rx) = mpsc::channel(256);
    let (opened_tx, mut opened_rx) = mpsc::channel(4);
    tasks.spawn(events::run(
        events::Sources {
            runtime: runtime.clone(),
            containerd_socket: config.containerd_socket.clone(),
            namespace: config.containerd_namespace.clone(),
            opened: Some(opened_tx),
        },
        exit_tx,
        shutdown.clone(),
    ));
    let (requeue_tx, requeue_rx) = mpsc::channel(256);
    let flip_requeue = requeue_tx.clone();
    // A (re)opened exit stream may have missed exits: re-check every pod
    // with a live ephemeral container.
    let (opened_agent, opened_requeue) = (agent.clone(), requeue_tx.clone());
    tasks.spawn(async move {
        while let Some(source) = opened_rx.recv().await {
            let pods = opened_agent.live_owners();
            tracing::debug!(
                ?source,
                pods = pods.len(),
                "exit events (re)opened; re-checking"
            );
            for pod in pods {
                let _ = opened_requeue.send(pod).await;
            }
        }
    });
    let owner_agent = agent.clone();
    let exit_runtime = runtime.clone();
    tasks.spawn(async move {
        while let Some(exit) = exit_rx.recv().await {
            // containerd's CRI records the exit from the same event a moment
            // later; requeue once the CRI shows it, so the pass sees it.
            let (rt, tx, agent) = (
                exit_runtime.clone(),
                requeue_tx.clone(),
                owner_agent.clone(),
            );
            tokio::spawn(async move {
                let Some(pod) = agent.owner_of_exited(&exit.container_id).await else {
                    return;
                };
                tracing::debug!(container_id = %exit.container_id, pod = %pod, "exit event");
                wait_until_exited(rt.as_ref(), &exit.container_id).await;
                let _ = tx.send(pod).await;
            });
        }
    });

    let pods: kube::Api<Pod> = kube::Api::all(client);
    let selector = format!("spec.nodeName={}", config.node_name);
    // The controller's own watch, with a look at each event on the way.
    let (reader, writer) = reflector::store();
    // Fast passes hold a permit each: taking them all waits for them.
    let fast = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let watch = watcher(pods, watcher::Config::default().fields(&selector))
        .inspect(look_at_event(agent.clone(), fast.clone()));
    // Every pod change updates the cache; only changes a pass reads trigger one.
    let triggers = reflector(writer, watch)
        .applied_objects()
        .predicate_filter(reconcile::agent::trigger_fingerprint, Default::default());
    let controller = Controller::for_stream(triggers, reader)
        .with_config(controller::Config::default().concurrency(CONCURRENCY as u16))
        .reconcile_on(ReceiverStream::new(requeue_rx))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    tasks.spawn(reconcile::mode::pass_all_when_starting(
        mode.subscribe(),
        controller.store(),
        flip_requeue,
        shutdown.clone(),
    ));
    let store = controller.store();
    let synced = health.clone();
    let cancel = shutdown.clone();
    tasks.spawn(async move {
        // kube's store readiness wakes only its latest waiter (the
        // controller's own), so look again now and then instead of waiting.
        loop {
            let ready = tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready());
            tokio::select! {
                r = ready => match r {
                    Ok(Ok(())) => {
                        lock(&synced).pods_synced = true;
                        tracing::info!("pod list synced");
                        return;
                    }
                    Ok(Err(_)) => return,
                    Err(_) => {}
                },
                _ = cancel.cancelled() => return,
            }
        }
    });

    // Forget deleted pods once per resync; while starting containers, also
    // remove the legacy log links of containers the runtime no longer holds
    // (the kubelet removes them with the container).
    let (prune_store, prune_agent, cancel, every) = (
        controller.store(),
        agent.clone(),
        shutdown.clone(),
        config.resync,
    );
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            prune_agent.retain_pods(&prune_store.state());
            if prune_agent.mode.starting() {
                reconcile::logs::sweep_node(prune_agent.runtime.as_ref(), &prune_agent.dirs).await;
            }
        }
    });

    let error_policy = |pod: Arc<Pod>, err: &ReconcileError, agent: Arc<Agent>| {
        Action::requeue(failed_pass(&agent, &pod, err))
    };
    controller
        .run(
            |pod, agent: Arc<Agent>| async move { agent.reconcile(&pod).await },
            error_policy,
            agent,
        )
        .for_each(|res| async move {
            match res {
                Ok(_) => {}
                Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => tracing::warn!(error = %e, "pod watch"),
            }
        })
        .await;
    shutdown.cancel();
    let _ = fast.acquire_many(CONCURRENCY as u32).await;
    while tasks.join_next().await.is_some() {}
    if shutdown.is_cancelled() {
        Ok(())
    } else {
        Err(Error::ControllerStopped)
    }
}

/// What the agent does with each pod watch event before the controller
/// sees it: notes when it arrived (the start of `event_to_create`), counts
/// restarts and errors, and gives a pod that gained an ephemeral container
/// a pass at once, ahead of the controller's queue (whose timer adds a
/// millisecond or two). The controller's own pass for the same event
/// follows and finds the work done; passes of one pod never overlap.
fn look_at_event(
    agent: Arc<Agent>,
    permits: Arc<tokio::sync::Semaphore>,
) -> impl FnMut(&Result<watcher::Event<Pod>, watcher::Error>) {
    let mut lists = 0u64;
    move |event| match event {
        Ok(watcher::Event::Apply(pod)) => {
            if agent.note_event(pod)
                && let Ok(permit) = permits.clone().try_acquire_owned()
            {
                let (agent, pod) = (agent.clone(), pod.clone());
                tokio::spawn(async move {
                    // The controller's pass for the same event follows and
                    // schedules any retry; the failure is still told.
                    if let Err(e) = agent.reconcile(&pod).await {
                        failed_pass(&agent, &pod, &e);
                    }
                    drop(permit);
                });
            }
        }
        Ok(watcher::Event::InitApply(pod)) => {
            agent.note_event(pod);
        }
        Ok(watcher::Event::Init) => {
            lists += 1;
            if lists > 1 {
                agent.metrics.watch_restarts.inc();
            }
        }
        Ok(_) => {}
        Err(e) => {
            let code = match e {
                watcher::Error::InitialListFailed(kube::Error::Api(s))
                | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code.to_string(),
                watcher::Error::WatchError(s) => s.code.to_string(),
                _ => "transport".into(),
            };
            agent.metrics.error("api", "watch pods", &code);
        }
    }
}

/// Logs and counts a failed pass; returns when to try the pod again.
fn failed_pass(agent: &Agent, pod: &Pod, err: &ReconcileError) -> Duration {
    let delay = agent.retry_delay(pod);
    tracing::warn!(
        pod = %format!("{}/{}", kubelet::namespace(pod), kubelet::name(pod)),
        error = %err,
        retry_in_ms = delay.as_millis() as u64,
        "reconcile failed; retrying"
    );
    // CRI failures are counted by the client itself.
    if let ReconcileError::K8s(e) = err {
        agent.metrics.error("api", e.verb(), &e.code_label());
    }
    delay
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

/// Polls the CRI until it reports the container exited (at most ~2 s).
async fn wait_until_exited(runtime: &dyn Runtime, id: &str) {
    let exited = cri::proto::ContainerState::ContainerExited as i32;
    for _ in 0..200 {
        match runtime.container_status(id, false).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.state != exited) => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
