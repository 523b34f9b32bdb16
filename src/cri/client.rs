//! The production [`Runtime`]: tonic clients over the runtime's unix socket.
//!
//! Owns the connection (unix socket, timeouts, the error hook for metrics).
//! Must not retry or interpret answers: [`CriError`] says whether a retry
//! may help, and the pass decides.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::proto::image_service_client::ImageServiceClient;
use super::proto::runtime_service_client::RuntimeServiceClient;
use super::proto::*;
use super::{CriError, Runtime};

/// How long a runtime call may take before we give up on it (the kubelet's
/// default `--runtime-request-timeout` is 2 minutes). Image pulls have none.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// A CRI client bound to one runtime socket. Cloning is cheap; clones share
/// the connection.
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
    on_error: Option<ErrorHook>,
}

/// Told the RPC name and code of every failed call (for metrics).
pub type ErrorHook = Arc<dyn Fn(&'static str, tonic::Code) + Send + Sync>;

impl CriClient {
    /// Builds a client for `unix:///path/to/socket`. The connection is made on
    /// first use and re-made after the runtime restarts, so the agent can start
    /// before its runtime does; calls fail with `Unavailable` meanwhile.
    pub fn new(endpoint: &str) -> Result<Self, CriError> {
        let path = socket_path(endpoint)?;
        // The URI is never dialled: every connection goes to the unix socket.
        let channel =
            Endpoint::from_static("http://cri.local")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }));
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            timeout: DEFAULT_CALL_TIMEOUT,
            on_error: None,
        })
    }

    /// Calls `hook` with the RPC name and code of every failed call.
    pub fn with_error_hook(mut self, hook: ErrorHook) -> Self {
        self.on_error = Some(hook);
        self
    }

    fn failed(&self, name: &'static str, code: tonic::Code) {
        if let Some(hook) = &self.on_error {
            hook(name, code);
        }
    }

    /// Changes the per-call deadline (not applied to image pulls).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn call<T>(
        &self,
        name: &'static str,
        deadline: Option<Duration>,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        let started = Instant::now();
        let result = match deadline {
            Some(d) => match tokio::time::timeout(d, fut).await {
                Ok(r) => r,
                Err(_) => {
                    self.failed(name, tonic::Code::DeadlineExceeded);
                    return Err(CriError::Timeout {
                        call: name,
                        secs: d.as_secs(),
                    });
                }
            },
            None => fut.await,
        };
        let took = started.elapsed();
        match result {
            Ok(resp) => {
                tracing::debug!(rpc = name, ms = took.as_secs_f64() * 1e3, "cri call");
                Ok(resp.into_inner())
            }
            Err(status) => {
                tracing::debug!(rpc = name, code = ?status.code(), error = status.message(), "cri call failed");
                self.failed(name, status.code());
                Err(CriError::from_status(name, status))
            }
        }
    }
}

/// `unix:///run/containerd/containerd.sock` → `/run/containerd/containerd.sock`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CriError> {
    match endpoint.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(CriError::Endpoint(endpoint.to_string())),
    }
}

#[async_trait::async_trait]
impl Runtime for CriClient {
    async fn version(&self) -> Result<VersionResponse, CriError> {
        let req = VersionRequest {
            version: "v1".into(),
        };
        self.call(
            "Version",
            Some(self.timeout),
            self.runtime.clone().version(req),
        )
        .await
    }

