//! A real containerd for the demo and the tests, started as a child process
//! with everything it owns under one project-local directory, and torn down
//! without leaving anything behind.
//!
//! What one testbed owns (for a testbed named `NAME` in directory `DIR`):
//! - `DIR/`: `config.toml`, `containerd.log`, `containerd.pid`,
//!   `testbed.json` (what [`Containerd::attach`] reads), containerd's `root/`
//!   and `state/` (runc's state, the rootfs mounts and the pods' network
//!   namespaces, `netns_mounts_under_state_dir = true`), the socket, the CNI
//!   config and IPAM data (`cni/`), the pods' logs (`pod-logs/`) and pod dirs
//!   (`pods/`);
//! - the cgroup `/ephemerald-NAME` under every cgroup hierarchy: pods go
//!   below it (`/ephemerald-NAME/pod<uid>`, cgroupfs driver);
//! - with CNI, the bridge `ephd<10 hex>` (derived from the name, so each
//!   testbed has its own bridge and deletes it itself: no bridge is ever
//!   shared, and parallel testbeds never wait for each other) on a private
//!   `10.217.X.0/24` (no address on the host side: `isGateway: false`);
//! - the `containerd-shim-runc-v2` processes whose `-address` is its socket,
//!   their sockets in the shared `/run/containerd/s`, and its CNI result
//!   cache entries in the shared `/var/lib/cni/results`.
//!
//! Invariants:
//! - `NAME` is unique on the machine while the testbed lives
//!   ([`ContainerdOpts::unique`] makes one from the process id); every
//!   machine-wide name (cgroup, bridge, CNI network) is derived from it.
//! - A unix socket path holds at most 107 bytes and containerd also listens
//!   on `<socket>.ttrpc`; when `DIR` is too long for that, the whole testbed
//!   lives in `/tmp/ephemerald-NAME` instead ([`Containerd::dir`] says where).
//! - Teardown goes from the inside out: pods through the CRI, containerd by
//!   its PID (TERM, then KILL), leftover shims and any process in the
//!   testbed's cgroups (KILL), mounts under `DIR` (deepest first, lazily),
//!   the cgroup dirs (deepest first), the bridge, then `DIR`. Every step is
//!   idempotent, so a teardown that was interrupted can be run again, and a
//!   testbed whose owning process died is reaped by the next
//!   [`Containerd::start`] in the same parent directory.
//! - [`Containerd::stop_daemon`] and [`Containerd::start_daemon`] stop and
//!   restart containerd alone on the same directory and socket (a node's
//!   containerd restarting): shims, containers and state stay.
//! - A testbed started with [`Containerd::start`] is torn down when dropped
//!   (best effort, never panics) unless [`Containerd::teardown`] ran; one
//!   started with [`Containerd::start_detached`] or found by
//!   [`Containerd::attach`] is only torn down by an explicit `teardown`.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::images;
use ephemerald::cri::{CriClient, CriError, Runtime};

/// Where project-local testbeds live: `<repo>/.testbed`.
pub const PROJECT_TESTBED_DIR: &str = concat!(env!("EPHEMERALD_REPO_ROOT"), "/.testbed");
/// Where the CNI plugins of Debian's `containernetworking-plugins` live.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The longest unix socket path (`sun_path` is 108 bytes with its NUL).
const SOCKET_PATH_MAX: usize = 107;
/// containerd 1.6 puts every shim's socket here, whatever its own root.
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
/// libcni's result cache; containerd 1.6 offers no way to move it.
const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";
/// The namespace the CRI plugin uses.
const K8S_NAMESPACE: &str = "k8s.io";
/// How long containerd gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
/// How long killed processes and busy cgroups get to go away.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long the CRI part of a teardown may take.
const CRI_TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// A failure to start, reach or tear down a testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A file or directory of the testbed could not be read, written or removed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done, e.g. `write`.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A program the testbed needs is not installed.
    #[error("{program} not found: run scripts/install-deps.sh")]
    MissingProgram {
        /// The program, e.g. `containerd`.
        program: &'static str,
    },
    /// A helper program (gcc, ctr, ip) ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The options or a name cannot be used.
    #[error("invalid testbed option: {0}")]
    Invalid(String),
    /// A live testbed already uses the directory.
    #[error("a testbed is already running in {dir} (containerd pid {pid})")]
    AlreadyRunning {
        /// The testbed's directory.
        dir: PathBuf,
        /// The running containerd's PID.
        pid: i32,
    },
    /// containerd exited while starting.
    #[error("containerd exited during start ({status}); last lines of {log}:\n{tail}")]
    Exited {
        /// How it exited, as far as known.
        status: String,
        /// containerd's log file.
        log: PathBuf,
        /// The end of that log.
        tail: String,
    },
    /// containerd did not serve the CRI in time.
    #[error(
        "containerd did not serve the CRI on {socket} within {secs} s; last lines of {log}:\n{tail}"
    )]
    NotReady {
        /// The socket that was polled.
        socket: PathBuf,
        /// The deadline that passed.
        secs: u64,
        /// containerd's log file.
        log: PathBuf,
        /// The end of that log.
        tail: String,
    },
    /// There is no testbed in the directory.
    #[error("no testbed in {dir}")]
    NotFound {
        /// The directory looked at.
        dir: PathBuf,
    },
    /// A CRI call made by the testbed itself failed.
    #[error(transparent)]
    Cri(#[from] CriError),
    /// Teardown ran to the end but something could not be removed.
    #[error("teardown of {dir} left: {}", leftovers.join("; "))]
    Leftovers {
        /// The testbed's directory.
        dir: PathBuf,
        /// What is left, one entry per item.
        leftovers: Vec<String>,
    },
}

