//! The reconcile pass of one pod and the state the agent keeps between
//! passes: the last start failures with their backoff (the kubelet's reason
//! cache), each ephemeral container's timeline, and which runtime container
//! ids belong to which pod (for exit events).
//!
//! A pass is level-triggered: it observes the runtime, plans (pure),
//! executes, computes the status (pure) and writes it if it changed. Running
//! it again at any time converges to the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use serde::Serialize;
use tracing::Instrument;

use super::execute::{self, StartContext, Started};
use super::image;
pub use super::mode::ModeGate;
use super::observe::{self, Observed, State};
use super::plan::{self, Action as PlanAction, Gates};
use super::status::{self, Failure};
use super::translate::{self, NodeDirs};
use crate::backoff::Backoff;
use crate::cri::{CriError, Runtime};
use crate::k8s::{Cluster, ContainerEvent, EventSink, EventType, K8sError};
use crate::kubelet;
use crate::observe::{Metrics, SharedHealth, StartLabels, phase};
use crate::validation;

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

/// Who created a container whose timeline is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Creator {
    /// This agent.
    Agent,
    /// Someone else (a kubelet), observed.
    Other,
}

/// When things happened to one ephemeral container, as this agent saw them.
/// The same record whether the agent started it or watched another creator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timeline {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Who created it (unknown until created).
    pub creator: Option<Creator>,
    /// The agent received the watch event that first showed it in the pod
    /// spec (or, without one, the pass that first saw it began).
    #[serde(serialize_with = "rfc3339")]
    pub seen: SystemTime,
    /// This agent issued CreateContainer for it (the last attempt).
    #[serde(serialize_with = "rfc3339_opt")]
    pub create_issued: Option<SystemTime>,
    /// The runtime created it.
    #[serde(serialize_with = "rfc3339_opt")]
    pub created: Option<SystemTime>,
    /// The runtime started it.
    #[serde(serialize_with = "rfc3339_opt")]
    pub started: Option<SystemTime>,
    /// The runtime reports it exited.
    #[serde(serialize_with = "rfc3339_opt")]
    pub exited: Option<SystemTime>,
    /// The API status first showed it running.
    #[serde(serialize_with = "rfc3339_opt")]
    pub api_running: Option<SystemTime>,
    /// The API status first showed it terminated.
    #[serde(serialize_with = "rfc3339_opt")]
    pub api_terminated: Option<SystemTime>,
    /// The API server accepted this agent's status write saying running.
    #[serde(serialize_with = "rfc3339_opt")]
    pub running_written: Option<SystemTime>,
    /// The API server accepted this agent's status write saying terminated.
    #[serde(serialize_with = "rfc3339_opt")]
    pub terminated_written: Option<SystemTime>,
}

/// RFC 3339 with nanoseconds, e.g. `2026-11-22T04:02:25.606919465Z`.
fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    match k8s_openapi::jiff::Timestamp::try_from(*t) {
        Ok(ts) => s.serialize_str(&ts.to_string()),
        Err(_) => s.serialize_none(),
    }
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// The last failure of one container and when to try again.
#[derive(Debug, Clone)]
struct FailureEntry {
    failure: Failure,
    /// `None`: never again (refused, or created but not started).
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// An image pull failed: while backing off, show ImagePullBackOff.
    pull_failed: bool,
    image: String,
    shown: bool,
}

#[derive(Debug, Default)]
struct PodMemory {
    failures: BTreeMap<String, FailureEntry>,
    timelines: BTreeMap<String, Timeline>,
    /// The pod's resourceVersion when we last wrote, and what we wrote: the
    /// cache may not show our write yet, and writing it again is waste.
    last_written: Option<(String, Vec<ContainerStatus>)>,
    /// The runtime did not answer the last pass.
    runtime_down: bool,
    /// Containers told that the runtime is down, during the current outage.
    runtime_down_reported: HashSet<String>,
    /// Look again at this time (a start someone else began is under way).
    recheck_at: Option<Instant>,
    sandbox_details: Option<(String, SandboxDetails)>,
    /// Details of the pod's settled containers from the last observation,
    /// reused while their state holds (see [`observe::settled`]).
    settled: Arc<HashMap<String, observe::Container>>,
}