    async fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, CriError> {
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let resp = self
            .call(
                "RunPodSandbox",
                Some(self.timeout),
                self.runtime.clone().run_pod_sandbox(req),
            )
            .await?;
        Ok(resp.pod_sandbox_id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(
            "StopPodSandbox",
            Some(self.timeout),
            self.runtime.clone().stop_pod_sandbox(req),
        )
        .await?;
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(
            "RemovePodSandbox",
            Some(self.timeout),
            self.runtime.clone().remove_pod_sandbox(req),
        )
        .await?;
        Ok(())
    }

    async fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<PodSandboxStatusResponse, CriError> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        };
        self.call(
            "PodSandboxStatus",
            Some(self.timeout),
            self.runtime.clone().pod_sandbox_status(req),
        )
        .await
    }

    async fn list_pod_sandbox(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> Result<Vec<PodSandbox>, CriError> {
        let req = ListPodSandboxRequest { filter };
        let resp = self
            .call(
                "ListPodSandbox",
                Some(self.timeout),
                self.runtime.clone().list_pod_sandbox(req),
            )
            .await?;
        Ok(resp.items)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String, CriError> {
        let req = CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let resp = self
            .call(
                "CreateContainer",
                Some(self.timeout),
                self.runtime.clone().create_container(req),
            )
            .await?;
        Ok(resp.container_id)
    }

    async fn start_container(&self, id: &str) -> Result<(), CriError> {
        let req = StartContainerRequest {
            container_id: id.into(),
        };
        self.call(
            "StartContainer",
            Some(self.timeout),
            self.runtime.clone().start_container(req),
        )
        .await?;
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<(), CriError> {
        let req = StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_secs,
        };
        // The runtime itself waits up to `timeout_secs`: allow for that.
        let deadline = self.timeout + Duration::from_secs(timeout_secs.max(0) as u64);
        self.call(
            "StopContainer",
            Some(deadline),
            self.runtime.clone().stop_container(req),
        )
        .await?;
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call(
            "RemoveContainer",
            Some(self.timeout),
            self.runtime.clone().remove_container(req),
        )
        .await?;
        Ok(())
    }

    async fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<Container>, CriError> {
        let req = ListContainersRequest { filter };
        let resp = self
            .call(
                "ListContainers",
                Some(self.timeout),
                self.runtime.clone().list_containers(req),
            )
            .await?;
        Ok(resp.containers)
    }

    async fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<ContainerStatusResponse, CriError> {
        let req = ContainerStatusRequest {
            container_id: id.into(),
            verbose,
        };
        self.call(
            "ContainerStatus",
            Some(self.timeout),
            self.runtime.clone().container_status(req),
        )
        .await
    }

    async fn container_events(
        &self,
    ) -> Result<BoxStream<'static, Result<ContainerEventResponse, CriError>>, CriError> {
        let stream = self
            .call(
                "GetContainerEvents",
                Some(self.timeout),
                self.runtime
                    .clone()
                    .get_container_events(GetEventsRequest {}),
            )
            .await?;
        Ok(stream
            .map(|item| item.map_err(|s| CriError::from_status("GetContainerEvents", s)))
            .boxed())
    }

    async fn image_status(&self, image: ImageSpec) -> Result<Option<Image>, CriError> {
        let req = ImageStatusRequest {
            image: Some(image),
            verbose: false,
        };
        let resp = self
            .call(
                "ImageStatus",
                Some(self.timeout),
                self.images.clone().image_status(req),
            )
            .await?;
        Ok(resp.image)
    }

    async fn pull_image(
        &self,
        image: ImageSpec,
        auth: Option<AuthConfig>,
        sandbox_config: Option<PodSandboxConfig>,
    ) -> Result<String, CriError> {
        let req = PullImageRequest {
            image: Some(image),
            auth,
            sandbox_config,
        };
        let resp = self
            .call("PullImage", None, self.images.clone().pull_image(req))
            .await?;
        Ok(resp.image_ref)
    }

    async fn list_images(&self) -> Result<Vec<Image>, CriError> {
        let req = ListImagesRequest { filter: None };
        let resp = self
            .call(
                "ListImages",
                Some(self.timeout),
                self.images.clone().list_images(req),
            )
            .await?;
        Ok(resp.images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_must_be_an_absolute_unix_url() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").unwrap(),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        for bad in [
            "/run/x.sock",
            "tcp://127.0.0.1:1",
            "unix://relative.sock",
            "",
        ] {
            assert!(
                matches!(socket_path(bad), Err(CriError::Endpoint(_))),
                "{bad}"
            );
        }
    }
}
