//! Component tests of the whole agent (`run_with_client`) against the local
//! API server and the fake CRI runtime: fast, no root, and for the paths a
//! real containerd cannot be made to produce (injected CRI failures, a
//! runtime that goes away, a container someone else created, exit events
//! with and without `GetContainerEvents`, specs the API server should have
//! refused, the node Lease in `--mode auto`), and what a spec refers to
//! through the API (ConfigMaps and Secrets for env, claims, pull secrets).
//!
//! Each test stands in for the kubelet's pod path the way `Stack::run_pod`
//! does (the pod is created in the API server, its sandbox and app container
//! through the CRI with the kubelet's labels, its status written Running) and
//! adds ephemeral containers the way `kubectl debug` does (a strategic merge
//! patch of `pods/NAME/ephemeralcontainers`). Assertions are on what the
//! API server stored (statuses, their write history, Events with the
//! container's field path) and on what the runtime received. Every wait is
//! a poll with a deadline; "several resyncs" is counted with the agent's own
//! reconcile counter, never slept.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use ephemerald::config::{Config, Mode};
use ephemerald::cri::{CriClient, Runtime};
use ephemerald::kubelet;
use ephemerald::observe::ModeChangeLabels;
use ephemerald::reconcile::agent::{Agent, Creator};
use ephemerald::reconcile::translate::{self, HostFiles, NodeDirs, ResolvedImage};
use ephemerald::validation;
use ephemerald_testbed::apiserver::LocalApiServer;
use ephemerald_testbed::fake_cri::{FakeContainer, FakeImage, FakeRuntime, normalize_reference};
use ephemerald_testbed::images::{APP_IMAGE, BUSYBOX_IMAGE};
use ephemerald_testbed::pod_runner::{PodRunner, RunningPod};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, ContainerStatus, EphemeralContainer, Event, ExecAction,
    Lifecycle, LifecycleHandler, LocalObjectReference, Node, PersistentVolume,
    PersistentVolumeClaim, Pod, ResourceRequirements, Secret, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// The node every pod is bound to.
const NODE: &str = "node-c";
/// Deadline of every wait.
const WAIT: Duration = Duration::from_secs(15);
/// A runc failure as containerd 1.6 words it for a StartContainer.
const RUNC_FAILURE: &str = "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: \"nosuch\": executable file not found in $PATH: unknown";

// ---------------------------------------------------------------------------
// Log capture: the agent's own log lines, to look for "adopt".

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static TRACING: Once = Once::new();

/// Appends to [`LOGS`] and to the test's captured stderr (shown on failure).
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_tracing() {
    TRACING.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,ephemerald=info"))
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// Captured log lines that contain every one of `needles`.
fn log_lines(needles: &[&str]) -> Vec<String> {
    let logs = LOGS.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------
// The bed: local API server + fake CRI + pod runner + (optionally) the agent.

/// How the agent under test is configured.
#[derive(Clone, Copy)]
struct Opts {
    mode: Mode,
    resync: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            mode: Mode::Start,
            resync: Duration::from_millis(300),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
        }
    }
}

/// The agent running in-process.
struct RunningAgent {
    agent: Arc<Agent>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ephemerald::Error>>,
}

/// Local API server, fake CRI runtime (with the project's images), a CRI
/// client and pod runner on it for the kubelet's part, and the agent once
/// started. Dropping it cancels the agent.
struct Bed {
    api: LocalApiServer,
    fake: FakeRuntime,
    cri: Arc<CriClient>,
    runner: PodRunner,
    dirs: NodeDirs,
    running: Option<RunningAgent>,
    _tmp: tempfile::TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.cancel.cancel();
        }
    }
}

impl Bed {
    async fn new() -> Bed {
        init_tracing();
        let tmp = tempfile::tempdir().expect("temp dir");
        let fake = FakeRuntime::start(tmp.path());
        fake.set_image(APP_IMAGE, "", "");
        fake.set_image(BUSYBOX_IMAGE, "", "");
        let cri = Arc::new(
            CriClient::new(&fake.endpoint())
                .expect("CRI client")
                .with_timeout(Duration::from_secs(5)),
        );
        let dirs = NodeDirs {
            pod_logs: tmp.path().join("pod-logs"),
            pods: tmp.path().join("kubelet/pods"),
            seccomp: tmp.path().join("kubelet/seccomp"),
        };
        let runner = PodRunner::new(cri.clone() as Arc<dyn Runtime>, dirs.clone(), "/kubepods");
        let api = LocalApiServer::start().await.expect("local API server");
        Bed {
            api,
            fake,
            cri,
            runner,
            dirs,
            running: None,
            _tmp: tmp,
        }
    }

    /// The agent's configuration, built like `Stack::agent_config`.
    fn config(&self, opts: Opts) -> Config {
        Config {
            node_name: NODE.into(),
            kubeconfig: None,
            cri_endpoint: self.fake.endpoint(),
            containerd_socket: None,
            containerd_namespace: "k8s.io".into(),
            dirs: self.dirs.clone(),
            resync: opts.resync,
            mode: opts.mode,
            metrics_addr: None,
            runtime_request_timeout: Duration::from_secs(5),
            backoff_initial: opts.backoff_initial,
            backoff_max: opts.backoff_max,
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    /// Starts the agent and returns once it exists (it talked to the runtime).
    async fn start_agent(&mut self, opts: Opts) -> Arc<Agent> {
        assert!(self.running.is_none(), "the agent is already running");
        let cancel = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(ephemerald::run_with_client(
            self.config(opts),
            self.api.client(),
            cancel.clone(),
            move |h| {
                let _ = tx.send(h.agent);
            },
        ));
        let agent = tokio::time::timeout(WAIT, rx)
            .await
            .expect("the agent starts in time")
            .expect("the agent hands out its handles");
        self.running = Some(RunningAgent {
            agent: agent.clone(),
            cancel,
            task,
        });
        agent
    }

    /// Stops the agent (graceful) and checks it ended well.
    async fn stop_agent(&mut self) {
        let r = self.running.take().expect("an agent to stop");
        r.cancel.cancel();
        let ended = tokio::time::timeout(WAIT, r.task)
            .await
            .expect("the agent stops in time")
            .expect("the agent task did not panic");
        assert!(ended.is_ok(), "the agent stopped with {ended:?}");
    }

    fn agent(&self) -> &Arc<Agent> {
        &self.running.as_ref().expect("a running agent").agent
    }

    /// The agent has not stopped by itself (no crash, no fatal error).
    fn assert_agent_alive(&self) {
        let r = self.running.as_ref().expect("a running agent");
        assert!(!r.task.is_finished(), "the agent stopped on its own");
    }

    /// Waits until the agent has begun `n` more reconcile passes (of any
    /// pod) than now, and the one before the last has finished.
    async fn passes(&self, n: u64) {
        let agent = self.agent().clone();
        let from = agent.metrics.reconciles.get();
        eventually(&format!("{n} more reconcile passes"), WAIT, || {
            (agent.metrics.reconciles.get() > from + n).then_some(())
        })
        .await;
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.api.client(), "default")
    }

    /// Creates the pod in the API server bound to [`NODE`], runs `runtime_pod`
    /// (the same pod, possibly with less in it) through the pod runner, and
    /// reports it Running, as a kubelet would.
    async fn run_pod_as(
        &self,
        pod: Pod,
        runtime_view: impl FnOnce(&Pod) -> Pod,
    ) -> (Pod, RunningPod) {
        let created = self.api.create_pod(pod).expect("pod created");
        let running = self
            .runner
            .run(&runtime_view(&created))
            .await
            .expect("pod runs on the fake runtime");
        let pod = self.report_running(&created, &running).await;
        (pod, running)
    }

    async fn run_pod(&self, pod: Pod) -> (Pod, RunningPod) {
        self.run_pod_as(pod, Pod::clone).await
    }

    /// Writes the status a kubelet would for the pod's running app containers.
    async fn report_running(&self, pod: &Pod, running: &RunningPod) -> Pod {
        let spec = pod.spec.as_ref().expect("spec");
        let statuses: Vec<serde_json::Value> = spec
            .containers
            .iter()
            .filter_map(|c| {
                let id = running.containers.get(&c.name)?;
                Some(serde_json::json!({
                    "name": c.name, "ready": true, "started": true, "restartCount": 0,
                    "image": c.image, "imageID": "", "containerID": format!("containerd://{id}"),
                    "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}},
                }))
            })
            .collect();
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": running.ip,
            "containerStatuses": statuses,
        }});
        self.pods()
            .patch_status(
                kubelet::name(pod),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .expect("kubelet-style status write")
    }

    /// Appends ephemeral containers exactly as `kubectl debug` does.
    async fn add_ephemeral(&self, pod: &str, containers: &[EphemeralContainer]) -> Pod {
        let patch = serde_json::json!({"spec": {"ephemeralContainers": containers}});
        self.pods()
            .patch_subresource(
                "ephemeralcontainers",
                pod,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .expect("ephemeral containers accepted by the API server")
    }

    fn pod(&self, name: &str) -> Pod {
        self.api.pod("default", name).expect("pod exists")
    }

    /// Polls the stored pod until `container`'s ephemeral status passes `ok`.
    async fn wait_status(
        &self,
        pod: &str,
        container: &str,
        what: &str,
        ok: impl Fn(&ContainerStatus) -> bool,
    ) -> ContainerStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let last = ec_status(&self.pod(pod), container);
            if let Some(s) = last.as_ref().filter(|s| ok(s)) {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {pod}/{container} to be {what}; last status: {}",
                serde_json::to_string(&last).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The Events about one ephemeral container, oldest first.
    fn events_of(&self, pod: &str, container: &str) -> Vec<Event> {
        let field_path = format!("spec.ephemeralContainers{{{container}}}");
        let mut events: Vec<Event> = self
            .api
            .events()
            .into_iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some(pod)
                    && e.involved_object.field_path.as_deref() == Some(field_path.as_str())
            })
            .collect();
        // Event names are `<pod>.<hex nanoseconds>`: the creation order.
        events.sort_by_key(|e| {
            let name = e.metadata.name.clone().unwrap_or_default();
            let hex = name.rsplit('.').next().unwrap_or_default().to_string();
            u128::from_str_radix(&hex, 16).unwrap_or(0)
        });
        events
    }

    /// Waits for an Event about the container with this reason whose message
    /// passes `ok`.
    async fn wait_event(
        &self,
        pod: &str,
        container: &str,
        reason: &str,
        ok: impl Fn(&str) -> bool,
    ) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            let events = self.events_of(pod, container);
            if let Some(e) = events.iter().find(|e| {
                e.reason.as_deref() == Some(reason) && ok(e.message.as_deref().unwrap_or_default())
            }) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a {reason} Event about {pod}/{container}; events: {:?}",
                summary(&events)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The runtime's containers of this pod with this container name.
    fn runtime_containers(&self, pod: &Pod, name: &str) -> Vec<FakeContainer> {
        self.fake
            .containers()
            .into_iter()
            .filter(|c| {
                c.config
                    .labels
                    .get(kubelet::POD_UID_LABEL)
                    .map(String::as_str)
                    == Some(kubelet::uid(pod))
                    && c.config
                        .labels
                        .get(kubelet::CONTAINER_NAME_LABEL)
                        .map(String::as_str)
                        == Some(name)
            })
            .collect()
    }

    /// The one runtime container of this name; fails when there are more.
    fn only_container(&self, pod: &Pod, name: &str) -> FakeContainer {
        let found = self.runtime_containers(pod, name);
        assert_eq!(
            found.len(),
            1,
            "the runtime holds exactly one {name} container: {:?}",
            found.iter().map(|c| &c.id).collect::<Vec<_>>()
        );
        found.into_iter().next().expect("one")
    }

    /// How many calls of `rpc` the runtime received.
    fn calls(&self, rpc: &str) -> usize {
        self.fake.calls().iter().filter(|c| *c == rpc).count()
    }

    /// Creates (and optionally starts) a container in the pod's sandbox the
    /// way a kubelet would: its labels, attempt 0, the image by its id.
    async fn create_as_kubelet(
        &self,
        pod: &Pod,
        running: &RunningPod,
        container: &EphemeralContainer,
        target_id: Option<&str>,
        start: bool,
    ) -> String {
        let mut c = container.clone();
        validation::default_ephemeral_container(&mut c);
        let image = self.image_id(c.image.as_deref().unwrap_or_default());
        let config = translate::container_config(&translate::Inputs {
            pod,
            container: &c,
            target_id,
            image: &ResolvedImage {
                id: image,
                ..Default::default()
            },
            attempt: 0,
            host_files: &HostFiles::default(),
            node: &self.dirs,
        })
        .expect("container config");
        let id = self
            .cri
            .create_container(&running.sandbox_id, config, running.sandbox_config.clone())
            .await
            .expect("CreateContainer by the other creator");
        if start {
            self.cri
                .start_container(&id)
                .await
                .expect("StartContainer by the other creator");
        }
        id
    }

    fn image_id(&self, reference: &str) -> String {
        let normalised = normalize_reference(reference).expect("a valid reference");
        self.fake
            .images()
            .into_iter()
            .find(|i| i.references.iter().any(|r| r == &normalised))
            .unwrap_or_else(|| panic!("image {reference} on the node"))
            .id
    }
}

