//! `ephemerald-testbed bench`: the benchmark harness. It runs the agent **binary**
//! as a separate process against the real testbed (containerd + runc, local
//! API server) and, for the scale runs, against the fake CRI served over a
//! unix socket, so memory and CPU read from `/proc/PID` are the agent's own.
//!
//! Every comparison is measured side by side in the same run, alternating
//! the variants round by round so that drift on the machine hits both. The
//! agent's own phases come from its `/timelines` (watch event received,
//! CreateContainer issued, runtime exit, status accepted); what a client
//! sees comes from a watch on the pods held by the harness.
//!
//! The harness measures and reports; it asserts nothing about speed. The
//! targets of issue 4 are evaluated into the results as met / not met.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::apiserver::LocalApiServer;
use super::containerd::ContainerdOpts;
use super::fake_cri::FakeRuntime;
use super::images::{APP_IMAGE, BUSYBOX_IMAGE, PAUSE_IMAGE};
use super::pod_runner::{PodRunner, RunningPod};
use super::stack::{Stack, StackError};
use ephemerald::cri::{CriClient, Runtime};
use ephemerald::kubelet;
use ephemerald::reconcile::translate::{self, HostFiles, NodeDirs, ResolvedImage};

/// Why the harness could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The testbed (containerd, API server, pod runner).
    #[error(transparent)]
    Stack(#[from] StackError),
    /// A CRI call of the harness itself failed.
    #[error(transparent)]
    Cri(#[from] ephemerald::cri::CriError),
    /// Reading or writing a file, or talking to the agent.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent process or a measurement did not behave.
    #[error("{0}")]
    Failed(String),
    /// A section of the run failed.
    #[error("{section}")]
    Section {
        /// Which section.
        section: &'static str,
        /// Why.
        #[source]
        source: Box<BenchError>,
    },
}

impl BenchError {
    fn in_section(section: &'static str) -> impl FnOnce(BenchError) -> BenchError {
        move |e| BenchError::Section {
            section,
            source: Box::new(e),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// What to run; [`BenchOpts::full`] for `make bench`, [`BenchOpts::quick`]
/// for the smoke test.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// The `ephemerald` binary to run as the agent.
    pub agent_bin: PathBuf,
    /// Working directory (logs, the fake CRI's socket).
    pub dir: PathBuf,
    /// Rounds of each side-by-side comparison.
    pub rounds: usize,
    /// Times the agent is started on the real testbed to time start → ready.
    pub start_samples: usize,
    /// Other pods on the node for the overhead measurement.
    pub other_pods: Vec<usize>,
    /// Running pods in the burst.
    pub burst_pods: usize,
    /// Bursts of each variant.
    pub burst_rounds: usize,
    /// Pods bound to the node in the scale runs.
    pub scale_pods: Vec<usize>,
    /// How long the agent is watched idle in a scale run.
    pub idle: Duration,
    /// Unrelated pod updates per second during the scale runs' churn.
    pub churn_per_sec: u32,
    /// Whether this is the quick (smoke) run.
    pub quick: bool,
}

impl BenchOpts {
    /// The full run behind `make bench` (a few minutes).
    pub fn full(agent_bin: PathBuf, dir: PathBuf, rounds: usize) -> Self {
        BenchOpts {
            agent_bin,
            dir,
            rounds,
            start_samples: 5,
            other_pods: vec![0, 100, 1000],
            burst_pods: 50,
            burst_rounds: 3,
            scale_pods: vec![1000, 5000],
            idle: Duration::from_secs(30),
            churn_per_sec: 200,
            quick: false,
        }
    }

    /// A small run that exercises every section (the smoke test).
    pub fn quick(agent_bin: PathBuf, dir: PathBuf) -> Self {
        BenchOpts {
            agent_bin,
            dir,
            rounds: 3,
            start_samples: 2,
            other_pods: vec![0, 20, 50],
            burst_pods: 5,
            burst_rounds: 1,
            scale_pods: vec![50, 100],
            idle: Duration::from_secs(1),
            churn_per_sec: 50,
            quick: true,
        }
    }
}

/// Order statistics of one measurement, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Stats {
    /// Statistics of `samples` (milliseconds); `None` when empty.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Stats {
            n: v.len(),
            p50: rank(0.5),
            p95: rank(0.95),
            p99: rank(0.99),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs the harness may use.
    pub cpus: usize,
    /// `/proc/cpuinfo` model name.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// The runtime's name and version.
    pub runtime: String,
}

/// The agent binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Binary {
    /// Its path.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Whether it is a release build (the harness's own profile).
    pub release: bool,
    /// Process start → `/readyz` 200 on the real testbed, a handful of pods.
    pub start_to_ready_ms: Stats,
}

/// End to end against the runtime alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndToEnd {
    /// Rounds (one sample of each variant per round).
    pub rounds: usize,
    /// CreateContainer + StartContainer of the same config, straight to the CRI.
    pub direct_ms: Stats,
    /// PATCH `ephemeralcontainers` → a watch client sees `running`.
    pub end_to_end_ms: Stats,
    /// `end_to_end.p50 / direct.p50`.
    pub ratio_p50: f64,
    /// `end_to_end.p95 / direct.p95`.
    pub ratio_p95: f64,
    /// Where the end-to-end time goes, from the agent's timelines: PATCH →
    /// watch event at the agent (`patch_to_event`), → CreateContainer issued
    /// (`event_to_create`), → StartContainer returned (`create_and_start`),
    /// → running status accepted (`start_to_status`), → the watch client
    /// sees it (`status_to_watch`).
    pub phases_ms: BTreeMap<String, Stats>,
}

