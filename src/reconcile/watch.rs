//! The pod watch: what calls passes. A `kube` controller over the pods bound
//! to this node (field selector `spec.nodeName`) runs [`Agent::reconcile`]
//! for each change a pass reads ([`trigger_fingerprint`]), for each pod the
//! exit forwarder requeues, and after each pass's requested delay (retries,
//! the periodic resync). On the way into the controller every event is
//! looked at once (`look_at_event`): it is stamped (the start of
//! `event_to_create`), and a pod that gained an ephemeral container gets its
//! pass at once — the fast path, ahead of the controller's queue.
//!
//! Owns: the watch, the controller, the fast path, the `pods: synced` line
//! of `/readyz`, a pass of every pod when the mode turns to starting, and
//! forgetting deleted pods once per resync. It decides
//! nothing about containers: that is the pass.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::agent::{Agent, ReconcileError};
use crate::kubelet;
use crate::observe::SharedHealth;

/// Reconcile passes at once (the controller's, and the fast path's).
const CONCURRENCY: usize = 32;

/// The pod watch of one node.
pub struct PodWatch {
    /// The API server.
    pub client: kube::Client,
    /// This node.
    pub node: String,
    /// The passes.
    pub agent: Arc<Agent>,
    /// `/readyz` says when the first list arrived.
    pub health: SharedHealth,
    /// How often deleted pods are forgotten.
    pub resync: Duration,
    /// Asks for a pass of a pod now (every pod when the mode turns to
    /// starting).
    pub requeue: mpsc::Sender<ObjectRef<Pod>>,
    /// Pods to reconcile now (from the exit forwarder, and `requeue`).
    pub requeued: mpsc::Receiver<ObjectRef<Pod>>,
}

impl PodWatch {
    /// Watches and reconciles until `shutdown`; helper tasks go to `tasks`.
    /// Returns once no pass runs any more.
    pub async fn run(self, tasks: &mut JoinSet<()>, shutdown: CancellationToken) {
        let pods: kube::Api<Pod> = kube::Api::all(self.client);
        let selector = format!("spec.nodeName={}", self.node);
        // The controller's own watch, with a look at each event on the way.
        let (reader, writer) = reflector::store();
        // Fast passes hold a permit each: taking them all waits for them.
        let fast = Arc::new(Semaphore::new(CONCURRENCY));
        let watch = watcher(pods, watcher::Config::default().fields(&selector))
            .inspect(look_at_event(self.agent.clone(), fast.clone()));
        // Every pod change updates the cache; only changes a pass reads
        // trigger one.
        let triggers = reflector(writer, watch)
            .applied_objects()
            .predicate_filter(trigger_fingerprint, Default::default());
        let controller = Controller::for_stream(triggers, reader)
            .with_config(controller::Config::default().concurrency(CONCURRENCY as u16))
            .reconcile_on(ReceiverStream::new(self.requeued))
            .graceful_shutdown_on(shutdown.clone().cancelled_owned());
        tasks.spawn(super::mode::pass_all_when_starting(
            self.agent.mode.subscribe(),
            controller.store(),
            self.requeue,
            shutdown.clone(),
        ));
        tasks.spawn(mark_synced(
            controller.store(),
            self.health,
            shutdown.clone(),
        ));
        tasks.spawn(prune(
            controller.store(),
            self.agent.clone(),
            self.resync,
            shutdown.clone(),
        ));

        let error_policy = |pod: Arc<Pod>, err: &ReconcileError, agent: Arc<Agent>| {
            Action::requeue(failed_pass(&agent, &pod, err))
        };
        controller
            .run(
                |pod, agent: Arc<Agent>| async move { agent.reconcile(&pod).await },
                error_policy,
                self.agent,
            )
            .for_each(|res| async move {
                match res {
                    Ok(_) => {}
                    Err(controller::Error::ReconcilerFailed(..)) => {}
                    Err(e) => tracing::warn!(error = %e, "pod watch"),
                }
            })
            .await;
        let _ = fast.acquire_many(CONCURRENCY as u32).await;
    }
}

/// Sets `pods_synced` once the first list is in the cache.
async fn mark_synced(store: Store<Pod>, health: SharedHealth, cancel: CancellationToken) {
    // kube's store readiness wakes only its latest waiter (the controller's
    // own), so look again now and then instead of waiting.
    loop {
        let ready = tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready());
        tokio::select! {
            r = ready => match r {
                Ok(Ok(())) => {
                    health.lock().unwrap_or_else(|e| e.into_inner()).pods_synced = true;
                    tracing::info!("pod list synced");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            },
            _ = cancel.cancelled() => return,
        }
    }
}

/// Forgets deleted pods once per resync; while starting containers, also
/// removes the legacy log links of containers the runtime no longer holds
/// (the kubelet removes them with the container).
async fn prune(store: Store<Pod>, agent: Arc<Agent>, every: Duration, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        agent.retain_pods(&store.state());
        if agent.mode.starting() {
            super::logs::sweep_node(agent.runtime.as_ref(), &agent.dirs).await;
        }
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
    permits: Arc<Semaphore>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
