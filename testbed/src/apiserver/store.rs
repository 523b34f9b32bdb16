//! The server's state: pods, the other objects it serves, one global
//! resourceVersion counter (like etcd's revision), the change history that
//! watches read from, and the registry rules of kube-apiserver for each
//! write (what a subresource may change, defaults, validation, no-op
//! detection, generation).
//!
//! Invariants: every persisted write takes the next resourceVersion; a
//! write that changes nothing is not persisted (resourceVersion unchanged,
//! no watch event); the history holds every pod change with a
//! resourceVersion above `compacted`, in order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodSecurityContext, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::kinds::{self, ObjectSub};
use super::status::StatusError;
use ephemerald::validation::{
    FieldError, default_container, default_ephemeral_container, dns1123_label_errors,
    dns1123_subdomain_errors, validate_ephemeral_containers, validate_ephemeral_containers_update,
    validate_pod_status_update,
};

/// How many pod changes the history keeps before it forgets the oldest.
const HISTORY_LIMIT: usize = 10_000;

/// How many request lines the log keeps (the older half goes when full).
const REQUEST_LOG_LIMIT: usize = 100_000;

/// Namespaces that exist from the start.
const INITIAL_NAMESPACES: [&str; 4] = ["default", "kube-node-lease", "kube-public", "kube-system"];

/// One accepted write to `pods/NAME/status` (no-op writes included, with the
/// unchanged resourceVersion, so tests can see redundant writes).
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRecord {
    /// When the server accepted it.
    pub at: SystemTime,
    /// The pod's resourceVersion after the write.
    pub resource_version: String,
    /// `status.ephemeralContainerStatuses` after the write.
    pub ephemeral_container_statuses: Vec<ContainerStatus>,
}

/// One accepted write to `pods/NAME/ephemeralcontainers` (no-ops included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecRecord {
    /// When the server accepted it.
    pub at: SystemTime,
    /// The pod's resourceVersion after the write.
    pub resource_version: String,
    /// Names in `spec.ephemeralContainers` after the write, in order.
    pub names: Vec<String>,
}

/// What happened to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Added,
    Modified,
    Deleted,
}

/// One pod change in the history.
#[derive(Debug, Clone)]
pub(crate) struct PodChange {
    pub rv: u64,
    pub change: Change,
    /// The object before (for Modified; selectors need it).
    pub old: Option<Arc<Pod>>,
    /// The object after (the last state for Deleted, with the deletion's RV).
    pub new: Arc<Pod>,
}

/// One change of an object of another kind in the history (what their
/// watches read).
#[derive(Debug, Clone)]
pub(crate) struct ObjectChange {
    pub rv: u64,
    pub kind: Kind,
    pub change: Change,
    /// The object before (for Modified; selectors need it).
    pub old: Option<Value>,
    /// The object after (the last state for Deleted, with the deletion's RV).
    pub new: Value,
}

/// Which pod endpoint a write came through; each takes different fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subresource {
    /// `pods/NAME`: metadata, and the few mutable spec fields.
    Main,
    /// `pods/NAME/ephemeralcontainers`: only `spec.ephemeralContainers`.
    Ephemeral,
    /// `pods/NAME/status`: `status`, labels and annotations.
    Status,
}

/// How a pod is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreateMode {
    /// `POST`: kube-apiserver's create rules (ephemeral containers refused).
    Post,
    /// The fixture's direct create: like `POST`, but ephemeral containers
    /// are allowed (defaulted and validated).
    Direct,
    /// No defaults, no validation; replaces an existing pod.
    Unchecked,
}

/// Kinds other than Pod, stored as JSON in their `core/v1` (or group) form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Event,
    Secret,
    ConfigMap,
    PersistentVolumeClaim,
    /// Cluster-scoped: stored under the namespace "".
    PersistentVolume,
    /// Cluster-scoped.
    Node,
    Lease,
}

impl Kind {
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Event => "events",
            Kind::Secret => "secrets",
            Kind::ConfigMap => "configmaps",
            Kind::PersistentVolumeClaim => "persistentvolumeclaims",
            Kind::PersistentVolume => "persistentvolumes",
            Kind::Node => "nodes",
            Kind::Lease => "leases",
        }
    }
    pub fn group(self) -> &'static str {
        match self {
            Kind::Lease => "coordination.k8s.io",
            _ => "",
        }
    }
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Event => "Event",
            Kind::Secret => "Secret",
            Kind::ConfigMap => "ConfigMap",
            Kind::PersistentVolumeClaim => "PersistentVolumeClaim",
            Kind::PersistentVolume => "PersistentVolume",
            Kind::Node => "Node",
            Kind::Lease => "Lease",
        }
    }
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Lease => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }
    /// Whether objects of the kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::PersistentVolume | Kind::Node)
    }
    /// Kind as `errors.NewInvalid` prints it (`Lease.coordination.k8s.io`).
    pub fn qualified_kind(self) -> String {
        if self.group().is_empty() {
            self.kind().to_string()
        } else {
            format!("{}.{}", self.kind(), self.group())
        }
    }
}

