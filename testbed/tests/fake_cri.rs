//! The fake CRI runtime, pinned to containerd 1.6.20's behaviour through the
//! agent's own client (`CriClient` over the unix socket): where
//! `tests/cri_containerd.rs` asserts something of real containerd, the same
//! assertion holds here, so component tests built on the fake judge the
//! agent against what a node really answers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ephemerald::cri::proto::{
    AuthConfig, ContainerConfig, ContainerEventType, ContainerFilter, ContainerState,
    ContainerStateValue, ImageSpec, Mount, NamespaceMode, PodSandboxConfig, PodSandboxFilter,
    PodSandboxState, PodSandboxStateValue,
};
use ephemerald::cri::{CriClient, CriError, Runtime};
use ephemerald::k8s::MemoryEvents;
use ephemerald::kubelet;
use ephemerald::reconcile::agent::parse_sandbox_info;
use ephemerald::reconcile::execute::{self, StartContext, Started};
use ephemerald::reconcile::translate::{self, HostFiles, NodeDirs, ResolvedImage};
use ephemerald_testbed::fake_cri::{FakeImage, FakeRuntime, OnTerm, RPCS};
use ephemerald_testbed::images::{APP_IMAGE, BUSYBOX_IMAGE};
use ephemerald_testbed::pod_runner::{PodRunner, RunningPod};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

/// A fake runtime in a temp dir with the project's images, a client on it,
/// and a pod runner using that client.
struct Bed {
    fake: FakeRuntime,
    cri: Arc<CriClient>,
    runner: PodRunner,
    dirs: NodeDirs,
    _tmp: tempfile::TempDir,
}

impl Bed {
    fn start() -> Bed {
        let tmp = tempfile::tempdir().expect("temp dir");
        let fake = FakeRuntime::start(tmp.path());
        fake.set_image(APP_IMAGE, "", "");
        fake.set_image(BUSYBOX_IMAGE, "", "");
        let cri = Arc::new(
            CriClient::new(&fake.endpoint())
                .expect("client")
                .with_timeout(WAIT),
        );
        let dirs = NodeDirs {
            pod_logs: tmp.path().join("pod-logs"),
            pods: tmp.path().join("pods"),
            seccomp: tmp.path().join("seccomp"),
            container_logs: tmp.path().join("containers"),
            host: Default::default(),
        };
        let runner = PodRunner::new(cri.clone() as Arc<dyn Runtime>, dirs.clone(), "/kubepods");
        Bed {
            fake,
            cri,
            runner,
            dirs,
            _tmp: tmp,
        }
    }

    async fn run(&self, pod: &Pod) -> RunningPod {
        self.runner.run(pod).await.expect("pod runs on the fake")
    }

    /// A busybox container config for `pod`, PID-targeting `target_id`.
    fn config(&self, pod: &Pod, name: &str, target_id: Option<&str>) -> ContainerConfig {
        let busybox = self
            .fake
            .images()
            .into_iter()
            .find(|i| i.references.iter().any(|r| r == BUSYBOX_IMAGE))
            .expect("busybox image");
        translate::container_config(&translate::Inputs {
            pod,
            container: &debug_container(name, None),
            target_id,
            image: &ResolvedImage {
                id: busybox.id,
                ..Default::default()
            },
            attempt: 0,
            host_files: &HostFiles::default(),
            node: &self.dirs,
        })
        .expect("config")
    }

    async fn create(
        &self,
        running: &RunningPod,
        config: ContainerConfig,
    ) -> Result<String, CriError> {
        self.cri
            .create_container(&running.sandbox_id, config, running.sandbox_config.clone())
            .await
    }

    async fn status(&self, id: &str) -> ephemerald::cri::proto::ContainerStatus {
        self.cri
            .container_status(id, false)
            .await
            .expect("ContainerStatus")
            .status
            .expect("status")
    }
}

fn app_pod(name: &str, host_network: bool) -> Pod {
    let mut pod = ephemerald_testbed::images::app_pod(name);
    pod.metadata.uid = Some(format!("{name}-uid"));
    let spec = pod.spec.get_or_insert_default();
    spec.node_name = Some("node-a".into());
    spec.host_network = Some(host_network);
    spec.termination_grace_period_seconds = None;
    pod
}

fn debug_container(name: &str, target: Option<&str>) -> EphemeralContainer {
    EphemeralContainer {
        name: name.into(),
        image: Some(BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["sh".into()]),
        target_container_name: target.map(Into::into),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("File".into()),
        ..Default::default()
    }
}

