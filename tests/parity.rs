//! Kubelet parity on real containerd + runc, with the agent running
//! in-process against the local API server: targets that are not there yet
//! or were restarted, the pod's PID namespace modes, and living next to
//! another creator (adoption, `--mode auto` and the node Lease, `--mode
//! observe`). Fails, never skips, when containerd cannot start.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{
    app_pod, debug_container, host_pid, pid_ns, running, runtime_ids, stack, terminated,
    waiting_reason,
};
use ephemerald::config::Mode;
use ephemerald::cri::Runtime;
use ephemerald::cri::proto::ImageSpec;
use ephemerald::kubelet;
use ephemerald::reconcile::agent::{Agent, Creator};
use ephemerald::reconcile::translate::{self, HostFiles, ResolvedImage};
use ephemerald::validation;
use ephemerald_testbed::images::BUSYBOX_IMAGE;
use ephemerald_testbed::pod_runner::RunningPod;
use ephemerald_testbed::stack::Stack;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Container, ContainerStatus, EphemeralContainer, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// The agent, in-process on the stack's real containerd.
struct InProcess {
    agent: Arc<Agent>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ephemerald::Error>>,
}

impl InProcess {
    async fn start(stack: &Stack, mode: Mode) -> InProcess {
        let cancel = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(ephemerald::run_with_client(
            stack.agent_config(mode, Duration::from_secs(1)),
            stack.api.client(),
            cancel.clone(),
            move |h| {
                let _ = tx.send(h.agent);
            },
        ));
        let agent = tokio::time::timeout(WAIT, rx)
            .await
            .expect("the agent starts in time")
            .expect("the agent hands out its handles");
        InProcess {
            agent,
            cancel,
            task,
        }
    }

