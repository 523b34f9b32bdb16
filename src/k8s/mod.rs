//! The Kubernetes API boundary: what the agent reads from and writes to the
//! API server, behind narrow traits ([`EventSink`]), with the production
//! implementation on `kube::Client`.

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