/// Watch event → CreateContainer with other pods on the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overhead {
    /// Pods on the node besides the measured one.
    pub other_pods: usize,
    /// The agent's watch event received → CreateContainer issued.
    pub event_to_create_ms: Stats,
}

/// Container exit → terminated status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitDetection {
    /// Runtime `exited_at` → the API server accepted the terminated status.
    pub exit_to_status_ms: Stats,
    /// Runtime `exited_at` → a watch client saw the terminated status.
    pub exit_to_watch_ms: Stats,
}

/// One ephemeral container on each of many pods at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Burst {
    /// Pods (one container each per burst).
    pub pods: usize,
    /// PATCHes issued at once → a watch client saw all `running`.
    pub agent_ms: Stats,
    /// As many concurrent direct CreateContainer + StartContainer.
    pub direct_ms: Stats,
    /// `agent.p50 / direct.p50`.
    pub ratio_p50: f64,
}

/// The agent with many pods (fake CRI, so the cost is the agent's own).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scale {
    /// Pods bound to the node.
    pub pods: usize,
    /// Process start → `/readyz` 200 (initial list done, runtime answered).
    pub start_to_ready_ms: f64,
    /// Resident memory once settled, MiB.
    pub rss_mib: f64,
    /// CPU seconds per minute while idle.
    pub idle_cpu_s_per_min: f64,
    /// The same as a share of one core, percent.
    pub idle_cpu_percent: f64,
    /// Unrelated pod updates per second during the churn.
    pub churn_updates_per_s: f64,
    /// CPU share of one core during the churn, percent.
    pub churn_cpu_percent: f64,
    /// Watch event → CreateContainer issued during the churn.
    pub event_to_create_ms: Stats,
    /// Resident memory after the churn, MiB.
    pub rss_after_churn_mib: f64,
    /// Peak resident memory (VmHWM), MiB.
    pub rss_peak_mib: f64,
}

/// One target of issue 4.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// What is measured.
    pub what: String,
    /// The target, in words.
    pub target: String,
    /// The measured value, in words; `not measured` when this run lacks it.
    pub measured: String,
    /// Met; `None` when not measured.
    pub met: Option<bool>,
}

/// Everything `ephemerald-testbed bench` measured (`bench/results.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// RFC 3339 time of the run.
    pub when: String,
    /// Whether this was the quick (smoke) run.
    pub quick: bool,
    /// The machine.
    pub machine: Machine,
    /// The binary.
    pub binary: Binary,
    /// End to end vs the runtime alone.
    pub end_to_end: EndToEnd,
    /// Agent overhead by other pods on the node.
    pub overhead: Vec<Overhead>,
    /// Exit detection.
    pub exit_detection: ExitDetection,
    /// Burst.
    pub burst: Burst,
    /// Scale runs.
    pub scale: Vec<Scale>,
    /// The targets, met or not.
    pub targets: Vec<Target>,
}

const NODE: &str = "bench-node";
const SCALE_NODE: &str = "scale-node";
const WAIT: Duration = Duration::from_secs(60);
/// Pause between overhead samples (see [`overhead`]).
const SPACING: Duration = Duration::from_millis(50);

/// Runs every section and returns the results (writing nothing).
pub async fn run(opts: &BenchOpts) -> Result<Results, BenchError> {
    std::fs::create_dir_all(&opts.dir).map_err(io(format!("create {}", opts.dir.display())))?;
    // Sockets and kubeconfigs are handed to another process: absolute paths.
    let opts = &BenchOpts {
        dir: std::path::absolute(&opts.dir).map_err(io("absolute bench dir"))?,
        ..opts.clone()
    };
    let stack = Stack::start(ContainerdOpts::unique("bench"), NODE).await?;
    let result = real_sections(opts, &stack).await;
    let teardown = stack.teardown().await;
    let (machine, binary, end_to_end, overhead, exit_detection, burst) = result?;
    teardown?;
    let mut scale = Vec::new();
    for &pods in &opts.scale_pods {
        eprintln!("bench: scale with {pods} pods (fake CRI)");
        scale.push(
            scale_run(opts, pods)
                .await
                .map_err(BenchError::in_section("scale"))?,
        );
    }
    let mut results = Results {
        when: Timestamp::now().to_string(),
        quick: opts.quick,
        machine,
        binary,
        end_to_end,
        overhead,
        exit_detection,
        burst,
        scale,
        targets: vec![],
    };
    results.targets = targets(&results);
    Ok(results)
}

type RealSections = (
    Machine,
    Binary,
    EndToEnd,
    Vec<Overhead>,
    ExitDetection,
    Burst,
);