fn status_of(e: &CriError) -> (Code, String) {
    match e {
        CriError::Status { code, message, .. } => (*code, message.clone()),
        other => panic!("expected a runtime status, got {other}"),
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[tokio::test]
async fn version_is_containerd_1_6_on_cri_v1() {
    let bed = Bed::start();
    let v = bed.cri.version().await.unwrap();
    assert_eq!(
        (
            v.version.as_str(),
            v.runtime_name.as_str(),
            v.runtime_version.as_str(),
            v.runtime_api_version.as_str()
        ),
        ("0.1.0", "containerd", "1.6.20~ds1", "v1")
    );
}

#[tokio::test]
async fn sandbox_is_ready_keeps_its_config_and_its_verbose_info_parses() {
    let bed = Bed::start();
    let pod = app_pod("web", false);
    let running = bed.run(&pod).await;
    assert!(is_id(&running.sandbox_id), "{}", running.sandbox_id);
    assert!(running.ip.starts_with("10.88."), "pod IP {}", running.ip);

    let resp = bed
        .cri
        .pod_sandbox_status(&running.sandbox_id, true)
        .await
        .unwrap();
    let status = resp.status.unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(status.metadata, running.sandbox_config.metadata);
    assert_eq!(status.labels, running.sandbox_config.labels);
    let info = resp.info.get("info").expect("verbose info");
    let details = parse_sandbox_info(info);
    assert_eq!(details.cgroup_parent, "/kubepods/podweb-uid");
    assert_eq!(
        details.log_directory.as_deref(),
        Some(running.sandbox_config.log_directory.as_str())
    );
    let v: serde_json::Value = serde_json::from_str(info).unwrap();
    assert_eq!(v["processStatus"], "running");
    assert_eq!(v["config"]["metadata"]["name"], "web");
    assert!(
        v["config"]["metadata"].get("attempt").is_none(),
        "Go's omitempty drops attempt 0: {}",
        v["config"]
    );
    assert_eq!(
        v["config"]["linux"]["security_context"]["namespace_options"],
        serde_json::json!({"pid": 1}),
        "enums as numbers, POD (0) left out"
    );

    // Not verbose: no info, as containerd.
    let plain = bed
        .cri
        .pod_sandbox_status(&running.sandbox_id, false)
        .await
        .unwrap();
    assert!(plain.info.is_empty());

    let by_label = bed
        .cri
        .list_pod_sandbox(Some(PodSandboxFilter {
            label_selector: HashMap::from([(
                kubelet::POD_UID_LABEL.to_string(),
                "web-uid".to_string(),
            )]),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(by_label.len(), 1);
    assert_eq!(by_label[0].id, running.sandbox_id);
}

#[tokio::test]
async fn a_second_sandbox_with_the_same_name_is_refused_like_containerd() {
    let bed = Bed::start();
    let running = bed.run(&app_pod("web", true)).await;
    let err = bed
        .cri
        .run_pod_sandbox(running.sandbox_config.clone())
        .await
        .unwrap_err();
    let (code, msg) = status_of(&err);
    assert_eq!(code, Code::Unknown);
    assert_eq!(
        msg,
        format!(
            r#"failed to reserve sandbox name "web_default_web-uid_0": name "web_default_web-uid_0" is reserved for "{}""#,
            running.sandbox_id
        )
    );
    assert!(err.is_name_reserved());
}

#[tokio::test]
async fn host_network_sandbox_with_a_hostname_is_refused_by_runc() {
    let bed = Bed::start();
    let mut config: PodSandboxConfig = bed.runner.sandbox_config(&app_pod("web", true));
    config.hostname = "web".into();
    let (code, msg) = status_of(&bed.cri.run_pod_sandbox(config).await.unwrap_err());
    assert_eq!(code, Code::Unknown);
    assert!(
        msg.ends_with("unable to set hostname without a private UTS namespace: unknown"),
        "{msg}"
    );
}

#[tokio::test]
async fn unknown_target_is_not_found_and_not_retryable() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let bogus = "0123456789abcdef-no-such-container";
    let err = bed
        .create(&running, bed.config(&pod, "dbg", Some(bogus)))
        .await
        .unwrap_err();
    let (code, msg) = status_of(&err);
    assert_eq!(code, Code::NotFound);
    assert!(
        msg.starts_with(r#"failed to generate container ""#)
            && msg.ends_with(&format!(
                r#"" spec: invalid target container: container "{bogus}" does not exist: not found"#
            )),
        "{msg}"
    );
    assert!(!err.is_retryable(), "an id that does not exist never will");
    // The name was released with the failure.
    bed.create(&running, bed.config(&pod, "dbg", None))
        .await
        .expect("the name is free again");
}

#[tokio::test]
async fn target_that_is_not_running_is_unknown_and_retryable() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let idle = bed
        .create(&running, bed.config(&pod, "idle", None))
        .await
        .unwrap();
    let err = bed
        .create(&running, bed.config(&pod, "dbg", Some(&idle)))
        .await
        .unwrap_err();
    let (code, msg) = status_of(&err);
    assert_eq!(code, Code::Unknown);
    assert!(
        msg.ends_with(&format!(
            r#"spec: invalid target container: container "{idle}" is not running - in state CONTAINER_CREATED"#
        )),
        "{msg}"
    );
    assert!(err.is_retryable(), "the target may still start");

    // A target given by a unique prefix works, as containerd's truncindex.
    let app = &running.containers["app"];
    bed.create(&running, bed.config(&pod, "dbg", Some(&app[..12])))
        .await
        .expect("prefix of a running target");
}

#[tokio::test]
async fn duplicate_container_name_is_reserved_for_the_first() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let first = bed
        .create(&running, bed.config(&pod, "dbg", None))
        .await
        .unwrap();
    let err = bed
        .create(&running, bed.config(&pod, "dbg", None))
        .await
        .unwrap_err();
    let (code, msg) = status_of(&err);
    assert_eq!(code, Code::Unknown);
    assert_eq!(
        msg,
        format!(
            r#"failed to reserve container name "dbg_web_default_web-uid_0": name "dbg_web_default_web-uid_0" is reserved for "{first}""#
        )
    );
    assert!(err.is_name_reserved());

    // Removing releases the name; removing again (or an unknown id) is fine.
    bed.cri.remove_container(&first).await.unwrap();
    bed.cri.remove_container(&first).await.unwrap();
    bed.create(&running, bed.config(&pod, "dbg", None))
        .await
        .expect("name released by RemoveContainer");
    let (code, msg) = status_of(&bed.cri.remove_container("").await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::Unknown,
            r#"an error occurred when try to find container "": Prefix can't be empty"#
        )
    );
}

#[tokio::test]
async fn create_refuses_missing_images_and_sandboxes_like_containerd() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;

    let mut config = bed.config(&pod, "dbg", None);
    config.image.as_mut().unwrap().image = "docker.io/library/nosuch:1".into();
    let (code, msg) = status_of(&bed.create(&running, config).await.unwrap_err());
    assert_eq!(code, Code::NotFound);
    assert_eq!(
        msg,
        r#"failed to resolve image "docker.io/library/nosuch:1": not found"#
    );

    let err = bed
        .cri
        .create_container(
            "nosuchsandbox",
            bed.config(&pod, "dbg", None),
            running.sandbox_config.clone(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        status_of(&err),
        (
            Code::NotFound,
            r#"failed to find sandbox id "nosuchsandbox": not found"#.to_string()
        )
    );

    let mut config = bed.config(&pod, "dbg", None);
    config.metadata = None;
    let (code, msg) = status_of(&bed.create(&running, config).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (Code::Unknown, "container config must include metadata")
    );

    // containerd 1.6.20 dies on a nil sandbox metadata; its client sees this.
    let err = bed
        .cri
        .create_container(
            &running.sandbox_id,
            bed.config(&pod, "dbg", None),
            PodSandboxConfig::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(&err), (Code::Unknown, "transport error".into()));

    bed.cri.stop_pod_sandbox(&running.sandbox_id).await.unwrap();
    let (code, msg) = status_of(
        &bed.create(&running, bed.config(&pod, "dbg", None))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, Code::NotFound);
    assert_eq!(
        msg,
        format!(
            "failed to get sandbox container task: no running task found: task {} not found: not found",
            running.sandbox_id
        )
    );
}

#[tokio::test]
async fn exit_code_state_reason_log_path_and_image_are_containerds() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let mut config = bed.config(&pod, "dbg", Some(&running.containers["app"]));
    config.mounts.push(Mount {
        container_path: "/dev/termination-log".into(),
        host_path: "/tmp/termination-log".into(),
        ..Default::default()
    });
    let id = bed.create(&running, config).await.unwrap();

    let created = bed.status(&id).await;
    assert_eq!(created.state, ContainerState::ContainerCreated as i32);
    assert_eq!((created.started_at, created.finished_at), (0, 0));
    assert_eq!(
        created.log_path,
        kubelet::container_log_dir(&bed.dirs.pod_logs, &pod, "dbg")
            .join("0.log")
            .display()
            .to_string(),
        "the sandbox's log directory joined with the config's log path"
    );
    assert_eq!(created.mounts[0].container_path, "/dev/termination-log");
    // The image's first tag and, with no repo digest, its id.
    assert_eq!(
        created.image.as_ref().unwrap().image,
        "ephemerald.local/busybox:1.35"
    );
    assert!(created.image_ref.starts_with("sha256:"));
    let listed = bed
        .cri
        .list_containers(Some(ContainerFilter {
            id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        listed[0].image.as_ref().unwrap().image,
        created.image_ref,
        "ListContainers reports the image as the config named it (the id)"
    );

    bed.cri.start_container(&id).await.unwrap();
    let started = bed.status(&id).await;
    assert_eq!(started.state, ContainerState::ContainerRunning as i32);
    assert!(started.started_at > started.created_at);
    let err = bed.cri.start_container(&id).await.unwrap_err();
    assert_eq!(
        status_of(&err),
        (
            Code::Unknown,
            format!(
                "failed to set starting state for container \"{id}\": container is in CONTAINER_RUNNING state"
            )
        )
    );

    bed.fake.exit(&id, 3);
    let exited = bed.status(&id).await;
    assert_eq!(exited.state, ContainerState::ContainerExited as i32);
    assert_eq!((exited.exit_code, exited.reason.as_str()), (3, "Error"));
    assert!(exited.finished_at > exited.started_at);
    assert_eq!(exited.message, "");

    let other = bed
        .create(&running, bed.config(&pod, "ok", None))
        .await
        .unwrap();
    bed.cri.start_container(&other).await.unwrap();
    bed.fake.exit(&other, 0);
    assert_eq!(bed.status(&other).await.reason, "Completed");

    let oom = bed
        .create(&running, bed.config(&pod, "oom", None))
        .await
        .unwrap();
    bed.cri.start_container(&oom).await.unwrap();
    bed.fake.oom_kill(&oom);
    let s = bed.status(&oom).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "OOMKilled"));
}

#[tokio::test]
async fn a_failed_start_leaves_the_container_exited_128_start_error() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let id = bed
        .create(&running, bed.config(&pod, "dbg", None))
        .await
        .unwrap();
    let runc = "failed to create containerd task: failed to create shim task: OCI runtime create failed: exec: \"sh\": executable file not found in $PATH: unknown";
    bed.fake.fail_next("StartContainer", Code::Unknown, runc);
    let err = bed.cri.start_container(&id).await.unwrap_err();
    assert_eq!(status_of(&err), (Code::Unknown, runc.to_string()));
    let s = bed.status(&id).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert_eq!(
        (s.exit_code, s.reason.as_str(), s.message.as_str()),
        (128, "StartError", runc)
    );
    assert_eq!(s.started_at, 0);
    let again = bed.cri.start_container(&id).await.unwrap_err();
    assert!(
        status_of(&again)
            .1
            .ends_with("container is in CONTAINER_EXITED state"),
        "never startable again: {again}"
    );
}

