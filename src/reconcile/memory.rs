//! What the agent remembers about each pod between passes, by pod uid: the
//! last start failure of each container with its backoff (the kubelet's
//! reason cache), the containers' timelines, the settled containers'
//! details from the last observation, the sandbox details, the last status
//! written, and whether the runtime was down.
//!
//! Owns: this memory and its rules — when a failed start may be tried
//! again, which reason the status shows meanwhile (`ErrImagePull` turns into
//! `ImagePullBackOff`), when the next pass is due. Nothing here does I/O:
//! the pass ([`super::agent`]) asks, acts and tells the memory what
//! happened. Losing it (a restart) is safe: the pass is level-triggered,
//! so at worst a backoff starts over.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ContainerStatus;

use super::execute::{self, StartFailure};
use super::observe::{self, SandboxDetails};
use super::status::Failure;
use super::timeline::{Creator, Timeline};
use crate::backoff::Backoff;

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

/// The memory of every pod this agent handles, by uid.
#[derive(Debug, Default)]
pub struct Memory {
    pods: Mutex<HashMap<String, PodMemory>>,
}

impl Memory {
    fn with<R>(&self, uid: &str, f: impl FnOnce(&mut PodMemory) -> R) -> R {
        f(lock(&self.pods).entry(uid.to_string()).or_default())
    }

    /// Forgets a pod (it has no ephemeral container, or it is gone).
    pub fn forget(&self, uid: &str) {
        lock(&self.pods).remove(uid);
    }

    /// Keeps only the pods in `live`.
    pub fn retain(&self, live: &HashSet<&str>) {
        lock(&self.pods).retain(|uid, _| live.contains(uid.as_str()));
    }

