//! Reads the API objects an ephemeral container refers to — the ConfigMaps
//! and Secrets of its `env`/`envFrom`, the node's allocatable for a
//! `resourceFieldRef`, the claims (and their persistent volumes) behind its
//! volume mounts, and the Services whose variables every container gets —
//! so that translation stays pure. Each
//! object is read once per start attempt; a missing object is recorded as
//! missing (translation decides whether that is an error), a failed read is
//! an error of the attempt.
//!
//! Services are read per start, not watched: a start is rare, the two
//! reads (the master service, the pod's namespace) run alongside the
//! others, and they always see the current Services, where the kubelet's
//! cached lister may lag behind a Service created just before the pod.
//! While the API server does not answer, [`crate::k8s::KubeCluster`] gives
//! the answer of the same read last time, as the kubelet's cache would.
//!
//! Must not interpret what it reads: `translate` does.

use k8s_openapi::api::core::v1::{EphemeralContainer, PersistentVolume, Pod, Service};

use super::services::{self, MASTER_NAMESPACE, MASTER_SERVICES};
use super::translate::{BoundClaim, ClaimSource, Referenced};
use crate::k8s::{Cluster, K8sError};
use crate::kubelet;

/// In-tree volume types that the kubelet mounts through their CSI driver
/// (CSI migration, complete since Kubernetes 1.27–1.31), so under
/// `kubernetes.io~csi`.
const MIGRATED_TO_CSI: &[&str] = &[
    "awsElasticBlockStore",
    "azureDisk",
    "azureFile",
    "cinder",
    "gcePersistentDisk",
    "portworxVolume",
    "vsphereVolume",
];

/// Reads what `c` refers to in the pod's namespace, and the Services the
/// pod sees.
pub async fn read(
    cluster: &dyn Cluster,
    pod: &Pod,
    c: &EphemeralContainer,
) -> Result<Referenced, K8sError> {
    let (mut refs, services) =
        futures::try_join!(read_objects(cluster, pod, c), read_services(cluster, pod))?;
    refs.services = services;
    Ok(refs)
}

/// The master services of `default` and, with service links on, every
/// Service of the pod's namespace (one list covers both when the pod is in
/// `default`). [`services::visible`] picks from them.
pub async fn read_services(cluster: &dyn Cluster, pod: &Pod) -> Result<Vec<Service>, K8sError> {
    let ns = kubelet::namespace(pod);
    let links = services::service_links(pod);
    let masters = async {
        let mut out = Vec::new();
        if !(links && ns == MASTER_NAMESPACE) {
            for name in MASTER_SERVICES {
                out.extend(cluster.service(MASTER_NAMESPACE, name).await?);
            }
        }
        Ok::<_, K8sError>(out)
    };
    let own = async {
        if !links {
            return Ok(vec![]);
        }
        let mut list = cluster.services(ns).await?;
        // Items of a namespaced list are in that namespace.
        for s in &mut list {
            s.metadata.namespace.get_or_insert_with(|| ns.to_string());
        }
        Ok(list)
    };
    let (mut masters, own) = futures::try_join!(masters, own)?;
    for s in &mut masters {
        s.metadata
            .namespace
            .get_or_insert_with(|| MASTER_NAMESPACE.to_string());
    }
    masters.extend(own);
    Ok(masters)
}

async fn read_objects(
    cluster: &dyn Cluster,
    pod: &Pod,
    c: &EphemeralContainer,
) -> Result<Referenced, K8sError> {
    let ns = kubelet::namespace(pod);
    let mut refs = Referenced::default();
    let (maps, secrets) = Referenced::referenced(c);
    for name in maps {
        let data = cluster
            .config_map(ns, &name)
            .await?
            .map(|m| m.data.unwrap_or_default());
        refs.config_maps.insert(name, data);
    }
    for name in secrets {
        let data = cluster.secret(ns, &name).await?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        });
        refs.secrets.insert(name, data);
    }
    let wants_node = c.env.iter().flatten().any(|v| {
        v.value_from
            .as_ref()
            .is_some_and(|f| f.resource_field_ref.is_some())
    });
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if let Some(node) = node.filter(|_| wants_node) {
        refs.node_allocatable = cluster
            .node(node)
            .await?
            .and_then(|n| n.status)
            .and_then(|s| s.allocatable);
    }
    for claim in claims_mounted(pod, c) {
        let Some(pvc) = cluster.persistent_volume_claim(ns, &claim).await? else {
            continue;
        };
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let Some(pv_name) = pvc
            .spec
            .and_then(|s| s.volume_name)
            .filter(|n| bound && !n.is_empty())
        else {
            continue;
        };
        if let Some(pv) = cluster.persistent_volume(&pv_name).await? {
            refs.claims.insert(
                claim,
                BoundClaim {
                    pv: pv_name,
                    source: claim_source(&pv),
                },
            );
        }
    }
    Ok(refs)
}

