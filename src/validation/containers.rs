//! `validateEphemeralContainers` and `ValidatePodEphemeralContainersUpdate`:
//! what kube-apiserver refuses in `spec.ephemeralContainers`, in the order
//! it reports it, and the refusals the agent applies itself ([`refusals`]).
//!
//! Pure; part of the parent module.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{EphemeralContainer, Pod, ResourceRequirements};
use serde_json::Value;

use super::{
    FORBIDDEN_FOR_EPHEMERAL, FieldError, MIRROR_POD_ANNOTATION, MOUNT_PROPAGATIONS, PORT_PROTOCOLS,
    PULL_POLICIES, RECURSIVE_READ_ONLY, STATIC_POD_REFUSAL, TERMINATION_MESSAGE_POLICIES,
    default_ephemeral_container, dns1123_label_errors, go_quote,
};

// ---------------------------------------------------------------------------
// validateEphemeralContainers

pub(super) fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
}

/// The field paths of rule (h), in struct declaration order, and whether the
/// field is set in Go's sense (differs from the zero value).
pub(super) fn forbidden_fields(c: &EphemeralContainer) -> [(&'static str, bool); 8] {
    // `resources: {}` decodes to a zero struct in Go and is allowed; an
    // empty but present list or map is not zero.
    let resources_set = c
        .resources
        .as_ref()
        .is_some_and(|r| *r != ResourceRequirements::default());
    [
        ("ports", c.ports.is_some()),
        ("resources", resources_set),
        ("resizePolicy", c.resize_policy.is_some()),
        ("restartPolicy", c.restart_policy.is_some()),
        ("livenessProbe", c.liveness_probe.is_some()),
        ("readinessProbe", c.readiness_probe.is_some()),
        ("startupProbe", c.startup_probe.is_some()),
        ("lifecycle", c.lifecycle.is_some()),
    ]
}

/// `validateContainerCommon` on the fields an ephemeral container may carry.
pub(super) fn validate_container_common(
    c: &EphemeralContainer,
    volumes: &BTreeSet<&str>,
    path: &str,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let name_path = format!("{path}.name");
    if c.name.is_empty() {
        errs.push(FieldError::required(&name_path, ""));
    } else {
        for msg in dns1123_label_errors(&c.name) {
            errs.push(FieldError::invalid(&name_path, &c.name, msg));
        }
    }
    if c.image.as_deref().unwrap_or("").is_empty() {
        errs.push(FieldError::required(format!("{path}.image"), ""));
    }
    match c.termination_message_policy.as_deref().unwrap_or("") {
        "File" | "FallbackToLogsOnError" => {}
        "" => errs.push(FieldError::required(
            format!("{path}.terminationMessagePolicy"),
            "",
        )),
        other => errs.push(FieldError::not_supported(
            format!("{path}.terminationMessagePolicy"),
            other,
            &TERMINATION_MESSAGE_POLICIES,
        )),
    }
    // Ports are forbidden anyway (rule h); their own checks still run first.
    validate_ports(c, path, &mut errs);
    for (j, e) in c.env.iter().flatten().enumerate() {
        if e.name.is_empty() {
            errs.push(FieldError::required(format!("{path}.env[{j}].name"), ""));
        }
    }
    validate_volume_mounts(c, volumes, path, &mut errs);
    for (j, d) in c.volume_devices.iter().flatten().enumerate() {
        let dp = format!("{path}.volumeDevices[{j}]");
        if d.name.is_empty() {
            errs.push(FieldError::required(format!("{dp}.name"), ""));
        }
        if !volumes.contains(d.name.as_str()) {
            errs.push(FieldError::not_found(format!("{dp}.name"), &d.name));
        }
        if d.device_path.is_empty() {
            errs.push(FieldError::required(format!("{dp}.devicePath"), ""));
        }
    }
    match c.image_pull_policy.as_deref().unwrap_or("") {
        "" => errs.push(FieldError::required(format!("{path}.imagePullPolicy"), "")),
        p if PULL_POLICIES.contains(&p) => {}
        p => errs.push(FieldError::not_supported(
            format!("{path}.imagePullPolicy"),
            p,
            &PULL_POLICIES,
        )),
    }
    errs
}

/// `validateContainerPorts`: names unique, a port and a known protocol.
pub(super) fn validate_ports(c: &EphemeralContainer, path: &str, errs: &mut Vec<FieldError>) {
    let mut port_names = BTreeSet::new();
    for (j, p) in c.ports.iter().flatten().enumerate() {
        let pp = format!("{path}.ports[{j}]");
        if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty())
            && !port_names.insert(n)
        {
            errs.push(FieldError::duplicate(format!("{pp}.name"), n));
        }
        if p.container_port == 0 {
            errs.push(FieldError::required(format!("{pp}.containerPort"), ""));
        }
        match p.protocol.as_deref().unwrap_or("") {
            "" => errs.push(FieldError::required(format!("{pp}.protocol"), "")),
            proto if PORT_PROTOCOLS.contains(&proto) => {}
            proto => errs.push(FieldError::not_supported(
                format!("{pp}.protocol"),
                proto,
                &PORT_PROTOCOLS,
            )),
        }
    }
}