// ---------------------------------------------------------------------------
// Pods, containers and statuses.

fn app_pod(name: &str) -> Pod {
    let mut pod = ephemerald_testbed::images::app_pod(name);
    pod.spec.get_or_insert_default().node_name = Some(NODE.into());
    pod
}

/// A busybox ephemeral container, as `kubectl debug -it --image=busybox` makes it.
fn debug(name: &str, target: Option<&str>) -> EphemeralContainer {
    EphemeralContainer {
        name: name.into(),
        image: Some(BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["sh".into()]),
        stdin: Some(true),
        tty: Some(true),
        target_container_name: target.map(Into::into),
        ..Default::default()
    }
}

fn ec_status(pod: &Pod, name: &str) -> Option<ContainerStatus> {
    pod.status
        .as_ref()?
        .ephemeral_container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == name)
        .cloned()
}

fn waiting(s: &ContainerStatus) -> Option<(&str, &str)> {
    let w = s.state.as_ref()?.waiting.as_ref()?;
    Some((
        w.reason.as_deref().unwrap_or_default(),
        w.message.as_deref().unwrap_or_default(),
    ))
}

fn waiting_reason(s: &ContainerStatus) -> Option<&str> {
    waiting(s).map(|(r, _)| r)
}

fn is_running(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|st| st.running.is_some())
}

fn exit_code(s: &ContainerStatus) -> Option<i32> {
    Some(s.state.as_ref()?.terminated.as_ref()?.exit_code)
}

fn container_id(s: &ContainerStatus) -> &str {
    s.container_id.as_deref().unwrap_or_default()
}

/// `(reason, message)` of each event, for failure messages.
fn summary(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Polls `f` until it returns `Some`, failing the test after `limit`.
async fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. StartContainer fails.

/// The kubelet's `startContainer`: a failed StartContainer is
/// `RunContainerError` with the runtime's message and a `Failed` Event; the
/// container (left EXITED 128 `StartError` by containerd) is never created
/// or started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failure_is_run_container_error_and_never_retried() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("startfail")).await;

    bed.fake
        .fail_next("StartContainer", Code::Unknown, RUNC_FAILURE);
    bed.add_ephemeral("startfail", &[debug("dbg", Some("app"))])
        .await;

    let event = bed
        .wait_event("startfail", "dbg", "Failed", |m| m.starts_with("Error: "))
        .await;
    assert_eq!(
        event.message.as_deref(),
        Some(format!("Error: {RUNC_FAILURE}").as_str())
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let created = bed.only_container(&pod, "dbg");

    // The first status with the container's id is the one written after the
    // failed start; it must already say why.
    let st = bed
        .wait_status("startfail", "dbg", "reported with its container id", |s| {
            !container_id(s).is_empty()
        })
        .await;
    assert_eq!(
        waiting(&st),
        Some(("RunContainerError", RUNC_FAILURE)),
        "the failed start shows as waiting RunContainerError, as the kubelet shows it; got {}",
        serde_json::to_string(&st.state).unwrap_or_default()
    );
    // The kubelet keeps what the runtime reports as the last state.
    let last = st
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("lastState terminated, as the kubelet reports it");
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (128, Some("StartError"))
    );
    assert_eq!(
        last.container_id.as_deref(),
        Some(format!("containerd://{}", created.id).as_str())
    );
    bed.wait_event("startfail", "dbg", "Created", |m| {
        m == "Created container: dbg"
    })
    .await;

    // Several resyncs later: still one container, created and started once.
    bed.passes(5).await;
    assert_eq!(bed.only_container(&pod, "dbg").id, created.id);
    assert_eq!(bed.calls("CreateContainer"), 2, "app + dbg, nothing more");
    assert_eq!(bed.calls("StartContainer"), 2, "app + dbg, nothing more");
    let st = ec_status(&bed.pod("startfail"), "dbg").expect("status");
    assert_eq!(waiting_reason(&st), Some("RunContainerError"));
    assert!(bed.api.rejected_status_writes().is_empty());
}

// ---------------------------------------------------------------------------
// 2. CreateContainer fails once, retryably.

/// A retryable CreateContainer failure is `CreateContainerError` with a
/// `Failed` Event, retried after the backoff until it runs; meanwhile the
/// pod's other ephemeral container and another pod's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_failure_backs_off_then_runs_without_blocking_others() {
    const FAILURE: &str = "failed to create containerd container: failed to mount rootfs component: no space left on device";
    let backoff = Duration::from_secs(2);
    let mut bed = Bed::new().await;
    bed.start_agent(Opts {
        backoff_initial: backoff,
        backoff_max: Duration::from_secs(4),
        ..Opts::default()
    })
    .await;
    let (pod_a, _) = bed.run_pod(app_pod("create-a")).await;
    let (pod_b, _) = bed.run_pod(app_pod("create-b")).await;

    bed.fake
        .fail_next("CreateContainer", Code::Unknown, FAILURE);
    bed.add_ephemeral(
        "create-a",
        &[debug("dbg1", Some("app")), debug("dbg2", Some("app"))],
    )
    .await;

    // dbg1 (first in the spec) takes the failure; dbg2 starts in the same pass.
    let st = bed
        .wait_status("create-a", "dbg1", "waiting CreateContainerError", |s| {
            waiting_reason(s) == Some("CreateContainerError")
        })
        .await;
    assert_eq!(waiting(&st), Some(("CreateContainerError", FAILURE)));
    bed.wait_status("create-a", "dbg2", "running", is_running)
        .await;
    let failed_at = Instant::now();
    let ev = bed
        .wait_event("create-a", "dbg1", "Failed", |m| {
            m == format!("Error: {FAILURE}")
        })
        .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert!(bed.runtime_containers(&pod_a, "dbg1").is_empty());

    // Another pod is not held up by dbg1's backoff.
    bed.add_ephemeral("create-b", &[debug("dbg", None)]).await;
    bed.wait_status("create-b", "dbg", "running", is_running)
        .await;
    assert!(
        failed_at.elapsed() < backoff,
        "pod B should start well within pod A's backoff"
    );
    let a1 = ec_status(&bed.pod("create-a"), "dbg1").expect("status");
    assert_eq!(waiting_reason(&a1), Some("CreateContainerError"));
    bed.only_container(&pod_b, "dbg");

    // After the backoff dbg1 is created again, and runs.
    let st = bed
        .wait_status("create-a", "dbg1", "running", is_running)
        .await;
    assert!(
        failed_at.elapsed() >= backoff.mul_f64(0.8),
        "retried only after the backoff ({:?} after the failure)",
        failed_at.elapsed()
    );
    let dbg1 = bed.only_container(&pod_a, "dbg1");
    assert_eq!(container_id(&st), format!("containerd://{}", dbg1.id));
    bed.only_container(&pod_a, "dbg2");
    bed.wait_event("create-a", "dbg1", "Started", |m| {
        m == "Started container dbg1"
    })
    .await;
}

