//! Pure translation of one ephemeral container of a pod into the CRI
//! `ContainerConfig` the kubelet would send (`generateContainerConfig` and
//! friends in the kubelet's `kuberuntime`). No I/O: everything observed on
//! the node (target id, resolved image, attempt, host files) comes in
//! [`Inputs`]. Ephemeral containers get **no resources** of their own, but
//! the kubelet's Linux resources for a container without any
//! ([`super::resources`]), and the service variables of the Services read
//! for them ([`super::services`]).
//!
//! Its parts: `env` (environment), `security` (security context),
//! `volumes` (mounts). Must not do I/O: the referenced objects come in
//! [`Referenced`], read by `refs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{EphemeralContainer, Pod, SecurityContext, Service};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::resources;
use crate::cri::proto::{
    self, ContainerConfig, ContainerMetadata, ImageSpec, KeyValue, LinuxContainerConfig,
    NamespaceMode, NamespaceOption, SecurityProfile, security_profile::ProfileType,
};
use crate::kubelet;

mod env;
mod security;
mod volumes;

use env::environment;
// The node's directories are the kubelet's layout; re-exported where the
// translation that uses them always had them.
pub use crate::kubelet::NodeDirs;
pub use env::expand;
pub use security::{DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS, masked_paths};
use security::{security_context, selinux, verify_run_as_non_root};
use volumes::mounts;
pub use volumes::plugin;

/// What translation needs besides the spec; all of it observed by the caller.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The pod, as last seen from the API server.
    pub pod: &'a Pod,
    /// The ephemeral container to start.
    pub container: &'a EphemeralContainer,
    /// Runtime id of the newest container of `targetContainerName`.
    pub target_id: Option<&'a str>,
    /// The image as the runtime resolved it.
    pub image: &'a ResolvedImage,
    /// CRI attempt (the kubelet's restart count), 0 unless older logs exist.
    pub attempt: u32,
    /// Host files to bind into the container.
    pub host_files: &'a HostFiles,
    /// The node's directories.
    pub node: &'a NodeDirs,
}

/// An image present on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The runtime's image id (`sha256:…`), passed to CreateContainer.
    pub id: String,
    /// The image's numeric user, if it declares one.
    pub uid: Option<i64>,
    /// The image's user name, if it declares a non-numeric one.
    pub username: String,
}

/// Host files the kubelet binds into each container.
#[derive(Debug, Clone, Default)]
pub struct HostFiles {
    /// The pod's hosts file (`<pod dir>/etc-hosts`), if it exists.
    pub etc_hosts: Option<PathBuf>,
    /// The file prepared for this container's termination message.
    pub termination_log: Option<PathBuf>,
}

