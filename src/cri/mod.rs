//! The CRI boundary. Owns the generated `runtime.v1` types ([`proto`]), the
//! narrow [`Runtime`] trait the agent calls, its tonic implementation over a
//! unix socket ([`CriClient`]) and the error type ([`CriError`]) that keeps
//! the runtime's own message and says whether a failure is worth retrying.
//!
//! Must not know about pods or Kubernetes objects: the caller translates
//! (`reconcile::translate`) and reads the answers (`reconcile::observe`). The
//! server traits generated here are for the lab's fake runtime (and any
//! in-process CRI server); the agent only calls.

mod client;
mod error;

pub use client::{CriClient, ErrorHook, socket_path};
pub use error::CriError;

use futures::stream::BoxStream;

/// Types and gRPC stubs generated from `proto/cri.proto` (package `runtime.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod proto {
    tonic::include_proto!("runtime.v1");
}

use proto::{
    AuthConfig, Container, ContainerConfig, ContainerEventResponse, ContainerFilter,
    ContainerStatusResponse, Image, ImageSpec, PodSandbox, PodSandboxConfig, PodSandboxFilter,
    PodSandboxStatusResponse, VersionResponse,
};

/// The CRI calls ephemerald makes. One method per RPC, named after it; the
/// request is flattened into arguments where that reads better.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// `Version`: the runtime's name and versions.
    async fn version(&self) -> Result<VersionResponse, CriError>;
    /// `RunPodSandbox`: returns the new sandbox id.
    async fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, CriError>;
    /// `StopPodSandbox`.
    async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError>;
    /// `RemovePodSandbox`.
    async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError>;
    /// `PodSandboxStatus`.
    async fn pod_sandbox_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<PodSandboxStatusResponse, CriError>;
    /// `ListPodSandbox`.
    async fn list_pod_sandbox(
        &self,
        filter: Option<PodSandboxFilter>,
    ) -> Result<Vec<PodSandbox>, CriError>;
    /// `CreateContainer`: returns the new container id.
    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String, CriError>;
    /// `StartContainer`.
    async fn start_container(&self, id: &str) -> Result<(), CriError>;
    /// `StopContainer`, killing after `timeout_secs`.
    async fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<(), CriError>;
    /// `RemoveContainer`.
    async fn remove_container(&self, id: &str) -> Result<(), CriError>;
    /// `ListContainers`.
    async fn list_containers(
        &self,
        filter: Option<ContainerFilter>,
    ) -> Result<Vec<Container>, CriError>;
    /// `ContainerStatus`; `verbose` adds the runtime's `info` map.
    async fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<ContainerStatusResponse, CriError>;
    /// `GetContainerEvents`: a stream of lifecycle changes, or UNIMPLEMENTED.
    async fn container_events(
        &self,
    ) -> Result<BoxStream<'static, Result<ContainerEventResponse, CriError>>, CriError>;
    /// `ImageStatus`: `None` when the image is not on the node.
    async fn image_status(&self, image: ImageSpec) -> Result<Option<Image>, CriError>;
    /// `PullImage`: returns the image reference (`sha256:…` id on containerd).
    async fn pull_image(
        &self,
        image: ImageSpec,
        auth: Option<AuthConfig>,
        sandbox_config: Option<PodSandboxConfig>,
    ) -> Result<String, CriError>;
    /// `ListImages`.
    async fn list_images(&self) -> Result<Vec<Image>, CriError>;
}