/// How to start a testbed.
#[derive(Debug, Clone)]
pub struct ContainerdOpts {
    /// Unique on the machine while the testbed lives; `[a-z0-9-]`, at most 40
    /// characters, starting with a letter or digit.
    pub name: String,
    /// The testbed's directory (created; must not hold a live testbed).
    pub base_dir: PathBuf,
    /// Where built images and compiled programs are cached (shared by testbeds).
    pub cache_dir: PathBuf,
    /// Give pods their own network namespace on a bridge (else only
    /// host-network pods work).
    pub cni: bool,
    /// How long containerd may take to serve the CRI.
    pub start_timeout: Duration,
}

impl ContainerdOpts {
    /// A testbed in `<repo>/.testbed/NAME` with the shared cache
    /// [`default_cache_dir`], no CNI.
    pub fn project(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            base_dir: Path::new(PROJECT_TESTBED_DIR).join(&name),
            cache_dir: default_cache_dir(),
            name,
            cni: false,
            start_timeout: Duration::from_secs(30),
        }
    }

    /// Like [`project`](Self::project) with a name unique on the machine:
    /// `PREFIX-<pid>-<n>`.
    pub fn unique(prefix: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        Self::project(format!("{prefix}-{}-{n}", std::process::id()))
    }

    /// A testbed in `dir`, named after the directory's last component.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            base_dir: dir,
            ..Self::project(name)
        }
    }

    /// Turns CNI (a bridge network for pods) on or off.
    pub fn with_cni(mut self, cni: bool) -> Self {
        self.cni = cni;
        self
    }
}

/// The image cache shared by all testbeds of this checkout:
/// `<repo>/.testbed/_cache` (no testbed name contains `_`).
pub fn default_cache_dir() -> PathBuf {
    Path::new(PROJECT_TESTBED_DIR).join("_cache")
}

/// How long the parts of [`Containerd::start`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartTimings {
    /// From the call to containerd serving the CRI (includes writing the
    /// config and reaping orphaned testbeds).
    pub containerd_ready: Duration,
    /// Building (or taking from the cache) and importing the three images.
    pub images: Duration,
}

/// What `testbed.json` records: everything teardown needs, for another process too.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Layout {
    name: String,
    dir: PathBuf,
    socket: PathBuf,
    cgroup_root: String,
    cni: Option<CniLayout>,
    /// The process that owns the testbed (`pid`, start time in clock ticks);
    /// `None` when it was started detached.
    owner: Option<(i32, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CniLayout {
    network: String,
    bridge: String,
    subnet: String,
}

impl Layout {
    fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join("containerd.pid")
    }
    fn state_file(&self) -> PathBuf {
        self.dir.join("testbed.json")
    }
    fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }
    fn pod_logs(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }
    fn pods(&self) -> PathBuf {
        self.dir.join("pods")
    }
}

/// A containerd serving the CRI on a socket in its own directory, with the
/// testbed images imported.
pub struct Containerd {
    layout: Layout,
    /// containerd's PID; `None` when an attached testbed's containerd was not running.
    pid: Option<i32>,
    /// Drop tears the testbed down.
    owned: bool,
    done: bool,
    timings: StartTimings,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("name", &self.layout.name)
            .field("dir", &self.layout.dir)
            .field("pid", &self.pid)
            .field("owned", &self.owned)
            .finish()
    }
}

impl Containerd {
    /// Starts containerd as a child of this process, waits until it serves
    /// the CRI, and imports the three images. Dropping the result tears it down.
    pub async fn start(opts: ContainerdOpts) -> Result<Self, TestbedError> {
        Self::launch(opts, false).await
    }