    /// Waits until `n` more reconcile passes began than now.
    async fn passes(&self, n: u64) {
        let from = self.agent.metrics.reconciles.get();
        let deadline = Instant::now() + WAIT;
        while self.agent.metrics.reconciles.get() <= from + n {
            assert!(Instant::now() < deadline, "{n} more reconcile passes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        let ended = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the agent stops in time")
            .expect("the agent did not panic");
        assert!(ended.is_ok(), "the agent stopped with {ended:?}");
    }
}

async fn wait_running(stack: &Stack, pod: &str, name: &str) -> ContainerStatus {
    stack
        .wait_pod(
            "default",
            pod,
            &format!("{pod}/{name} running"),
            WAIT,
            |p| running(p, name),
        )
        .await
        .unwrap()
}

/// Creates (and starts) a container in the pod's sandbox the way a kubelet
/// does: its labels, this attempt, the image by id, the PID target given.
async fn create_as_kubelet(
    stack: &Stack,
    pod: &Pod,
    running: &RunningPod,
    c: &EphemeralContainer,
    attempt: u32,
    target_id: Option<&str>,
) -> String {
    let image = stack
        .cri
        .image_status(ImageSpec {
            image: c.image.clone().unwrap_or_default(),
            ..Default::default()
        })
        .await
        .unwrap()
        .expect("image on the node");
    std::fs::create_dir_all(kubelet::container_log_dir(
        &stack.dirs.pod_logs,
        pod,
        &c.name,
    ))
    .unwrap();
    let config = translate::container_config(&translate::Inputs {
        pod,
        container: c,
        target_id,
        image: &ResolvedImage {
            id: image.id,
            ..Default::default()
        },
        attempt,
        host_files: &HostFiles::default(),
        node: &stack.dirs,
    })
    .expect("container config");
    let id = stack
        .cri
        .create_container(&running.sandbox_id, config, running.sandbox_config.clone())
        .await
        .expect("CreateContainer by the other creator");
    stack
        .cri
        .start_container(&id)
        .await
        .expect("StartContainer by the other creator");
    id
}

/// A regular container of the pod spec in its ephemeral form (the same
/// fields), for restarting it like the kubelet would.
fn as_ephemeral(c: &Container) -> EphemeralContainer {
    serde_json::from_value(serde_json::to_value(c).unwrap()).unwrap()
}

/// The debug container as the API server stores it (defaults applied), so
/// an outside creator computes the same container hash as the agent.
fn stored(name: &str, target: Option<&str>, script: &str) -> EphemeralContainer {
    let mut c = debug_container(name, target, script);
    validation::default_ephemeral_container(&mut c);
    c
}

fn events_of(stack: &Stack, pod: &str, container: &str) -> Vec<(String, String)> {
    let path = format!("spec.ephemeralContainers{{{container}}}");
    stack
        .api
        .events()
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(pod)
                && e.involved_object.field_path.as_deref() == Some(path.as_str())
        })
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Waits for an Event of the container that `f` accepts (the agent writes
/// Events in the background).
async fn wait_event(
    stack: &Stack,
    pod: &str,
    container: &str,
    f: impl Fn(&(String, String)) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !events_of(stack, pod, container).iter().any(&f) {
        assert!(
            Instant::now() < deadline,
            "no such Event of {pod}/{container}: {:?}",
            events_of(stack, pod, container)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Targets.

/// The target has no runtime container yet (its pod is still in its init
/// container): `CreateContainerConfigError` "unable to find target
/// container app", retried, and once the app runs the debug container
/// starts in the app's PID namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_not_started_yet_is_a_config_error_then_starts_in_its_namespace() {
    let stack = stack("par-tgt-late").await;
    let agent = InProcess::start(&stack, Mode::Start).await;
    let mut pod = app_pod("late");
    pod.spec.as_mut().unwrap().init_containers = Some(vec![Container {
        name: "init".into(),
        image: Some(BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("Never".into()),
        command: Some(vec!["sh".into(), "-c".into(), "sleep 4".into()]),
        ..Default::default()
    }]);

    let appended = async {
        stack
            .wait_pod("default", "late", "the pod in the API", WAIT, |p| {
                Some(p.clone())
            })
            .await
            .unwrap();
        stack
            .add_ephemeral(
                "default",
                "late",
                &debug_container("dbg", Some("app"), "sleep 60"),
            )
            .await
            .unwrap();
        stack
            .wait_pod("default", "late", "dbg waiting on its target", WAIT, |p| {
                waiting_reason(p, "dbg").filter(|(r, _)| r == "CreateContainerConfigError")
            })
            .await
            .unwrap()
    };
    let (ran, (reason, message)) = tokio::join!(stack.run_pod(pod), appended);
    let (pod, running_pod) = ran.unwrap();
    assert_eq!(reason, "CreateContainerConfigError");
    assert_eq!(message, "unable to find target container app");
    wait_event(&stack, "late", "dbg", |(r, m)| {
        r == "Failed" && m == "Error: unable to find target container app"
    })
    .await;

    let st = wait_running(&stack, "late", "dbg").await;
    let id = st.container_id.unwrap();
    assert_eq!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg").await,
        [id.trim_start_matches("containerd://")]
    );
    let app_id = &running_pod.containers["app"];
    assert_eq!(
        pid_ns(host_pid(stack.cri.as_ref(), id.trim_start_matches("containerd://")).await),
        pid_ns(host_pid(stack.cri.as_ref(), app_id).await),
        "in the app's PID namespace"
    );
    agent.stop().await;
    stack.teardown().await.unwrap();
}

/// The target exited (crash-looping): the runtime refuses to join its PID
/// namespace → `CreateContainerError`, retried with backoff. When the
/// kubelet restarts the target (a new container, attempt 1), the next try
/// uses the new container's id and succeeds — one debug container in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exited_target_is_create_container_error_until_it_is_restarted() {
    let stack = stack("par-tgt-exit").await;
    let agent = InProcess::start(&stack, Mode::Start).await;
    let (pod, running_pod) = stack.run_pod(app_pod("crash")).await.unwrap();
    let old_app = running_pod.containers["app"].clone();
    stack.cri.stop_container(&old_app, 0).await.unwrap();

    stack
        .add_ephemeral(
            "default",
            "crash",
            &debug_container("dbg", Some("app"), "sleep 60"),
        )
        .await
        .unwrap();
    let (reason, message) = stack
        .wait_pod("default", "crash", "CreateContainerError", WAIT, |p| {
            waiting_reason(p, "dbg").filter(|(r, _)| r == "CreateContainerError")
        })
        .await
        .unwrap();
    assert_eq!(reason, "CreateContainerError");
    assert!(!message.is_empty(), "the runtime's reason is shown");
    wait_event(&stack, "crash", "dbg", |(r, m)| {
        r == "Failed" && m.starts_with("Error: ")
    })
    .await;
    assert!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg")
            .await
            .is_empty()
    );

    // The kubelet restarts the app: attempt 1, a new container id.
    let app_spec = pod.spec.as_ref().unwrap().containers[0].clone();
    let new_app = create_as_kubelet(
        &stack,
        &pod,
        &running_pod,
        &as_ephemeral(&app_spec),
        1,
        None,
    )
    .await;
    assert_ne!(new_app, old_app);

    let st = wait_running(&stack, "crash", "dbg").await;
    let id = st.container_id.unwrap();
    let id = id.trim_start_matches("containerd://");
    assert_eq!(runtime_ids(stack.cri.as_ref(), &pod, "dbg").await, [id]);
    assert_eq!(
        pid_ns(host_pid(stack.cri.as_ref(), id).await),
        pid_ns(host_pid(stack.cri.as_ref(), &new_app).await),
        "in the restarted app's PID namespace"
    );
    let history: Vec<String> = stack
        .api
        .status_history("default", "crash")
        .iter()
        .filter_map(|r| {
            let s = r
                .ephemeral_container_statuses
                .iter()
                .find(|s| s.name == "dbg")?;
            let st = s.state.as_ref()?;
            Some(match (&st.waiting, &st.running) {
                (Some(w), _) => w.reason.clone().unwrap_or_default(),
                (_, Some(_)) => "running".into(),
                _ => "terminated".into(),
            })
        })
        .collect();
    assert_eq!(history.last().map(String::as_str), Some("running"));
    assert!(
        history.iter().any(|r| r == "CreateContainerError"),
        "{history:?}"
    );
    agent.stop().await;
    stack.teardown().await.unwrap();
}

/// `hostPID` puts the debug container in the node's PID namespace (the
/// target does not change that); `shareProcessNamespace` puts it in the
/// pod's, which the app shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_pid_and_shared_process_namespace_pods() {
    let stack = stack("par-pidns").await;
    let agent = InProcess::start(&stack, Mode::Start).await;

    let mut host = app_pod("hostpid");
    host.spec.as_mut().unwrap().host_pid = Some(true);
    let mut shared = app_pod("shared");
    shared.spec.as_mut().unwrap().share_process_namespace = Some(true);
    let (_, host_running) = stack.run_pod(host).await.unwrap();
    let (_, shared_running) = stack.run_pod(shared).await.unwrap();
    for pod in ["hostpid", "shared"] {
        stack
            .add_ephemeral(
                "default",
                pod,
                &debug_container("dbg", Some("app"), "sleep 60"),
            )
            .await
            .unwrap();
    }

    // The node's PID namespace is this test process's (containerd runs
    // hostPID containers in the namespace it lives in).
    let node_ns = pid_ns(std::process::id());
    let id = |st: ContainerStatus| {
        st.container_id
            .unwrap()
            .trim_start_matches("containerd://")
            .to_string()
    };
    let host_dbg = id(wait_running(&stack, "hostpid", "dbg").await);
    let host_app = &host_running.containers["app"];
    assert_eq!(
        pid_ns(host_pid(stack.cri.as_ref(), &host_dbg).await),
        node_ns
    );
    assert_eq!(
        pid_ns(host_pid(stack.cri.as_ref(), host_app).await),
        node_ns
    );

    let shared_dbg = id(wait_running(&stack, "shared", "dbg").await);
    let shared_app = &shared_running.containers["app"];
    let pod_ns = pid_ns(host_pid(stack.cri.as_ref(), shared_app).await);
    assert_ne!(pod_ns, node_ns);
    assert_eq!(
        pid_ns(host_pid(stack.cri.as_ref(), &shared_dbg).await),
        pod_ns
    );
    agent.stop().await;
    stack.teardown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Next to another creator.

/// Someone else (a kubelet) created and started the container before the
/// agent saw it: the agent adopts it — creates nothing, reports its status
/// with that container's id, and records it as the other creator's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_created_first_by_another_creator_is_adopted() {
    let stack = stack("par-adopt").await;
    let agent = InProcess::start(&stack, Mode::Start).await;
    let (pod, running_pod) = stack.run_pod(app_pod("theirs")).await.unwrap();
    let c = stored("dbg", Some("app"), "sleep 60");
    let theirs = create_as_kubelet(
        &stack,
        &pod,
        &running_pod,
        &c,
        0,
        Some(&running_pod.containers["app"]),
    )
    .await;
    stack.add_ephemeral("default", "theirs", &c).await.unwrap();

    let st = wait_running(&stack, "theirs", "dbg").await;
    assert_eq!(
        st.container_id.as_deref(),
        Some(format!("containerd://{theirs}").as_str())
    );
    agent.passes(3).await;
    assert_eq!(runtime_ids(stack.cri.as_ref(), &pod, "dbg").await, [theirs]);
    let t = agent
        .agent
        .timelines()
        .into_iter()
        .find(|t| t.pod == "default/theirs" && t.container == "dbg")
        .expect("a timeline");
    assert_eq!(t.creator, Some(Creator::Other));
    assert!(
        events_of(&stack, "theirs", "dbg").is_empty(),
        "the agent claims no Created/Started of its own: {:?}",
        events_of(&stack, "theirs", "dbg")
    );
    agent.stop().await;
    stack.teardown().await.unwrap();
}

