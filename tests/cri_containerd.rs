//! The CRI half against real containerd + runc: ephemeral containers started
//! by the agent's own start path (`reconcile::execute::start`) in pods run
//! by the pod runner. Fails, never skips, when containerd cannot start.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;
use ephemerald::cri::Runtime;
use ephemerald::cri::proto::{ContainerFilter, ContainerState};
use ephemerald::k8s::MemoryEvents;
use ephemerald::kubelet;
use ephemerald::reconcile::execute::{self, StartContext, StartFailure, Started};
use ephemerald::reconcile::observe;
use ephemerald::reconcile::plan::{self, Gates};
use ephemerald::reconcile::translate::{self, HostFiles, ResolvedImage};
use ephemerald::testbed::pod_runner::RunningPod;
use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};

const WAIT: Duration = Duration::from_secs(20);

async fn start(
    bed: &Bed,
    running: &RunningPod,
    pod: &Pod,
    c: &EphemeralContainer,
    target_id: Option<&str>,
    events: &MemoryEvents,
) -> Result<Started, StartFailure> {
    let cx = StartContext {
        runtime: bed.cri.as_ref(),
        events,
        dirs: &bed.dirs,
        sandbox_id: &running.sandbox_id,
        sandbox_config: &running.sandbox_config,
        pull_auths: &[],
    };
    execute::start(&cx, pod, c, target_id).await
}

fn started_id(s: Started) -> String {
    match s {
        Started::Started { id, .. } => id,
        Started::Adopted { id } => panic!("unexpected adoption of {id}"),
    }
}

async fn wait_state(bed: &Bed, id: &str, want: ContainerState) {
    eventually(&format!("container {id} in {want:?}"), WAIT, || async {
        let s = bed.cri.container_status(id, false).await.ok()?.status?;
        (s.state == want as i32).then_some(())
    })
    .await
}

