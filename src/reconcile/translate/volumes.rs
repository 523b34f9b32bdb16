//! The container's mounts as the kubelet makes them: each volume mount at
//! the host path where the kubelet materialises the volume (its plugin
//! directories; bound claims by their PersistentVolume's kind), then
//! `/etc/hosts`, then the termination-message file.
//!
//! Pure; part of the parent module.
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Volume;

use super::{ClaimSource, Inputs, Referenced, TranslateError};
use crate::cri::proto::{Mount, MountPropagation};
use crate::kubelet;

/// Volume mounts, then `/etc/hosts`, then the termination-message file, in
/// the kubelet's order.
pub(super) fn mounts(inp: &Inputs<'_>, refs: &Referenced) -> Result<Vec<Mount>, TranslateError> {
    let c = inp.container;
    let volumes = inp
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default();
    let mut out = Vec::new();
    for vm in c.volume_mounts.iter().flatten() {
        let volume = volumes.iter().find(|v| v.name == vm.name).ok_or_else(|| {
            TranslateError::VolumeNotFound {
                volume: vm.name.clone(),
                container: c.name.clone(),
            }
        })?;
        let propagation = match vm.mount_propagation.as_deref() {
            None | Some("None") => MountPropagation::PropagationPrivate,
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            Some(other) => return Err(TranslateError::MountPropagation(other.to_string())),
        };
        if vm.recursive_read_only.as_deref() == Some("Enabled") {
            return Err(TranslateError::RecursiveReadOnly(vm.name.clone()));
        }
        let (host_path, always_read_only) = volume_host_path(inp, refs, volume)?;
        out.push(Mount {
            container_path: vm.mount_path.clone(),
            host_path: host_path.display().to_string(),
            readonly: vm.read_only.unwrap_or(false) || always_read_only,
            selinux_relabel: false,
            propagation: propagation as i32,
        });
    }
    let mounts_hosts = out.iter().any(|m| m.container_path == "/etc/hosts");
    if let Some(hosts) = &inp.host_files.etc_hosts
        && !mounts_hosts
    {
        out.push(Mount {
            container_path: "/etc/hosts".into(),
            host_path: hosts.display().to_string(),
            ..Default::default()
        });
    }
    if let Some(log) = &inp.host_files.termination_log {
        out.push(Mount {
            container_path: kubelet::termination_message_path(c).to_string(),
            host_path: log.display().to_string(),
            ..Default::default()
        });
    }
    Ok(out)
}

/// The kubelet's volume plugin directory names (`kubernetes.io/<plugin>`
/// with `/` escaped as `~`), under `<pods>/<uid>/volumes/`.
pub mod plugin {
    /// `emptyDir`.
    pub const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
    /// `configMap`.
    pub const CONFIG_MAP: &str = "kubernetes.io~configmap";
    /// `secret`.
    pub const SECRET: &str = "kubernetes.io~secret";
    /// `projected`.
    pub const PROJECTED: &str = "kubernetes.io~projected";
    /// `downwardAPI`.
    pub const DOWNWARD_API: &str = "kubernetes.io~downward-api";
    /// CSI volumes, persistent or inline; the mount is `<name>/mount`.
    pub const CSI: &str = "kubernetes.io~csi";
    /// `local` persistent volumes.
    pub const LOCAL: &str = "kubernetes.io~local-volume";
    /// `nfs`.
    pub const NFS: &str = "kubernetes.io~nfs";
}

/// Where the kubelet materialises a pod volume on the host, and whether
/// the kubelet always mounts it read-only (its `mustMountRO`: the atomic
/// writer volumes configMap, secret, projected and downwardAPI).
pub(super) fn volume_host_path(
    inp: &Inputs<'_>,
    refs: &Referenced,
    v: &Volume,
) -> Result<(PathBuf, bool), TranslateError> {
    if let Some(hp) = &v.host_path {
        return Ok((PathBuf::from(&hp.path), false));
    }
    let volumes = kubelet::pod_dir(&inp.node.pods, inp.pod).join("volumes");
    let (plugin, read_only) = if v.empty_dir.is_some() {
        (plugin::EMPTY_DIR, false)
    } else if v.config_map.is_some() {
        (plugin::CONFIG_MAP, true)
    } else if v.secret.is_some() {
        (plugin::SECRET, true)
    } else if v.projected.is_some() {
        (plugin::PROJECTED, true)
    } else if v.downward_api.is_some() {
        (plugin::DOWNWARD_API, true)
    } else if v.csi.is_some() {
        let read_only = v.csi.as_ref().and_then(|c| c.read_only).unwrap_or(false);
        return Ok((
            volumes.join(plugin::CSI).join(&v.name).join("mount"),
            read_only,
        ));
    } else if let Some(claim) = &v.persistent_volume_claim {
        return claim_host_path(refs, &v.name, &claim.claim_name, &volumes)
            .map(|p| (p, claim.read_only.unwrap_or(false)));
    } else if v.ephemeral.is_some() {
        // A generic ephemeral volume is a claim named `<pod>-<volume>`.
        let claim = format!("{}-{}", kubelet::name(inp.pod), v.name);
        return claim_host_path(refs, &v.name, &claim, &volumes).map(|p| (p, false));
    } else {
        return Err(TranslateError::UnsupportedVolume(v.name.clone()));
    };
    Ok((volumes.join(plugin).join(&v.name), read_only))
}

/// A claim's volume lives under the name of the persistent volume bound to
/// it, in the directory of the plugin that mounted it.
pub(super) fn claim_host_path(
    refs: &Referenced,
    volume: &str,
    claim: &str,
    volumes: &Path,
) -> Result<PathBuf, TranslateError> {
    let bound = refs
        .claims
        .get(claim)
        .ok_or_else(|| TranslateError::ClaimNotBound {
            volume: volume.to_string(),
            claim: claim.to_string(),
        })?;
    match &bound.source {
        ClaimSource::HostPath(path) => Ok(PathBuf::from(path)),
        ClaimSource::Csi => Ok(volumes.join(plugin::CSI).join(&bound.pv).join("mount")),
        ClaimSource::Local => Ok(volumes.join(plugin::LOCAL).join(&bound.pv)),
        ClaimSource::Nfs => Ok(volumes.join(plugin::NFS).join(&bound.pv)),
        ClaimSource::Other(kind) => Err(TranslateError::UnsupportedClaim {
            volume: volume.to_string(),
            pv: bound.pv.clone(),
            kind: kind.clone(),
        }),
    }
}