// ---------------------------------------------------------------------------
// 3. Target missing.

/// A `targetContainerName` with no runtime container yet (an init container
/// that has not run) is `CreateContainerConfigError` "unable to find target
/// container X"; once that container exists the ephemeral one starts in its
/// PID namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_target_waits_then_starts_in_the_targets_namespace() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let mut pod = app_pod("target");
    let init = Container {
        name: "init".into(),
        image: Some(BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("Never".into()),
        command: Some(vec!["sh".into()]),
        ..Default::default()
    };
    pod.spec.as_mut().expect("spec").init_containers = Some(vec![init.clone()]);
    // The runtime has the sandbox and the app, but the init container has not run.
    let (pod, running) = bed
        .run_pod_as(pod, |p| {
            let mut p = p.clone();
            p.spec.as_mut().expect("spec").init_containers = None;
            p
        })
        .await;

    bed.add_ephemeral("target", &[debug("dbg", Some("init"))])
        .await;
    let st = bed
        .wait_status("target", "dbg", "waiting CreateContainerConfigError", |s| {
            waiting_reason(s) == Some("CreateContainerConfigError")
        })
        .await;
    assert_eq!(
        waiting(&st),
        Some((
            "CreateContainerConfigError",
            "unable to find target container init"
        ))
    );
    bed.wait_event("target", "dbg", "Failed", |m| {
        m == "Error: unable to find target container init"
    })
    .await;
    bed.passes(3).await;
    assert!(bed.runtime_containers(&pod, "dbg").is_empty());

    // The init container appears (as a kubelet would run it): dbg starts,
    // targeting it.
    let as_ephemeral: EphemeralContainer =
        serde_json::from_value(serde_json::to_value(&init).expect("json")).expect("fields");
    let init_id = bed
        .create_as_kubelet(&pod, &running, &as_ephemeral, None, true)
        .await;
    let st = bed
        .wait_status("target", "dbg", "running", is_running)
        .await;
    let dbg = bed.only_container(&pod, "dbg");
    assert_eq!(container_id(&st), format!("containerd://{}", dbg.id));
    assert_eq!(dbg.target_id.as_deref(), Some(init_id.as_str()));
}

// ---------------------------------------------------------------------------
// 4. Images.

/// A missing image with `imagePullPolicy: Never` is `ErrImageNeverPull`
/// with the kubelet's message and Events, and no pull; once the image is on
/// the node the container starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_with_never_is_err_image_never_pull() {
    const IMAGE: &str = "ephemerald.local/absent:1.0";
    let want = format!("Container image \"{IMAGE}\" is not present with pull policy of Never");
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("never")).await;

    let mut c = debug("dbg", Some("app"));
    c.image = Some(IMAGE.into());
    c.image_pull_policy = Some("Never".into());
    bed.add_ephemeral("never", &[c]).await;

    let st = bed
        .wait_status("never", "dbg", "waiting ErrImageNeverPull", |s| {
            waiting_reason(s) == Some("ErrImageNeverPull")
        })
        .await;
    assert_eq!(waiting(&st), Some(("ErrImageNeverPull", want.as_str())));
    let ev = bed
        .wait_event("never", "dbg", "ErrImageNeverPull", |m| m == want)
        .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    bed.wait_event("never", "dbg", "Failed", |m| {
        m == "Error: ErrImageNeverPull"
    })
    .await;
    bed.passes(3).await;
    assert_eq!(bed.calls("PullImage"), 0, "Never means never pull");
    assert!(bed.runtime_containers(&pod, "dbg").is_empty());

    // The image arrives on the node (imported by hand): the next retry starts it.
    bed.fake.set_image(IMAGE, "", "");
    bed.wait_status("never", "dbg", "running", is_running).await;
    bed.only_container(&pod, "dbg");
    assert_eq!(bed.calls("PullImage"), 0);
}

/// An image name the reference grammar refuses (upper case) passes the API
/// server's validation but not the kubelet's: `InvalidImageName` with an
/// `InspectFailed` Event, and no call to the runtime's image service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_image_name_is_invalid_image_name() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("badname")).await;
    let mut c = debug("dbg", Some("app"));
    c.image = Some("Ephemerald.Local/BusyBox".into());
    bed.add_ephemeral("badname", &[c]).await;
    let st = bed
        .wait_status("badname", "dbg", "waiting InvalidImageName", |s| {
            waiting_reason(s) == Some("InvalidImageName")
        })
        .await;
    let (_, message) = waiting(&st).unwrap();
    assert!(
        message.starts_with("Failed to apply default image tag \"Ephemerald.Local/BusyBox\": "),
        "{message}"
    );
    bed.wait_event("badname", "dbg", "InspectFailed", |m| m == message)
        .await;
    assert_eq!(bed.calls("PullImage"), 0);
    assert!(bed.runtime_containers(&pod, "dbg").is_empty());
}

/// A missing image whose pull fails is `ErrImagePull`, then
/// `ImagePullBackOff` with `Back-off pulling image "X": ErrImagePull: …` and
/// a BackOff Event; once the registry has it, it is pulled and started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_pull_is_err_image_pull_then_back_off_then_runs() {
    const IMAGE: &str = "ephemerald.local/tool:2.0";
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("pull")).await;

    let mut c = debug("dbg", Some("app"));
    c.image = Some(IMAGE.into());
    c.image_pull_policy = Some("IfNotPresent".into());
    bed.add_ephemeral("pull", &[c]).await;

    let st = bed
        .wait_status("pull", "dbg", "waiting ImagePullBackOff", |s| {
            waiting_reason(s) == Some("ImagePullBackOff")
        })
        .await;
    let failed = bed
        .wait_event("pull", "dbg", "Failed", |m| {
            m.starts_with("Failed to pull image")
        })
        .await;
    let prefix = format!("Failed to pull image \"{IMAGE}\": ");
    let pull_error = failed
        .message
        .as_deref()
        .and_then(|m| m.strip_prefix(&prefix))
        .expect("the pull error after the image")
        .to_string();
    assert!(
        pull_error.contains("failed to pull and unpack image"),
        "the runtime's own words: {pull_error}"
    );
    assert_eq!(
        waiting(&st),
        Some((
            "ImagePullBackOff",
            format!("Back-off pulling image \"{IMAGE}\": ErrImagePull: {pull_error}").as_str()
        ))
    );
    bed.wait_event("pull", "dbg", "Pulling", |m| {
        m == format!("Pulling image \"{IMAGE}\"")
    })
    .await;
    bed.wait_event("pull", "dbg", "Failed", |m| m == "Error: ErrImagePull")
        .await;
    let backoff = bed
        .wait_event("pull", "dbg", "BackOff", |m| {
            m == format!("Back-off pulling image \"{IMAGE}\"")
        })
        .await;
    assert_eq!(backoff.type_.as_deref(), Some("Normal"));

    // The API saw ErrImagePull (with the pull error) before ImagePullBackOff,
    // as the kubelet reports them: the failing sync, then the waiting ones.
    let history = bed.api.status_history("default", "pull");
    let reasons: Vec<(String, String)> = history
        .iter()
        .filter_map(|r| {
            let s = r
                .ephemeral_container_statuses
                .iter()
                .find(|s| s.name == "dbg")?;
            let (reason, message) = waiting(s)?;
            Some((reason.to_string(), message.to_string()))
        })
        .collect();
    let first_pull_error = reasons.iter().position(|(r, _)| r == "ErrImagePull");
    let first_back_off = reasons.iter().position(|(r, _)| r == "ImagePullBackOff");
    assert!(
        first_pull_error.is_some() && first_pull_error < first_back_off,
        "ErrImagePull is written before ImagePullBackOff; written: {reasons:?}"
    );
    if let Some(i) = first_pull_error {
        assert_eq!(reasons[i].1, pull_error);
    }
    assert!(bed.runtime_containers(&pod, "dbg").is_empty());

    // The registry gets the image: pulled on the next retry, then started.
    bed.fake.add_to_registry(FakeImage::new(IMAGE));
    let st = bed.wait_status("pull", "dbg", "running", is_running).await;
    let dbg = bed.only_container(&pod, "dbg");
    assert_eq!(container_id(&st), format!("containerd://{}", dbg.id));
    bed.wait_event("pull", "dbg", "Pulled", |m| {
        m.starts_with(&format!("Successfully pulled image \"{IMAGE}\" in "))
    })
    .await;
}

/// The pull error reads as the kubelet's: its CRI client keeps the gRPC
/// code of a pull error (`rpc error: code = NotFound desc = …`) and strips
/// only UNKNOWN (k8s.io/cri-client `pullImageV1`), and the image manager
/// puts that text in the Event and the ErrImagePull status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_errors_are_worded_like_the_kubelets() {
    const IMAGE: &str = "ephemerald.local/tool:2.0";
    let not_found = format!(
        "rpc error: code = NotFound desc = failed to pull and unpack image \"{IMAGE}\": failed to resolve reference \"{IMAGE}\": {IMAGE}: not found"
    );
    let unknown_prefix =
        format!("failed to pull and unpack image \"{IMAGE}\": failed to resolve reference");
    for (case, reachable) in [("notfound", true), ("unreachable", false)] {
        let mut bed = Bed::new().await;
        bed.fake.set_registry_reachable(reachable);
        bed.start_agent(Opts::default()).await;
        bed.run_pod(app_pod(case)).await;
        let mut c = debug("dbg", Some("app"));
        c.image = Some(IMAGE.into());
        bed.add_ephemeral(case, &[c]).await;

        let ev = bed
            .wait_event(case, "dbg", "Failed", |m| {
                m.starts_with("Failed to pull image")
            })
            .await;
        let pull_error = ev
            .message
            .as_deref()
            .and_then(|m| m.strip_prefix(&format!("Failed to pull image \"{IMAGE}\": ")))
            .expect("the pull error after the image")
            .to_string();
        if reachable {
            assert_eq!(pull_error, not_found, "NotFound keeps its gRPC code");
        } else {
            assert!(
                pull_error.starts_with(&unknown_prefix),
                "UNKNOWN is stripped to the runtime's words: {pull_error}"
            );
        }
        let st = bed
            .wait_status(case, "dbg", "waiting on the image", |s| {
                matches!(waiting_reason(s), Some("ErrImagePull" | "ImagePullBackOff"))
            })
            .await;
        let (_, message) = waiting(&st).expect("waiting");
        assert!(
            message.ends_with(&pull_error),
            "{case}: the status carries the same pull error: {message}"
        );
        bed.stop_agent().await;
    }
}

