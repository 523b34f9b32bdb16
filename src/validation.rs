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
//!
//! Its parts: `containers` (the spec rules), `status` (the status
//! update rules). Must not depend on the lab; the lab's API server depends on
//! it.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, EphemeralContainer};
use serde_json::{Value, json};

/// Annotation that marks a mirror pod (the API copy of a static pod).
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The text of rule (h) and (i): a field an ephemeral container may not set.
pub const FORBIDDEN_FOR_EPHEMERAL: &str = "cannot be set for an Ephemeral Container";

mod containers;
mod status;

pub use containers::{
    refusals, validate_ephemeral_containers, validate_ephemeral_containers_update,
};
pub use status::validate_pod_status_update;

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
mod tests;