async fn real_sections(opts: &BenchOpts, stack: &Stack) -> Result<RealSections, BenchError> {
    let version = stack.cri.version().await?;
    let machine = machine(format!(
        "{} {}",
        version.runtime_name, version.runtime_version
    ));
    let watched = Watched::start(stack.api.client(), NODE);

    // Start → ready, a few times; the last agent stays for the sections.
    let args = stack.agent_args("start", "30s");
    let mut ready = Vec::new();
    let mut agent = None;
    for i in 0..opts.start_samples.max(1) {
        let a = AgentProcess::spawn(opts, &args, &format!("agent-real-{i}")).await?;
        ready.push(ms(a.wait_ready().await?));
        if let Some(previous) = agent.replace(a) {
            previous.stop().await;
        }
    }
    let agent = agent.expect("at least one start");
    let binary = Binary {
        path: opts.agent_bin.display().to_string(),
        bytes: std::fs::metadata(&opts.agent_bin)
            .map_err(io(format!("stat {}", opts.agent_bin.display())))?
            .len(),
        release: !cfg!(debug_assertions),
        start_to_ready_ms: stats(&ready, "start to ready")?,
    };

    let sections = async {
        eprintln!("bench: end to end vs direct CRI, {} rounds", opts.rounds);
        let e2e = end_to_end(opts, stack, &watched, &agent)
            .await
            .map_err(BenchError::in_section("end to end"))?;
        eprintln!(
            "bench: agent overhead with {:?} other pods",
            opts.other_pods
        );
        let overhead = overhead(opts, stack, &watched, &agent)
            .await
            .map_err(BenchError::in_section("agent overhead"))?;
        eprintln!("bench: exit detection, {} rounds", opts.rounds);
        let exit = exit_detection(opts, stack, &watched, &agent)
            .await
            .map_err(BenchError::in_section("exit detection"))?;
        eprintln!("bench: burst of {} pods", opts.burst_pods);
        let burst = burst(opts, stack, &watched)
            .await
            .map_err(BenchError::in_section("burst"))?;
        Ok::<_, BenchError>((e2e, overhead, exit, burst))
    }
    .await;
    agent.stop().await;
    let (e2e, overhead, exit, burst) = sections?;
    Ok((machine, binary, e2e, overhead, exit, burst))
}

async fn end_to_end(
    opts: &BenchOpts,
    stack: &Stack,
    watched: &Watched,
    agent: &AgentProcess,
) -> Result<EndToEnd, BenchError> {
    let target = TargetPod::run(stack, "e2e").await?;
    let (mut direct, mut e2e) = (Vec::new(), Vec::new());
    let (mut names, mut patched, mut watched_at) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..opts.rounds {
        for variant in alternate(round) {
            if variant == 0 {
                direct.push(ms(target.direct(stack, &format!("direct-{round}")).await?));
            } else {
                let name = format!("e2e-{round}");
                let (t, at) = (Instant::now(), SystemTime::now());
                stack
                    .add_ephemeral("default", "e2e", &debug(&name, "sleep 600"))
                    .await?;
                let (seen, seen_at) = watched.wait(&name_key("e2e", &name), |s| s.running).await?;
                e2e.push(ms(seen.saturating_duration_since(t)));
                names.push(name);
                patched.push(at);
                watched_at.push(seen_at);
            }
        }
    }
    // The agent notes its write when the PATCH answer is back, which can be
    // after the watch showed the status: wait for the note.
    let timelines = timelines_with(agent, "e2e", &names, "running_written").await?;
    let field = |f: &str| times(&timelines, "e2e", &names, f);
    let (seen, issued, started, written) = (
        field("seen")?,
        field("create_issued")?,
        field("started")?,
        field("running_written")?,
    );
    let mut phases = BTreeMap::new();
    let mut phase = |name: &str, v: Vec<f64>| -> Result<(), BenchError> {
        phases.insert(name.to_string(), stats(&v, name)?);
        Ok(())
    };
    phase("1 patch_to_event", span(&stamps(&patched), &seen))?;
    phase("2 event_to_create", span(&seen, &issued))?;
    phase("3 create_and_start", span(&issued, &started))?;
    phase("4 start_to_status", span(&started, &written))?;
    phase("5 status_to_watch", span(&written, &stamps(&watched_at)))?;
    let direct_ms = stats(&direct, "direct")?;
    let end_to_end_ms = stats(&e2e, "end to end")?;
    Ok(EndToEnd {
        phases_ms: phases,
        rounds: opts.rounds,
        ratio_p50: end_to_end_ms.p50 / direct_ms.p50,
        ratio_p95: end_to_end_ms.p95 / direct_ms.p95,
        direct_ms,
        end_to_end_ms,
    })
}

async fn overhead(
    opts: &BenchOpts,
    stack: &Stack,
    watched: &Watched,
    agent: &AgentProcess,
) -> Result<Vec<Overhead>, BenchError> {
    let mut out = Vec::new();
    let mut others = 0;
    for &want in &opts.other_pods {
        // Other pods exist in the API server only: they have no ephemeral
        // containers, so the agent's cost for them is the watch and cache.
        for i in others..want {
            let mut p = app_pod(&format!("other-{i}"));
            p.spec.get_or_insert_default().node_name = Some(NODE.into());
            stack
                .api
                .create_pod(p)
                .map_err(|e| BenchError::Failed(format!("create pod other-{i}: {e:?}")))?;
        }
        others = others.max(want);
        // Let the agent take the new pods in before measuring.
        tokio::time::sleep(Duration::from_millis(500 + want as u64)).await;
        let pod = format!("ovh-{want}");
        TargetPod::run(stack, &pod).await?;
        let mut names = Vec::new();
        for round in 0..opts.rounds {
            let name = format!("ovh-{want}-{round}");
            stack
                .add_ephemeral("default", &pod, &debug(&name, "sleep 600"))
                .await?;
            watched.running(&pod, &name).await?;
            names.push(name);
            // Let the agent finish the pass its own status write caused, so
            // each sample is one event meeting an idle agent.
            tokio::time::sleep(SPACING).await;
        }
        let timelines = agent.timelines().await?;
        let samples = spans(&timelines, &pod, &names, "seen", "create_issued")?;
        out.push(Overhead {
            other_pods: want,
            event_to_create_ms: stats(&samples, "event to create")?,
        });
    }
    Ok(out)
}