/// Why a spec cannot be turned into a container config. The kubelet reports
/// all of these as `CreateContainerConfigError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// `valueFrom` with no source the agent knows (a newer API field).
    #[error("env var {0:?}: valueFrom has no source ephemerald supports")]
    UnknownEnvSource(String),
    /// A `resourceFieldRef` cannot be resolved (the kubelet's words where it has them).
    #[error(transparent)]
    Downward(#[from] super::downward::DownwardError),
    /// A ConfigMap or Secret that is not optional does not exist; the
    /// kubelet's watch-based managers word it `configmap "x" not found`.
    #[error("{kind} {name:?} not found")]
    SourceNotFound {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// The object's name.
        name: String,
    },
    /// A key that is not optional is missing from a ConfigMap or Secret.
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    KeyNotFound {
        /// The key.
        key: String,
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// The pod's namespace.
        namespace: String,
        /// The object's name.
        name: String,
    },
    /// A `fieldRef` names a field that cannot be exposed as an env var.
    #[error("unsupported fieldPath: {0}")]
    UnsupportedFieldPath(String),
    /// A volume mount names a volume the pod does not have.
    #[error("cannot find volume {volume:?} to mount into container {container:?}")]
    VolumeNotFound {
        /// The volume name.
        volume: String,
        /// The container.
        container: String,
    },
    /// A volume of a type whose host directory the agent cannot locate.
    #[error(
        "volume {0:?}: only hostPath, emptyDir, configMap, secret, projected, downwardAPI, csi, persistentVolumeClaim and ephemeral volumes can be mounted by ephemerald"
    )]
    UnsupportedVolume(String),
    /// A `mountPropagation` the kubelet does not know (its message).
    #[error("invalid MountPropagation mode: {0:?}")]
    MountPropagation(String),
    /// `recursiveReadOnly: Enabled` needs runtime support the agent does not use.
    #[error("volume {0:?}: recursiveReadOnly: Enabled is not supported by ephemerald")]
    RecursiveReadOnly(String),
    /// A persistent volume claim that is missing or not bound to a volume.
    #[error(
        "volume {volume:?}: persistentvolumeclaim {claim:?} is not bound to a persistent volume"
    )]
    ClaimNotBound {
        /// The pod's volume name.
        volume: String,
        /// The claim.
        claim: String,
    },
    /// A persistent volume of a type whose mount directory the agent cannot locate.
    #[error(
        "volume {volume:?}: persistent volume {pv:?} is of type {kind}; ephemerald can mount csi, hostPath, local and nfs persistent volumes"
    )]
    UnsupportedClaim {
        /// The pod's volume name.
        volume: String,
        /// The persistent volume.
        pv: String,
        /// Its volume source type.
        kind: String,
    },
    /// Raw block devices from claims (`volumeDevices`) are not mapped.
    #[error("volumeDevices are not supported by ephemerald (volume {0:?})")]
    UnsupportedVolumeDevices(String),
    /// `runAsNonRoot` cannot be honoured; the message is the kubelet's.
    #[error("{0}")]
    NonRoot(String),
    /// A `supplementalGroupsPolicy` the CRI has no value for (the kubelet's message).
    #[error("unsupported supplementalGroupsPolicy: {0}")]
    SupplementalGroupsPolicy(String),
}

/// The pod's namespace modes before any target is applied: PID is NODE
/// (`hostPID`), POD (`shareProcessNamespace`) or CONTAINER; network and IPC
/// are NODE for `hostNetwork`/`hostIPC`, else POD.
pub fn pod_namespace_options(pod: &Pod) -> NamespaceOption {
    let spec = pod.spec.as_ref();
    let flag = |f: fn(&k8s_openapi::api::core::v1::PodSpec) -> Option<bool>| {
        spec.and_then(f).unwrap_or(false)
    };
    let pid = if flag(|s| s.host_pid) {
        NamespaceMode::Node
    } else if flag(|s| s.share_process_namespace) {
        NamespaceMode::Pod
    } else {
        NamespaceMode::Container
    };
    let mode = |host: bool| {
        if host {
            NamespaceMode::Node
        } else {
            NamespaceMode::Pod
        }
    };
    NamespaceOption {
        network: mode(flag(|s| s.host_network)) as i32,
        pid: pid as i32,
        ipc: mode(flag(|s| s.host_ipc)) as i32,
        target_id: String::new(),
    }
}

/// The namespace options of the ephemeral container: the pod's, with PID mode
/// CONTAINER turned into TARGET when a target is known. A pod that shares one
/// PID namespace (or the host's) already lets the container see its target.
pub fn container_namespace_options(pod: &Pod, target_id: Option<&str>) -> NamespaceOption {
    let mut ns = pod_namespace_options(pod);
    if let Some(id) = target_id
        && ns.pid == NamespaceMode::Container as i32
    {
        ns.pid = NamespaceMode::Target as i32;
        ns.target_id = id.to_string();
    }
    ns
}