    /// Like [`start`](Self::start), but the testbed outlives this process:
    /// dropping the result leaves it running. Stop it later with
    /// [`attach`](Self::attach) and [`teardown`](Self::teardown).
    pub async fn start_detached(opts: ContainerdOpts) -> Result<Self, TestbedError> {
        Self::launch(opts, true).await
    }

    /// Finds the testbed in `dir` (or its `/tmp/ephemerald-NAME` fallback,
    /// NAME being `dir`'s last component), started by any process. The result
    /// is not torn down on drop. Succeeds also when containerd is no longer
    /// running, so that [`teardown`](Self::teardown) can clean up after it.
    pub fn attach(dir: &Path) -> Result<Self, TestbedError> {
        let mut candidates = vec![dir.to_path_buf()];
        if let Some(name) = dir.file_name() {
            candidates.push(fallback_dir(&name.to_string_lossy()));
        }
        for dir in candidates {
            if let Some(layout) = read_layout(&dir) {
                let pid = live_containerd(&layout);
                return Ok(Self {
                    layout,
                    pid,
                    owned: false,
                    done: false,
                    timings: StartTimings::default(),
                });
            }
        }
        Err(TestbedError::NotFound {
            dir: dir.to_path_buf(),
        })
    }

    /// The CRI endpoint, `unix:///…/containerd.sock`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.layout.socket.display())
    }

    /// The path of containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.layout.socket
    }

    /// The testbed's directory (the fallback under /tmp when the requested one
    /// was too long for a socket path).
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The testbed's name.
    pub fn name(&self) -> &str {
        &self.layout.name
    }

    /// containerd's PID, if it is running.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// containerd's own log file.
    pub fn log_file(&self) -> PathBuf {
        self.layout.log()
    }

    /// The root of pod log directories (what `/var/log/pods` is on a node).
    pub fn pod_logs_dir(&self) -> PathBuf {
        self.layout.pod_logs()
    }

    /// The root of per-pod directories (what `/var/lib/kubelet/pods` is on a node).
    pub fn pods_dir(&self) -> PathBuf {
        self.layout.pods()
    }

    /// The cgroup under which pods go, e.g. `/ephemerald-NAME`; a pod's
    /// sandbox `cgroup_parent` is `<root>/pod<uid>` (cgroupfs driver).
    pub fn cgroup_parent_root(&self) -> &str {
        &self.layout.cgroup_root
    }

    /// `<cgroup_parent_root>/pod<uid>`: a sandbox's `linux.cgroup_parent`.
    pub fn pod_cgroup_parent(&self, pod_uid: &str) -> String {
        format!("{}/pod{pod_uid}", self.layout.cgroup_root)
    }

    /// The pods' subnet (`10.217.X.0/24`) when CNI is on.
    pub fn pod_subnet(&self) -> Option<&str> {
        self.layout.cni.as_ref().map(|c| c.subnet.as_str())
    }

    /// The bridge pods are attached to when CNI is on.
    pub fn bridge(&self) -> Option<&str> {
        self.layout.cni.as_ref().map(|c| c.bridge.as_str())
    }

    /// How long [`start`](Self::start) took (zero for an attached testbed).
    pub fn start_timings(&self) -> StartTimings {
        self.timings
    }

    /// A CRI client for this containerd.
    pub fn client(&self) -> Result<CriClient, TestbedError> {
        Ok(CriClient::new(&self.endpoint())?)
    }

    /// Whether containerd is still running.
    pub fn is_running(&self) -> bool {
        self.pid.is_some_and(process_alive)
    }

    /// Stops and removes every pod through the CRI, stops containerd, kills
    /// leftover shims and processes in the testbed's cgroups, unmounts what
    /// is mounted under its directory, removes its cgroups, bridge and
    /// directory. Fails with [`TestbedError::Leftovers`] naming anything that
    /// could not be removed.
    pub async fn teardown(mut self) -> Result<(), TestbedError> {
        self.done = true;
        let started = Instant::now();
        if self.is_running() {
            let endpoint = self.endpoint();
            if tokio::time::timeout(CRI_TEARDOWN_TIMEOUT, remove_all_pods(&endpoint))
                .await
                .is_err()
            {
                tracing::warn!(dir = %self.layout.dir.display(), "removing pods took too long; killing instead");
            }
        }
        let layout = self.layout.clone();
        let pid = self.pid;
        let leftovers = tokio::task::spawn_blocking(move || cleanup(&layout, pid))
            .await
            .unwrap_or_else(|e| vec![format!("cleanup task failed: {e}")]);
        tracing::info!(
            dir = %self.layout.dir.display(),
            ms = started.elapsed().as_millis() as u64,
            "testbed torn down"
        );
        if leftovers.is_empty() {
            Ok(())
        } else {
            Err(TestbedError::Leftovers {
                dir: self.layout.dir.clone(),
                leftovers,
            })
        }
    }

    /// Stops the containerd daemon alone (SIGTERM, then SIGKILL), as a
    /// node's containerd goes down for an upgrade or a crash: its state,
    /// socket path, shims and running containers stay, and
    /// [`start_daemon`](Self::start_daemon) brings it back on the same
    /// directory. Meanwhile every CRI call fails with `Unavailable`.
    pub async fn stop_daemon(&mut self) -> Result<(), TestbedError> {
        let Some(pid) = self.pid.take() else {
            return Ok(());
        };
        let stopped = blocking(move || Ok(stop_process(pid))).await?;
        if stopped {
            tracing::info!(dir = %self.layout.dir.display(), pid, "containerd stopped");
            Ok(())
        } else {
            self.pid = Some(pid);
            Err(TestbedError::Invalid(format!(
                "containerd (pid {pid}) does not exit"
            )))
        }
    }

    /// Starts containerd again on the same config, state and socket after
    /// [`stop_daemon`](Self::stop_daemon), and waits until it serves the
    /// CRI. containerd recovers its containers (running ones through their
    /// shims, which outlived it).
    pub async fn start_daemon(&mut self) -> Result<(), TestbedError> {
        if self.is_running() {
            return Ok(());
        }
        let layout = self.layout.clone();
        let pid = blocking(move || spawn_containerd(&layout)).await?;
        self.pid = Some(pid);
        self.wait_ready(Duration::from_secs(30)).await?;
        tracing::info!(dir = %self.layout.dir.display(), pid, "containerd started again");
        Ok(())
    }

    async fn launch(opts: ContainerdOpts, detached: bool) -> Result<Self, TestbedError> {
        let started = Instant::now();
        let cache_dir = opts.cache_dir.clone();
        let timeout = opts.start_timeout;
        let (layout, pid) = blocking(move || prepare_and_spawn(&opts, detached)).await?;
        // Until start succeeds, a failure tears down whatever was started.
        let mut testbed = Self {
            layout,
            pid: Some(pid),
            owned: true,
            done: false,
            timings: StartTimings::default(),
        };
        let result = async {
            testbed.wait_ready(timeout).await?;
            let ready = started.elapsed();
            let socket = testbed.layout.socket.clone();
            blocking(move || images::ensure_images(&socket, &cache_dir)).await?;
            Ok::<_, TestbedError>(ready)
        }
        .await;
        match result {
            Ok(ready) => {
                testbed.timings = StartTimings {
                    containerd_ready: ready,
                    images: started.elapsed() - ready,
                };
                testbed.owned = !detached;
                tracing::info!(
                    dir = %testbed.layout.dir.display(),
                    pid,
                    ready_ms = ready.as_millis() as u64,
                    images_ms = testbed.timings.images.as_millis() as u64,
                    "testbed up"
                );
                Ok(testbed)
            }
            Err(e) => {
                if let Err(cleanup) = testbed.teardown().await {
                    tracing::warn!(error = %cleanup, "cleanup after a failed start");
                }
                Err(e)
            }
        }
    }

    async fn wait_ready(&self, timeout: Duration) -> Result<(), TestbedError> {
        let deadline = Instant::now() + timeout;
        let pid = self.pid.unwrap_or(0);
        loop {
            if let Some(status) = exited(pid) {
                return Err(TestbedError::Exited {
                    status,
                    log: self.layout.log(),
                    tail: log_tail(&self.layout.log()),
                });
            }
            // Version answers only once the CRI plugin is loaded, which is
            // later than the socket appears (and never, if the plugin failed).
            let client = self.client()?.with_timeout(Duration::from_secs(2));
            if let Ok(version) = client.version().await
                && !version.runtime_name.is_empty()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::NotReady {
                    socket: self.layout.socket.clone(),
                    secs: timeout.as_secs(),
                    log: self.layout.log(),
                    tail: log_tail(&self.layout.log()),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if !self.owned || self.done {
            return;
        }
        self.done = true;
        let layout = self.layout.clone();
        let pid = self.pid;
        let running = self.is_running();
        let endpoint = self.endpoint();
        // A thread of its own: Drop may run inside a tokio runtime, where
        // blocking on another runtime is not allowed.
        let worker = std::thread::Builder::new()
            .name("testbed-teardown".into())
            .spawn(move || {
                if running
                    && let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                {
                    let _ = rt.block_on(async {
                        tokio::time::timeout(CRI_TEARDOWN_TIMEOUT, remove_all_pods(&endpoint)).await
                    });
                }
                cleanup(&layout, pid)
            });
        match worker.map(|w| w.join()) {
            Ok(Ok(leftovers)) if leftovers.is_empty() => {}
            Ok(Ok(leftovers)) => {
                tracing::warn!(dir = %self.layout.dir.display(), ?leftovers, "testbed teardown left things behind");
            }
            Ok(Err(_)) => tracing::warn!("testbed teardown panicked"),
            Err(e) => tracing::warn!(error = %e, "cannot start testbed teardown"),
        }
    }
}

/// Tears down every testbed directly under `parent` (and every
/// `/tmp/ephemerald-*` fallback) whose owning process is gone: what is left
/// when a test process was killed before it could clean up. Testbeds started
/// detached have no owner and are left alone. Returns the directories reaped.
pub fn reap_orphans(parent: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for root in [parent, Path::new("/tmp")] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let fallback = root == Path::new("/tmp")
                && entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("ephemerald-");
            if (root == parent || fallback) && path.is_dir() {
                dirs.push(path);
            }
        }
    }
    let mut reaped = Vec::new();
    for dir in dirs {
        let Some(layout) = read_layout(&dir) else {
            continue;
        };
        let Some((owner, start)) = layout.owner else {
            continue;
        };
        if process_start_time(owner) == Some(start) {
            continue;
        }
        tracing::info!(dir = %dir.display(), owner, "reaping an orphaned testbed");
        let leftovers = cleanup(&layout, live_containerd(&layout));
        if !leftovers.is_empty() {
            tracing::warn!(dir = %dir.display(), ?leftovers, "orphaned testbed left things behind");
        }
        reaped.push(dir);
    }
    reaped
}

