//! The part of `ValidatePodStatusUpdate` that status writers trip over:
//! terminated states going back, and `qosClass`.
//!
//! Pure; part of the parent module.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::{FieldError, NON_TERMINATED_TRANSITION};

// ---------------------------------------------------------------------------
// Status update

pub(super) fn terminated(
    s: &ContainerStatus,
) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    s.state.as_ref().and_then(|st| st.terminated.as_ref())
}

/// `ValidateContainerStateTransition`: an entry of `old` (index `i` in the
/// old list) that is terminated may not reappear in `new` non-terminated.
/// `may_restart(old_status)` says when leaving terminated is allowed.
pub(super) fn state_transitions(
    new: &[ContainerStatus],
    old: &[ContainerStatus],
    path: &str,
    may_restart: impl Fn(&ContainerStatus) -> bool,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    for (i, o) in old.iter().enumerate() {
        if terminated(o).is_none() || may_restart(o) {
            continue;
        }
        for n in new {
            if n.name == o.name && terminated(n).is_none() {
                errs.push(FieldError::forbidden(
                    format!("{path}[{i}].state"),
                    NON_TERMINATED_TRANSITION,
                ));
            }
        }
    }
    errs
}

/// The part of `ValidatePodStatusUpdate` a status writer can trip over:
/// container, init container and ephemeral container states may not go from
/// terminated back to non-terminated (ephemeral ones always, as if
/// `restartPolicy: Never`; regular ones unless the pod's restart policy
/// allows a restart; restartable init containers always may), and
/// `status.qosClass` is immutable once set.
pub fn validate_pod_status_update(new: &Pod, old: &Pod) -> Vec<FieldError> {
    let spec = old.spec.clone().unwrap_or_default();
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let (ns, os) = (
        new.status.clone().unwrap_or_default(),
        old.status.clone().unwrap_or_default(),
    );
    let mut errs = Vec::new();
    let regular_may_restart = |s: &ContainerStatus| match policy {
        "Never" => false,
        "OnFailure" => terminated(s).is_some_and(|t| t.exit_code != 0),
        _ => true,
    };
    errs.extend(state_transitions(
        ns.container_statuses.as_deref().unwrap_or_default(),
        os.container_statuses.as_deref().unwrap_or_default(),
        "status.containerStatuses",
        regular_may_restart,
    ));
    let restartable_init: BTreeSet<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .map(|c| c.name.as_str())
        .collect();
    errs.extend(state_transitions(
        ns.init_container_statuses.as_deref().unwrap_or_default(),
        os.init_container_statuses.as_deref().unwrap_or_default(),
        "status.initContainerStatuses",
        |s| restartable_init.contains(s.name.as_str()) || regular_may_restart(s),
    ));
    errs.extend(state_transitions(
        ns.ephemeral_container_statuses
            .as_deref()
            .unwrap_or_default(),
        os.ephemeral_container_statuses
            .as_deref()
            .unwrap_or_default(),
        "status.ephemeralContainerStatuses",
        |_| false,
    ));
    if let (Some(o), Some(n)) = (os.qos_class.as_deref(), ns.qos_class.as_deref())
        && !o.is_empty()
        && o != n
    {
        errs.push(FieldError::invalid(
            "status.qosClass",
            n,
            "field is immutable",
        ));
    }
    errs
}
