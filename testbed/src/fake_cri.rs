//! An in-process fake CRI runtime for component tests: a tonic server of
//! `runtime.v1` on a unix socket (`<dir>/cri.sock`) that answers the calls
//! the agent makes the way containerd 1.6.20 does, while the test decides
//! what the containers' processes do.
//!
//! # What it fakes
//! Pod sandboxes (Run/Stop/Remove/Status/List), containers
//! (Create/Start/Stop/Remove/Status/List), images (ImageStatus, ListImages,
//! PullImage from a configurable "registry"), `Version`, and
//! `GetContainerEvents`. Nothing runs: a started container stays RUNNING
//! until the test calls [`FakeRuntime::exit`] or [`FakeRuntime::oom_kill`],
//! or the CRI stops it.
//!
//! # How faithful
//! Checked against containerd 1.6.20's `pkg/cri/server` source and against
//! the answers of a real containerd 1.6.20 + runc on the test machine:
//! - **Error codes and texts** are containerd's, including the wrapping
//!   (`failed to reserve container name "N": name "N" is reserved for "ID"`
//!   → UNKNOWN; `failed to generate container "ID" spec: invalid target
//!   container: container "T" does not exist: not found` → NOT_FOUND;
//!   `... is not running - in state CONTAINER_CREATED` → UNKNOWN;
//!   `failed to resolve image "R": not found` → NOT_FOUND;
//!   `failed to get sandbox container task: no running task found: task S
//!   not found: not found` → NOT_FOUND for a stopped sandbox), and the order
//!   of the checks (sandbox, metadata, name, image, target).
//! - **Ids** are 64 hex characters and every lookup takes a unique prefix
//!   (containerd's truncindex): `""` is `Prefix can't be empty` (UNKNOWN),
//!   two matches are `Multiple IDs found with provided prefix: P`.
//! - **State machine**: a failed StartContainer leaves the container EXITED
//!   with exit code 128, reason `StartError` and the error as message (never
//!   startable again); StopContainer of a container that is not running is a
//!   no-op; StopPodSandbox SIGKILLs running containers (137) but leaves
//!   created ones CREATED; when a container that owns a PID namespace exits,
//!   every container that joined it through `TARGET` is killed too (137);
//!   RemoveContainer/RemovePodSandbox of unknown ids succeed; names are
//!   released on removal and on a failed create.
//! - **Message shapes**: ContainerStatus reports the image's first repo tag
//!   as `image` and its first repo digest (else the id) as `image_ref`,
//!   `resources` with the container's Linux resources (zeros when none),
//!   the config's mounts/labels/annotations, `log_path` = the request's
//!   sandbox `log_directory` joined with the config's `log_path` (empty when
//!   either is), reason `Completed`/`Error` computed from the exit code.
//!   ListContainers reports the config's `image` as given (the agent sends
//!   the `sha256:` id). Verbose infos are containerd's JSON documents:
//!   sandbox `{"pid","processStatus","netNamespaceClosed","image",
//!   "config",...}` with the config in Go's snake_case json tags
//!   (`log_directory`, `linux.cgroup_parent`, enums as numbers, zero values
//!   left out), container `{"sandboxID","pid","config","runtimeSpec",...}`
//!   with an OCI spec carrying `linux.namespaces` (`/proc/<pid>/ns/pid` of
//!   the target for `TARGET`), `linux.cgroupsPath`, no CPU/memory limits
//!   unless the config has some, and the CRI mounts as bind mounts.
//! - **Images**: references are normalised like containerd's
//!   `ParseDockerRef` (`busybox` → `docker.io/library/busybox:latest`);
//!   ImageStatus answers `image: None` for an absent image; PullImage always
//!   asks the registry (even for an image already present), adds the repo
//!   digest, and evaluates credentials like containerd 1.6's `ParseAuth`
//!   (a non-empty `server_address` must parse as a URL whose host is the
//!   registry host, `registry-1.docker.io` for Docker Hub, else the
//!   credentials are ignored). Missing or wrong credentials give Docker
//!   Hub's `pull access denied, ...` wording (UNKNOWN) for every registry;
//!   a real registry words it its own way.
//! - `Version` says `containerd 1.6.20~ds1`, CRI `v1` (Debian 12's build).
//!
//! # On purpose unlike containerd 1.6
//! - `GetContainerEvents` is served (containerd 1.7's event types and
//!   shapes: CREATED/STARTED/STOPPED/DELETED, also for sandboxes, with the
//!   sandbox status and all its container statuses), so the agent's CRI
//!   event path can be tested. Each subscriber gets the events from its
//!   subscription on (containerd 1.7 shares one buffered channel between
//!   subscribers). [`FakeRuntime::serve_container_events`]`(false)` restores
//!   1.6's UNIMPLEMENTED `method GetContainerEvents not implemented`.
//! - Lists are in creation order (containerd's are in map order: do not
//!   rely on either).
//! - A CreateContainer without `sandbox_config.metadata` answers UNKNOWN
//!   `transport error` and the fake lives on; containerd 1.6.20
//!   dereferences the nil pointer and dies (its client sees that error,
//!   then connection refused).
//!
//! # Test controls
//! [`FakeRuntime::fail_next`] injects a one-shot error into one RPC
//! (StartContainer applies it where a runc failure would happen: after the
//! checks, leaving the container EXITED 128 `StartError`); [`set_delay`]
//! slows an RPC down; [`set_unavailable`] stops the listener and removes the
//! socket, so clients see a real connection failure (UNAVAILABLE), and
//! `set_unavailable(false)` listens again with the same state, like a
//! containerd restart; [`calls`] lists the RPCs received in order.
//! StopContainer with a timeout ends the process with 143 (TERM's default);
//! [`FakeRuntime::on_term`] makes it exit with another code, or ignore TERM
//! (then StopContainer really waits the timeout and SIGKILLs: 137).
//!
//! # Invariants
//! All state sits behind one mutex and every RPC handles it in one critical
//! section (delays and stop timeouts wait outside it), so the snapshots the
//! test takes are consistent; each call is recorded before anything else
//! happens; a container or sandbox name is reserved for exactly one id
//! while that id exists; events are sent in the order the changes happen.
//!
//! # Left out
//! Exec/attach/port-forward/stats, image removal through the CRI, runtime
//! handlers other than the default, real processes (pids in verbose infos
//! are made up and `/proc/<pid>` does not exist), log files (only
//! [`FakeRuntime::write_log`] writes one), image entrypoints (the spec's
//! `args` are the config's command and args), CNI (pod IPs are made up from
//! `10.88.0.0/16`), and the sandbox image's pull on RunPodSandbox happens
//! only from the fake registry.
//!
//! [`set_delay`]: FakeRuntime::set_delay
//! [`set_unavailable`]: FakeRuntime::set_unavailable
//! [`calls`]: FakeRuntime::calls

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::Stream;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::UnixListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use ephemerald::cri::proto::image_service_server::{ImageService, ImageServiceServer};
use ephemerald::cri::proto::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use ephemerald::cri::proto::*;

/// The sandbox image containerd 1.6.20 uses by default.
pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.6";
/// `VersionResponse.runtime_version` of Debian 12's containerd.
pub const RUNTIME_VERSION: &str = "1.6.20~ds1";
/// The exit code of a process killed by SIGKILL.
pub const SIGKILL_EXIT: i32 = 137;
/// The exit code of a process killed by SIGTERM.
pub const SIGTERM_EXIT: i32 = 143;
/// containerd's exit code for a container that failed to start.
pub const START_ERROR_EXIT: i32 = 128;

/// The RPCs the fake serves, by their gRPC method names.
pub const RPCS: [&str; 16] = [
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "ContainerStatus",
    "GetContainerEvents",
    "ListImages",
    "ImageStatus",
    "PullImage",
];

const EVENT_BUFFER: usize = 1024;
const POD_SUBNET: &str = "10.88";
const CONTAINERD_ROOT: &str = "/var/lib/containerd/io.containerd.grpc.v1.cri";
const CONTAINERD_STATE: &str = "/run/containerd/io.containerd.grpc.v1.cri";
const IMAGE_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// What a container's process does on the stop signal (SIGTERM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTerm {
    /// It exits at once with this code: 143 for the default disposition,
    /// 0 for a program that handles TERM and exits cleanly.
    Exit(i32),
    /// It ignores TERM (a PID 1 without a handler): StopContainer waits the
    /// whole timeout, then SIGKILLs it (137).
    Ignore,
}

impl Default for OnTerm {
    fn default() -> Self {
        OnTerm::Exit(SIGTERM_EXIT)
    }
}

/// An image, in the node's store or in the fake registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeImage {
    /// The config digest, `sha256:<64 hex>`: the CRI image id.
    pub id: String,
    /// Normalised references: repo tags (`docker.io/library/busybox:1.36`)
    /// and repo digests (`docker.io/library/busybox@sha256:…`).
    pub references: Vec<String>,
    /// Compressed size in bytes.
    pub size: u64,
    /// The image config's `User` (`""`, `"1000"`, `"nobody"`, `"1000:1000"`).
    pub user: String,
    /// The manifest digest, which a pull records as the repo digest.
    pub manifest_digest: String,
    /// Credentials the registry demands for a pull, if any.
    pub auth: Option<(String, String)>,
}

impl FakeImage {
    /// An image known by `reference` (normalised like containerd does), with
    /// ids derived from it. Panics on a reference containerd would refuse.
    pub fn new(reference: &str) -> FakeImage {
        let normalised = normalize_reference(reference)
            .unwrap_or_else(|e| panic!("FakeImage::new({reference:?}): {e}"));
        FakeImage {
            id: format!("sha256:{}", sha256_hex(&format!("config {normalised}"))),
            manifest_digest: format!("sha256:{}", sha256_hex(&format!("manifest {normalised}"))),
            size: 1_000_000 + u64::from(sha256_hex(&normalised).as_bytes()[0]) * 1000,
            references: vec![normalised],
            user: String::new(),
            auth: None,
        }
    }

    /// Sets the image id (`sha256:<64 hex>`, or 64 hex).
    pub fn with_id(mut self, id: &str) -> FakeImage {
        self.id = if id.starts_with("sha256:") {
            id.to_string()
        } else {
            format!("sha256:{id}")
        };
        self
    }

    /// Sets the image config's `User`.
    pub fn with_user(mut self, user: &str) -> FakeImage {
        self.user = user.to_string();
        self
    }

    /// Makes the registry demand these credentials.
    pub fn with_auth(mut self, username: &str, password: &str) -> FakeImage {
        self.auth = Some((username.to_string(), password.to_string()));
        self
    }