// ---------------------------------------------------------------------------
// 5. Specs the API server should have refused; mirror pods.

/// Ephemeral containers with any field kube-apiserver forbids on them
/// (`ports`, resource limits, `lifecycle`, the three probes,
/// `restartPolicy`, `resizePolicy`, a `subPath` mount: a spec an old or
/// modified API server let through) are never created:
/// `CreateContainerConfigError` with the validation message and one
/// `Failed` Event each; a valid one in the same pod starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_specs_are_config_errors_and_do_not_block_valid_ones() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    bed.run_pod(app_pod("refused")).await;

    let mut ports = debug("ports", None);
    ports.ports = Some(vec![ContainerPort {
        container_port: 8080,
        ..Default::default()
    }]);
    let mut limits = debug("limits", None);
    limits.resources = Some(ResourceRequirements {
        limits: Some(BTreeMap::from([("memory".into(), Quantity("64Mi".into()))])),
        ..Default::default()
    });
    let mut hook = debug("hook", None);
    hook.lifecycle = Some(Lifecycle {
        pre_stop: Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(vec!["sh".into(), "-c".into(), "sleep 1".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    // The other fields kube-apiserver forbids, set the way a client would.
    let with = |name: &str, extra: serde_json::Value| -> EphemeralContainer {
        let mut v = serde_json::to_value(debug(name, None)).expect("json");
        v.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        serde_json::from_value(v).expect("an ephemeral container")
    };
    let probe = serde_json::json!({"exec": {"command": ["true"]}});
    let liveness = with("liveness", serde_json::json!({"livenessProbe": probe}));
    let readiness = with("readiness", serde_json::json!({"readinessProbe": probe}));
    let startup = with("startup", serde_json::json!({"startupProbe": probe}));
    let restart = with("restart", serde_json::json!({"restartPolicy": "Always"}));
    let resize = with(
        "resize",
        serde_json::json!({"resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"}]}),
    );
    let subpath = with(
        "subpath",
        serde_json::json!({"volumeMounts": [{"name": "data", "mountPath": "/data", "subPath": "logs"}]}),
    );
    let good = debug("good", None);
    let mut stored = bed.pod("refused");
    stored.spec.as_mut().expect("spec").volumes = Some(vec![
        serde_json::from_value(serde_json::json!({"name": "data", "emptyDir": {}}))
            .expect("volume"),
    ]);
    let ecs: Vec<EphemeralContainer> = [
        ports, limits, hook, liveness, readiness, startup, restart, resize, subpath, good,
    ]
    .into_iter()
    .map(|mut c| {
        validation::default_ephemeral_container(&mut c);
        c
    })
    .collect();
    stored.spec.as_mut().expect("spec").ephemeral_containers = Some(ecs);
    let pod = bed.api.put_pod_unchecked(stored);

    let forbidden = "Forbidden: cannot be set for an Ephemeral Container";
    let table = [
        (
            "ports",
            format!("spec.ephemeralContainers[0].ports: {forbidden}"),
        ),
        (
            "limits",
            format!("spec.ephemeralContainers[1].resources: {forbidden}"),
        ),
        (
            "hook",
            format!("spec.ephemeralContainers[2].lifecycle: {forbidden}"),
        ),
        (
            "liveness",
            format!("spec.ephemeralContainers[3].livenessProbe: {forbidden}"),
        ),
        (
            "readiness",
            format!("spec.ephemeralContainers[4].readinessProbe: {forbidden}"),
        ),
        (
            "startup",
            format!("spec.ephemeralContainers[5].startupProbe: {forbidden}"),
        ),
        (
            "restart",
            format!("spec.ephemeralContainers[6].restartPolicy: {forbidden}"),
        ),
        (
            "resize",
            format!("spec.ephemeralContainers[7].resizePolicy: {forbidden}"),
        ),
        (
            "subpath",
            format!("spec.ephemeralContainers[8].volumeMounts[0].subPath: {forbidden}"),
        ),
    ];
    for (name, message) in &table {
        let st = bed
            .wait_status("refused", name, "waiting CreateContainerConfigError", |s| {
                waiting_reason(s) == Some("CreateContainerConfigError")
            })
            .await;
        assert_eq!(
            waiting(&st),
            Some(("CreateContainerConfigError", message.as_str())),
            "{name}"
        );
        let ev = bed
            .wait_event("refused", name, "Failed", |m| {
                m == format!("Error: {message}")
            })
            .await;
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
    }
    bed.wait_status("refused", "good", "running", is_running)
        .await;
    bed.passes(4).await;
    for (name, _) in &table {
        assert!(
            bed.runtime_containers(&pod, name).is_empty(),
            "{name} never reaches the runtime"
        );
        let failed = bed
            .events_of("refused", name)
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Failed"))
            .count();
        assert_eq!(failed, 1, "{name}: one Failed Event, not one per pass");
        let st = ec_status(&bed.pod("refused"), name).expect("status");
        assert_eq!(waiting_reason(&st), Some("CreateContainerConfigError"));
    }
    bed.only_container(&pod, "good");
    assert_eq!(bed.calls("CreateContainer"), 2, "app + good only");
}

/// A mirror pod (a static pod's API copy) never gets ephemeral containers
/// started, even when its spec has some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_pod_starts_nothing() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let mut pod = app_pod("mirror");
    pod.metadata.annotations = Some(BTreeMap::from([(
        "kubernetes.io/config.mirror".into(),
        "0123456789abcdef".into(),
    )]));
    let mut c = debug("dbg", Some("app"));
    validation::default_ephemeral_container(&mut c);
    pod.spec.as_mut().expect("spec").ephemeral_containers = Some(vec![c]);
    let pod = bed.api.put_pod_unchecked(pod);
    let mut runtime_view = pod.clone();
    runtime_view
        .spec
        .as_mut()
        .expect("spec")
        .ephemeral_containers = None;
    let running = bed
        .runner
        .run(&runtime_view)
        .await
        .expect("pod runs on the fake runtime");
    bed.report_running(&pod, &running).await;

    let st = bed
        .wait_status("mirror", "dbg", "waiting CreateContainerConfigError", |s| {
            waiting_reason(s) == Some("CreateContainerConfigError")
        })
        .await;
    assert_eq!(
        waiting(&st),
        Some(("CreateContainerConfigError", validation::STATIC_POD_REFUSAL))
    );
    bed.passes(4).await;
    assert!(bed.runtime_containers(&pod, "dbg").is_empty());
    assert_eq!(bed.calls("CreateContainer"), 1, "the app only");
    assert_eq!(bed.calls("PullImage"), 0);
}

// ---------------------------------------------------------------------------
// 6. The runtime goes away.

/// With the runtime gone when a container is appended, the agent keeps
/// running; when the runtime is back it starts and reports the container
/// without being restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_unavailable_then_back_starts_without_agent_restart() {
    let mut bed = Bed::new().await;
    let agent = bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("outage")).await;

    bed.fake.set_unavailable(true).await;
    bed.add_ephemeral("outage", &[debug("dbg", Some("app"))])
        .await;
    let errors = agent.metrics.reconcile_errors.get();
    eventually("a reconcile pass to fail on the runtime", WAIT, || {
        (agent.metrics.reconcile_errors.get() > errors).then_some(())
    })
    .await;
    bed.assert_agent_alive();
    let st = ec_status(&bed.pod("outage"), "dbg");
    assert!(
        st.as_ref().is_none_or(|s| !is_running(s)),
        "nothing runs while the runtime is away: {st:?}"
    );

    bed.fake.set_unavailable(false).await;
    let st = bed
        .wait_status("outage", "dbg", "running", is_running)
        .await;
    let dbg = bed.only_container(&pod, "dbg");
    assert_eq!(container_id(&st), format!("containerd://{}", dbg.id));
    bed.assert_agent_alive();
    bed.stop_agent().await;
}

// ---------------------------------------------------------------------------
// 7. Exits: CRI events, or the resync.

/// With CRI `GetContainerEvents` served, an exit reaches the API status as
/// `terminated{exitCode: 3, reason: Error}` at once, long before a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_event_reaches_the_api_well_before_the_resync() {
    let resync = Duration::from_secs(60);
    let mut bed = Bed::new().await;
    bed.fake.serve_container_events(true);
    bed.start_agent(Opts {
        resync,
        ..Opts::default()
    })
    .await;
    let (pod, _) = bed.run_pod(app_pod("events")).await;
    eventually("the agent to subscribe to CRI events", WAIT, || {
        (bed.calls("GetContainerEvents") > 0).then_some(())
    })
    .await;

    bed.add_ephemeral("events", &[debug("dbg", Some("app"))])
        .await;
    bed.wait_status("events", "dbg", "running", is_running)
        .await;
    let dbg = bed.only_container(&pod, "dbg");

    let exited = Instant::now();
    bed.fake.exit(&dbg.id, 3);
    let st = bed
        .wait_status("events", "dbg", "terminated", |s| exit_code(s).is_some())
        .await;
    let took = exited.elapsed();
    eprintln!("exit → API terminated with CRI events: {took:?} (resync {resync:?})");
    let t = st
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
    assert_eq!(
        t.container_id.as_deref(),
        Some(format!("containerd://{}", dbg.id).as_str())
    );
    assert!(
        took < Duration::from_secs(3),
        "the exit arrived after {took:?}, not at once"
    );
}

