//! The whole testbed in one value: containerd with the project's images, the
//! local API server, a kubeconfig for clients (kubectl, the agent binary),
//! and the pod runner standing in for the kubelet's pod path. Used by the
//! demo and the end-to-end tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};

use super::apiserver::LocalApiServer;
use super::containerd::{Containerd, ContainerdOpts};
use super::pod_runner::{PodRunner, RunningPod};
use ephemerald::config::{Config, Mode};
use ephemerald::cri::{CriClient, Runtime};
use ephemerald::kubelet;
use ephemerald::reconcile::translate::NodeDirs;

/// Why the stack could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// containerd or the images.
    #[error(transparent)]
    Testbed(#[from] super::containerd::TestbedError),
    /// The local API server.
    #[error("local API server: {0}")]
    ApiServer(String),
    /// A request to the API server failed.
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// The pod runner failed.
    #[error(transparent)]
    PodRunner(#[from] super::pod_runner::PodRunnerError),
    /// Writing a file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Something did not happen in time.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
    },
}

/// containerd + local API server + pod runner.
pub struct Stack {
    /// The runtime.
    pub containerd: Containerd,
    /// The API server.
    pub api: LocalApiServer,
    /// A CRI client on the testbed.
    pub cri: Arc<CriClient>,
    /// The kubelet stand-in.
    pub runner: PodRunner,
    /// kubeconfig for the API server.
    pub kubeconfig: PathBuf,
    /// The node's directories.
    pub dirs: NodeDirs,
    /// The node the pods are bound to.
    pub node: String,
}

impl Stack {
    /// Starts containerd and the API server and writes the kubeconfig.
    pub async fn start(opts: ContainerdOpts, node: &str) -> Result<Stack, StackError> {
        let containerd = Containerd::start(opts).await?;
        let api = LocalApiServer::start()
            .await
            .map_err(|e| StackError::ApiServer(e.to_string()))?;
        let kubeconfig = containerd.dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let cri = Arc::new(containerd.client()?.with_timeout(Duration::from_secs(30)));
        let dirs = NodeDirs {
            pod_logs: containerd.pod_logs_dir(),
            pods: containerd.pods_dir(),
            seccomp: containerd.dir().join("seccomp"),
            container_logs: containerd.dir().join("containers"),
            host: ephemerald::host::HostFacts::detect(),
        };
        let runner = PodRunner::new(
            cri.clone() as Arc<dyn Runtime>,
            dirs.clone(),
            containerd.cgroup_parent_root(),
        );
        Ok(Stack {
            containerd,
            api,
            cri,
            runner,
            kubeconfig,
            dirs,
            node: node.to_string(),
        })
    }

    /// An agent configuration for this stack (in-process runs).
    pub fn agent_config(&self, mode: Mode, resync: Duration) -> Config {
        Config {
            node_name: self.node.clone(),
            kubeconfig: Some(self.kubeconfig.clone()),
            cri_endpoint: self.containerd.endpoint(),
            containerd_socket: Some(self.containerd.socket().to_path_buf()),
            containerd_namespace: "k8s.io".into(),
            dirs: self.dirs.clone(),
            resync,
            mode,
            metrics_addr: None,
            runtime_request_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    /// Command-line arguments for `ephemerald run` against this stack.
    pub fn agent_args(&self, mode: &str, resync: &str) -> Vec<String> {
        let dirs = &self.dirs;
        let kubelet_root = dirs
            .pods
            .parent()
            .unwrap_or(&dirs.pods)
            .display()
            .to_string();
        [
            "run",
            "--node-name",
            &self.node,
            "--kubeconfig",
            &self.kubeconfig.display().to_string(),
            "--cri-endpoint",
            &self.containerd.endpoint(),
            "--containerd-socket",
            &self.containerd.socket().display().to_string(),
            "--pod-logs-dir",
            &dirs.pod_logs.display().to_string(),
            "--container-logs-dir",
            &dirs.container_logs.display().to_string(),
            "--kubelet-root-dir",
            &kubelet_root,
            "--mode",
            mode,
            "--resync",
            resync,
            "--metrics-addr",
            "0",
            "--backoff-initial",
            "1s",
            "--backoff-max",
            "10s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Creates the pod in the API server (bound to this node), runs it
    /// through the pod runner and reports it Running, as a kubelet would.
    pub async fn run_pod(&self, mut pod: Pod) -> Result<(Pod, RunningPod), StackError> {
        pod.spec.get_or_insert_default().node_name = Some(self.node.clone());
        let ns = kubelet::namespace(&pod).to_string();
        let api: Api<Pod> = Api::namespaced(self.api.client(), &ns);
        let created = api.create(&PostParams::default(), &pod).await?;
        let running = self.runner.run(&created).await?;
        let statuses: Vec<serde_json::Value> = running
            .containers
            .iter()
            .filter(|(name, _)| {
                created
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.containers.iter().any(|c| &c.name == *name))
            })
            .map(|(name, id)| {
                let image = created
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.iter().find(|c| &c.name == name))
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                serde_json::json!({
                    "name": name, "ready": true, "started": true, "restartCount": 0,
                    "image": image, "imageID": "", "containerID": format!("containerd://{id}"),
                    "state": {"running": {"startedAt": now_rfc3339()}},
                })
            })
            .collect();
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": running.ip,
            "startTime": now_rfc3339(),
            "containerStatuses": statuses,
        }});
        let updated = api
            .patch_status(
                kubelet::name(&created),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;
        Ok((updated, running))
    }

    /// Appends an ephemeral container exactly as `kubectl debug` does: a
    /// strategic merge patch on the `ephemeralcontainers` subresource.
    pub async fn add_ephemeral(
        &self,
        namespace: &str,
        pod: &str,
        container: &EphemeralContainer,
    ) -> Result<Pod, StackError> {
        let api: Api<Pod> = Api::namespaced(self.api.client(), namespace);
        let patch = serde_json::json!({"spec": {"ephemeralContainers": [container]}});
        Ok(api
            .patch_subresource(
                "ephemeralcontainers",
                pod,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await?)
    }

    /// Polls the API server's copy of the pod until `f` accepts it.
    pub async fn wait_pod<T>(
        &self,
        namespace: &str,
        name: &str,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&Pod) -> Option<T>,
    ) -> Result<T, StackError> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(pod) = self.api.pod(namespace, name)
                && let Some(v) = f(&pod)
            {
                return Ok(v);
            }
            if std::time::Instant::now() > deadline {
                return Err(StackError::Timeout {
                    what: what.to_string(),
                    secs: limit.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops every pod, then containerd and the API server.
    pub async fn teardown(self) -> Result<(), StackError> {
        self.api.shutdown().await;
        self.containerd.teardown().await?;
        Ok(())
    }
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
