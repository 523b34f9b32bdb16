//! `ephemerald-testbed demo`: the whole path on this machine, in one command. Starts
//! containerd (with a CNI pod network), the local API server and the agent,
//! runs a pod whose only container is the shell-less app, adds a busybox
//! debug container targeting it exactly as `kubectl debug --target=app`
//! does, and shows the status transitions the API server accepted, the
//! debug container's `ps` (the app's process is in it), whether the two
//! share a PID namespace, and how long each phase took. Everything is torn
//! down at the end. Also `ephemerald-testbed testbed up|down`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ContainerStatus, EphemeralContainer, Pod};
use tokio_util::sync::CancellationToken;

use super::containerd::{Containerd, ContainerdOpts};
use super::images::{APP_IMAGE, BUSYBOX_IMAGE};
use super::stack::{Stack, StackError};
use crate::cli::{DemoArgs, TestbedArgs};
use ephemerald::config::Mode;
use ephemerald::cri::Runtime;
use ephemerald::kubelet;
use ephemerald::reconcile::agent::{Agent, Timeline};

const NODE: &str = "demo-node";
const POD: &str = "shop";
const DEBUG: &str = "debugger";

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The demo needs root (containerd, mounts, cgroups).
    #[error("the demo starts containerd and needs root; run it as root (sudo make demo)")]
    NotRoot,
    /// A part of the stack failed.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// The agent stopped with an error.
    #[error("agent: {0}")]
    Agent(String),
    /// Something expected did not happen.
    #[error("{0}")]
    Missing(String),
}

/// What the demo measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The debug container's name.
    pub container: String,
    /// Its state in the API at the end (`running`, `terminated`, `waiting`).
    pub state: String,
    /// Whether its process and the app's share `/proc/<pid>/ns/pid`.
    pub pid_namespace_shared: bool,
    /// Its output (`ps`), from the kubelet-style log file.
    pub output: String,
    /// Phase durations in milliseconds.
    pub timings_ms: BTreeMap<String, f64>,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(DemoError::NotRoot);
    }
    let say = |s: String| {
        if !args.json {
            println!("{s}");
        } else {
            eprintln!("{s}");
        }
    };
    let opts = ContainerdOpts::in_dir(absolute(&args.dir)).with_cni(true);
    let t = std::time::Instant::now();
    let stack = Stack::start(opts, NODE).await?;
    say(format!(
        "testbed: containerd at {} with the project's images, CNI pod network ({:.0} ms)",
        stack.containerd.endpoint(),
        t.elapsed().as_secs_f64() * 1e3
    ));
    say(format!(
        "local API server: {}   kubeconfig: {}",
        stack.api.url(),
        stack.kubeconfig.display()
    ));

    let result = demo_body(&stack, &say).await;
    let teardown = stack.teardown().await;
    let report = result?;
    teardown?;
    say("torn down: containerd, pods, mounts, cgroups and the bridge are gone".into());
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
    Ok(())
}

