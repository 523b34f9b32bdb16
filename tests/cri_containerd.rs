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
use ephemerald_testbed::pod_runner::RunningPod;
use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod};

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

/// Another creator (a kubelet) won the race: it created the container after
/// the agent looked at the runtime and before the agent's CreateContainer.
/// Whether it has only created it (containerd then refuses the agent's
/// create: the name is reserved) or also started it (its log of attempt 0
/// exists, so the agent would pick attempt 1 and no name would collide), the
/// start path adopts its container, makes no second one, and claims no
/// Created, Started or Failed Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_creators_container_is_adopted_whether_created_or_started() {
    let bed = Bed::start("cri-reserved").await;
    for also_started in [false, true] {
        let pod = app_pod(if also_started {
            "race-started"
        } else {
            "race-created"
        });
        let running = bed.runner.run(&pod).await.expect("pod runs");
        let app_id = running.containers["app"].clone();
        let dbg = debug_container("dbg", Some("app"), "sleep 60");

        let theirs = if also_started {
            started_id(
                start(
                    &bed,
                    &running,
                    &pod,
                    &dbg,
                    Some(&app_id),
                    &MemoryEvents::default(),
                )
                .await
                .expect("the other creator starts it"),
            )
        } else {
            let image = bed
                .cri
                .image_status(ephemerald::cri::proto::ImageSpec {
                    image: dbg.image.clone().unwrap(),
                    ..Default::default()
                })
                .await
                .expect("ImageStatus")
                .expect("busybox on the node");
            let config = translate::container_config(&translate::Inputs {
                pod: &pod,
                container: &dbg,
                target_id: Some(&app_id),
                image: &ResolvedImage {
                    id: image.id,
                    ..Default::default()
                },
                attempt: 0,
                host_files: &HostFiles::default(),
                node: &bed.dirs,
            })
            .expect("config");
            bed.cri
                .create_container(&running.sandbox_id, config, running.sandbox_config.clone())
                .await
                .expect("the other creator creates it")
        };
        let ours = MemoryEvents::default();
        match start(&bed, &running, &pod, &dbg, Some(&app_id), &ours).await {
            Ok(Started::Adopted { id }) => assert_eq!(id, theirs, "started: {also_started}"),
            other => panic!("expected adoption of {theirs}, got {other:?}"),
        }
        assert_eq!(
            runtime_ids(bed.cri.as_ref(), &pod, "dbg").await,
            [theirs],
            "exactly one container (started: {also_started})"
        );
        let reasons: Vec<String> = ours.reasons().into_iter().map(|(r, _)| r).collect();
        assert!(
            !reasons
                .iter()
                .any(|r| r == "Created" || r == "Started" || r == "Failed"),
            "{reasons:?}"
        );
    }
    bed.stop().await;
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
            image: ephemerald_testbed::images::BUSYBOX_IMAGE.into(),
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
            kubelet::container_hash("dbg", ephemerald_testbed::images::BUSYBOX_IMAGE)
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
    // The kubelet's resources for a container that requests nothing, read
    // back from the runtime: MinShares, the CFS period, BestEffort's OOM
    // score (the app pod requests nothing), the default masked and
    // read-only paths, the image's user (busybox names none: root).
    assert_eq!(resources["cpu"]["shares"], 2, "MinShares: {resources}");
    assert_eq!(resources["cpu"]["period"], 100_000, "{resources}");
    assert_eq!(spec["process"]["oomScoreAdj"], 1000, "BestEffort");
    assert_eq!(
        spec["linux"]["maskedPaths"],
        serde_json::json!(translate::masked_paths(false, &bed.dirs.host)),
    );
    assert!(
        spec["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&"/proc/interrupts".into())
    );
    assert_eq!(
        spec["linux"]["readonlyPaths"],
        serde_json::json!(translate::DEFAULT_READONLY_PATHS)
    );
    assert_eq!(spec["process"]["user"]["uid"], 0, "{}", spec["process"]);
    // What containerd was sent (its record of the CRI config): the run_as_user
    // and a zero hugetlb limit per page size of the host, which containerd
    // only passes on where the hugetlb controller is mounted.
    let sent = &cri_info(bed.cri.as_ref(), &id).await["config"];
    // Go's JSON leaves the 0 out: an empty object is run_as_user 0, set.
    let run_as_user = &sent["linux"]["security_context"]["run_as_user"];
    assert!(
        run_as_user.is_object() && run_as_user["value"].as_i64().unwrap_or(0) == 0,
        "{sent}"
    );
    let sizes: Vec<&str> = sent["linux"]["resources"]["hugepage_limits"]
        .as_array()
        .map(|l| l.iter().filter_map(|h| h["page_size"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(sizes, bed.dirs.host.hugepage_sizes, "{sent}");
    let hugetlb_controller =
        std::path::Path::new("/sys/fs/cgroup/hugetlb").exists() || bed.dirs.host.cgroup2;
    assert_eq!(
        !resources["hugepageLimits"].is_null(),
        hugetlb_controller && !sizes.is_empty(),
        "{resources}"
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

/// The kubelet's legacy log symlink (`legacyLogSymlink`, made after
/// StartContainer): `<container logs>/<pod>_<namespace>_<container>-<id>.log`
/// → the log file the runtime writes (read through the link, it holds the
/// container's output); for a long pod name the link's name is cut to 255
/// bytes. Removed as the kubelet removes it: once the runtime no longer
/// holds the container, or once its log is gone and it has exited; kept for
/// a running container whose log is missing for a moment (rotation), and
/// links that point elsewhere, or plain files, are never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_log_symlink_points_at_the_runtimes_log_and_goes_with_the_container() {
    let bed = Bed::start("cri-loglink").await;
    let dir = bed.dirs.container_logs.clone();
    let sweep = || ephemerald::reconcile::logs::sweep(bed.cri.as_ref(), &dir, &bed.dirs.pod_logs);
    std::fs::create_dir_all(&dir).unwrap();
    let foreign = dir.join("other_default_x-abcdef123456.log");
    std::os::unix::fs::symlink("/etc/hostname", &foreign).unwrap();
    let plain = dir.join("plain_default_x-abcdef123456.log");
    std::fs::write(&plain, "not a link").unwrap();

    let long = "l".repeat(200);
    let mut links = vec![];
    for (i, name) in ["loglink", long.as_str()].into_iter().enumerate() {
        let mut pod = app_pod(name);
        // A UID as long as the API server's, so that the pod's log
        // directory name stays within the file-name limit.
        pod.metadata.uid = Some(format!(
            "{i:08}-{:04}-4000-8000-000000000000",
            std::process::id() % 10_000
        ));
        let running = bed.runner.run(&pod).await.expect("pod runs");
        let dbg = debug_container("dbg", Some("app"), "echo hello-from-dbg; sleep 60");
        let id = started_id(
            start(
                &bed,
                &running,
                &pod,
                &dbg,
                Some(&running.containers["app"]),
                &MemoryEvents::default(),
            )
            .await
            .unwrap(),
        );
        let link = kubelet::legacy_log_symlink(&dir, name, "default", "dbg", &id);
        let file_name = link.file_name().unwrap().to_str().unwrap().to_string();
        if name == long {
            assert_eq!(file_name.len(), 255, "cut to the limit: {file_name}");
            assert!(file_name.ends_with(".log"));
        } else {
            assert_eq!(file_name, format!("loglink_default_dbg-{id}.log"));
        }
        let log = log_path(&bed, &pod, "dbg");
        assert_eq!(std::fs::read_link(&link).unwrap(), log);
        let status = bed
            .cri
            .container_status(&id, false)
            .await
            .unwrap()
            .status
            .unwrap();
        assert_eq!(
            status.log_path,
            log.display().to_string(),
            "the file the runtime writes"
        );
        eventually("the output through the link", WAIT, || async {
            log_text(&link)?.contains("hello-from-dbg").then_some(())
        })
        .await;
        links.push((link, id, log));
    }
    assert_eq!(
        sweep().await.unwrap().removed,
        Vec::<std::path::PathBuf>::new(),
        "all alive"
    );

    // Log briefly gone while running (rotation): kept.
    let (link, id, log) = links[0].clone();
    let aside = log.with_extension("rotating");
    std::fs::rename(&log, &aside).unwrap();
    assert!(sweep().await.unwrap().removed.is_empty(), "running: kept");
    std::fs::rename(&aside, &log).unwrap();
    // Exited with its log: kept; exited with the log gone: removed.
    bed.cri.stop_container(&id, 0).await.unwrap();
    wait_state(&bed, &id, ContainerState::ContainerExited).await;
    assert!(
        sweep().await.unwrap().removed.is_empty(),
        "exited, log there: kept"
    );
    std::fs::remove_file(&log).unwrap();
    assert_eq!(sweep().await.unwrap().removed, std::slice::from_ref(&link));
    assert!(std::fs::symlink_metadata(&link).is_err());

    // Removed from the runtime (log still there): removed.
    let (link, id, _) = links[1].clone();
    bed.cri.stop_container(&id, 0).await.unwrap();
    bed.cri.remove_container(&id).await.unwrap();
    assert_eq!(sweep().await.unwrap().removed, std::slice::from_ref(&link));
    assert!(std::fs::symlink_metadata(&link).is_err());

    assert!(
        std::fs::symlink_metadata(&foreign).is_ok(),
        "a link elsewhere is not ours"
    );
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "not a link");
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

/// The seeds' main debugging use, on real containerd: a container of the pod
/// writes into an `emptyDir` and a `hostPath` (`DirectoryOrCreate`) that
/// the pod runner set up where the kubelet would; an ephemeral container
/// that mounts both reads what it wrote, sees the read-only mount refuse a
/// write, and writes through the read-write one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_container_reads_what_the_app_wrote_into_pod_volumes() {
    let bed = Bed::start("cri-volumes").await;
    let host_share = bed.containerd.dir().join("host-share");
    let mut pod = app_pod("volumes");
    let spec = pod.spec.as_mut().unwrap();
    spec.volumes = Some(vec![
        serde_json::from_value(serde_json::json!({"name": "shared", "emptyDir": {}})).unwrap(),
        serde_json::from_value(serde_json::json!({"name": "host", "hostPath": {
            "path": host_share.display().to_string(), "type": "DirectoryOrCreate"}}))
        .unwrap(),
    ]);
    let writer: Container = serde_json::from_value(serde_json::json!({
        "name": "writer",
        "image": ephemerald_testbed::images::BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c",
            "echo from-the-app > /shared/note && echo on-the-host > /host/note && sleep 60"],
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"},
                         {"name": "host", "mountPath": "/host"}],
    }))
    .unwrap();
    spec.containers.push(writer);
    let running = bed.runner.run(&pod).await.expect("pod runs");

    let empty_dir =
        kubelet::pod_dir(&bed.dirs.pods, &pod).join("volumes/kubernetes.io~empty-dir/shared");
    eventually("the app's file in the emptyDir", WAIT, || async {
        std::fs::read_to_string(empty_dir.join("note")).ok()
    })
    .await;

    let mut dbg = debug_container(
        "dbg",
        Some("writer"),
        "cat /data/note /hostdata/note; if touch /data/x; then exit 3; fi; echo from-dbg > /hostdata/reply",
    );
    dbg.volume_mounts = Some(
        serde_json::from_value(serde_json::json!([
            {"name": "shared", "mountPath": "/data", "readOnly": true},
            {"name": "host", "mountPath": "/hostdata"},
        ]))
        .unwrap(),
    );
    let events = MemoryEvents::default();
    let id = started_id(
        start(
            &bed,
            &running,
            &pod,
            &dbg,
            Some(&running.containers["writer"]),
            &events,
        )
        .await
        .expect("starts"),
    );
    wait_state(&bed, &id, ContainerState::ContainerExited).await;
    let status = bed.cri.container_status(&id, false).await.unwrap();
    let log = log_text(&log_path(&bed, &pod, "dbg")).unwrap_or_default();
    assert_eq!(
        status.status.map(|s| s.exit_code),
        Some(0),
        "the debug container read both files and could not write the read-only mount; log: {log}"
    );
    assert!(log.contains("from-the-app"), "{log}");
    assert!(log.contains("on-the-host"), "{log}");
    assert_eq!(
        std::fs::read_to_string(host_share.join("reply")).unwrap(),
        "from-dbg\n"
    );
    assert!(!empty_dir.join("x").exists());
    bed.stop().await;
}

/// A mount of a kubelet-managed volume whose directory is not set up on the
/// node is a `CreateContainerConfigError` before anything is created (the
/// runtime would otherwise mount an empty directory of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_not_set_up_on_the_node_is_a_config_error() {
    let bed = Bed::start("cri-novol").await;
    let mut pod = app_pod("novol");
    pod.spec.as_mut().unwrap().volumes = Some(vec![
        serde_json::from_value(
            serde_json::json!({"name": "cfg", "configMap": {"name": "settings"}}),
        )
        .unwrap(),
    ]);
    let running = bed.runner.run(&pod).await.expect("pod runs");
    let mut dbg = debug_container("dbg", Some("app"), "ls /cfg");
    dbg.volume_mounts = Some(vec![k8s_openapi::api::core::v1::VolumeMount {
        name: "cfg".into(),
        mount_path: "/cfg".into(),
        ..Default::default()
    }]);
    let events = MemoryEvents::default();
    let err = start(
        &bed,
        &running,
        &pod,
        &dbg,
        Some(&running.containers["app"]),
        &events,
    )
    .await
    .unwrap_err();
    let dir = kubelet::pod_dir(&bed.dirs.pods, &pod).join("volumes/kubernetes.io~configmap/cfg");
    assert_eq!(err.reason, "CreateContainerConfigError");
    assert_eq!(
        err.message,
        format!(
            "volume for mount /cfg is not set up on this node: {} does not exist",
            dir.display()
        )
    );
    assert!(err.retryable);
    assert!(!dir.exists(), "nothing was created in its place");
    assert!(
        events
            .reasons()
            .contains(&("Failed".to_string(), format!("Error: {}", err.message))),
        "{:?}",
        events.reasons()
    );
    bed.stop().await;
}