    /// Adds another reference (normalised).
    pub fn with_reference(mut self, reference: &str) -> FakeImage {
        let r = normalize_reference(reference)
            .unwrap_or_else(|e| panic!("FakeImage::with_reference({reference:?}): {e}"));
        if !self.references.contains(&r) {
            self.references.push(r);
        }
        self
    }

    fn repo_tags(&self) -> Vec<String> {
        self.references
            .iter()
            .filter(|r| !r.contains('@'))
            .cloned()
            .collect()
    }

    fn repo_digests(&self) -> Vec<String> {
        self.references
            .iter()
            .filter(|r| r.contains('@'))
            .cloned()
            .collect()
    }

    fn to_cri(&self) -> Image {
        // containerd's getUserFromImage: a numeric user (before any `:group`)
        // is a uid, anything else a user name.
        let user = self.user.split(':').next().unwrap_or_default();
        let (uid, username) = match user.parse::<i64>() {
            Ok(value) => (Some(Int64Value { value }), String::new()),
            Err(_) => (None, user.to_string()),
        };
        Image {
            id: self.id.clone(),
            repo_tags: self.repo_tags(),
            repo_digests: self.repo_digests(),
            size: self.size,
            uid,
            username,
            spec: None,
            pinned: false,
        }
    }
}

/// A sandbox as the fake holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeSandbox {
    /// 64 hex characters.
    pub id: String,
    /// The reserved name, `<name>_<namespace>_<uid>_<attempt>`.
    pub name: String,
    /// The config it was run with.
    pub config: PodSandboxConfig,
    /// `RunPodSandboxRequest.runtime_handler`.
    pub runtime_handler: String,
    /// READY (else NOTREADY).
    pub ready: bool,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// The pause process's (made-up) pid; 0 once stopped.
    pub pid: u32,
    /// Pod IP; empty on the host network.
    pub ip: String,
    /// The sandbox image it runs.
    pub image: String,
}

impl FakeSandbox {
    fn namespaces(&self) -> NamespaceOption {
        self.config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default()
    }

    fn host_network(&self) -> bool {
        self.namespaces().network == NamespaceMode::Node as i32
    }
}

/// A container as the fake holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeContainer {
    /// 64 hex characters.
    pub id: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// The reserved name, `<name>_<pod>_<namespace>_<uid>_<attempt>`.
    pub name: String,
    /// The config it was created with.
    pub config: ContainerConfig,
    /// The resolved image id (`sha256:…`).
    pub image_ref: String,
    /// Full log path (sandbox log directory + config log path), or empty.
    pub log_path: String,
    /// Nanoseconds since the epoch; `started_at`/`finished_at` are 0 until then.
    pub created_at: i64,
    /// When it started.
    pub started_at: i64,
    /// When it exited.
    pub finished_at: i64,
    /// Exit code once exited.
    pub exit_code: i32,
    /// Stored reason: empty (reported as Completed/Error), `StartError`, `OOMKilled`.
    pub reason: String,
    /// Stored message (the start error).
    pub message: String,
    /// The (made-up) pid while running.
    pub pid: u32,
    /// What the process does on SIGTERM.
    pub on_term: OnTerm,
    /// The full id of the PID-namespace target, for `TARGET` mode.
    pub target_id: Option<String>,
    /// The container whose PID namespace this one is in, when that is a
    /// container's own (CONTAINER mode, or TARGET of one).
    pub pid_namespace_owner: Option<String>,
    /// The OCI runtime spec made at creation (verbose info `runtimeSpec`).
    pub runtime_spec: Value,
}

impl FakeContainer {
    /// The CRI state.
    pub fn state(&self) -> ContainerState {
        if self.finished_at != 0 {
            ContainerState::ContainerExited
        } else if self.started_at != 0 {
            ContainerState::ContainerRunning
        } else if self.created_at != 0 {
            ContainerState::ContainerCreated
        } else {
            ContainerState::ContainerUnknown
        }
    }

    /// `metadata.name`: the Kubernetes container name.
    pub fn container_name(&self) -> &str {
        self.config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or_default()
    }

    /// The reason ContainerStatus reports.
    pub fn reported_reason(&self) -> String {
        if self.state() == ContainerState::ContainerExited && self.reason.is_empty() {
            if self.exit_code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            }
        } else {
            self.reason.clone()
        }
    }

    fn namespaces(&self) -> NamespaceOption {
        self.config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default()
    }
}

/// A handle on a running fake runtime. Clones share the runtime.
#[derive(Clone)]
pub struct FakeRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    state: Mutex<State>,
    listening: Mutex<Option<Listening>>,
}

struct Listening {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl FakeRuntime {
    /// Binds `<dir>/cri.sock` and serves. Must be called inside a tokio
    /// runtime; panics when the socket cannot be bound.
    pub fn start(dir: &Path) -> FakeRuntime {
        Self::try_start(dir).unwrap_or_else(|e| {
            panic!(
                "fake CRI runtime cannot listen on {}: {e}",
                dir.join("cri.sock").display()
            )
        })
    }

    /// [`FakeRuntime::start`], returning the bind error.
    pub fn try_start(dir: &Path) -> std::io::Result<FakeRuntime> {
        let rt = FakeRuntime {
            inner: Arc::new(Inner {
                socket: dir.join("cri.sock"),
                state: Mutex::new(State::new()),
                listening: Mutex::new(None),
            }),
        };
        rt.listen()?;
        Ok(rt)
    }

    /// `unix:///…/cri.sock`, for [`ephemerald::cri::CriClient::new`].
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.inner.socket.display())
    }

    /// The socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    /// Stops serving: ends event streams, waits for open connections to
    /// close and removes the socket. The state is kept.
    pub async fn shutdown(&self) {
        let listening = lock(&self.inner.listening).take();
        if let Some(l) = listening {
            l.cancel.cancel();
            let _ = l.task.await;
        }
        let _ = std::fs::remove_file(&self.inner.socket);
    }

    /// `true`: the runtime goes away like a crashed containerd — the
    /// listener stops, connections close and the socket disappears, so every
    /// call fails with UNAVAILABLE from the client's own transport.
    /// `false`: it listens again on the same path with the same state (a
    /// containerd restart keeps its containers). Returns once the change
    /// took effect.
    pub async fn set_unavailable(&self, down: bool) {
        if down {
            self.shutdown().await;
        } else if lock(&self.inner.listening).is_none() {
            self.listen()
                .unwrap_or_else(|e| panic!("fake CRI runtime cannot listen again: {e}"));
        }
    }

    fn listen(&self) -> std::io::Result<()> {
        let _ = std::fs::remove_file(&self.inner.socket);
        let listener = UnixListener::bind(&self.inner.socket)?;
        let cancel = CancellationToken::new();
        let service = Service {
            inner: self.inner.clone(),
            cancel: cancel.clone(),
        };
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(RuntimeServiceServer::new(service.clone()))
                .add_service(ImageServiceServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "fake CRI runtime stopped serving");
            }
        });
        *lock(&self.inner.listening) = Some(Listening { cancel, task });
        Ok(())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Adds an image to the node's store, merging references if the id is
    /// already there and moving a reference another image held. An image
    /// from [`FakeImage::new`] has no repo digest, like one imported with
    /// `ctr images import`.
    pub fn add_image(&self, image: FakeImage) {
        self.state().store_image(image);
    }

    /// Adds an image known as `reference` with this id (`sha256:…`, or
    /// empty for one derived from the reference) and config `User`.
    pub fn set_image(&self, reference: &str, id: &str, user: &str) -> String {
        let mut image = FakeImage::new(reference).with_user(user);
        if !id.is_empty() {
            image = image.with_id(id);
        }
        let id = image.id.clone();
        self.add_image(image);
        id
    }

    /// Removes the image with this reference or id (all its references)
    /// from the node's store.
    pub fn remove_image(&self, reference_or_id: &str) {
        let mut st = self.state();
        if let Lookup::Found(i) = st.resolve_image(reference_or_id) {
            st.images.remove(i);
        }
    }

    /// The node's images.
    pub fn images(&self) -> Vec<FakeImage> {
        self.state().images.clone()
    }

    /// Makes an image pullable: PullImage of any of its references succeeds
    /// (with its credentials, if it demands some).
    pub fn add_to_registry(&self, image: FakeImage) {
        let mut st = self.state();
        st.registry.retain(|i| i.id != image.id);
        st.registry.push(image);
    }

    /// `false`: every pull fails like on a machine without network
    /// (UNKNOWN `... dial tcp: lookup HOST: no such host`). Default `true`.
    pub fn set_registry_reachable(&self, reachable: bool) {
        self.state().registry_reachable = reachable;
    }

    /// The image RunPodSandbox needs (default [`DEFAULT_SANDBOX_IMAGE`],
    /// present from the start); pulled from the registry when absent.
    pub fn set_sandbox_image(&self, reference: &str) {
        let r = normalize_reference(reference)
            .unwrap_or_else(|e| panic!("set_sandbox_image({reference:?}): {e}"));
        self.state().sandbox_image = r;
    }

    /// The next call of `rpc` (e.g. `"StartContainer"`, see [`RPCS`]) fails
    /// with this code and message. Several calls queue up, one per call.
    pub fn fail_next(&self, rpc: &str, code: Code, message: &str) {
        let rpc = known_rpc(rpc);
        self.state()
            .failures
            .entry(rpc.to_string())
            .or_default()
            .push_back((code, message.to_string()));
    }

    /// Every call of `rpc` waits this long before it is handled
    /// (`Duration::ZERO` to stop).
    pub fn set_delay(&self, rpc: &str, delay: Duration) {
        let rpc = known_rpc(rpc);
        self.state().delays.insert(rpc.to_string(), delay);
    }

    /// Whether GetContainerEvents is served (default) or answers
    /// UNIMPLEMENTED like containerd 1.6.
    pub fn serve_container_events(&self, serve: bool) {
        self.state().serve_events = serve;
    }

    /// The RPCs received so far, in order (injected failures included).
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Forgets the calls received so far.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// A snapshot of the containers, in creation order.
    pub fn containers(&self) -> Vec<FakeContainer> {
        self.state().containers.clone()
    }

    /// The container with this id (or unique id prefix).
    pub fn container(&self, id: &str) -> Option<FakeContainer> {
        let st = self.state();
        st.container_index(id)
            .ok()
            .map(|i| st.containers[i].clone())
    }

    /// A snapshot of the sandboxes, in creation order.
    pub fn sandboxes(&self) -> Vec<FakeSandbox> {
        self.state().sandboxes.clone()
    }

    /// The running container's process exits with `code`. Panics when the
    /// container does not exist or is not running.
    pub fn exit(&self, id: &str, code: i32) {
        self.state().test_exit(id, code, "");
    }

    /// The running container is OOM-killed: exit code 137, reason
    /// `OOMKilled`.
    pub fn oom_kill(&self, id: &str) {
        self.state().test_exit(id, SIGKILL_EXIT, "OOMKilled");
    }

    /// What the container's process does on SIGTERM (default: exits 143).
    pub fn on_term(&self, id: &str, behaviour: OnTerm) {
        let mut st = self.state();
        let i = st
            .container_index(id)
            .unwrap_or_else(|e| panic!("on_term({id}): {}", e.msg));
        st.containers[i].on_term = behaviour;
    }

    /// Appends a line to the container's log file in the CRI format
    /// (`<RFC 3339 time> <stdout|stderr> F <line>`), as the runtime would
    /// for output of its process. Panics without a log path.
    pub fn write_log(&self, id: &str, stream: &str, line: &str) {
        let path = {
            let st = self.state();
            let i = st
                .container_index(id)
                .unwrap_or_else(|e| panic!("write_log({id}): {}", e.msg));
            st.containers[i].log_path.clone()
        };
        assert!(
            !path.is_empty(),
            "write_log({id}): the container has no log path"
        );
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("log directory");
        }
        let ts = k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(now_ns()))
            .expect("time in range");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open log file");
        writeln!(f, "{ts} {stream} F {line}").expect("write log file");
    }
}

