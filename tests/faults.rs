//! Faults, end to end: the agent (the binary as a process, or in-process
//! where its runtime calls are counted) against real containerd + runc and
//! the local API server, while something goes wrong — containerd restarts,
//! the agent is SIGKILLed mid-burst, the API server is unreachable or
//! refuses status writes, pod events flood in. Each test asserts that no
//! ephemeral container is lost or duplicated and every status converges.
//! Fails, never skips, when containerd is missing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{
    AgentProc, app_pod, debug_container, running, runtime_containers, stack, status_of, terminated,
};
use ephemerald::config::Mode;
use ephemerald::cri::proto::{self, ContainerFilter, ContainerState};
use ephemerald::cri::{CriClient, CriError, Runtime};
use ephemerald::kubelet;
use ephemerald_testbed::stack::Stack;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rand::{Rng, SeedableRng};

const WAIT: Duration = Duration::from_secs(40);

async fn add(stack: &Stack, pod: &str, name: &str, target: Option<&str>, script: &str) {
    stack
        .add_ephemeral("default", pod, &debug_container(name, target, script))
        .await
        .unwrap();
}

async fn wait_for<T>(
    stack: &Stack,
    pod: &str,
    what: &str,
    agent: Option<&AgentProc>,
    f: impl FnMut(&Pod) -> Option<T>,
) -> T {
    stack
        .wait_pod("default", pod, what, WAIT, f)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}; agent log:\n{}",
                agent.map(AgentProc::log).unwrap_or_default()
            )
        })
}

