//! Whether the agent starts ephemeral containers now: the gate every pass
//! reads ([`ModeGate`]), and for `--mode auto` the decision from the signs
//! of a kubelet ([`decide`], pure) and the task that re-decides on every
//! change of them and whenever a freshness window runs out ([`auto`]);
//! when it turns to starting, every pod gets a pass at once
//! ([`pass_all_when_starting`]).
//!
//! The rule (see `docs/semantics.md`): a kubelet serves this node if any of
//! these holds — its Lease in `kube-node-lease` was renewed within its
//! `leaseDurationSeconds`; the Node's `Ready` condition has a
//! `lastHeartbeatTime` within the node-monitor grace period; a kubelet
//! registered the Node (`status.nodeInfo.kubeletVersion` set and
//! `status.daemonEndpoints.kubeletEndpoint.Port` > 0) and its Lease is not
//! there yet. The agent starts containers only on positive evidence that
//! none holds (both sources listed; every window run out, or no Node and no
//! Lease at all, as on the testbed). A source not listed yet or whose watch
//! failed means "cannot tell": nothing starts.
//!
//! Invariant: in `--mode auto` the gate says "observing" until the first
//! decision from listed (or failed) sources; nothing starts before.
//!
//! Owns: the gate and the rule. Must not touch the runtime or a pod: a
//! pass reads the gate, and the pod watch asks for the passes
//! ([`pass_all_when_starting`]); the signs themselves are read by
//! `k8s::kubelet_presence`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::k8s::kubelet_presence::{self, Evidence, NODE_LEASE_NAMESPACE, Seen};
use crate::observe::{Metrics, ModeChangeLabels, ModeLabels, SharedHealth};

/// The node lifecycle controller's default `--node-monitor-grace-period`:
/// how long a Node's heartbeat counts as a live kubelet. 50 s since
/// Kubernetes 1.32 (kubernetes/kubernetes#126287, in
/// `pkg/controller/nodelifecycle/config/v1alpha1/defaults.go`; 40 s before).
pub const NODE_MONITOR_GRACE_PERIOD: Duration = Duration::from_secs(50);

/// The kubelet's default `nodeLeaseDurationSeconds` (its config defaults),
/// for a Lease that does not say its own duration. The kubelet renews it
/// every quarter of that (`nodeLeaseRenewIntervalFraction`, 10 s).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(40);

/// What the gate says before the first decision in `--mode auto`.
pub const WAITING: &str = "waiting for the first look at the node's Lease and Node";

/// What the gate holds: whether containers are started, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeState {
    /// Containers are started (and every status written) now.
    pub starting: bool,
    /// A sentence saying why.
    pub why: String,
}

/// Whether the agent starts containers now; passes read it, the mode task
/// (or the flag) sets it, and anyone can wait for a change.
pub struct ModeGate {
    state: watch::Sender<ModeState>,
}

impl ModeGate {
    /// A gate that starts (`true`) or observes.
    pub fn new(starting: bool, why: impl Into<String>) -> Self {
        ModeGate {
            state: watch::Sender::new(ModeState {
                starting,
                why: why.into(),
            }),
        }
    }

    /// Whether containers are started (and statuses written) now.
    pub fn starting(&self) -> bool {
        self.state.borrow().starting
    }

    /// Changes the mode; returns whether it changed (the reason alone
    /// changing is not a change).
    pub fn set(&self, starting: bool, why: impl Into<String>) -> bool {
        let why = why.into();
        let mut changed = false;
        self.state.send_if_modified(|s| {
            changed = s.starting != starting;
            let modified = changed || s.why != why;
            *s = ModeState { starting, why };
            modified
        });
        changed
    }

    /// Follows the gate: the receiver sees every change (of the mode or
    /// of its reason).
    pub fn subscribe(&self) -> watch::Receiver<ModeState> {
        self.state.subscribe()
    }

    /// One line for logs and `/readyz`.
    pub fn describe(&self) -> String {
        describe(&self.state.borrow())
    }
}

fn describe(s: &ModeState) -> String {
    if s.starting {
        format!("starting ephemeral containers ({})", s.why)
    } else {
        format!("observing only ({})", s.why)
    }
}

