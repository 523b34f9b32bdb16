//! Pure translation of one ephemeral container of a pod into the CRI
//! `ContainerConfig` the kubelet would send (`generateContainerConfig` and
//! friends in the kubelet's `kuberuntime`). No I/O: everything observed on
//! the node (target id, resolved image, attempt, host files) comes in
//! [`Inputs`]. Ephemeral containers get **no resources** of their own, but
//! the kubelet's Linux resources for a container without any
//! ([`super::resources`]), and the service variables of the Services read
//! for them ([`super::services`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{
    Capabilities, EphemeralContainer, Pod, PodSecurityContext, SELinuxOptions, SecurityContext,
    Service, Volume,
};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::host::HostFacts;
use super::{resources, services};
use crate::cri::proto::{
    self, ContainerConfig, ContainerMetadata, ImageSpec, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, Mount, MountPropagation, NamespaceMode, NamespaceOption,
    SecurityProfile, security_profile::ProfileType,
};
use crate::kubelet;

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

/// The node: its directories in the kubelet's layout, and what the
/// kubelet reads from the host at start.
#[derive(Debug, Clone, Default)]
pub struct NodeDirs {
    /// Pod log directories (`/var/log/pods`).
    pub pod_logs: PathBuf,
    /// The kubelet's per-pod directories (`/var/lib/kubelet/pods`).
    pub pods: PathBuf,
    /// Where `Localhost` seccomp profiles live (`/var/lib/kubelet/seccomp`).
    pub seccomp: PathBuf,
    /// Where the legacy log symlinks go (`/var/log/containers`).
    pub container_logs: PathBuf,
    /// The host's memory, cgroup mode, huge page sizes, CPUs.
    pub host: HostFacts,
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

/// The pod-level security context merged under the container's own, as the
/// kubelet's `DetermineEffectiveSecurityContext` does: container fields win.
fn effective_security_context(pod: &Pod, c: &EphemeralContainer) -> Option<SecurityContext> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let c_sc = c.security_context.as_ref();
    if pod_sc.is_none() && c_sc.is_none() {
        return None;
    }
    let mut sc = pod_sc.map(from_pod_level).unwrap_or_default();
    if let Some(own) = c_sc {
        macro_rules! take {
            ($($f:ident),*) => { $( if own.$f.is_some() { sc.$f = own.$f.clone(); } )* };
        }
        take!(
            capabilities,
            privileged,
            se_linux_options,
            windows_options,
            run_as_user,
            run_as_group,
            run_as_non_root,
            read_only_root_filesystem,
            allow_privilege_escalation,
            proc_mount,
            seccomp_profile,
            app_armor_profile
        );
    }
    Some(sc)
}

fn from_pod_level(p: &PodSecurityContext) -> SecurityContext {
    SecurityContext {
        se_linux_options: p.se_linux_options.clone(),
        windows_options: p.windows_options.clone(),
        run_as_user: p.run_as_user,
        run_as_group: p.run_as_group,
        run_as_non_root: p.run_as_non_root,
        seccomp_profile: p.seccomp_profile.clone(),
        app_armor_profile: p.app_armor_profile.clone(),
        ..Default::default()
    }
}

/// The kubelet's `verifyRunAsNonRoot`, with its messages.
fn verify_run_as_non_root(
    pod: &Pod,
    c: &EphemeralContainer,
    image: &ResolvedImage,
) -> Result<(), TranslateError> {
    let Some(sc) = effective_security_context(pod, c) else {
        return Ok(());
    };
    if sc.run_as_non_root != Some(true) {
        return Ok(());
    }
    let who = format!(
        "(pod: {:?}, container: {})",
        kubelet::format_pod(pod),
        c.name
    );
    match (sc.run_as_user, image.uid) {
        (Some(0), _) => Err(TranslateError::NonRoot(format!(
            "container's runAsUser breaks non-root policy {who}"
        ))),
        (Some(_), _) => Ok(()),
        (None, Some(0)) => Err(TranslateError::NonRoot(format!(
            "container has runAsNonRoot and image will run as root {who}"
        ))),
        (None, None) if !image.username.is_empty() => Err(TranslateError::NonRoot(format!(
            "container has runAsNonRoot and image has non-numeric user ({}), cannot verify user is non-root {who}",
            image.username
        ))),
        // An image that names no user runs as root; the kubelet's
        // `getImageUser` says so too.
        (None, None) => Err(TranslateError::NonRoot(format!(
            "container has runAsNonRoot and image will run as root {who}"
        ))),
        (None, Some(_)) => Ok(()),
    }
}