/// Runs blocking work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TestbedError> + Send + 'static,
) -> Result<T, TestbedError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TestbedError::Invalid(format!("testbed task failed: {e}")))?
}

/// Validates the options, reaps orphans, writes the config and starts containerd.
fn prepare_and_spawn(opts: &ContainerdOpts, detached: bool) -> Result<(Layout, i32), TestbedError> {
    validate_name(&opts.name)?;
    let dir = resolve_dir(&opts.base_dir, &opts.name)?;
    if let Some(parent) = dir.parent() {
        reap_orphans(parent);
    }
    if let Some(old) = read_layout(&dir) {
        if let Some(pid) = live_containerd(&old) {
            return Err(TestbedError::AlreadyRunning { dir, pid });
        }
        // A dead testbed (its containerd is gone): clean up after it first.
        let leftovers = cleanup(&old, None);
        if !leftovers.is_empty() {
            return Err(TestbedError::Leftovers { dir, leftovers });
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io_error("remove", &dir, e))?;
    }

    let cni = opts.cni.then(|| {
        let h = Sha256::digest(opts.name.as_bytes());
        CniLayout {
            network: format!("ephemerald-{}", opts.name),
            bridge: format!("ephd{}", &hex(&h)[..10]),
            subnet: format!("10.217.{}.0/24", h[10]),
        }
    });
    let owner = if detached {
        None
    } else {
        let me = std::process::id() as i32;
        process_start_time(me).map(|start| (me, start))
    };
    let layout = Layout {
        socket: dir.join("containerd.sock"),
        cgroup_root: format!("/ephemerald-{}", opts.name),
        name: opts.name.clone(),
        dir,
        cni,
        owner,
    };
    for d in [
        layout.dir.clone(),
        layout.cni_conf_dir(),
        layout.pod_logs(),
        layout.pods(),
    ] {
        std::fs::create_dir_all(&d).map_err(|e| io_error("create directory", &d, e))?;
    }
    write(&layout.config(), config_toml(&layout).as_bytes())?;
    if let Some(cni) = &layout.cni {
        let conflist = cni_conflist(&layout, cni);
        write(
            &layout.cni_conf_dir().join("10-ephemerald.conflist"),
            conflist.as_bytes(),
        )?;
    }
    let state = serde_json::to_vec_pretty(&layout).unwrap_or_default();
    write(&layout.state_file(), &state)?;

    let pid = spawn_containerd(&layout)?;
    Ok((layout, pid))
}