#[tokio::test]
async fn stop_semantics_and_the_target_taking_its_debug_container_down() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let app = running.containers["app"].clone();
    let start = |name: &'static str, target: Option<String>| {
        let bed = &bed;
        let running = &running;
        let pod = &pod;
        async move {
            let id = bed
                .create(running, bed.config(pod, name, target.as_deref()))
                .await
                .unwrap();
            bed.cri.start_container(&id).await.unwrap();
            id
        }
    };

    // Default process: TERM kills it (143).
    let d1 = start("d1", Some(app.clone())).await;
    bed.cri.stop_container(&d1, 2).await.unwrap();
    let s = bed.status(&d1).await;
    assert_eq!(
        (s.state, s.exit_code),
        (ContainerState::ContainerExited as i32, 143)
    );
    bed.cri
        .stop_container(&d1, 2)
        .await
        .expect("stopping an exited container is a no-op");

    // A process that ignores TERM: the whole timeout, then KILL.
    let d2 = start("d2", Some(app.clone())).await;
    bed.fake.on_term(&d2, OnTerm::Ignore);
    let t = Instant::now();
    bed.cri.stop_container(&d2, 1).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(bed.status(&d2).await.exit_code, 137);

    // Timeout 0 is SIGKILL at once.
    let d3 = start("d3", None).await;
    bed.cri.stop_container(&d3, 0).await.unwrap();
    assert_eq!(bed.status(&d3).await.exit_code, 137);

    // A created container is left alone by StopContainer.
    let idle = bed
        .create(&running, bed.config(&pod, "idle", None))
        .await
        .unwrap();
    bed.cri.stop_container(&idle, 1).await.unwrap();
    assert_eq!(
        bed.status(&idle).await.state,
        ContainerState::ContainerCreated as i32
    );

    // Stopping the target kills what runs in its PID namespace (137); the
    // app itself handles TERM and exits 0.
    let d4 = start("d4", Some(app.clone())).await;
    let d5 = start("d5", Some(d4.clone())).await;
    let own = start("own", None).await;
    bed.fake.on_term(&app, OnTerm::Exit(0));
    bed.cri.stop_container(&app, 2).await.unwrap();
    let app_s = bed.status(&app).await;
    assert_eq!((app_s.exit_code, app_s.reason.as_str()), (0, "Completed"));
    for id in [&d4, &d5] {
        let s = bed.status(id).await;
        assert_eq!(
            (s.state, s.exit_code, s.reason.as_str()),
            (ContainerState::ContainerExited as i32, 137, "Error"),
            "{id} dies with the namespace"
        );
    }
    assert_eq!(
        bed.status(&own).await.state,
        ContainerState::ContainerRunning as i32,
        "a container with its own PID namespace lives on"
    );

    // A created container whose target has gone fails to start, exited.
    let late = bed
        .create(&running, {
            let mut c = bed.config(&pod, "late", None);
            let ns = c
                .linux
                .as_mut()
                .unwrap()
                .security_context
                .as_mut()
                .unwrap()
                .namespace_options
                .as_mut()
                .unwrap();
            ns.pid = NamespaceMode::Target as i32;
            ns.target_id = own.clone();
            c
        })
        .await
        .unwrap();
    bed.fake.exit(&own, 0);
    let err = bed.cri.start_container(&late).await.unwrap_err();
    let want = format!(
        "invalid target container: container \"{own}\" is not running - in state CONTAINER_EXITED"
    );
    assert_eq!(status_of(&err), (Code::Unknown, want.clone()));
    let s = bed.status(&late).await;
    assert_eq!(
        (s.exit_code, s.reason, s.message),
        (128, "StartError".into(), want)
    );
}

