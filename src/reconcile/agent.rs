//! The reconcile pass of one pod, and the [`Agent`] that runs it.
//!
//! A pass is level-triggered: it observes the runtime
//! ([`super::observe`]), plans (pure, [`super::plan`]), executes the plan
//! ([`super::execute`]), computes the status (pure, [`super::status`]) and
//! writes it if it changed. Running it again at any
//! time converges to the same state. What a pass needs to remember between
//! passes is in [`super::memory`] (failures and backoff, settled containers)
//! and [`super::timeline`]; which container belongs to which pod, for exit
//! events, is in [`super::exits`]. Who calls a pass is [`super::watch`].
//!
//! Owns: the order of a pass's steps and one pass at a time per pod. It
//! must not watch anything itself, nor decide the mode (it reads
//! [`ModeGate`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::Instrument;

use super::exits::ExitIndex;
use super::memory::Memory;
pub use super::mode::ModeGate;
use super::observe::{self, Observed};
use super::plan::{self, Gates};
use super::status;
use super::timeline;
use super::translate::NodeDirs;
use crate::backoff::Backoff;
use crate::cri::{CriError, Runtime};
use crate::k8s::{Cluster, ContainerEvent, EventSink, EventType, K8sError};
use crate::kubelet;
use crate::observe::{Metrics, SharedHealth};
use crate::validation;

mod act;

// Where the tests and the lab have always found them.
pub use super::observe::{SandboxDetails, parse_sandbox_info};
pub use super::timeline::{Creator, Timeline};
pub use super::watch::trigger_fingerprint;

/// How old a CREATED, never started container must be before the agent
/// starts it itself: its creator normally starts it within milliseconds.
const CREATED_GRACE: Duration = Duration::from_secs(2);

/// When to look again at a container whose creator's start is still under
/// way in the runtime.
const START_IN_PROGRESS_RECHECK: Duration = Duration::from_secs(1);

