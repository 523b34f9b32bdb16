//! kube-apiserver's rules for ephemeral containers, as pure functions.
//!
//! Shared by the local API server (which answers `422 Invalid` with them) and
//! by the agent (which refuses a spec that an old or modified server let
//! through, DESIGN.md §10). Everything here mirrors
//! `pkg/apis/core/validation` and `pkg/apis/core/v1/defaults.go` of
//! Kubernetes ≥ 1.33 and apimachinery's `field.Error` rendering, so the
//! messages match byte for byte what a real API server answers:
//!
//! * [`default_ephemeral_container`] — `SetDefaults_EphemeralContainer`;
//! * [`validate_ephemeral_containers`] — `validateEphemeralContainers`;
//! * [`validate_ephemeral_containers_update`] — `ValidatePodEphemeralContainersUpdate`;
//! * [`validate_pod_status_update`] — the part of `ValidatePodStatusUpdate` that
//!   status writers trip over (terminated states going back, `qosClass`);
//! * [`invalid_status`] — `errors.NewInvalid` as the 422 `Status` body.
//!
//! Invariant: no I/O, no clock; every function is deterministic in its input.
//!
//! Not reproduced: the rest of pod spec validation (volumes, resources
//! values, security context values, env var name syntax), which a pod that
//! reached the agent has already passed; and go-cmp's diff text after
//! "may not be changed" (ours lists the differing fields instead).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, EphemeralContainer, Pod, ResourceRequirements,
};
use serde_json::{Value, json};

/// Annotation that marks a mirror pod (the API copy of a static pod).
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The text of rule (h) and (i): a field an ephemeral container may not set.
pub const FORBIDDEN_FOR_EPHEMERAL: &str = "cannot be set for an Ephemeral Container";

/// The static (mirror) pod refusal, on the root path `[]`.
pub const STATIC_POD_REFUSAL: &str = "static pods do not support ephemeral containers";

/// The status-update refusal for a terminated state that goes back.
pub const NON_TERMINATED_TRANSITION: &str = "may not be transitioned to non-terminated state";

/// `terminationMessagePath` default.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];
const MOUNT_PROPAGATIONS: [&str; 3] = ["Bidirectional", "HostToContainer", "None"];
const RECURSIVE_READ_ONLY: [&str; 3] = ["Disabled", "Enabled", "IfPossible"];
const TERMINATION_MESSAGE_POLICIES: [&str; 2] = ["File", "FallbackToLogsOnError"];
const PORT_PROTOCOLS: [&str; 3] = ["SCTP", "TCP", "UDP"];
const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;

/// apimachinery's `field.ErrorType`, restricted to the kinds these rules use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// A required field is empty.
    Required,
    /// A value does not satisfy a rule.
    Invalid,
    /// A value is not one of the enumerated ones.
    NotSupported,
    /// A value that must be unique is not.
    Duplicate,
    /// A reference does not resolve.
    NotFound,
    /// The field may not be set or changed.
    Forbidden,
}

impl ErrorType {
    /// The `StatusCause.reason` (`FieldValueRequired`, …).
    pub fn reason(self) -> &'static str {
        match self {
            ErrorType::Required => "FieldValueRequired",
            ErrorType::Invalid => "FieldValueInvalid",
            ErrorType::NotSupported => "FieldValueNotSupported",
            ErrorType::Duplicate => "FieldValueDuplicate",
            ErrorType::NotFound => "FieldValueNotFound",
            ErrorType::Forbidden => "FieldValueForbidden",
        }
    }

    /// The prefix of the error body (`Required value`, `Invalid value`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Required => "Required value",
            ErrorType::Invalid => "Invalid value",
            ErrorType::NotSupported => "Unsupported value",
            ErrorType::Duplicate => "Duplicate value",
            ErrorType::NotFound => "Not found",
            ErrorType::Forbidden => "Forbidden",
        }
    }

    /// Whether the body prints the bad value (apimachinery omits it for
    /// Required and Forbidden).
    fn shows_value(self) -> bool {
        !matches!(self, ErrorType::Required | ErrorType::Forbidden)
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validation error: apimachinery's `field.Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// What kind of error.
    pub type_: ErrorType,
    /// The field path, e.g. `spec.ephemeralContainers[0].ports`.
    pub field: String,
    /// Extra text after the value (may be empty).
    pub detail: String,
    /// The offending value (a string, printed Go-`%q`-quoted), if shown.
    pub value: Option<String>,
}

