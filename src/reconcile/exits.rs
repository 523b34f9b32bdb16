//! Exits: which runtime containers belong to which pod, and the exit
//! forwarder that turns a container's exit into a pass of its pod at once
//! (instead of at the next resync).
//!
//! Owns: the [`ExitIndex`] (container id → pod, for the ephemeral
//! containers a pass has seen created or running, plus the starts still
//! under way) and the [`Forwarder`] task. It reads exits from [`events`]
//! and asks the runtime only whether an exit shows yet; it never starts,
//! stops or writes anything — the pass it requeues does.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::observe::{Observed, State};
use crate::cri::{self, Runtime};
use crate::events;

/// Container id → owning pod, for exit events.
#[derive(Default)]
pub struct ExitIndex {
    owners: Mutex<HashMap<String, ObjectRef<Pod>>>,
    /// Starts under way, by ticket: their containers' exits may arrive
    /// before the start returns and [`owner_of`](Self::owner_of) knows them.
    starts_in_flight: Mutex<BTreeSet<u64>>,
    next_start: AtomicU64,
}

/// Holds one start's ticket in [`ExitIndex`] while it lives.
pub struct InFlight<'a>(&'a ExitIndex, u64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(&self.0.starts_in_flight).remove(&self.1);
    }
}

impl ExitIndex {
    /// A start begins; the ticket ends it when dropped.
    pub fn start(&self) -> InFlight<'_> {
        let ticket = self.next_start.fetch_add(1, Ordering::SeqCst);
        lock(&self.starts_in_flight).insert(ticket);
        InFlight(self, ticket)
    }

    /// `id` is `pod`'s (just started or adopted).
    pub fn insert(&self, id: String, pod: &Pod) {
        lock(&self.owners).insert(id, ObjectRef::from_obj(pod));
    }

    /// Indexes the observed ephemeral containers (`names`) of `pod`: the
    /// live ones may exit, the exited ones are done.
    pub fn index(&self, pod: &Pod, observed: &Observed, names: &HashSet<&str>) {
        let mut owners = lock(&self.owners);
        for c in observed
            .containers
            .iter()
            .filter(|c| names.contains(c.name.as_str()))
        {
            if c.state != State::Exited {
                owners.insert(c.id.clone(), ObjectRef::from_obj(pod));
            } else {
                owners.remove(&c.id);
            }
        }
    }

    /// The pod that owns a runtime container, if it is an ephemeral
    /// container the agent has seen.
    pub fn owner_of(&self, container_id: &str) -> Option<ObjectRef<Pod>> {
        lock(&self.owners).get(container_id).cloned()
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
        let owners: HashSet<ObjectRef<Pod>> = lock(&self.owners).values().cloned().collect();
        owners.into_iter().collect()
    }

    /// Keeps only the containers of the pods in `live`.
    pub fn retain(&self, live: &HashSet<ObjectRef<Pod>>) {
        lock(&self.owners).retain(|_, pod| live.contains(pod));
    }
}

/// The exit forwarder: exit events → the owning pod → a pass at once.
pub struct Forwarder {
    /// The runtime (its event stream, and whether an exit shows yet).
    pub runtime: Arc<dyn Runtime>,
    /// containerd's socket, for its `/tasks/exit` events.
    pub containerd_socket: Option<PathBuf>,
    /// The containerd namespace of the CRI.
    pub namespace: String,
    /// Who owns which container.
    pub index: Arc<ExitIndex>,
    /// Where pods to reconcile go.
    pub requeue: mpsc::Sender<ObjectRef<Pod>>,
}

impl Forwarder {
    /// Starts the forwarder's tasks in `tasks`; they end with `cancel`.
    pub fn spawn(self, tasks: &mut JoinSet<()>, cancel: CancellationToken) {
        let (exit_tx, mut exit_rx) = mpsc::channel(256);
        let (opened_tx, mut opened_rx) = mpsc::channel(4);
        tasks.spawn(events::run(
            events::Sources {
                runtime: self.runtime.clone(),
                containerd_socket: self.containerd_socket,
                namespace: self.namespace,
                opened: Some(opened_tx),
            },
            exit_tx,
            cancel,
        ));
        // A (re)opened exit stream may have missed exits: re-check every pod
        // with a live ephemeral container.
        let (index, requeue) = (self.index.clone(), self.requeue.clone());
        tasks.spawn(async move {
            while let Some(source) = opened_rx.recv().await {
                let pods = index.live_owners();
                tracing::debug!(
                    ?source,
                    pods = pods.len(),
                    "exit events (re)opened; re-checking"
                );
                for pod in pods {
                    let _ = requeue.send(pod).await;
                }
            }
        });
        let (index, requeue, runtime) = (self.index, self.requeue, self.runtime);
        tasks.spawn(async move {
            while let Some(exit) = exit_rx.recv().await {
                // containerd's CRI records the exit from the same event a
                // moment later; requeue once the CRI shows it, so the pass
                // sees it.
                let (rt, tx, index) = (runtime.clone(), requeue.clone(), index.clone());
                tokio::spawn(async move {
                    let Some(pod) = index.owner_of_exited(&exit.container_id).await else {
                        return;
                    };
                    tracing::debug!(container_id = %exit.container_id, pod = %pod, "exit event");
                    wait_until_exited(rt.as_ref(), &exit.container_id).await;
                    let _ = tx.send(pod).await;
                });
            }
        });
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