/// Starts containerd on the testbed's config and records its PID.
fn spawn_containerd(layout: &Layout) -> Result<i32, TestbedError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.log())
        .map_err(|e| io_error("open", &layout.log(), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| io_error("open", &layout.log(), e))?;
    let child = Command::new("containerd")
        .arg("--config")
        .arg(layout.config())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for us does not reach it, and
        // a detached testbed survives the terminal. Orphans of killed owners
        // are reaped by the next start.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TestbedError::MissingProgram {
                    program: "containerd",
                }
            } else {
                io_error("start containerd for", &layout.dir, e)
            }
        })?;
    let pid = child.id() as i32;
    // The Child handle is dropped without waiting: teardown reaps the process
    // by PID (waitpid) when it is ours, and by /proc when it is not.
    drop(child);
    write(&layout.pid_file(), format!("{pid}\n").as_bytes())?;
    Ok(pid)
}

fn validate_name(name: &str) -> Result<(), TestbedError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(TestbedError::Invalid(format!(
            "testbed name {name:?} must be 1-40 of [a-z0-9-], not starting with '-'"
        )))
    }
}

/// The directory actually used: `base` unless its socket path (plus
/// `.ttrpc`) would not fit in a unix socket address.
fn resolve_dir(base: &Path, name: &str) -> Result<PathBuf, TestbedError> {
    let base = if base.is_absolute() {
        base.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| io_error("resolve", base, e))?
            .join(base)
    };
    if socket_fits(&base) {
        Ok(base)
    } else {
        let fallback = fallback_dir(name);
        tracing::info!(requested = %base.display(), dir = %fallback.display(), "testbed path too long for a unix socket, using /tmp");
        Ok(fallback)
    }
}

