//! The container's security context as the kubelet builds it: the pod's
//! merged under the container's (`DetermineEffectiveSecurityContext`),
//! `runAsNonRoot` checked against the image's user, capabilities, SELinux,
//! seccomp and AppArmor profiles, masked and read-only paths.
//!
//! Pure; part of the parent module.
use std::path::Path;

use k8s_openapi::api::core::v1::{
    Capabilities, EphemeralContainer, Pod, PodSecurityContext, SELinuxOptions, SecurityContext,
};

use super::{Inputs, ResolvedImage, TranslateError, container_namespace_options};
use crate::cri::proto::{
    self, LinuxContainerSecurityContext, SecurityProfile, security_profile::ProfileType,
};
use crate::host::HostFacts;
use crate::kubelet;

/// The pod-level security context merged under the container's own, as the
/// kubelet's `DetermineEffectiveSecurityContext` does: container fields win.
pub(super) fn effective_security_context(
    pod: &Pod,
    c: &EphemeralContainer,
) -> Option<SecurityContext> {
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

pub(super) fn from_pod_level(p: &PodSecurityContext) -> SecurityContext {
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
pub(super) fn verify_run_as_non_root(
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

pub(super) fn security_context(
    inp: &Inputs<'_>,
) -> Result<LinuxContainerSecurityContext, TranslateError> {
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

pub(super) fn capabilities(c: &Capabilities) -> proto::Capability {
    proto::Capability {
        add_capabilities: c.add.clone().unwrap_or_default(),
        drop_capabilities: c.drop.clone().unwrap_or_default(),
        add_ambient_capabilities: vec![],
    }
}

pub(super) fn selinux(o: &SELinuxOptions) -> proto::SeLinuxOption {
    proto::SeLinuxOption {
        user: o.user.clone().unwrap_or_default(),
        role: o.role.clone().unwrap_or_default(),
        r#type: o.type_.clone().unwrap_or_default(),
        level: o.level.clone().unwrap_or_default(),
    }
}

pub(super) fn profile_type(t: &str) -> ProfileType {
    match t {
        "RuntimeDefault" => ProfileType::RuntimeDefault,
        "Localhost" => ProfileType::Localhost,
        _ => ProfileType::Unconfined,
    }
}

/// Container profile, else pod profile, else Unconfined (the kubelet's
/// default while `--seccomp-default` is off). Localhost profiles are
/// resolved under the kubelet's seccomp directory.
pub(super) fn seccomp(
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