fn log_path(bed: &Bed, pod: &Pod, name: &str) -> std::path::PathBuf {
    kubelet::container_log_dir(&bed.dirs.pod_logs, pod, name).join("0.log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_shares_the_app_pid_namespace_and_sees_its_process() {
    let bed = Bed::start("cri-target").await;
    let pod = app_pod("target");
    let running = bed.runner.run(&pod).await.expect("pod runs");
    let app_id = running.containers["app"].clone();
    let dbg = debug_container("dbg", Some("app"), "ps; sleep 60");
    let events = MemoryEvents::default();

    let id = started_id(
        start(&bed, &running, &pod, &dbg, Some(&app_id), &events)
            .await
            .expect("starts"),
    );
    wait_state(&bed, &id, ContainerState::ContainerRunning).await;

    let app_pid = host_pid(bed.cri.as_ref(), &app_id).await;
    let dbg_pid = host_pid(bed.cri.as_ref(), &id).await;
    assert_eq!(
        pid_ns(app_pid),
        pid_ns(dbg_pid),
        "debug container is in the app's PID namespace"
    );
    assert_ne!(
        pid_ns(dbg_pid),
        pid_ns(std::process::id()),
        "and not in ours"
    );

    let log = log_path(&bed, &pod, "dbg");
    let ps = eventually("ps output in the log", WAIT, || async {
        log_text(&log).filter(|t| t.contains("/app"))
    })
    .await;
    assert!(ps.contains("ps"), "ps lists itself too: {ps}");

    let reasons: Vec<String> = events.reasons().into_iter().map(|(r, _)| r).collect();
    assert_eq!(reasons, ["Pulled", "Created", "Started"]);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_process_namespace_is_pod_mode_and_no_target_is_its_own() {
    let bed = Bed::start("cri-share").await;
    let events = MemoryEvents::default();

    let mut shared = app_pod("shared");
    shared.spec.as_mut().unwrap().share_process_namespace = Some(true);
    let running = bed.runner.run(&shared).await.expect("pod runs");
    let app_pid = host_pid(bed.cri.as_ref(), &running.containers["app"]).await;
    // A target is set, but the pod already shares one namespace: POD mode.
    let dbg = debug_container("dbg", Some("app"), "sleep 60");
    let id = started_id(
        start(
            &bed,
            &running,
            &shared,
            &dbg,
            Some(&running.containers["app"]),
            &events,
        )
        .await
        .unwrap(),
    );
    wait_state(&bed, &id, ContainerState::ContainerRunning).await;
    assert_eq!(
        pid_ns(host_pid(bed.cri.as_ref(), &id).await),
        pid_ns(app_pid)
    );

    let own = app_pod("own");
    let running = bed.runner.run(&own).await.expect("pod runs");
    let app_pid = host_pid(bed.cri.as_ref(), &running.containers["app"]).await;
    let dbg = debug_container("dbg", None, "sleep 60");
    let id = started_id(
        start(&bed, &running, &own, &dbg, None, &events)
            .await
            .unwrap(),
    );
    wait_state(&bed, &id, ContainerState::ContainerRunning).await;
    let dbg_ns = pid_ns(host_pid(bed.cri.as_ref(), &id).await);
    assert_ne!(dbg_ns, pid_ns(app_pid), "no target: a namespace of its own");
    assert_ne!(dbg_ns, pid_ns(std::process::id()));
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_not_running_or_unknown_is_the_runtimes_error_classified() {
    let bed = Bed::start("cri-errors").await;
    let pod = app_pod("errs");
    let running = bed.runner.run(&pod).await.expect("pod runs");
    let events = MemoryEvents::default();

    // A second container that is created but never started.
    let idle = EphemeralContainer {
        name: "idle".into(),
        ..debug_container("idle", None, "sleep 60")
    };
    let image = bed
        .cri
        .image_status(ephemerald::cri::proto::ImageSpec {
            image: ephemerald::testbed::images::BUSYBOX_IMAGE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .expect("busybox imported");
    let config = translate::container_config(&translate::Inputs {
        pod: &pod,
        container: &idle,
        target_id: None,
        image: &ResolvedImage {
            id: image.id,
            ..Default::default()
        },
        attempt: 0,
        host_files: &HostFiles::default(),
        node: &bed.dirs,
    })
    .unwrap();
    let idle_id = bed
        .cri
        .create_container(&running.sandbox_id, config, running.sandbox_config.clone())
        .await
        .unwrap();

    let dbg = debug_container("dbg", Some("idle"), "ps");
    let not_running = start(&bed, &running, &pod, &dbg, Some(&idle_id), &events)
        .await
        .unwrap_err();
    assert_eq!(not_running.reason, "CreateContainerError");
    assert!(
        not_running.message.contains("is not running"),
        "{}",
        not_running.message
    );
    assert!(not_running.retryable, "the target may still start");

    let dbg2 = debug_container("dbg2", Some("app"), "ps");
    let unknown = start(
        &bed,
        &running,
        &pod,
        &dbg2,
        Some("0123456789abcdef-no-such-container"),
        &events,
    )
    .await
    .unwrap_err();
    assert_eq!(unknown.reason, "CreateContainerError");
    assert!(unknown.message.contains("not found"), "{}", unknown.message);
    assert!(!unknown.retryable, "an id that does not exist never will");

    let failed: Vec<(String, String)> = events
        .reasons()
        .into_iter()
        .filter(|(r, _)| r == "Failed")
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(failed[0].1.starts_with("Error: ") && failed[0].1.contains("is not running"));
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_container_looks_like_the_kubelets_and_reserves_nothing() {
    let bed = Bed::start("cri-labels").await;
    let pod = app_pod("labels");
    let running = bed.runner.run(&pod).await.expect("pod runs");
    let events = MemoryEvents::default();
    let dbg = debug_container("dbg", Some("app"), "sleep 60");
    let id = started_id(
        start(
            &bed,
            &running,
            &pod,
            &dbg,
            Some(&running.containers["app"]),
            &events,
        )
        .await
        .unwrap(),
    );

    let listed = bed
        .cri
        .list_containers(Some(ContainerFilter {
            label_selector: [(
                kubelet::POD_UID_LABEL.to_string(),
                kubelet::uid(&pod).to_string(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }))
        .await
        .unwrap();
    let mine = listed
        .iter()
        .find(|c| c.id == id)
        .expect("found by the pod-uid label");
    let labels: BTreeMap<_, _> = mine.labels.clone().into_iter().collect();
    assert_eq!(
        labels,
        BTreeMap::from([
            (
                "io.kubernetes.container.name".to_string(),
                "dbg".to_string()
            ),
            ("io.kubernetes.pod.name".to_string(), "labels".to_string()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                "default".to_string()
            ),
            (
                "io.kubernetes.pod.uid".to_string(),
                kubelet::uid(&pod).to_string()
            ),
        ])
    );
    let ours: BTreeMap<_, _> = mine
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with("io.kubernetes."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        ours.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "io.kubernetes.container.hash",
            "io.kubernetes.container.restartCount",
            "io.kubernetes.container.terminationMessagePath",
            "io.kubernetes.container.terminationMessagePolicy",
            "io.kubernetes.pod.terminationGracePeriod",
        ]
    );
    assert_eq!(ours["io.kubernetes.container.restartCount"], "0");
    assert_eq!(
        ours["io.kubernetes.container.hash"],
        format!(
            "{:x}",
            kubelet::container_hash("dbg", ephemerald::testbed::images::BUSYBOX_IMAGE)
        )
    );

    let spec = runtime_spec(bed.cri.as_ref(), &id).await;
    let resources = &spec["linux"]["resources"];
    assert!(
        resources["memory"]["limit"].is_null(),
        "no memory limit of its own: {resources}"
    );
    assert!(
        resources["cpu"]["quota"].is_null(),
        "no CPU quota: {resources}"
    );
    assert!(
        spec["linux"]["cgroupsPath"]
            .as_str()
            .unwrap()
            .starts_with(&bed.containerd.pod_cgroup_parent(kubelet::uid(&pod))),
        "in the pod's cgroup: {}",
        spec["linux"]["cgroupsPath"]
    );
    let pid_ns = spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["type"] == "pid")
        .cloned()
        .expect("pid namespace entry");
    assert!(
        pid_ns["path"].as_str().unwrap().starts_with("/proc/"),
        "joins the target's: {pid_ns}"
    );
    let mounts: Vec<&str> = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["destination"].as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"/etc/hosts"), "{mounts:?}");
    assert!(mounts.contains(&"/dev/termination-log"), "{mounts:?}");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_3_is_exited_with_code_3_logged_at_the_kubelet_path_and_never_restarted() {
    let bed = Bed::start("cri-exit").await;
    let pod = app_pod("exits");
    let running = bed.runner.run(&pod).await.expect("pod runs");
    let events = MemoryEvents::default();
    let dbg = debug_container(
        "dbg",
        Some("app"),
        "echo bye; echo gone > /dev/termination-log; exit 3",
    );
    let id = started_id(
        start(
            &bed,
            &running,
            &pod,
            &dbg,
            Some(&running.containers["app"]),
            &events,
        )
        .await
        .unwrap(),
    );
    wait_state(&bed, &id, ContainerState::ContainerExited).await;

    let status = bed
        .cri
        .container_status(&id, false)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.exit_code, 3);
    assert_eq!(status.reason, "Error");
    let want_log = log_path(&bed, &pod, "dbg");
    assert_eq!(
        status.log_path,
        want_log.display().to_string(),
        "the kubelet's log path"
    );
    assert!(log_text(&want_log).unwrap().contains("bye"));

    // The agent's view: observed as exited with the termination message, and
    // the plan starts nothing more, now or later.
    let mut pod_with_ec = pod.clone();
    pod_with_ec.spec.as_mut().unwrap().ephemeral_containers = Some(vec![dbg.clone()]);
    for _ in 0..3 {
        let seen = observe::observe(
            bed.cri.as_ref(),
            kubelet::uid(&pod),
            &HashSet::from(["dbg"]),
        )
        .await
        .unwrap();
        let mine: Vec<_> = seen.containers.iter().filter(|c| c.name == "dbg").collect();
        assert_eq!(mine.len(), 1, "exactly one container named dbg");
        assert_eq!(mine[0].id, id);
        assert_eq!(mine[0].exit_code, 3);
        assert_eq!(
            mine[0].message, "gone\n",
            "termination message read from the file"
        );
        assert!(
            plan::plan(&pod_with_ec, &seen, &Gates::default())
                .actions
                .is_empty()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_events_arrive_from_containerd() {
    let bed = Bed::start("cri-events").await;
    let pod = app_pod("events");
    let running = bed.runner.run(&pod).await.expect("pod runs");
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(ephemerald::events::run(
        ephemerald::events::Sources {
            runtime: bed.cri.clone(),
            containerd_socket: Some(bed.containerd.socket().to_path_buf()),
            namespace: "k8s.io".into(),
            opened: None,
        },
        tx,
        cancel.clone(),
    ));
    // Subscribing takes a moment; start containers until one's exit is seen.
    let events = MemoryEvents::default();
    let mut ids = HashSet::new();
    let deadline = std::time::Instant::now() + WAIT;
    let got = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no exit event within {WAIT:?}"
        );
        let dbg = debug_container(&format!("dbg{}", ids.len()), None, "exit 7");
        if let Ok(Started::Started { id, .. }) =
            start(&bed, &running, &pod, &dbg, None, &events).await
        {
            ids.insert(id);
        }
        if let Ok(Some(exit)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
            && ids.contains(&exit.container_id)
        {
            break exit;
        }
    };
    assert!(ids.contains(&got.container_id));
    cancel.cancel();
    task.await.unwrap();
    bed.stop().await;
}