fn socket_fits(dir: &Path) -> bool {
    dir.join("containerd.sock.ttrpc").as_os_str().len() <= SOCKET_PATH_MAX
}

fn fallback_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/ephemerald-{name}"))
}

fn read_layout(dir: &Path) -> Option<Layout> {
    let text = std::fs::read(dir.join("testbed.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The PID in `containerd.pid`, if that process is alive and is this
/// testbed's containerd (not a reused PID).
fn live_containerd(layout: &Layout) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(layout.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let config = layout.config();
    let config = config.to_string_lossy();
    let args = cmdline(pid)?;
    let is_ours = args.first().is_some_and(|a| a.ends_with("containerd"))
        && args.iter().any(|a| *a == config);
    (is_ours && process_alive(pid)).then_some(pid)
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn config_toml(layout: &Layout) -> String {
    let dir = &layout.dir;
    let p = |rel: &str| toml_str(&dir.join(rel).to_string_lossy());
    format!(
        r#"# Written by ephemerald's testbed (testbed/src/containerd.rs); removed at teardown.
version = 2
root = {root}
state = {state}
# Plugins that cannot work here or would touch the host outside this directory.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {socket}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {pause}
  # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Pods' network namespaces under state/, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # cgroupfs: there is no systemd here.
        SystemdCgroup = false
        # runc's state under state/, not the shared /run/containerd/runc.
        Root = {runc_root}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
    max_conf_num = 1
"#,
        root = p("root"),
        state = p("state"),
        socket = toml_str(&layout.socket.to_string_lossy()),
        pause = toml_str(images::PAUSE_IMAGE),
        runc_root = p("state/runc"),
        cni_bin = toml_str(CNI_BIN_DIR),
        cni_conf = toml_str(&layout.cni_conf_dir().to_string_lossy()),
    )
}

fn cni_conflist(layout: &Layout, cni: &CniLayout) -> String {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": cni.network,
        "plugins": [{
            "type": "bridge",
            "bridge": cni.bridge,
            // No address on the host side, no NAT: pods reach each other only.
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": cni.subnet }]],
                "dataDir": layout.dir.join("cni/ipam"),
            },
        }],
    });
    serde_json::to_string_pretty(&conf).unwrap_or_default()
}

/// Stops and removes every pod sandbox; failures are logged (the cleanup
/// that follows kills whatever is left).
async fn remove_all_pods(endpoint: &str) {
    let Ok(client) = CriClient::new(endpoint) else {
        return;
    };
    let client = client.with_timeout(Duration::from_secs(30));
    let pods = match client.list_pod_sandbox(None).await {
        Ok(pods) => pods,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list pods to remove");
            return;
        }
    };
    let removals = pods.iter().map(|pod| {
        let client = client.clone();
        async move {
            if let Err(e) = client.stop_pod_sandbox(&pod.id).await {
                tracing::warn!(pod = %pod.id, error = %e, "cannot stop pod");
            }
            if let Err(e) = client.remove_pod_sandbox(&pod.id).await {
                tracing::warn!(pod = %pod.id, error = %e, "cannot remove pod");
            }
        }
    });
    futures::future::join_all(removals).await;
}

