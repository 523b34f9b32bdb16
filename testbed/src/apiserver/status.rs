//! `Status` error bodies with kube-apiserver's codes, reasons and messages
//! (apimachinery `pkg/api/errors`). Every body carries a `details` object —
//! kubectl dereferences it unguarded — except the watch `Expired` event,
//! which has none on a real server either.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use ephemerald::validation::{FieldError, go_quote, invalid_status};

/// An API error as the server answers it: HTTP code plus `Status` body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct StatusError {
    /// HTTP status code (also `Status.code`).
    pub code: u16,
    /// `Status.reason` (`NotFound`, `Invalid`, …).
    pub reason: String,
    /// `Status.message`.
    pub message: String,
    /// The whole `Status` object.
    pub body: Value,
}

/// `resource.group` for messages (`pods`, `leases.coordination.k8s.io`).
fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

fn details(name: &str, group: &str, kind: &str) -> Value {
    let mut d = json!({});
    if !name.is_empty() {
        d["name"] = json!(name);
    }
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    if !kind.is_empty() {
        d["kind"] = json!(kind);
    }
    d
}

impl StatusError {
    fn new(code: u16, reason: &str, message: String, details: Option<Value>) -> Self {
        let mut body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        });
        if let Some(d) = details {
            body["details"] = d;
        }
        StatusError {
            code,
            reason: reason.into(),
            message,
            body,
        }
    }

    /// 404 `pods "web" not found`.
    pub fn not_found(resource: &str, group: &str, name: &str) -> Self {
        let msg = format!(
            "{} {} not found",
            qualified(resource, group),
            go_quote(name)
        );
        Self::new(404, "NotFound", msg, Some(details(name, group, resource)))
    }

    /// 404 for a path the server does not serve.
    pub fn no_such_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            Some(json!({})),
        )
    }

    /// 409 `pods "web" already exists`.
    pub fn already_exists(resource: &str, group: &str, name: &str) -> Self {
        let msg = format!(
            "{} {} already exists",
            qualified(resource, group),
            go_quote(name)
        );
        Self::new(
            409,
            "AlreadyExists",
            msg,
            Some(details(name, group, resource)),
        )
    }

    /// 409 on a stale `metadata.resourceVersion` precondition.
    pub fn conflict(resource: &str, group: &str, name: &str) -> Self {
        let msg = format!(
            "Operation cannot be fulfilled on {} {}: the object has been modified; \
             please apply your changes to the latest version and try again",
            qualified(resource, group),
            go_quote(name)
        );
        Self::new(409, "Conflict", msg, Some(details(name, group, resource)))
    }

    /// 422 `Kind "name" is invalid: …` with one cause per field error.
    pub fn invalid(kind: &str, name: &str, errs: &[FieldError]) -> Self {
        let body = invalid_status(kind, name, errs);
        let message = body["message"].as_str().unwrap_or_default().to_string();
        StatusError {
            code: 422,
            reason: "Invalid".into(),
            message,
            body,
        }
    }

    /// 422 with a plain message (a JSON patch that does not apply).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message.into(), Some(json!({})))
    }

    /// 400 `BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into(), Some(json!({})))
    }

    /// 405 `<action> is not supported on resources of kind "pods"`.
    pub fn method_not_allowed(action: &str, resource: &str) -> Self {
        let msg = format!(
            "{action} is not supported on resources of kind {}",
            go_quote(resource)
        );
        Self::new(405, "MethodNotAllowed", msg, Some(json!({})))
    }

    /// 415 for a patch or body type the server does not take.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        let msg = format!(
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, \
             application/apply-patch+yaml, application/strategic-merge-patch+json (got {})",
            go_quote(content_type)
        );
        Self::new(415, "UnsupportedMediaType", msg, Some(json!({})))
    }

    /// 410 `too old resource version: R (OLDEST)`, as the watch cache sends
    /// it inside an `ERROR` event (no details).
    pub fn expired(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
            None,
        )
    }

    /// 500 for what should not happen.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message.into(), Some(json!({})))
    }
}

impl IntoResponse for StatusError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        super::http::json_response(code, &self.body)
    }
}
