//! The production [`Cluster`] and [`EventSink`] on `kube::Client`.
//!
//! Must not decide anything: every failure goes back as a [`K8sError`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerStatus, Event, EventSource, Node, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ContainerEvent, DockerConfig, EventSink, K8sError};
use crate::backoff::Backoff;
use crate::kubelet;

/// Name in Events' `source.component` and `reportingComponent`.
pub const COMPONENT: &str = "ephemerald";

/// The agent's view of the API server.
#[derive(Clone)]
pub struct KubeCluster {
    client: kube::Client,
    /// The Services last read, per namespace (and per master service), for
    /// when the API server does not answer.
    services_seen: Arc<Mutex<ServicesSeen>>,
}

#[derive(Default)]
struct ServicesSeen {
    lists: HashMap<String, Vec<Service>>,
    objects: HashMap<(String, String), Option<Service>>,
}

impl KubeCluster {
    /// Wraps a client.
    pub fn new(client: kube::Client) -> Self {
        KubeCluster {
            client,
            services_seen: Arc::default(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, ServicesSeen> {
        self.services_seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl Cluster for KubeCluster {
    async fn patch_ephemeral_statuses(
        &self,
        pod: &Pod,
        statuses: &[ContainerStatus],
    ) -> Result<(), K8sError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), kubelet::namespace(pod));
        // A JSON merge patch replaces the list as a whole, which is what an
        // atomic list needs; the uid pins the patch to this incarnation of
        // the pod (a recreated pod with the same name has another).
        let body = serde_json::json!({
            "metadata": { "uid": kubelet::uid(pod) },
            "status": { "ephemeralContainerStatuses": statuses },
        });
        api.patch_status(
            kubelet::name(pod),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            K8sError::from_kube(
                "patch status of",
                format!("pod {}/{}", kubelet::namespace(pod), kubelet::name(pod)),
                e,
            )
        })
    }

    async fn pull_secrets(
        &self,
        namespace: &str,
        names: &[String],
    ) -> Result<Vec<DockerConfig>, K8sError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let mut out = Vec::new();
        for name in names {
            let secret = api
                .get_opt(name)
                .await
                .map_err(|e| K8sError::from_kube("get", format!("secret {namespace}/{name}"), e))?;
            let Some(data) = secret.and_then(|s| s.data) else {
                tracing::warn!(secret = %name, "image pull secret not found; pulling without it");
                continue;
            };
            if let Some(json) = data.get(".dockerconfigjson")
                && let Ok(cfg) = serde_json::from_slice::<DockerConfig>(&json.0)
            {
                out.push(cfg);
            } else if let Some(json) = data.get(".dockercfg")
                && let Ok(auths) = serde_json::from_slice(&json.0)
            {
                out.push(DockerConfig { auths });
            }
        }
        Ok(out)
    }

    async fn config_map(&self, namespace: &str, name: &str) -> Result<Option<ConfigMap>, K8sError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| K8sError::from_kube("get", format!("configmap {namespace}/{name}"), e))
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>, K8sError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| K8sError::from_kube("get", format!("secret {namespace}/{name}"), e))
    }

    async fn persistent_volume_claim(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<PersistentVolumeClaim>, K8sError> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name).await.map_err(|e| {
            K8sError::from_kube(
                "get",
                format!("persistentvolumeclaim {namespace}/{name}"),
                e,
            )
        })
    }

    async fn node(&self, name: &str) -> Result<Option<Node>, K8sError> {
        let api: Api<Node> = Api::all(self.client.clone());
        api.get_opt(name)
            .await
            .map_err(|e| K8sError::from_kube("get", format!("node {name}"), e))
    }

    // Services are read fresh at each start; while the API server does not
    // answer (or answers 429/5xx), the last answer for the same read is used,
    // as the kubelet's service lister keeps serving its cache. A read never
    // answered is an error (the kubelet's "services have not yet been read
    // at least once").
    async fn service(&self, namespace: &str, name: &str) -> Result<Option<Service>, K8sError> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let key = (namespace.to_string(), name.to_string());
        match api.get_opt(name).await {
            Ok(s) => {
                self.seen().objects.insert(key, s.clone());
                Ok(s)
            }
            Err(e) => {
                let e = K8sError::from_kube("get", format!("service {namespace}/{name}"), e);
                match self.seen().objects.get(&key).filter(|_| e.is_retryable()) {
                    Some(last) => {
                        tracing::warn!(error = %e, "using the service read last time");
                        Ok(last.clone())
                    }
                    None => Err(e),
                }
            }
        }
    }

    async fn services(&self, namespace: &str) -> Result<Vec<Service>, K8sError> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        // One page of everything: a namespace's Services are few, and the
        // kubelet's lister holds them all too.
        match api.list(&ListParams::default()).await {
            Ok(l) => {
                self.seen()
                    .lists
                    .insert(namespace.to_string(), l.items.clone());
                Ok(l.items)
            }
            Err(e) => {
                let e = K8sError::from_kube("list", format!("services in {namespace}"), e);
                match self
                    .seen()
                    .lists
                    .get(namespace)
                    .filter(|_| e.is_retryable())
                {
                    Some(last) => {
                        tracing::warn!(error = %e, "using the services listed last time");
                        Ok(last.clone())
                    }
                    None => Err(e),
                }
            }
        }
    }

    async fn persistent_volume(&self, name: &str) -> Result<Option<PersistentVolume>, K8sError> {
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        api.get_opt(name)
            .await
            .map_err(|e| K8sError::from_kube("get", format!("persistentvolume {name}"), e))
    }
}

