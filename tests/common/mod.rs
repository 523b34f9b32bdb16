//! Shared helpers of the integration tests: a real containerd testbed with a
//! pod runner, pods built like the API server would store them, and polling
//! with deadlines (no sleeps as synchronisation).

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ephemerald::cri::{CriClient, Runtime};
use ephemerald::reconcile::translate::NodeDirs;
use ephemerald_testbed::containerd::{Containerd, ContainerdOpts};
use ephemerald_testbed::pod_runner::PodRunner;
use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};

/// A running containerd with the project's images, and a pod runner on it.
pub struct Bed {
    pub containerd: Containerd,
    pub cri: Arc<CriClient>,
    pub runner: PodRunner,
    pub dirs: NodeDirs,
}

impl Bed {
    /// Starts a fresh testbed. Panics (fails the test) when containerd cannot
    /// start: these tests never skip.
    pub async fn start(prefix: &str) -> Bed {
        let containerd = Containerd::start(ContainerdOpts::unique(prefix))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "containerd testbed did not start (run scripts/install-deps.sh as root): {e}"
                )
            });
        let cri = Arc::new(
            containerd
                .client()
                .expect("CRI client")
                .with_timeout(Duration::from_secs(30)),
        );
        let dirs = NodeDirs {
            pod_logs: containerd.pod_logs_dir(),
            pods: containerd.pods_dir(),
            seccomp: containerd.dir().join("seccomp"),
            container_logs: containerd.dir().join("containers"),
            host: ephemerald::host::HostFacts::detect(),
        };
        let runner = PodRunner::new(
            cri.clone() as Arc<dyn Runtime>,
            dirs.clone(),
            containerd.cgroup_parent_root(),
        );
        Bed {
            containerd,
            cri,
            runner,
            dirs,
        }
    }

    /// Tears down and asserts it worked.
    pub async fn stop(self) {
        self.containerd.teardown().await.expect("clean teardown");
    }
}

/// A pod as the API server would store it, bound to `node-a`, running the
/// shell-less app image as container `app` on the host network.
pub fn app_pod(name: &str) -> Pod {
    let mut pod = ephemerald_testbed::images::app_pod(name);
    pod.metadata.uid = Some(format!("{name}-{}", std::process::id()));
    let spec = pod.spec.get_or_insert_default();
    spec.node_name = Some("node-a".into());
    spec.host_network = Some(true);
    let app = &mut spec.containers[0];
    app.termination_message_path = Some("/dev/termination-log".into());
    app.termination_message_policy = Some("File".into());
    pod
}

/// A busybox ephemeral container running `sh -c SCRIPT`.
pub fn debug_container(name: &str, target: Option<&str>, script: &str) -> EphemeralContainer {
    EphemeralContainer {
        name: name.into(),
        image: Some(ephemerald_testbed::images::BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("Never".into()),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        target_container_name: target.map(Into::into),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("File".into()),
        ..Default::default()
    }
}

/// Polls `f` until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The host PID of a running container (containerd's verbose info).
pub async fn host_pid(rt: &dyn Runtime, id: &str) -> u32 {
    let resp = rt
        .container_status(id, true)
        .await
        .expect("ContainerStatus");
    let info: serde_json::Value =
        serde_json::from_str(resp.info.get("info").expect("verbose info")).expect("info json");
    info["pid"].as_u64().expect("pid in verbose info") as u32
}

/// The OCI runtime spec containerd generated for a container.
pub async fn runtime_spec(rt: &dyn Runtime, id: &str) -> serde_json::Value {
    cri_info(rt, id).await["runtimeSpec"].clone()
}

/// containerd's verbose info of a container: `config` (the CRI config it
/// was sent), `runtimeSpec` (the OCI spec it made of it), `pid`, ….
pub async fn cri_info(rt: &dyn Runtime, id: &str) -> serde_json::Value {
    let resp = rt
        .container_status(id, true)
        .await
        .expect("ContainerStatus");
    serde_json::from_str(resp.info.get("info").expect("verbose info")).expect("info json")
}

/// The PID namespace link of a host process, e.g. `pid:[4026532201]`.
pub fn pid_ns(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/ns/pid: {e}"))
        .display()
        .to_string()
}

/// The text of a kubelet-style CRI log file (message parts only).
pub fn log_text(path: &PathBuf) -> Option<String> {
    let raw = std::fs::read_to_string(path).ok()?;
    Some(ephemerald::reconcile::observe::cri_log_messages(&raw))
}

/// Median of a list of durations.
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A full testbed (containerd, local API server, pod runner) whose pods are
/// bound to `node-test`. Panics (fails the test) when it cannot start.
pub async fn stack(prefix: &str) -> ephemerald_testbed::stack::Stack {
    ephemerald_testbed::stack::Stack::start(ContainerdOpts::unique(prefix), "node-test")
        .await
        .unwrap_or_else(|e| {
            panic!("testbed did not start (run scripts/install-deps.sh as root): {e}")
        })
}

/// The agent binary (`ephemerald run --mode start`) against a stack, with
/// JSON logs in a file; SIGKILLed on drop.
pub struct AgentProc {
    child: std::process::Child,
    log: PathBuf,
}

impl AgentProc {
    pub fn start(stack: &ephemerald_testbed::stack::Stack, resync: &str) -> AgentProc {
        let log = stack.containerd.dir().join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ephemerald"))
            .args(stack.agent_args("start", resync))
            .env("RUST_LOG", "info,ephemerald=debug")
            .env("EPHEMERALD_LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("agent binary starts");
        AgentProc { child, log }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `fields` of every log line whose message is `message`.
    pub fn lines(&self, message: &str) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .map(|v| v["fields"].clone())
            .collect()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The API status of ephemeral container `name`.
pub fn status_of(pod: &Pod, name: &str) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .ephemeral_container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == name)
        .cloned()
}

/// Its status, if running.
pub fn running(pod: &Pod, name: &str) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    status_of(pod, name).filter(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
}

/// Its status, if terminated.
pub fn terminated(pod: &Pod, name: &str) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    status_of(pod, name).filter(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_some()))
}

/// Its waiting reason and message, if waiting.
pub fn waiting_reason(pod: &Pod, name: &str) -> Option<(String, String)> {
    let w = status_of(pod, name)?.state?.waiting?;
    Some((w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
}

/// The runtime's containers of pod `uid` named `name`, in any state.
pub async fn runtime_containers(
    rt: &dyn Runtime,
    uid: &str,
    name: &str,
) -> Vec<ephemerald::cri::proto::Container> {
    rt.list_containers(Some(ephemerald::cri::proto::ContainerFilter {
        label_selector: [
            (
                ephemerald::kubelet::POD_UID_LABEL.to_string(),
                uid.to_string(),
            ),
            (
                ephemerald::kubelet::CONTAINER_NAME_LABEL.to_string(),
                name.to_string(),
            ),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    }))
    .await
    .expect("ListContainers")
}

/// Their ids.
pub async fn runtime_ids(rt: &dyn Runtime, pod: &Pod, name: &str) -> Vec<String> {
    runtime_containers(rt, ephemerald::kubelet::uid(pod), name)
        .await
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// One field of `/proc/PID/status`, e.g. `CapEff` → `000001ffffffffff`.
pub fn proc_status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}