async fn exit_detection(
    opts: &BenchOpts,
    stack: &Stack,
    watched: &Watched,
    agent: &AgentProcess,
) -> Result<ExitDetection, BenchError> {
    TargetPod::run(stack, "exit").await?;
    let mut names = Vec::new();
    let mut watch_seen = HashMap::new();
    for round in 0..opts.rounds {
        let name = format!("exit-{round}");
        stack
            .add_ephemeral("default", "exit", &debug(&name, "sleep 0.2"))
            .await?;
        watch_seen.insert(name.clone(), watched.terminated("exit", &name).await?);
        names.push(name);
    }
    let timelines = timelines_with(agent, "exit", &names, "terminated_written").await?;
    let to_status = spans(&timelines, "exit", &names, "exited", "terminated_written")?;
    let exited = times(&timelines, "exit", &names, "exited")?;
    let to_watch: Vec<f64> = names
        .iter()
        .zip(exited)
        .map(|(n, at)| diff_ms(at, watch_seen[n]))
        .collect();
    Ok(ExitDetection {
        exit_to_status_ms: stats(&to_status, "exit to status")?,
        exit_to_watch_ms: stats(&to_watch, "exit to watch")?,
    })
}

async fn burst(opts: &BenchOpts, stack: &Stack, watched: &Watched) -> Result<Burst, BenchError> {
    let names: Vec<String> = (0..opts.burst_pods).map(|i| format!("burst-{i}")).collect();
    let targets: Vec<TargetPod> = futures::stream::iter(names.iter())
        .map(|n| TargetPod::run(stack, n))
        .buffered(4)
        .try_collect()
        .await?;
    let (mut via_agent, mut direct) = (Vec::new(), Vec::new());
    for round in 0..opts.burst_rounds {
        for variant in alternate(round) {
            let container = format!("{}{round}", if variant == 0 { "direct" } else { "agent" });
            if variant == 0 {
                let t = Instant::now();
                futures::future::try_join_all(targets.iter().map(|p| p.direct(stack, &container)))
                    .await?;
                direct.push(ms(t.elapsed()));
            } else {
                let c = debug(&container, "sleep 600");
                let t = Instant::now();
                futures::future::try_join_all(
                    names.iter().map(|n| stack.add_ephemeral("default", n, &c)),
                )
                .await?;
                let mut last = t;
                for n in &names {
                    last = last.max(watched.running(n, &container).await?);
                }
                via_agent.push(ms(last.saturating_duration_since(t)));
            }
        }
    }
    let agent_ms = stats(&via_agent, "burst via the agent")?;
    let direct_ms = stats(&direct, "burst direct")?;
    Ok(Burst {
        pods: opts.burst_pods,
        ratio_p50: agent_ms.p50 / direct_ms.p50,
        agent_ms,
        direct_ms,
    })
}