type Key = (String, String);

#[derive(Default)]
struct State {
    rv: u64,
    compacted: u64,
    pods: BTreeMap<Key, Arc<Pod>>,
    history: VecDeque<PodChange>,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Changes of the other kinds, like `history` for pods.
    object_history: VecDeque<ObjectChange>,
    objects_compacted: u64,
    namespaces: BTreeSet<String>,
    status_history: BTreeMap<Key, Vec<StatusRecord>>,
    spec_history: BTreeMap<Key, Vec<SpecRecord>>,
    rejected_status: Vec<(String, String)>,
    /// Status writes still to answer with 409 (a fault for tests).
    conflicts_armed: usize,
    conflicted_status: Vec<(String, Vec<ContainerStatus>)>,
    requests: Vec<String>,
}

/// The shared state; all methods are synchronous and short.
pub(crate) struct Store {
    state: Mutex<State>,
    notify: watch::Sender<u64>,
    bookmark_ms: AtomicU64,
}

fn key(ns: &str, name: &str) -> Key {
    (ns.to_string(), name.to_string())
}

/// A random RFC 4122 version 4 UUID.
pub(crate) fn new_uid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `generateName` + 5 characters from the apiserver's alphabet.
fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// Now, at the second precision the API serializes.
pub(crate) fn now_seconds() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn namespace_mismatch() -> StatusError {
    StatusError::bad_request(
        "the namespace of the provided object does not match the namespace sent on the request",
    )
}

fn name_mismatch(body: &str, url: &str) -> StatusError {
    StatusError::bad_request(format!(
        "the name of the object ({body}) does not match the name on the URL ({url})"
    ))
}