/// Polls `f` until it holds, failing with `what` after [`WAIT`].
async fn until(what: &str, agent: &AgentProc, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Events about ephemeral container `name`: (reason, message).
fn events_of(stack: &Stack, name: &str) -> Vec<(String, String)> {
    let path = format!("spec.ephemeralContainers{{{name}}}");
    stack
        .api
        .events()
        .into_iter()
        .filter(|e| e.involved_object.field_path.as_deref() == Some(path.as_str()))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// The API status of `name` agrees with the runtime's only container of
/// that name: running and RUNNING, or terminated with its exit code.
async fn assert_converged(stack: &Stack, pod: &Pod, name: &str) {
    let found = runtime_containers(stack.cri.as_ref(), kubelet::uid(pod), name).await;
    assert_eq!(
        found.len(),
        1,
        "{name}: exactly one runtime container, got {found:?}"
    );
    let rc = stack
        .cri
        .container_status(&found[0].id, false)
        .await
        .unwrap()
        .status
        .unwrap();
    let st = status_of(pod, name).unwrap_or_else(|| panic!("{name}: no API status"));
    assert_eq!(
        st.container_id.as_deref(),
        Some(format!("containerd://{}", rc.id).as_str()),
        "{name}: containerID"
    );
    let state = st.state.unwrap();
    match (state.running.clone(), state.terminated.clone()) {
        (Some(_), None) => assert_eq!(
            rc.state,
            ContainerState::ContainerRunning as i32,
            "{name}: running in the API, not in the runtime"
        ),
        (None, Some(t)) => {
            assert_eq!(
                rc.state,
                ContainerState::ContainerExited as i32,
                "{name}: state"
            );
            assert_eq!(t.exit_code, rc.exit_code, "{name}: exit code");
        }
        _ => {
            // A start the runtime refused: waiting RunContainerError with the
            // exited container as the last state, as the kubelet shows it.
            assert!(
                start_refused(pod, name),
                "{name}: neither running, terminated nor a refused start: {state:?}"
            );
            let last = st.last_state.unwrap().terminated.unwrap();
            assert_eq!(rc.state, ContainerState::ContainerExited as i32);
            assert_eq!(last.exit_code, rc.exit_code, "{name}: exit code");
        }
    }
}

/// `name` shows a start the runtime refused: waiting `RunContainerError`
/// with the exited container as its last state. Final: never retried.
fn start_refused(pod: &Pod, name: &str) -> bool {
    status_of(pod, name).is_some_and(|s| {
        let waiting = s.state.as_ref().and_then(|st| st.waiting.as_ref());
        waiting.and_then(|w| w.reason.as_deref()) == Some("RunContainerError")
            && s.last_state
                .as_ref()
                .is_some_and(|l| l.terminated.is_some())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restart_reconnects_with_backoff_and_starts_what_was_appended_meanwhile() {
    let mut stack = stack("f-ctrd").await;
    // A resync far beyond the test: only the agent's reconnects can work.
    let agent = AgentProc::start(&stack, "300s");
    let (pod, _) = stack.run_pod(app_pod("web")).await.unwrap();
    add(&stack, "web", "before", Some("app"), "sleep 600").await;
    let before = wait_for(&stack, "web", "before running", Some(&agent), |p| {
        running(p, "before")
    })
    .await;

    stack.containerd.stop_daemon().await.unwrap();
    add(&stack, "web", "during", Some("app"), "sleep 1; exit 7").await;
    // The agent tries, says why the container cannot start, and backs off.
    until("three failed passes", &agent, async || {
        agent.lines("reconcile failed; retrying").len() >= 3
    })
    .await;
    until(
        "a Failed event on the appended container",
        &agent,
        async || {
            events_of(&stack, "during").iter().any(|(r, m)| {
                r == "Failed" && m.starts_with("Error: container runtime is unavailable")
            })
        },
    )
    .await;
    assert!(
        !events_of(&stack, "before")
            .iter()
            .any(|(r, _)| r == "Failed"),
        "a container that runs is not reported as failing"
    );
    let delays: Vec<u64> = agent
        .lines("reconcile failed; retrying")
        .iter()
        .map(|f| f["retry_in_ms"].as_u64().unwrap())
        .collect();
    assert!(delays[0] <= 1600, "first retry within 1.6 s: {delays:?}");
    assert!(
        delays.windows(2).all(|w| w[0] <= w[1]),
        "delays grow: {delays:?}"
    );

    stack.containerd.start_daemon().await.unwrap();
    // Started once containerd is back; its exit reaches the API through the
    // re-opened exit stream (the resync is minutes away).
    let done = wait_for(&stack, "web", "during terminated", Some(&agent), |p| {
        terminated(p, "during").map(|_| p.clone())
    })
    .await;
    let t = terminated(&done, "during").unwrap().state.unwrap();
    assert_eq!(t.terminated.unwrap().exit_code, 7);
    assert!(
        stack.api.status_history("default", "web").iter().any(|r| {
            r.ephemeral_container_statuses.iter().any(|s| {
                s.name == "during" && s.state.as_ref().is_some_and(|st| st.running.is_some())
            })
        }),
        "reported running first"
    );
    assert_converged(&stack, &done, "during").await;
    // The container that ran across the restart is untouched.
    assert_converged(&stack, &done, "before").await;
    assert_eq!(status_of(&done, "before").unwrap(), before);
    assert_eq!(
        runtime_containers(stack.cri.as_ref(), kubelet::uid(&pod), "before")
            .await
            .len(),
        1
    );
    assert!(stack.api.rejected_status_writes().is_empty());
    drop(agent);
    stack.teardown().await.unwrap();
}

const RUNS_ON: &str = "sleep 600";

/// What container `i` of round `round` runs: some run on, some exit at once
/// or soon; two in three target the app.
fn kind(round: usize, i: usize) -> (Option<&'static str>, &'static str) {
    match (round + i) % 3 {
        0 => (Some("app"), RUNS_ON),
        1 => (None, "exit 3"),
        _ => (Some("app"), "sleep 0.3"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkilled_at_random_points_of_bursts_starts_each_container_exactly_once() {
    const ROUNDS: usize = 20;
    const PODS: [&str; 3] = ["p0", "p1", "p2"];
    const PER_POD: usize = 2;
    let seed: u64 = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("FAULTS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let stack = stack("f-kill").await;
    let mut pods = Vec::new();
    for name in PODS {
        pods.push(stack.run_pod(app_pod(name)).await.unwrap().0);
    }
    let mut agent = AgentProc::start(&stack, "2s");
    // (name, runs on): the others exit by themselves and end terminated.
    let mut names: Vec<(String, bool)> = Vec::new();
    let mut kill_ms = Vec::new();
    // What the kills left behind: starts containerd aborted, containers
    // left CREATED that the next agent started.
    let mut aborted = std::collections::BTreeSet::new();
    let mut refused = std::collections::BTreeSet::new();
    let mut resumed = 0;
    for round in 0..ROUNDS {
        // A burst of appends across the pods, the agent killed at a random
        // moment from its start to well after the burst.
        let delay = Duration::from_millis(rng.random_range(0..600));
        kill_ms.push(delay.as_millis() as u64);
        let burst = async {
            for i in 0..PER_POD {
                for pod in PODS {
                    let name = format!("r{round}c{i}");
                    let (target, script) = kind(round, i);
                    add(&stack, pod, &name, target, script).await;
                }
            }
        };
        let killer = async {
            tokio::time::sleep(delay).await;
            agent.kill();
        };
        tokio::join!(burst, killer);
        resumed += agent
            .lines("created but never started (its creator stopped half-way); starting it")
            .len();
        for i in 0..PER_POD {
            names.push((format!("r{round}c{i}"), kind(round, i).1 == RUNS_ON));
        }
        agent = AgentProc::start(&stack, "2s");
        for pod in PODS {
            let want = names.clone();
            let converged = wait_for(
                &stack,
                pod,
                &format!(
                    "round {round} (seed {seed}): every container of {pod} running or terminated"
                ),
                Some(&agent),
                |p| {
                    want.iter()
                        .all(|(n, runs_on)| {
                            terminated(p, n).is_some()
                                || (*runs_on && running(p, n).is_some())
                                || start_refused(p, n)
                        })
                        .then(|| p.clone())
                },
            )
            .await;
            for (name, runs_on) in &names {
                assert_converged(&stack, &converged, name).await;
                // A long-running one ends only if the kill hit its start:
                // containerd aborts a start whose caller went away.
                if start_refused(&converged, name) {
                    refused.insert((pod, name.clone()));
                }
                if let (true, Some(t)) = (runs_on, terminated(&converged, name)) {
                    let t = t.state.unwrap().terminated.unwrap();
                    assert_eq!(t.exit_code, 128, "seed {seed}: {name} of {pod}: {t:?}");
                    aborted.insert((pod, name.clone()));
                }
            }
        }
    }
    println!(
        "FAULTS_SEED={seed} kill delays (ms): {kill_ms:?}; {} containers in {} pods; \
         starts aborted by a kill: {}; created-only containers started by the next agent: {resumed}; \
         starts the runtime refused: {refused:?}",
        names.len() * PODS.len(),
        PODS.len(),
        aborted.len()
    );
    // Nothing was started twice meanwhile, and no status was refused.
    for pod in &pods {
        for (name, _) in &names {
            assert_eq!(
                runtime_containers(stack.cri.as_ref(), kubelet::uid(pod), name)
                    .await
                    .len(),
                1,
                "seed {seed}: {name} of {}",
                kubelet::name(pod)
            );
        }
    }
    assert!(
        stack.api.rejected_status_writes().is_empty(),
        "seed {seed}: {:?}",
        stack.api.rejected_status_writes()
    );
    drop(agent);
    stack.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_unreachable_status_and_events_are_retried_and_nothing_is_lost() {
    let stack = stack("f-api").await;
    let agent = AgentProc::start(&stack, "300s");
    let (pod, _) = stack.run_pod(app_pod("web")).await.unwrap();
    // `waiter` exits 7 when told to; `late` waits for its image.
    add(
        &stack,
        "web",
        "waiter",
        Some("app"),
        "while [ ! -e /tmp/go ]; do sleep 0.05; done; exit 7",
    )
    .await;
    let waiter = wait_for(&stack, "web", "waiter running", Some(&agent), |p| {
        running(p, "waiter")
    })
    .await;
    const LATE_IMAGE: &str = "ephemerald.local/late:1.0";
    let mut late = debug_container("late", Some("app"), "sleep 600");
    late.image = Some(LATE_IMAGE.into());
    stack.add_ephemeral("default", "web", &late).await.unwrap();
    wait_for(&stack, "web", "late ErrImageNeverPull", Some(&agent), |p| {
        let w = status_of(p, "late")?.state?.waiting?;
        (w.reason.as_deref() == Some("ErrImageNeverPull")).then_some(())
    })
    .await;

    stack.api.stop_serving().await;
    // While the API server is away: waiter exits, late's image appears and
    // the agent's retry starts it.
    let waiter_id = waiter
        .container_id
        .unwrap()
        .trim_start_matches("containerd://")
        .to_string();
    let pid = common::host_pid(stack.cri.as_ref(), &waiter_id).await;
    std::fs::write(format!("/proc/{pid}/root/tmp/go"), b"").unwrap();
    let out = Command::new("ctr")
        .arg("-a")
        .arg(stack.containerd.socket())
        .args([
            "-n",
            "k8s.io",
            "images",
            "tag",
            ephemerald_testbed::images::BUSYBOX_IMAGE,
            LATE_IMAGE,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let uid = kubelet::uid(&pod).to_string();
    until("late running in the runtime", &agent, async || {
        runtime_containers(stack.cri.as_ref(), &uid, "late")
            .await
            .iter()
            .any(|c| c.state == ContainerState::ContainerRunning as i32)
    })
    .await;
    until("waiter exited in the runtime", &agent, async || {
        runtime_containers(stack.cri.as_ref(), &uid, "waiter")
            .await
            .iter()
            .any(|c| c.state == ContainerState::ContainerExited as i32)
    })
    .await;
    // The agent tried to write both and could not.
    until("status writes that failed", &agent, async || {
        agent
            .lines("reconcile failed; retrying")
            .iter()
            .filter(|f| f["error"].as_str().unwrap_or("").contains("patch status"))
            .count()
            >= 2
    })
    .await;
    let writes_before = stack.api.status_history("default", "web").len();

    stack.api.serve_again().await;
    let done = wait_for(
        &stack,
        "web",
        "waiter terminated and late running",
        Some(&agent),
        |p| (terminated(p, "waiter").is_some() && running(p, "late").is_some()).then(|| p.clone()),
    )
    .await;
    assert!(stack.api.status_history("default", "web").len() > writes_before);
    let t = terminated(&done, "waiter")
        .unwrap()
        .state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(t.exit_code, 7);
    assert_converged(&stack, &done, "waiter").await;
    assert_converged(&stack, &done, "late").await;
    // The events of late's start, recorded while the server was away.
    until("late's Created and Started events", &agent, async || {
        let events = events_of(&stack, "late");
        ["Created", "Started"]
            .iter()
            .all(|want| events.iter().any(|(r, _)| r == want))
    })
    .await;
    assert!(stack.api.rejected_status_writes().is_empty());
    drop(agent);
    stack.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_status_writes_are_retried_from_fresh_state() {
    let stack = stack("f-conflict").await;
    let agent = AgentProc::start(&stack, "300s");
    let (pod, _) = stack.run_pod(app_pod("web")).await.unwrap();
    const CONFLICTS: usize = 3;
    stack.api.conflict_next_status_writes(CONFLICTS);
    add(&stack, "web", "one", Some("app"), "sleep 600").await;
    until("the first refused write", &agent, async || {
        !stack.api.conflicted_status_writes().is_empty()
    })
    .await;
    // The pod changes while the agent is refused: its retry must see it.
    add(&stack, "web", "two", None, "sleep 600").await;
    let done = wait_for(&stack, "web", "one and two running", Some(&agent), |p| {
        (running(p, "one").is_some() && running(p, "two").is_some()).then(|| p.clone())
    })
    .await;
    let refused = stack.api.conflicted_status_writes();
    assert_eq!(refused.len(), CONFLICTS, "{refused:?}");
    assert!(refused.iter().all(|(pod, _)| pod == "default/web"));
    assert!(
        refused[0].1.iter().any(|s| s.name == "one"),
        "the refused write carried one's status: {refused:?}"
    );
    // Every accepted write came after the refusals and shows what the
    // runtime held then: the newest has both, each once in the runtime.
    assert_converged(&stack, &done, "one").await;
    assert_converged(&stack, &done, "two").await;
    let retries = agent.lines("reconcile failed; retrying");
    assert!(
        retries.len() >= CONFLICTS
            && retries
                .iter()
                .all(|f| f["error"].as_str().unwrap_or("").contains("409")),
        "{retries:?}"
    );
    assert_eq!(
        runtime_containers(stack.cri.as_ref(), kubelet::uid(&pod), "one")
            .await
            .len(),
        1
    );
    assert!(stack.api.rejected_status_writes().is_empty());
    drop(agent);
    stack.teardown().await.unwrap();
}

/// The real CRI client, counting the calls made for each pod (by the
/// `io.kubernetes.pod.uid` of list filters and created containers, or the
/// container id of per-container calls).
struct Counting {
    inner: Arc<CriClient>,
    calls: Mutex<Vec<(&'static str, String)>>,
}

impl Counting {
    fn note(&self, call: &'static str, key: impl Into<String>) {
        self.calls.lock().unwrap().push((call, key.into()));
    }

    fn calls(&self) -> Vec<(&'static str, String)> {
        self.calls.lock().unwrap().clone()
    }
}

fn uid_of(labels: &HashMap<String, String>) -> String {
    labels
        .get(kubelet::POD_UID_LABEL)
        .cloned()
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl Runtime for Counting {
    async fn version(&self) -> Result<proto::VersionResponse, CriError> {
        self.inner.version().await
    }
    async fn run_pod_sandbox(&self, config: proto::PodSandboxConfig) -> Result<String, CriError> {
        self.note("RunPodSandbox", "");
        self.inner.run_pod_sandbox(config).await
    }
    async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.note("StopPodSandbox", id);
        self.inner.stop_pod_sandbox(id).await
    }
    async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.note("RemovePodSandbox", id);
        self.inner.remove_pod_sandbox(id).await
    }
    async fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<proto::PodSandboxStatusResponse, CriError> {
        self.note("PodSandboxStatus", id);
        self.inner.pod_sandbox_status(id, verbose).await
    }
    async fn list_pod_sandbox(
        &self,
        filter: Option<proto::PodSandboxFilter>,
    ) -> Result<Vec<proto::PodSandbox>, CriError> {
        let uid = filter
            .as_ref()
            .map(|f| uid_of(&f.label_selector))
            .unwrap_or_default();
        self.note("ListPodSandbox", uid);
        self.inner.list_pod_sandbox(filter).await
    }
    async fn create_container(
        &self,
        sandbox_id: &str,
        config: proto::ContainerConfig,
        sandbox_config: proto::PodSandboxConfig,
    ) -> Result<String, CriError> {
        self.note("CreateContainer", uid_of(&config.labels));
        self.inner
            .create_container(sandbox_id, config, sandbox_config)
            .await
    }
    async fn start_container(&self, id: &str) -> Result<(), CriError> {
        self.note("StartContainer", id);
        self.inner.start_container(id).await
    }
    async fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<(), CriError> {
        self.note("StopContainer", id);
        self.inner.stop_container(id, timeout_secs).await
    }
    async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        self.note("RemoveContainer", id);
        self.inner.remove_container(id).await
    }
    async fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<proto::Container>, CriError> {
        let uid = filter
            .as_ref()
            .map(|f| uid_of(&f.label_selector))
            .unwrap_or_default();
        self.note("ListContainers", uid);
        self.inner.list_containers(filter).await
    }
    async fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<proto::ContainerStatusResponse, CriError> {
        self.note("ContainerStatus", id);
        self.inner.container_status(id, verbose).await
    }
    async fn container_events(
        &self,
    ) -> Result<BoxStream<'static, Result<proto::ContainerEventResponse, CriError>>, CriError> {
        self.inner.container_events().await
    }
    async fn image_status(
        &self,
        image: proto::ImageSpec,
    ) -> Result<Option<proto::Image>, CriError> {
        self.note("ImageStatus", image.image.clone());
        self.inner.image_status(image).await
    }
    async fn pull_image(
        &self,
        image: proto::ImageSpec,
        auth: Option<proto::AuthConfig>,
        sandbox_config: Option<proto::PodSandboxConfig>,
    ) -> Result<String, CriError> {
        self.note("PullImage", image.image.clone());
        self.inner.pull_image(image, auth, sandbox_config).await
    }
    async fn list_images(&self) -> Result<Vec<proto::Image>, CriError> {
        self.note("ListImages", "");
        self.inner.list_images().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_irrelevant_pod_events_make_no_runtime_calls() {
    const PLAIN: usize = 40;
    const ROUNDS: usize = 30;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,ephemerald=debug"))
        .with_test_writer()
        .try_init();
    let stack = stack("f-quiet").await;
    let counting = Arc::new(Counting {
        inner: Arc::new(
            stack
                .containerd
                .client()
                .unwrap()
                .with_timeout(Duration::from_secs(30)),
        ),
        calls: Mutex::default(),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let agent = tokio::spawn(ephemerald::run_with_runtime(
        stack.agent_config(Mode::Start, Duration::from_secs(300)),
        stack.api.client(),
        counting.clone(),
        shutdown.clone(),
        |_| {},
    ));

    // `busy` has nothing left to do: one ephemeral container runs, one ended.
    let (busy, _) = stack.run_pod(app_pod("busy")).await.unwrap();
    add(&stack, "busy", "dbg", Some("app"), "sleep 600").await;
    add(&stack, "busy", "done", None, "exit 0").await;
    let settled = stack
        .wait_pod(
            "default",
            "busy",
            "dbg running, done terminated",
            WAIT,
            |p| (running(p, "dbg").is_some() && terminated(p, "done").is_some()).then_some(()),
        )
        .await;
    if let Err(e) = settled {
        let status = stack.api.pod("default", "busy").and_then(|p| p.status);
        panic!("{e}; status: {status:#?}");
    }
    // Pods on this node without ephemeral containers (never run: nothing
    // asks the runtime about them, so the agent must not either).
    let pods: Api<Pod> = Api::namespaced(stack.api.client(), "default");
    let mut plain_uids = Vec::new();
    for i in 0..PLAIN {
        let mut p = app_pod(&format!("plain{i}"));
        p.spec.as_mut().unwrap().node_name = Some(stack.node.clone());
        let created = pods.create(&PostParams::default(), &p).await.unwrap();
        plain_uids.push(kubelet::uid(&created).to_string());
    }
    let before = counting.calls().len();

    // The flood: label, annotation and condition updates to every pod.
    let mut names: Vec<String> = (0..PLAIN).map(|i| format!("plain{i}")).collect();
    names.push("busy".into());
    let updates = (0..ROUNDS).flat_map(|round| names.iter().map(move |name| (round, name.clone())));
    let sent = futures::stream::iter(updates)
        .map(|(round, name)| {
            let pods = pods.clone();
            async move {
                let meta = serde_json::json!({"metadata": {
                    "labels": {"round": round.to_string()},
                    "annotations": {"example.com/seen": format!("{round}")},
                }});
                pods.patch(&name, &PatchParams::default(), &Patch::Merge(&meta))
                    .await
                    .unwrap();
                let cond = serde_json::json!({"status": {"conditions": [{
                    "type": "example.com/Probe", "status": if round % 2 == 0 { "True" } else { "False" },
                }]}});
                pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&cond))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(16)
        .count()
        .await;
    let events = sent * 2;
    assert!(events >= 2000, "{events} pod updates");

    // Then one change that matters, behind all of them in the watch: the
    // agent has seen the whole flood once it has run this.
    add(&stack, "busy", "last", None, "sleep 600").await;
    wait_for(&stack, "busy", "last running", None, |p| running(p, "last")).await;
    let during: Vec<(&'static str, String)> = counting.calls()[before..].to_vec();
    let mut per_call: BTreeMap<&str, usize> = BTreeMap::new();
    for (call, _) in &during {
        *per_call.entry(call).or_default() += 1;
    }
    println!("{events} pod updates; runtime calls meanwhile: {per_call:?}");

    assert!(
        !during.iter().any(|(_, key)| plain_uids.contains(key)),
        "pods without ephemeral containers cost runtime calls: {during:?}"
    );
    let busy_uid = kubelet::uid(&busy).to_string();
    assert_eq!(
        during
            .iter()
            .filter(|(c, _)| *c == "CreateContainer")
            .map(|(_, uid)| uid.as_str())
            .collect::<Vec<_>>(),
        [busy_uid.as_str()],
        "one create, for `last`"
    );
    assert_eq!(per_call.get("StartContainer"), Some(&1), "{per_call:?}");
    // `last` costs a few passes (the append, the status it wrote back);
    // the flood none.
    let lists = during
        .iter()
        .filter(|(c, uid)| *c == "ListContainers" && *uid == busy_uid)
        .count();
    assert!(lists <= 6, "{lists} ListContainers for busy: {per_call:?}");

    shutdown.cancel();
    agent.await.unwrap().unwrap();
    stack.teardown().await.unwrap();
}
