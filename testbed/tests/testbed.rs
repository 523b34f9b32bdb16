//! The testbed against the real thing: containerd + runc from Debian, the
//! locally built images, a pod and a container, and a teardown that leaves
//! nothing behind. These tests fail (never skip) when containerd cannot
//! start: run `scripts/install-deps.sh` first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ephemerald::cri::proto::{
    ContainerConfig, ContainerMetadata, ContainerState, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata,
};
use ephemerald::cri::{CriClient, Runtime};
use ephemerald_testbed::containerd::{Containerd, ContainerdOpts};
use ephemerald_testbed::images::{ALL_IMAGES, APP_IMAGE, BUSYBOX_IMAGE};

/// What a testbed may leave on the machine, recorded before teardown.
struct Footprint {
    pid: i32,
    dir: PathBuf,
    socket: PathBuf,
    cgroup_root: String,
    bridge: Option<String>,
}

impl Footprint {
    fn of(tb: &Containerd) -> Self {
        Self {
            pid: tb.pid().expect("containerd runs"),
            dir: tb.dir().to_path_buf(),
            socket: tb.socket().to_path_buf(),
            cgroup_root: tb.cgroup_parent_root().to_string(),
            bridge: tb.bridge().map(str::to_string),
        }
    }

    /// Checks, independently of the testbed's own code, that nothing is left.
    fn assert_gone(&self) {
        assert!(!alive(self.pid), "containerd pid {} still runs", self.pid);
        let socket = self.socket.to_string_lossy();
        let shims: Vec<_> = processes()
            .into_iter()
            .filter(|(_, args)| {
                args.first().is_some_and(|a| a.contains("containerd-shim"))
                    && args.iter().any(|a| *a == socket)
            })
            .collect();
        assert!(shims.is_empty(), "shims left: {shims:?}");
        let dir = self.dir.to_string_lossy();
        let mounts: Vec<_> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&*dir)))
            .map(str::to_string)
            .collect();
        assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
        let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
            .unwrap()
            .flatten()
            .map(|e| e.path().join(self.cgroup_root.trim_start_matches('/')))
            .filter(|p| p.exists())
            .collect();
        assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        if let Some(bridge) = &self.bridge {
            assert!(
                !Path::new("/sys/class/net").join(bridge).exists(),
                "bridge {bridge} left"
            );
        }
        assert!(!self.dir.exists(), "{} left", self.dir.display());
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.split_whitespace().next()?.to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn processes() -> Vec<(i32, Vec<String>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let args = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            alive(pid).then_some((pid, args))
        })
        .collect()
}

fn pod_uid() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), nanos)
}