fn known_rpc(rpc: &str) -> &'static str {
    RPCS.iter()
        .find(|r| **r == rpc)
        .copied()
        .unwrap_or_else(|| panic!("unknown RPC {rpc:?}; the fake serves {RPCS:?}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn sha256_hex(s: &str) -> String {
    format!("{:x}", Sha256::digest(s.as_bytes()))
}

fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A containerd error: a gRPC code (its errdefs class) and the wrapped text.
#[derive(Debug, Clone)]
struct CtrdError {
    code: Code,
    msg: String,
}

impl CtrdError {
    fn new(code: Code, msg: impl Into<String>) -> Self {
        CtrdError {
            code,
            msg: msg.into(),
        }
    }

    /// errdefs.ErrNotFound.
    fn not_found() -> Self {
        Self::new(Code::NotFound, "not found")
    }

    /// A plain Go error: UNKNOWN on the wire.
    fn unknown(msg: impl Into<String>) -> Self {
        Self::new(Code::Unknown, msg)
    }

    /// `fmt.Errorf("<context>: %w", err)`: the class survives the wrapping.
    fn wrap(self, context: impl std::fmt::Display) -> Self {
        CtrdError {
            code: self.code,
            msg: format!("{context}: {}", self.msg),
        }
    }
}

impl From<CtrdError> for Status {
    fn from(e: CtrdError) -> Status {
        Status::new(e.code, e.msg)
    }
}

/// The result of an image lookup.
enum Lookup {
    Found(usize),
    NotFound,
    Ambiguous,
}

struct State {
    sandboxes: Vec<FakeSandbox>,
    containers: Vec<FakeContainer>,
    sandbox_names: HashMap<String, String>,
    container_names: HashMap<String, String>,
    images: Vec<FakeImage>,
    registry: Vec<FakeImage>,
    registry_reachable: bool,
    sandbox_image: String,
    failures: HashMap<String, VecDeque<(Code, String)>>,
    delays: HashMap<String, Duration>,
    calls: Vec<String>,
    serve_events: bool,
    events: broadcast::Sender<ContainerEventResponse>,
    next_pid: u32,
    next_ip: u32,
    last_ns: i64,
}

impl State {
    fn new() -> State {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let mut st = State {
            sandboxes: vec![],
            containers: vec![],
            sandbox_names: HashMap::new(),
            container_names: HashMap::new(),
            images: vec![],
            registry: vec![],
            registry_reachable: true,
            sandbox_image: DEFAULT_SANDBOX_IMAGE.into(),
            failures: HashMap::new(),
            delays: HashMap::new(),
            calls: vec![],
            serve_events: true,
            events,
            next_pid: 4100,
            next_ip: 2,
            last_ns: 0,
        };
        st.store_image(FakeImage::new(DEFAULT_SANDBOX_IMAGE));
        st
    }

    /// Strictly increasing timestamps, so creation order is observable.
    fn now(&mut self) -> i64 {
        let t = now_ns().max(self.last_ns + 1);
        self.last_ns = t;
        t
    }

    fn pid(&mut self) -> u32 {
        self.next_pid += 1;
        self.next_pid
    }

    fn take_failure(&mut self, rpc: &str) -> Option<CtrdError> {
        let (code, msg) = self.failures.get_mut(rpc)?.pop_front()?;
        Some(CtrdError::new(code, msg))
    }

    // ---- lookups (containerd's truncindex) ----------------------------------

    fn index_of<'a>(ids: impl Iterator<Item = &'a str>, prefix: &str) -> Result<usize, CtrdError> {
        if prefix.is_empty() {
            return Err(CtrdError::unknown("Prefix can't be empty"));
        }
        let hits: Vec<usize> = ids
            .enumerate()
            .filter(|(_, id)| id.starts_with(prefix))
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [] => Err(CtrdError::not_found()),
            [i] => Ok(*i),
            _ => Err(CtrdError::unknown(format!(
                "Multiple IDs found with provided prefix: {prefix}"
            ))),
        }
    }

    fn container_index(&self, id: &str) -> Result<usize, CtrdError> {
        Self::index_of(self.containers.iter().map(|c| c.id.as_str()), id)
    }

    fn sandbox_index(&self, id: &str) -> Result<usize, CtrdError> {
        Self::index_of(self.sandboxes.iter().map(|s| s.id.as_str()), id)
    }

    /// containerd's `localResolve`: a digest is an id; a reference resolves
    /// through the image names; anything else is tried as an id (prefix).
    fn resolve_image(&self, ref_or_id: &str) -> Lookup {
        let id = if is_digest(ref_or_id) {
            ref_or_id.to_string()
        } else {
            normalize_reference(ref_or_id)
                .ok()
                .and_then(|r| {
                    self.images
                        .iter()
                        .find(|i| i.references.contains(&r))
                        .map(|i| i.id.clone())
                })
                .unwrap_or_else(|| ref_or_id.to_string())
        };
        self.lookup_image_id(&id)
    }

    /// go-digest's `digestset.Lookup`: exact id, or a unique short form.
    fn lookup_image_id(&self, d: &str) -> Lookup {
        if let Some(i) = self.images.iter().position(|i| i.id == d) {
            return Lookup::Found(i);
        }
        let (alg, hex) = match d.split_once(':') {
            Some((a, h)) => (Some(a), h),
            None => (None, d),
        };
        let hits: Vec<usize> = self
            .images
            .iter()
            .enumerate()
            .filter(|(_, img)| {
                let (ialg, ihex) = img.id.split_once(':').unwrap_or(("sha256", &img.id));
                alg.is_none_or(|a| a == ialg) && ihex.starts_with(hex)
            })
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [] => Lookup::NotFound,
            [i] => Lookup::Found(*i),
            _ => Lookup::Ambiguous,
        }
    }

    /// Adds an image, merging with an image of the same id; a reference
    /// moves to the new image (as a pulled tag does).
    fn store_image(&mut self, image: FakeImage) {
        for other in &mut self.images {
            if other.id != image.id {
                other.references.retain(|r| !image.references.contains(r));
            }
        }
        if let Some(existing) = self.images.iter_mut().find(|i| i.id == image.id) {
            for r in image.references {
                if !existing.references.contains(&r) {
                    existing.references.push(r);
                }
            }
        } else {
            self.images.push(image);
        }
    }

    // ---- messages -------------------------------------------------------------

    fn sandbox_status(&self, sb: &FakeSandbox) -> PodSandboxStatus {
        let ns = sb.namespaces();
        let ip = if sb.host_network() || !sb.ready {
            String::new()
        } else {
            sb.ip.clone()
        };
        PodSandboxStatus {
            id: sb.id.clone(),
            metadata: sb.config.metadata.clone(),
            state: if sb.ready {
                PodSandboxState::SandboxReady
            } else {
                PodSandboxState::SandboxNotready
            } as i32,
            created_at: sb.created_at,
            network: Some(PodSandboxNetworkStatus {
                ip,
                additional_ips: vec![],
            }),
            linux: Some(LinuxPodSandboxStatus {
                namespaces: Some(Namespace {
                    options: Some(NamespaceOption {
                        network: ns.network,
                        pid: ns.pid,
                        ipc: ns.ipc,
                        target_id: String::new(),
                    }),
                }),
            }),
            labels: sb.config.labels.clone(),
            annotations: sb.config.annotations.clone(),
            runtime_handler: sb.runtime_handler.clone(),
        }
    }

    fn to_cri_sandbox(sb: &FakeSandbox) -> PodSandbox {
        PodSandbox {
            id: sb.id.clone(),
            metadata: sb.config.metadata.clone(),
            state: if sb.ready {
                PodSandboxState::SandboxReady
            } else {
                PodSandboxState::SandboxNotready
            } as i32,
            created_at: sb.created_at,
            labels: sb.config.labels.clone(),
            annotations: sb.config.annotations.clone(),
            runtime_handler: sb.runtime_handler.clone(),
        }
    }

    fn sandbox_info(&self, sb: &FakeSandbox) -> String {
        let cni = if sb.host_network() {
            Value::Null
        } else {
            json!({
                "Interfaces": {"eth0": {
                    "IPConfigs": [{"IP": sb.ip, "Gateway": format!("{POD_SUBNET}.0.1")}],
                    "Mac": format!("0a:58:{}:{}:{}:{}", &sb.id[0..2], &sb.id[2..4], &sb.id[4..6], &sb.id[6..8]),
                    "Sandbox": format!("/var/run/netns/cni-{}", &sb.id[..32]),
                }},
                "DNS": [{}, {}],
                "Routes": null,
            })
        };
        json!({
            "pid": sb.pid,
            "processStatus": if sb.ready { "running" } else { "deleted" },
            "netNamespaceClosed": !sb.host_network() && !sb.ready,
            "image": sb.image,
            "snapshotKey": sb.id,
            "snapshotter": "overlayfs",
            "runtimeHandler": sb.runtime_handler,
            "runtimeType": "io.containerd.runc.v2",
            "runtimeOptions": null,
            "config": sandbox_config_json(&sb.config),
            "runtimeSpec": sandbox_spec(sb),
            "cniResult": cni,
        })
        .to_string()
    }

    fn to_cri_container(c: &FakeContainer) -> Container {
        Container {
            id: c.id.clone(),
            pod_sandbox_id: c.sandbox_id.clone(),
            metadata: c.config.metadata.clone(),
            image: c.config.image.clone(),
            image_ref: c.image_ref.clone(),
            state: c.state() as i32,
            created_at: c.created_at,
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            image_id: String::new(),
        }
    }

    fn container_status(&self, c: &FakeContainer) -> ContainerStatus {
        // containerd: `image` is the image's first repo tag, `image_ref` its
        // first repo digest, when the image is still there.
        let mut image = c.config.image.clone();
        let mut image_ref = c.image_ref.clone();
        if let Some(img) = self.images.iter().find(|i| i.id == c.image_ref) {
            if let Some(tag) = img.repo_tags().first() {
                image = Some(ImageSpec {
                    image: tag.clone(),
                    ..Default::default()
                });
            }
            if let Some(d) = img.repo_digests().first() {
                image_ref = d.clone();
            }
        }
        let state = c.state();
        let (started_at, finished_at) = match state {
            ContainerState::ContainerCreated => (0, 0),
            ContainerState::ContainerRunning => (c.started_at, 0),
            _ => (c.started_at, c.finished_at),
        };
        ContainerStatus {
            id: c.id.clone(),
            metadata: c.config.metadata.clone(),
            state: state as i32,
            created_at: c.created_at,
            started_at,
            finished_at,
            exit_code: c.exit_code,
            image,
            image_ref,
            reason: c.reported_reason(),
            message: c.message.clone(),
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            mounts: c.config.mounts.clone(),
            log_path: c.log_path.clone(),
            resources: Some(ContainerResources {
                linux: Some(
                    c.config
                        .linux
                        .as_ref()
                        .and_then(|l| l.resources.clone())
                        .unwrap_or_default(),
                ),
            }),
            image_id: String::new(),
        }
    }

    fn container_info(c: &FakeContainer) -> String {
        json!({
            "sandboxID": c.sandbox_id,
            "pid": c.pid,
            "removing": false,
            "snapshotKey": c.id,
            "snapshotter": "overlayfs",
            "runtimeType": "io.containerd.runc.v2",
            "runtimeOptions": null,
            "config": container_config_json(&c.config),
            "runtimeSpec": c.runtime_spec,
        })
        .to_string()
    }

    /// Sends a containerd 1.7-style event: the sandbox's status and the
    /// statuses of all its containers, as they are now.
    fn emit(&self, container_id: &str, sandbox_id: &str, kind: ContainerEventType) {
        let event = ContainerEventResponse {
            container_id: container_id.to_string(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            pod_sandbox_status: self
                .sandboxes
                .iter()
                .find(|s| s.id == sandbox_id)
                .map(|s| self.sandbox_status(s)),
            containers_statuses: self
                .containers
                .iter()
                .filter(|c| c.sandbox_id == sandbox_id)
                .map(|c| self.container_status(c))
                .collect(),
        };
        // No subscriber is fine: events are not kept.
        let _ = self.events.send(event);
    }

    // ---- state changes ----------------------------------------------------------

    /// The process of container `i` exited (or was killed) now.
    fn exited(&mut self, i: usize, code: i32, reason: &str) {
        let now = self.now();
        let c = &mut self.containers[i];
        c.finished_at = now;
        c.exit_code = code;
        c.reason = reason.to_string();
        c.pid = 0;
        let (id, sandbox_id) = (c.id.clone(), c.sandbox_id.clone());
        self.emit(&id, &sandbox_id, ContainerEventType::ContainerStoppedEvent);
        // The init of a PID namespace is gone: the kernel kills the rest.
        let joined: Vec<usize> = self
            .containers
            .iter()
            .enumerate()
            .filter(|(j, o)| {
                *j != i
                    && o.state() == ContainerState::ContainerRunning
                    && o.pid_namespace_owner.as_deref() == Some(id.as_str())
            })
            .map(|(j, _)| j)
            .collect();
        for j in joined {
            if self.containers[j].state() == ContainerState::ContainerRunning {
                self.exited(j, SIGKILL_EXIT, "");
            }
        }
    }

    fn test_exit(&mut self, id: &str, code: i32, reason: &str) {
        let i = self
            .container_index(id)
            .unwrap_or_else(|e| panic!("exit({id}): {}", e.msg));
        let state = self.containers[i].state();
        assert!(
            state == ContainerState::ContainerRunning,
            "exit({id}): the container is not running ({})",
            state.as_str_name()
        );
        self.exited(i, code, reason);
    }

    fn run_pod_sandbox(&mut self, r: RunPodSandboxRequest) -> Result<String, CtrdError> {
        let config = r.config.unwrap_or_default();
        let Some(meta) = config.metadata.clone() else {
            return Err(CtrdError::unknown("sandbox config must include metadata"));
        };
        let id = new_id();
        let name = format!(
            "{}_{}_{}_{}",
            meta.name, meta.namespace, meta.uid, meta.attempt
        );
        if let Some(holder) = self.sandbox_names.get(&name) {
            return Err(
                CtrdError::unknown(format!("name {name:?} is reserved for {holder:?}"))
                    .wrap(format_args!("failed to reserve sandbox name {name:?}")),
            );
        }
        let image = self.sandbox_image.clone();
        if let Lookup::NotFound | Lookup::Ambiguous = self.resolve_image(&image) {
            let pulled = self.pull(&image, None).map_err(|e| {
                e.wrap(format_args!("failed to pull image {image:?}"))
                    .wrap(format_args!("failed to get sandbox image {image:?}"))
            })?;
            tracing::debug!(image = %image, id = %pulled, "fake runtime pulled the sandbox image");
        }
        let ns = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        let host_network = ns.network == NamespaceMode::Node as i32;
        if host_network && !config.hostname.is_empty() {
            // runc refuses; containerd passes its words on.
            return Err(CtrdError::unknown(
                "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to set hostname without a private UTS namespace: unknown",
            ));
        }
        let ip = if host_network {
            String::new()
        } else {
            self.next_ip += 1;
            format!(
                "{POD_SUBNET}.{}.{}",
                self.next_ip / 254,
                self.next_ip % 254 + 1
            )
        };
        let sandbox = FakeSandbox {
            id: id.clone(),
            name: name.clone(),
            created_at: self.now(),
            pid: self.pid(),
            config,
            runtime_handler: r.runtime_handler,
            ready: true,
            ip,
            image,
        };
        self.sandbox_names.insert(name, id.clone());
        self.sandboxes.push(sandbox);
        self.emit(&id, &id, ContainerEventType::ContainerCreatedEvent);
        self.emit(&id, &id, ContainerEventType::ContainerStartedEvent);
        Ok(id)
    }

    fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), CtrdError> {
        let i = self.sandbox_index(id).map_err(|e| {
            e.wrap(format_args!(
                "an error occurred when try to find sandbox {id:?}"
            ))
        })?;
        let sid = self.sandboxes[i].id.clone();
        // Forcibly (SIGKILL) stop its running containers; created ones stay.
        let running: Vec<usize> = self
            .containers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.sandbox_id == sid && c.state() == ContainerState::ContainerRunning)
            .map(|(j, _)| j)
            .collect();
        for j in running {
            if self.containers[j].state() == ContainerState::ContainerRunning {
                self.exited(j, SIGKILL_EXIT, "");
            }
        }
        let sb = &mut self.sandboxes[i];
        if sb.ready {
            sb.ready = false;
            sb.pid = 0;
            self.emit(&sid, &sid, ContainerEventType::ContainerStoppedEvent);
        }
        Ok(())
    }

    fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), CtrdError> {
        let i = match self.sandbox_index(id) {
            Ok(i) => i,
            Err(e) if e.code == Code::NotFound => return Ok(()),
            Err(e) => {
                return Err(e.wrap(format_args!(
                    "an error occurred when try to find sandbox {id:?}"
                )));
            }
        };
        let sid = self.sandboxes[i].id.clone();
        self.stop_pod_sandbox(&sid)
            .map_err(|e| e.wrap(format_args!("failed to forcibly stop sandbox {sid:?}")))?;
        let ids: Vec<String> = self
            .containers
            .iter()
            .filter(|c| c.sandbox_id == sid)
            .map(|c| c.id.clone())
            .collect();
        for cid in ids {
            self.remove_container(&cid)?;
        }
        let i = self.sandbox_index(&sid)?;
        let sb = self.sandboxes.remove(i);
        self.sandbox_names.retain(|_, v| *v != sb.id);
        self.emit(&sid, &sid, ContainerEventType::ContainerDeletedEvent);
        Ok(())
    }

    fn create_container(&mut self, r: CreateContainerRequest) -> Result<String, CtrdError> {
        let si = self.sandbox_index(&r.pod_sandbox_id).map_err(|e| {
            e.wrap(format_args!(
                "failed to find sandbox id {:?}",
                r.pod_sandbox_id
            ))
        })?;
        let sandbox = self.sandboxes[si].clone();
        if !sandbox.ready {
            // Its task is gone: containerd cannot find the sandbox's pid.
            return Err(CtrdError::not_found()
                .wrap(format_args!("task {} not found", sandbox.id))
                .wrap("no running task found")
                .wrap("failed to get sandbox container task"));
        }
        let config = r.config.unwrap_or_default();
        let Some(meta) = config.metadata.clone() else {
            return Err(CtrdError::unknown("container config must include metadata"));
        };
        let sandbox_config = r.sandbox_config.unwrap_or_default();
        let Some(smeta) = sandbox_config.metadata.clone() else {
            // containerd 1.6.20 dereferences the nil sandbox metadata and
            // dies; its client sees this.
            return Err(CtrdError::unknown("transport error"));
        };
        let id = new_id();
        let name = format!(
            "{}_{}_{}_{}_{}",
            meta.name, smeta.name, smeta.namespace, smeta.uid, meta.attempt
        );
        if let Some(holder) = self.container_names.get(&name) {
            return Err(
                CtrdError::unknown(format!("name {name:?} is reserved for {holder:?}"))
                    .wrap(format_args!("failed to reserve container name {name:?}")),
            );
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        let image = match self.resolve_image(&image_name) {
            Lookup::Found(i) => self.images[i].clone(),
            Lookup::NotFound => {
                return Err(CtrdError::not_found()
                    .wrap(format_args!("failed to resolve image {image_name:?}")));
            }
            Lookup::Ambiguous => {
                return Err(CtrdError::unknown("ambiguous digest string")
                    .wrap(format_args!("failed to resolve image {image_name:?}")));
            }
        };
        let ns = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        let (target_id, target_pid, owner) = if ns.pid == NamespaceMode::Target as i32 {
            let t = self
                .validate_target(&sandbox.id, &ns.target_id)
                .map_err(|e| {
                    e.wrap("invalid target container")
                        .wrap(format_args!("failed to generate container {id:?} spec"))
                })?;
            // The target's namespace: its own (CONTAINER), the one it joined
            // (TARGET), or the pod's (no container owns it).
            let target = &self.containers[t];
            (
                Some(target.id.clone()),
                target.pid,
                target.pid_namespace_owner.clone(),
            )
        } else if ns.pid == NamespaceMode::Container as i32 {
            (None, 0, Some(id.clone()))
        } else {
            (None, sandbox.pid, None)
        };
        let log_path = if !sandbox_config.log_directory.is_empty() && !config.log_path.is_empty() {
            Path::new(&sandbox_config.log_directory)
                .join(&config.log_path)
                .display()
                .to_string()
        } else {
            String::new()
        };
        let runtime_spec = container_spec(&SpecInputs {
            id: &id,
            sandbox: &sandbox,
            sandbox_config: &sandbox_config,
            config: &config,
            image: &image,
            target_pid,
        });
        let container = FakeContainer {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            name: name.clone(),
            image_ref: image.id.clone(),
            log_path,
            created_at: self.now(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            pid: 0,
            on_term: OnTerm::default(),
            target_id,
            pid_namespace_owner: owner,
            runtime_spec,
            config,
        };
        self.container_names.insert(name, id.clone());
        self.containers.push(container);
        self.emit(&id, &sandbox.id, ContainerEventType::ContainerCreatedEvent);
        Ok(id)
    }

    /// containerd's `validateTargetContainer`.
    fn validate_target(&self, sandbox_id: &str, target: &str) -> Result<usize, CtrdError> {
        let t = self
            .container_index(target)
            .map_err(|e| e.wrap(format_args!("container {target:?} does not exist")))?;
        let c = &self.containers[t];
        if c.sandbox_id != sandbox_id {
            return Err(CtrdError::unknown(format!(
                "container {target:?} (sandbox {}) does not belong to sandbox {sandbox_id}",
                c.sandbox_id
            )));
        }
        let state = c.state();
        if state != ContainerState::ContainerRunning {
            return Err(CtrdError::unknown(format!(
                "container {target:?} is not running - in state {}",
                state.as_str_name()
            )));
        }
        Ok(t)
    }

    fn start_container(&mut self, id: &str) -> Result<(), CtrdError> {
        let i = self.container_index(id).map_err(|e| {
            e.wrap(format_args!(
                "an error occurred when try to find container {id:?}"
            ))
        })?;
        let c = self.containers[i].clone();
        let state = c.state();
        if state != ContainerState::ContainerCreated {
            return Err(CtrdError::unknown(format!(
                "container is in {} state",
                state.as_str_name()
            ))
            .wrap(format_args!(
                "failed to set starting state for container {:?}",
                c.id
            )));
        }
        match self.start_checks(&c) {
            Ok(()) => {
                let now = self.now();
                let pid = self.pid();
                let c = &mut self.containers[i];
                c.started_at = now;
                c.pid = pid;
                let (cid, sid) = (c.id.clone(), c.sandbox_id.clone());
                self.emit(&cid, &sid, ContainerEventType::ContainerStartedEvent);
                Ok(())
            }
            Err(e) => {
                // containerd marks a container that failed to start as exited.
                let now = self.now();
                let c = &mut self.containers[i];
                c.pid = 0;
                c.finished_at = now;
                c.exit_code = START_ERROR_EXIT;
                c.reason = "StartError".into();
                c.message = e.msg.clone();
                Err(e)
            }
        }
    }

    fn start_checks(&mut self, c: &FakeContainer) -> Result<(), CtrdError> {
        let sandbox_ready = self
            .sandboxes
            .iter()
            .find(|s| s.id == c.sandbox_id)
            .is_some_and(|s| s.ready);
        if !sandbox_ready {
            return Err(CtrdError::unknown(format!(
                "sandbox container {:?} is not running",
                c.sandbox_id
            )));
        }
        let ns = c.namespaces();
        if ns.pid == NamespaceMode::Target as i32 {
            self.validate_target(&c.sandbox_id, &ns.target_id)
                .map_err(|e| e.wrap("invalid target container"))?;
        }
        // Where runc would fail: an injected StartContainer failure.
        match self.take_failure("StartContainer") {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// StopContainer's first part: the id, whether it runs and what its
    /// process does on TERM.
    fn stop_target(&self, id: &str) -> Result<Option<(String, OnTerm)>, CtrdError> {
        let i = self.container_index(id).map_err(|e| {
            e.wrap(format_args!(
                "an error occurred when try to find container {id:?}"
            ))
        })?;
        let c = &self.containers[i];
        Ok((c.state() == ContainerState::ContainerRunning).then(|| (c.id.clone(), c.on_term)))
    }

    /// Ends a running container with `code` if it still runs.
    fn kill(&mut self, full_id: &str, code: i32) {
        if let Some(i) = self.containers.iter().position(|c| c.id == full_id)
            && self.containers[i].state() == ContainerState::ContainerRunning
        {
            self.exited(i, code, "");
        }
    }

    fn remove_container(&mut self, id: &str) -> Result<(), CtrdError> {
        let i = match self.container_index(id) {
            Ok(i) => i,
            Err(e) if e.code == Code::NotFound => return Ok(()),
            Err(e) => {
                return Err(e.wrap(format_args!(
                    "an error occurred when try to find container {id:?}"
                )));
            }
        };
        if self.containers[i].state() == ContainerState::ContainerRunning {
            self.exited(i, SIGKILL_EXIT, "");
        }
        let c = self.containers.remove(i);
        self.container_names.retain(|_, v| *v != c.id);
        self.emit(
            &c.id,
            &c.sandbox_id,
            ContainerEventType::ContainerDeletedEvent,
        );
        Ok(())
    }

    fn list_containers(&self, filter: Option<ContainerFilter>) -> Vec<Container> {
        let all = self.containers.iter().map(Self::to_cri_container);
        let Some(mut f) = filter else {
            return all.collect();
        };
        // containerd widens unique prefixes to full ids before comparing.
        if let Ok(i) = self.container_index(&f.id) {
            f.id = self.containers[i].id.clone();
        }
        if let Ok(i) = self.sandbox_index(&f.pod_sandbox_id) {
            f.pod_sandbox_id = self.sandboxes[i].id.clone();
        }
        all.filter(|c| f.id.is_empty() || f.id == c.id)
            .filter(|c| f.pod_sandbox_id.is_empty() || f.pod_sandbox_id == c.pod_sandbox_id)
            .filter(|c| f.state.as_ref().is_none_or(|s| s.state == c.state))
            .filter(|c| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| c.labels.get(k) == Some(v))
            })
            .collect()
    }

    fn list_pod_sandbox(&self, filter: Option<PodSandboxFilter>) -> Vec<PodSandbox> {
        let all = self.sandboxes.iter().map(Self::to_cri_sandbox);
        let Some(mut f) = filter else {
            return all.collect();
        };
        if let Ok(i) = self.sandbox_index(&f.id) {
            f.id = self.sandboxes[i].id.clone();
        }
        all.filter(|s| f.id.is_empty() || f.id == s.id)
            .filter(|s| f.state.as_ref().is_none_or(|st| st.state == s.state))
            .filter(|s| {
                f.label_selector
                    .iter()
                    .all(|(k, v)| s.labels.get(k) == Some(v))
            })
            .collect()
    }

    /// PullImage against the fake registry; returns the image id.
    fn pull(&mut self, image_ref: &str, auth: Option<&AuthConfig>) -> Result<String, CtrdError> {
        let named = normalize_reference(image_ref).map_err(|e| {
            CtrdError::unknown(e).wrap(format_args!(
                "failed to parse image reference {image_ref:?}"
            ))
        })?;
        let failed = |e: CtrdError| {
            e.wrap(format_args!("failed to resolve reference {named:?}"))
                .wrap(format_args!("failed to pull and unpack image {named:?}"))
        };
        let (host, path, object) = registry_location(&named);
        if !self.registry_reachable {
            return Err(failed(CtrdError::unknown(format!(
                "failed to do request: Head \"https://{host}/v2/{path}/manifests/{object}\": dial tcp: lookup {host}: no such host"
            ))));
        }
        let name = named.split(['@']).next().unwrap_or(&named);
        let name = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => &name[..i],
            _ => name,
        };
        let Some(found) = self
            .registry
            .iter()
            .find(|img| {
                img.references.contains(&named)
                    || named == format!("{name}@{}", img.manifest_digest)
            })
            .cloned()
        else {
            return Err(failed(CtrdError::not_found().wrap(format_args!("{named}"))));
        };
        if let Some((user, password)) = &found.auth {
            let given = parse_auth(auth, &host).map_err(|e| failed(CtrdError::unknown(e)))?;
            if given.as_ref() != Some(&(user.clone(), password.clone())) {
                return Err(failed(CtrdError::unknown(
                    "pull access denied, repository does not exist or may require authorization: server message: insufficient_scope: authorization failed",
                )));
            }
        }
        let mut pulled = found.clone();
        pulled.references = vec![];
        if !named.contains('@') {
            pulled.references.push(named.clone());
        }
        pulled
            .references
            .push(format!("{name}@{}", found.manifest_digest));
        let id = pulled.id.clone();
        self.store_image(pulled);
        Ok(id)
    }
}