    /// Whether one of `names` has no timeline yet (never seen by a pass).
    pub fn any_unseen<'a>(&self, uid: &str, mut names: impl Iterator<Item = &'a str>) -> bool {
        let pods = lock(&self.pods);
        let seen = pods.get(uid).map(|m| &m.timelines);
        names.any(|n| seen.is_none_or(|t| !t.contains_key(n)))
    }

    /// Every timeline recorded so far.
    pub fn timelines(&self) -> Vec<Timeline> {
        lock(&self.pods)
            .values()
            .flat_map(|m| m.timelines.values().cloned())
            .collect()
    }

    /// Updates the pod's timelines (see [`super::timeline`]).
    pub fn with_timelines<R>(
        &self,
        uid: &str,
        f: impl FnOnce(&mut BTreeMap<String, Timeline>) -> R,
    ) -> R {
        self.with(uid, |m| f(&mut m.timelines))
    }

    /// The containers of the pod that this agent created (and started).
    pub fn created_here(&self, uid: &str) -> BTreeSet<String> {
        lock(&self.pods)
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

    /// The settled containers' details from the last observation.
    pub fn settled(&self, uid: &str) -> Arc<HashMap<String, observe::Container>> {
        lock(&self.pods)
            .get(uid)
            .map(|m| m.settled.clone())
            .unwrap_or_default()
    }

    /// Keeps the settled containers of a new observation.
    pub fn set_settled(&self, uid: &str, settled: HashMap<String, observe::Container>) {
        self.with(uid, |m| m.settled = Arc::new(settled));
    }

    /// The runtime answered: the outage (if any) is over.
    pub fn runtime_up(&self, uid: &str) {
        self.with(uid, |m| {
            m.runtime_down = false;
            m.runtime_down_reported.clear();
        });
    }

    /// The runtime did not answer. Returns whether this starts an outage
    /// for the pod, and which of `waiting` were not told yet during it.
    pub fn runtime_down<'a>(
        &self,
        uid: &str,
        waiting: impl Iterator<Item = &'a str>,
    ) -> (bool, Vec<String>) {
        self.with(uid, |m| {
            let first = !m.runtime_down;
            m.runtime_down = true;
            let untold = waiting
                .filter(|n| m.runtime_down_reported.insert(n.to_string()))
                .map(str::to_string)
                .collect();
            (first, untold)
        })
    }

    /// Someone else's start is under way: look again after `after`.
    pub fn recheck_in(&self, uid: &str, after: Duration) {
        self.with(uid, |m| m.recheck_at = Some(Instant::now() + after));
    }

    /// Records a failed start; returns whether it is new (not a repeat of
    /// the same reason and message). A retryable failure of a container
    /// that was not created waits out the next step of its backoff
    /// (`policy` for the first failure); anything else is final.
    pub fn remember_failure(
        &self,
        uid: &str,
        name: &str,
        image: &str,
        f: StartFailure,
        policy: &Backoff,
    ) -> bool {
        let now = Instant::now();
        self.with(uid, |m| {
            let previous = m.failures.remove(name);
            let first = previous
                .as_ref()
                .is_none_or(|p| p.failure.reason != f.reason || p.failure.message != f.message);
            let mut backoff = previous.map_or_else(|| policy.clone(), |p| p.backoff);
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
        })
    }

    /// The container started: forgets its failure; returns whether it had
    /// one (the start was a retry).
    pub fn clear_failure(&self, uid: &str, name: &str) -> bool {
        self.with(uid, |m| m.failures.remove(name).is_some())
    }

    /// The containers that must not be started now (backing off, or failed
    /// for good).
    pub fn backing_off(&self, uid: &str, now: Instant) -> HashSet<String> {
        lock(&self.pods)
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

    /// The reasons the status shows, and the `(container, image)` pairs
    /// that now show ImagePullBackOff (each gets a BackOff event): an image
    /// pull that failed shows as ImagePullBackOff while it waits, from the
    /// second time it is shown, as the kubelet's.
    pub fn displayed_failures(
        &self,
        uid: &str,
        now: Instant,
    ) -> (BTreeMap<String, Failure>, Vec<(String, String)>) {
        let mut pods = lock(&self.pods);
        let Some(m) = pods.get_mut(uid) else {
            return (BTreeMap::new(), vec![]);
        };
        let mut out = BTreeMap::new();
        let mut backing_off = Vec::new();
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
                backing_off.push((name.clone(), f.image.clone()));
            }
            f.shown = true;
            out.insert(name.clone(), f.failure.clone());
        }
        (out, backing_off)
    }

    /// When the pod's next pass is due: the soonest retry or recheck, at
    /// most `resync` away.
    pub fn next_pass(&self, uid: &str, now: Instant, resync: Duration) -> Duration {
        let soonest = lock(&self.pods).get_mut(uid).and_then(|m| {
            m.failures
                .values()
                .filter_map(|f| f.retry_at)
                .chain(m.recheck_at.take())
                .filter(|t| *t > now)
                .min()
        });
        match soonest {
            Some(t) => (t - now).min(resync),
            None => resync,
        }
    }

    /// Whether `statuses` were already written at the pod's resourceVersion
    /// `rv` (the cache does not show the write yet).
    pub fn already_written(&self, uid: &str, rv: &str, statuses: &[ContainerStatus]) -> bool {
        lock(&self.pods)
            .get(uid)
            .and_then(|m| m.last_written.as_ref())
            .is_some_and(|(at, written)| at == rv && written == statuses)
    }

    /// The API server accepted `statuses` for the pod at `rv`.
    pub fn written(&self, uid: &str, rv: String, statuses: Vec<ContainerStatus>) {
        self.with(uid, |m| m.last_written = Some((rv, statuses)));
    }

    /// The details of `sandbox_id`, if known.
    pub fn sandbox_details(&self, uid: &str, sandbox_id: &str) -> Option<SandboxDetails> {
        lock(&self.pods)
            .get(uid)
            .and_then(|m| m.sandbox_details.clone())
            .filter(|(id, _)| id == sandbox_id)
            .map(|(_, d)| d)
    }

    /// Keeps the details of the pod's sandbox.
    pub fn set_sandbox_details(&self, uid: &str, sandbox_id: &str, details: SandboxDetails) {
        self.with(uid, |m| {
            m.sandbox_details = Some((sandbox_id.to_string(), details))
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