#[tokio::test]
async fn stopping_the_sandbox_kills_running_containers_and_leaves_created_ones() {
    let bed = Bed::start();
    let pod = app_pod("web", false);
    let running = bed.run(&pod).await;
    let app = running.containers["app"].clone();
    let idle = bed
        .create(&running, bed.config(&pod, "idle", None))
        .await
        .unwrap();

    bed.cri.stop_pod_sandbox(&running.sandbox_id).await.unwrap();
    bed.cri
        .stop_pod_sandbox(&running.sandbox_id)
        .await
        .expect("stopping twice is fine");
    let s = bed.status(&app).await;
    assert_eq!(
        (s.state, s.exit_code),
        (ContainerState::ContainerExited as i32, 137)
    );
    assert_eq!(
        bed.status(&idle).await.state,
        ContainerState::ContainerCreated as i32
    );
    let resp = bed
        .cri
        .pod_sandbox_status(&running.sandbox_id, true)
        .await
        .unwrap();
    let status = resp.status.unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxNotready as i32);
    assert_eq!(status.network.unwrap().ip, "", "the network is torn down");
    let info: serde_json::Value = serde_json::from_str(&resp.info["info"]).unwrap();
    assert_eq!(
        (
            &info["processStatus"],
            &info["pid"],
            &info["netNamespaceClosed"]
        ),
        (
            &serde_json::json!("deleted"),
            &serde_json::json!(0),
            &serde_json::json!(true)
        )
    );

    let err = bed.cri.start_container(&idle).await.unwrap_err();
    let want = format!(
        "sandbox container \"{}\" is not running",
        running.sandbox_id
    );
    assert_eq!(status_of(&err), (Code::Unknown, want));
    assert_eq!(bed.status(&idle).await.reason, "StartError");

    bed.cri
        .remove_pod_sandbox(&running.sandbox_id)
        .await
        .unwrap();
    bed.cri
        .remove_pod_sandbox(&running.sandbox_id)
        .await
        .expect("removing an unknown sandbox is fine");
    assert!(bed.cri.list_containers(None).await.unwrap().is_empty());
    let (code, msg) = status_of(
        &bed.cri
            .pod_sandbox_status(&running.sandbox_id, false)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::NotFound,
            "an error occurred when try to find sandbox: not found"
        )
    );
    // The sandbox name is free again.
    bed.run(&pod).await;
}