/// A reconcile pass that could not finish; the pod is retried soon.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The runtime did not answer.
    #[error(transparent)]
    Cri(#[from] CriError),
    /// The API server did not take the status.
    #[error(transparent)]
    K8s(#[from] K8sError),
}

/// Everything a reconcile pass needs; shared by all passes.
pub struct Agent {
    /// The runtime.
    pub runtime: Arc<dyn Runtime>,
    /// The runtime's name for container ids (`containerd`).
    pub runtime_name: String,
    /// The API server.
    pub cluster: Arc<dyn Cluster>,
    /// Events.
    pub events: Arc<dyn EventSink>,
    /// Node directories.
    pub dirs: NodeDirs,
    /// Start or observe.
    pub mode: Arc<ModeGate>,
    /// Resync period.
    pub resync: Duration,
    /// Per-container backoff policy.
    pub backoff: Backoff,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Health.
    pub health: SharedHealth,
    /// Which runtime container is whose, for exit events.
    pub exits: Arc<ExitIndex>,
    memory: Memory,
    /// Pods whose last pass failed (runtime or API server unreachable, a
    /// status write refused), with the delay before the next try.
    retries: Mutex<HashMap<String, Backoff>>,
    /// When a watch event for a pod with ephemeral containers arrived that
    /// no pass has taken yet (by pod uid): the start of `event_to_create`.
    received: Mutex<HashMap<String, SystemTime>>,
    /// One pass at a time per pod (by uid): the controller serialises its
    /// own passes, and this also orders them with the watch's fast path.
    passes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Agent {
    /// A new agent with empty memory.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runtime: Arc<dyn Runtime>,
        runtime_name: String,
        cluster: Arc<dyn Cluster>,
        events: Arc<dyn EventSink>,
        dirs: NodeDirs,
        mode: Arc<ModeGate>,
        resync: Duration,
        backoff: Backoff,
        metrics: Arc<Metrics>,
        health: SharedHealth,
    ) -> Self {
        Agent {
            runtime,
            runtime_name,
            cluster,
            events,
            dirs,
            mode,
            resync,
            backoff,
            metrics,
            health,
            exits: Arc::default(),
            memory: Memory::default(),
            retries: Mutex::default(),
            received: Mutex::default(),
            passes: Mutex::default(),
        }
    }

    /// Notes that the pod watch delivered `pod` now. Only pods with
    /// ephemeral containers are noted; the oldest untaken event counts.
    /// Returns whether the pod holds an ephemeral container this agent has
    /// not seen yet while it is starting containers: worth a pass at once.
    pub fn note_event(&self, pod: &Pod) -> bool {
        let Some(ecs) = pod
            .spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.as_ref())
            .filter(|v| !v.is_empty())
        else {
            return false;
        };
        let uid = kubelet::uid(pod);
        {
            let mut received = lock(&self.received);
            received
                .entry(uid.to_string())
                .or_insert_with(SystemTime::now);
            self.metrics.queue_depth.set(received.len() as i64);
        }
        self.mode.starting()
            && self
                .memory
                .any_unseen(uid, ecs.iter().map(|c| c.name.as_str()))
    }

    fn take_event(&self, uid: &str) -> Option<SystemTime> {
        let mut received = lock(&self.received);
        let at = received.remove(uid);
        self.metrics.queue_depth.set(received.len() as i64);
        at
    }

    /// Forgets pods that are gone (the watch no longer lists them), so
    /// memory does not grow with every pod the node ever ran.
    pub fn retain_pods(&self, live: &[Arc<Pod>]) {
        let uids: HashSet<&str> = live.iter().map(|p| kubelet::uid(p)).collect();
        let refs: HashSet<ObjectRef<Pod>> = live
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect();
        self.memory.retain(&uids);
        lock(&self.retries).retain(|uid, _| uids.contains(uid.as_str()));
        self.exits.retain(&refs);
        let mut received = lock(&self.received);
        received.retain(|uid, _| uids.contains(uid.as_str()));
        self.metrics.queue_depth.set(received.len() as i64);
        drop(received);
        lock(&self.passes).retain(|uid, _| uids.contains(uid.as_str()));
    }

    /// Every timeline recorded so far.
    pub fn timelines(&self) -> Vec<Timeline> {
        self.memory.timelines()
    }

    /// One reconcile pass for one pod.
    pub async fn reconcile(&self, pod: &Pod) -> Result<Action, ReconcileError> {
        let uid = kubelet::uid(pod).to_string();
        let has_ephemeral = pod
            .spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.as_ref())
            .is_some_and(|v| !v.is_empty());
        if !has_ephemeral || uid.is_empty() {
            // Nothing to do until the pod gains an ephemeral container.
            self.memory.forget(&uid);
            return Ok(Action::await_change());
        }
        let gate = lock(&self.passes).entry(uid.clone()).or_default().clone();
        let _one_pass_at_a_time = gate.lock().await;
        let seen = self.take_event(&uid).unwrap_or_else(SystemTime::now);
        self.metrics.reconciles.inc();
        let span = tracing::info_span!("reconcile", pod = %format!("{}/{}", kubelet::namespace(pod), kubelet::name(pod)), uid = %uid);
        let result = self.pass(pod, &uid, seen).instrument(span).await;
        if result.is_ok() {
            lock(&self.retries).remove(&uid);
        }
        result
    }

    /// When to try a pod again whose pass failed: the stream policy
    /// (jittered, 0.8 s doubling to 30 s) per pod, so an unreachable runtime
    /// or API server is not hammered; a pass that finishes resets it. A
    /// change to the pod that a pass reads runs one sooner.
    pub fn retry_delay(&self, pod: &Pod) -> Duration {
        lock(&self.retries)
            .entry(kubelet::uid(pod).to_string())
            .or_insert_with(Backoff::watch)
            .next_delay()
    }

    /// Observe → plan → execute → (observe again) → status.
    async fn pass(&self, pod: &Pod, uid: &str, seen: SystemTime) -> Result<Action, ReconcileError> {
        let ecs = pod
            .spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.clone())
            .unwrap_or_default();
        let names: HashSet<&str> = ecs.iter().map(|c| c.name.as_str()).collect();
        let observed = self.observe_first(pod, uid, &names).await?;
        self.exits.index(pod, &observed, &names);
        self.record_timelines(pod, uid, &observed, seen, SystemTime::now());

        let starting = self.mode.starting() && !terminating(pod);
        let gates = self.gates(pod, uid, starting);
        let planned = plan::plan(pod, &observed, &gates);
        let mut touched_runtime = false;
        if starting {
            for action in planned.actions {
                touched_runtime |= self.act(pod, uid, &observed, &gates, action).await;
            }
        }
        let observed = if touched_runtime {
            let o = self.observe(uid, &names).await?;
            self.exits.index(pod, &o, &names);
            let now = SystemTime::now();
            self.record_timelines(pod, uid, &o, now, now);
            o
        } else {
            observed
        };
        if starting {
            self.write_status(pod, uid, &observed).await?;
        } else if !self.mode.starting() {
            // What this agent started, it reports to the end, also after
            // the mode changed: a kubelet that lost the race for a
            // container does not report it (it shows its create failure,
            // then `waiting` forever). Everyone else's entries pass as the
            // API holds them.
            let ours = self.memory.created_here(uid);
            if !ours.is_empty() {
                let computed = status::ephemeral_statuses(
                    pod,
                    &observed,
                    &BTreeMap::new(),
                    &self.runtime_name,
                );
                let statuses = status::ours_where_behind(pod, &computed, &ours);
                self.write_statuses(pod, uid, statuses).await?;
            }
        }
        Ok(Action::requeue(self.memory.next_pass(
            uid,
            Instant::now(),
            self.resync,
        )))
    }

    /// The pass's first observation; tells `/readyz` and the pod's
    /// containers when the runtime stops or starts answering.
    async fn observe_first(
        &self,
        pod: &Pod,
        uid: &str,
        names: &HashSet<&str>,
    ) -> Result<Observed, ReconcileError> {
        match self.observe(uid, names).await {
            Ok(o) => {
                let mut h = lock(&self.health);
                if h.runtime.is_err() {
                    tracing::info!("container runtime answers again");
                    h.runtime = Ok(self.runtime_name.clone());
                }
                drop(h);
                self.memory.runtime_up(uid);
                Ok(o)
            }
            Err(e) => {
                self.metrics.reconcile_errors.inc();
                lock(&self.health).runtime = Err(e.to_string());
                self.report_runtime_down(pod, uid, &e);
                Err(e.into())
            }
        }
    }

    /// What holds a start back: backoff, refusals, and (while starting) the
    /// age a created, never started container must reach to be resumed.
    fn gates(&self, pod: &Pod, uid: &str, starting: bool) -> Gates {
        let grace = std::time::SystemTime::now()
            .checked_sub(CREATED_GRACE)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64);
        Gates {
            backing_off: self.memory.backing_off(uid, Instant::now()),
            refused: validation::refusals(pod),
            resume_created_before: grace.filter(|_| starting),
        }
    }

    /// Computes the statuses of a starting agent (with the start failures
    /// it remembers) and writes them.
    async fn write_status(
        &self,
        pod: &Pod,
        uid: &str,
        observed: &Observed,
    ) -> Result<(), ReconcileError> {
        let (failures, backing_off) = self.memory.displayed_failures(uid, Instant::now());
        for (name, image) in backing_off {
            self.events.record(ContainerEvent::new(
                pod,
                &name,
                EventType::Normal,
                "BackOff",
                format!("Back-off pulling image {image:?}"),
            ));
        }
        let statuses = status::ephemeral_statuses(pod, observed, &failures, &self.runtime_name);
        self.write_statuses(pod, uid, statuses).await
    }

    /// Writes the whole list when it differs from the API's (and from what
    /// this agent wrote at the same resourceVersion).
    async fn write_statuses(
        &self,
        pod: &Pod,
        uid: &str,
        statuses: Vec<ContainerStatus>,
    ) -> Result<(), ReconcileError> {
        let rv = pod.metadata.resource_version.clone().unwrap_or_default();
        let already = self.memory.already_written(uid, &rv, &statuses);
        if status::changed(pod, &statuses) && !already {
            self.cluster
                .patch_ephemeral_statuses(pod, &statuses)
                .await?;
            self.metrics.status_patches.inc();
            tracing::info!(statuses = %summary(&statuses), "status written");
            let now = SystemTime::now();
            self.memory.with_timelines(uid, |t| {
                timeline::record_written(t, &statuses, now, &self.metrics)
            });
            self.memory.written(uid, rv, statuses);
        }
        Ok(())
    }

    /// Observes the pod's containers, reusing the settled ones' details.
    async fn observe(&self, uid: &str, names: &HashSet<&str>) -> Result<Observed, CriError> {
        let known = self.memory.settled(uid);
        let observed = observe::observe_known(self.runtime.as_ref(), uid, names, &known).await?;
        self.memory.set_settled(uid, observe::settled(&observed));
        Ok(observed)
    }

    fn record_timelines(
        &self,
        pod: &Pod,
        uid: &str,
        observed: &Observed,
        seen: SystemTime,
        now: SystemTime,
    ) {
        self.memory
            .with_timelines(uid, |t| timeline::record(t, pod, observed, seen, now));
    }

    /// The runtime did not answer: say so once per outage on every ephemeral
    /// container of the pod that has not run yet (it cannot start now),
    /// also on those appended during the outage.
    fn report_runtime_down(&self, pod: &Pod, uid: &str, e: &CriError) {
        if e.code() != Some(tonic::Code::Unavailable)
            && e.code() != Some(tonic::Code::DeadlineExceeded)
        {
            return;
        }
        let ran: HashSet<&str> = status::api_statuses(pod)
            .iter()
            .filter(|s| s.container_id.is_some())
            .map(|s| s.name.as_str())
            .collect();
        let waiting = pod
            .spec
            .iter()
            .flat_map(|s| s.ephemeral_containers.iter().flatten())
            .map(|c| c.name.as_str())
            .filter(|n| !ran.contains(n));
        let (first, untold) = self.memory.runtime_down(uid, waiting);
        for name in untold {
            self.events.record(ContainerEvent::new(
                pod,
                &name,
                EventType::Warning,
                "Failed",
                format!("Error: container runtime is unavailable: {}", e.message()),
            ));
        }
        if first {
            tracing::error!(error = %e, "container runtime unavailable");
        }
    }
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed")
}

fn summary(statuses: &[ContainerStatus]) -> String {
    statuses
        .iter()
        .map(|s| {
            let st = s.state.as_ref();
            let what = if let Some(t) = st.and_then(|s| s.terminated.as_ref()) {
                format!("terminated({})", t.exit_code)
            } else if st.and_then(|s| s.running.as_ref()).is_some() {
                "running".to_string()
            } else {
                let r = st
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.reason.clone())
                    .unwrap_or_default();
                format!("waiting({r})")
            };
            format!("{}={what}", s.name)
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