/// Everything after the CRI: stops containerd and removes what the testbed
/// left on the machine. Returns what could not be removed.
fn cleanup(layout: &Layout, pid: Option<i32>) -> Vec<String> {
    let mut leftovers = Vec::new();
    if let Some(pid) = pid
        && !stop_process(pid)
    {
        leftovers.push(format!("containerd (pid {pid}) does not exit"));
    }

    let cgroups = cgroup_dirs(&layout.cgroup_root);
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let shims = shims_of(&layout.socket);
        let procs = procs_in(&cgroups);
        if shims.is_empty() && procs.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            leftovers.extend(shims.iter().map(|(pid, _)| format!("shim pid {pid}")));
            leftovers.extend(
                procs
                    .iter()
                    .map(|pid| format!("process {pid} in a pod cgroup")),
            );
            break;
        }
        for (pid, id) in &shims {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            reap(*pid);
            remove_shim_socket(&layout.socket, id);
        }
        for pid in &procs {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    leftovers.extend(unmount_under(&layout.dir));

    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let left = remove_cgroups(&cgroups);
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            leftovers.extend(left.iter().map(|d| format!("cgroup {}", d.display())));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // The bridge is this testbed's alone (its name comes from the testbed's),
    // so it goes whenever it exists.
    if let Some(cni) = &layout.cni
        && bridge_exists(&cni.bridge)
        && let Err(e) = images::run(
            Command::new("ip").args(["link", "delete", &cni.bridge]),
            "ip",
        )
        && bridge_exists(&cni.bridge)
    {
        leftovers.push(format!("bridge {}: {e}", cni.bridge));
    }
    // Also without CNI: containerd always sets up the loopback network, whose
    // results it caches too (network `cni-loopback`).
    remove_cni_results(
        layout.cni.as_ref().map(|c| c.network.as_str()),
        &sandbox_ids(layout),
    );

    if layout.dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&layout.dir)
        && layout.dir.exists()
    {
        leftovers.push(format!("directory {}: {e}", layout.dir.display()));
    }
    leftovers
}

fn bridge_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// SIGTERM, then SIGKILL after [`TERM_GRACE`]; true once the process is gone.
fn stop_process(pid: i32) -> bool {
    // A child of ours that already died is a zombie until reaped.
    reap(pid);
    for (signal, wait) in [(Signal::SIGTERM, TERM_GRACE), (Signal::SIGKILL, KILL_WAIT)] {
        if !process_alive(pid) {
            return true;
        }
        let _ = kill(Pid::from_raw(pid), signal);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            reap(pid);
            if !process_alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    reap(pid);
    !process_alive(pid)
}

/// Collects the exit status of `pid` if it is our child (a no-op otherwise).
fn reap(pid: i32) -> Option<WaitStatus> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) | Err(_) => None,
        Ok(status) => Some(status),
    }
}

/// `Some(how)` once `pid` has exited.
fn exited(pid: i32) -> Option<String> {
    if let Some(status) = reap(pid) {
        return Some(format!("{status:?}"));
    }
    (!process_alive(pid)).then(|| "gone".to_string())
}

/// True while the process exists and is not a zombie.
pub(crate) fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The process's start time in clock ticks since boot (field 22 of `stat`).
fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live `containerd-shim-runc-v2` processes serving the containerd on
/// `socket`, with the task id each serves.
pub fn shims_of(socket: &Path) -> Vec<(i32, String)> {
    let socket = socket.to_string_lossy();
    let mut shims = Vec::new();
    for pid in all_pids() {
        let Some(args) = cmdline(pid) else { continue };
        if !args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"))
        {
            continue;
        }
        let flag = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
        };
        if flag("-address").is_some_and(|a| *a == socket) && process_alive(pid) {
            shims.push((pid, flag("-id").cloned().unwrap_or_default()));
        }
    }
    shims
}

/// A killed shim leaves its socket behind; containerd names it
/// `/run/containerd/s/<sha256(<socket>/<namespace>/<id>)>`.
fn remove_shim_socket(socket: &Path, id: &str) {
    if id.is_empty() {
        return;
    }
    let key = socket.join(K8S_NAMESPACE).join(id);
    let name = hex(&Sha256::digest(key.as_os_str().as_encoded_bytes()));
    let _ = std::fs::remove_file(Path::new(SHIM_SOCKET_DIR).join(name));
}

/// The mount points of every cgroup hierarchy (v1 controllers and the v2 one).
fn cgroup_mounts() -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .map(|m| m.mount_point)
        .collect()
}

/// `<mount>/<root>` for every hierarchy.
pub fn cgroup_dirs(cgroup_root: &str) -> Vec<PathBuf> {
    let rel = cgroup_root.trim_start_matches('/');
    if rel.is_empty() {
        return Vec::new();
    }
    cgroup_mounts().into_iter().map(|m| m.join(rel)).collect()
}