/// Paths the kubelet masks in /proc and /sys unless `procMount: Unmasked`
/// (`pkg/securitycontext/util.go`, 1.36, kept in sync with moby's list);
/// the host's `thermal_throttle` directories follow them.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths the kubelet makes read-only unless `procMount: Unmasked`.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The masked paths for a container: none with `procMount: Unmasked`, else
/// the defaults and the host's CPU `thermal_throttle` directories.
pub fn masked_paths(unmasked: bool, host: &HostFacts) -> Vec<String> {
    if unmasked {
        return vec![];
    }
    DEFAULT_MASKED_PATHS
        .iter()
        .map(|s| s.to_string())
        .chain(host.thermal_throttle.iter().cloned())
        .collect()
}

fn security_context(inp: &Inputs<'_>) -> Result<LinuxContainerSecurityContext, TranslateError> {
    let pod = inp.pod;
    let effective = effective_security_context(pod, inp.container);
    let sc = effective.clone().unwrap_or_default();
    let unmasked = sc.proc_mount.as_deref() == Some("Unmasked");
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let mut out = LinuxContainerSecurityContext {
        capabilities: sc.capabilities.as_ref().map(capabilities),
        privileged: sc.privileged.unwrap_or(false),
        namespace_options: Some(container_namespace_options(pod, inp.target_id)),
        selinux_options: sc.se_linux_options.as_ref().map(selinux),
        run_as_user: sc.run_as_user.map(|value| proto::Int64Value { value }),
        run_as_group: sc.run_as_group.map(|value| proto::Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        // Only an explicit `allowPrivilegeEscalation: false` sets no_new_privs.
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        masked_paths: masked_paths(unmasked, &inp.node.host),
        readonly_paths: if unmasked {
            vec![]
        } else {
            strings(DEFAULT_READONLY_PATHS)
        },
        seccomp: Some(seccomp(sc.seccomp_profile.as_ref(), &inp.node.seccomp)),
        apparmor: sc.app_armor_profile.as_ref().map(|p| SecurityProfile {
            profile_type: profile_type(&p.type_) as i32,
            localhost_ref: p.localhost_profile.clone().unwrap_or_default(),
        }),
        ..Default::default()
    };
    if out.run_as_user.is_none() {
        // The image's user, as the kubelet's `getImageUser` reads it: its
        // numeric user, else its user name, else root (an image that names
        // no user runs as uid 0, and the kubelet says so).
        match (inp.image.uid, inp.image.username.as_str()) {
            (Some(uid), _) => out.run_as_user = Some(proto::Int64Value { value: uid }),
            (None, "") => out.run_as_user = Some(proto::Int64Value { value: 0 }),
            (None, name) => out.run_as_username = name.to_string(),
        }
    }
    if let Some(psc) = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()) {
        out.supplemental_groups.extend(psc.fs_group);
        out.supplemental_groups
            .extend(psc.supplemental_groups.iter().flatten().copied());
        out.supplemental_groups_policy = match psc.supplemental_groups_policy.as_deref() {
            None | Some("Merge") => proto::SupplementalGroupsPolicy::Merge as i32,
            Some("Strict") => proto::SupplementalGroupsPolicy::Strict as i32,
            Some(other) => {
                return Err(TranslateError::SupplementalGroupsPolicy(other.to_string()));
            }
        };
    }
    Ok(out)
}

fn capabilities(c: &Capabilities) -> proto::Capability {
    proto::Capability {
        add_capabilities: c.add.clone().unwrap_or_default(),
        drop_capabilities: c.drop.clone().unwrap_or_default(),
        add_ambient_capabilities: vec![],
    }
}

fn selinux(o: &SELinuxOptions) -> proto::SeLinuxOption {
    proto::SeLinuxOption {
        user: o.user.clone().unwrap_or_default(),
        role: o.role.clone().unwrap_or_default(),
        r#type: o.type_.clone().unwrap_or_default(),
        level: o.level.clone().unwrap_or_default(),
    }
}

fn profile_type(t: &str) -> ProfileType {
    match t {
        "RuntimeDefault" => ProfileType::RuntimeDefault,
        "Localhost" => ProfileType::Localhost,
        _ => ProfileType::Unconfined,
    }
}

/// Container profile, else pod profile, else Unconfined (the kubelet's
/// default while `--seccomp-default` is off). Localhost profiles are
/// resolved under the kubelet's seccomp directory.
fn seccomp(
    profile: Option<&k8s_openapi::api::core::v1::SeccompProfile>,
    root: &Path,
) -> SecurityProfile {
    match profile {
        None => SecurityProfile {
            profile_type: ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        },
        Some(p) => {
            let kind = profile_type(&p.type_);
            let localhost_ref = match (kind, &p.localhost_profile) {
                (ProfileType::Localhost, Some(rel)) => root.join(rel).display().to_string(),
                _ => String::new(),
            };
            SecurityProfile {
                profile_type: kind as i32,
                localhost_ref,
            }
        }
    }
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

/// Sets `name` to `value`, replacing an earlier value in place.
fn set_env(out: &mut Vec<(String, String)>, name: &str, value: String) {
    match out.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => out.push((name.to_string(), value)),
    }
}