/// The claims behind the volumes `c` mounts (`persistentVolumeClaim`, and
/// generic `ephemeral` volumes, whose claim is `<pod>-<volume>`).
fn claims_mounted(pod: &Pod, c: &EphemeralContainer) -> Vec<String> {
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    let mut out: Vec<String> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| volumes.iter().find(|v| v.name == m.name))
        .filter_map(|v| {
            if let Some(pvc) = &v.persistent_volume_claim {
                Some(pvc.claim_name.clone())
            } else {
                v.ephemeral
                    .as_ref()
                    .map(|_| format!("{}-{}", kubelet::name(pod), v.name))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// How the kubelet mounts a persistent volume, from its volume source.
pub fn claim_source(pv: &PersistentVolume) -> ClaimSource {
    let Some(spec) = pv.spec.as_ref() else {
        return ClaimSource::Other("none".into());
    };
    if spec.csi.is_some() {
        return ClaimSource::Csi;
    }
    if let Some(hp) = &spec.host_path {
        return ClaimSource::HostPath(hp.path.clone());
    }
    if spec.local.is_some() {
        return ClaimSource::Local;
    }
    if spec.nfs.is_some() {
        return ClaimSource::Nfs;
    }
    // The remaining sources are fields of the spec; name the one that is set.
    let value = serde_json::to_value(spec).unwrap_or_default();
    let kind = value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.as_str())
        .find(|k| {
            !matches!(
                *k,
                "accessModes"
                    | "capacity"
                    | "claimRef"
                    | "mountOptions"
                    | "nodeAffinity"
                    | "persistentVolumeReclaimPolicy"
                    | "storageClassName"
                    | "volumeAttributesClassName"
                    | "volumeMode"
            )
        })
        .unwrap_or("none")
        .to_string();
    if MIGRATED_TO_CSI.contains(&kind.as_str()) {
        ClaimSource::Csi
    } else {
        ClaimSource::Other(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PersistentVolumeSpec;

    fn pv(spec: serde_json::Value) -> PersistentVolume {
        PersistentVolume {
            spec: Some(serde_json::from_value::<PersistentVolumeSpec>(spec).unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn persistent_volume_sources_decide_the_layout() {
        let table = [
            (
                serde_json::json!({"csi": {"driver": "d", "volumeHandle": "h"}}),
                ClaimSource::Csi,
            ),
            (
                serde_json::json!({"hostPath": {"path": "/srv/data"}, "capacity": {"storage": "1Gi"}}),
                ClaimSource::HostPath("/srv/data".into()),
            ),
            (
                serde_json::json!({"local": {"path": "/mnt/disks/a"}}),
                ClaimSource::Local,
            ),
            (
                serde_json::json!({"nfs": {"server": "s", "path": "/x"}}),
                ClaimSource::Nfs,
            ),
            (
                serde_json::json!({"awsElasticBlockStore": {"volumeID": "vol-1"}, "accessModes": ["ReadWriteOnce"]}),
                ClaimSource::Csi,
            ),
            (
                serde_json::json!({"iscsi": {"targetPortal": "t", "iqn": "i", "lun": 0}, "capacity": {"storage": "1Gi"}}),
                ClaimSource::Other("iscsi".into()),
            ),
        ];
        for (spec, want) in table {
            assert_eq!(claim_source(&pv(spec.clone())), want, "{spec}");
        }
    }
}
