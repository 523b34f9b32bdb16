//! The Kubernetes API boundary: what the agent reads from and writes to the
//! API server, behind narrow traits ([`EventSink`]), with the production
//! implementation on `kube::Client`.
//!
//! Owns: every request the agent makes to the API server except the pod
//! watch itself ([`Cluster`]), the kubelet-style Events ([`EventSink`]) and the
//! error type. Must not import from `reconcile`: the types it returns
//! (ConfigMaps, Secrets, the pull secrets' [`DockerConfig`]) are defined
//! here or in k8s-openapi, and what they mean is the caller's business.

use k8s_openapi::api::core::v1::Pod;

use crate::kubelet;

/// Event type, as in `core/v1` Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Something went as planned.
    Normal,
    /// Something failed.
    Warning,
}

impl EventType {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An Event about one ephemeral container, referring to it by the field
/// path `spec.ephemeralContainers{NAME}` as the kubelet does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID.
    pub uid: String,
    /// Pod resourceVersion the event refers to.
    pub resource_version: String,
    /// Ephemeral container name.
    pub container: String,
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason (`Pulling`, `Created`, `Failed`, …).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ContainerEvent {
    /// An event about `container` of `pod`.
    pub fn new(
        pod: &Pod,
        container: &str,
        type_: EventType,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ContainerEvent {
            namespace: kubelet::namespace(pod).into(),
            pod: kubelet::name(pod).into(),
            uid: kubelet::uid(pod).into(),
            resource_version: pod.metadata.resource_version.clone().unwrap_or_default(),
            container: container.into(),
            type_,
            reason,
            message: message.into(),
        }
    }

    /// `spec.ephemeralContainers{NAME}`.
    pub fn field_path(&self) -> String {
        format!("spec.ephemeralContainers{{{}}}", self.container)
    }
}

/// Where Events go. Recording never blocks the caller: an implementation
/// queues the event and writes it in the background.
pub trait EventSink: Send + Sync {
    /// Records one event.
    fn record(&self, event: ContainerEvent);
}

/// An [`EventSink`] that keeps events in memory (tests, the demo's report).
#[derive(Debug, Default)]
pub struct MemoryEvents(pub std::sync::Mutex<Vec<ContainerEvent>>);

impl EventSink for MemoryEvents {
    fn record(&self, event: ContainerEvent) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }
}

impl MemoryEvents {
    /// `(reason, message)` of every event so far.
    pub fn reasons(&self) -> Vec<(String, String)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|e| (e.reason.to_string(), e.message.clone()))
            .collect()
    }
}

mod client;
pub mod kubelet_presence;
pub use client::{KubeCluster, spawn_event_writer};

use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerStatus, Node, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};

use std::collections::BTreeMap;

use serde::Deserialize;

/// Errors of the Kubernetes boundary.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The API server answered a request with an error status.
    #[error("{verb} {what}: {code} {reason}: {message}")]
    Api {
        /// What we did (`patch status`, `get`).
        verb: &'static str,
        /// The object.
        what: String,
        /// HTTP status code.
        code: u16,
        /// The Status reason (`Invalid`, `NotFound`, …).
        reason: String,
        /// The Status message.
        message: String,
    },
    /// The request did not get an answer.
    #[error("{verb} {what}: {source}")]
    Transport {
        /// What we did.
        verb: &'static str,
        /// The object.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// Building a client from the configuration failed.
    #[error("kubernetes client configuration")]
    Config(#[source] kube::Error),
    /// The kubeconfig file is unusable.
    #[error("kubeconfig {path}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What is wrong with it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither in-cluster config nor a default kubeconfig was found.
    #[error("no kubeconfig given and none could be inferred")]
    Infer(#[source] kube::config::InferConfigError),
}

impl K8sError {
    pub(crate) fn from_kube(verb: &'static str, what: String, e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => K8sError::Api {
                verb,
                what,
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
            },
            other => K8sError::Transport {
                verb,
                what,
                source: other,
            },
        }
    }

    /// The HTTP status code, or `transport` when no answer came (a metric
    /// label).
    pub fn code_label(&self) -> String {
        match self {
            K8sError::Api { code, .. } => code.to_string(),
            _ => "transport".into(),
        }
    }

    /// The verb of the failed request (a metric label).
    pub fn verb(&self) -> &'static str {
        match self {
            K8sError::Api { verb, .. } | K8sError::Transport { verb, .. } => verb,
            _ => "config",
        }
    }

    /// Whether trying again later may help (no answer, conflicts, server
    /// trouble); a refusal of the request itself (422, 403, 404) is final.
    pub fn is_retryable(&self) -> bool {
        match self {
            K8sError::Api { code, .. } => matches!(code, 409 | 429 | 500..=599),
            K8sError::Transport { .. } => true,
            K8sError::Config(_) | K8sError::Kubeconfig { .. } | K8sError::Infer(_) => false,
        }
    }
}

/// The `auths` of a `.dockerconfigjson` (or the bare map of a `.dockercfg`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DockerConfig {
    /// Registry key → credentials.
    #[serde(default)]
    pub auths: BTreeMap<String, DockerAuth>,
}

/// One registry's credentials.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DockerAuth {
    /// User name.
    #[serde(default)]
    pub username: String,
    /// Password.
    #[serde(default)]
    pub password: String,
    /// base64 of `user:password`.
    #[serde(default)]
    pub auth: String,
    /// Identity token.
    #[serde(default, rename = "identitytoken")]
    pub identity_token: String,
    /// Registry token.
    #[serde(default, rename = "registrytoken")]
    pub registry_token: String,
}

/// What the agent asks of the API server besides the pod watch.
#[async_trait::async_trait]
pub trait Cluster: Send + Sync {
    /// Writes the whole `ephemeralContainerStatuses` list of the pod.
    async fn patch_ephemeral_statuses(
        &self,
        pod: &Pod,
        statuses: &[ContainerStatus],
    ) -> Result<(), K8sError>;
    /// The docker configs in the named secrets (missing ones are skipped,
    /// as the kubelet does).
    async fn pull_secrets(
        &self,
        namespace: &str,
        names: &[String],
    ) -> Result<Vec<DockerConfig>, K8sError>;
    /// A ConfigMap, if it exists (for env).
    async fn config_map(&self, namespace: &str, name: &str) -> Result<Option<ConfigMap>, K8sError>;
    /// A Secret, if it exists (for env).
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>, K8sError>;
    /// A PersistentVolumeClaim, if it exists (for volume mounts).
    async fn persistent_volume_claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<PersistentVolumeClaim>, K8sError>;
    /// A PersistentVolume, if it exists (for volume mounts).
    async fn persistent_volume(&self, name: &str) -> Result<Option<PersistentVolume>, K8sError>;
    /// The Node, if it exists (its allocatable, for `resourceFieldRef`).
    async fn node(&self, name: &str) -> Result<Option<Node>, K8sError>;
    /// A Service, if it exists (the master service, for service variables).
    async fn service(&self, namespace: &str, name: &str) -> Result<Option<Service>, K8sError>;
    /// Every Service of a namespace (for service variables).
    async fn services(&self, namespace: &str) -> Result<Vec<Service>, K8sError>;
}