/// Where a pull of a normalised reference goes: registry host, repository
/// path and tag or digest.
fn registry_location(named: &str) -> (String, String, String) {
    let (domain, rest) = named.split_once('/').unwrap_or(("docker.io", named));
    let host = if domain == "docker.io" {
        "registry-1.docker.io".to_string()
    } else {
        domain.to_string()
    };
    let (path, object) = match rest.split_once('@') {
        Some((p, d)) => (p.to_string(), d.to_string()),
        None => match rest.rfind(':') {
            Some(i) => (rest[..i].to_string(), rest[i + 1..].to_string()),
            None => (rest.to_string(), "latest".to_string()),
        },
    };
    (host, path, object)
}

/// containerd 1.6's `ParseAuth`: the credentials a pull from `host` uses.
fn parse_auth(auth: Option<&AuthConfig>, host: &str) -> Result<Option<(String, String)>, String> {
    let Some(a) = auth else {
        return Ok(None);
    };
    if !a.server_address.is_empty() {
        // Go's url.Parse: only `scheme://host/...` has a host.
        let url_host = a
            .server_address
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
            .unwrap_or_default();
        if url_host != host {
            return Ok(None);
        }
    }
    if !a.username.is_empty() {
        return Ok(Some((a.username.clone(), a.password.clone())));
    }
    if !a.identity_token.is_empty() {
        return Ok(Some((String::new(), a.identity_token.clone())));
    }
    if !a.auth.is_empty() {
        let decoded = base64_decode(&a.auth).ok_or("illegal base64 data")?;
        let text = String::from_utf8_lossy(&decoded).into_owned();
        return match text.split_once(':') {
            Some((u, p)) => Ok(Some((u.to_string(), p.trim_matches('\0').to_string()))),
            None => Err(format!("invalid decoded auth: {text:?}")),
        };
    }
    Err("invalid auth config".into())
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

// ---- references (containerd's reference/docker) --------------------------------

/// containerd's `reference/docker.ParseDockerRef`: the fully qualified
/// reference (`busybox` → `docker.io/library/busybox:latest`; a digest wins
/// over a tag), or the error in containerd's words.
pub fn normalize_reference(s: &str) -> Result<String, String> {
    use ephemerald::reconcile::image::{
        valid_digest, valid_domain, valid_path_component, valid_tag,
    };
    const INVALID: &str = "invalid reference format";
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(format!(
            "invalid repository name ({s}), cannot specify 64-byte hexadecimal strings"
        ));
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    let (domain, remainder) = match name.split_once('/') {
        Some((d, r)) if d.contains(['.', ':']) || d == "localhost" => {
            (d.to_string(), r.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io".to_string()
    } else {
        domain
    };
    let remainder = if domain == "docker.io" && !remainder.contains('/') {
        format!("library/{remainder}")
    } else {
        remainder
    };
    if remainder.to_lowercase() != remainder {
        return Err(format!("{INVALID}: repository name must be lowercase"));
    }
    let ok = valid_domain(&domain)
        && remainder.split('/').all(valid_path_component)
        && tag.is_none_or(valid_tag)
        && digest.is_none_or(valid_digest);
    if !ok {
        return Err(INVALID.into());
    }
    let full = format!("{domain}/{remainder}");
    if full.len() > 255 {
        return Err("repository name must not be more than 255 characters".into());
    }
    Ok(match digest {
        Some(d) => format!("{full}@{d}"),
        None => format!("{full}:{}", tag.unwrap_or("latest")),
    })
}

/// A complete `sha256:<64 hex>` digest (what go-digest parses without error).
fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

// ---- JSON like containerd's (Go's encoding/json of the CRI types) ---------------

/// An object with Go's `omitempty`: zero scalars, empty lists and maps are
/// left out; a present message is kept even when empty.
#[derive(Default)]
struct GoJson(serde_json::Map<String, Value>);

impl GoJson {
    fn s(mut self, k: &str, v: &str) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), v.into());
        }
        self
    }

    fn i(mut self, k: &str, v: i64) -> Self {
        if v != 0 {
            self.0.insert(k.into(), v.into());
        }
        self
    }

    fn b(mut self, k: &str, v: bool) -> Self {
        if v {
            self.0.insert(k.into(), v.into());
        }
        self
    }

    fn strs(mut self, k: &str, v: &[String]) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), v.into());
        }
        self
    }

    fn list(mut self, k: &str, v: Vec<Value>) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), Value::Array(v));
        }
        self
    }

    fn map(mut self, k: &str, m: &HashMap<String, String>) -> Self {
        if !m.is_empty() {
            self.0.insert(
                k.into(),
                Value::Object(
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.clone().into()))
                        .collect(),
                ),
            );
        }
        self
    }

    fn msg(mut self, k: &str, v: Option<Value>) -> Self {
        if let Some(v) = v {
            self.0.insert(k.into(), v);
        }
        self
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn namespace_option_json(n: &NamespaceOption) -> Value {
    GoJson::default()
        .i("network", n.network.into())
        .i("pid", n.pid.into())
        .i("ipc", n.ipc.into())
        .s("target_id", &n.target_id)
        .done()
}

fn selinux_json(s: &SeLinuxOption) -> Value {
    GoJson::default()
        .s("user", &s.user)
        .s("role", &s.role)
        .s("type", &s.r#type)
        .s("level", &s.level)
        .done()
}

fn profile_json(p: &SecurityProfile) -> Value {
    GoJson::default()
        .i("profile_type", p.profile_type.into())
        .s("localhost_ref", &p.localhost_ref)
        .done()
}

fn int64_json(v: &Int64Value) -> Value {
    GoJson::default().i("value", v.value).done()
}

fn sandbox_config_json(c: &PodSandboxConfig) -> Value {
    let linux = c.linux.as_ref().map(|l| {
        let sc = l.security_context.as_ref().map(|s| {
            GoJson::default()
                .msg(
                    "namespace_options",
                    s.namespace_options.as_ref().map(namespace_option_json),
                )
                .msg(
                    "selinux_options",
                    s.selinux_options.as_ref().map(selinux_json),
                )
                .msg("run_as_user", s.run_as_user.as_ref().map(int64_json))
                .b("readonly_rootfs", s.readonly_rootfs)
                .list(
                    "supplemental_groups",
                    s.supplemental_groups.iter().map(|g| (*g).into()).collect(),
                )
                .b("privileged", s.privileged)
                .msg("run_as_group", s.run_as_group.as_ref().map(int64_json))
                .msg("seccomp", s.seccomp.as_ref().map(profile_json))
                .msg("apparmor", s.apparmor.as_ref().map(profile_json))
                .done()
        });
        GoJson::default()
            .s("cgroup_parent", &l.cgroup_parent)
            .msg("security_context", sc)
            .map("sysctls", &l.sysctls)
            .done()
    });
    GoJson::default()
        .msg(
            "metadata",
            c.metadata.as_ref().map(|m| {
                GoJson::default()
                    .s("name", &m.name)
                    .s("uid", &m.uid)
                    .s("namespace", &m.namespace)
                    .i("attempt", m.attempt.into())
                    .done()
            }),
        )
        .s("hostname", &c.hostname)
        .s("log_directory", &c.log_directory)
        .msg(
            "dns_config",
            c.dns_config.as_ref().map(|d| {
                GoJson::default()
                    .strs("servers", &d.servers)
                    .strs("searches", &d.searches)
                    .strs("options", &d.options)
                    .done()
            }),
        )
        .list(
            "port_mappings",
            c.port_mappings
                .iter()
                .map(|p| {
                    GoJson::default()
                        .i("protocol", p.protocol.into())
                        .i("container_port", p.container_port.into())
                        .i("host_port", p.host_port.into())
                        .s("host_ip", &p.host_ip)
                        .done()
                })
                .collect(),
        )
        .map("labels", &c.labels)
        .map("annotations", &c.annotations)
        .msg("linux", linux)
        .done()
}

fn container_config_json(c: &ContainerConfig) -> Value {
    let linux = c.linux.as_ref().map(|l| {
        let resources = l.resources.as_ref().map(|r| {
            GoJson::default()
                .i("cpu_period", r.cpu_period)
                .i("cpu_quota", r.cpu_quota)
                .i("cpu_shares", r.cpu_shares)
                .i("memory_limit_in_bytes", r.memory_limit_in_bytes)
                .i("oom_score_adj", r.oom_score_adj)
                .s("cpuset_cpus", &r.cpuset_cpus)
                .s("cpuset_mems", &r.cpuset_mems)
                .list(
                    "hugepage_limits",
                    r.hugepage_limits
                        .iter()
                        .map(|h| json!({"page_size": h.page_size, "limit": h.limit}))
                        .collect(),
                )
                .map("unified", &r.unified)
                .i("memory_swap_limit_in_bytes", r.memory_swap_limit_in_bytes)
                .done()
        });
        let sc = l.security_context.as_ref().map(|s| {
            GoJson::default()
                .msg(
                    "capabilities",
                    s.capabilities.as_ref().map(|c| {
                        GoJson::default()
                            .strs("add_capabilities", &c.add_capabilities)
                            .strs("drop_capabilities", &c.drop_capabilities)
                            .strs("add_ambient_capabilities", &c.add_ambient_capabilities)
                            .done()
                    }),
                )
                .b("privileged", s.privileged)
                .msg(
                    "namespace_options",
                    s.namespace_options.as_ref().map(namespace_option_json),
                )
                .msg(
                    "selinux_options",
                    s.selinux_options.as_ref().map(selinux_json),
                )
                .msg("run_as_user", s.run_as_user.as_ref().map(int64_json))
                .s("run_as_username", &s.run_as_username)
                .b("readonly_rootfs", s.readonly_rootfs)
                .list(
                    "supplemental_groups",
                    s.supplemental_groups.iter().map(|g| (*g).into()).collect(),
                )
                .b("no_new_privs", s.no_new_privs)
                .msg("run_as_group", s.run_as_group.as_ref().map(int64_json))
                .strs("masked_paths", &s.masked_paths)
                .strs("readonly_paths", &s.readonly_paths)
                .msg("seccomp", s.seccomp.as_ref().map(profile_json))
                .msg("apparmor", s.apparmor.as_ref().map(profile_json))
                .done()
        });
        GoJson::default()
            .msg("resources", resources)
            .msg("security_context", sc)
            .done()
    });
    GoJson::default()
        .msg(
            "metadata",
            c.metadata.as_ref().map(|m| {
                GoJson::default()
                    .s("name", &m.name)
                    .i("attempt", m.attempt.into())
                    .done()
            }),
        )
        .msg(
            "image",
            c.image.as_ref().map(|i| {
                GoJson::default()
                    .s("image", &i.image)
                    .map("annotations", &i.annotations)
                    .done()
            }),
        )
        .strs("command", &c.command)
        .strs("args", &c.args)
        .s("working_dir", &c.working_dir)
        .list(
            "envs",
            c.envs
                .iter()
                .map(|kv| {
                    GoJson::default()
                        .s("key", &kv.key)
                        .s("value", &String::from_utf8_lossy(&kv.value))
                        .done()
                })
                .collect(),
        )
        .list(
            "mounts",
            c.mounts
                .iter()
                .map(|m| {
                    GoJson::default()
                        .s("container_path", &m.container_path)
                        .s("host_path", &m.host_path)
                        .b("readonly", m.readonly)
                        .b("selinux_relabel", m.selinux_relabel)
                        .i("propagation", m.propagation.into())
                        .done()
                })
                .collect(),
        )
        .list(
            "devices",
            c.devices
                .iter()
                .map(|d| {
                    GoJson::default()
                        .s("container_path", &d.container_path)
                        .s("host_path", &d.host_path)
                        .s("permissions", &d.permissions)
                        .done()
                })
                .collect(),
        )
        .map("labels", &c.labels)
        .map("annotations", &c.annotations)
        .s("log_path", &c.log_path)
        .b("stdin", c.stdin)
        .b("stdin_once", c.stdin_once)
        .b("tty", c.tty)
        .msg("linux", linux)
        .done()
}

// ---- OCI runtime specs ----------------------------------------------------------

fn cgroups_path(parent: &str, id: &str) -> Option<String> {
    if parent.is_empty() {
        None
    } else if parent.ends_with(".slice") {
        Some(format!("{parent}:cri-containerd:{id}"))
    } else {
        Some(Path::new(parent).join(id).display().to_string())
    }
}

fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ]
}