/// The rule a decision rests on (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The first look has not completed.
    Waiting,
    /// The Lease or the Node could not be read.
    CannotTell,
    /// The Lease was renewed within its duration.
    LeaseRenewed,
    /// The Node's Ready heartbeat is within the grace period.
    ReadyHeartbeat,
    /// A kubelet registered the Node and has not created its Lease yet.
    RegisteredAwaitingLease,
    /// Positive evidence that no kubelet serves the node.
    NoKubelet,
}

impl Rule {
    /// The `rule` label of `ephemerald_mode`.
    pub fn label(self) -> &'static str {
        match self {
            Rule::Waiting => "waiting",
            Rule::CannotTell => "cannot_tell",
            Rule::LeaseRenewed => "lease_renewed",
            Rule::ReadyHeartbeat => "ready_heartbeat",
            Rule::RegisteredAwaitingLease => "registered_awaiting_lease",
            Rule::NoKubelet => "no_kubelet",
        }
    }
}

/// What auto mode does now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Start containers.
    pub start: bool,
    /// The rule that decided (the first that holds, when several do).
    pub rule: Rule,
    /// A sentence saying why.
    pub why: String,
    /// When the decision may change by time alone: the last of the
    /// freshness windows it rests on runs out. `None`: only a change of
    /// the Lease or the Node can change it.
    pub recheck_at: Option<SystemTime>,
}

/// The windows of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// How long a Ready heartbeat counts ([`NODE_MONITOR_GRACE_PERIOD`]).
    pub node_monitor_grace: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            node_monitor_grace: NODE_MONITOR_GRACE_PERIOD,
        }
    }
}

/// The lease's last renewal and how long it holds, if it was renewed.
fn lease_window(lease: &Lease) -> Option<(SystemTime, Duration)> {
    let spec = lease.spec.as_ref()?;
    let renewed = SystemTime::from(spec.renew_time.as_ref()?.0);
    let duration = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map_or(DEFAULT_LEASE_DURATION, |s| {
            Duration::from_secs(u64::from(s.unsigned_abs()))
        });
    Some((renewed, duration))
}

/// The Node's `Ready` condition's `lastHeartbeatTime`.
fn ready_heartbeat(node: &Node) -> Option<SystemTime> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready")?;
    Some(SystemTime::from(ready.last_heartbeat_time.as_ref()?.0))
}

/// The kubelet version of a Node that a kubelet registered: the kubelet
/// fills `nodeInfo` and its own endpoint (`daemonEndpoints`) on
/// registration (`pkg/kubelet/kubelet_node_status.go`, `initialNode` and
/// the node status setters); a Node created by hand has neither.
fn registered_by_kubelet(node: &Node) -> Option<&str> {
    let status = node.status.as_ref()?;
    let version = status
        .node_info
        .as_ref()
        .map(|i| i.kubelet_version.as_str())
        .filter(|v| !v.is_empty())?;
    let port = status
        .daemon_endpoints
        .as_ref()?
        .kubelet_endpoint
        .as_ref()?
        .port;
    (port > 0).then_some(version)
}

/// Seconds between two times, for sentences (0 when `then` is later).
fn secs(now: SystemTime, then: SystemTime) -> String {
    let d = now.duration_since(then).unwrap_or_default();
    format!("{:.1}s", d.as_secs_f64())
}