/// The kubelet's `makeEnvironmentVariables`: `envFrom` first (in order,
/// with its prefix; every key taken as it is), then `env`, whose values
/// replace earlier ones in place, then the service variables the container
/// does not set itself. A literal value expands `$(NAME)` against
/// everything set before it, then the service variables; a value from a
/// source is taken verbatim. A missing optional source or key leaves the
/// variable unset; a missing required one is an error in the kubelet's words.
fn environment(
    pod: &Pod,
    c: &EphemeralContainer,
    refs: &Referenced,
) -> Result<Vec<(String, String)>, TranslateError> {
    let service_env = services::pod_service_env(pod, &refs.services);
    let mut out = container_environment(pod, c, refs, &service_env)?;
    for (k, v) in service_env {
        if !out.iter().any(|(have, _)| *have == k) {
            out.push((k, v));
        }
    }
    Ok(out)
}

fn container_environment(
    pod: &Pod,
    c: &EphemeralContainer,
    refs: &Referenced,
    service_env: &[(String, String)],
) -> Result<Vec<(String, String)>, TranslateError> {
    let namespace = kubelet::namespace(pod);
    let mut out: Vec<(String, String)> = Vec::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match refs.config_map(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        set_env(&mut out, &format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(not_found("configmap", &r.name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match refs.secret(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        let v = String::from_utf8_lossy(v).into_owned();
                        set_env(&mut out, &format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(not_found("secret", &r.name)),
            }
        }
    }
    for var in c.env.iter().flatten() {
        let literal = var.value.as_deref().unwrap_or_default();
        let value = match &var.value_from {
            Some(src) if literal.is_empty() => {
                let key_missing = |kind, name: &str, key: &str| TranslateError::KeyNotFound {
                    key: key.to_string(),
                    kind,
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                };
                if let Some(f) = &src.field_ref {
                    field_value(pod, &f.field_path)?
                } else if let Some(r) = &src.config_map_key_ref {
                    let optional = r.optional == Some(true);
                    let Some(data) = refs.config_map(&r.name) else {
                        if optional {
                            continue;
                        }
                        return Err(not_found("configmap", &r.name));
                    };
                    match data.get(&r.key) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => return Err(key_missing("ConfigMap", &r.name, &r.key)),
                    }
                } else if let Some(r) = &src.secret_key_ref {
                    let optional = r.optional == Some(true);
                    let Some(data) = refs.secret(&r.name) else {
                        if optional {
                            continue;
                        }
                        return Err(not_found("secret", &r.name));
                    };
                    match data.get(&r.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => return Err(key_missing("Secret", &r.name, &r.key)),
                    }
                } else if let Some(r) = &src.resource_field_ref {
                    super::downward::resource_value(pod, r, refs.node_allocatable.as_ref())?
                } else {
                    // The API requires one source; none known here means a
                    // newer one (`fileKeyRef`) that these API types drop.
                    return Err(TranslateError::UnknownEnvSource(var.name.clone()));
                }
            }
            _ => {
                let lookup = |name: &str| {
                    out.iter()
                        .chain(service_env)
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                expand(literal, lookup)
            }
        };
        set_env(&mut out, &var.name, value);
    }
    Ok(out)
}

fn not_found(kind: &'static str, name: &str) -> TranslateError {
    TranslateError::SourceNotFound {
        kind,
        name: name.to_string(),
    }
}

/// The downward API for env vars (the kubelet's `podFieldSelectorRuntimeValue`).
fn field_value(pod: &Pod, path: &str) -> Result<String, TranslateError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let map_entry = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let v = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => kubelet::namespace(pod).to_string(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "spec.terminationGracePeriodSeconds" => spec
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .to_string(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIPs" => status
            .and_then(|s| s.host_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        _ => map_entry(&meta.labels, "metadata.labels['")
            .or_else(|| map_entry(&meta.annotations, "metadata.annotations['"))
            .ok_or_else(|| TranslateError::UnsupportedFieldPath(path.to_string()))?,
    };
    Ok(v)
}

/// `$(NAME)` expansion as in the kubelet: known names are replaced, unknown
/// references stay as written, `$$` is an escaped `$`.
pub fn expand<'v>(input: &str, lookup: impl Fn(&str) -> Option<&'v str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match lookup(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Volume mounts, then `/etc/hosts`, then the termination-message file, in
/// the kubelet's order.
fn mounts(inp: &Inputs<'_>, refs: &Referenced) -> Result<Vec<Mount>, TranslateError> {
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
fn volume_host_path(
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
fn claim_host_path(
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
