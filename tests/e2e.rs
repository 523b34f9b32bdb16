//! End to end: the local API server, the `ephemerald` binary as a separate
//! process (so it can be SIGKILLed), real containerd + runc, and the real
//! kubectl. Fails, never skips, when containerd or kubectl is missing.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{
    AgentProc, app_pod, debug_container, host_pid, proc_status, running, runtime_ids, stack,
    status_of, terminated,
};
use ephemerald::cri::Runtime;
use ephemerald::kubelet;
use ephemerald_testbed::stack::Stack;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

const WAIT: Duration = Duration::from_secs(30);

/// Appends a busybox debug container to pod `web`, as `kubectl debug` does.
async fn add(stack: &Stack, name: &str, target: Option<&str>, script: &str) {
    stack
        .add_ephemeral("default", "web", &debug_container(name, target, script))
        .await
        .unwrap();
}

/// Waits until the API shows `name` of pod `web` running.
async fn wait_running(stack: &Stack, name: &str) -> ContainerStatus {
    stack
        .wait_pod("default", "web", &format!("{name} running"), WAIT, |p| {
            running(p, name)
        })
        .await
        .unwrap()
}

fn log_of(stack: &Stack, pod: &Pod, name: &str) -> String {
    let path = kubelet::container_log_dir(&stack.dirs.pod_logs, pod, name).join("0.log");
    std::fs::read_to_string(path)
        .map(|raw| ephemerald::reconcile::observe::cri_log_messages(&raw))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_container_runs_with_id_and_start_time_and_sees_the_target() {
    let stack = stack("e2e-run").await;
    let _agent = AgentProc::start(&stack, "5s");
    let (pod, _) = stack.run_pod(app_pod("web")).await.unwrap();
    add(&stack, "dbg", Some("app"), "ps; sleep 60").await;
    let st = wait_running(&stack, "dbg").await;
    let id = st.container_id.clone().expect("containerID");
    assert!(id.starts_with("containerd://"), "{id}");
    assert!(st.state.unwrap().running.unwrap().started_at.is_some());
    assert!(!st.ready);
    assert_eq!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg").await,
        [id.trim_start_matches("containerd://")]
    );
    let deadline = Instant::now() + WAIT;
    while !log_of(&stack, &pod, "dbg").contains("/app") {
        assert!(
            Instant::now() < deadline,
            "ps never showed /app: {:?}",
            log_of(&stack, &pod, "dbg")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events: Vec<(String, String)> = stack
        .api
        .events()
        .into_iter()
        .filter(|e| {
            e.involved_object.field_path.as_deref() == Some("spec.ephemeralContainers{dbg}")
        })
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect();
    let reasons: Vec<&str> = events.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(reasons, ["Pulled", "Created", "Started"], "{events:?}");
    stack.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_3_is_terminated_within_a_second_and_never_restarted() {
    let stack = stack("e2e-exit").await;
    let agent = AgentProc::start(&stack, "1s");
    let (pod, _) = stack.run_pod(app_pod("web")).await.unwrap();
    add(&stack, "dbg", Some("app"), "sleep 1; exit 3").await;
    let st = stack
        .wait_pod("default", "web", "dbg terminated", WAIT, |p| {
            terminated(p, "dbg")
        })
        .await
        .unwrap();
    let t = st.state.unwrap().terminated.unwrap();
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert!(t.started_at.is_some() && t.finished_at.is_some() && t.container_id.is_some());

    // Reported within a second of the exit (the runtime's own exit time).
    let id = st
        .container_id
        .unwrap()
        .trim_start_matches("containerd://")
        .to_string();
    let finished_ns = stack
        .cri
        .container_status(&id, false)
        .await
        .unwrap()
        .status
        .unwrap()
        .finished_at;
    let exited = SystemTime::UNIX_EPOCH + Duration::from_nanos(finished_ns as u64);
    let reported = stack
        .api
        .status_history("default", "web")
        .into_iter()
        .find(|r| {
            r.ephemeral_container_statuses.iter().any(|s| {
                s.name == "dbg" && s.state.as_ref().is_some_and(|x| x.terminated.is_some())
            })
        })
        .expect("a terminated status write")
        .at;
    let lag = reported.duration_since(exited).unwrap_or_default();
    assert!(
        lag < Duration::from_secs(1),
        "terminated status took {lag:?} after the exit; agent log:\n{}",
        agent.log()
    );

    // Several resync periods later the runtime still holds exactly that one.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg").await,
        std::slice::from_ref(&id)
    );
    let final_pod = stack.api.pod("default", "web").unwrap();
    assert!(terminated(&final_pod, "dbg").is_some(), "still terminated");
    assert!(
        stack.api.rejected_status_writes().is_empty(),
        "{:?}",
        stack.api.rejected_status_writes()
    );
    stack.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_container_added_later_leaves_the_first_untouched_and_sorted() {
    let stack = stack("e2e-second").await;
    let _agent = AgentProc::start(&stack, "5s");
    stack.run_pod(app_pod("web")).await.unwrap();
    add(&stack, "zz", Some("app"), "sleep 60").await;
    let first = wait_running(&stack, "zz").await;
    add(&stack, "aa", None, "sleep 60").await;
    let pod = stack
        .wait_pod("default", "web", "aa running", WAIT, |p| {
            running(p, "aa").map(|_| p.clone())
        })
        .await
        .unwrap();
    let statuses = pod.status.unwrap().ephemeral_container_statuses.unwrap();
    let names: Vec<&str> = statuses.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["aa", "zz"], "sorted by name");
    assert_eq!(statuses[1], first, "the first status is untouched");
    stack.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_after_create_and_restarted_makes_no_duplicate() {
    let stack = stack("e2e-kill").await;
    let mut agent = AgentProc::start(&stack, "1s");
    let (pod, _) = stack.run_pod(app_pod("web")).await.unwrap();
    add(&stack, "dbg", Some("app"), "sleep 60").await;
    // SIGKILL as soon as the runtime holds the container.
    let deadline = Instant::now() + WAIT;
    while runtime_ids(stack.cri.as_ref(), &pod, "dbg")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "never created; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    agent.kill();
    let before = runtime_ids(stack.cri.as_ref(), &pod, "dbg").await;

    // Depending on where the kill landed the runtime holds it created,
    // running, or exited (containerd aborts a start whose caller vanished:
    // exit 128, StartError). Whatever it is, the restarted agent must not
    // create another one, and the API status must converge on the runtime's
    // state: running (a created one is started) or terminated with its code.
    let agent2 = AgentProc::start(&stack, "1s");
    let id = before[0].clone();
    let converged = stack
        .wait_pod(
            "default",
            "web",
            "dbg converged after the restart",
            WAIT,
            |p| {
                let st = status_of(p, "dbg")?;
                let state = st.state.as_ref()?;
                (state.running.is_some() || state.terminated.is_some()).then_some(st)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent2.log()));
    assert_eq!(
        converged.container_id.as_deref(),
        Some(format!("containerd://{id}").as_str())
    );
    let runtime = stack
        .cri
        .container_status(&id, false)
        .await
        .unwrap()
        .status
        .unwrap();
    match converged.state.unwrap().terminated {
        Some(t) => assert_eq!(
            t.exit_code, runtime.exit_code,
            "terminated as the runtime says"
        ),
        None => assert_eq!(
            runtime.state,
            ephemerald::cri::proto::ContainerState::ContainerRunning as i32
        ),
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        runtime_ids(stack.cri.as_ref(), &pod, "dbg").await,
        before,
        "no duplicate"
    );
    assert_eq!(before.len(), 1);
    stack.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_but_never_started_container_is_started_not_duplicated() {
    let stack = stack("e2e-created").await;
    let (pod, running) = stack.run_pod(app_pod("web")).await.unwrap();
    // An agent that died between CreateContainer and StartContainer left this.
    let dbg = debug_container("dbg", Some("app"), "sleep 60");
    let stored = stack.api.pod("default", "web").unwrap();
    let mut with_dbg = stored.clone();
    with_dbg.spec.as_mut().unwrap().ephemeral_containers = Some(vec![dbg.clone()]);
    let image = stack
        .cri
        .image_status(ephemerald::cri::proto::ImageSpec {
            image: ephemerald_testbed::images::BUSYBOX_IMAGE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .unwrap();
    let config = ephemerald::reconcile::translate::container_config(
        &ephemerald::reconcile::translate::Inputs {
            pod: &with_dbg,
            container: &dbg,
            target_id: Some(&running.containers["app"]),
            image: &ephemerald::reconcile::translate::ResolvedImage {
                id: image.id,
                ..Default::default()
            },
            attempt: 0,
            host_files: &Default::default(),
            node: &stack.dirs,
        },
    )
    .unwrap();
    let id = stack
        .cri
        .create_container(&running.sandbox_id, config, running.sandbox_config.clone())
        .await
        .unwrap();
    stack.add_ephemeral("default", "web", &dbg).await.unwrap();

    let agent = AgentProc::start(&stack, "1s");
    let st = stack
        .wait_pod("default", "web", "dbg running", WAIT, running_status)
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    assert_eq!(
        st.container_id.as_deref(),
        Some(format!("containerd://{id}").as_str())
    );
    assert!(agent.log().contains("created but never started"));
    // Whoever starts it links its log, as the kubelet does after its start.
    let link =
        kubelet::legacy_log_symlink(&stack.dirs.container_logs, "web", "default", "dbg", &id);
    assert_eq!(
        std::fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display())),
        kubelet::container_log_dir(&stack.dirs.pod_logs, &pod, "dbg").join("0.log")
    );
    assert_eq!(runtime_ids(stack.cri.as_ref(), &pod, "dbg").await, [id]);
    stack.teardown().await.unwrap();
}

fn running_status(p: &Pod) -> Option<ContainerStatus> {
    running(p, "dbg")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_watch_while_a_container_is_appended_still_starts_it() {
    let stack = stack("e2e-watch").await;
    let agent = AgentProc::start(&stack, "30s");
    stack.run_pod(app_pod("web")).await.unwrap();
    add(&stack, "first", None, "sleep 60").await;
    stack
        .wait_pod("default", "web", "first running", WAIT, |p| {
            running(p, "first")
        })
        .await
        .unwrap();
    // The server goes away (every watch breaks) and forgets its history, so
    // the agent's resume gets 410 Gone and must relist; meanwhile a
    // container is appended.
    stack.api.compact();
    stack.api.restart().await;
    add(&stack, "second", None, "sleep 60").await;
    stack
        .wait_pod("default", "web", "second running", WAIT, |p| {
            running(p, "second")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    stack.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_with_never_is_err_image_never_pull_and_others_run() {
    let stack = stack("e2e-never").await;
    let _agent = AgentProc::start(&stack, "5s");
    stack.run_pod(app_pod("web")).await.unwrap();
    let mut missing = debug_container("missing", Some("app"), "true");
    missing.image = Some("ephemerald.local/nope:1.0".into());
    stack
        .add_ephemeral("default", "web", &missing)
        .await
        .unwrap();
    add(&stack, "fine", Some("app"), "sleep 60").await;
    let waiting = stack
        .wait_pod("default", "web", "ErrImageNeverPull", WAIT, |p| {
            let w = status_of(p, "missing")?.state?.waiting?;
            (w.reason.as_deref() == Some("ErrImageNeverPull")).then_some(w)
        })
        .await
        .unwrap();
    assert_eq!(
        waiting.message.as_deref(),
        Some(
            "Container image \"ephemerald.local/nope:1.0\" is not present with pull policy of Never"
        )
    );
    stack
        .wait_pod("default", "web", "fine running", WAIT, |p| {
            running(p, "fine")
        })
        .await
        .unwrap();
    assert!(
        stack
            .api
            .events()
            .iter()
            .any(|e| e.reason.as_deref() == Some("ErrImageNeverPull")
                && e.involved_object.field_path.as_deref()
                    == Some("spec.ephemeralContainers{missing}"))
    );
    stack.teardown().await.unwrap();
}

/// The official kubectl, installed by the project's script (never skipped).
fn kubectl() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join(".tools/bin/kubectl");
    if !bin.exists() {
        let ok = Command::new(root.join("scripts/install-kubectl.sh"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok && bin.exists(),
            "kubectl could not be installed by scripts/install-kubectl.sh"
        );
    }
    bin
}

fn run_kubectl(stack: &Stack, home: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(kubectl())
        .args(["--kubeconfig", &stack.kubeconfig.display().to_string()])
        .args(args)
        .env("HOME", home)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_debug_is_started_by_the_agent_and_kubectl_sees_its_status() {
    let stack = stack("e2e-kubectl").await;
    let _agent = AgentProc::start(&stack, "5s");
    let (pod, _) = stack.run_pod(app_pod("web")).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let image = ephemerald_testbed::images::BUSYBOX_IMAGE;
    let out = run_kubectl(
        &stack,
        home.path(),
        &[
            "debug",
            "web",
            &format!("--image={image}"),
            "--image-pull-policy=Never",
            "--target=app",
            "-c",
            "dbg",
            "--",
            "sh",
            "-c",
            "ps",
        ],
    );
    assert!(out.contains("Targeting container \"app\""), "{out}");
    stack
        .wait_pod("default", "web", "dbg terminated", WAIT, |p| {
            terminated(p, "dbg")
        })
        .await
        .unwrap();
    let code = run_kubectl(
        &stack,
        home.path(),
        &[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.status.ephemeralContainerStatuses[?(@.name==\"dbg\")].state.terminated.exitCode}",
        ],
    );
    assert_eq!(code.trim(), "0");
    let target = run_kubectl(
        &stack,
        home.path(),
        &[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.spec.ephemeralContainers[0].targetContainerName}",
        ],
    );
    assert_eq!(target.trim(), "app");
    assert!(
        log_of(&stack, &pod, "dbg").contains("/app"),
        "ps in the app's PID namespace"
    );
    stack.teardown().await.unwrap();
}

/// The seeds' main debugging use, end to end with the real kubectl and the
/// agent binary: ConfigMap and Secret made by `kubectl create -f`, the pod's
/// writer container puts a file in an `emptyDir`, and `kubectl debug
/// --custom` adds a container that mounts the volume read-only and takes its
/// env from both; it reads everything and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_debug_custom_reads_the_apps_empty_dir_with_env_from_the_api() {
    use k8s_openapi::api::core::v1::Container;

    let stack = stack("e2e-volume").await;
    let _agent = AgentProc::start(&stack, "1s");
    let home = tempfile::tempdir().unwrap();
    let kubectl = |args: &[&str]| run_kubectl(&stack, home.path(), args);
    // `kubectl create -f` sends JSON (its typed generators send protobuf,
    // which the local API server does not take); it serves no OpenAPI
    // schema, so kubectl's client-side validation is off.
    let objects = home.path().join("objects.json");
    std::fs::write(
        &objects,
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
             "data": {"LEVEL": "debug"}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
             "stringData": {"token": "t0ken"}},
        ]})
        .to_string(),
    )
    .unwrap();
    kubectl(&[
        "create",
        "--validate=false",
        "-f",
        &objects.display().to_string(),
    ]);

    let mut pod = app_pod("web");
    let spec = pod.spec.as_mut().unwrap();
    spec.volumes = Some(vec![
        serde_json::from_value(serde_json::json!({"name": "shared", "emptyDir": {}})).unwrap(),
    ]);
    spec.containers.push(
        serde_json::from_value::<Container>(serde_json::json!({
            "name": "writer",
            "image": ephemerald_testbed::images::BUSYBOX_IMAGE,
            "imagePullPolicy": "Never",
            "command": ["sh", "-c", "echo written-by-the-app > /shared/note; sleep 60"],
            "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        }))
        .unwrap(),
    );
    let (pod, _) = stack.run_pod(pod).await.unwrap();

    let custom = home.path().join("custom.json");
    std::fs::write(
        &custom,
        serde_json::json!({
            "volumeMounts": [{"name": "shared", "mountPath": "/data", "readOnly": true}],
            "envFrom": [{"configMapRef": {"name": "settings"}}],
            "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
        })
        .to_string(),
    )
    .unwrap();
    let image = ephemerald_testbed::images::BUSYBOX_IMAGE;
    kubectl(&[
        "debug",
        "web",
        &format!("--image={image}"),
        "--image-pull-policy=Never",
        "--target=writer",
        "-c",
        "dbg",
        &format!("--custom={}", custom.display()),
        "--",
        "sh",
        "-c",
        "while [ ! -s /data/note ]; do sleep 0.1; done; cat /data/note; echo \"level=$LEVEL token=$TOKEN\"",
    ]);
    let st = stack
        .wait_pod("default", "web", "dbg terminated", WAIT, |p| {
            terminated(p, "dbg")
        })
        .await
        .unwrap();
    let log = log_of(&stack, &pod, "dbg");
    assert_eq!(
        st.state.unwrap().terminated.unwrap().exit_code,
        0,
        "log: {log}"
    );
    assert_eq!(log.trim(), "written-by-the-app\nlevel=debug token=t0ken");
    stack.teardown().await.unwrap();
}

fn cap_bits(hex: &str) -> u64 {
    u64::from_str_radix(hex, 16).unwrap()
}

/// `kubectl debug --profile=…` as users run it: each profile's security
/// context reaches the runtime the way the kubelet would send it. Measured
/// on the running processes: `baseline` gets the runtime's default
/// capabilities; `general` adds SYS_PTRACE; `netadmin` adds NET_ADMIN and
/// NET_RAW; `sysadmin` is privileged (every capability this node grants);
/// `restricted` on a root image is the kubelet's runAsNonRoot refusal, and
/// with a non-root user it runs with no capabilities, no_new_privs and the
/// runtime's default seccomp filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_debug_profiles_reach_the_runtime_like_the_kubelets() {
    const SYS_PTRACE: u64 = 1 << 19;
    const NET_ADMIN: u64 = 1 << 12;
    const NET_RAW: u64 = 1 << 13;

    let stack = stack("e2e-profiles").await;
    let _agent = AgentProc::start(&stack, "5s");
    stack.run_pod(app_pod("web")).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let non_root = home.path().join("non-root.json");
    std::fs::write(&non_root, r#"{"securityContext":{"runAsUser":1000}}"#).unwrap();
    let image = format!("--image={}", ephemerald_testbed::images::BUSYBOX_IMAGE);
    let debug = |name: &str, profile: &str, extra: &[&str]| {
        let mut args = vec![
            "debug",
            "web",
            &image,
            "--image-pull-policy=Never",
            "--target=app",
            "-c",
            name,
        ];
        let profile = format!("--profile={profile}");
        args.push(&profile);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sleep", "60"]);
        run_kubectl(&stack, home.path(), &args);
    };
    debug("baseline", "baseline", &[]);
    debug("general", "general", &[]);
    debug("netadmin", "netadmin", &[]);
    debug("sysadmin", "sysadmin", &[]);
    debug("restricted-root", "restricted", &[]);
    let custom = format!("--custom={}", non_root.display());
    debug("restricted", "restricted", &[&custom]);

    let mut pids = std::collections::BTreeMap::new();
    for name in ["baseline", "general", "netadmin", "sysadmin", "restricted"] {
        let st = wait_running(&stack, name).await;
        let id = st.container_id.unwrap();
        let pid = host_pid(stack.cri.as_ref(), id.trim_start_matches("containerd://")).await;
        pids.insert(name, pid);
    }
    let caps = |name: &str| cap_bits(&proc_status(pids[name], "CapEff"));
    let base = caps("baseline");
    assert_ne!(base, 0);
    assert_eq!(base & SYS_PTRACE, 0, "no SYS_PTRACE by default");
    assert_eq!(caps("general"), base | SYS_PTRACE);
    assert_eq!(caps("netadmin"), base | NET_ADMIN | NET_RAW);
    let node_caps = cap_bits(&proc_status(std::process::id(), "CapBnd"));
    assert_eq!(caps("sysadmin"), node_caps, "privileged: every capability");
    assert_eq!(caps("restricted"), 0, "drop ALL");
    assert_eq!(proc_status(pids["restricted"], "NoNewPrivs"), "1");
    assert_eq!(
        proc_status(pids["restricted"], "Seccomp"),
        "2",
        "filter mode"
    );
    assert_eq!(
        proc_status(pids["restricted"], "Uid")
            .split_whitespace()
            .next(),
        Some("1000")
    );
    assert_eq!(
        proc_status(pids["baseline"], "Seccomp"),
        "0",
        "Unconfined, as the kubelet defaults"
    );

    let (reason, message) = stack
        .wait_pod("default", "web", "restricted-root refused", WAIT, |p| {
            let w = status_of(p, "restricted-root")?.state?.waiting?;
            (w.reason.as_deref() == Some("CreateContainerConfigError"))
                .then(|| (w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {:?}",
                stack
                    .api
                    .pod("default", "web")
                    .and_then(|p| status_of(&p, "restricted-root"))
            )
        });
    assert_eq!(reason, "CreateContainerConfigError");
    assert!(
        message.starts_with("container has runAsNonRoot and image will run as root"),
        "{message}"
    );
    stack.teardown().await.unwrap();
}