/// Without exit events (GetContainerEvents UNIMPLEMENTED as in containerd
/// 1.6, no containerd socket) the same exit arrives at the next resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_without_events_arrives_at_the_next_resync() {
    let resync = Duration::from_millis(300);
    let mut bed = Bed::new().await;
    bed.fake.serve_container_events(false);
    bed.start_agent(Opts {
        resync,
        ..Opts::default()
    })
    .await;
    let (pod, _) = bed.run_pod(app_pod("noevents")).await;
    bed.add_ephemeral("noevents", &[debug("dbg", Some("app"))])
        .await;
    bed.wait_status("noevents", "dbg", "running", is_running)
        .await;
    let dbg = bed.only_container(&pod, "dbg");

    let exited = Instant::now();
    bed.fake.exit(&dbg.id, 3);
    let st = bed
        .wait_status("noevents", "dbg", "terminated", |s| exit_code(s).is_some())
        .await;
    let took = exited.elapsed();
    eprintln!("exit → API terminated by resync: {took:?} (resync {resync:?})");
    let t = st
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
    assert!(
        took < resync + Duration::from_secs(2),
        "the exit should arrive at the next resync, took {took:?}"
    );
    assert!(
        bed.calls("GetContainerEvents") > 0,
        "the agent asked for events"
    );
}

// ---------------------------------------------------------------------------
// 8. Adoption and --mode observe.

/// A container someone else (a kubelet) created before the agent saw it is
/// adopted: never created a second time, its status reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_container_is_adopted_not_duplicated() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, running) = bed.run_pod(app_pod("preexisting")).await;
    let app_id = running.containers.get("app").expect("app").clone();

    let c = debug("dbg", Some("app"));
    let theirs = bed
        .create_as_kubelet(&pod, &running, &c, Some(&app_id), true)
        .await;
    bed.fake.clear_calls();
    bed.add_ephemeral("preexisting", &[c]).await;

    let st = bed
        .wait_status("preexisting", "dbg", "running", is_running)
        .await;
    assert_eq!(container_id(&st), format!("containerd://{theirs}"));
    bed.passes(3).await;
    assert_eq!(bed.only_container(&pod, "dbg").id, theirs);
    assert_eq!(bed.calls("CreateContainer"), 0, "the agent creates nothing");
    let timeline = bed
        .agent()
        .timelines()
        .into_iter()
        .find(|t| t.pod == "default/preexisting" && t.container == "dbg")
        .expect("a timeline");
    assert_eq!(timeline.creator, Some(Creator::Other));
}

/// The race with a kubelet: it creates the container between the agent's
/// look at the runtime and the agent's CreateContainer. The runtime refuses
/// the agent's (name reserved); the agent logs that it adopts the
/// container and reports it; the runtime holds exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_created_during_the_agents_start_is_adopted() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, running) = bed.run_pod(app_pod("kubelet-race")).await;
    let app_id = running.containers.get("app").expect("app").clone();

    // Hold the agent in its image check, after it found no container.
    bed.fake.set_delay("ImageStatus", Duration::from_secs(1));
    bed.fake.clear_calls();
    let c = debug("dbg", Some("app"));
    let stored = bed
        .add_ephemeral("kubelet-race", std::slice::from_ref(&c))
        .await;
    eventually("the agent's image check", WAIT, || {
        (bed.calls("ImageStatus") > 0).then_some(())
    })
    .await;
    assert_eq!(bed.calls("CreateContainer"), 0);
    let stored_c = stored
        .spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .and_then(|v| v.iter().find(|e| e.name == "dbg"))
        .expect("stored container")
        .clone();
    let theirs = bed
        .create_as_kubelet(&pod, &running, &stored_c, Some(&app_id), true)
        .await;
    bed.fake.set_delay("ImageStatus", Duration::ZERO);

    let st = bed
        .wait_status("kubelet-race", "dbg", "running", is_running)
        .await;
    assert_eq!(container_id(&st), format!("containerd://{theirs}"));
    eventually("the agent's CreateContainer", WAIT, || {
        (bed.calls("CreateContainer") >= 2).then_some(())
    })
    .await;
    bed.passes(3).await;
    assert_eq!(bed.only_container(&pod, "dbg").id, theirs);
    assert_eq!(
        bed.calls("CreateContainer"),
        2,
        "the kubelet's, and the agent's refused one"
    );
    assert_eq!(bed.calls("StartContainer"), 1, "only the kubelet's");
    let adopted = log_lines(&["adopt", "pod=default/kubelet-race", "container=dbg"]);
    assert!(
        !adopted.is_empty(),
        "the agent logs that it adopted dbg of kubelet-race"
    );
    assert!(
        bed.events_of("kubelet-race", "dbg")
            .iter()
            .all(|e| e.reason.as_deref() != Some("Failed")),
        "adopting is not a failure: {:?}",
        summary(&bed.events_of("kubelet-race", "dbg"))
    );
}

/// `--mode observe`: the agent creates nothing and writes no status, but
/// records the timeline of a container someone else creates and starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_records_timelines_and_writes_nothing() {
    let mut bed = Bed::new().await;
    let agent = bed
        .start_agent(Opts {
            mode: Mode::Observe,
            ..Opts::default()
        })
        .await;
    assert!(!agent.mode.starting());
    let (pod, running) = bed.run_pod(app_pod("observe")).await;
    let app_id = running.containers.get("app").expect("app").clone();
    let writes_before = bed.api.status_history("default", "observe").len();

    let stored = bed
        .add_ephemeral("observe", &[debug("dbg", Some("app"))])
        .await;
    bed.passes(4).await;
    assert!(bed.runtime_containers(&pod, "dbg").is_empty());
    assert_eq!(bed.calls("CreateContainer"), 1, "the app only");
    let seen = agent
        .timelines()
        .into_iter()
        .find(|t| t.container == "dbg")
        .expect("the container was seen");
    assert_eq!(
        (seen.created, seen.started, seen.creator),
        (None, None, None)
    );

    // Someone else creates and starts it.
    let stored_c = stored
        .spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .and_then(|v| v.first())
        .expect("stored container")
        .clone();
    let before = SystemTime::now();
    bed.create_as_kubelet(&pod, &running, &stored_c, Some(&app_id), true)
        .await;
    let t = eventually("created and started in the timeline", WAIT, || {
        agent
            .timelines()
            .into_iter()
            .find(|t| t.container == "dbg" && t.created.is_some() && t.started.is_some())
    })
    .await;
    assert_eq!(t.pod, "default/observe");
    assert_eq!(t.creator, Some(Creator::Other));
    let created = t.created.expect("created");
    let started = t.started.expect("started");
    assert!(created <= started);
    assert!(
        created + Duration::from_secs(1) >= before,
        "the runtime's creation time, not an old one"
    );

    bed.passes(3).await;
    assert_eq!(bed.calls("CreateContainer"), 2, "app + the other creator's");
    assert_eq!(
        bed.api.status_history("default", "observe").len(),
        writes_before,
        "no status writes by an observing agent"
    );
    assert!(ec_status(&bed.pod("observe"), "dbg").is_none());
}

// ---------------------------------------------------------------------------
// 9. --mode auto and the node Lease.

/// The node's Lease as a kubelet keeps it, last renewed `renewed_secs_ago`.
async fn put_lease(bed: &Bed, renewed_secs_ago: i64) {
    let leases: Api<Lease> = Api::namespaced(bed.api.client(), "kube-node-lease");
    let renewed = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(
            renewed_secs_ago,
        ))
        .expect("a time in range");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            namespace: Some("kube-node-lease".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(NODE.into()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }),
    };
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("Lease created");
}

/// `--mode auto` with a fresh node Lease (a live kubelet): observe only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_with_a_fresh_lease_observes() {
    let mut bed = Bed::new().await;
    put_lease(&bed, 0).await;
    let agent = bed
        .start_agent(Opts {
            mode: Mode::Auto,
            ..Opts::default()
        })
        .await;
    assert!(!agent.mode.starting(), "{}", agent.mode.describe());
    assert!(
        agent.mode.describe().starts_with("observing only"),
        "{}",
        agent.mode.describe()
    );
    let (pod, _) = bed.run_pod(app_pod("auto-lease")).await;
    let writes_before = bed.api.status_history("default", "auto-lease").len();
    bed.add_ephemeral("auto-lease", &[debug("dbg", Some("app"))])
        .await;
    bed.passes(4).await;
    assert!(bed.runtime_containers(&pod, "dbg").is_empty());
    assert_eq!(bed.calls("CreateContainer"), 1, "the app only");
    assert_eq!(
        bed.api.status_history("default", "auto-lease").len(),
        writes_before
    );
}

/// `--mode auto` with no Lease, or an expired one: start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_without_a_live_lease_starts() {
    for (case, lease_age) in [("no-lease", None), ("expired-lease", Some(120))] {
        let mut bed = Bed::new().await;
        if let Some(age) = lease_age {
            put_lease(&bed, age).await;
        }
        let agent = bed
            .start_agent(Opts {
                mode: Mode::Auto,
                ..Opts::default()
            })
            .await;
        assert!(agent.mode.starting(), "{case}: {}", agent.mode.describe());
        let (pod, _) = bed.run_pod(app_pod(case)).await;
        bed.add_ephemeral(case, &[debug("dbg", Some("app"))]).await;
        let st = bed.wait_status(case, "dbg", "running", is_running).await;
        let dbg = bed.only_container(&pod, "dbg");
        assert_eq!(
            container_id(&st),
            format!("containerd://{}", dbg.id),
            "{case}"
        );
        bed.stop_agent().await;
    }
}

/// `t` as the API's timestamp type.
fn api_time(t: SystemTime) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::try_from(t).expect("a time in range")
}