/// `ValidateVolumeMounts`: each names a volume of the pod, has a unique
/// mount path, and a propagation and recursive read-only mode it may have.
pub(super) fn validate_volume_mounts(
    c: &EphemeralContainer,
    volumes: &BTreeSet<&str>,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    let mut mount_points = BTreeSet::new();
    for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mp = format!("{path}.volumeMounts[{j}]");
        if m.name.is_empty() {
            errs.push(FieldError::required(format!("{mp}.name"), ""));
        }
        if !volumes.contains(m.name.as_str()) {
            errs.push(FieldError::not_found(format!("{mp}.name"), &m.name));
        }
        if m.mount_path.is_empty() {
            errs.push(FieldError::required(format!("{mp}.mountPath"), ""));
        }
        if !mount_points.insert(m.mount_path.as_str()) {
            errs.push(FieldError::invalid(
                format!("{mp}.mountPath"),
                &m.mount_path,
                "must be unique",
            ));
        }
        // kube-apiserver reports these two on the list's path, without the index.
        let list = format!("{path}.volumeMounts");
        if let Some(p) = m.mount_propagation.as_deref() {
            let field = format!("{list}.mountPropagation");
            if !MOUNT_PROPAGATIONS.contains(&p) {
                errs.push(FieldError::not_supported(&field, p, &MOUNT_PROPAGATIONS));
            }
            let privileged = c
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            if p == "Bidirectional" && !privileged {
                errs.push(FieldError::forbidden(
                    &field,
                    "Bidirectional mount propagation is available only to privileged containers",
                ));
            }
        }
        if let Some(rro) = m.recursive_read_only.as_deref() {
            let field = format!("{list}.recursiveReadOnly");
            match rro {
                "Disabled" => {}
                "Enabled" | "IfPossible" => {
                    if !m.read_only.unwrap_or(false) {
                        errs.push(FieldError::forbidden(
                            &field,
                            "may only be specified when readOnly is true",
                        ));
                    }
                    if m.mount_propagation.as_deref().is_some_and(|p| p != "None") {
                        errs.push(FieldError::forbidden(
                            &field,
                            "may only be specified when mountPropagation is None or not specified",
                        ));
                    }
                }
                other => errs.push(FieldError::not_supported(
                    &field,
                    other,
                    &RECURSIVE_READ_ONLY,
                )),
            }
        }
    }
}

/// `validateEphemeralContainers` over `spec.ephemeralContainers` (rules a–i
/// of the research notes §1.2), in the order kube-apiserver reports them.
/// The pod is taken as it is: apply [`default_ephemeral_container`] first to
/// judge a spec the way the API server does.
pub fn validate_ephemeral_containers(pod: &Pod) -> Vec<FieldError> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let ecs = spec.ephemeral_containers.as_deref().unwrap_or_default();
    if ecs.is_empty() {
        return Vec::new();
    }
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let mut other_names: BTreeSet<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    other_names.extend(
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str()),
    );
    let mut all_names = other_names.clone();

    let mut errs = Vec::new();
    for (i, ec) in ecs.iter().enumerate() {
        let path = format!("spec.ephemeralContainers[{i}]");
        errs.extend(validate_container_common(ec, &volumes, &path));
        // validateContainerOnlyForPod
        if let Some(image) = ec.image.as_deref()
            && image.trim() != image
        {
            errs.push(FieldError::invalid(
                format!("{path}.image"),
                image,
                "must not have leading or trailing whitespace",
            ));
        }
        if !all_names.insert(ec.name.as_str()) {
            errs.push(FieldError::duplicate(format!("{path}.name"), &ec.name));
        }
        if let Some(target) = ec.target_container_name.as_deref()
            && !target.is_empty()
            && !other_names.contains(target)
        {
            errs.push(FieldError::not_found(
                format!("{path}.targetContainerName"),
                target,
            ));
        }
        for (field, set) in forbidden_fields(ec) {
            if set {
                errs.push(FieldError::forbidden(
                    format!("{path}.{field}"),
                    FORBIDDEN_FOR_EPHEMERAL,
                ));
            }
        }
        for (j, m) in ec.volume_mounts.iter().flatten().enumerate() {
            if !m.sub_path.as_deref().unwrap_or("").is_empty() {
                errs.push(FieldError::forbidden(
                    format!("{path}.volumeMounts[{j}].subPath"),
                    FORBIDDEN_FOR_EPHEMERAL,
                ));
            }
            if !m.sub_path_expr.as_deref().unwrap_or("").is_empty() {
                errs.push(FieldError::forbidden(
                    format!("{path}.volumeMounts[{j}].subPathExpr"),
                    FORBIDDEN_FOR_EPHEMERAL,
                ));
            }
        }
    }
    errs
}