/// One scale run: `pods` pods in a fresh API server, the fake CRI, the
/// agent binary.
pub async fn scale_run(opts: &BenchOpts, pods: usize) -> Result<Scale, BenchError> {
    let dir = opts.dir.join(format!("scale-{pods}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let fake = FakeRuntime::try_start(&dir).map_err(io("fake CRI socket"))?;
    for image in [PAUSE_IMAGE, APP_IMAGE, BUSYBOX_IMAGE] {
        fake.set_image(image, "", "");
    }
    let api = Arc::new(
        LocalApiServer::start()
            .await
            .map_err(|e| BenchError::Failed(format!("local API server: {e}")))?,
    );
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)
        .map_err(io("write kubeconfig"))?;
    let dirs = NodeDirs {
        pod_logs: dir.join("pod-logs"),
        pods: dir.join("kubelet/pods"),
        seccomp: dir.join("kubelet/seccomp"),
        container_logs: dir.join("containers"),
        host: ephemerald::host::HostFacts::detect(),
    };
    let cri = Arc::new(CriClient::new(&fake.endpoint())?.with_timeout(Duration::from_secs(10)));
    let runner = PodRunner::new(cri as Arc<dyn Runtime>, dirs.clone(), "/kubepods");

    // The measured pod runs on the fake runtime; the others exist only in
    // the API server.
    let mut target = app_pod("target");
    target.spec.get_or_insert_default().node_name = Some(SCALE_NODE.into());
    let created = api
        .create_pod(target)
        .map_err(|e| BenchError::Failed(format!("create the target pod: {e:?}")))?;
    let running = runner
        .run(&created)
        .await
        .map_err(|e| BenchError::Failed(format!("run the target pod on the fake CRI: {e}")))?;
    report_running(&api.client(), &created, &running).await?;
    let mut others = Vec::with_capacity(pods);
    for i in 0..pods.saturating_sub(1) {
        let mut p = app_pod(&format!("other-{i}"));
        p.spec.get_or_insert_default().node_name = Some(SCALE_NODE.into());
        others.push(
            api.create_pod(p)
                .map_err(|e| BenchError::Failed(format!("create pod other-{i}: {e:?}")))?,
        );
    }

    let args: Vec<String> = [
        "run",
        "--node-name",
        SCALE_NODE,
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--cri-endpoint",
        &fake.endpoint(),
        "--containerd-socket",
        "",
        "--pod-logs-dir",
        &dirs.pod_logs.display().to_string(),
        "--container-logs-dir",
        &dirs.container_logs.display().to_string(),
        "--kubelet-root-dir",
        &dir.join("kubelet").display().to_string(),
        "--mode",
        "start",
        "--metrics-addr",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = AgentProcess::spawn(opts, &args, &format!("agent-scale-{pods}")).await?;
    let measured = async {
        let start_to_ready_ms = ms(agent.wait_ready().await?);
        // Settle (the first resync of nothing, allocator warm-up), then idle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_mib = agent.memory()?.0;
        let cpu0 = agent.cpu_seconds()?;
        let t0 = Instant::now();
        tokio::time::sleep(opts.idle).await;
        let idle_cpu = (agent.cpu_seconds()? - cpu0) / t0.elapsed().as_secs_f64();

        // Churn: unrelated pods change at a steady rate while ephemeral
        // containers are added to the target.
        let stop = tokio_util::sync::CancellationToken::new();
        let churn = tokio::spawn(churn(api.clone(), others, opts.churn_per_sec, stop.clone()));
        let _stop_churn = stop.clone().drop_guard();
        let (cpu1, t1) = (agent.cpu_seconds()?, Instant::now());
        let pods_api: Api<Pod> = Api::namespaced(api.client(), "default");
        let mut names = Vec::new();
        for round in 0..opts.rounds.max(3) {
            let name = format!("scale-{round}");
            let patch =
                serde_json::json!({"spec": {"ephemeralContainers": [debug(&name, "sleep 600")]}});
            pods_api
                .patch_subresource(
                    "ephemeralcontainers",
                    "target",
                    &PatchParams::default(),
                    &Patch::Strategic(&patch),
                )
                .await
                .map_err(|e| BenchError::Failed(format!("add {name}: {e}")))?;
            wait_created(&agent, "target", &name).await?;
            names.push(name);
            // Spread the samples over the churn.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let churn_cpu = (agent.cpu_seconds()? - cpu1) / t1.elapsed().as_secs_f64();
        stop.cancel();
        let updates = churn.await.unwrap_or(0);
        let churn_updates_per_s = updates as f64 / t1.elapsed().as_secs_f64();
        let timelines = agent.timelines().await?;
        let samples = spans(&timelines, "target", &names, "seen", "create_issued")?;
        let (rss_after, peak) = agent.memory()?;
        Ok::<_, BenchError>(Scale {
            pods,
            start_to_ready_ms,
            rss_mib,
            idle_cpu_s_per_min: idle_cpu * 60.0,
            idle_cpu_percent: idle_cpu * 100.0,
            churn_updates_per_s,
            churn_cpu_percent: churn_cpu * 100.0,
            event_to_create_ms: stats(&samples, "scale event to create")?,
            rss_after_churn_mib: rss_after,
            rss_peak_mib: peak,
        })
    }
    .await;
    agent.stop().await;
    // The churn task has ended, so this is the last handle.
    if let Ok(api) = Arc::try_unwrap(api) {
        api.shutdown().await;
    }
    fake.shutdown().await;
    measured
}

/// Rewrites `pods` round-robin (an annotation changes) at `per_sec`;
/// returns how many writes it made.
async fn churn(
    api: Arc<LocalApiServer>,
    pods: Vec<Pod>,
    per_sec: u32,
    stop: tokio_util::sync::CancellationToken,
) -> u64 {
    if pods.is_empty() || per_sec == 0 {
        stop.cancelled().await;
        return 0;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(per_sec)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return n,
            _ = tick.tick() => {}
        }
        let i = (n as usize) % pods.len();
        let Some(mut p) = api.pod("default", kubelet::name(&pods[i])) else {
            continue;
        };
        p.metadata
            .annotations
            .get_or_insert_default()
            .insert("bench/churn".into(), n.to_string());
        api.put_pod_unchecked(p);
        n += 1;
    }
}

/// Waits until the agent's timeline shows CreateContainer issued.
async fn wait_created(agent: &AgentProcess, pod: &str, name: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + WAIT;
    loop {
        let timelines = agent.timelines().await?;
        if find(&timelines, pod, name).is_some_and(|t| t["create_issued"].is_string()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!(
                "the agent never created {pod}/{name}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The agent's timelines once each of `names` in `pod` has `field` (the
/// agent stamps a status write when the API server's answer is back, which
/// may come after a watch client saw the status).
async fn timelines_with(
    agent: &AgentProcess,
    pod: &str,
    names: &[String],
    field: &str,
) -> Result<Vec<serde_json::Value>, BenchError> {
    let deadline = Instant::now() + WAIT;
    loop {
        let timelines = agent.timelines().await?;
        if times(&timelines, pod, names, field).is_ok() || Instant::now() > deadline {
            return Ok(timelines);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A pod running on the real testbed, ready for ephemeral containers.
struct TargetPod {
    pod: Pod,
    running: RunningPod,
    image: ResolvedImage,
}

impl TargetPod {
    async fn run(stack: &Stack, name: &str) -> Result<TargetPod, BenchError> {
        let (pod, running) = stack.run_pod(app_pod(name)).await?;
        let image = stack
            .cri
            .image_status(ephemerald::cri::proto::ImageSpec {
                image: BUSYBOX_IMAGE.into(),
                ..Default::default()
            })
            .await?
            .ok_or_else(|| BenchError::Failed(format!("{BUSYBOX_IMAGE} is not imported")))?;
        Ok(TargetPod {
            pod,
            running,
            image: ResolvedImage {
                id: image.id,
                ..Default::default()
            },
        })
    }

    /// CreateContainer + StartContainer of the config the agent would send
    /// (translated beforehand: only the runtime's work is timed).
    async fn direct(&self, stack: &Stack, name: &str) -> Result<Duration, BenchError> {
        let c = debug(name, "sleep 600");
        let config = translate::container_config(&translate::Inputs {
            pod: &self.pod,
            container: &c,
            target_id: self.running.containers.get("app").map(String::as_str),
            image: &self.image,
            attempt: 0,
            host_files: &HostFiles::default(),
            node: &stack.dirs,
        })
        .map_err(|e| BenchError::Failed(format!("translate {name}: {e}")))?;
        let t = Instant::now();
        let id = stack
            .cri
            .create_container(
                &self.running.sandbox_id,
                config,
                self.running.sandbox_config.clone(),
            )
            .await?;
        stack.cri.start_container(&id).await?;
        Ok(t.elapsed())
    }
}

/// Writes the status a kubelet would for the pod's running app container.
async fn report_running(
    client: &kube::Client,
    pod: &Pod,
    running: &RunningPod,
) -> Result<(), BenchError> {
    let statuses: Vec<serde_json::Value> = running
        .containers
        .iter()
        .map(|(name, id)| {
            serde_json::json!({
                "name": name, "ready": true, "started": true, "restartCount": 0,
                "image": APP_IMAGE, "imageID": "", "containerID": format!("containerd://{id}"),
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
            })
        })
        .collect();
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": running.ip, "containerStatuses": statuses,
    }});
    Api::<Pod>::namespaced(client.clone(), "default")
        .patch_status(
            kubelet::name(pod),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .map_err(|e| BenchError::Failed(format!("report the target pod running: {e}")))?;
    Ok(())
}

fn app_pod(name: &str) -> Pod {
    let mut pod = super::images::app_pod(name);
    pod.spec.get_or_insert_default().host_network = Some(true);
    pod
}

/// A `kubectl debug --target=app`-style container running `script`.
fn debug(name: &str, script: &str) -> EphemeralContainer {
    EphemeralContainer {
        name: name.into(),
        image: Some(BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("Never".into()),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        target_container_name: Some("app".into()),
        termination_message_policy: Some("File".into()),
        termination_message_path: Some("/dev/termination-log".into()),
        ..Default::default()
    }
}

/// Round `r`'s order of two variants: A B, then B A.
fn alternate(round: usize) -> [u8; 2] {
    if round.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(samples: &[f64], what: &str) -> Result<Stats, BenchError> {
    Stats::of(samples).ok_or_else(|| BenchError::Failed(format!("no samples for {what}")))
}

/// What a watch client on the node's pods saw, and when.
struct Watched {
    seen: Arc<Mutex<HashMap<(String, String), Seen>>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default, Clone, Copy)]
struct Seen {
    running: Option<(Instant, SystemTime)>,
    terminated: Option<(Instant, SystemTime)>,
}

impl Watched {
    fn start(client: kube::Client, node: &str) -> Watched {
        let seen: Arc<Mutex<HashMap<(String, String), Seen>>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let pods: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (s, c) = (seen.clone(), changed.clone());
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(pods, config));
            while let Some(ev) = events.next().await {
                let (Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod))) = ev
                else {
                    continue;
                };
                let now = (Instant::now(), SystemTime::now());
                let statuses = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.ephemeral_container_statuses.as_ref());
                let mut map = s.lock().unwrap_or_else(|e| e.into_inner());
                for st in statuses.into_iter().flatten() {
                    let key = (kubelet::name(&pod).to_string(), st.name.clone());
                    let e = map.entry(key).or_default();
                    let state = st.state.as_ref();
                    if state.is_some_and(|x| x.running.is_some()) && e.running.is_none() {
                        e.running = Some(now);
                    }
                    if state.is_some_and(|x| x.terminated.is_some()) && e.terminated.is_none() {
                        e.terminated = Some(now);
                    }
                }
                drop(map);
                c.notify_waiters();
            }
        });
        Watched {
            seen,
            changed,
            task,
        }
    }

    async fn wait(
        &self,
        key: &(String, String),
        pick: fn(&Seen) -> Option<(Instant, SystemTime)>,
    ) -> Result<(Instant, SystemTime), BenchError> {
        let (pod, container) = key;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(at) = self
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(key)
                .and_then(pick)
            {
                return Ok(at);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(BenchError::Failed(format!(
                    "the watch never showed {pod}/{container} in the wanted state"
                )));
            }
        }
    }

    async fn running(&self, pod: &str, container: &str) -> Result<Instant, BenchError> {
        Ok(self.wait(&name_key(pod, container), |s| s.running).await?.0)
    }

    async fn terminated(&self, pod: &str, container: &str) -> Result<SystemTime, BenchError> {
        Ok(self
            .wait(&name_key(pod, container), |s| s.terminated)
            .await?
            .1)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent binary running as a child process, with its metrics address.
struct AgentProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
    spawned: Instant,
    log: PathBuf,
}

impl AgentProcess {
    async fn spawn(opts: &BenchOpts, args: &[String], name: &str) -> Result<Self, BenchError> {
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("pick a port"))?;
            l.local_addr().map_err(io("pick a port"))?
        };
        let mut args = args.to_vec();
        match args.iter().position(|a| a == "--metrics-addr") {
            Some(i) => args[i + 1] = addr.to_string(),
            None => args.extend(["--metrics-addr".into(), addr.to_string()]),
        }
        let log = opts.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let spawned = Instant::now();
        let child = tokio::process::Command::new(&opts.agent_bin)
            .args(&args)
            // The agent's own default (info) unless asked otherwise.
            .env(
                "RUST_LOG",
                std::env::var("EPHEMERALD_BENCH_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("start {}", opts.agent_bin.display())))?;
        Ok(AgentProcess {
            child,
            addr,
            spawned,
            log,
        })
    }

    fn pid(&self) -> Result<u32, BenchError> {
        self.child
            .id()
            .ok_or_else(|| BenchError::Failed("the agent exited".into()))
    }

    /// Waits for `/readyz` 200; returns the time since the process started.
    async fn wait_ready(&self) -> Result<Duration, BenchError> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((200, _)) = super::http_get(&self.addr.to_string(), "/readyz").await {
                return Ok(self.spawned.elapsed());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "the agent never became ready; see {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn timelines(&self) -> Result<Vec<serde_json::Value>, BenchError> {
        let (code, body) = super::http_get(&self.addr.to_string(), "/timelines")
            .await
            .ok_or_else(|| BenchError::Failed("GET /timelines: no answer".into()))?;
        if code != 200 {
            return Err(BenchError::Failed(format!("GET /timelines: {code}")));
        }
        serde_json::from_str(&body).map_err(|e| BenchError::Failed(format!("GET /timelines: {e}")))
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> Result<(f64, f64), BenchError> {
        let path = format!("/proc/{}/status", self.pid()?);
        let status = std::fs::read_to_string(&path).map_err(io(path))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0))
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> Result<f64, BenchError> {
        let path = format!("/proc/{}/stat", self.pid()?);
        let stat = std::fs::read_to_string(&path).map_err(io(path))?;
        // Fields after the parenthesised command name: state is field 3,
        // utime 14 and stime 15.
        let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
        let (Some(u), Some(s)) = (ticks(11), ticks(12)) else {
            return Err(BenchError::Failed(format!("unreadable /proc stat: {stat}")));
        };
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        Ok((u + s) / hz)
    }

    /// SIGTERM and wait (the agent drains and exits).
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn find<'a>(
    timelines: &'a [serde_json::Value],
    pod: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    let key = format!("default/{pod}");
    timelines
        .iter()
        .find(|t| t["pod"] == key.as_str() && t["container"] == name)
}

/// `field` of each named container's timeline.
fn times(
    timelines: &[serde_json::Value],
    pod: &str,
    names: &[String],
    field: &str,
) -> Result<Vec<Timestamp>, BenchError> {
    names
        .iter()
        .map(|n| {
            find(timelines, pod, n)
                .and_then(|t| t[field].as_str())
                .and_then(|s| s.parse::<Timestamp>().ok())
                .ok_or_else(|| {
                    BenchError::Failed(format!("the agent's timeline of {pod}/{n} lacks {field}"))
                })
        })
        .collect()
}

fn stamps(times: &[SystemTime]) -> Vec<Timestamp> {
    times
        .iter()
        .map(|t| Timestamp::try_from(*t).unwrap_or(Timestamp::UNIX_EPOCH))
        .collect()
}

fn name_key(pod: &str, container: &str) -> (String, String) {
    (pod.to_string(), container.to_string())
}

/// `to[i] - from[i]` in ms.
fn span(from: &[Timestamp], to: &[Timestamp]) -> Vec<f64> {
    from.iter()
        .zip(to)
        .map(|(a, b)| (b.as_nanosecond() - a.as_nanosecond()) as f64 / 1e6)
        .collect()
}

/// `to - from` of each named container's timeline, in ms.
fn spans(
    timelines: &[serde_json::Value],
    pod: &str,
    names: &[String],
    from: &str,
    to: &str,
) -> Result<Vec<f64>, BenchError> {
    Ok(span(
        &times(timelines, pod, names, from)?,
        &times(timelines, pod, names, to)?,
    ))
}

fn diff_ms(from: Timestamp, to: SystemTime) -> f64 {
    let to = Timestamp::try_from(to).map_or(0, |t| t.as_nanosecond());
    (to - from.as_nanosecond()) as f64 / 1e6
}

fn machine(runtime: String) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let meminfo = read("/proc/meminfo");
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_default(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        memory_mib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024,
        runtime,
    }
}

/// The targets against `r`.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let mut add = |what: &str, target: &str, measured: Option<(String, bool)>| {
        out.push(Target {
            what: what.into(),
            target: target.into(),
            measured: measured
                .as_ref()
                .map_or("not measured".into(), |m| m.0.clone()),
            met: measured.map(|m| m.1),
        })
    };
    let e = &r.end_to_end;
    add(
        "end to end vs direct CRI create+start",
        "≤ 1.15 × (p50)",
        Some((format!("{:.2} ×", e.ratio_p50), e.ratio_p50 <= 1.15)),
    );
    let ovh = r.overhead.iter().find(|o| o.other_pods == 1000);
    add(
        "agent overhead p99, 1,000 other pods",
        "≤ 2 ms",
        ovh.map(|o| {
            let p = o.event_to_create_ms.p99;
            (format!("{p:.2} ms"), p <= 2.0)
        }),
    );
    let x = r.exit_detection.exit_to_status_ms.p50;
    add(
        "exit detection p50",
        "≤ 50 ms",
        Some((format!("{x:.1} ms"), x <= 50.0)),
    );
    add(
        "burst makespan vs direct concurrent",
        "≤ 1.25 ×",
        Some((
            format!("{:.2} ×", r.burst.ratio_p50),
            r.burst.ratio_p50 <= 1.25,
        )),
    );
    for (pods, limit) in [(1000, 30.0), (5000, 80.0)] {
        let s = r.scale.iter().find(|s| s.pods == pods);
        add(
            &format!("RSS with {pods} pods (peak)"),
            &format!("≤ {limit} MiB"),
            s.map(|s| {
                (
                    format!("{:.1} MiB", s.rss_peak_mib),
                    s.rss_peak_mib <= limit,
                )
            }),
        );
    }
    let idle = r
        .scale
        .iter()
        .filter(|s| s.pods >= 1000)
        .map(|s| s.idle_cpu_percent)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    add(
        "idle CPU (worst scale run)",
        "≤ 0.5 % of a core",
        idle.map(|p| (format!("{p:.2} %"), p <= 0.5)),
    );
    let ready = r.scale.iter().find(|s| s.pods == 1000);
    add(
        "start → ready with 1,000 pods",
        "≤ 200 ms",
        ready.map(|s| {
            (
                format!("{:.0} ms", s.start_to_ready_ms),
                s.start_to_ready_ms <= 200.0,
            )
        }),
    );
    out
}