/// The Node as a kubelet registers it: `nodeInfo`, its own endpoint in
/// `daemonEndpoints`, and a `Ready` condition last heartbeating at
/// `heartbeat` (a node status object of the real shape).
fn kubelet_node(heartbeat: SystemTime) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {},
        "status": {
            "conditions": [ready_condition(heartbeat)],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "containerd://1.6.20",
                "kernelVersion": "6.1.0", "kubeProxyVersion": "", "kubeletVersion": "v1.36.0",
                "machineID": "m", "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12",
                "systemUUID": "s",
            },
            "addresses": [{"type": "Hostname", "address": NODE}],
        },
    })
}

fn ready_condition(heartbeat: SystemTime) -> serde_json::Value {
    let hb = api_time(heartbeat)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    serde_json::json!({
        "type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status",
        "lastHeartbeatTime": hb, "lastTransitionTime": hb,
    })
}

/// The kubelet registers its node (heartbeating now).
async fn register_node(bed: &Bed) {
    let node: Node = serde_json::from_value(kubelet_node(SystemTime::now())).expect("a Node");
    Api::<Node>::all(bed.api.client())
        .create(&PostParams::default(), &node)
        .await
        .expect("node registered");
}

/// The kubelet's node status update: a new `Ready` heartbeat, through
/// `nodes/NAME/status`.
async fn heartbeat(bed: &Bed, at: SystemTime) {
    let patch = serde_json::json!({"status": {"conditions": [ready_condition(at)]}});
    Api::<Node>::all(bed.api.client())
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("node status written");
}

/// The kubelet's lease controller: creates the Lease, or renews it with a
/// PUT of the last one read (optimistic concurrency). Returns when it
/// holds until.
async fn renew_lease(bed: &Bed, duration_secs: i32) -> SystemTime {
    let leases: Api<Lease> = Api::namespaced(bed.api.client(), "kube-node-lease");
    let renewed = SystemTime::now();
    let spec = LeaseSpec {
        holder_identity: Some(NODE.into()),
        lease_duration_seconds: Some(duration_secs),
        renew_time: Some(MicroTime(api_time(renewed))),
        ..Default::default()
    };
    match leases.get_opt(NODE).await.expect("lease read") {
        Some(mut lease) => {
            lease.spec = Some(spec);
            leases
                .replace(NODE, &PostParams::default(), &lease)
                .await
                .expect("lease renewed");
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(NODE.into()),
                    namespace: Some("kube-node-lease".into()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            leases
                .create(&PostParams::default(), &lease)
                .await
                .expect("lease created");
        }
    }
    // The API keeps microseconds, as the decision reads it.
    let micros = renewed
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_micros();
    SystemTime::UNIX_EPOCH
        + Duration::from_micros(micros as u64)
        + Duration::from_secs(u64::from(duration_secs.unsigned_abs()))
}

/// Waits until the gate says `starting`; returns when it was seen so (polled
/// every 10 ms).
async fn wait_mode(agent: &Agent, starting: bool) -> SystemTime {
    eventually(&format!("the mode to be starting={starting}"), WAIT, || {
        (agent.mode.starting() == starting).then(SystemTime::now)
    })
    .await
}

fn mode_changes(agent: &Agent, to: &str) -> u64 {
    agent
        .metrics
        .mode_changes
        .get_or_create(&ModeChangeLabels { to: to.into() })
        .get()
}

/// `--mode auto` next to a kubelet's life, as on a node where the agent
/// starts right after the kubelet registered the node: registered and
/// heartbeating but no Lease yet → nothing starts; the Lease appears →
/// still nothing; Lease and heartbeat run out → containers start within a
/// second of the last window running out (a timer, not a poll); the
/// kubelet comes back → observing within a second. Each change is counted
/// and shown in the gauge and `/readyz`'s mode line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_follows_a_kubelet_from_registration_to_death_and_back() {
    let mut bed = Bed::new().await;
    register_node(&bed).await;
    let agent = bed
        .start_agent(Opts {
            mode: Mode::Auto,
            ..Opts::default()
        })
        .await;
    assert!(!agent.mode.starting(), "{}", agent.mode.describe());
    assert!(
        agent.mode.describe().contains(&format!(
            "a kubelet v1.36.0 registered Node {NODE} and its Lease kube-node-lease/{NODE} is not there yet"
        )),
        "{}",
        agent.mode.describe()
    );
    let (pod, _) = bed.run_pod(app_pod("kubelet-life")).await;
    let writes = bed.api.status_history("default", "kubelet-life").len();
    bed.add_ephemeral("kubelet-life", &[debug("dbg", Some("app"))])
        .await;
    bed.passes(4).await;
    assert!(
        bed.runtime_containers(&pod, "dbg").is_empty(),
        "registered, no Lease yet: nothing starts"
    );

    // The kubelet's lease controller creates the Lease (short, for the test).
    let lease_until = renew_lease(&bed, 2).await;
    eventually("the Lease in the mode's reason", WAIT, || {
        agent.mode.describe().contains("renewed").then_some(())
    })
    .await;
    bed.passes(3).await;
    assert!(!agent.mode.starting(), "{}", agent.mode.describe());
    assert!(
        bed.runtime_containers(&pod, "dbg").is_empty(),
        "Lease fresh: nothing starts"
    );

    // The kubelet dies: its last heartbeat is older than the grace, and the
    // Lease runs out at `lease_until`.
    heartbeat(&bed, SystemTime::now() - Duration::from_secs(120)).await;
    let stale_written = SystemTime::now();
    let last_window = lease_until.max(stale_written);
    let flipped = wait_mode(&agent, true).await;
    assert!(
        flipped >= lease_until,
        "not before the Lease ran out: {:?} early",
        lease_until.duration_since(flipped).unwrap_or_default()
    );
    assert!(
        flipped.duration_since(last_window).unwrap_or_default() < Duration::from_secs(1),
        "starting within a second of the last window running out, not {:?} after",
        flipped.duration_since(last_window)
    );
    let st = bed
        .wait_status("kubelet-life", "dbg", "running", is_running)
        .await;
    let t = agent
        .timelines()
        .into_iter()
        .find(|t| t.container == "dbg")
        .expect("dbg's timeline");
    assert_eq!(t.creator, Some(Creator::Agent));
    let created = t.created.expect("created");
    assert!(
        created >= lease_until,
        "created only after the Lease ran out"
    );
    assert!(
        created.duration_since(last_window).unwrap_or_default() < Duration::from_secs(1),
        "created within a second of the last window running out, not {:?} after",
        created.duration_since(last_window)
    );
    assert_eq!(
        container_id(&st),
        format!("containerd://{}", bed.only_container(&pod, "dbg").id)
    );
    assert!(
        bed.api.status_history("default", "kubelet-life").len() > writes,
        "the agent reports what it started"
    );
    assert_eq!(mode_changes(&agent, "starting"), 1);
    let metrics = agent.metrics.encode();
    assert!(
        metrics.contains(r#"ephemerald_mode{mode="starting",rule="no_kubelet"} 1"#),
        "{metrics}"
    );
    let ready = agent.health.lock().unwrap().readiness().1;
    assert!(
        ready.contains("mode: starting ephemeral containers (")
            && ready.contains(&format!("Lease kube-node-lease/{NODE} expired")),
        "{ready}"
    );

    // The kubelet comes back and renews its Lease: observing within a second.
    let renewed_at = SystemTime::now();
    renew_lease(&bed, 40).await;
    let observing = wait_mode(&agent, false).await;
    assert!(
        observing.duration_since(renewed_at).unwrap_or_default() < Duration::from_secs(1),
        "observing within a second of the renewal, not {:?} after",
        observing.duration_since(renewed_at)
    );
    assert_eq!(mode_changes(&agent, "observing"), 1);
    let metrics = agent.metrics.encode();
    assert!(
        metrics.contains(r#"ephemerald_mode{mode="observing",rule="lease_renewed"} 1"#)
            && !metrics.contains(r#"ephemerald_mode{mode="starting""#),
        "one series, the current mode: {metrics}"
    );
    bed.add_ephemeral("kubelet-life", &[debug("dbg2", Some("app"))])
        .await;
    bed.passes(4).await;
    assert!(
        bed.runtime_containers(&pod, "dbg2").is_empty(),
        "a live kubelet's container: not started"
    );
}

/// What the agent started it reports to the end: `dbg`, started while no
/// kubelet served the node, is still running when a kubelet comes back;
/// its exit gets a terminated status from the (now observing) agent. `theirs`,
/// created and reported by the kubelet, is never written by the agent, not
/// even after it exits and the kubelet has not said so yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_reports_what_it_started_after_a_kubelet_came_back() {
    let mut bed = Bed::new().await;
    let agent = bed
        .start_agent(Opts {
            mode: Mode::Auto,
            ..Opts::default()
        })
        .await;
    assert!(agent.mode.starting(), "{}", agent.mode.describe());
    let (pod, running) = bed.run_pod(app_pod("handover")).await;
    bed.add_ephemeral("handover", &[debug("dbg", Some("app"))])
        .await;
    let st = bed
        .wait_status("handover", "dbg", "running", is_running)
        .await;
    let ours = bed.only_container(&pod, "dbg").id;
    assert_eq!(container_id(&st), format!("containerd://{ours}"));

    // A kubelet comes up on the node.
    register_node(&bed).await;
    renew_lease(&bed, 40).await;
    wait_mode(&agent, false).await;

    // It starts a container of its own and reports it.
    let stored = bed
        .add_ephemeral("handover", &[debug("theirs", Some("app"))])
        .await;
    let theirs_spec = stored
        .spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .and_then(|v| v.iter().find(|c| c.name == "theirs"))
        .expect("stored container")
        .clone();
    let app_id = running.containers.get("app").expect("app").clone();
    let theirs = bed
        .create_as_kubelet(&pod, &running, &theirs_spec, Some(&app_id), true)
        .await;
    let mut statuses = bed
        .pod("handover")
        .status
        .unwrap()
        .ephemeral_container_statuses
        .unwrap();
    let kubelet_says: ContainerStatus = serde_json::from_value(serde_json::json!({
        "name": "theirs", "ready": false, "restartCount": 0, "image": BUSYBOX_IMAGE,
        "imageID": "", "containerID": format!("containerd://{theirs}"),
        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
    }))
    .unwrap();
    statuses.push(kubelet_says.clone());
    statuses.sort_by(|a, b| a.name.cmp(&b.name));
    bed.pods()
        .patch_status(
            "handover",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"status": {"ephemeralContainerStatuses": statuses}})),
        )
        .await
        .expect("the kubelet's status write");
    let kubelet_wrote = bed.api.status_history("default", "handover").len();

    // Both exit; only ours is the agent's to report.
    bed.fake.exit(&ours, 3);
    bed.fake.exit(&theirs, 4);
    let st = bed
        .wait_status("handover", "dbg", "terminated", |s| exit_code(s).is_some())
        .await;
    assert_eq!(exit_code(&st), Some(3));
    assert_eq!(container_id(&st), format!("containerd://{ours}"));
    bed.passes(4).await;
    let after = bed.api.status_history("default", "handover");
    assert!(after.len() > kubelet_wrote, "the agent wrote dbg's exit");
    for w in &after[kubelet_wrote..] {
        let t = w
            .ephemeral_container_statuses
            .iter()
            .find(|s| s.name == "theirs")
            .expect("theirs kept in every write");
        assert_eq!(
            t, &kubelet_says,
            "the agent never writes the kubelet's container"
        );
    }
    assert!(!agent.mode.starting(), "{}", agent.mode.describe());
    assert_eq!(
        bed.calls("CreateContainer"),
        3,
        "app, dbg (the agent's), theirs (the kubelet's)"
    );
}