/// A sandbox config as the kubelet would send it for pod `name`.
fn sandbox_config(
    tb: &Containerd,
    name: &str,
    uid: &str,
    network: NamespaceMode,
) -> PodSandboxConfig {
    let log_dir = tb.pod_logs_dir().join(format!("default_{name}_{uid}"));
    std::fs::create_dir_all(&log_dir).unwrap();
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        // With host networking the kubelet sends no hostname (containerd
        // refuses one without a private UTS namespace).
        hostname: if network == NamespaceMode::Node {
            String::new()
        } else {
            name.into()
        },
        log_directory: log_dir.to_string_lossy().into_owned(),
        labels: HashMap::from([("io.kubernetes.pod.uid".to_string(), uid.to_string())]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: tb.pod_cgroup_parent(uid),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn wait_exited(client: &CriClient, id: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client
            .container_status(id, false)
            .await
            .unwrap()
            .status
            .unwrap();
        if status.state == ContainerState::ContainerExited as i32 {
            return status.exit_code;
        }
        assert!(Instant::now() < deadline, "container {id} still {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pod_runs_busybox_and_teardown_leaves_nothing() {
    let started = Instant::now();
    let tb = Containerd::start(ContainerdOpts::unique("tb-host"))
        .await
        .expect("containerd starts (run scripts/install-deps.sh)");
    let timings = tb.start_timings();
    eprintln!(
        "start: {:?} total (containerd serving the CRI {:?}, images {:?})",
        started.elapsed(),
        timings.containerd_ready,
        timings.images
    );
    let client = tb.client().unwrap();

    let version = client.version().await.unwrap();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");

    let tags: Vec<String> = client
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .collect();
    for image in ALL_IMAGES {
        assert!(tags.iter().any(|t| t == image), "{image} not in {tags:?}");
    }

    let uid = pod_uid();
    let config = sandbox_config(&tb, "hello-pod", &uid, NamespaceMode::Node);
    let sandbox = client.run_pod_sandbox(config.clone()).await.unwrap();
    let pod_cgroup =
        Path::new("/sys/fs/cgroup/pids").join(tb.pod_cgroup_parent(&uid).trim_start_matches('/'));
    assert!(pod_cgroup.is_dir(), "{} missing", pod_cgroup.display());

    let log_dir = PathBuf::from(&config.log_directory);
    std::fs::create_dir_all(log_dir.join("hello")).unwrap();
    let container = client
        .create_container(
            &sandbox,
            ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "hello".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: BUSYBOX_IMAGE.into(),
                    ..Default::default()
                }),
                // `id -un` reads the image's /etc/passwd.
                command: vec!["sh".into(), "-c".into(), "echo hello; id -un".into()],
                log_path: "hello/0.log".into(),
                ..Default::default()
            },
            config.clone(),
        )
        .await
        .unwrap();
    client.start_container(&container).await.unwrap();
    assert_eq!(wait_exited(&client, &container).await, 0);
    let log = std::fs::read_to_string(log_dir.join("hello/0.log")).unwrap();
    assert!(log.contains(" hello\n"), "log: {log:?}");
    assert!(log.contains(" root\n"), "log: {log:?}");

    // The shell-less app prints a line, then runs until SIGTERM, and exits 0.
    std::fs::create_dir_all(log_dir.join("app")).unwrap();
    let app = client
        .create_container(
            &sandbox,
            ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: APP_IMAGE.into(),
                    ..Default::default()
                }),
                log_path: "app/0.log".into(),
                ..Default::default()
            },
            config.clone(),
        )
        .await
        .unwrap();
    client.start_container(&app).await.unwrap();
    let app_log = log_dir.join("app/0.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&app_log).is_ok_and(|l| l.contains("app: started")) {
        assert!(Instant::now() < deadline, "the app printed nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.stop_container(&app, 5).await.unwrap();
    assert_eq!(wait_exited(&client, &app).await, 0);

    let footprint = Footprint::of(&tb);
    let started = Instant::now();
    tb.teardown().await.expect("teardown leaves nothing");
    eprintln!("teardown (one pod): {:?}", started.elapsed());
    footprint.assert_gone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_pod_gets_an_ip_in_the_subnet_and_teardown_removes_the_bridge() {
    let started = Instant::now();
    let tb = Containerd::start(ContainerdOpts::unique("tb-cni").with_cni(true))
        .await
        .expect("containerd starts (run scripts/install-deps.sh)");
    eprintln!("start with CNI: {:?}", started.elapsed());
    let client = tb.client().unwrap();
    let subnet = tb.pod_subnet().expect("CNI is on").to_string();
    let prefix = subnet.strip_suffix("0/24").expect("a /24");

    let uid = pod_uid();
    let config = sandbox_config(&tb, "net-pod", &uid, NamespaceMode::Pod);
    let sandbox = client.run_pod_sandbox(config).await.unwrap();
    let status = client
        .pod_sandbox_status(&sandbox, false)
        .await
        .unwrap()
        .status
        .unwrap();
    let ip = status.network.expect("network status").ip;
    assert!(ip.starts_with(prefix), "ip {ip:?} not in {subnet}");
    let bridge = tb.bridge().unwrap().to_string();
    assert!(Path::new("/sys/class/net").join(&bridge).exists());

    let footprint = Footprint::of(&tb);
    let started = Instant::now();
    tb.teardown().await.expect("teardown leaves nothing");
    eprintln!("teardown (one CNI pod): {:?}", started.elapsed());
    footprint.assert_gone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_testbed_survives_its_handle_and_is_torn_down_by_attach() {
    let tb = Containerd::start_detached(ContainerdOpts::unique("tb-detached"))
        .await
        .expect("containerd starts (run scripts/install-deps.sh)");
    let dir = tb.dir().to_path_buf();
    let footprint = Footprint::of(&tb);
    let uid = pod_uid();
    let config = sandbox_config(&tb, "left-pod", &uid, NamespaceMode::Node);
    tb.client().unwrap().run_pod_sandbox(config).await.unwrap();
    drop(tb);
    assert!(
        alive(footprint.pid),
        "a detached containerd outlives its handle"
    );

    let again = Containerd::attach(&dir).expect("attach finds the testbed");
    assert!(again.is_running());
    let pods = again
        .client()
        .unwrap()
        .list_pod_sandbox(None)
        .await
        .unwrap();
    assert_eq!(pods.len(), 1);
    drop(again);
    assert!(
        alive(footprint.pid),
        "an attached handle does not tear down on drop"
    );

    Containerd::attach(&dir)
        .unwrap()
        .teardown()
        .await
        .expect("teardown leaves nothing");
    footprint.assert_gone();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_started_testbed_tears_it_down() {
    let tb = Containerd::start(ContainerdOpts::unique("tb-drop"))
        .await
        .expect("containerd starts (run scripts/install-deps.sh)");
    let footprint = Footprint::of(&tb);
    let uid = pod_uid();
    let config = sandbox_config(&tb, "dropped-pod", &uid, NamespaceMode::Node);
    tb.client().unwrap().run_pod_sandbox(config).await.unwrap();
    let started = Instant::now();
    drop(tb);
    eprintln!("teardown by drop (one pod): {:?}", started.elapsed());
    footprint.assert_gone();
}