/// Every directory at or below `roots`, deepest first.
fn dirs_below(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo: Vec<PathBuf> = roots.iter().filter(|d| d.is_dir()).cloned().collect();
    while let Some(dir) = todo.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
        }
        found.push(dir);
    }
    found.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    found
}

/// PIDs of the processes in the cgroups at or below `roots`.
fn procs_in(roots: &[PathBuf]) -> BTreeSet<i32> {
    dirs_below(roots)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// `rmdir`s the cgroups at or below `roots`, deepest first; returns those left.
fn remove_cgroups(roots: &[PathBuf]) -> Vec<PathBuf> {
    for dir in dirs_below(roots) {
        let _ = std::fs::remove_dir(&dir);
    }
    roots.iter().filter(|d| d.exists()).cloned().collect()
}

struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
}

fn mountinfo() -> Vec<MountEntry> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_mount(fields.get(4)?)),
                fstype: fields.get(sep + 1)?.to_string(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or below `dir` in this process's mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Lazily unmounts everything at or below `dir`, deepest first; returns
/// what is still mounted.
fn unmount_under(dir: &Path) -> Vec<String> {
    for _ in 0..5 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Vec::new();
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in &mounts {
            if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
                tracing::debug!(mount = %m.display(), error = %e, "umount");
            }
        }
    }
    mounts_under(dir)
        .iter()
        .map(|m| format!("mount {}", m.display()))
        .collect()
}

/// The ids of the sandboxes containerd's CRI plugin knows (from its
/// directories, so this works when containerd is gone).
fn sandbox_ids(layout: &Layout) -> Vec<String> {
    let mut ids = BTreeSet::new();
    for base in ["root", "state"] {
        let dir = layout
            .dir
            .join(base)
            .join("io.containerd.grpc.v1.cri/sandboxes");
        if let Ok(entries) = std::fs::read_dir(dir) {
            ids.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|id| is_container_id(id)),
            );
        }
    }
    ids.into_iter().collect()
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes libcni's cached results (`<network>-<sandbox id>-<ifname>`) of
/// this testbed's network and sandboxes, left when a pod was never removed
/// through the CRI.
fn remove_cni_results(network: Option<&str>, sandbox_ids: &[String]) {
    let Ok(entries) = std::fs::read_dir(CNI_RESULTS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let of_network = network
            .and_then(|n| name.strip_prefix(n))
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|rest| {
                rest.len() > 65 && is_container_id(&rest[..64]) && rest.as_bytes()[64] == b'-'
            });
        let of_sandbox = sandbox_ids
            .iter()
            .any(|id| name.contains(&format!("-{id}-")));
        if of_network || of_sandbox {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The last 30 lines of a log file.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn write(path: &Path, data: &[u8]) -> Result<(), TestbedError> {
    std::fs::write(path, data).map_err(|e| io_error("write", path, e))
}

fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> TestbedError {
    TestbedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_dns_like_labels() {
        assert!(validate_name("t-123-0").is_ok());
        for bad in ["", "-x", "Upper", "a_b", "a/b", &"x".repeat(41)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_long_dir_falls_back_to_tmp() {
        let short = resolve_dir(Path::new("/work/x/.testbed/abc"), "abc").unwrap();
        assert_eq!(short, Path::new("/work/x/.testbed/abc"));
        let long = format!("/work/{}/abc", "d".repeat(90));
        let dir = resolve_dir(Path::new(&long), "abc").unwrap();
        assert_eq!(dir, Path::new("/tmp/ephemerald-abc"));
        assert!(socket_fits(&dir));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount(r"/a\040b/c\134d"), r"/a b/c\d");
        assert_eq!(unescape_mount(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn the_config_names_everything_under_the_dir() {
        let layout = Layout {
            name: "x".into(),
            dir: PathBuf::from("/t/x"),
            socket: PathBuf::from("/t/x/containerd.sock"),
            cgroup_root: "/ephemerald-x".into(),
            cni: None,
            owner: None,
        };
        let toml = config_toml(&layout);
        for needle in [
            r#"root = "/t/x/root""#,
            r#"state = "/t/x/state""#,
            r#"address = "/t/x/containerd.sock""#,
            r#"sandbox_image = "ephemerald.local/pause:3.10""#,
            "restrict_oom_score_adj = true",
            "SystemdCgroup = false",
            r#"conf_dir = "/t/x/cni/net.d""#,
        ] {
            assert!(toml.contains(needle), "{needle} missing from\n{toml}");
        }
    }
}
