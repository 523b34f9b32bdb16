//! A stand-in for the kubelet's pod path, for nodes without a kubelet (the
//! demo, the tests): creates a pod's sandbox and its init and regular
//! containers through the CRI with the kubelet's labels, annotations, log
//! layout and hosts file, so the agent finds what it would find on a real
//! node. Volumes: `emptyDir` directories are created where the kubelet's
//! plugin puts them (`<pods>/<uid>/volumes/kubernetes.io~empty-dir/<name>`,
//! mode 0777) and `hostPath` ones of type `DirectoryOrCreate` are created;
//! both are mounted into the containers that name them. No other volume
//! types, restarts or probes. [`make_rshared`] does the kubelet's start-up
//! step that lets containers mount pod directories with mount propagation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod};

use ephemerald::cri::proto::{ContainerState, ImageSpec, PodSandboxConfig, PodSandboxFilter};
use ephemerald::cri::{CriError, Runtime};
use ephemerald::kubelet;
use ephemerald::reconcile::translate::{self, HostFiles, NodeDirs, ResolvedImage};

/// Why a pod could not be run.
#[derive(Debug, thiserror::Error)]
pub enum PodRunnerError {
    /// A CRI call failed.
    #[error(transparent)]
    Cri(#[from] CriError),
    /// The pod spec lacks something the runner needs.
    #[error("pod spec: {0}")]
    Spec(String),
    /// An image is not on the node (the runner never pulls).
    #[error("image {0:?} is not present on the node")]
    ImageMissing(String),
    /// Writing the pod's files failed.
    #[error("pod files: {0}")]
    Io(#[from] std::io::Error),
    /// An init container did not complete successfully.
    #[error("init container {name} exited with {code}")]
    InitFailed {
        /// The init container.
        name: String,
        /// Its exit code.
        code: i32,
    },
}

/// A pod the runner started.
#[derive(Debug, Clone)]
pub struct RunningPod {
    /// Sandbox id.
    pub sandbox_id: String,
    /// The config the sandbox was created with.
    pub sandbox_config: PodSandboxConfig,
    /// Pod IP reported by the runtime ("" on the host network).
    pub ip: String,
    /// Container name → runtime id, init containers included.
    pub containers: BTreeMap<String, String>,
}

/// Runs pods through a CRI runtime.
#[derive(Clone)]
pub struct PodRunner {
    runtime: Arc<dyn Runtime>,
    dirs: NodeDirs,
    cgroup_root: String,
}

impl PodRunner {
    /// A runner that puts pod cgroups under `cgroup_root` (cgroupfs paths).
    pub fn new(runtime: Arc<dyn Runtime>, dirs: NodeDirs, cgroup_root: impl Into<String>) -> Self {
        PodRunner {
            runtime,
            dirs,
            cgroup_root: cgroup_root.into(),
        }
    }

    /// The cgroup parent of the pod's sandbox.
    pub fn cgroup_parent(&self, pod: &Pod) -> String {
        format!("{}/pod{}", self.cgroup_root, kubelet::uid(pod))
    }

    /// The sandbox config the runner uses (and a kubelet would regenerate).
    pub fn sandbox_config(&self, pod: &Pod) -> PodSandboxConfig {
        translate::sandbox_config(pod, &self.dirs.pod_logs, 0, &self.cgroup_parent(pod))
    }

    /// Creates the sandbox, runs init containers to completion, then creates
    /// and starts the regular containers.
    pub async fn run(&self, pod: &Pod) -> Result<RunningPod, PodRunnerError> {
        if kubelet::uid(pod).is_empty() || kubelet::name(pod).is_empty() {
            return Err(PodRunnerError::Spec(
                "metadata.name and metadata.uid are required".into(),
            ));
        }
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| PodRunnerError::Spec("spec is missing".into()))?;
        let config = self.sandbox_config(pod);
        std::fs::create_dir_all(&config.log_directory)?;
        let sandbox_id = self.runtime.run_pod_sandbox(config.clone()).await?;
        let ip = self
            .runtime
            .pod_sandbox_status(&sandbox_id, false)
            .await?
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        write_etc_hosts(
            &self.dirs.pods,
            pod,
            &ip,
            spec.host_network.unwrap_or(false),
        )?;
        set_up_volumes(&self.dirs.pods, pod)?;

        let mut running = RunningPod {
            sandbox_id,
            sandbox_config: config,
            ip,
            containers: BTreeMap::new(),
        };
        for c in spec.init_containers.iter().flatten() {
            let id = self.start_container(pod, &running, c).await?;
            let code = self.wait_exit(&id, Duration::from_secs(60)).await?;
            running.containers.insert(c.name.clone(), id);
            if code != 0 {
                return Err(PodRunnerError::InitFailed {
                    name: c.name.clone(),
                    code,
                });
            }
        }
        for c in &spec.containers {
            let id = self.start_container(pod, &running, c).await?;
            running.containers.insert(c.name.clone(), id);
        }
        Ok(running)
    }

    async fn start_container(
        &self,
        pod: &Pod,
        running: &RunningPod,
        c: &Container,
    ) -> Result<String, PodRunnerError> {
        // A regular container has every field of an ephemeral one, so the
        // agent's translation serves both (it adds no resources either way).
        let as_ephemeral: EphemeralContainer = serde_json::from_value(
            serde_json::to_value(c).map_err(|e| PodRunnerError::Spec(e.to_string()))?,
        )
        .map_err(|e| PodRunnerError::Spec(e.to_string()))?;
        let image_name = c.image.clone().unwrap_or_default();
        let image = self
            .runtime
            .image_status(ImageSpec {
                image: image_name.clone(),
                ..Default::default()
            })
            .await?
            .ok_or(PodRunnerError::ImageMissing(image_name))?;
        let log_dir = kubelet::container_log_dir(&self.dirs.pod_logs, pod, &c.name);
        std::fs::create_dir_all(&log_dir)?;
        let etc_hosts = Some(kubelet::etc_hosts_path(&self.dirs.pods, pod)).filter(|p| p.is_file());
        let config = translate::container_config(&translate::Inputs {
            pod,
            container: &as_ephemeral,
            target_id: None,
            image: &ResolvedImage {
                id: image.id,
                uid: image.uid.map(|u| u.value),
                username: image.username,
            },
            attempt: 0,
            host_files: &HostFiles {
                etc_hosts,
                termination_log: None,
            },
            node: &self.dirs,
        })
        .map_err(|e| PodRunnerError::Spec(e.to_string()))?;
        let id = self
            .runtime
            .create_container(&running.sandbox_id, config, running.sandbox_config.clone())
            .await?;
        self.runtime.start_container(&id).await?;
        Ok(id)
    }

    async fn wait_exit(&self, id: &str, limit: Duration) -> Result<i32, PodRunnerError> {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.runtime.container_status(id, false).await?;
            if let Some(s) = st.status
                && s.state == ContainerState::ContainerExited as i32
            {
                return Ok(s.exit_code);
            }
            if Instant::now() > deadline {
                return Err(PodRunnerError::Spec(format!(
                    "init container {id} still running after {limit:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops and removes every sandbox of the pod (and with them its containers).
    pub async fn stop(&self, pod_uid: &str) -> Result<(), PodRunnerError> {
        let sandboxes = self
            .runtime
            .list_pod_sandbox(Some(PodSandboxFilter {
                label_selector: [(kubelet::POD_UID_LABEL.to_string(), pod_uid.to_string())]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }))
            .await?;
        for s in sandboxes {
            self.runtime.stop_pod_sandbox(&s.id).await?;
            self.runtime.remove_pod_sandbox(&s.id).await?;
        }
        Ok(())
    }
}

/// Makes `dir` a mount point shared with its peers, recursively, as the
/// kubelet does with its root directory at start (`setupDataDirs` →
/// `MakeRShared`): a bind mount of the directory onto itself unless it is a
/// mount point already, then `--make-rshared`. The runtime refuses
/// `mountPropagation: HostToContainer` (rslave) and `Bidirectional` (rshared)
/// for a host path below a private mount, and this machine's `/` is private.
/// The testbed's teardown unmounts it with everything else under its
/// directory.
pub fn make_rshared(dir: &Path) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    if !super::containerd::mounts_under(&dir).contains(&dir) {
        mount(
            Some(&dir),
            &dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?;
    }
    mount(
        None::<&str>,
        &dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )?;
    Ok(())
}

/// The kubelet's volume set-up for the types the runner supports: an
/// `emptyDir` is a world-writable directory (its plugin ignores the umask);
/// a `hostPath` of type `DirectoryOrCreate` is created 0755 if missing.
fn set_up_volumes(pods: &Path, pod: &Pod) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let volumes = kubelet::pod_dir(pods, pod).join("volumes");
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default()
    {
        if v.empty_dir.is_some() {
            let dir = volumes.join(translate::plugin::EMPTY_DIR).join(&v.name);
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        } else if let Some(hp) = &v.host_path
            && hp.type_.as_deref() == Some("DirectoryOrCreate")
            && !Path::new(&hp.path).exists()
        {
            std::fs::create_dir_all(&hp.path)?;
            std::fs::set_permissions(&hp.path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// The kubelet's managed hosts file for the pod.
fn write_etc_hosts(pods: &Path, pod: &Pod, ip: &str, host_network: bool) -> std::io::Result<()> {
    let path = kubelet::etc_hosts_path(pods, pod);
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))?;
    let content = if host_network {
        let host = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        format!("# Kubernetes-managed hosts file (host network).\n{host}")
    } else {
        let hostname = pod
            .spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| kubelet::name(pod).to_string());
        let mut s = String::from("# Kubernetes-managed hosts file.\n");
        s.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        s.push_str("fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\n");
        s.push_str("fe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n");
        if !ip.is_empty() {
            s.push_str(&format!("{ip}\t{hostname}\n"));
        }
        s
    };
    std::fs::write(&path, content)
}