// ---------------------------------------------------------------------------
// 10. Status writes.

/// Written only when something changed: a steady pod gets no further writes
/// over several resyncs; the list is sorted by name; a terminated status
/// stays terminated when the runtime loses the container and across an
/// agent restart, and the container is not created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_written_only_on_change_sorted_and_never_moved_back() {
    // A short resync: many passes, quickly, to catch redundant writes.
    let fast = Opts {
        resync: Duration::from_millis(100),
        ..Opts::default()
    };
    let mut bed = Bed::new().await;
    bed.start_agent(fast).await;
    let (pod, _) = bed.run_pod(app_pod("steady")).await;
    let kubelet_writes = bed.api.status_history("default", "steady").len();
    let agent_writes =
        |bed: &Bed| bed.api.status_history("default", "steady")[kubelet_writes..].to_vec();

    bed.add_ephemeral("steady", &[debug("zeta", Some("app"))])
        .await;
    bed.wait_status("steady", "zeta", "running", is_running)
        .await;
    bed.passes(5).await;
    let writes = agent_writes(&bed);
    assert_eq!(
        writes.len(),
        1,
        "one write (running) for a clean start, none per resync: {:?}",
        writes
            .iter()
            .map(|w| serde_json::to_string(&w.ephemeral_container_statuses).unwrap_or_default())
            .collect::<Vec<_>>()
    );

    bed.add_ephemeral("steady", &[debug("alpha", Some("app"))])
        .await;
    bed.wait_status("steady", "alpha", "running", is_running)
        .await;
    let names: Vec<String> = bed
        .pod("steady")
        .status
        .and_then(|s| s.ephemeral_container_statuses)
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["alpha", "zeta"], "sorted by name");
    bed.passes(5).await;
    let writes = agent_writes(&bed);
    assert_eq!(writes.len(), 2, "one more write for alpha, then none");
    for w in &writes {
        let names: Vec<&str> = w
            .ephemeral_container_statuses
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "every write is sorted");
    }

    // zeta exits: one write, terminated.
    let zeta = bed.only_container(&pod, "zeta");
    bed.fake.exit(&zeta.id, 0);
    let terminated = bed
        .wait_status("steady", "zeta", "terminated", |s| exit_code(s).is_some())
        .await;
    assert_eq!(
        terminated
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .and_then(|t| t.reason.as_deref()),
        Some("Completed")
    );
    bed.passes(5).await;
    assert_eq!(agent_writes(&bed).len(), 3, "one write for the exit");

    // The runtime loses it (garbage collection): still terminated, not recreated.
    bed.cri
        .remove_container(&zeta.id)
        .await
        .expect("RemoveContainer");
    bed.passes(5).await;
    assert_eq!(
        ec_status(&bed.pod("steady"), "zeta"),
        Some(terminated.clone())
    );
    assert!(
        bed.runtime_containers(&pod, "zeta").is_empty(),
        "not recreated"
    );
    assert_eq!(agent_writes(&bed).len(), 3, "nothing to write");

    // A new agent with no memory: the same.
    bed.stop_agent().await;
    bed.start_agent(fast).await;
    bed.passes(5).await;
    assert_eq!(ec_status(&bed.pod("steady"), "zeta"), Some(terminated));
    assert!(
        bed.runtime_containers(&pod, "zeta").is_empty(),
        "not recreated"
    );
    assert!(is_running(
        &ec_status(&bed.pod("steady"), "alpha").expect("alpha")
    ));
    assert_eq!(agent_writes(&bed).len(), 3, "a restart writes nothing new");
    assert!(bed.api.rejected_status_writes().is_empty());
}

// ---------------------------------------------------------------------------
// 11. What the spec refers to: ConfigMaps and Secrets for env, claims for
//     volume mounts, pull secrets for images; volumes the pod lacks.

/// Creates a namespaced object in `default` through the API.
async fn create<K>(bed: &Bed, obj: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let obj: K = serde_json::from_value(obj).expect("a valid object");
    Api::<K>::namespaced(bed.api.client(), "default")
        .create(&PostParams::default(), &obj)
        .await
        .expect("created in the API server")
}

fn env_of(c: &FakeContainer) -> Vec<(String, String)> {
    c.config
        .envs
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            )
        })
        .collect()
}

/// `env[].valueFrom` and `envFrom` are read through the API as the kubelet's
/// managers do: `envFrom` first (with its prefix), then `env`; optional
/// references to what does not exist leave the variable out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_from_config_maps_and_secrets_read_through_the_api() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("envs")).await;
    let _: ConfigMap = create(
        &bed,
        serde_json::json!({"metadata": {"name": "settings"},
                           "data": {"LEVEL": "debug", "MODE": "$(LEVEL)"}}),
    )
    .await;
    let _: Secret = create(
        &bed,
        serde_json::json!({"metadata": {"name": "creds"}, "stringData": {"user": "admin"}}),
    )
    .await;

    let c: EphemeralContainer = serde_json::from_value(serde_json::json!({
        "name": "dbg", "image": BUSYBOX_IMAGE, "command": ["sh"],
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
                    {"secretRef": {"name": "absent", "optional": true}}],
        "env": [
            {"name": "USER", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LEVEL"}}},
            {"name": "GREETING", "value": "$(USER) at $(LEVEL)"},
            {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": true}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
    }))
    .unwrap();
    bed.add_ephemeral("envs", &[c]).await;
    bed.wait_status("envs", "dbg", "running", is_running).await;
    let dbg = bed.only_container(&pod, "dbg");
    let want: Vec<(String, String)> = [
        ("CFG_LEVEL", "debug"),
        ("CFG_MODE", "$(LEVEL)"),
        ("USER", "admin"),
        ("LEVEL", "debug"),
        ("GREETING", "admin at debug"),
        ("POD", "envs"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env_of(&dbg), want);
}

/// A required ConfigMap that does not exist, then one without the key: each
/// a `CreateContainerConfigError` with the kubelet's words and a Warning
/// Event, retried with backoff; once the key is there the container starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_config_map_or_key_is_a_config_error_until_it_appears() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("later")).await;
    let c: EphemeralContainer = serde_json::from_value(serde_json::json!({
        "name": "dbg", "image": BUSYBOX_IMAGE, "command": ["sh"],
        "env": [{"name": "K", "valueFrom": {"configMapKeyRef": {"name": "later", "key": "k"}}}],
    }))
    .unwrap();
    bed.add_ephemeral("later", &[c, debug("other", None)]).await;

    for message in [
        "configmap \"later\" not found",
        "couldn't find key k in ConfigMap default/later",
    ] {
        let st = bed
            .wait_status("later", "dbg", message, |s| {
                waiting(s) == Some(("CreateContainerConfigError", message))
            })
            .await;
        assert!(!is_running(&st));
        let ev = bed
            .wait_event("later", "dbg", "Failed", |m| {
                m == format!("Error: {message}")
            })
            .await;
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert!(bed.runtime_containers(&pod, "dbg").is_empty());
        // The other container of the pod is not held up.
        bed.wait_status("later", "other", "running", is_running)
            .await;
        if message.starts_with("configmap") {
            let _: ConfigMap = create(
                &bed,
                serde_json::json!({"metadata": {"name": "later"}, "data": {"j": "1"}}),
            )
            .await;
        }
    }
    Api::<ConfigMap>::namespaced(bed.api.client(), "default")
        .patch(
            "later",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"k": "found"}})),
        )
        .await
        .expect("key added");
    bed.wait_status("later", "dbg", "running", is_running).await;
    assert_eq!(
        env_of(&bed.only_container(&pod, "dbg")),
        [("K".to_string(), "found".to_string())]
    );
}