/// `ValidatePodEphemeralContainersUpdate`, restricted to ephemeral
/// containers: the rules of [`validate_ephemeral_containers`] on `new`, then
/// — when `old` is a mirror pod — only the static pod refusal, else one
/// error per existing ephemeral container that was removed or changed
/// (matched by name; order does not matter).
pub fn validate_ephemeral_containers_update(new: &Pod, old: &Pod) -> Vec<FieldError> {
    let mut errs = validate_ephemeral_containers(new);
    if is_mirror(old) {
        return vec![FieldError::forbidden("[]", STATIC_POD_REFUSAL)];
    }
    let new_ecs = ephemeral_containers(new);
    // Like the Go map index: a later duplicate name wins.
    let by_name: BTreeMap<&str, &EphemeralContainer> =
        new_ecs.iter().map(|c| (c.name.as_str(), c)).collect();
    for old_ec in ephemeral_containers(old) {
        match by_name.get(old_ec.name.as_str()) {
            None => errs.push(FieldError::forbidden(
                "spec.ephemeralContainers",
                format!(
                    "existing ephemeral containers {} may not be removed\n",
                    go_quote(&old_ec.name)
                ),
            )),
            Some(new_ec) if *new_ec != old_ec => errs.push(FieldError::forbidden(
                "spec.ephemeralContainers",
                format!(
                    "existing ephemeral containers {} may not be changed\n{}",
                    go_quote(&old_ec.name),
                    field_diff(old_ec, new_ec)
                ),
            )),
            Some(_) => {}
        }
    }
    errs
}

pub(super) fn ephemeral_containers(pod: &Pod) -> &[EphemeralContainer] {
    pod.spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_deref())
        .unwrap_or_default()
}

/// A short `-`/`+` listing of the top-level fields that differ (stands in
/// for go-cmp's diff, which cannot be reproduced).
pub(super) fn field_diff(old: &EphemeralContainer, new: &EphemeralContainer) -> String {
    let o = serde_json::to_value(old).unwrap_or(Value::Null);
    let n = serde_json::to_value(new).unwrap_or(Value::Null);
    let empty = serde_json::Map::new();
    let (o, n) = (
        o.as_object().unwrap_or(&empty),
        n.as_object().unwrap_or(&empty),
    );
    let keys: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    let mut out = String::new();
    for k in keys {
        let (a, b) = (o.get(k), n.get(k));
        if a != b {
            if let Some(a) = a {
                out.push_str(&format!("-\t{k}: {a}\n"));
            }
            if let Some(b) = b {
                out.push_str(&format!("+\t{k}: {b}\n"));
            }
        }
    }
    out
}

/// For the agent: container name → one line listing every error under
/// `spec.ephemeralContainers[i]` (each as `field: body`, joined by `"; "`),
/// judged after API defaulting. For a mirror pod every ephemeral container
/// maps to the static pod refusal. Containers without errors are absent.
pub fn refusals(pod: &Pod) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let ecs = ephemeral_containers(pod);
    if is_mirror(pod) {
        for ec in ecs {
            out.insert(ec.name.clone(), STATIC_POD_REFUSAL.to_string());
        }
        return out;
    }
    let mut defaulted = pod.clone();
    if let Some(list) = defaulted
        .spec
        .as_mut()
        .and_then(|s| s.ephemeral_containers.as_mut())
    {
        list.iter_mut().for_each(default_ephemeral_container);
    }
    let mut per_index: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for e in validate_ephemeral_containers(&defaulted) {
        if let Some(i) = ephemeral_index(&e.field) {
            per_index.entry(i).or_default().push(e.to_string());
        }
    }
    for (i, msgs) in per_index {
        let name = ecs.get(i).map(|c| c.name.clone()).unwrap_or_default();
        let joined = msgs.join("; ");
        out.entry(name)
            .and_modify(|m: &mut String| {
                m.push_str("; ");
                m.push_str(&joined);
            })
            .or_insert(joined);
    }
    out
}

/// `i` of a path `spec.ephemeralContainers[i]…`.
pub(super) fn ephemeral_index(field: &str) -> Option<usize> {
    let rest = field.strip_prefix("spec.ephemeralContainers[")?;
    let (idx, tail) = rest.split_once(']')?;
    if !(tail.is_empty() || tail.starts_with('.') || tail.starts_with('[')) {
        return None;
    }
    idx.parse().ok()
}