/// The results as Markdown tables (printed, and pasted into BENCHMARKS.md).
pub fn table(r: &Results) -> String {
    let s = |s: &Stats| format!("{:.1} | {:.1}", s.p50, s.p95);
    let mut t = String::new();
    let m = &r.machine;
    t += &format!(
        "Machine: {} CPUs ({}), {} MiB, Linux {}, {}. Agent binary: {:.1} MiB ({}).\n\n",
        m.cpus,
        m.cpu_model,
        m.memory_mib,
        m.kernel,
        m.runtime,
        r.binary.bytes as f64 / 1048576.0,
        if r.binary.release {
            "release, stripped"
        } else {
            "debug build"
        },
    );
    t += "| measurement | n | p50 ms | p95 ms |\n| --- | --- | --- | --- |\n";
    let mut row = |name: String, st: &Stats| {
        t += &format!("| {name} | {} | {} |\n", st.n, s(st));
    };
    let e = &r.end_to_end;
    row("direct CRI create+start".into(), &e.direct_ms);
    row(
        format!(
            "end to end: PATCH → watch sees running (× {:.2} p50, × {:.2} p95)",
            e.ratio_p50, e.ratio_p95
        ),
        &e.end_to_end_ms,
    );
    for o in &r.overhead {
        row(
            format!(
                "agent overhead: watch event → CreateContainer, {} other pods (p99 {:.2})",
                o.other_pods, o.event_to_create_ms.p99
            ),
            &o.event_to_create_ms,
        );
    }
    for (name, st) in &e.phases_ms {
        row(format!("end to end, phase {name}"), st);
    }
    row(
        "exit detection: exited_at → terminated status accepted".into(),
        &r.exit_detection.exit_to_status_ms,
    );
    row(
        "exit detection: exited_at → watch sees terminated".into(),
        &r.exit_detection.exit_to_watch_ms,
    );
    let b = &r.burst;
    row(
        format!("burst of {}: direct concurrent create+start", b.pods),
        &b.direct_ms,
    );
    row(
        format!(
            "burst of {}: PATCHes → watch sees all running (× {:.2} p50)",
            b.pods, b.ratio_p50
        ),
        &b.agent_ms,
    );
    row(
        "agent process start → /readyz (real testbed)".into(),
        &r.binary.start_to_ready_ms,
    );
    t += "\n| pods (fake CRI) | start → ready ms | RSS MiB | peak RSS MiB | idle CPU s/min | idle CPU % | churn updates/s | churn CPU % | event → create p50 / p99 ms |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for x in &r.scale {
        t += &format!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.3} | {:.2} | {:.0} | {:.1} | {:.2} / {:.2} |\n",
            x.pods,
            x.start_to_ready_ms,
            x.rss_mib,
            x.rss_peak_mib,
            x.idle_cpu_s_per_min,
            x.idle_cpu_percent,
            x.churn_updates_per_s,
            x.churn_cpu_percent,
            x.event_to_create_ms.p50,
            x.event_to_create_ms.p99,
        );
    }
    t += "\n| target | goal | measured | met |\n| --- | --- | --- | --- |\n";
    for x in &r.targets {
        let met = match x.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        t += &format!("| {} | {} | {} | {met} |\n", x.what, x.target, x.measured);
    }
    t
}