/// A mount of a volume the pod does not have (a spec the API server should
/// have refused) is a `CreateContainerConfigError` with kube-apiserver's
/// message and one Warning Event; the pod's other container starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_of_a_volume_the_pod_lacks_is_a_config_error() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("novol")).await;
    let mut bad = debug("bad", Some("app"));
    bad.volume_mounts = Some(vec![VolumeMount {
        name: "nosuch".into(),
        mount_path: "/data".into(),
        ..Default::default()
    }]);
    let mut stored = bed.pod("novol");
    let ecs: Vec<EphemeralContainer> = [bad, debug("good", Some("app"))]
        .into_iter()
        .map(|mut c| {
            validation::default_ephemeral_container(&mut c);
            c
        })
        .collect();
    stored.spec.as_mut().expect("spec").ephemeral_containers = Some(ecs);
    bed.api.put_pod_unchecked(stored);

    let message = "spec.ephemeralContainers[0].volumeMounts[0].name: Not found: \"nosuch\"";
    let st = bed
        .wait_status("novol", "bad", "waiting CreateContainerConfigError", |s| {
            waiting_reason(s) == Some("CreateContainerConfigError")
        })
        .await;
    assert_eq!(waiting(&st), Some(("CreateContainerConfigError", message)));
    let ev = bed
        .wait_event("novol", "bad", "Failed", |m| {
            m == format!("Error: {message}")
        })
        .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    bed.wait_status("novol", "good", "running", is_running)
        .await;
    assert!(bed.runtime_containers(&pod, "bad").is_empty());
}

/// A `persistentVolumeClaim` volume is mounted from where the kubelet's CSI
/// plugin mounted the bound volume (`kubernetes.io~csi/<pv>/mount`); a claim
/// that is not bound is a clear `CreateContainerConfigError`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_mount_the_bound_persistent_volume() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pv-data"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "csi": {"driver": "example.csi.k8s.io", "volumeHandle": "vol-1"}},
    }))
    .unwrap();
    Api::<PersistentVolume>::all(bed.api.client())
        .create(&PostParams::default(), &pv)
        .await
        .expect("persistent volume created");
    let _: PersistentVolumeClaim = create(
        &bed,
        serde_json::json!({"metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": "pv-data",
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound"}}),
    )
    .await;
    let _: PersistentVolumeClaim = create(
        &bed,
        serde_json::json!({"metadata": {"name": "waiting"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Pending"}}),
    )
    .await;
    let mut app = app_pod("claims");
    app.spec.as_mut().unwrap().volumes = Some(
        serde_json::from_value(serde_json::json!([
            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            {"name": "pending", "persistentVolumeClaim": {"claimName": "waiting"}},
        ]))
        .unwrap(),
    );
    let (pod, _) = bed.run_pod(app).await;
    // The kubelet's CSI plugin would have mounted the volume here.
    let mounted =
        kubelet::pod_dir(&bed.dirs.pods, &pod).join("volumes/kubernetes.io~csi/pv-data/mount");
    std::fs::create_dir_all(&mounted).unwrap();

    let mut dbg = debug("dbg", Some("app"));
    dbg.volume_mounts = Some(vec![VolumeMount {
        name: "data".into(),
        mount_path: "/data".into(),
        read_only: Some(true),
        ..Default::default()
    }]);
    let mut dbg2 = debug("dbg2", Some("app"));
    dbg2.volume_mounts = Some(vec![VolumeMount {
        name: "pending".into(),
        mount_path: "/data".into(),
        ..Default::default()
    }]);
    bed.add_ephemeral("claims", &[dbg, dbg2]).await;

    bed.wait_status("claims", "dbg", "running", is_running)
        .await;
    let mount = bed
        .only_container(&pod, "dbg")
        .config
        .mounts
        .into_iter()
        .find(|m| m.container_path == "/data")
        .expect("the claim is mounted");
    assert_eq!(mount.host_path, mounted.display().to_string());
    assert!(mount.readonly);

    let message =
        "volume \"pending\": persistentvolumeclaim \"waiting\" is not bound to a persistent volume";
    bed.wait_status("claims", "dbg2", message, |s| {
        waiting(s) == Some(("CreateContainerConfigError", message))
    })
    .await;
    bed.wait_event("claims", "dbg2", "Failed", |m| {
        m == format!("Error: {message}")
    })
    .await;
    assert!(bed.runtime_containers(&pod, "dbg2").is_empty());
}

/// `imagePullSecrets` become CRI credentials for the image's registry: a
/// private image pulls with the pod's secret and is refused without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pull_secrets_are_the_pulls_credentials() {
    const IMAGE: &str = "registry.example/team/tool:2";
    let mut bed = Bed::new().await;
    bed.fake
        .add_to_registry(FakeImage::new(IMAGE).with_auth("me", "secret"));
    bed.start_agent(Opts::default()).await;
    let config = serde_json::json!({"auths": {"registry.example": {"username": "me", "password": "secret"}}});
    let _: Secret = create(
        &bed,
        serde_json::json!({"metadata": {"name": "regcred"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": config.to_string()}}),
    )
    .await;

    let mut with_secret = app_pod("private");
    with_secret.spec.as_mut().unwrap().image_pull_secrets = Some(vec![LocalObjectReference {
        name: "regcred".into(),
    }]);
    let (pod, _) = bed.run_pod(with_secret).await;
    bed.run_pod(app_pod("public")).await;
    let mut c = debug("dbg", Some("app"));
    c.image = Some(IMAGE.into());
    // Without credentials first: once pulled, the image is on the node for every pod.
    bed.add_ephemeral("public", std::slice::from_ref(&c)).await;
    let st = bed
        .wait_status("public", "dbg", "waiting on the image", |s| {
            matches!(waiting_reason(s), Some("ErrImagePull" | "ImagePullBackOff"))
        })
        .await;
    let (_, message) = waiting(&st).unwrap();
    assert!(
        message.contains("pull access denied"),
        "no credentials, no pull: {message}"
    );
    assert!(
        bed.fake
            .images()
            .iter()
            .all(|i| i.references.iter().all(|r| !r.contains("registry.example")))
    );

    bed.add_ephemeral("private", &[c]).await;
    bed.wait_status("private", "dbg", "running", is_running)
        .await;
    assert_eq!(
        bed.only_container(&pod, "dbg").image_ref,
        bed.image_id(IMAGE)
    );
    bed.wait_event("private", "dbg", "Pulled", |m| {
        m.starts_with(&format!("Successfully pulled image \"{IMAGE}\""))
    })
    .await;
}

/// `resourceFieldRef` of an ephemeral container (which has no resources):
/// requests read 0 and limits the node's allocatable, read from the Node,
/// divided by the divisor and rounded up, as the kubelet's downward API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_field_refs_read_the_nodes_allocatable() {
    let mut bed = Bed::new().await;
    bed.start_agent(Opts::default()).await;
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": NODE},
        "status": {"allocatable": {"cpu": "3500m", "memory": "7Gi", "pods": "110"}},
    }))
    .unwrap();
    Api::<Node>::all(bed.api.client())
        .create(&PostParams::default(), &node)
        .await
        .expect("node created");
    let (pod, _) = bed.run_pod(app_pod("res")).await;
    let c: EphemeralContainer = serde_json::from_value(serde_json::json!({
        "name": "dbg", "image": BUSYBOX_IMAGE, "command": ["sh"],
        "env": [
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory"}}},
        ],
    }))
    .unwrap();
    bed.add_ephemeral("res", &[c]).await;
    bed.wait_status("res", "dbg", "running", is_running).await;
    let want: Vec<(String, String)> = [("CPU", "4"), ("MEM_MI", "7168"), ("REQ", "0")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(env_of(&bed.only_container(&pod, "dbg")), want);
}

/// The metrics follow one container from the watch event to its terminated
/// status, each phase once, and its timeline holds the same instants in
/// order; a CRI failure is counted by RPC and code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_timeline_follow_a_container_from_watch_event_to_terminated() {
    let mut bed = Bed::new().await;
    bed.fake.serve_container_events(true);
    let agent = bed.start_agent(Opts::default()).await;
    let (pod, _) = bed.run_pod(app_pod("phases")).await;
    eventually("the agent to subscribe to CRI events", WAIT, || {
        (bed.calls("GetContainerEvents") > 0).then_some(())
    })
    .await;

    bed.add_ephemeral("phases", &[debug("dbg", Some("app"))])
        .await;
    bed.wait_status("phases", "dbg", "running", is_running)
        .await;
    let dbg = bed.only_container(&pod, "dbg");
    bed.fake.exit(&dbg.id, 0);
    bed.wait_status("phases", "dbg", "terminated", |s| exit_code(s).is_some())
        .await;

    let count = |text: &str, phase: &str| {
        let key = format!("ephemerald_start_phase_seconds_count{{phase=\"{phase}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(|v| v.trim().to_string())
    };
    let text = eventually("the terminated status to be timed", WAIT, || {
        let text = agent.metrics.encode();
        count(&text, "exit_to_status").map(|_| text)
    })
    .await;
    for phase in [
        "event_to_create",
        "image",
        "create",
        "start",
        "start_to_status",
        "exit_to_status",
    ] {
        assert_eq!(count(&text, phase).as_deref(), Some("1"), "{phase}\n{text}");
    }
    // Every watch event is taken by a pass (our own status write's last).
    eventually("the reconcile queue to drain", WAIT, || {
        (agent.metrics.queue_depth.get() == 0).then_some(())
    })
    .await;

    let t = agent
        .timelines()
        .into_iter()
        .find(|t| t.container == "dbg")
        .expect("a timeline for dbg");
    let at = |name: &str, v: Option<SystemTime>| v.unwrap_or_else(|| panic!("{name}: {t:?}"));
    let issued = at("create_issued", t.create_issued);
    let started = at("started", t.started);
    let running = at("running_written", t.running_written);
    let exited = at("exited", t.exited);
    let terminated = at("terminated_written", t.terminated_written);
    assert!(
        t.seen <= issued && issued <= started && started <= running,
        "{t:?}"
    );
    assert!(exited <= terminated, "{t:?}");

    // A failed StartContainer is counted with its RPC and code.
    bed.fake
        .fail_next("StartContainer", Code::Unknown, RUNC_FAILURE);
    bed.add_ephemeral("phases", &[debug("dbg2", Some("app"))])
        .await;
    bed.wait_event("phases", "dbg2", "Failed", |m| m.starts_with("Error: "))
        .await;
    let text = agent.metrics.encode();
    assert!(
        text.contains(
            r#"ephemerald_errors_total{source="cri",call="StartContainer",code="Unknown"} 1"#
        ),
        "{text}"
    );
}