/// Decides from the evidence at `now` (pure: no clock, no I/O).
pub fn decide(e: &Evidence, now: SystemTime, w: &Windows) -> Decision {
    let hold = |rule, why: String| Decision {
        start: false,
        rule,
        why,
        recheck_at: None,
    };
    let failures: Vec<&str> = [e.lease.failure(), e.node.failure()]
        .into_iter()
        .flatten()
        .collect();
    if !failures.is_empty() {
        return hold(
            Rule::CannotTell,
            format!(
                "{}; cannot tell whether a kubelet serves this node, so not starting",
                failures.join("; ")
            ),
        );
    }
    if !e.settled() {
        return hold(Rule::Waiting, WAITING.into());
    }
    let node = &e.node_name;
    let lease_name = format!("Lease {NODE_LEASE_NAMESPACE}/{node}");
    // Signs of a kubelet: (rule, sentence, until when it holds).
    let mut signs: Vec<Sign> = Vec::new();
    // What shows that no kubelet does, when no sign holds.
    let mut node_facts: Vec<String> = Vec::new();
    let mut lease_facts: Vec<String> = Vec::new();
    lease_signs(e, now, &lease_name, &mut signs, &mut lease_facts);
    node_signs(e, now, w, &lease_name, &mut signs, &mut node_facts);
    if let Some((rule, _, _)) = signs.first() {
        let sentences: Vec<&str> = signs.iter().map(|(_, s, _)| s.as_str()).collect();
        // Until every sign has run out; one without an end holds until a
        // change of the Lease or the Node.
        let recheck_at = signs
            .iter()
            .map(|(_, _, until)| *until)
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max());
        return Decision {
            start: false,
            rule: *rule,
            why: format!(
                "a kubelet serves this node: {}; it starts ephemeral containers itself",
                sentences.join("; ")
            ),
            recheck_at,
        };
    }
    node_facts.extend(lease_facts);
    Decision {
        start: true,
        rule: Rule::NoKubelet,
        why: format!("{}: no kubelet serves this node", node_facts.join("; ")),
        recheck_at: None,
    }
}

/// A sign of a kubelet: its rule, a sentence, and until when it holds.
type Sign = (Rule, String, Option<SystemTime>);

/// What the Lease shows: a sign while it is within its duration, else a
/// fact for the sentence that no kubelet serves the node.
fn lease_signs(
    e: &Evidence,
    now: SystemTime,
    lease_name: &str,
    signs: &mut Vec<Sign>,
    lease_facts: &mut Vec<String>,
) {
    match &e.lease {
        Seen::Present(lease) => match lease_window(lease) {
            Some((renewed, duration)) if now < renewed + duration => signs.push((
                Rule::LeaseRenewed,
                format!(
                    "{lease_name} renewed {} ago (it holds {}s)",
                    secs(now, renewed),
                    duration.as_secs()
                ),
                Some(renewed + duration),
            )),
            Some((renewed, duration)) => lease_facts.push(format!(
                "{lease_name} expired {} ago",
                secs(now, renewed + duration)
            )),
            None => lease_facts.push(format!("{lease_name} was never renewed")),
        },
        _ => lease_facts.push(format!("no {lease_name}")),
    }
}

/// What the Node shows: a fresh Ready heartbeat, or a registration by a
/// kubelet whose Lease is not there yet, is a sign; else facts.
fn node_signs(
    e: &Evidence,
    now: SystemTime,
    w: &Windows,
    lease_name: &str,
    signs: &mut Vec<Sign>,
    node_facts: &mut Vec<String>,
) {
    let node = &e.node_name;
    match &e.node {
        Seen::Present(n) => {
            match ready_heartbeat(n) {
                Some(hb) if now < hb + w.node_monitor_grace => signs.push((
                    Rule::ReadyHeartbeat,
                    format!(
                        "Node {node}'s Ready heartbeat is {} old (grace {}s)",
                        secs(now, hb),
                        w.node_monitor_grace.as_secs()
                    ),
                    Some(hb + w.node_monitor_grace),
                )),
                Some(hb) => node_facts.push(format!(
                    "Node {node}'s last Ready heartbeat is {} old, past the {}s grace",
                    secs(now, hb),
                    w.node_monitor_grace.as_secs()
                )),
                None => node_facts.push(format!("Node {node} has no Ready heartbeat")),
            }
            // The kubelet's lease controller cannot create the Lease before
            // the Node exists (it sets the Node as the Lease's owner, and
            // tries again a renew interval later): right after
            // registration there is a Node and no Lease.
            if let Some(version) = registered_by_kubelet(n)
                && !matches!(e.lease, Seen::Present(_))
            {
                signs.push((
                    Rule::RegisteredAwaitingLease,
                    format!(
                        "a kubelet {version} registered Node {node} and its {lease_name} is not there yet"
                    ),
                    None,
                ));
            }
        }
        _ => node_facts.push(format!("no Node {node}")),
    }
}