/// The node's Lease as a kubelet keeps it, last renewed `age` ago.
async fn put_lease(stack: &Stack, age: Duration) {
    let leases: Api<Lease> = Api::namespaced(stack.api.client(), "kube-node-lease");
    let renewed = k8s_openapi::jiff::Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::try_from(age).unwrap())
        .unwrap();
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(stack.node.clone()),
            namespace: Some("kube-node-lease".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(stack.node.clone()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }),
    };
    if leases.get_opt(&stack.node).await.unwrap().is_some() {
        let patch = serde_json::json!({"spec": lease.spec});
        leases
            .patch(&stack.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    } else {
        leases.create(&PostParams::default(), &lease).await.unwrap();
    }
}

/// `--mode auto`: with a freshly renewed node Lease (a live kubelet) the
/// agent only observes — nothing reaches containerd and no status is
/// written; with the Lease expired, a new agent starts the same container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_observes_next_to_a_live_lease_and_starts_once_it_expired() {
    let stack = stack("par-auto").await;
    put_lease(&stack, Duration::ZERO).await;
    let agent = InProcess::start(&stack, Mode::Auto).await;
    assert!(
        !agent.agent.mode.starting(),
        "{}",
        agent.agent.mode.describe()
    );
    let (pod, _) = stack.run_pod(app_pod("auto")).await.unwrap();
    let writes = stack.api.status_history("default", "auto").len();
    stack
        .add_ephemeral(
            "default",
            "auto",
            &debug_container("dbg", Some("app"), "sleep 60"),
        )
        .await
        .unwrap();
    agent.passes(4).await;
    assert!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg")
            .await
            .is_empty()
    );
    assert_eq!(stack.api.status_history("default", "auto").len(), writes);
    agent.stop().await;

    put_lease(&stack, Duration::from_secs(120)).await;
    let agent = InProcess::start(&stack, Mode::Auto).await;
    assert!(
        agent.agent.mode.starting(),
        "{}",
        agent.agent.mode.describe()
    );
    let st = wait_running(&stack, "auto", "dbg").await;
    let id = st.container_id.unwrap();
    assert_eq!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg").await,
        [id.trim_start_matches("containerd://")]
    );
    agent.stop().await;
    stack.teardown().await.unwrap();
}