#[tokio::test]
async fn list_filters_by_id_prefix_sandbox_state_and_labels() {
    let bed = Bed::start();
    let web_pod = app_pod("web", true);
    let web = bed.run(&web_pod).await;
    let db = bed.run(&app_pod("db", true)).await;
    let idle = bed
        .create(&web, bed.config(&web_pod, "idle", None))
        .await
        .unwrap();

    let list = |f: ContainerFilter| {
        let cri = bed.cri.clone();
        async move {
            let mut ids: Vec<String> = cri
                .list_containers(Some(f))
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.id)
                .collect();
            ids.sort();
            ids
        }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        list(ContainerFilter {
            id: idle[..10].into(),
            ..Default::default()
        })
        .await,
        [idle.as_str()]
    );
    assert_eq!(
        list(ContainerFilter {
            pod_sandbox_id: web.sandbox_id[..10].into(),
            ..Default::default()
        })
        .await,
        sorted(vec![web.containers["app"].clone(), idle.clone()])
    );
    assert_eq!(
        list(ContainerFilter {
            state: Some(ContainerStateValue {
                state: ContainerState::ContainerRunning as i32
            }),
            ..Default::default()
        })
        .await,
        sorted(vec![
            web.containers["app"].clone(),
            db.containers["app"].clone()
        ])
    );
    assert_eq!(
        list(ContainerFilter {
            label_selector: HashMap::from([
                (kubelet::POD_UID_LABEL.into(), "db-uid".into()),
                (kubelet::CONTAINER_NAME_LABEL.into(), "app".into()),
            ]),
            ..Default::default()
        })
        .await,
        [db.containers["app"].clone()]
    );
    assert!(
        list(ContainerFilter {
            id: "ffff-no-such".into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );

    bed.cri.stop_pod_sandbox(&db.sandbox_id).await.unwrap();
    let ready = bed
        .cri
        .list_pod_sandbox(Some(PodSandboxFilter {
            state: Some(PodSandboxStateValue {
                state: PodSandboxState::SandboxReady as i32,
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(
        ready.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [web.sandbox_id.as_str()]
    );
    let by_prefix = bed
        .cri
        .list_pod_sandbox(Some(PodSandboxFilter {
            id: db.sandbox_id[..8].into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(by_prefix.len(), 1);
    assert_eq!(by_prefix[0].id, db.sandbox_id);
}

#[tokio::test]
async fn container_events_stream_in_order_or_are_unimplemented_like_1_6() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let mut events = bed.cri.container_events().await.expect("served");
    let running = bed.run(&pod).await;
    let id = bed
        .create(&running, bed.config(&pod, "dbg", None))
        .await
        .unwrap();
    bed.cri.start_container(&id).await.unwrap();
    bed.fake.exit(&id, 0);
    bed.cri.remove_container(&id).await.unwrap();

    let app = &running.containers["app"];
    let sb = &running.sandbox_id;
    use ContainerEventType::*;
    let want = [
        (sb, ContainerCreatedEvent),
        (sb, ContainerStartedEvent),
        (app, ContainerCreatedEvent),
        (app, ContainerStartedEvent),
        (&id, ContainerCreatedEvent),
        (&id, ContainerStartedEvent),
        (&id, ContainerStoppedEvent),
        (&id, ContainerDeletedEvent),
    ];
    let mut got = vec![];
    for _ in want {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("event");
        got.push(ev);
    }
    assert_eq!(
        got.iter()
            .map(|e| (e.container_id.as_str(), e.container_event_type))
            .collect::<Vec<_>>(),
        want.iter()
            .map(|(id, t)| (id.as_str(), *t as i32))
            .collect::<Vec<_>>()
    );
    let stopped = &got[6];
    assert_eq!(
        stopped.pod_sandbox_status.as_ref().unwrap().id,
        *sb,
        "events carry the sandbox status"
    );
    let mine = stopped
        .containers_statuses
        .iter()
        .find(|s| s.id == id)
        .expect("and the sandbox's container statuses");
    assert_eq!(mine.state, ContainerState::ContainerExited as i32);
    assert!(
        !got[7].containers_statuses.iter().any(|s| s.id == id),
        "a deleted container is gone from its own event"
    );

    bed.fake.serve_container_events(false);
    let err = match bed.cri.container_events().await {
        Ok(_) => panic!("expected UNIMPLEMENTED"),
        Err(e) => e,
    };
    assert!(err.is_unimplemented());
    assert_eq!(
        status_of(&err).1,
        "method GetContainerEvents not implemented"
    );
}

#[tokio::test]
async fn injected_failures_are_one_shot_and_every_call_is_recorded() {
    let bed = Bed::start();
    bed.fake.clear_calls();
    bed.fake
        .fail_next("ListContainers", Code::Unavailable, "connection reset");
    bed.fake
        .fail_next("ListContainers", Code::DeadlineExceeded, "slow");
    let first = bed.cri.list_containers(None).await.unwrap_err();
    assert_eq!(
        status_of(&first),
        (Code::Unavailable, "connection reset".into())
    );
    assert!(first.is_retryable());
    let second = bed.cri.list_containers(None).await.unwrap_err();
    assert_eq!(status_of(&second).0, Code::DeadlineExceeded);
    bed.cri
        .list_containers(None)
        .await
        .expect("the queue is empty again");

    bed.fake
        .fail_next("CreateContainer", Code::Unknown, "injected");
    let pod = app_pod("web", true);
    let err = bed.runner.run(&pod).await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert!(
        bed.fake.containers().is_empty(),
        "an injected CreateContainer failure creates nothing"
    );
    assert_eq!(
        bed.fake.calls(),
        [
            "ListContainers",
            "ListContainers",
            "ListContainers",
            "RunPodSandbox",
            "PodSandboxStatus",
            "ImageStatus",
            "CreateContainer",
        ]
    );
    assert!(RPCS.contains(&"GetContainerEvents"));

    bed.fake.set_delay("ListImages", Duration::from_millis(300));
    let t = Instant::now();
    bed.cri.list_images().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    let slow = CriClient::new(&bed.fake.endpoint())
        .unwrap()
        .with_timeout(Duration::from_millis(50));
    let err = slow.list_images().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::DeadlineExceeded));
}

#[tokio::test]
async fn images_status_list_and_pull_like_containerd() {
    let bed = Bed::start();
    let absent = bed
        .cri
        .image_status(ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(absent, None, "an absent image is no image, not an error");
    let listed: Vec<String> = bed
        .cri
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .collect();
    assert_eq!(
        listed,
        [
            "registry.k8s.io/pause:3.6",
            "ephemerald.local/app:1.0",
            "ephemerald.local/busybox:1.35"
        ]
    );

    let pull = |image: &str, auth: Option<AuthConfig>| {
        let cri = bed.cri.clone();
        let spec = ImageSpec {
            image: image.into(),
            ..Default::default()
        };
        async move { cri.pull_image(spec, auth, None).await }
    };
    let (code, msg) = status_of(&pull("nosuch", None).await.unwrap_err());
    assert_eq!(code, Code::NotFound);
    assert_eq!(
        msg,
        r#"failed to pull and unpack image "docker.io/library/nosuch:latest": failed to resolve reference "docker.io/library/nosuch:latest": docker.io/library/nosuch:latest: not found"#
    );
    let (code, msg) = status_of(&pull("UPPER/x", None).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::Unknown,
            r#"failed to parse image reference "UPPER/x": invalid reference format: repository name must be lowercase"#
        )
    );

    let tools = FakeImage::new("busybox:1.36").with_user("1000");
    bed.fake.add_to_registry(tools.clone());
    bed.fake.set_registry_reachable(false);
    let (code, msg) = status_of(&pull("busybox:1.36", None).await.unwrap_err());
    assert_eq!(code, Code::Unknown);
    assert!(
        msg.ends_with(r#"failed to do request: Head "https://registry-1.docker.io/v2/library/busybox/manifests/1.36": dial tcp: lookup registry-1.docker.io: no such host"#),
        "{msg}"
    );
    bed.fake.set_registry_reachable(true);
    let id = pull("busybox:1.36", None).await.unwrap();
    assert_eq!(id, tools.id, "PullImage answers the image id");
    let img = bed
        .cri
        .image_status(ImageSpec {
            image: "docker.io/library/busybox:1.36".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .expect("pulled");
    assert_eq!(img.repo_tags, ["docker.io/library/busybox:1.36"]);
    assert_eq!(
        img.repo_digests,
        [format!(
            "docker.io/library/busybox@{}",
            tools.manifest_digest
        )]
    );
    assert_eq!(img.uid.map(|u| u.value), Some(1000));

    // Credentials reach the registry only as containerd 1.6's ParseAuth lets
    // them: a server address must be a URL of the registry host.
    let private = FakeImage::new("registry.example/team/tool:2").with_auth("me", "secret");
    bed.fake.add_to_registry(private);
    let creds = |server: &str| AuthConfig {
        username: "me".into(),
        password: "secret".into(),
        server_address: server.into(),
        ..Default::default()
    };
    let denied = "pull access denied, repository does not exist or may require authorization";
    for auth in [None, Some(creds("registry.example"))] {
        let msg = status_of(
            &pull("registry.example/team/tool:2", auth)
                .await
                .unwrap_err(),
        )
        .1;
        assert!(msg.contains(denied), "{msg}");
    }
    pull("registry.example/team/tool:2", Some(creds("")))
        .await
        .expect("no server address: used");
    pull(
        "registry.example/team/tool:2",
        Some(creds("https://registry.example")),
    )
    .await
    .expect("a URL of the registry host: used");
}

#[tokio::test]
async fn an_unavailable_runtime_is_a_connection_failure_and_comes_back_with_its_state() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let mut events = bed.cri.container_events().await.unwrap();

    bed.fake.set_unavailable(true).await;
    assert!(!bed.fake.socket_path().exists());
    let err = bed.cri.list_containers(None).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.is_retryable());
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(Ok(_)) = events.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream ends with the runtime");

    bed.fake.set_unavailable(false).await;
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        match bed.cri.list_containers(None).await {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "reconnecting");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the runtime did not come back: {e}"),
        }
    };
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, running.containers["app"]);

    bed.fake.shutdown().await;
    assert!(bed.cri.version().await.unwrap_err().is_unavailable());
}

#[tokio::test]
async fn verbose_container_info_has_a_pid_and_the_target_in_the_runtime_spec() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let app = &running.containers["app"];
    let id = bed
        .create(&running, bed.config(&pod, "dbg", Some(app)))
        .await
        .unwrap();
    bed.cri.start_container(&id).await.unwrap();

    let info = |id: String| {
        let cri = bed.cri.clone();
        async move {
            let resp = cri.container_status(&id, true).await.unwrap();
            serde_json::from_str::<serde_json::Value>(&resp.info["info"]).unwrap()
        }
    };
    let app_info = info(app.clone()).await;
    let dbg = info(id.clone()).await;
    let app_pid = app_info["pid"].as_u64().unwrap();
    assert!(dbg["pid"].as_u64().unwrap() > 0);
    assert_eq!(dbg["sandboxID"], running.sandbox_id.as_str());
    assert_eq!(dbg["config"]["log_path"], "dbg/0.log");
    let spec = &dbg["runtimeSpec"];
    let pid_ns = spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["type"] == "pid")
        .unwrap();
    assert_eq!(pid_ns["path"], format!("/proc/{app_pid}/ns/pid"));
    assert!(
        spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["type"] != "network"),
        "host network: no network namespace of its own"
    );
    assert_eq!(
        spec["linux"]["cgroupsPath"],
        format!("/kubepods/podweb-uid/{id}")
    );
    assert!(spec["linux"]["resources"]["memory"]["limit"].is_null());
    assert!(spec["linux"]["resources"]["cpu"]["quota"].is_null());
    assert_eq!(spec["process"]["args"], serde_json::json!(["sh"]));
    assert_eq!(
        spec["annotations"]["io.kubernetes.cri.image-name"],
        "ephemerald.local/busybox:1.35"
    );
    let plain = bed.cri.container_status(&id, false).await.unwrap();
    assert!(plain.info.is_empty());
}

#[tokio::test]
async fn the_agents_start_path_starts_then_adopts_on_the_reserved_name() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let events = MemoryEvents::default();
    let cx = StartContext {
        runtime: bed.cri.as_ref(),
        events: &events,
        dirs: &bed.dirs,
        sandbox_id: &running.sandbox_id,
        sandbox_config: &running.sandbox_config,
        pull_auths: &[],
    };
    let dbg = debug_container("dbg", Some("app"));
    let first = execute::start(&cx, &pod, &dbg, Some(&running.containers["app"]))
        .await
        .expect("starts");
    let Started::Started { id, .. } = first else {
        panic!("expected a fresh start, got {first:?}");
    };
    let reasons: Vec<String> = events.reasons().into_iter().map(|(r, _)| r).collect();
    assert_eq!(reasons, ["Pulled", "Created", "Started"]);
    let c = bed.fake.container(&id).expect("in the fake");
    assert_eq!(c.container_name(), "dbg");
    assert_eq!(
        c.target_id.as_deref(),
        Some(running.containers["app"].as_str())
    );
    let no_limits = c
        .config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .is_none_or(|r| r.memory_limit_in_bytes == 0 && r.cpu_quota == 0);
    assert!(no_limits, "{:?}", c.config.linux);

    let again = execute::start(&cx, &pod, &dbg, Some(&running.containers["app"]))
        .await
        .expect("adopts");
    assert_eq!(again, Started::Adopted { id });
}

#[tokio::test]
async fn write_log_appends_cri_log_lines_at_the_containers_log_path() {
    let bed = Bed::start();
    let pod = app_pod("web", true);
    let running = bed.run(&pod).await;
    let id = bed
        .create(&running, bed.config(&pod, "dbg", None))
        .await
        .unwrap();
    bed.fake.write_log(&id, "stdout", "hello");
    bed.fake.write_log(&id, "stderr", "world");
    let path = bed.status(&id).await.log_path;
    let raw = std::fs::read_to_string(Path::new(&path)).unwrap();
    assert_eq!(
        ephemerald::reconcile::observe::cri_log_messages(&raw),
        "hello\nworld\n"
    );
    assert!(
        raw.lines().all(|l| l.split(' ').nth(2) == Some("F")),
        "{raw}"
    );
}