/// Builds the CRI config for one ephemeral container that refers to no
/// ConfigMap, Secret or claim (any reference reads as a missing object).
pub fn container_config(inp: &Inputs<'_>) -> Result<ContainerConfig, TranslateError> {
    container_config_with(inp, &Referenced::default())
}

/// Builds the CRI config for one ephemeral container, its env and claims
/// resolved against the API objects read for it.
pub fn container_config_with(
    inp: &Inputs<'_>,
    refs: &Referenced,
) -> Result<ContainerConfig, TranslateError> {
    let c = inp.container;
    let pod = inp.pod;
    let user_image = c.image.clone().unwrap_or_default();

    // The kubelet's order of checks: block devices, env, mounts, then the
    // non-root policy (GenerateRunContainerOptions before verifyRunAsNonRoot).
    if let Some(d) = c.volume_devices.iter().flatten().next() {
        return Err(TranslateError::UnsupportedVolumeDevices(d.name.clone()));
    }
    let envs = environment(pod, c, refs)?;
    let mounts = mounts(inp, refs)?;
    verify_run_as_non_root(pod, c, inp.image)?;
    let lookup = |name: &str| {
        envs.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let command = c
        .command
        .iter()
        .flatten()
        .map(|s| expand(s, lookup))
        .collect();
    let args = c.args.iter().flatten().map(|s| expand(s, lookup)).collect();

    Ok(ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: c.name.clone(),
            attempt: inp.attempt,
        }),
        image: Some(ImageSpec {
            image: inp.image.id.clone(),
            user_specified_image: user_image.clone(),
            ..Default::default()
        }),
        command,
        args,
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: envs
            .into_iter()
            .map(|(key, value)| KeyValue {
                key,
                value: value.into_bytes(),
            })
            .collect(),
        mounts,
        devices: vec![],
        labels: kubelet::container_labels(pod, &c.name)
            .into_iter()
            .collect(),
        annotations: kubelet::container_annotations(
            pod,
            &c.name,
            &user_image,
            kubelet::termination_message_path(c),
            kubelet::termination_message_policy(c),
            inp.attempt,
        )
        .into_iter()
        .collect(),
        log_path: kubelet::container_log_path(&c.name, inp.attempt),
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources::linux_resources(
                pod,
                c.resources.as_ref(),
                &inp.node.host,
            )),
            security_context: Some(security_context(inp)?),
        }),
    })
}

/// The API objects an ephemeral container refers to, read from the API
/// server before translation (the kubelet's configMapManager and
/// secretManager for env; its volume manager for claims). A name that is
/// absent, or maps to `None`, does not exist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Referenced {
    /// ConfigMap name → its `data`.
    pub config_maps: BTreeMap<String, Option<BTreeMap<String, String>>>,
    /// Secret name → its `data`.
    pub secrets: BTreeMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    /// Claim name → the persistent volume bound to it (absent: missing or unbound).
    pub claims: BTreeMap<String, BoundClaim>,
    /// The node's `status.allocatable`, read when a `resourceFieldRef` needs it.
    pub node_allocatable: Option<BTreeMap<String, Quantity>>,
    /// The Services the pod may see (the master service of `default`, and
    /// with service links those of its namespace), for the service variables.
    pub services: Vec<Service>,
}

/// A persistent volume claim's bound volume, as far as its mount path goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundClaim {
    /// The persistent volume's name (`spec.volumeName` of the claim).
    pub pv: String,
    /// How the kubelet mounts it.
    pub source: ClaimSource,
}

/// The volume source of a persistent volume, as it decides the host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimSource {
    /// CSI, and the in-tree types migrated to CSI: `kubernetes.io~csi/<pv>/mount`.
    Csi,
    /// `hostPath`: the path itself.
    HostPath(String),
    /// `local`: `kubernetes.io~local-volume/<pv>`.
    Local,
    /// `nfs`: `kubernetes.io~nfs/<pv>`.
    Nfs,
    /// Any other type (its field name), whose layout the agent does not know.
    Other(String),
}