/// What the agent needs from a sandbox to recreate its config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxDetails {
    /// cgroup parent the sandbox was created with.
    pub cgroup_parent: String,
    /// Its log directory.
    pub log_directory: Option<String>,
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
    memory: Mutex<HashMap<String, PodMemory>>,
    exits: Mutex<HashMap<String, ObjectRef<Pod>>>,
    /// Pods whose last pass failed (runtime or API server unreachable, a
    /// status write refused), with the delay before the next try.
    retries: Mutex<HashMap<String, Backoff>>,
    /// Starts under way, by ticket: their containers' exits may arrive
    /// before the start returns and [`owner_of`](Self::owner_of) knows them.
    starts_in_flight: Mutex<BTreeSet<u64>>,
    next_start: AtomicU64,
    /// When a watch event for a pod with ephemeral containers arrived that
    /// no pass has taken yet (by pod uid): the start of `event_to_create`.
    received: Mutex<HashMap<String, SystemTime>>,
    /// One pass at a time per pod (by uid): the controller serialises its
    /// own passes, and this also orders them with the watch's fast path.
    passes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one start's ticket in [`Agent::starts_in_flight`] while it lives.
struct InFlight<'a>(&'a Agent, u64);

impl<'a> InFlight<'a> {
    fn new(agent: &'a Agent) -> Self {
        let ticket = agent.next_start.fetch_add(1, Ordering::SeqCst);
        lock(&agent.starts_in_flight).insert(ticket);
        InFlight(agent, ticket)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(&self.0.starts_in_flight).remove(&self.1);
    }
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
            memory: Mutex::default(),
            exits: Mutex::default(),
            retries: Mutex::default(),
            starts_in_flight: Mutex::default(),
            next_start: AtomicU64::new(0),
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
        let mem = lock(&self.memory);
        let seen = mem.get(uid).map(|m| &m.timelines);
        self.mode.starting()
            && ecs
                .iter()
                .any(|c| seen.is_none_or(|t| !t.contains_key(&c.name)))
    }

    fn take_event(&self, uid: &str) -> Option<SystemTime> {
        let mut received = lock(&self.received);
        let at = received.remove(uid);
        self.metrics.queue_depth.set(received.len() as i64);
        at
    }

    /// The pod that owns a runtime container, if it is an ephemeral
    /// container the agent has seen.
    pub fn owner_of(&self, container_id: &str) -> Option<ObjectRef<Pod>> {
        lock(&self.exits).get(container_id).cloned()
    }

    /// The pod that owns a runtime container whose exit was just reported:
    /// like [`owner_of`](Self::owner_of), but a container that exits at
    /// once may report its exit before its start returned, so this waits
    /// for the starts under way when the exit arrived (an id still unknown
    /// then is someone else's).
    pub async fn owner_of_exited(&self, container_id: &str) -> Option<ObjectRef<Pod>> {
        let pending = lock(&self.starts_in_flight).clone();
        loop {
            if let Some(pod) = self.owner_of(container_id) {
                return Some(pod);
            }
            let busy = {
                let now = lock(&self.starts_in_flight);
                pending.iter().any(|t| now.contains(t))
            };
            if !busy {
                return self.owner_of(container_id);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The pods that own a created or running ephemeral container (the ones
    /// an exit could change).
    pub fn live_owners(&self) -> Vec<ObjectRef<Pod>> {
        let owners: HashSet<ObjectRef<Pod>> = lock(&self.exits).values().cloned().collect();
        owners.into_iter().collect()
    }

    /// Forgets pods that are gone (the watch no longer lists them), so
    /// memory does not grow with every pod the node ever ran.
    pub fn retain_pods(&self, live: &[Arc<Pod>]) {
        let uids: HashSet<&str> = live.iter().map(|p| kubelet::uid(p)).collect();
        let refs: HashSet<ObjectRef<Pod>> = live
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect();
        lock(&self.memory).retain(|uid, _| uids.contains(uid.as_str()));
        lock(&self.retries).retain(|uid, _| uids.contains(uid.as_str()));
        lock(&self.exits).retain(|_, pod| refs.contains(pod));
        let mut received = lock(&self.received);
        received.retain(|uid, _| uids.contains(uid.as_str()));
        self.metrics.queue_depth.set(received.len() as i64);
        drop(received);
        lock(&self.passes).retain(|uid, _| uids.contains(uid.as_str()));
    }

    /// Every timeline recorded so far.
    pub fn timelines(&self) -> Vec<Timeline> {
        lock(&self.memory)
            .values()
            .flat_map(|m| m.timelines.values().cloned())
            .collect()
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
            lock(&self.memory).remove(&uid);
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

    async fn pass(&self, pod: &Pod, uid: &str, seen: SystemTime) -> Result<Action, ReconcileError> {
        let ecs = pod
            .spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.clone())
            .unwrap_or_default();
        let names: HashSet<&str> = ecs.iter().map(|c| c.name.as_str()).collect();
        let observed = match self.observe(uid, &names).await {
            Ok(o) => {
                let mut h = lock(&self.health);
                if h.runtime.is_err() {
                    tracing::info!("container runtime answers again");
                    h.runtime = Ok(self.runtime_name.clone());
                }
                drop(h);
                let mut mem = lock(&self.memory);
                let m = mem.entry(uid.to_string()).or_default();
                m.runtime_down = false;
                m.runtime_down_reported.clear();
                o
            }
            Err(e) => {
                self.metrics.reconcile_errors.inc();
                lock(&self.health).runtime = Err(e.to_string());
                self.report_runtime_down(pod, uid, &e);
                return Err(e.into());
            }
        };
        self.index(pod, &observed, &names);
        self.record_timelines(pod, &observed, seen, SystemTime::now());

        let starting = self.mode.starting() && !terminating(pod);
        let now = Instant::now();
        let grace = std::time::SystemTime::now()
            .checked_sub(CREATED_GRACE)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64);
        let gates = Gates {
            backing_off: self.backing_off(uid, now),
            refused: validation::refusals(pod),
            resume_created_before: grace.filter(|_| starting),
        };
        let planned = plan::plan(pod, &observed, &gates);
        let mut touched_runtime = false;
        if starting {
            for action in planned.actions {
                touched_runtime |= self.act(pod, uid, &observed, &gates, action).await;
            }
        }
        let observed = if touched_runtime {
            let o = self.observe(uid, &names).await?;
            self.index(pod, &o, &names);
            let now = SystemTime::now();
            self.record_timelines(pod, &o, now, now);
            o
        } else {
            observed
        };

        if starting {
            let failures = self.displayed_failures(pod, uid, Instant::now());
            let statuses =
                status::ephemeral_statuses(pod, &observed, &failures, &self.runtime_name);
            self.write_statuses(pod, uid, statuses).await?;
        } else if !self.mode.starting() {
            // What this agent started, it reports to the end, also after
            // the mode changed: a kubelet that lost the race for a
            // container does not report it (it shows its create failure,
            // then `waiting` forever). Everyone else's entries pass as the
            // API holds them.
            let ours = self.created_here(uid);
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
        Ok(Action::requeue(self.next_pass(uid, Instant::now())))
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
        let already = lock(&self.memory)
            .get(uid)
            .and_then(|m| m.last_written.clone())
            .is_some_and(|(at, written)| at == rv && written == statuses);
        if status::changed(pod, &statuses) && !already {
            self.cluster
                .patch_ephemeral_statuses(pod, &statuses)
                .await?;
            self.metrics.status_patches.inc();
            tracing::info!(statuses = %summary(&statuses), "status written");
            self.record_written(uid, &statuses, SystemTime::now());
            lock(&self.memory)
                .entry(uid.to_string())
                .or_default()
                .last_written = Some((rv, statuses));
        }
        Ok(())
    }

    /// The containers of the pod that this agent created (and started).
    fn created_here(&self, uid: &str) -> BTreeSet<String> {
        lock(&self.memory)
            .get(uid)
            .map(|m| {
                m.timelines
                    .iter()
                    .filter(|(_, t)| t.creator == Some(Creator::Agent))
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Observes the pod's containers, reusing the settled ones' details.
    async fn observe(&self, uid: &str, names: &HashSet<&str>) -> Result<Observed, CriError> {
        let known = lock(&self.memory)
            .get(uid)
            .map(|m| m.settled.clone())
            .unwrap_or_default();
        let observed = observe::observe_known(self.runtime.as_ref(), uid, names, &known).await?;
        lock(&self.memory)
            .entry(uid.to_string())
            .or_default()
            .settled = Arc::new(observe::settled(&observed));
        Ok(observed)
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
        let ran: HashSet<&str> = super::status::api_statuses(pod)
            .iter()
            .filter(|s| s.container_id.is_some())
            .map(|s| s.name.as_str())
            .collect();
        let (first, untold) = {
            let mut mem = lock(&self.memory);
            let m = mem.entry(uid.to_string()).or_default();
            let first = !m.runtime_down;
            m.runtime_down = true;
            let untold: Vec<String> = pod
                .spec
                .iter()
                .flat_map(|s| s.ephemeral_containers.iter().flatten())
                .filter(|c| !ran.contains(c.name.as_str()))
                .filter(|c| m.runtime_down_reported.insert(c.name.clone()))
                .map(|c| c.name.clone())
                .collect();
            (first, untold)
        };
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

    /// Carries out one planned action; returns whether the runtime changed.
    async fn act(
        &self,
        pod: &Pod,
        uid: &str,
        observed: &Observed,
        gates: &Gates,
        action: PlanAction,
    ) -> bool {
        match action {
            PlanAction::Fail {
                name,
                reason,
                message,
            } => {
                let permanent = gates.refused.contains_key(&name);
                let first = self.remember_failure(
                    uid,
                    &name,
                    "",
                    execute::StartFailure {
                        reason,
                        message: message.clone(),
                        retryable: !permanent,
                        created_id: None,
                    },
                );
                if first || !permanent {
                    self.events.record(ContainerEvent::new(
                        pod,
                        &name,
                        EventType::Warning,
                        "Failed",
                        format!("Error: {message}"),
                    ));
                }
                tracing::warn!(container = %name, reason, %message, "cannot start");
                self.metrics
                    .starts
                    .get_or_create(&StartLabels {
                        result: "failed".into(),
                        reason: reason.into(),
                    })
                    .inc();
                false
            }
            PlanAction::Resume { name, id } => {
                let _starting = InFlight::new(self);
                tracing::info!(container = %name, %id, "created but never started (its creator stopped half-way); starting it");
                let result = match self.runtime.start_container(&id).await {
                    Ok(()) => {
                        self.events.record(ContainerEvent::new(
                            pod,
                            &name,
                            EventType::Normal,
                            "Started",
                            format!("Started container {name}"),
                        ));
                        // Whoever starts it links its log, as the kubelet does.
                        super::logs::link_started(
                            self.runtime.as_ref(),
                            &self.dirs,
                            pod,
                            &name,
                            &id,
                        )
                        .await;
                        Ok(Started::Adopted { id })
                    }
                    Err(e) if e.is_started_elsewhere() => {
                        // The creator's own StartContainer got there first:
                        // still under way in the runtime (containerd finishes
                        // or aborts it even when the caller died) or settled
                        // since we looked. Not a failure: look again.
                        tracing::info!(container = %name, %id, error = %e.message(), "its creator's start got there first; looking again shortly");
                        lock(&self.memory)
                            .entry(uid.to_string())
                            .or_default()
                            .recheck_at = Some(Instant::now() + START_IN_PROGRESS_RECHECK);
                        return false;
                    }
                    Err(e) => {
                        self.events.record(ContainerEvent::new(
                            pod,
                            &name,
                            EventType::Warning,
                            "Failed",
                            format!("Error: {}", e.message().replace(&id, &name)),
                        ));
                        Err(execute::StartFailure {
                            reason: execute::reason::RUN_CONTAINER,
                            message: e.message(),
                            retryable: false,
                            created_id: Some(id),
                        })
                    }
                };
                self.after_start(pod, uid, &name, "", result)
            }
            PlanAction::Start { name, target_id } => {
                let _starting = InFlight::new(self);
                let Some(c) = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.ephemeral_containers.as_ref())
                    .and_then(|v| v.iter().find(|c| c.name == name))
                else {
                    return false;
                };
                let Some(sandbox) = observed.ready_sandbox() else {
                    return false;
                };
                let details = self.sandbox_details(uid, &sandbox.id).await;
                let mut sandbox_config = translate::sandbox_config(
                    pod,
                    &self.dirs.pod_logs,
                    sandbox.attempt,
                    &details.cgroup_parent,
                );
                if let Some(dir) = details.log_directory {
                    sandbox_config.log_directory = dir;
                }
                let auths = self
                    .pull_auths(pod, c.image.as_deref().unwrap_or_default())
                    .await;
                let cx = StartContext {
                    runtime: self.runtime.as_ref(),
                    events: self.events.as_ref(),
                    dirs: &self.dirs,
                    sandbox_id: &sandbox.id,
                    sandbox_config: &sandbox_config,
                    pull_auths: &auths,
                };
                let result = execute::start_with(
                    &cx,
                    Some(self.cluster.as_ref()),
                    pod,
                    c,
                    target_id.as_deref(),
                )
                .await;
                self.after_start(
                    pod,
                    uid,
                    &name,
                    c.image.as_deref().unwrap_or_default(),
                    result,
                )
            }
        }
    }

    fn after_start(
        &self,
        pod: &Pod,
        uid: &str,
        name: &str,
        image: &str,
        result: Result<Started, execute::StartFailure>,
    ) -> bool {
        let label = |result: &str, reason: &str| StartLabels {
            result: result.into(),
            reason: reason.into(),
        };
        match result {
            Ok(Started::Started { id, timings }) => {
                let mut mem = lock(&self.memory);
                let m = mem.entry(uid.to_string()).or_default();
                let retried = m.failures.remove(name).is_some();
                if let Some(t) = m.timelines.get_mut(name) {
                    t.creator = Some(Creator::Agent);
                    t.create_issued = Some(timings.create_issued);
                    t.created = Some(timings.created_at);
                    t.started = Some(timings.started_at);
                    if let Ok(d) = timings.started_at.duration_since(t.seen) {
                        self.metrics.seen_to_running.observe(d.as_secs_f64());
                    }
                    // A retry waited out its backoff: that is policy, not cost.
                    if !retried && let Ok(d) = timings.create_issued.duration_since(t.seen) {
                        self.metrics.phase(phase::EVENT_TO_CREATE, d.as_secs_f64());
                    }
                }
                for (p, d) in [
                    (phase::IMAGE, timings.image),
                    (phase::CREATE, timings.create),
                    (phase::START, timings.start),
                ] {
                    self.metrics.phase(p, d.as_secs_f64());
                }
                self.metrics
                    .starts
                    .get_or_create(&label("started", ""))
                    .inc();
                lock(&self.exits).insert(id, ObjectRef::from_obj(pod));
                true
            }
            Ok(Started::Adopted { id }) => {
                self.metrics
                    .starts
                    .get_or_create(&label("adopted", ""))
                    .inc();
                lock(&self.exits).insert(id, ObjectRef::from_obj(pod));
                true
            }
            Err(f) => {
                tracing::warn!(container = %name, reason = f.reason, message = %f.message, retryable = f.retryable, "start failed");
                self.metrics
                    .starts
                    .get_or_create(&label("failed", f.reason))
                    .inc();
                let created = f.created_id.is_some();
                self.remember_failure(uid, name, image, f);
                created
            }
        }
    }

    /// Records a failure; returns whether it is new (not a repeat).
    fn remember_failure(
        &self,
        uid: &str,
        name: &str,
        image: &str,
        f: execute::StartFailure,
    ) -> bool {
        let now = Instant::now();
        let mut mem = lock(&self.memory);
        let m = mem.entry(uid.to_string()).or_default();
        let previous = m.failures.remove(name);
        let first = previous
            .as_ref()
            .is_none_or(|p| p.failure.reason != f.reason || p.failure.message != f.message);
        let mut backoff = previous.map_or_else(|| self.backoff.clone(), |p| p.backoff);
        let retry = f.retryable && f.created_id.is_none();
        let retry_at = retry.then(|| now + backoff.next_delay());
        m.failures.insert(
            name.to_string(),
            FailureEntry {
                failure: Failure {
                    reason: f.reason.to_string(),
                    message: f.message,
                },
                retry_at,
                backoff,
                pull_failed: f.reason == execute::reason::ERR_IMAGE_PULL,
                image: image.to_string(),
                shown: false,
            },
        );
        first
    }

    fn backing_off(&self, uid: &str, now: Instant) -> HashSet<String> {
        lock(&self.memory)
            .get(uid)
            .map(|m| {
                m.failures
                    .iter()
                    .filter(|(_, f)| f.retry_at.is_none_or(|t| t > now))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The reasons the status shows; an image pull that failed shows as
    /// ImagePullBackOff while it waits, with a BackOff event, as the kubelet's.
    fn displayed_failures(&self, pod: &Pod, uid: &str, now: Instant) -> BTreeMap<String, Failure> {
        let mut mem = lock(&self.memory);
        let Some(m) = mem.get_mut(uid) else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for (name, f) in m.failures.iter_mut() {
            let waiting = f.retry_at.is_some_and(|t| t > now);
            if f.pull_failed
                && waiting
                && f.shown
                && f.failure.reason == execute::reason::ERR_IMAGE_PULL
            {
                let previous = f.failure.message.clone();
                f.failure = Failure {
                    reason: execute::reason::IMAGE_PULL_BACK_OFF.into(),
                    message: format!(
                        "Back-off pulling image {:?}: ErrImagePull: {previous}",
                        f.image
                    ),
                };
                self.events.record(ContainerEvent::new(
                    pod,
                    name,
                    EventType::Normal,
                    "BackOff",
                    format!("Back-off pulling image {:?}", f.image),
                ));
            }
            f.shown = true;
            out.insert(name.clone(), f.failure.clone());
        }
        out
    }

    fn next_pass(&self, uid: &str, now: Instant) -> Duration {
        let soonest = lock(&self.memory).get_mut(uid).and_then(|m| {
            m.failures
                .values()
                .filter_map(|f| f.retry_at)
                .chain(m.recheck_at.take())
                .filter(|t| *t > now)
                .min()
        });
        match soonest {
            Some(t) => (t - now).min(self.resync),
            None => self.resync,
        }
    }

    fn index(&self, pod: &Pod, observed: &Observed, names: &HashSet<&str>) {
        let mut exits = lock(&self.exits);
        for c in observed
            .containers
            .iter()
            .filter(|c| names.contains(c.name.as_str()))
        {
            if c.state != State::Exited {
                exits.insert(c.id.clone(), ObjectRef::from_obj(pod));
            } else {
                exits.remove(&c.id);
            }
        }
    }

    /// The API server accepted `statuses`: note the first running and
    /// terminated write of each container this agent started.
    fn record_written(&self, uid: &str, statuses: &[ContainerStatus], now: SystemTime) {
        let mut mem = lock(&self.memory);
        let Some(m) = mem.get_mut(uid) else {
            return;
        };
        for s in statuses {
            let Some(t) = m.timelines.get_mut(&s.name) else {
                continue;
            };
            let state = s.state.as_ref();
            if state.is_some_and(|st| st.running.is_some()) && t.running_written.is_none() {
                t.running_written = Some(now);
                if let Some(d) = t.started.and_then(|s| now.duration_since(s).ok()) {
                    self.metrics.phase(phase::START_TO_STATUS, d.as_secs_f64());
                }
            }
            if state.is_some_and(|st| st.terminated.is_some()) && t.terminated_written.is_none() {
                t.terminated_written = Some(now);
                if let Some(d) = t.exited.and_then(|e| now.duration_since(e).ok()) {
                    self.metrics.phase(phase::EXIT_TO_STATUS, d.as_secs_f64());
                }
            }
        }
    }

    fn record_timelines(&self, pod: &Pod, observed: &Observed, seen: SystemTime, now: SystemTime) {
        let uid = kubelet::uid(pod);
        let pod_key = format!("{}/{}", kubelet::namespace(pod), kubelet::name(pod));
        let api: BTreeMap<&str, &ContainerStatus> = super::status::api_statuses(pod)
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut mem = lock(&self.memory);
        let m = mem.entry(uid.to_string()).or_default();
        for c in pod
            .spec
            .iter()
            .flat_map(|s| s.ephemeral_containers.iter().flatten())
        {
            let t = m.timelines.entry(c.name.clone()).or_insert_with(|| {
                tracing::info!(container = %c.name, "ephemeral container seen in the spec");
                Timeline {
                    pod: pod_key.clone(),
                    container: c.name.clone(),
                    creator: None,
                    seen,
                    create_issued: None,
                    created: None,
                    started: None,
                    exited: None,
                    api_running: None,
                    api_terminated: None,
                    running_written: None,
                    terminated_written: None,
                }
            });
            let before = t.clone();
            if let Some(rc) = observed.newest(&c.name) {
                if t.created.is_none() {
                    t.creator.get_or_insert(Creator::Other);
                    t.created = ns_time(rc.created_at);
                }
                if t.started.is_none() {
                    t.started = ns_time(rc.started_at);
                }
                if t.exited.is_none() && rc.state == State::Exited {
                    t.exited = ns_time(rc.finished_at).or(Some(now));
                }
            }
            if let Some(st) = api.get(c.name.as_str()).and_then(|s| s.state.as_ref()) {
                if st.running.is_some() && t.api_running.is_none() {
                    t.api_running = Some(now);
                }
                if st.terminated.is_some() && t.api_terminated.is_none() {
                    t.api_terminated = Some(now);
                }
            }
            if *t != before {
                tracing::info!(container = %c.name, timeline = %serde_json::to_string(t).unwrap_or_default(), "timeline");
            }
        }
    }

    async fn sandbox_details(&self, uid: &str, sandbox_id: &str) -> SandboxDetails {
        if let Some((id, d)) = lock(&self.memory)
            .get(uid)
            .and_then(|m| m.sandbox_details.clone())
            && id == sandbox_id
        {
            return d;
        }
        let details = match self.runtime.pod_sandbox_status(sandbox_id, true).await {
            Ok(resp) => resp
                .info
                .get("info")
                .map(|s| parse_sandbox_info(s))
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "sandbox status; using an empty cgroup parent");
                SandboxDetails::default()
            }
        };
        lock(&self.memory)
            .entry(uid.to_string())
            .or_default()
            .sandbox_details = Some((sandbox_id.to_string(), details.clone()));
        details
    }

    async fn pull_auths(&self, pod: &Pod, image: &str) -> Vec<crate::cri::proto::AuthConfig> {
        let names: Vec<String> = pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.as_ref())
            .map(|v| v.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            return vec![];
        }
        match self
            .cluster
            .pull_secrets(kubelet::namespace(pod), &names)
            .await
        {
            Ok(configs) => image::credentials_for(image, &configs),
            Err(e) => {
                tracing::warn!(error = %e, "reading image pull secrets; pulling without them");
                vec![]
            }
        }
    }
}

/// containerd's verbose sandbox info holds the config it was created with.
pub fn parse_sandbox_info(info: &str) -> SandboxDetails {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(info) else {
        return SandboxDetails::default();
    };
    let config = &v["config"];
    let linux = &config["linux"];
    let cgroup_parent = linux["cgroup_parent"]
        .as_str()
        .or(linux["cgroupParent"].as_str())
        .unwrap_or_default()
        .to_string();
    let log_directory = config["log_directory"]
        .as_str()
        .or(config["logDirectory"].as_str())
        .map(str::to_string);
    SandboxDetails {
        cgroup_parent,
        log_directory,
    }
}

/// A hash of the parts of a pod a reconcile pass reads, so that the watch
/// triggers a pass only when one of them changed: the ephemeral containers
/// and their API statuses (someone else may rewrite them), the statuses of
/// the other containers (a target that starts unblocks a waiting start),
/// the phase and the deletion timestamp (stop starting). Label, annotation,
/// condition and IP updates — most of a node's pod traffic — cost no pass
/// and no runtime call. Exits, start retries and the periodic resync
/// schedule their passes themselves, past this filter.
pub fn trigger_fingerprint(pod: &Pod) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let inputs = serde_json::json!([
        &pod.metadata.uid,
        spec.map(|s| &s.ephemeral_containers),
        spec.map(|s| &s.node_name),
        status.map(|s| &s.ephemeral_container_statuses),
        status.map(|s| &s.container_statuses),
        status.map(|s| &s.init_container_statuses),
        status.map(|s| &s.phase),
        &pod.metadata.deletion_timestamp,
    ]);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    inputs.to_string().hash(&mut h);
    Some(h.finish())
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        || pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed")
}

fn ns_time(ns: i64) -> Option<SystemTime> {
    (ns > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_info_gives_cgroup_parent_and_log_dir() {
        let info = r#"{"pid":1,"config":{"log_directory":"/var/log/pods/ns_p_u",
            "linux":{"cgroup_parent":"/kubepods/besteffort/podu"}}}"#;
        assert_eq!(
            parse_sandbox_info(info),
            SandboxDetails {
                cgroup_parent: "/kubepods/besteffort/podu".into(),
                log_directory: Some("/var/log/pods/ns_p_u".into()),
            }
        );
        assert_eq!(parse_sandbox_info("not json"), SandboxDetails::default());
    }

    #[test]
    fn timelines_serialise_times_as_rfc3339() {
        let t = Timeline {
            pod: "default/web".into(),
            container: "dbg".into(),
            creator: Some(Creator::Agent),
            seen: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500_000_001),
            create_issued: None,
            created: None,
            started: None,
            exited: None,
            api_running: None,
            api_terminated: None,
            running_written: None,
            terminated_written: None,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["seen"], "1970-01-01T00:00:01.500000001Z");
        assert_eq!(v["created"], serde_json::Value::Null);
        assert_eq!(v["creator"], "agent");
    }

    #[test]
    fn only_changes_a_pass_reads_trigger_one() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "uid": "u1", "labels": {"a": "1"}},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        let base = trigger_fingerprint(&pod);
        pod.metadata.labels = Some([("a".to_string(), "2".to_string())].into());
        pod.metadata.annotations = Some([("b".to_string(), "x".to_string())].into());
        pod.metadata.resource_version = Some("9".into());
        pod.status.as_mut().unwrap().pod_ip = Some("10.0.0.1".into());
        assert_eq!(trigger_fingerprint(&pod), base, "labels, annotations, IPs");
        let mut appended = pod.clone();
        appended.spec.as_mut().unwrap().ephemeral_containers = Some(vec![
            serde_json::from_value(serde_json::json!({"name": "dbg"})).unwrap(),
        ]);
        assert_ne!(
            trigger_fingerprint(&appended),
            base,
            "an ephemeral container"
        );
        let mut target_started = pod.clone();
        target_started.status.as_mut().unwrap().container_statuses = Some(vec![
            serde_json::from_value(serde_json::json!({
                "name": "app", "ready": true, "restartCount": 0, "image": "", "imageID": "",
                "containerID": "containerd://1",
            }))
            .unwrap(),
        ]);
        assert_ne!(
            trigger_fingerprint(&target_started),
            base,
            "a target started"
        );
        let mut deleted = pod.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_ne!(trigger_fingerprint(&deleted), base, "deletion");
    }
}