async fn demo_body(stack: &Stack, say: &dyn Fn(String)) -> Result<Report, DemoError> {
    // The agent, in-process, so its timelines can be shown.
    let cancel = CancellationToken::new();
    let agent_slot: Arc<Mutex<Option<Arc<Agent>>>> = Arc::default();
    let slot = agent_slot.clone();
    let config = stack.agent_config(Mode::Start, Duration::from_secs(5));
    let client = stack.api.client();
    let agent_task = tokio::spawn(ephemerald::run_with_client(
        config,
        client,
        cancel.clone(),
        move |h| *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(h.agent),
    ));
    say(format!("agent: node {NODE}, --mode start"));

    let result = async {
        let (pod, running) = stack.run_pod(app_pod()).await?;
        let app_id = running
            .containers
            .get("app")
            .cloned()
            .ok_or_else(|| DemoError::Missing("the app container did not start".into()))?;
        say(format!(
            "pod default/{POD}: sandbox {}, container app ({APP_IMAGE}, no shell) running, pod IP {}",
            short(&running.sandbox_id),
            running.ip
        ));

        let debug = EphemeralContainer {
            name: DEBUG.into(),
            image: Some(BUSYBOX_IMAGE.into()),
            image_pull_policy: Some("Never".into()),
            command: Some(vec!["sh".into(), "-c".into(), "ps; sleep 3600".into()]),
            target_container_name: Some("app".into()),
            termination_message_policy: Some("File".into()),
            ..Default::default()
        };
        say(format!(
            "kubectl debug {POD} --image={BUSYBOX_IMAGE} --image-pull-policy=Never --target=app -c {DEBUG} -- sh -c 'ps; sleep 3600'\n  = strategic merge patch on pods/{POD}/ephemeralcontainers"
        ));
        let patch_sent = SystemTime::now();
        stack.add_ephemeral("default", POD, &debug).await?;

        let status = stack
            .wait_pod("default", POD, "the debug container running", Duration::from_secs(60), |p| {
                ephemeral_status(p, DEBUG).filter(|s| {
                    s.state.as_ref().is_some_and(|st| st.running.is_some() || st.terminated.is_some())
                })
            })
            .await?;
        let dbg_id = status
            .container_id
            .as_deref()
            .and_then(|id| id.split("://").nth(1))
            .unwrap_or_default()
            .to_string();

        let log = kubelet::container_log_dir(&stack.dirs.pod_logs, &pod, DEBUG).join("0.log");
        let output = wait_for_output(&log).await;
        let shared = same_pid_ns(stack, &app_id, &dbg_id).await?;

        say("\nstatus transitions of the debug container, as the API server accepted them:".into());
        let history = stack.api.status_history("default", POD);
        if let Some(spec) = stack
            .api
            .spec_history("default", POD)
            .iter()
            .find(|r| r.names.iter().any(|n| n == DEBUG))
        {
            say(format!(
                "  +{:>8.1} ms  rv {:>4}  spec.ephemeralContainers gains {DEBUG} (no status yet)",
                ms(patch_sent, spec.at),
                spec.resource_version
            ));
        }
        let mut last = String::new();
        for rec in &history {
            let now = describe(rec.ephemeral_container_statuses.iter().find(|s| s.name == DEBUG));
            if now != last && !now.is_empty() {
                say(format!("  +{:>8.1} ms  rv {:>4}  {now}", ms(patch_sent, rec.at), rec.resource_version));
                last = now;
            }
        }
        say(format!("\nps in the debug container ({}):", log.display()));
        for line in output.lines() {
            say(format!("  {line}"));
        }
        let app_pid = pid_of(stack, &app_id).await;
        let dbg_pid = pid_of(stack, &dbg_id).await;
        say(format!(
            "\nPID namespace: app (host pid {app_pid}) {}, {DEBUG} (host pid {dbg_pid}) {} → {}",
            ns_link(app_pid),
            ns_link(dbg_pid),
            if shared { "shared" } else { "NOT shared" }
        ));

        let timeline = agent_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|a| a.timelines().into_iter().find(|t| t.container == DEBUG));
        let accepted = stack
            .api
            .spec_history("default", POD)
            .iter()
            .find(|r| r.names.iter().any(|n| n == DEBUG))
            .map(|r| r.at);
        let api_running = history
            .iter()
            .find(|r| {
                ephemeral_status_in(&r.ephemeral_container_statuses, DEBUG)
                    .and_then(|s| s.state.as_ref())
                    .is_some_and(|st| st.running.is_some())
            })
            .map(|r| r.at);
        let timings = timings(patch_sent, accepted, timeline.as_ref(), api_running);
        say("\ntimings (ms):".into());
        for (k, v) in &timings {
            say(format!("  {k:<28} {v:>8.1}"));
        }
        let state = status
            .state
            .as_ref()
            .map(|s| {
                if s.running.is_some() {
                    "running"
                } else if s.terminated.is_some() {
                    "terminated"
                } else {
                    "waiting"
                }
            })
            .unwrap_or("unknown");
        Ok(Report {
            container: DEBUG.into(),
            state: state.into(),
            pid_namespace_shared: shared,
            output,
            timings_ms: timings,
        })
    }
    .await;

    cancel.cancel();
    match agent_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DemoError::Agent(e.to_string())),
        Err(e) => return Err(DemoError::Agent(e.to_string())),
    }
    result
}

fn app_pod() -> Pod {
    super::images::app_pod(POD)
}