impl FieldError {
    fn new(
        type_: ErrorType,
        field: impl Into<String>,
        value: Option<String>,
        detail: impl Into<String>,
    ) -> Self {
        FieldError {
            type_,
            field: field.into(),
            detail: detail.into(),
            value,
        }
    }

    /// `field.Required`.
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(ErrorType::Required, field, None, detail)
    }

    /// `field.Invalid` with a string value.
    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(ErrorType::Invalid, field, Some(value.into()), detail)
    }

    /// `field.NotSupported`: the detail lists the supported values.
    pub fn not_supported(
        field: impl Into<String>,
        value: impl Into<String>,
        supported: &[&str],
    ) -> Self {
        let list: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
        Self::new(
            ErrorType::NotSupported,
            field,
            Some(value.into()),
            format!("supported values: {}", list.join(", ")),
        )
    }

    /// `field.Duplicate`.
    pub fn duplicate(field: impl Into<String>, value: impl Into<String>) -> Self {
        Self::new(ErrorType::Duplicate, field, Some(value.into()), "")
    }

    /// `field.NotFound`.
    pub fn not_found(field: impl Into<String>, value: impl Into<String>) -> Self {
        Self::new(ErrorType::NotFound, field, Some(value.into()), "")
    }

    /// `field.Forbidden`.
    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(ErrorType::Forbidden, field, None, detail)
    }

    /// `ErrorBody()`: the message without the field path, as in a Status cause.
    pub fn body(&self) -> String {
        let mut s = self.type_.as_str().to_string();
        if self.type_.shows_value()
            && let Some(v) = &self.value
        {
            s.push_str(": ");
            s.push_str(&go_quote(v));
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

impl std::error::Error for FieldError {}

/// Go's `strconv.Quote` for the characters that occur in practice: escapes
/// quotes, backslashes and control characters, keeps printable Unicode.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => {
                if (c as u32) < 0x10000 {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// Defaulting

/// The API default for `imagePullPolicy` (`SetDefaults_Container`): `Always`
/// when the image's tag is `latest` (an image with neither tag nor digest
/// counts as `latest`), otherwise `IfNotPresent` — also when the reference
/// does not parse.
pub fn default_image_pull_policy(image: &str) -> &'static str {
    match crate::reconcile::image::default_pull_policy(image) {
        crate::reconcile::image::PullPolicy::Always => "Always",
        _ => "IfNotPresent",
    }
}

/// `SetDefaults_Container` on the fields the API defaults: `imagePullPolicy`
/// by tag, `terminationMessagePath`, `terminationMessagePolicy`, port
/// `protocol`, and env `fieldRef.apiVersion`.
pub fn default_container(c: &mut Container) {
    default_common(
        c.image.as_deref(),
        &mut c.image_pull_policy,
        &mut c.termination_message_path,
        &mut c.termination_message_policy,
        c.ports.as_deref_mut(),
        c.env.as_deref_mut(),
    );
}

/// `SetDefaults_EphemeralContainer`: the same defaults as a regular container.
pub fn default_ephemeral_container(c: &mut EphemeralContainer) {
    default_common(
        c.image.as_deref(),
        &mut c.image_pull_policy,
        &mut c.termination_message_path,
        &mut c.termination_message_policy,
        c.ports.as_deref_mut(),
        c.env.as_deref_mut(),
    );
}

fn default_common(
    image: Option<&str>,
    pull_policy: &mut Option<String>,
    path: &mut Option<String>,
    policy: &mut Option<String>,
    ports: Option<&mut [k8s_openapi::api::core::v1::ContainerPort]>,
    env: Option<&mut [k8s_openapi::api::core::v1::EnvVar]>,
) {
    if pull_policy.as_deref().unwrap_or("").is_empty() {
        *pull_policy = Some(default_image_pull_policy(image.unwrap_or("")).into());
    }
    if path.as_deref().unwrap_or("").is_empty() {
        *path = Some(DEFAULT_TERMINATION_MESSAGE_PATH.into());
    }
    if policy.as_deref().unwrap_or("").is_empty() {
        *policy = Some("File".into());
    }
    for p in ports.into_iter().flatten() {
        if p.protocol.as_deref().unwrap_or("").is_empty() {
            p.protocol = Some("TCP".into());
        }
    }
    for e in env.into_iter().flatten() {
        if let Some(f) = e.value_from.as_mut().and_then(|v| v.field_ref.as_mut())
            && f.api_version.as_deref().unwrap_or("").is_empty()
        {
            f.api_version = Some("v1".into());
        }
    }
}

// ---------------------------------------------------------------------------
// Name syntax (apimachinery util/validation)

fn is_dns1123_label_shape(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_dns1123_subdomain_shape(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_dns1123_label_shape)
}

/// `IsDNS1123Label`: the messages for a value that is not a DNS-1123 label.
pub fn dns1123_label_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_LABEL_MAX {
        errs.push(format!(
            "must be no more than {DNS1123_LABEL_MAX} characters"
        ));
    }
    if !is_dns1123_label_shape(value) {
        if is_dns1123_subdomain_shape(value) {
            errs.push("must not contain dots".to_string());
        } else {
            errs.push(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
                 and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', \
                 regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
                    .to_string(),
            );
        }
    }
    errs
}

/// `IsDNS1123Subdomain`: the messages for a value that is not a DNS-1123
/// subdomain (object names of most kinds, pods included).
pub fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > DNS1123_SUBDOMAIN_MAX {
        errs.push(format!(
            "must be no more than {DNS1123_SUBDOMAIN_MAX} characters"
        ));
    }
    if !is_dns1123_subdomain_shape(value) {
        errs.push(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
             and must start and end with an alphanumeric character (e.g. 'example.com', regex used for \
             validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                .to_string(),
        );
    }
    errs
}

// ---------------------------------------------------------------------------
// validateEphemeralContainers

fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
}