fn capabilities() -> Value {
    let caps: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    json!({"bounding": caps, "effective": caps, "permitted": caps})
}

fn sandbox_spec(sb: &FakeSandbox) -> Value {
    let ns = sb.namespaces();
    let meta = sb.config.metadata.clone().unwrap_or_default();
    let mut namespaces = vec![];
    if ns.pid != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "pid"}));
    }
    if ns.ipc != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "ipc"}));
    }
    if ns.network != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "uts"}));
    }
    namespaces.push(json!({"type": "mount"}));
    if ns.network != NamespaceMode::Node as i32 {
        namespaces.push(
            json!({"type": "network", "path": format!("/var/run/netns/cni-{}", &sb.id[..32])}),
        );
    }
    let mut linux = json!({"namespaces": namespaces, "resources": {"devices": [{"allow": false, "access": "rwm"}], "cpu": {"shares": 2}}});
    let parent = sb
        .config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    if let Some(p) = cgroups_path(&parent, &sb.id) {
        linux["cgroupsPath"] = p.into();
    }
    let mut spec = json!({
        "ociVersion": "1.0.2-dev",
        "process": {"user": {"uid": 65535, "gid": 65535}, "args": ["/pause"], "env": [IMAGE_PATH_ENV], "cwd": "/", "capabilities": capabilities(), "noNewPrivileges": true, "oomScoreAdj": -998},
        "root": {"path": "rootfs", "readonly": true},
        "mounts": default_mounts(),
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": sb.id,
            "io.kubernetes.cri.sandbox-log-directory": sb.config.log_directory,
            "io.kubernetes.cri.sandbox-name": meta.name,
            "io.kubernetes.cri.sandbox-namespace": meta.namespace,
            "io.kubernetes.cri.sandbox-uid": meta.uid,
        },
        "linux": linux,
    });
    if !sb.config.hostname.is_empty() {
        spec["hostname"] = sb.config.hostname.clone().into();
    }
    spec
}