/// `ephemerald-testbed bench`: runs, prints the tables, writes the JSON.
pub async fn run_cli(args: crate::cli::BenchArgs) -> Result<(), BenchError> {
    let agent_bin = match args.agent_bin {
        Some(b) => b,
        // `make bench` builds both binaries into the same directory.
        None => std::env::current_exe()
            .map_err(io("find this executable"))?
            .with_file_name("ephemerald"),
    };
    let opts = if args.quick {
        BenchOpts::quick(agent_bin, args.dir)
    } else {
        BenchOpts::full(agent_bin, args.dir, args.rounds)
    };
    let results = run(&opts).await?;
    println!("{}", table(&results));
    write_results(&results, &args.out)?;
    println!("results written to {}", args.out.display());
    Ok(())
}

/// Writes `results` as pretty JSON, creating the directory.
pub fn write_results(results: &Results, out: &Path) -> Result<(), BenchError> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    let json = serde_json::to_string_pretty(results)
        .map_err(|e| BenchError::Failed(format!("encode results: {e}")))?;
    std::fs::write(out, json + "\n").map_err(io(format!("write {}", out.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Stats::of(&v).unwrap();
        assert_eq!((s.n, s.p50, s.p95, s.p99), (100, 50.0, 95.0, 99.0));
        assert_eq!((s.min, s.max), (1.0, 100.0));
        let one = Stats::of(&[7.0]).unwrap();
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn rounds_alternate_the_order() {
        assert_eq!(alternate(0), [0, 1]);
        assert_eq!(alternate(1), [1, 0]);
    }

    #[test]
    fn results_read_back_exactly() {
        // A measured value that serde_json's default (best-effort) float
        // parser reads back one ulp off.
        let v = 181.137242_f64;
        let back: f64 = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }
}