/// The QoS class kube-apiserver computes on create (cpu and memory only).
fn qos_class(pod: &Pod) -> &'static str {
    let Some(spec) = pod.spec.as_ref() else {
        return "BestEffort";
    };
    let all: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let res = |c: &Container, limits: bool, r: &str| {
        c.resources
            .as_ref()
            .and_then(|x| {
                if limits {
                    x.limits.as_ref()
                } else {
                    x.requests.as_ref()
                }
            })
            .and_then(|m| m.get(r))
            .map(|q| q.0.clone())
    };
    let any = all.iter().any(|c| {
        ["cpu", "memory"]
            .iter()
            .any(|r| res(c, true, r).is_some() || res(c, false, r).is_some())
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = all.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = res(c, true, r);
            limit.is_some() && res(c, false, r).is_none_or(|req| Some(req) == limit)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// API defaulting of a new pod (`SetDefaults_Pod`, `SetDefaults_PodSpec`,
/// `SetDefaults_Container`) and the create-time status.
fn default_pod(pod: &mut Pod) {
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.containers.iter_mut().for_each(default_container);
    spec.init_containers
        .iter_mut()
        .flatten()
        .for_each(default_container);
    spec.ephemeral_containers
        .iter_mut()
        .flatten()
        .for_each(default_ephemeral_container);
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.scheduler_name
        .get_or_insert_with(|| "default-scheduler".into());
    spec.security_context
        .get_or_insert_with(PodSecurityContext::default);
    spec.enable_service_links.get_or_insert(true);
    spec.priority.get_or_insert(0);
    spec.preemption_policy
        .get_or_insert_with(|| "PreemptLowerPriority".into());
    let qos = qos_class(pod);
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase.get_or_insert_with(|| "Pending".into());
    status.qos_class.get_or_insert_with(|| qos.into());
}

/// The create validation that matters here: names, containers, and
/// ephemeral containers refused on create (`ValidatePodCreate`).
fn validate_pod_create(pod: &Pod, allow_ephemeral: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let name = pod.metadata.name.as_deref().unwrap_or("");
    if name.is_empty() {
        errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        for m in dns1123_subdomain_errors(name) {
            errs.push(FieldError::invalid("metadata.name", name, m));
        }
    }
    let empty = Default::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    if spec.containers.is_empty() {
        errs.push(FieldError::required("spec.containers", ""));
    }
    let mut names = BTreeSet::new();
    let no_init = Vec::new();
    let lists = [
        ("spec.containers", &spec.containers),
        (
            "spec.initContainers",
            spec.init_containers.as_ref().unwrap_or(&no_init),
        ),
    ];
    for (path, list) in lists {
        for (i, c) in list.iter().enumerate() {
            let p = format!("{path}[{i}]");
            if c.name.is_empty() {
                errs.push(FieldError::required(format!("{p}.name"), ""));
            } else {
                for m in dns1123_label_errors(&c.name) {
                    errs.push(FieldError::invalid(format!("{p}.name"), &c.name, m));
                }
            }
            if c.image.as_deref().unwrap_or("").is_empty() {
                errs.push(FieldError::required(format!("{p}.image"), ""));
            }
            if !c.name.is_empty() && !names.insert(c.name.clone()) {
                errs.push(FieldError::duplicate(format!("{p}.name"), &c.name));
            }
        }
    }
    if allow_ephemeral {
        errs.extend(validate_ephemeral_containers(pod));
    } else if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        errs.push(FieldError::forbidden(
            "spec.ephemeralContainers",
            "cannot be set on create",
        ));
    }
    errs
}

/// `metadata.uid: Invalid value: "X": field is immutable` when a write
/// carries another UID than the stored object's.
fn immutable_uid(new: Option<&str>, old: Option<&str>) -> Vec<FieldError> {
    match new {
        Some(uid) if !uid.is_empty() && Some(uid) != old => {
            vec![FieldError::invalid(
                "metadata.uid",
                uid,
                "field is immutable",
            )]
        }
        _ => Vec::new(),
    }
}

/// The detail of `ValidatePodUpdate`'s refusal of spec changes.
const POD_UPDATE_FORBIDDEN: &str = "pod updates may not change fields other than `spec.containers[*].image`,\
`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing \
tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)";

impl Store {
    pub fn new() -> Self {
        let state = State {
            namespaces: INITIAL_NAMESPACES.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Store {
            state: Mutex::new(state),
            notify: watch::channel(0).0,
            bookmark_ms: AtomicU64::new(60_000),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (writes are
        // prepared before they are applied), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn bookmark_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.bookmark_ms.load(Ordering::Relaxed).max(10))
    }

    pub fn set_bookmark_interval(&self, d: std::time::Duration) {
        self.bookmark_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn log_request(&self, line: String) {
        let mut st = self.lock();
        if st.requests.len() >= REQUEST_LOG_LIMIT {
            st.requests.drain(..REQUEST_LOG_LIMIT / 2);
        }
        st.requests.push(line);
    }

    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets the watch history: watches from an older resourceVersion get
    /// 410 Expired.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.history.clear();
        st.objects_compacted = st.rv;
        st.object_history.clear();
    }

    fn touch_namespace(st: &mut State, ns: &str) {
        if !ns.is_empty() && !st.namespaces.contains(ns) {
            st.namespaces.insert(ns.to_string());
        }
    }

    pub fn namespaces(&self) -> (Vec<String>, u64) {
        let st = self.lock();
        (st.namespaces.iter().cloned().collect(), st.rv)
    }

    /// Persists a pod change under the next resourceVersion.
    fn commit_pod(
        &self,
        st: &mut State,
        change: Change,
        old: Option<Arc<Pod>>,
        mut new: Pod,
    ) -> Arc<Pod> {
        st.rv += 1;
        new.metadata.resource_version = Some(st.rv.to_string());
        let new = Arc::new(new);
        let k = key(
            new.metadata.namespace.as_deref().unwrap_or(""),
            new.metadata.name.as_deref().unwrap_or(""),
        );
        if change == Change::Deleted {
            st.pods.remove(&k);
        } else {
            st.pods.insert(k, new.clone());
        }
        st.history.push_back(PodChange {
            rv: st.rv,
            change,
            old,
            new: new.clone(),
        });
        while st.history.len() > HISTORY_LIMIT {
            if let Some(c) = st.history.pop_front() {
                st.compacted = c.rv;
            }
        }
        self.notify.send_replace(st.rv);
        new
    }

    // -- pods ------------------------------------------------------------

    pub fn create_pod(&self, ns: &str, mut pod: Pod, mode: CreateMode) -> Result<Pod, StatusError> {
        match pod.metadata.namespace.as_deref() {
            Some(n) if !n.is_empty() && n != ns => return Err(namespace_mismatch()),
            _ => pod.metadata.namespace = Some(ns.to_string()),
        }
        if pod.metadata.name.as_deref().unwrap_or("").is_empty()
            && let Some(prefix) = pod
                .metadata
                .generate_name
                .as_deref()
                .filter(|p| !p.is_empty())
        {
            pod.metadata.name = Some(generated_name(prefix));
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let mut st = self.lock();
        let existing = st.pods.get(&key(ns, &name)).cloned();
        if mode == CreateMode::Unchecked {
            let mut pod = pod;
            let meta = &mut pod.metadata;
            if let Some(old) = existing.as_deref() {
                meta.uid = meta.uid.take().or_else(|| old.metadata.uid.clone());
                meta.creation_timestamp = meta
                    .creation_timestamp
                    .take()
                    .or_else(|| old.metadata.creation_timestamp.clone());
                let bump = old.spec != pod.spec;
                let generation = old.metadata.generation.unwrap_or(1) + i64::from(bump);
                pod.metadata.generation = Some(generation);
            } else {
                meta.uid.get_or_insert_with(new_uid);
                meta.creation_timestamp
                    .get_or_insert_with(|| Time(now_seconds()));
                meta.generation.get_or_insert(1);
            }
            Self::touch_namespace(&mut st, ns);
            let change = if existing.is_some() {
                Change::Modified
            } else {
                Change::Added
            };
            return Ok((*self.commit_pod(&mut st, change, existing, pod)).clone());
        }
        default_pod(&mut pod);
        let errs = validate_pod_create(&pod, mode == CreateMode::Direct);
        if !errs.is_empty() {
            return Err(StatusError::invalid("Pod", &name, &errs));
        }
        if existing.is_some() {
            return Err(StatusError::already_exists("pods", "", &name));
        }
        let meta = &mut pod.metadata;
        meta.uid = Some(new_uid());
        meta.creation_timestamp = Some(Time(now_seconds()));
        meta.generation = Some(1);
        meta.deletion_timestamp = None;
        Self::touch_namespace(&mut st, ns);
        Ok((*self.commit_pod(&mut st, Change::Added, None, pod)).clone())
    }

    pub fn get_pod(&self, ns: &str, name: &str) -> Result<Pod, StatusError> {
        self.lock()
            .pods
            .get(&key(ns, name))
            .map(|p| (**p).clone())
            .ok_or_else(|| StatusError::not_found("pods", "", name))
    }

    /// Pods in `ns` (all when `None`) that pass `keep`, with the current RV.
    pub fn list_pods(&self, ns: Option<&str>, keep: impl Fn(&Pod) -> bool) -> (Vec<Arc<Pod>>, u64) {
        let st = self.lock();
        let items = st
            .pods
            .iter()
            .filter(|((n, _), p)| ns.is_none_or(|ns| ns == n) && keep(p))
            .map(|(_, p)| p.clone())
            .collect();
        (items, st.rv)
    }

    pub fn delete_pod(&self, ns: &str, name: &str) -> Result<Pod, StatusError> {
        let mut st = self.lock();
        let old = st
            .pods
            .get(&key(ns, name))
            .cloned()
            .ok_or_else(|| StatusError::not_found("pods", "", name))?;
        let last = (*old).clone();
        Ok((*self.commit_pod(&mut st, Change::Deleted, Some(old), last)).clone())
    }

    /// A write through `sub`: `f` turns the current pod into the requested
    /// one (a PUT body or a patch result); the registry then keeps only
    /// what `sub` may change, defaults, validates and persists.
    pub fn update_pod(
        &self,
        ns: &str,
        name: &str,
        sub: Subresource,
        f: impl FnOnce(&Pod) -> Result<Pod, StatusError>,
    ) -> Result<Pod, StatusError> {
        let mut st = self.lock();
        let k = key(ns, name);
        let old = st
            .pods
            .get(&k)
            .cloned()
            .ok_or_else(|| StatusError::not_found("pods", "", name))?;
        let body = f(&old)?;
        if let Some(n) = body.metadata.name.as_deref()
            && n != name
        {
            return Err(name_mismatch(n, name));
        }
        if let Some(n) = body.metadata.namespace.as_deref()
            && !n.is_empty()
            && n != ns
        {
            return Err(namespace_mismatch());
        }
        if let Some(rv) = body.metadata.resource_version.as_deref()
            && !rv.is_empty()
            && Some(rv) != old.metadata.resource_version.as_deref()
        {
            return Err(StatusError::conflict("pods", "", name));
        }
        if sub == Subresource::Status && st.conflicts_armed > 0 {
            st.conflicts_armed -= 1;
            let statuses = body
                .status
                .as_ref()
                .and_then(|s| s.ephemeral_container_statuses.clone())
                .unwrap_or_default();
            st.conflicted_status
                .push((format!("{ns}/{name}"), statuses));
            return Err(StatusError::conflict("pods", "", name));
        }
        // `rest.BeforeUpdate`: identity metadata is immutable. (A client may
        // send its UID to pin the write to this incarnation of the pod.)
        let uid_errs = immutable_uid(body.metadata.uid.as_deref(), old.metadata.uid.as_deref());
        let mut new = (*old).clone();
        let errs = if !uid_errs.is_empty() {
            uid_errs
        } else {
            match sub {
                Subresource::Ephemeral => {
                    let spec = new.spec.get_or_insert_with(Default::default);
                    spec.ephemeral_containers = body.spec.and_then(|s| s.ephemeral_containers);
                    spec.ephemeral_containers
                        .iter_mut()
                        .flatten()
                        .for_each(default_ephemeral_container);
                    if spec
                        .ephemeral_containers
                        .as_ref()
                        .is_some_and(Vec::is_empty)
                    {
                        spec.ephemeral_containers = None;
                    }
                    validate_ephemeral_containers_update(&new, &old)
                }
                Subresource::Status => {
                    new.status = body.status;
                    new.metadata.labels = body.metadata.labels;
                    new.metadata.annotations = body.metadata.annotations;
                    let old_status = old.status.clone().unwrap_or_default();
                    let status = new.status.get_or_insert_with(Default::default);
                    if status.qos_class.as_deref().unwrap_or("").is_empty() {
                        status.qos_class = old_status.qos_class;
                    }
                    if status.observed_generation.unwrap_or(0) == 0 {
                        status.observed_generation = old_status.observed_generation;
                    }
                    validate_pod_status_update(&new, &old)
                }
                Subresource::Main => {
                    let meta = &mut new.metadata;
                    meta.labels = body.metadata.labels;
                    meta.annotations = body.metadata.annotations;
                    meta.finalizers = body.metadata.finalizers;
                    meta.owner_references = body.metadata.owner_references;
                    let mut spec = body.spec.unwrap_or_default();
                    let old_spec = old.spec.clone().unwrap_or_default();
                    // Ephemeral containers change only through their subresource.
                    spec.ephemeral_containers = old_spec.ephemeral_containers.clone();
                    spec.containers.iter_mut().for_each(default_container);
                    spec.init_containers
                        .iter_mut()
                        .flatten()
                        .for_each(default_container);
                    let mut munged = spec.clone();
                    for (n, o) in munged.containers.iter_mut().zip(&old_spec.containers) {
                        n.image = o.image.clone();
                    }
                    for (n, o) in munged
                        .init_containers
                        .iter_mut()
                        .flatten()
                        .zip(old_spec.init_containers.iter().flatten())
                    {
                        n.image = o.image.clone();
                    }
                    munged.active_deadline_seconds = old_spec.active_deadline_seconds;
                    munged.tolerations = old_spec.tolerations.clone();
                    munged.termination_grace_period_seconds =
                        old_spec.termination_grace_period_seconds;
                    new.spec = Some(spec);
                    if munged == old_spec {
                        Vec::new()
                    } else {
                        vec![FieldError::forbidden(
                            "spec",
                            POD_UPDATE_FORBIDDEN.to_string() + "\n",
                        )]
                    }
                }
            }
        };
        if !errs.is_empty() {
            let e = StatusError::invalid("Pod", name, &errs);
            if sub == Subresource::Status {
                st.rejected_status
                    .push((format!("{ns}/{name}"), e.message.clone()));
            }
            return Err(e);
        }
        if new.spec != old.spec {
            new.metadata.generation = Some(old.metadata.generation.unwrap_or(1) + 1);
        }
        let result = if new == *old {
            old
        } else {
            self.commit_pod(&mut st, Change::Modified, Some(old), new)
        };
        let rv = result.metadata.resource_version.clone().unwrap_or_default();
        let at = SystemTime::now();
        match sub {
            Subresource::Status => st.status_history.entry(k).or_default().push(StatusRecord {
                at,
                resource_version: rv,
                ephemeral_container_statuses: result
                    .status
                    .as_ref()
                    .and_then(|s| s.ephemeral_container_statuses.clone())
                    .unwrap_or_default(),
            }),
            Subresource::Ephemeral => st.spec_history.entry(k).or_default().push(SpecRecord {
                at,
                resource_version: rv,
                names: result
                    .spec
                    .as_ref()
                    .and_then(|s| s.ephemeral_containers.as_ref())
                    .map(|l| l.iter().map(|c| c.name.clone()).collect())
                    .unwrap_or_default(),
            }),
            Subresource::Main => {}
        }
        Ok((*result).clone())
    }

    /// Pod changes after `since`, and the RV they bring the reader to; or
    /// `Err(compacted)` when some of them have been forgotten.
    pub fn pod_changes_since(&self, since: u64) -> Result<(Vec<PodChange>, u64), u64> {
        let st = self.lock();
        if since < st.compacted {
            return Err(st.compacted);
        }
        let start = st.history.partition_point(|c| c.rv <= since);
        Ok((
            st.history.range(start..).cloned().collect(),
            st.rv.max(since),
        ))
    }

    pub fn status_history(&self, ns: &str, name: &str) -> Vec<StatusRecord> {
        self.lock()
            .status_history
            .get(&key(ns, name))
            .cloned()
            .unwrap_or_default()
    }

    pub fn spec_history(&self, ns: &str, name: &str) -> Vec<SpecRecord> {
        self.lock()
            .spec_history
            .get(&key(ns, name))
            .cloned()
            .unwrap_or_default()
    }

    pub fn rejected_status_writes(&self) -> Vec<(String, String)> {
        self.lock().rejected_status.clone()
    }

    pub fn conflict_next_status_writes(&self, n: usize) {
        self.lock().conflicts_armed = n;
    }

    pub fn conflicted_status_writes(&self) -> Vec<(String, Vec<ContainerStatus>)> {
        self.lock().conflicted_status.clone()
    }

    // -- other kinds -----------------------------------------------------

    pub fn create_object(
        &self,
        kind: Kind,
        ns: &str,
        mut obj: Value,
    ) -> Result<Value, StatusError> {
        if !obj.is_object() {
            return Err(StatusError::bad_request("the body must be a JSON object"));
        }
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let meta = &mut obj["metadata"];
        if !kind.namespaced() {
            // kube-apiserver drops a namespace sent for a cluster-scoped object.
            if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
        } else {
            match meta["namespace"].as_str() {
                Some(n) if !n.is_empty() && n != ns => return Err(namespace_mismatch()),
                _ => meta["namespace"] = json!(ns),
            }
        }
        if meta["name"].as_str().unwrap_or("").is_empty()
            && let Some(prefix) = meta["generateName"].as_str().filter(|p| !p.is_empty())
        {
            meta["name"] = json!(generated_name(prefix));
        }
        let name = meta["name"].as_str().unwrap_or("").to_string();
        let mut errs = Vec::new();
        if name.is_empty() {
            errs.push(FieldError::required(
                "metadata.name",
                "name or generateName is required",
            ));
        } else if kind != Kind::Event {
            for m in dns1123_subdomain_errors(&name) {
                errs.push(FieldError::invalid("metadata.name", &name, m));
            }
        }
        if kind == Kind::Event
            && let Some(inv) = obj["involvedObject"]["namespace"].as_str()
            && !inv.is_empty()
            && inv != ns
        {
            errs.push(FieldError::invalid(
                "involvedObject.namespace",
                inv,
                "does not match event.namespace",
            ));
        }
        if !errs.is_empty() {
            return Err(StatusError::invalid(&kind.qualified_kind(), &name, &errs));
        }
        if kind == Kind::Secret {
            obj = normalize_secret(obj)?;
        }
        obj["kind"] = json!(kind.kind());
        obj["apiVersion"] = json!(kind.api_version());
        let mut st = self.lock();
        let k = (kind, ns.to_string(), name.clone());
        if st.objects.contains_key(&k) {
            return Err(StatusError::already_exists(
                kind.resource(),
                kind.group(),
                &name,
            ));
        }
        st.rv += 1;
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(new_uid());
        meta["creationTimestamp"] = json!(now_seconds().strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
        meta["resourceVersion"] = json!(st.rv.to_string());
        Self::touch_namespace(&mut st, ns);
        st.objects.insert(k, obj.clone());
        Self::record_object(&mut st, kind, Change::Added, None, obj.clone());
        self.notify.send_replace(st.rv);
        Ok(obj)
    }

    pub fn get_object(&self, kind: Kind, ns: &str, name: &str) -> Result<Value, StatusError> {
        self.lock()
            .objects
            .get(&(kind, ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| StatusError::not_found(kind.resource(), kind.group(), name))
    }

    pub fn list_objects(&self, kind: Kind, ns: Option<&str>) -> (Vec<Value>, u64) {
        let st = self.lock();
        let items = st
            .objects
            .iter()
            .filter(|((k, n, _), _)| *k == kind && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect();
        (items, st.rv)
    }

    /// A PUT or PATCH of another kind through `sub` (the object itself or
    /// its `status` subresource, which take different parts:
    /// [`kinds::prepare_update`]): `f` gives the requested object;
    /// identity metadata stays, a stale resourceVersion is a conflict, a
    /// write that changes nothing is not persisted.
    pub fn update_object_via(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        sub: ObjectSub,
        f: impl FnOnce(&Value) -> Result<Value, StatusError>,
    ) -> Result<Value, StatusError> {
        let mut st = self.lock();
        let k = (kind, ns.to_string(), name.to_string());
        let old = st
            .objects
            .get(&k)
            .cloned()
            .ok_or_else(|| StatusError::not_found(kind.resource(), kind.group(), name))?;
        let mut new = f(&old)?;
        if !new.is_object() {
            return Err(StatusError::bad_request("the body must be a JSON object"));
        }
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        if let Some(n) = new["metadata"]["name"].as_str()
            && n != name
        {
            return Err(name_mismatch(n, name));
        }
        if let Some(rv) = new["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(StatusError::conflict(kind.resource(), kind.group(), name));
        }
        let uid_errs = immutable_uid(
            new["metadata"]["uid"].as_str(),
            old["metadata"]["uid"].as_str(),
        );
        if !uid_errs.is_empty() {
            return Err(StatusError::invalid(
                &kind.qualified_kind(),
                name,
                &uid_errs,
            ));
        }
        if kind == Kind::Secret {
            new = normalize_secret(new)?;
        }
        let mut new = kinds::prepare_update(kind, sub, &old, new);
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
        ] {
            match old["metadata"].get(f) {
                Some(v) => new["metadata"][f] = v.clone(),
                // A cluster-scoped object has no namespace: none appears.
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        new["kind"] = json!(kind.kind());
        new["apiVersion"] = json!(kind.api_version());
        if new == old {
            return Ok(old);
        }
        st.rv += 1;
        new["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(k, new.clone());
        Self::record_object(&mut st, kind, Change::Modified, Some(old), new.clone());
        self.notify.send_replace(st.rv);
        Ok(new)
    }

    /// Persists nothing: appends an object change to the history (its RV
    /// is the new one already set on `new`).
    fn record_object(st: &mut State, kind: Kind, change: Change, old: Option<Value>, new: Value) {
        st.object_history.push_back(ObjectChange {
            rv: st.rv,
            kind,
            change,
            old,
            new,
        });
        while st.object_history.len() > HISTORY_LIMIT {
            if let Some(c) = st.object_history.pop_front() {
                st.objects_compacted = c.rv;
            }
        }
    }

    /// Changes of objects of `kind` after `since`, and the RV they bring
    /// the reader to; or `Err(compacted)` when some have been forgotten.
    pub fn object_changes_since(
        &self,
        kind: Kind,
        since: u64,
    ) -> Result<(Vec<ObjectChange>, u64), u64> {
        let st = self.lock();
        if since < st.objects_compacted {
            return Err(st.objects_compacted);
        }
        let start = st.object_history.partition_point(|c| c.rv <= since);
        Ok((
            st.object_history
                .range(start..)
                .filter(|c| c.kind == kind)
                .cloned()
                .collect(),
            st.rv.max(since),
        ))
    }

    pub fn delete_object(&self, kind: Kind, ns: &str, name: &str) -> Result<Value, StatusError> {
        let mut st = self.lock();
        let k = (kind, ns.to_string(), name.to_string());
        let mut old = st
            .objects
            .remove(&k)
            .ok_or_else(|| StatusError::not_found(kind.resource(), kind.group(), name))?;
        st.rv += 1;
        // As for pods: the deleted object carries the deletion's RV.
        old["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        Self::record_object(&mut st, kind, Change::Deleted, None, old.clone());
        self.notify.send_replace(st.rv);
        Ok(old)
    }
}

/// A Secret as stored: `stringData` folded into `data` (base64), like the
/// API server does on write.
fn normalize_secret(obj: Value) -> Result<Value, StatusError> {
    let mut s: Secret =
        serde_json::from_value(obj).map_err(|e| StatusError::bad_request(e.to_string()))?;
    if let Some(sd) = s.string_data.take() {
        let data = s.data.get_or_insert_with(Default::default);
        for (k, v) in sd {
            data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
        }
    }
    s.type_.get_or_insert_with(|| "Opaque".into());
    serde_json::to_value(&s).map_err(|e| StatusError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn web() -> Pod {
        pod(
            json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}),
        )
    }

    #[test]
    fn create_fills_metadata_and_defaults() {
        let s = Store::new();
        let p = s.create_pod("default", web(), CreateMode::Post).unwrap();
        assert_eq!(p.metadata.resource_version.as_deref(), Some("1"));
        assert_eq!(p.metadata.generation, Some(1));
        assert_eq!(p.metadata.uid.as_ref().map(String::len), Some(36));
        assert!(p.metadata.creation_timestamp.is_some());
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(
            spec.containers[0].image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        let status = p.status.as_ref().unwrap();
        assert_eq!(
            (status.phase.as_deref(), status.qos_class.as_deref()),
            (Some("Pending"), Some("BestEffort"))
        );
        let again = s
            .create_pod("default", web(), CreateMode::Post)
            .unwrap_err();
        assert_eq!(
            (again.code, again.message.as_str()),
            (409, "pods \"web\" already exists")
        );
        let mut bad = web();
        bad.metadata.name = Some("x2".into());
        bad.spec.as_mut().unwrap().ephemeral_containers =
            Some(vec![k8s_openapi::api::core::v1::EphemeralContainer {
                name: "d".into(),
                ..Default::default()
            }]);
        let err = s.create_pod("default", bad, CreateMode::Post).unwrap_err();
        assert_eq!(
            err.message,
            "Pod \"x2\" is invalid: spec.ephemeralContainers: Forbidden: cannot be set on create"
        );
    }

    #[test]
    fn ephemeral_write_takes_only_ephemeral_containers() {
        let s = Store::new();
        s.create_pod("default", web(), CreateMode::Post).unwrap();
        let p = s
            .update_pod("default", "web", Subresource::Ephemeral, |old| {
                let mut p = old.clone();
                p.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
                let spec = p.spec.as_mut().unwrap();
                spec.containers[0].image = Some("changed".into());
                spec.ephemeral_containers =
                    Some(vec![k8s_openapi::api::core::v1::EphemeralContainer {
                        name: "dbg".into(),
                        image: Some("busybox".into()),
                        ..Default::default()
                    }]);
                Ok(p)
            })
            .unwrap();
        assert_eq!(p.metadata.labels, None, "labels dropped silently");
        assert_eq!(
            p.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("app:1")
        );
        let ec = &p
            .spec
            .as_ref()
            .unwrap()
            .ephemeral_containers
            .as_ref()
            .unwrap()[0];
        assert_eq!(ec.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(p.metadata.generation, Some(2));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("2"));
        // The same again is a no-op: no new RV, no history entry.
        let same = s
            .update_pod("default", "web", Subresource::Ephemeral, |old| {
                Ok(old.clone())
            })
            .unwrap();
        assert_eq!(same.metadata.resource_version.as_deref(), Some("2"));
        assert_eq!(s.pod_changes_since(2).unwrap().0.len(), 0);
        assert_eq!(s.spec_history("default", "web").len(), 2);
    }

    #[test]
    fn history_and_compaction() {
        let s = Store::new();
        s.create_pod("default", web(), CreateMode::Post).unwrap();
        s.delete_pod("default", "web").unwrap();
        let (changes, rv) = s.pod_changes_since(0).unwrap();
        assert_eq!(rv, 2);
        assert_eq!(
            changes.iter().map(|c| c.change).collect::<Vec<_>>(),
            vec![Change::Added, Change::Deleted]
        );
        assert_eq!(
            changes[1].new.metadata.resource_version.as_deref(),
            Some("2")
        );
        s.compact();
        assert_eq!(s.pod_changes_since(1).unwrap_err(), 2);
        assert!(s.pod_changes_since(2).unwrap().0.is_empty());
    }

    #[test]
    fn secrets_fold_string_data() {
        let s = Store::new();
        let v = s
            .create_object(
                Kind::Secret,
                "default",
                json!({"metadata": {"name": "pull"}, "stringData": {"a": "hi"}}),
            )
            .unwrap();
        assert_eq!(v["data"]["a"], "aGk=");
        assert_eq!(v["type"], "Opaque");
        assert!(v.get("stringData").is_none());
    }
}