/// The field paths of rule (h), in struct declaration order, and whether the
/// field is set in Go's sense (differs from the zero value).
fn forbidden_fields(c: &EphemeralContainer) -> [(&'static str, bool); 8] {
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
fn validate_container_common(
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
    for (j, e) in c.env.iter().flatten().enumerate() {
        if e.name.is_empty() {
            errs.push(FieldError::required(format!("{path}.env[{j}].name"), ""));
        }
    }
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

fn ephemeral_containers(pod: &Pod) -> &[EphemeralContainer] {
    pod.spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_deref())
        .unwrap_or_default()
}

/// A short `-`/`+` listing of the top-level fields that differ (stands in
/// for go-cmp's diff, which cannot be reproduced).
fn field_diff(old: &EphemeralContainer, new: &EphemeralContainer) -> String {
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
fn ephemeral_index(field: &str) -> Option<usize> {
    let rest = field.strip_prefix("spec.ephemeralContainers[")?;
    let (idx, tail) = rest.split_once(']')?;
    if !(tail.is_empty() || tail.starts_with('.') || tail.starts_with('[')) {
        return None;
    }
    idx.parse().ok()
}

// ---------------------------------------------------------------------------
// Status update

fn terminated(
    s: &ContainerStatus,
) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    s.state.as_ref().and_then(|st| st.terminated.as_ref())
}

/// `ValidateContainerStateTransition`: an entry of `old` (index `i` in the
/// old list) that is terminated may not reappear in `new` non-terminated.
/// `may_restart(old_status)` says when leaving terminated is allowed.
fn state_transitions(
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

// ---------------------------------------------------------------------------
// Status body

/// `ErrorList.ToAggregate().Error()`: one error as is, several (after
/// dropping repeated messages) as `[e1, e2, …]`.
pub fn aggregate_message(errs: &[FieldError]) -> String {
    let mut seen = BTreeSet::new();
    let mut msgs = Vec::new();
    for e in errs {
        let m = e.to_string();
        if seen.insert(m.clone()) {
            msgs.push(m);
        }
    }
    match msgs.len() {
        0 => String::new(),
        1 => msgs.remove(0),
        _ => format!("[{}]", msgs.join(", ")),
    }
}

/// The 422 body of `errors.NewInvalid(GroupKind{"", kind}, name, errs)`:
/// message `Kind "name" is invalid: <aggregate>`, one cause per error.
/// `kind` may be qualified (`Lease.coordination.k8s.io`): the part after the
/// first dot becomes `details.group`.
pub fn invalid_status(kind: &str, name: &str, errs: &[FieldError]) -> Value {
    let (bare_kind, group) = kind.split_once('.').unwrap_or((kind, ""));
    let agg = aggregate_message(errs);
    let message = if agg.is_empty() {
        format!("{kind} {} is invalid", go_quote(name))
    } else {
        format!("{kind} {} is invalid: {agg}", go_quote(name))
    };
    let causes: Vec<Value> = errs
        .iter()
        .map(|e| json!({"reason": e.type_.reason(), "message": e.body(), "field": e.field}))
        .collect();
    let mut details = json!({"name": name, "kind": bare_kind, "causes": causes});
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Invalid",
        "details": details,
        "code": 422,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).expect("pod json")
    }

    /// A pod with containers `app` and init `init`, a volume `data`, and
    /// the given ephemeral containers (defaulted like the API server does).
    fn pod_with(ecs: Value) -> Pod {
        let mut p = pod(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "containers": [{"name": "app", "image": "app:1"}],
                "initContainers": [{"name": "init", "image": "init:1"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "ephemeralContainers": ecs,
            }
        }));
        for ec in p
            .spec
            .as_mut()
            .unwrap()
            .ephemeral_containers
            .iter_mut()
            .flatten()
        {
            default_ephemeral_container(ec);
        }
        p
    }

    fn messages(errs: &[FieldError]) -> Vec<String> {
        errs.iter().map(ToString::to_string).collect()
    }

    const FORB: &str = "Forbidden: cannot be set for an Ephemeral Container";

    #[test]
    fn error_rendering_matches_apimachinery() {
        let cases: Vec<(FieldError, &str, &str)> = vec![
            (
                FieldError::required("a.b", ""),
                "FieldValueRequired",
                "a.b: Required value",
            ),
            (
                FieldError::required("a", "must be set"),
                "FieldValueRequired",
                "a: Required value: must be set",
            ),
            (
                FieldError::invalid("a", "X y", "bad"),
                "FieldValueInvalid",
                "a: Invalid value: \"X y\": bad",
            ),
            (
                FieldError::invalid("a", "q\"\n", ""),
                "FieldValueInvalid",
                "a: Invalid value: \"q\\\"\\n\"",
            ),
            (
                FieldError::not_supported("p", "Sometimes", &PULL_POLICIES),
                "FieldValueNotSupported",
                "p: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"",
            ),
            (
                FieldError::duplicate("n", "app"),
                "FieldValueDuplicate",
                "n: Duplicate value: \"app\"",
            ),
            (
                FieldError::not_found("t", "nosuch"),
                "FieldValueNotFound",
                "t: Not found: \"nosuch\"",
            ),
            (
                FieldError::forbidden("f", "no"),
                "FieldValueForbidden",
                "f: Forbidden: no",
            ),
            (
                FieldError::forbidden("[]", STATIC_POD_REFUSAL),
                "FieldValueForbidden",
                "[]: Forbidden: static pods do not support ephemeral containers",
            ),
        ];
        for (e, reason, text) in cases {
            assert_eq!(e.type_.reason(), reason, "{text}");
            assert_eq!(e.to_string(), text);
            assert_eq!(format!("{}: {}", e.field, e.body()), text);
        }
    }

    #[test]
    fn defaults_follow_the_image_tag() {
        let cases = [
            ("busybox", "Always"),
            ("busybox:latest", "Always"),
            ("busybox:1.36", "IfNotPresent"),
            ("ephemerald.local/busybox:1.35", "IfNotPresent"),
            ("localhost:5000/busybox", "Always"),
            ("localhost:5000/busybox:v1", "IfNotPresent"),
            (
                "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "IfNotPresent",
            ),
            (
                "busybox:latest@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "Always",
            ),
            ("Busybox", "IfNotPresent"),
            ("Registry.Example/busybox", "Always"),
            ("", "IfNotPresent"),
        ];
        for (image, want) in cases {
            assert_eq!(default_image_pull_policy(image), want, "{image}");
        }
        let mut ec = EphemeralContainer {
            name: "dbg".into(),
            image: Some("busybox".into()),
            ..Default::default()
        };
        default_ephemeral_container(&mut ec);
        assert_eq!(ec.image_pull_policy.as_deref(), Some("Always"));
        assert_eq!(
            ec.termination_message_path.as_deref(),
            Some("/dev/termination-log")
        );
        assert_eq!(ec.termination_message_policy.as_deref(), Some("File"));
        // Set values are kept.
        let mut ec = EphemeralContainer {
            name: "dbg".into(),
            image: Some("busybox".into()),
            image_pull_policy: Some("Never".into()),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Default::default()
        };
        default_ephemeral_container(&mut ec);
        assert_eq!(ec.image_pull_policy.as_deref(), Some("Never"));
        assert_eq!(
            ec.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
    }

    #[test]
    fn validate_table() {
        let label = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
        let long = "a".repeat(64);
        let cases: Vec<(&str, Value, Vec<String>)> = vec![
            ("kubectl's debug container is valid",
             json!([{"name": "dbg", "image": "busybox:1.36", "command": ["sh"], "resources": {},
                     "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}},
                     "targetContainerName": "app", "terminationMessagePolicy": "File",
                     "stdin": true, "tty": true, "env": [{"name": "A", "value": "b"}],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]),
             vec![]),
            ("name empty", json!([{"name": "", "image": "b"}]),
             vec!["spec.ephemeralContainers[0].name: Required value".into()]),
            ("name not a label", json!([{"name": "Dbg", "image": "b"}]),
             vec![format!("spec.ephemeralContainers[0].name: Invalid value: \"Dbg\": {label}")]),
            ("name with dots", json!([{"name": "a.b", "image": "b"}]),
             vec!["spec.ephemeralContainers[0].name: Invalid value: \"a.b\": must not contain dots".into()]),
            ("name too long", json!([{"name": long, "image": "b"}]),
             vec![format!("spec.ephemeralContainers[0].name: Invalid value: \"{long}\": must be no more than 63 characters")]),
            ("image empty", json!([{"name": "dbg"}]),
             vec!["spec.ephemeralContainers[0].image: Required value".into()]),
            ("image whitespace", json!([{"name": "dbg", "image": " busybox"}]),
             vec!["spec.ephemeralContainers[0].image: Invalid value: \" busybox\": must not have leading or trailing whitespace".into()]),
            ("termination message policy", json!([{"name": "dbg", "image": "b", "terminationMessagePolicy": "Sometimes"}]),
             vec!["spec.ephemeralContainers[0].terminationMessagePolicy: Unsupported value: \"Sometimes\": supported values: \"File\", \"FallbackToLogsOnError\"".into()]),
            ("pull policy", json!([{"name": "dbg", "image": "b", "imagePullPolicy": "Sometimes"}]),
             vec!["spec.ephemeralContainers[0].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"".into()]),
            ("collides with a container", json!([{"name": "app", "image": "b"}]),
             vec!["spec.ephemeralContainers[0].name: Duplicate value: \"app\"".into()]),
            ("collides with an init container", json!([{"name": "init", "image": "b"}]),
             vec!["spec.ephemeralContainers[0].name: Duplicate value: \"init\"".into()]),
            ("collides with an earlier ephemeral container",
             json!([{"name": "dbg", "image": "b"}, {"name": "dbg", "image": "c"}]),
             vec!["spec.ephemeralContainers[1].name: Duplicate value: \"dbg\"".into()]),
            ("unknown target", json!([{"name": "dbg", "image": "b", "targetContainerName": "nosuch"}]),
             vec!["spec.ephemeralContainers[0].targetContainerName: Not found: \"nosuch\"".into()]),
            ("target may be an init container", json!([{"name": "dbg", "image": "b", "targetContainerName": "init"}]),
             vec![]),
            ("target may not be an ephemeral container",
             json!([{"name": "dbg", "image": "b"}, {"name": "dbg2", "image": "b", "targetContainerName": "dbg"}]),
             vec!["spec.ephemeralContainers[1].targetContainerName: Not found: \"dbg\"".into()]),
            ("every forbidden field, in declaration order",
             json!([{"name": "dbg", "image": "b",
                     "lifecycle": {"preStop": {"exec": {"command": ["x"]}}},
                     "startupProbe": {"exec": {"command": ["x"]}},
                     "readinessProbe": {"exec": {"command": ["x"]}},
                     "livenessProbe": {"exec": {"command": ["x"]}},
                     "restartPolicy": "Always",
                     "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"}],
                     "resources": {"limits": {"cpu": "1"}},
                     "ports": [{"containerPort": 80}]}]),
             ["ports", "resources", "resizePolicy", "restartPolicy", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle"]
                 .iter().map(|f| format!("spec.ephemeralContainers[0].{f}: {FORB}")).collect()),
            ("empty resources are allowed, empty ports are not",
             json!([{"name": "dbg", "image": "b", "resources": {}, "ports": []}]),
             vec![format!("spec.ephemeralContainers[0].ports: {FORB}")]),
            ("empty limits are set", json!([{"name": "dbg", "image": "b", "resources": {"limits": {}}}]),
             vec![format!("spec.ephemeralContainers[0].resources: {FORB}")]),
            ("subPath and subPathExpr",
             json!([{"name": "dbg", "image": "b", "volumeMounts": [
                 {"name": "data", "mountPath": "/a", "subPath": "x"},
                 {"name": "data", "mountPath": "/b", "subPathExpr": "$(X)"}]}]),
             vec![format!("spec.ephemeralContainers[0].volumeMounts[0].subPath: {FORB}"),
                  format!("spec.ephemeralContainers[0].volumeMounts[1].subPathExpr: {FORB}")]),
            ("mount of an unknown volume", json!([{"name": "dbg", "image": "b", "volumeMounts": [{"name": "nosuch", "mountPath": "/a"}]}]),
             vec!["spec.ephemeralContainers[0].volumeMounts[0].name: Not found: \"nosuch\"".into()]),
            ("mount propagation: Bidirectional needs privileged, unknown modes are not supported",
             json!([{"name": "dbg", "image": "b", "volumeMounts": [
                 {"name": "data", "mountPath": "/a", "mountPropagation": "Bidirectional"},
                 {"name": "data", "mountPath": "/b", "mountPropagation": "Shared"}]},
                    {"name": "root", "image": "b", "securityContext": {"privileged": true}, "volumeMounts": [
                 {"name": "data", "mountPath": "/a", "mountPropagation": "Bidirectional"},
                 {"name": "data", "mountPath": "/b", "mountPropagation": "HostToContainer"}]}]),
             vec!["spec.ephemeralContainers[0].volumeMounts.mountPropagation: Forbidden: Bidirectional mount propagation is available only to privileged containers".into(),
                  "spec.ephemeralContainers[0].volumeMounts.mountPropagation: Unsupported value: \"Shared\": supported values: \"Bidirectional\", \"HostToContainer\", \"None\"".into()]),
            ("recursiveReadOnly needs readOnly and no propagation",
             json!([{"name": "dbg", "image": "b", "volumeMounts": [
                 {"name": "data", "mountPath": "/a", "recursiveReadOnly": "Enabled"},
                 {"name": "data", "mountPath": "/b", "readOnly": true, "recursiveReadOnly": "IfPossible", "mountPropagation": "HostToContainer"},
                 {"name": "data", "mountPath": "/c", "readOnly": true, "recursiveReadOnly": "Enabled"}]}]),
             vec!["spec.ephemeralContainers[0].volumeMounts.recursiveReadOnly: Forbidden: may only be specified when readOnly is true".into(),
                  "spec.ephemeralContainers[0].volumeMounts.recursiveReadOnly: Forbidden: may only be specified when mountPropagation is None or not specified".into()]),
            ("common errors come before the collision and the allow list",
             json!([{"name": "app", "image": "", "ports": [{"containerPort": 80}]}]),
             vec!["spec.ephemeralContainers[0].image: Required value".into(),
                  "spec.ephemeralContainers[0].name: Duplicate value: \"app\"".into(),
                  format!("spec.ephemeralContainers[0].ports: {FORB}")]),
        ];
        for (name, ecs, want) in cases {
            let got = messages(&validate_ephemeral_containers(&pod_with(ecs)));
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn undefaulted_spec_lacks_pull_policy_and_termination_policy() {
        let p = pod(
            json!({"spec": {"containers": [{"name": "app"}], "ephemeralContainers": [{"name": "dbg", "image": "b"}]}}),
        );
        assert_eq!(
            messages(&validate_ephemeral_containers(&p)),
            vec![
                "spec.ephemeralContainers[0].terminationMessagePolicy: Required value",
                "spec.ephemeralContainers[0].imagePullPolicy: Required value",
            ]
        );
    }

    #[test]
    fn update_table() {
        let dbg = json!({"name": "dbg", "image": "busybox:1.36"});
        let dbg2 = json!({"name": "dbg2", "image": "busybox:1.36"});
        let changed = json!({"name": "dbg", "image": "busybox:1.37"});
        let cases: Vec<(&str, Value, Value, Vec<String>)> = vec![
            ("append", json!([dbg]), json!([dbg, dbg2]), vec![]),
            ("reorder is fine", json!([dbg, dbg2]), json!([dbg2, dbg]), vec![]),
            ("unchanged", json!([dbg]), json!([dbg]), vec![]),
            ("removed", json!([dbg]), json!([dbg2]),
             vec!["spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed\n".into()]),
            ("removed all", json!([dbg, dbg2]), json!([]),
             vec!["spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed\n".into(),
                  "spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg2\" may not be removed\n".into()]),
        ];
        for (name, old, new, want) in cases {
            let got = messages(&validate_ephemeral_containers_update(
                &pod_with(new),
                &pod_with(old),
            ));
            assert_eq!(got, want, "case: {name}");
        }
        let errs = validate_ephemeral_containers_update(
            &pod_with(json!([changed])),
            &pod_with(json!([dbg])),
        );
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.ephemeralContainers");
        assert!(
            errs[0]
                .detail
                .starts_with("existing ephemeral containers \"dbg\" may not be changed\n"),
            "{}",
            errs[0].detail
        );
        assert!(
            errs[0].detail.contains("busybox:1.37"),
            "{}",
            errs[0].detail
        );
    }

    #[test]
    fn mirror_pod_gets_only_the_static_pod_error() {
        let mut old = pod_with(json!([]));
        old.metadata.annotations =
            Some([(MIRROR_POD_ANNOTATION.to_string(), "abc".to_string())].into());
        let mut new =
            pod_with(json!([{"name": "dbg", "image": "b", "ports": [{"containerPort": 1}]}]));
        new.metadata.annotations = old.metadata.annotations.clone();
        let errs = validate_ephemeral_containers_update(&new, &old);
        assert_eq!(
            messages(&errs),
            vec!["[]: Forbidden: static pods do not support ephemeral containers"]
        );
        assert_eq!(
            refusals(&new),
            BTreeMap::from([(
                "dbg".to_string(),
                "static pods do not support ephemeral containers".to_string()
            )])
        );
    }

    #[test]
    fn refusals_per_container() {
        let p = pod(json!({"spec": {
        "containers": [{"name": "app"}],
        "ephemeralContainers": [
            {"name": "ok", "image": "busybox"},
            {"name": "bad", "image": "busybox", "ports": [{"containerPort": 80}], "resources": {"limits": {"cpu": "1"}}},
            {"name": "mnt", "image": "busybox", "volumeMounts": [{"name": "v", "mountPath": "/v", "subPath": "x"}]},
        ]}}));
        let r = refusals(&p);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(
            r["bad"],
            format!(
                "spec.ephemeralContainers[1].ports: {FORB}; spec.ephemeralContainers[1].resources: {FORB}"
            )
        );
        assert_eq!(
            r["mnt"],
            format!(
                "spec.ephemeralContainers[2].volumeMounts[0].name: Not found: \"v\"; spec.ephemeralContainers[2].volumeMounts[0].subPath: {FORB}"
            )
        );
    }

    #[test]
    fn status_transitions() {
        let term = json!({"terminated": {"exitCode": 0}});
        let run = json!({"running": {}});
        let wait = json!({"waiting": {"reason": "CreateContainerError"}});
        let mk = |policy: &str, ecs: Value, cs: Value| {
            pod(
                json!({"spec": {"restartPolicy": policy, "containers": [{"name": "app"}]},
                       "status": {"ephemeralContainerStatuses": ecs, "containerStatuses": cs}}),
            )
        };
        let st = |name: &str, state: &Value| json!({"name": name, "state": state, "image": "", "imageID": "", "ready": false, "restartCount": 0});
        let cases: Vec<(&str, Pod, Pod, Vec<String>)> = vec![
            ("ephemeral terminated -> waiting",
             mk("Always", json!([st("a", &run), st("dbg", &term)]), json!([])),
             mk("Always", json!([st("a", &run), st("dbg", &wait)]), json!([])),
             vec!["status.ephemeralContainerStatuses[1].state: Forbidden: may not be transitioned to non-terminated state".into()]),
            ("ephemeral index is the old one",
             mk("Always", json!([st("dbg", &term)]), json!([])),
             mk("Always", json!([st("a", &run), st("dbg", &run)]), json!([])),
             vec!["status.ephemeralContainerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state".into()]),
            ("ephemeral running -> terminated is fine",
             mk("Always", json!([st("dbg", &run)]), json!([])),
             mk("Always", json!([st("dbg", &term)]), json!([])), vec![]),
            ("ephemeral dropped from the list is not a transition",
             mk("Always", json!([st("dbg", &term)]), json!([])),
             mk("Always", json!([]), json!([])), vec![]),
            ("container restart allowed with Always",
             mk("Always", json!([]), json!([st("app", &term)])),
             mk("Always", json!([]), json!([st("app", &run)])), vec![]),
            ("container restart refused with Never",
             mk("Never", json!([]), json!([st("app", &term)])),
             mk("Never", json!([]), json!([st("app", &run)])),
             vec!["status.containerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state".into()]),
            ("OnFailure refuses after exit 0",
             mk("OnFailure", json!([]), json!([st("app", &term)])),
             mk("OnFailure", json!([]), json!([st("app", &run)])),
             vec!["status.containerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state".into()]),
        ];
        for (name, old, new, want) in cases {
            assert_eq!(
                messages(&validate_pod_status_update(&new, &old)),
                want,
                "case: {name}"
            );
        }
        let old = pod(json!({"status": {"qosClass": "BestEffort"}}));
        let new = pod(json!({"status": {"qosClass": "Guaranteed"}}));
        assert_eq!(
            messages(&validate_pod_status_update(&new, &old)),
            vec!["status.qosClass: Invalid value: \"Guaranteed\": field is immutable"]
        );
    }

    #[test]
    fn invalid_status_shape() {
        let one = [FieldError::forbidden(
            "spec.ephemeralContainers[0].ports",
            FORBIDDEN_FOR_EPHEMERAL,
        )];
        assert_eq!(
            invalid_status("Pod", "web", &one),
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                   "message":"Pod \"web\" is invalid: spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container",
                   "reason":"Invalid",
                   "details":{"name":"web","kind":"Pod",
                              "causes":[{"reason":"FieldValueForbidden","message":"Forbidden: cannot be set for an Ephemeral Container","field":"spec.ephemeralContainers[0].ports"}]},
                   "code":422})
        );
        let two = [
            one[0].clone(),
            FieldError::forbidden(
                "spec.ephemeralContainers[0].resources",
                FORBIDDEN_FOR_EPHEMERAL,
            ),
            one[0].clone(),
        ];
        let s = invalid_status("Pod", "web", &two);
        assert_eq!(
            s["message"],
            "Pod \"web\" is invalid: [spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container, spec.ephemeralContainers[0].resources: Forbidden: cannot be set for an Ephemeral Container]"
        );
        assert_eq!(
            s["details"]["causes"].as_array().unwrap().len(),
            3,
            "causes are not de-duplicated"
        );
        assert_eq!(
            invalid_status("Pod", "web", &[])["message"],
            "Pod \"web\" is invalid"
        );
        let dup = [one[0].clone(), one[0].clone()];
        assert_eq!(
            invalid_status("Pod", "web", &dup)["message"],
            "Pod \"web\" is invalid: spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container"
        );
        let lease = invalid_status(
            "Lease.coordination.k8s.io",
            "n",
            &[FieldError::required("spec", "")],
        );
        assert_eq!(lease["details"]["group"], "coordination.k8s.io");
        assert_eq!(lease["details"]["kind"], "Lease");
        assert_eq!(
            lease["message"],
            "Lease.coordination.k8s.io \"n\" is invalid: spec: Required value"
        );
    }
}