fn timings(
    patch_sent: SystemTime,
    accepted: Option<SystemTime>,
    t: Option<&Timeline>,
    api_running: Option<SystemTime>,
) -> BTreeMap<String, f64> {
    let mut steps: Vec<(&str, Option<SystemTime>)> = vec![("patch_sent", Some(patch_sent))];
    steps.push(("api_accepted", accepted));
    steps.push(("agent_saw", t.map(|t| t.seen)));
    steps.push(("create_returned", t.and_then(|t| t.created)));
    steps.push(("start_returned", t.and_then(|t| t.started)));
    steps.push(("api_running", api_running));
    let mut out = BTreeMap::new();
    let names = [
        "1_patch_to_api_accepted",
        "2_api_to_agent_saw",
        "3_agent_to_create_returned",
        "4_create_to_start_returned",
        "5_start_to_status_running",
    ];
    for (i, name) in names.iter().enumerate() {
        if let (Some(a), Some(b)) = (steps[i].1, steps[i + 1].1) {
            out.insert(name.to_string(), ms(a, b));
        }
    }
    if let Some(end) = api_running {
        out.insert("total_patch_to_running".into(), ms(patch_sent, end));
    }
    out
}

fn ms(a: SystemTime, b: SystemTime) -> f64 {
    match b.duration_since(a) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -(e.duration().as_secs_f64() * 1e3),
    }
}

fn ephemeral_status(pod: &Pod, name: &str) -> Option<ContainerStatus> {
    ephemeral_status_in(
        pod.status
            .as_ref()
            .and_then(|s| s.ephemeral_container_statuses.as_deref())
            .unwrap_or_default(),
        name,
    )
    .cloned()
}

fn ephemeral_status_in<'a>(list: &'a [ContainerStatus], name: &str) -> Option<&'a ContainerStatus> {
    list.iter().find(|s| s.name == name)
}

fn describe(s: Option<&ContainerStatus>) -> String {
    let Some(s) = s else { return String::new() };
    let Some(st) = s.state.as_ref() else {
        return String::new();
    };
    if let Some(r) = &st.running {
        format!(
            "running (startedAt {}, {})",
            r.started_at
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            s.container_id.as_deref().map(short).unwrap_or_default()
        )
    } else if let Some(t) = &st.terminated {
        format!(
            "terminated (exitCode {}, reason {})",
            t.exit_code,
            t.reason.clone().unwrap_or_default()
        )
    } else if let Some(w) = &st.waiting {
        format!("waiting ({})", w.reason.clone().unwrap_or_default())
    } else {
        String::new()
    }
}

async fn wait_for_output(log: &std::path::Path) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log)
            .map(|raw| ephemerald::reconcile::observe::cri_log_messages(&raw))
            .unwrap_or_default();
        if text.contains("/app") || std::time::Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn pid_of(stack: &Stack, id: &str) -> u32 {
    stack
        .cri
        .container_status(id, true)
        .await
        .ok()
        .and_then(|r| r.info.get("info").cloned())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["pid"].as_u64())
        .unwrap_or(0) as u32
}

fn ns_link(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

async fn same_pid_ns(stack: &Stack, a: &str, b: &str) -> Result<bool, DemoError> {
    let (pa, pb) = (pid_of(stack, a).await, pid_of(stack, b).await);
    if pa == 0 || pb == 0 {
        return Err(DemoError::Missing(
            "no host pid for the app or the debug container".into(),
        ));
    }
    let (la, lb) = (
        std::fs::read_link(format!("/proc/{pa}/ns/pid")),
        std::fs::read_link(format!("/proc/{pb}/ns/pid")),
    );
    match (la, lb) {
        (Ok(a), Ok(b)) => Ok(a == b),
        _ => Err(DemoError::Missing("cannot read /proc/<pid>/ns/pid".into())),
    }
}

fn short(id: &str) -> String {
    let id = id.rsplit("://").next().unwrap_or(id);
    id.chars().take(12).collect()
}

fn absolute(p: &std::path::Path) -> std::path::PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

/// `ephemerald-testbed testbed up|down`: a containerd that outlives the command.
pub async fn testbed_cli(args: TestbedArgs) -> Result<(), DemoError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(DemoError::NotRoot);
    }
    let dir = absolute(&args.dir);
    match args.action.as_str() {
        "up" => {
            let tb = Containerd::start_detached(ContainerdOpts::in_dir(&dir).with_cni(args.cni))
                .await
                .map_err(StackError::from)?;
            println!(
                "containerd running (pid {}), CRI endpoint {}",
                tb.pid().unwrap_or(0),
                tb.endpoint()
            );
            println!(
                "tear down with: ephemerald-testbed testbed down --dir {}",
                dir.display()
            );
            Ok(())
        }
        _ => {
            let tb = Containerd::attach(&dir).map_err(StackError::from)?;
            tb.teardown().await.map_err(StackError::from)?;
            println!("torn down {}", dir.display());
            Ok(())
        }
    }
}