/// An [`EventSink`] that hands events to a background writer.
pub struct ChannelEvents(mpsc::Sender<ContainerEvent>);

impl EventSink for ChannelEvents {
    fn record(&self, event: ContainerEvent) {
        if let Err(e) = self.0.try_send(event) {
            tracing::warn!(error = %e, "event queue full; dropping an event");
        }
    }
}

/// How often the event writer tries one event, like the kubelet's recorder
/// (`maxTriesPerEvent`).
const EVENT_TRIES: u32 = 12;

/// Starts the task that writes `core/v1` Events like the kubelet's (name
/// `<pod>.<hex nanoseconds>`, involvedObject with the container's field
/// path, source component `ephemerald` on this node). Failures to write an
/// event never block or fail a reconcile: while the API server is
/// unreachable (or answers 429/5xx) the writer retries each event with the
/// stream backoff, up to [`EVENT_TRIES`] times, in order, and events
/// recorded meanwhile wait in the queue; a refused event is logged and
/// dropped.
pub fn spawn_event_writer(
    client: kube::Client,
    node: String,
    cancel: CancellationToken,
) -> (ChannelEvents, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<ContainerEvent>(1024);
    let task = tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => match ev { Some(ev) => ev, None => return },
                _ = cancel.cancelled() => return,
            };
            let api: Api<Event> = Api::namespaced(client.clone(), &ev.namespace);
            // Built once: a retry writes the same event (same name and time).
            let event = to_api_event(&ev, &node, SystemTime::now());
            let mut backoff = Backoff::watch();
            for attempt in 1..=EVENT_TRIES {
                let e = match api.create(&PostParams::default(), &event).await {
                    Ok(_) => break,
                    Err(e) => K8sError::from_kube("create", format!("event for pod {}", ev.pod), e),
                };
                // 409 here is AlreadyExists: an earlier try got through.
                let again = e.is_retryable()
                    && !matches!(e, K8sError::Api { code: 409, .. })
                    && attempt < EVENT_TRIES;
                tracing::warn!(reason = ev.reason, pod = %ev.pod, error = %e, attempt, retrying = again, "could not write event");
                if !again {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    });
    (ChannelEvents(tx), task)
}

/// The `core/v1` Event for one [`ContainerEvent`].
pub fn to_api_event(ev: &ContainerEvent, node: &str, now: SystemTime) -> Event {
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let ts = k8s_openapi::jiff::Timestamp::from_second((nanos / 1_000_000_000) as i64)
        .ok()
        .map(Time);
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", ev.pod, nanos)),
            namespace: Some(ev.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(ev.pod.clone()),
            namespace: Some(ev.namespace.clone()),
            uid: Some(ev.uid.clone()),
            resource_version: Some(ev.resource_version.clone()).filter(|s| !s.is_empty()),
            field_path: Some(ev.field_path()),
        },
        reason: Some(ev.reason.to_string()),
        message: Some(ev.message.clone()),
        type_: Some(ev.type_.as_str().to_string()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.to_string()),
        }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.to_string()),
        first_timestamp: ts.clone(),
        last_timestamp: ts,
        count: Some(1),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::EventType;

    #[test]
    fn events_point_at_the_ephemeral_container() {
        let ev = ContainerEvent {
            namespace: "shop".into(),
            pod: "web".into(),
            uid: "u1".into(),
            resource_version: "42".into(),
            container: "dbg".into(),
            type_: EventType::Warning,
            reason: "Failed",
            message: "Error: boom".into(),
        };
        let e = to_api_event(
            &ev,
            "node-a",
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5),
        );
        assert_eq!(e.metadata.name.as_deref(), Some("web.12a05f200"));
        assert_eq!(
            e.involved_object.field_path.as_deref(),
            Some("spec.ephemeralContainers{dbg}")
        );
        assert_eq!(e.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.source.unwrap().host.as_deref(), Some("node-a"));
    }
}