struct SpecInputs<'a> {
    id: &'a str,
    sandbox: &'a FakeSandbox,
    sandbox_config: &'a PodSandboxConfig,
    config: &'a ContainerConfig,
    image: &'a FakeImage,
    /// The pid whose PID namespace TARGET/POD mode joins.
    target_pid: u32,
}

/// The parts of containerd's container spec the agent and its tests look
/// at: process, mounts, annotations, namespaces, cgroup path, resources.
fn container_spec(inp: &SpecInputs<'_>) -> Value {
    let c = inp.config;
    let sb = inp.sandbox;
    let sc = c.linux.as_ref().and_then(|l| l.security_context.clone());
    let ns = sc
        .as_ref()
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let meta = inp.sandbox_config.metadata.clone().unwrap_or_default();

    let hostname = if inp.sandbox_config.hostname.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    } else {
        inp.sandbox_config.hostname.clone()
    };
    let mut env = vec![IMAGE_PATH_ENV.to_string(), format!("HOSTNAME={hostname}")];
    env.extend(
        c.envs
            .iter()
            .map(|kv| format!("{}={}", kv.key, String::from_utf8_lossy(&kv.value))),
    );
    let image_uid = inp
        .image
        .user
        .split(':')
        .next()
        .and_then(|u| u.parse::<i64>().ok());
    let uid = sc
        .as_ref()
        .and_then(|s| s.run_as_user.as_ref().map(|u| u.value))
        .or(image_uid)
        .unwrap_or(0);
    let gid = sc
        .as_ref()
        .and_then(|s| s.run_as_group.as_ref().map(|g| g.value))
        .unwrap_or(0);
    let mut gids = vec![gid];
    gids.extend(
        sc.iter()
            .flat_map(|s| s.supplemental_groups.iter().copied()),
    );
    let mut process = json!({
        "user": {"uid": uid, "gid": gid, "additionalGids": gids},
        "args": c.command.iter().chain(&c.args).collect::<Vec<_>>(),
        "env": env,
        "cwd": if c.working_dir.is_empty() { "/" } else { c.working_dir.as_str() },
        "capabilities": capabilities(),
    });
    if c.tty {
        process["terminal"] = true.into();
    }
    if sc.as_ref().is_some_and(|s| s.no_new_privs) {
        process["noNewPrivileges"] = true.into();
    }
    // containerd copies the CRI's OOM score into the process (restricted
    // to no lower than its own when configured so; the fake is not).
    if let Some(r) = c.linux.as_ref().and_then(|l| l.resources.as_ref())
        && r.oom_score_adj != 0
    {
        process["oomScoreAdj"] = r.oom_score_adj.into();
    }

    // Files containerd provides for every container unless a CRI mount
    // covers the same path, then the CRI mounts as bind mounts.
    let cri_paths: Vec<&str> = c.mounts.iter().map(|m| m.container_path.as_str()).collect();
    let mut mounts = default_mounts();
    if !sc.as_ref().is_some_and(|s| s.privileged) {
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}));
    }
    for (dest, dir, file) in [
        ("/etc/hostname", CONTAINERD_ROOT, "hostname"),
        ("/etc/hosts", CONTAINERD_ROOT, "hosts"),
        ("/etc/resolv.conf", CONTAINERD_ROOT, "resolv.conf"),
        ("/dev/shm", CONTAINERD_STATE, "shm"),
    ] {
        if !cri_paths.contains(&dest) {
            mounts.push(json!({
                "destination": dest, "type": "bind",
                "source": format!("{dir}/sandboxes/{}/{file}", sb.id),
                "options": ["rbind", "rprivate", "rw"],
            }));
        }
    }
    for m in &c.mounts {
        let propagation = match MountPropagation::try_from(m.propagation) {
            Ok(MountPropagation::PropagationHostToContainer) => "rslave",
            Ok(MountPropagation::PropagationBidirectional) => "rshared",
            _ => "rprivate",
        };
        mounts.push(json!({
            "destination": m.container_path, "type": "bind", "source": m.host_path,
            "options": ["rbind", propagation, if m.readonly { "ro" } else { "rw" }],
        }));
    }

    let proc_ns = |pid: u32, kind: &str| format!("/proc/{pid}/ns/{kind}");
    let mut namespaces = vec![];
    if ns.pid == NamespaceMode::Container as i32 {
        namespaces.push(json!({"type": "pid"}));
    } else if ns.pid != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "pid", "path": proc_ns(inp.target_pid, "pid")}));
    }
    if ns.ipc != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "ipc", "path": proc_ns(sb.pid, "ipc")}));
    }
    namespaces.push(json!({"type": "uts", "path": proc_ns(sb.pid, "uts")}));
    namespaces.push(json!({"type": "mount"}));
    if ns.network != NamespaceMode::Node as i32 {
        namespaces.push(json!({"type": "network", "path": proc_ns(sb.pid, "net")}));
    }

    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(r) = c.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        let mut cpu = serde_json::Map::new();
        if r.cpu_shares != 0 {
            cpu.insert("shares".into(), r.cpu_shares.into());
        }
        if r.cpu_quota != 0 {
            cpu.insert("quota".into(), r.cpu_quota.into());
        }
        if r.cpu_period != 0 {
            cpu.insert("period".into(), r.cpu_period.into());
        }
        if !cpu.is_empty() {
            resources["cpu"] = Value::Object(cpu);
        }
        if r.memory_limit_in_bytes != 0 {
            resources["memory"] = json!({"limit": r.memory_limit_in_bytes});
        }
        if !r.hugepage_limits.is_empty() {
            resources["hugepageLimits"] = r
                .hugepage_limits
                .iter()
                .map(|h| json!({"pageSize": h.page_size, "limit": h.limit}))
                .collect();
        }
        if !r.unified.is_empty() {
            resources["unified"] = json!(r.unified);
        }
    }
    let mut linux = json!({"resources": resources, "namespaces": namespaces});
    let parent = inp
        .sandbox_config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    if let Some(p) = cgroups_path(&parent, inp.id) {
        linux["cgroupsPath"] = p.into();
    }
    if let Some(s) = &sc {
        if !s.masked_paths.is_empty() {
            linux["maskedPaths"] = s.masked_paths.clone().into();
        }
        if !s.readonly_paths.is_empty() {
            linux["readonlyPaths"] = s.readonly_paths.clone().into();
        }
    }
    let mut root = json!({"path": "rootfs"});
    if sc.as_ref().is_some_and(|s| s.readonly_rootfs) {
        root["readonly"] = true.into();
    }
    json!({
        "ociVersion": "1.0.2-dev",
        "process": process,
        "root": root,
        "mounts": mounts,
        "annotations": {
            "io.kubernetes.cri.container-name": c.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.image-name": inp.image.references.first().cloned().unwrap_or_else(|| inp.image.id.clone()),
            "io.kubernetes.cri.sandbox-id": sb.id,
            "io.kubernetes.cri.sandbox-name": meta.name,
            "io.kubernetes.cri.sandbox-namespace": meta.namespace,
            "io.kubernetes.cri.sandbox-uid": meta.uid,
        },
        "linux": linux,
    })
}