async fn exit_code(bed: &Bed, id: &str) -> Option<i32> {
    let st = bed.cri.container_status(id, false).await.unwrap();
    st.status.map(|s| s.exit_code)
}

/// Unmounts (deepest first) on drop, so a failing test leaves no mounts.
struct Mounts(Vec<std::path::PathBuf>);

impl Mounts {
    fn run(&mut self, args: &[&str], target: &std::path::Path) {
        let ok = std::process::Command::new("mount")
            .args(args)
            .arg(target)
            .status()
            .expect("mount runs")
            .success();
        assert!(ok, "mount {args:?} {}", target.display());
        self.0.push(target.to_path_buf());
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
    }
}

/// `mountPropagation` reaches runc as the kubelet's CRI propagation, on
/// real containerd: `HostToContainer` shows the container a mount made on
/// the host after it started; `Bidirectional` (privileged) shows the host a
/// mount made in the container; and containerd itself refuses
/// `HostToContainer` of a path whose mount is private
/// (`CreateContainerError` with its message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_propagation_reaches_the_runtime() {
    let bed = Bed::start("cri-propagation").await;
    let shared = bed.containerd.dir().join("shared");
    let private = bed.containerd.dir().join("private");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&private).unwrap();
    let mut mounts = Mounts(vec![]);
    mounts.run(&["--bind", &shared.display().to_string()], &shared);
    mounts.run(&["--make-shared"], &shared);
    mounts.run(&["--bind", &private.display().to_string()], &private);
    mounts.run(&["--make-private"], &private);
    std::fs::create_dir_all(shared.join("from-host")).unwrap();
    std::fs::create_dir_all(shared.join("from-container")).unwrap();

    let mount_of = |volume: &str, path: &str, mode: &str| serde_json::json!({"name": volume, "mountPath": path, "mountPropagation": mode});
    let mut watcher = debug_container(
        "watcher",
        Some("app"),
        "while [ ! -f /mnt/from-host/marker ]; do sleep 0.1; done; echo seen",
    );
    watcher.volume_mounts = Some(
        serde_json::from_value(serde_json::json!([mount_of(
            "shared",
            "/mnt",
            "HostToContainer"
        )]))
        .unwrap(),
    );
    let mut mounter = debug_container(
        "mounter",
        Some("app"),
        "mount -t tmpfs tmpfs /mnt/from-container && touch /mnt/from-container/marker",
    );
    mounter.security_context = Some(k8s_openapi::api::core::v1::SecurityContext {
        privileged: Some(true),
        ..Default::default()
    });
    mounter.volume_mounts = Some(
        serde_json::from_value(serde_json::json!([mount_of(
            "shared",
            "/mnt",
            "Bidirectional"
        )]))
        .unwrap(),
    );
    let mut refused = debug_container("refused", Some("app"), "true");
    refused.volume_mounts = Some(
        serde_json::from_value(serde_json::json!([mount_of(
            "private",
            "/mnt",
            "HostToContainer"
        )]))
        .unwrap(),
    );

    let mut pod = app_pod("propagation");
    let spec = pod.spec.as_mut().unwrap();
    spec.volumes = Some(
        serde_json::from_value(serde_json::json!([
            {"name": "shared", "hostPath": {"path": shared.display().to_string()}},
            {"name": "private", "hostPath": {"path": private.display().to_string()}},
        ]))
        .unwrap(),
    );
    // A privileged container needs a privileged sandbox: the kubelet decides
    // that from every container the pod has when the sandbox is created.
    spec.ephemeral_containers = Some(vec![mounter.clone()]);
    let running = bed.runner.run(&pod).await.expect("pod runs");
    let app = running.containers["app"].clone();
    let events = MemoryEvents::default();

    let watcher_id = started_id(
        start(&bed, &running, &pod, &watcher, Some(&app), &events)
            .await
            .expect("watcher starts"),
    );
    wait_state(&bed, &watcher_id, ContainerState::ContainerRunning).await;
    mounts.run(&["-t", "tmpfs", "tmpfs"], &shared.join("from-host"));
    std::fs::write(shared.join("from-host/marker"), "").unwrap();
    wait_state(&bed, &watcher_id, ContainerState::ContainerExited).await;
    assert_eq!(exit_code(&bed, &watcher_id).await, Some(0));
    assert!(
        log_text(&log_path(&bed, &pod, "watcher"))
            .unwrap_or_default()
            .contains("seen")
    );

    let mounter_id = started_id(
        start(&bed, &running, &pod, &mounter, Some(&app), &events)
            .await
            .expect("mounter starts"),
    );
    wait_state(&bed, &mounter_id, ContainerState::ContainerExited).await;
    let log = log_text(&log_path(&bed, &pod, "mounter")).unwrap_or_default();
    assert_eq!(exit_code(&bed, &mounter_id).await, Some(0), "{log}");
    mounts.0.push(shared.join("from-container"));
    assert!(
        shared.join("from-container/marker").exists(),
        "the container's mount propagated to the host"
    );

    let err = start(&bed, &running, &pod, &refused, Some(&app), &events)
        .await
        .unwrap_err();
    assert_eq!(err.reason, "CreateContainerError");
    assert!(
        err.message.contains("is not a shared or slave mount"),
        "{}",
        err.message
    );
    drop(mounts);
    bed.stop().await;
}