/// Starts `--mode auto`: follows the node's Lease and Node, decides, and
/// keeps the gate current (tasks in `tasks`, ending with `cancel`).
/// Returns the gate once the first decision is made (or at shutdown);
/// until then it says "observing".
pub async fn auto(
    client: kube::Client,
    node: &str,
    metrics: Arc<Metrics>,
    health: SharedHealth,
    tasks: &mut JoinSet<()>,
    cancel: CancellationToken,
) -> Arc<ModeGate> {
    let gate = Arc::new(ModeGate::new(false, WAITING));
    let errors = metrics.clone();
    let (evidence, follow_node) = kubelet_presence::follow(
        client,
        node,
        Arc::new(move |call, code| errors.error("api", call, code)),
        cancel.clone(),
    );
    tasks.spawn(follow_node);
    let (first_tx, first_rx) = oneshot::channel();
    tasks.spawn(keep_deciding(
        gate.clone(),
        evidence,
        Windows::default(),
        metrics,
        health,
        first_tx,
        cancel.clone(),
    ));
    tokio::select! {
        _ = first_rx => {}
        _ = cancel.cancelled() => {}
    }
    gate
}

/// Once the mode turns to starting, gives every pod with ephemeral
/// containers a pass now (`requeue`), not at its next resync.
pub async fn pass_all_when_starting(
    mut mode: watch::Receiver<ModeState>,
    pods: Store<Pod>,
    requeue: mpsc::Sender<ObjectRef<Pod>>,
    cancel: CancellationToken,
) {
    let mut was = mode.borrow_and_update().starting;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = mode.changed() => if r.is_err() { return },
        }
        let now = mode.borrow_and_update().starting;
        if now && !was {
            for pod in pods.state() {
                let has_ephemeral = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.ephemeral_containers.as_ref())
                    .is_some_and(|v| !v.is_empty());
                if has_ephemeral
                    && requeue
                        .send(ObjectRef::from_obj(pod.as_ref()))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }
        was = now;
    }
}

/// Re-decides on every change of the evidence and when the decision's
/// window runs out; tells `first` after the first decision from settled
/// evidence. Logs and counts each change of the mode after that.
async fn keep_deciding(
    gate: Arc<ModeGate>,
    mut evidence: watch::Receiver<Evidence>,
    windows: Windows,
    metrics: Arc<Metrics>,
    health: SharedHealth,
    first: oneshot::Sender<()>,
    cancel: CancellationToken,
) {
    let mut first = Some(first);
    loop {
        let seen = evidence.borrow_and_update().clone();
        let now = SystemTime::now();
        let d = decide(&seen, now, &windows);
        let changed = gate.set(d.start, d.why.clone());
        metrics.starting.set(i64::from(d.start));
        metrics.mode.clear();
        metrics
            .mode
            .get_or_create(&ModeLabels {
                mode: if d.start { "starting" } else { "observing" }.into(),
                rule: d.rule.label().into(),
            })
            .set(1);
        health.lock().unwrap_or_else(|e| e.into_inner()).mode = gate.describe();
        if seen.settled() && first.is_none() && changed {
            metrics
                .mode_changes
                .get_or_create(&ModeChangeLabels {
                    to: if d.start { "starting" } else { "observing" }.into(),
                })
                .inc();
            if d.start {
                tracing::warn!(rule = d.rule.label(), "mode changed: {}", gate.describe());
            } else {
                tracing::info!(rule = d.rule.label(), "mode changed: {}", gate.describe());
            }
        } else {
            tracing::debug!(rule = d.rule.label(), "mode: {}", gate.describe());
        }
        if seen.settled()
            && let Some(tx) = first.take()
        {
            let _ = tx.send(());
        }
        // Exactly when the window runs out (a millisecond past it, so the
        // next decision sees it run out), not on a polling period.
        let wake = d.recheck_at.map(|t| {
            t.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(1)
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = evidence.changed() => if r.is_err() { return },
            _ = async {
                match wake {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(test)]
mod tests;