/// What the agent started it reports to the end, on real containerd: a
/// container started while no kubelet served the node is still running
/// when a kubelet comes back (its Lease renewed); the agent turns to
/// observing — a container added now is not started — and still writes
/// the terminated status of its own when it exits (exit code 3, its id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_reports_what_it_started_until_terminated_after_a_kubelet_came_back() {
    let stack = stack("par-handover").await;
    let agent = InProcess::start(&stack, Mode::Auto).await;
    assert!(
        agent.agent.mode.starting(),
        "{}",
        agent.agent.mode.describe()
    );
    let (pod, _) = stack.run_pod(app_pod("handover")).await.unwrap();
    let script = "trap 'exit 3' TERM; while true; do sleep 0.1; done";
    stack
        .add_ephemeral(
            "default",
            "handover",
            &debug_container("dbg", Some("app"), script),
        )
        .await
        .unwrap();
    let st = wait_running(&stack, "handover", "dbg").await;
    let ours = st
        .container_id
        .unwrap()
        .trim_start_matches("containerd://")
        .to_string();

    // A kubelet comes up on the node.
    put_lease(&stack, Duration::ZERO).await;
    let deadline = Instant::now() + WAIT;
    while agent.agent.mode.starting() {
        assert!(
            Instant::now() < deadline,
            "observing once the Lease is fresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack
        .add_ephemeral(
            "default",
            "handover",
            &debug_container("later", Some("app"), "sleep 60"),
        )
        .await
        .unwrap();
    agent.passes(4).await;
    assert!(
        runtime_ids(stack.cri.as_ref(), &pod, "later")
            .await
            .is_empty(),
        "a kubelet serves the node: the agent starts nothing new"
    );

    // Ours exits; the observing agent reports it.
    stack.cri.stop_container(&ours, 10).await.unwrap();
    let done = stack
        .wait_pod(
            "default",
            "handover",
            "handover/dbg terminated",
            WAIT,
            |p| terminated(p, "dbg"),
        )
        .await
        .unwrap();
    let t = done.state.unwrap().terminated.unwrap();
    assert_eq!(t.exit_code, 3);
    assert_eq!(
        t.container_id.as_deref(),
        Some(format!("containerd://{ours}").as_str())
    );
    // The agent notes its write once the API server's answer is back,
    // which may be after the stored pod already shows it.
    let deadline = Instant::now() + WAIT;
    let timeline = loop {
        let t = agent
            .agent
            .timelines()
            .into_iter()
            .find(|t| t.container == "dbg")
            .expect("dbg's timeline");
        if t.terminated_written.is_some() {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "the agent wrote the terminated status: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(timeline.creator, Some(Creator::Agent));
    assert!(!agent.agent.mode.starting());
    agent.stop().await;
    stack.teardown().await.unwrap();
}

/// `--mode observe`: nothing is created; when another creator runs the
/// container, the agent records its timeline (created, started, exited,
/// from the runtime's own times; when the API server accepted the other
/// creator's terminated status) and writes no status itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_creates_nothing_and_records_the_other_creators_timeline() {
    let stack = stack("par-observe").await;
    let agent = InProcess::start(&stack, Mode::Observe).await;
    let (pod, running_pod) = stack.run_pod(app_pod("watched")).await.unwrap();
    let writes = stack.api.status_history("default", "watched").len();
    let c = stored("dbg", Some("app"), "sleep 1; exit 7");
    stack.add_ephemeral("default", "watched", &c).await.unwrap();
    agent.passes(4).await;
    assert!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg")
            .await
            .is_empty()
    );

    let before = SystemTime::now();
    let theirs = create_as_kubelet(
        &stack,
        &pod,
        &running_pod,
        &c,
        0,
        Some(&running_pod.containers["app"]),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    let t = loop {
        if let Some(t) = agent
            .agent
            .timelines()
            .into_iter()
            .find(|t| t.container == "dbg" && t.exited.is_some())
        {
            break t;
        }
        assert!(Instant::now() < deadline, "an exited timeline for dbg");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(t.pod, "default/watched");
    assert_eq!(t.creator, Some(Creator::Other));
    let (created, started, exited) = (t.created.unwrap(), t.started.unwrap(), t.exited.unwrap());
    assert!(t.seen <= created && created <= started && started <= exited);
    assert!(created + Duration::from_secs(1) >= before);
    assert!(exited.duration_since(started).unwrap() >= Duration::from_millis(900));
    agent.passes(2).await;
    assert_eq!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg").await,
        std::slice::from_ref(&theirs)
    );
    assert_eq!(
        stack.api.status_history("default", "watched").len(),
        writes,
        "an observing agent writes no status"
    );

    // The other creator reports it terminated; the timeline notes when the
    // API server accepted that.
    let pods: Api<Pod> = Api::namespaced(stack.api.client(), "default");
    let status = serde_json::json!({"status": {"ephemeralContainerStatuses": [{
        "name": "dbg", "ready": false, "restartCount": 0, "image": BUSYBOX_IMAGE, "imageID": "",
        "containerID": format!("containerd://{theirs}"),
        "state": {"terminated": {"exitCode": 7, "reason": "Error"}},
    }]}});
    let accepted = SystemTime::now();
    pods.patch_status("watched", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let t = loop {
        if let Some(t) = agent
            .agent
            .timelines()
            .into_iter()
            .find(|t| t.container == "dbg" && t.api_terminated.is_some())
        {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "api_terminated in dbg's timeline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(t.api_terminated.unwrap() >= accepted);
    assert_eq!(
        stack.api.status_history("default", "watched").len(),
        writes + 1,
        "only the other creator's status write"
    );
    agent.stop().await;
    stack.teardown().await.unwrap();
}