impl Referenced {
    /// The ConfigMap and Secret names `c` refers to in `env` and `envFrom`.
    pub fn referenced(c: &EphemeralContainer) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut maps = BTreeSet::new();
        let mut secrets = BTreeSet::new();
        for from in c.env_from.iter().flatten() {
            maps.extend(from.config_map_ref.as_ref().map(|r| r.name.clone()));
            secrets.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
        }
        for src in c.env.iter().flatten().filter_map(|v| v.value_from.as_ref()) {
            maps.extend(src.config_map_key_ref.as_ref().map(|r| r.name.clone()));
            secrets.extend(src.secret_key_ref.as_ref().map(|r| r.name.clone()));
        }
        (maps, secrets)
    }

    fn config_map(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.config_maps.get(name).and_then(Option::as_ref)
    }

    fn secret(&self, name: &str) -> Option<&BTreeMap<String, Vec<u8>>> {
        self.secrets.get(name).and_then(Option::as_ref)
    }
}

#[cfg(test)]
mod tests;

/// The sandbox config the kubelet would generate for the pod
/// (`generatePodSandboxConfig`): metadata, hostname (empty on the host
/// network), log directory, the pod's labels and annotations, namespace
/// options, and the given cgroup parent. The agent sends it with every
/// CreateContainer, as the kubelet does; the runtime takes the container's
/// log directory and cgroup parent from it.
pub fn sandbox_config(
    pod: &Pod,
    pod_logs_root: &Path,
    attempt: u32,
    cgroup_parent: &str,
) -> proto::PodSandboxConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let hostname = if host_network {
        String::new()
    } else {
        let mut h: String = spec
            .hostname
            .clone()
            .unwrap_or_else(|| kubelet::name(pod).to_string());
        h.truncate(63);
        h.trim_end_matches(['-', '.']).to_string()
    };
    let psc = spec.security_context.clone().unwrap_or_default();
    proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata {
            name: kubelet::name(pod).into(),
            uid: kubelet::uid(pod).into(),
            namespace: kubelet::namespace(pod).into(),
            attempt,
        }),
        hostname,
        log_directory: kubelet::pod_log_dir(pod_logs_root, pod)
            .display()
            .to_string(),
        dns_config: None,
        port_mappings: vec![],
        labels: kubelet::sandbox_labels(pod).into_iter().collect(),
        annotations: kubelet::pod_annotations(pod).into_iter().collect(),
        linux: Some(proto::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            security_context: Some(proto::LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespace_options(pod)),
                selinux_options: psc.se_linux_options.as_ref().map(selinux),
                run_as_user: psc.run_as_user.map(|value| proto::Int64Value { value }),
                run_as_group: psc.run_as_group.map(|value| proto::Int64Value { value }),
                readonly_rootfs: false,
                supplemental_groups: psc
                    .fs_group
                    .into_iter()
                    .chain(psc.supplemental_groups.iter().flatten().copied())
                    .collect(),
                privileged: any_privileged(&spec),
                seccomp: Some(SecurityProfile {
                    profile_type: ProfileType::RuntimeDefault as i32,
                    localhost_ref: String::new(),
                }),
                apparmor: None,
            }),
            sysctls: psc
                .sysctls
                .iter()
                .flatten()
                .map(|s| (s.name.replace('/', "."), s.value.clone()))
                .collect(),
        }),
    }
}

fn any_privileged(spec: &k8s_openapi::api::core::v1::PodSpec) -> bool {
    let privileged = |sc: Option<&SecurityContext>| sc.and_then(|s| s.privileged).unwrap_or(false);
    spec.containers
        .iter()
        .any(|c| privileged(c.security_context.as_ref()))
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| privileged(c.security_context.as_ref()))
        || spec
            .ephemeral_containers
            .iter()
            .flatten()
            .any(|c| privileged(c.security_context.as_ref()))
}