// ---- the gRPC services ------------------------------------------------------------

#[derive(Clone)]
struct Service {
    inner: Arc<Inner>,
    /// Cancelled when this listener stops: ends streams and waits.
    cancel: CancellationToken,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

impl Service {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Records the call, applies its delay, and (unless `late`) an injected
    /// failure.
    async fn enter(&self, rpc: &'static str, late: bool) -> Result<(), CtrdError> {
        let delay = {
            let mut st = self.state();
            st.calls.push(rpc.to_string());
            st.delays.get(rpc).copied().filter(|d| !d.is_zero())
        };
        tracing::debug!(rpc, "fake CRI call");
        if let Some(d) = delay {
            self.wait(d).await?;
        }
        if !late && let Some(e) = self.state().take_failure(rpc) {
            return Err(e);
        }
        Ok(())
    }

    /// Sleeps, unless the listener stops first (then the call fails as a
    /// broken connection would).
    async fn wait(&self, d: Duration) -> Result<(), CtrdError> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(CtrdError::new(Code::Unavailable, "error reading from server: EOF")),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl RuntimeService for Service {
    async fn version(
        &self,
        _request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        self.enter("Version", false).await?;
        Ok(Response::new(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "containerd".into(),
            runtime_version: RUNTIME_VERSION.into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<RunPodSandboxRequest>,
    ) -> Result<Response<RunPodSandboxResponse>, Status> {
        self.enter("RunPodSandbox", false).await?;
        let pod_sandbox_id = self.state().run_pod_sandbox(request.into_inner())?;
        Ok(Response::new(RunPodSandboxResponse { pod_sandbox_id }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<StopPodSandboxRequest>,
    ) -> Result<Response<StopPodSandboxResponse>, Status> {
        self.enter("StopPodSandbox", false).await?;
        self.state()
            .stop_pod_sandbox(&request.into_inner().pod_sandbox_id)?;
        Ok(Response::new(StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<RemovePodSandboxRequest>,
    ) -> Result<Response<RemovePodSandboxResponse>, Status> {
        self.enter("RemovePodSandbox", false).await?;
        self.state()
            .remove_pod_sandbox(&request.into_inner().pod_sandbox_id)?;
        Ok(Response::new(RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<PodSandboxStatusRequest>,
    ) -> Result<Response<PodSandboxStatusResponse>, Status> {
        self.enter("PodSandboxStatus", false).await?;
        let r = request.into_inner();
        let st = self.state();
        let i = st
            .sandbox_index(&r.pod_sandbox_id)
            .map_err(|e| e.wrap("an error occurred when try to find sandbox"))?;
        let sb = &st.sandboxes[i];
        let mut info = HashMap::new();
        if r.verbose {
            info.insert("info".to_string(), st.sandbox_info(sb));
        }
        Ok(Response::new(PodSandboxStatusResponse {
            status: Some(st.sandbox_status(sb)),
            info,
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<ListPodSandboxRequest>,
    ) -> Result<Response<ListPodSandboxResponse>, Status> {
        self.enter("ListPodSandbox", false).await?;
        let items = self.state().list_pod_sandbox(request.into_inner().filter);
        Ok(Response::new(ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        self.enter("CreateContainer", false).await?;
        let container_id = self.state().create_container(request.into_inner())?;
        Ok(Response::new(CreateContainerResponse { container_id }))
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        self.enter("StartContainer", true).await?;
        self.state()
            .start_container(&request.into_inner().container_id)?;
        Ok(Response::new(StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        self.enter("StopContainer", false).await?;
        let r = request.into_inner();
        let Some((id, on_term)) = self.state().stop_target(&r.container_id)? else {
            // Not running: nothing to do, as containerd.
            return Ok(Response::new(StopContainerResponse {}));
        };
        let code = match on_term {
            _ if r.timeout <= 0 => SIGKILL_EXIT,
            OnTerm::Exit(code) => code,
            OnTerm::Ignore => {
                self.wait(Duration::from_secs(r.timeout as u64)).await?;
                SIGKILL_EXIT
            }
        };
        self.state().kill(&id, code);
        Ok(Response::new(StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        self.enter("RemoveContainer", false).await?;
        self.state()
            .remove_container(&request.into_inner().container_id)?;
        Ok(Response::new(RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        self.enter("ListContainers", false).await?;
        let containers = self.state().list_containers(request.into_inner().filter);
        Ok(Response::new(ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        self.enter("ContainerStatus", false).await?;
        let r = request.into_inner();
        let st = self.state();
        let i = st.container_index(&r.container_id).map_err(|e| {
            e.wrap(format_args!(
                "an error occurred when try to find container {:?}",
                r.container_id
            ))
        })?;
        let c = &st.containers[i];
        let mut info = HashMap::new();
        if r.verbose {
            info.insert("info".to_string(), State::container_info(c));
        }
        Ok(Response::new(ContainerStatusResponse {
            status: Some(st.container_status(c)),
            info,
        }))
    }

    async fn get_container_events(
        &self,
        _request: Request<GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.enter("GetContainerEvents", false).await?;
        let rx = {
            let st = self.state();
            if !st.serve_events {
                return Err(Status::unimplemented(
                    "method GetContainerEvents not implemented",
                ));
            }
            st.events.subscribe()
        };
        let stream =
            futures::stream::unfold((rx, self.cancel.clone()), |(mut rx, cancel)| async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        ev = rx.recv() => match ev {
                            Ok(ev) => return Some((Ok(ev), (rx, cancel))),
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::warn!(missed = n, "fake CRI event subscriber fell behind");
                            }
                            Err(broadcast::error::RecvError::Closed) => return None,
                        },
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl ImageService for Service {
    async fn list_images(
        &self,
        _request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.enter("ListImages", false).await?;
        let images = self.state().images.iter().map(FakeImage::to_cri).collect();
        Ok(Response::new(ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.enter("ImageStatus", false).await?;
        let r = request.into_inner();
        let name = r.image.map(|i| i.image).unwrap_or_default();
        let st = self.state();
        let img = match st.resolve_image(&name) {
            Lookup::Found(i) => &st.images[i],
            Lookup::NotFound => return Ok(Response::new(ImageStatusResponse::default())),
            Lookup::Ambiguous => {
                return Err(CtrdError::unknown("ambiguous digest string")
                    .wrap(format_args!("can not resolve {name:?} locally"))
                    .into());
            }
        };
        let mut info = HashMap::new();
        if r.verbose {
            let mut config = json!({"Env": [IMAGE_PATH_ENV]});
            if !img.user.is_empty() {
                config["User"] = img.user.clone().into();
            }
            let layer = format!("sha256:{}", sha256_hex(&format!("layer {}", img.id)));
            info.insert(
                "info".to_string(),
                json!({
                    "chainID": layer,
                    "imageSpec": {
                        "architecture": "amd64",
                        "os": "linux",
                        "config": config,
                        "rootfs": {"type": "layers", "diff_ids": [layer]},
                    },
                })
                .to_string(),
            );
        }
        Ok(Response::new(ImageStatusResponse {
            image: Some(img.to_cri()),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        self.enter("PullImage", false).await?;
        let r = request.into_inner();
        let name = r.image.map(|i| i.image).unwrap_or_default();
        let image_ref = self.state().pull(&name, r.auth.as_ref())?;
        Ok(Response::new(PullImageResponse { image_ref }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_like_containerd() {
        let table = [
            ("busybox", Ok("docker.io/library/busybox:latest")),
            ("busybox:1.36", Ok("docker.io/library/busybox:1.36")),
            ("library/busybox", Ok("docker.io/library/busybox:latest")),
            ("index.docker.io/x/y:1", Ok("docker.io/x/y:1")),
            (
                "ephemerald.local/busybox:1.35",
                Ok("ephemerald.local/busybox:1.35"),
            ),
            ("localhost:5000/a/b", Ok("localhost:5000/a/b:latest")),
            ("localhost/a", Ok("localhost/a:latest")),
            (
                "busybox:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                Ok(
                    "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                ),
            ),
            (
                "UPPER/x",
                Err("invalid reference format: repository name must be lowercase"),
            ),
            ("busybox:Latest", Ok("docker.io/library/busybox:Latest")),
            ("a b", Err("invalid reference format")),
            ("", Err("invalid reference format")),
            ("busybox:", Err("invalid reference format")),
            ("-x", Err("invalid reference format")),
        ];
        for (input, want) in table {
            assert_eq!(
                normalize_reference(input).as_deref(),
                want.map_err(|e: &str| e.to_string()).as_deref(),
                "{input:?}"
            );
        }
        let hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert!(
            normalize_reference(hex)
                .unwrap_err()
                .contains("cannot specify 64-byte hexadecimal strings")
        );
    }

    #[test]
    fn auth_is_used_only_for_its_registry_host() {
        let auth = |server: &str| AuthConfig {
            username: "u".into(),
            password: "p".into(),
            server_address: server.into(),
            ..Default::default()
        };
        let creds = Some(("u".to_string(), "p".to_string()));
        assert_eq!(parse_auth(Some(&auth("")), "r.example"), Ok(creds.clone()));
        assert_eq!(
            parse_auth(Some(&auth("https://r.example")), "r.example"),
            Ok(creds)
        );
        // Go's url.Parse finds no host without a scheme.
        assert_eq!(parse_auth(Some(&auth("r.example")), "r.example"), Ok(None));
        assert_eq!(
            parse_auth(
                Some(&auth("https://index.docker.io/v1/")),
                "registry-1.docker.io"
            ),
            Ok(None)
        );
        let encoded = AuthConfig {
            auth: "dTpwOnE=".into(), // u:p:q
            ..Default::default()
        };
        assert_eq!(
            parse_auth(Some(&encoded), "h"),
            Ok(Some(("u".into(), "p:q".into())))
        );
        assert!(parse_auth(Some(&AuthConfig::default()), "h").is_err());
    }

    #[test]
    fn image_ids_resolve_by_prefix_like_digestset() {
        let mut st = State::new();
        let a = FakeImage::new("a:1").with_id(&format!("aa{}", "0".repeat(62)));
        let b = FakeImage::new("b:1").with_id(&format!("ab{}", "0".repeat(62)));
        st.store_image(a.clone());
        st.store_image(b);
        assert!(matches!(st.resolve_image(&a.id), Lookup::Found(_)));
        assert!(matches!(st.resolve_image("aa00"), Lookup::Found(_)));
        assert!(matches!(st.resolve_image("sha256:aa00"), Lookup::Found(_)));
        assert!(matches!(st.resolve_image("a"), Lookup::Ambiguous));
        assert!(matches!(st.resolve_image("a:1"), Lookup::Found(_)));
        assert!(matches!(
            st.resolve_image("docker.io/library/b:1"),
            Lookup::Found(_)
        ));
        assert!(matches!(st.resolve_image("c"), Lookup::NotFound));
        assert!(matches!(st.resolve_image(""), Lookup::Ambiguous));
    }
}
