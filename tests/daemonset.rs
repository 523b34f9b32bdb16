//! The DaemonSet as users deploy it: the agent's image is built from the
//! cargo-built binary (as `deploy/Dockerfile` packs it), the pod template of
//! `deploy/daemonset.yaml` is run by the pod runner on real containerd with
//! only the testbed's differences from a real node applied (listed and
//! checked below), and the agent, running as that container, starts an
//! ephemeral container in another pod. No agent runs on the host here.
//! Fails, never skips, without root or containerd.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    app_pod, debug_container, host_pid, log_text, pid_ns, proc_status, running, runtime_ids,
};
use ephemerald::cri::Runtime;
use ephemerald::cri::proto::ContainerState;
use ephemerald::kubelet;
use ephemerald_testbed::http_get;
use ephemerald_testbed::images::{self, AGENT_IMAGE};
use ephemerald_testbed::pod_runner::make_rshared;
use ephemerald_testbed::stack::Stack;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{EnvVar, HostPathVolumeSource, Pod, Probe, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

const MANIFEST: &str = include_str!("../deploy/daemonset.yaml");
const DOCKERFILE: &str = include_str!("../deploy/Dockerfile");
const WAIT: Duration = Duration::from_secs(30);
/// Where the testbed mounts the kubeconfig of its local API server.
const KUBECONFIG_IN_POD: &str = "/etc/ephemerald/kubeconfig";

/// The manifest's DaemonSet, checked to hold only fields of the API (a
/// misspelt field would be dropped by the typed round trip).
fn daemonset() -> DaemonSet {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(MANIFEST).expect("deploy/daemonset.yaml parses as YAML");
    let doc = docs
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("deploy/daemonset.yaml holds a DaemonSet");
    let ds: DaemonSet = serde_json::from_value(doc.clone()).expect("an apps/v1 DaemonSet");
    assert_eq!(
        serde_json::to_value(&ds).unwrap(),
        doc,
        "every field of the DaemonSet is an API field"
    );
    ds
}

/// The JSON array of a Dockerfile instruction in exec form, e.g. `CMD ["run"]`.
fn dockerfile_exec_form(instruction: &str) -> Vec<String> {
    let line = DOCKERFILE
        .lines()
        .rfind(|l| l.starts_with(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("deploy/Dockerfile has no {instruction}"));
    serde_json::from_str(&line[instruction.len()..])
        .unwrap_or_else(|e| panic!("{line}: not in exec form: {e}"))
}

#[test]
fn the_testbed_image_keeps_the_dockerfiles_entrypoint_and_command() {
    assert_eq!(
        dockerfile_exec_form("ENTRYPOINT"),
        [images::AGENT_BIN_IN_IMAGE]
    );
    assert_eq!(dockerfile_exec_form("CMD"), images::AGENT_CMD);
}

/// The pod the DaemonSet controller creates from the template for a node
/// (the pod runner binds it to the node).
fn daemonset_pod(ds: &DaemonSet) -> Pod {
    let template = ds.spec.clone().expect("spec").template;
    let mut metadata = template.metadata.unwrap_or_default();
    metadata.generate_name = Some(format!("{}-", ds.metadata.name.as_deref().unwrap()));
    metadata.namespace = ds.metadata.namespace.clone();
    Pod {
        metadata,
        spec: template.spec,
        status: None,
    }
}

/// What must differ on the testbed from a real node, and nothing else:
/// - the image: the one built here, not the manifest's `ephemerald:dev`;
/// - containerd's socket directory: the testbed's containerd listens in its
///   own directory (`containerd.sock` there too), which is mounted where the
///   manifest mounts `/run/containerd`, so the socket env values stay;
/// - the pod log, container log and kubelet pod directories: the agent
///   hands paths below them to the runtime (and links into the pod logs),
///   which resolves them on the host, so the manifest mounts each at its own
///   host path; on the testbed both sides move to the testbed's
///   directories, and the agent is told where they are;
/// - credentials: the local API server speaks plain http with no service
///   account tokens, so the pod gets a kubeconfig for it instead.
///
/// `--mode auto`, host PID and network, privileges, propagation, args,
/// probes and resources all stay as written (the testbed has no kubelet
/// Lease, so `auto` starts containers, as on a node without a kubelet).
fn adapt_to_testbed(pod: &mut Pod, stack: &Stack) {
    let kubelet_root = stack.dirs.pods.parent().expect("pods dir has a parent");
    // (host path in the manifest, the testbed's, mounted at its host path)
    let host_dirs = [
        ("/run/containerd", stack.containerd.dir(), false),
        ("/var/log/pods", stack.dirs.pod_logs.as_path(), true),
        (
            "/var/log/containers",
            stack.dirs.container_logs.as_path(),
            true,
        ),
        ("/var/lib/kubelet/pods", stack.dirs.pods.as_path(), true),
    ];
    let spec = pod.spec.as_mut().expect("pod spec");
    let mut moved = std::collections::BTreeMap::new();
    for v in spec.volumes.iter_mut().flatten() {
        let hp = v.host_path.as_mut().expect("only hostPath volumes");
        let (_, dir, same_path) = host_dirs
            .iter()
            .find(|(real, _, _)| *real == hp.path)
            .unwrap_or_else(|| panic!("the testbed has no equivalent of {}", hp.path));
        hp.path = dir.display().to_string();
        moved.insert(v.name.clone(), (hp.path.clone(), *same_path));
    }
    spec.volumes.get_or_insert_default().push(Volume {
        name: "testbed-kubeconfig".into(),
        host_path: Some(HostPathVolumeSource {
            path: stack.kubeconfig.display().to_string(),
            type_: Some("File".into()),
        }),
        ..Default::default()
    });
    let c = &mut spec.containers[0];
    c.image = Some(AGENT_IMAGE.into());
    for m in c.volume_mounts.iter_mut().flatten() {
        if let Some((host, true)) = moved.get(&m.name) {
            m.mount_path = host.clone();
        }
    }
    c.volume_mounts.get_or_insert_default().push(VolumeMount {
        name: "testbed-kubeconfig".into(),
        mount_path: KUBECONFIG_IN_POD.into(),
        read_only: Some(true),
        ..Default::default()
    });
    let env = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    };
    c.env.get_or_insert_default().extend([
        env(
            "EPHEMERALD_POD_LOGS_DIR",
            stack.dirs.pod_logs.display().to_string(),
        ),
        env(
            "EPHEMERALD_KUBELET_ROOT_DIR",
            kubelet_root.display().to_string(),
        ),
        env(
            "EPHEMERALD_CONTAINER_LOGS_DIR",
            stack.dirs.container_logs.display().to_string(),
        ),
        env("KUBECONFIG", KUBECONFIG_IN_POD.into()),
    ]);
}

/// Paths where two JSON documents differ; list entries with a `name` are
/// matched by name (`env[KUBECONFIG]`), others by index.
fn differences(a: &Value, b: &Value, path: &str, out: &mut BTreeSet<String>) {
    let named = |v: &Value| -> Option<Vec<(String, Value)>> {
        v.as_array()?
            .iter()
            .map(|e| Some((e["name"].as_str()?.to_string(), e.clone())))
            .collect()
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                let (l, r) = (x.get(key), y.get(key));
                let sub = format!("{path}.{key}");
                differences(
                    l.unwrap_or(&Value::Null),
                    r.unwrap_or(&Value::Null),
                    &sub,
                    out,
                );
            }
        }
        (Value::Array(_), Value::Array(_)) if named(a).is_some() && named(b).is_some() => {
            let (x, y) = (named(a).unwrap(), named(b).unwrap());
            let names: BTreeSet<&String> = x.iter().chain(&y).map(|(n, _)| n).collect();
            for name in names {
                let find = |l: &[(String, Value)]| {
                    l.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
                };
                let (l, r) = (find(&x), find(&y));
                let sub = format!("{path}[{name}]");
                match (l, r) {
                    (Some(l), Some(r)) => differences(&l, &r, &sub, out),
                    _ => {
                        out.insert(sub);
                    }
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                differences(l, r, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => {
            out.insert(path.to_string());
        }
        _ => {}
    }
}

/// The port of an `httpGet` probe.
fn probe_port(probe: Option<&Probe>) -> u16 {
    match &probe
        .and_then(|p| p.http_get.as_ref())
        .expect("an httpGet probe")
        .port
    {
        IntOrString::Int(p) => u16::try_from(*p).expect("a port number"),
        IntOrString::String(name) => panic!("named port {name}: the pod declares no ports"),
    }
}

/// The address a kubelet probes a host-network pod at: the node's own IP,
/// here the source address of the default route (no packet is sent).
fn node_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("203.0.113.1:9")
        .expect("a default route (the node's IP is the pod's IP on the host network)");
    s.local_addr().unwrap().ip()
}

/// A namespace link of a host process, e.g. `mnt:[4026531840]`.
fn ns(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/ns/{kind}: {e}"))
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonsets_pod_runs_the_agent_which_starts_a_targeted_debug_container() {
    let stack = common::stack("daemonset").await;
    let agent_image = images::build_agent(
        stack.containerd.dir(),
        Path::new(env!("CARGO_BIN_EXE_ephemerald")),
    )
    .expect("agent image builds");
    images::import(stack.containerd.socket(), &agent_image.tarball).expect("agent image imports");
    // The kubelet makes its root directory rshared at start; the manifest's
    // HostToContainer mount of the pod directories needs that.
    make_rshared(&stack.dirs.pods).expect("pods dir becomes rshared");

    let ds = daemonset();
    let manifest_pod = daemonset_pod(&ds);
    let mut pod = manifest_pod.clone();
    adapt_to_testbed(&mut pod, &stack);
    let mut changed = BTreeSet::new();
    differences(
        &serde_json::to_value(&manifest_pod).unwrap(),
        &serde_json::to_value(&pod).unwrap(),
        "",
        &mut changed,
    );
    let c = ".spec.containers[ephemerald]";
    let expected: BTreeSet<String> = [
        format!("{c}.image"),
        format!("{c}.env[EPHEMERALD_POD_LOGS_DIR]"),
        format!("{c}.env[EPHEMERALD_KUBELET_ROOT_DIR]"),
        format!("{c}.env[EPHEMERALD_CONTAINER_LOGS_DIR]"),
        format!("{c}.env[KUBECONFIG]"),
        format!("{c}.volumeMounts[pod-logs].mountPath"),
        format!("{c}.volumeMounts[container-logs].mountPath"),
        format!("{c}.volumeMounts[kubelet-pods].mountPath"),
        format!("{c}.volumeMounts[testbed-kubeconfig]"),
        ".spec.volumes[run-containerd].hostPath.path".into(),
        ".spec.volumes[pod-logs].hostPath.path".into(),
        ".spec.volumes[container-logs].hostPath.path".into(),
        ".spec.volumes[kubelet-pods].hostPath.path".into(),
        ".spec.volumes[testbed-kubeconfig]".into(),
    ]
    .into();
    assert_eq!(
        changed, expected,
        "only the testbed's differences are applied"
    );

    let spec = pod.spec.clone().unwrap();
    let container = &spec.containers[0];
    let ready_port = probe_port(container.readiness_probe.as_ref());
    let live_port = probe_port(container.liveness_probe.as_ref());

    // The port is fixed by the manifest and bound on the host network.
    if let Err(e) = std::net::TcpListener::bind(("0.0.0.0", ready_port)) {
        panic!("port {ready_port} (the manifest's probe port) is taken on this host: {e}");
    }

    let (agent_pod, agent_run) = stack.run_pod(pod).await.expect("the DaemonSet's pod runs");
    let agent_id = agent_run.containers[&container.name].clone();
    let agent_log =
        kubelet::container_log_dir(&stack.dirs.pod_logs, &agent_pod, &container.name).join("0.log");
    let log = || log_text(&agent_log).unwrap_or_default();

    // Probed as the kubelet would: the pod's IP, which on the host network
    // is the node's.
    let ready_addr = format!("{}:{ready_port}", node_ip());
    let deadline = Instant::now() + WAIT;
    let body = loop {
        if let Some((200, body)) = http_get(&ready_addr, "/readyz").await {
            break body;
        }
        let state = stack.cri.container_status(&agent_id, false).await.unwrap();
        assert_eq!(
            state.status.map(|s| s.state),
            Some(ContainerState::ContainerRunning as i32),
            "the agent container is not running; its log:\n{}",
            log()
        );
        assert!(
            Instant::now() < deadline,
            "/readyz on {ready_addr} never answered 200; agent log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.contains(&format!(
            "no Lease kube-node-lease/{}: no kubelet serves this node",
            stack.node
        )),
        "--mode auto starts on a node without a kubelet: {body}"
    );
    let live_addr = format!("{}:{live_port}", node_ip());
    assert_eq!(
        http_get(&live_addr, "/healthz").await,
        Some((200, "ok\n".into())),
        "/healthz"
    );

    // The agent is a container: its own mount namespace, the host's PID and
    // network namespaces (hostPID, hostNetwork).
    let agent_pid = host_pid(stack.cri.as_ref(), &agent_id).await;
    let me = std::process::id();
    assert_ne!(
        ns(agent_pid, "mnt"),
        ns(me, "mnt"),
        "the agent runs in a container"
    );
    assert_eq!(ns(agent_pid, "pid"), ns(me, "pid"), "hostPID");
    assert_eq!(ns(agent_pid, "net"), ns(me, "net"), "hostNetwork");
    assert!(
        log()
            .lines()
            .any(|l| l.contains("serving") && l.ends_with(&format!(":{ready_port}"))),
        "the probes reached the containerized agent's listener: {}",
        log()
    );
    // privileged: every capability, as this (root) test process has.
    assert_eq!(
        proc_status(agent_pid, "CapEff"),
        proc_status(me, "CapEff"),
        "privileged"
    );
    // HostToContainer: a mount made below the pods dir after the agent
    // started (as the kubelet mounts a pod's volumes) reaches the agent.
    let late = stack.dirs.pods.join("mounted-after-the-agent");
    std::fs::create_dir_all(&late).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &late,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("tmpfs below the pods dir");
    let agent_mounts = std::fs::read_to_string(format!("/proc/{agent_pid}/mountinfo")).unwrap();
    assert!(
        agent_mounts.contains(&format!(" {} ", late.display())),
        "mount propagation HostToContainer: {agent_mounts}"
    );

    let (web, web_run) = stack.run_pod(app_pod("web")).await.expect("app pod runs");
    stack
        .add_ephemeral(
            "default",
            "web",
            &debug_container("dbg", Some("app"), "sleep 3600"),
        )
        .await
        .expect("ephemeral container appended");
    let status = stack
        .wait_pod("default", "web", "dbg running", WAIT, |p| running(p, "dbg"))
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", log()));
    let dbg_id = status
        .container_id
        .expect("containerID")
        .strip_prefix("containerd://")
        .expect("containerd:// id")
        .to_string();
    let in_runtime = runtime_ids(stack.cri.as_ref(), &web, "dbg").await;
    assert_eq!(in_runtime, [dbg_id.as_str()], "exactly one dbg container");
    let dbg_pid = host_pid(stack.cri.as_ref(), &dbg_id).await;
    let app_pid = host_pid(stack.cri.as_ref(), &web_run.containers["app"]).await;
    assert_eq!(
        pid_ns(dbg_pid),
        pid_ns(app_pid),
        "dbg shares the target's PID namespace"
    );
    assert_ne!(pid_ns(dbg_pid), pid_ns(me), "and not the host's");

    // The containerized agent did it: its container log says so.
    let started = "started ephemeral container";
    let deadline = Instant::now() + WAIT;
    while !(log().contains(started) && log().contains(&dbg_id)) {
        assert!(
            Instant::now() < deadline,
            "the agent container's log never showed the start of {dbg_id}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The legacy log symlink, made by the containerized agent in the
    // mounted container logs directory, points at dbg's log on the host.
    let link =
        kubelet::legacy_log_symlink(&stack.dirs.container_logs, "web", "default", "dbg", &dbg_id);
    assert_eq!(
        std::fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display())),
        kubelet::container_log_dir(&stack.dirs.pod_logs, &web, "dbg").join("0.log"),
        "the link written through the DaemonSet's mount"
    );

    // A rollout stops the agent with SIGTERM: it drains, exits 0, and the
    // debug container keeps running.
    stack
        .cri
        .stop_container(&agent_id, 15)
        .await
        .expect("agent container stops");
    let agent_status = stack
        .cri
        .container_status(&agent_id, false)
        .await
        .unwrap()
        .status
        .expect("agent status");
    assert_eq!(
        (agent_status.state, agent_status.exit_code),
        (ContainerState::ContainerExited as i32, 0),
        "graceful exit; log:\n{}",
        log()
    );
    assert!(log().contains("SIGTERM: draining"), "{}", log());
    assert!(
        !log().contains('\x1b'),
        "plain text for `kubectl logs`, no terminal colours: {:?}",
        log()
    );
    let dbg_state = stack
        .cri
        .container_status(&dbg_id, false)
        .await
        .unwrap()
        .status
        .expect("dbg status")
        .state;
    assert_eq!(
        dbg_state,
        ContainerState::ContainerRunning as i32,
        "dbg outlives the agent"
    );

    stack.teardown().await.expect("clean teardown");
}
