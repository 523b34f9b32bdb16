//! Field and label selectors as list and watch take them
//! (`fieldSelector=spec.nodeName=node1`, `labelSelector=app=web,tier!=db`).
//! Field selectors support `=`, `==` and `!=` on the fields kube-apiserver
//! indexes for each kind; label selectors support the whole grammar
//! (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use super::status::StatusError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum FieldOp {
    Eq,
    NotEq,
}

/// A parsed `fieldSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, FieldOp, String)>,
}

impl FieldSelector {
    /// Parses `a=b,c!=d`; `supported` lists the field labels of the kind
    /// (others are refused with kube-apiserver's 400).
    pub fn parse(s: &str, supported: &[&str]) -> Result<Self, StatusError> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, op, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, FieldOp::NotEq, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, FieldOp::Eq, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, FieldOp::Eq, v)
            } else {
                return Err(StatusError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                )));
            };
            let key = key.trim();
            if !supported.contains(&key) {
                return Err(StatusError::bad_request(format!(
                    "field label not supported: {key}"
                )));
            }
            terms.push((key.to_string(), op, value.trim().to_string()));
        }
        Ok(FieldSelector { terms })
    }

    /// Whether the object's fields (as given by `get`) match every term.
    pub fn matches(&self, get: impl Fn(&str) -> String) -> bool {
        self.terms.iter().all(|(k, op, v)| {
            let actual = get(k);
            match op {
                FieldOp::Eq => actual == *v,
                FieldOp::NotEq => actual != *v,
            }
        })
    }
}

/// Field labels of pods (`pkg/registry/core/pod/strategy.go` `PodToSelectableFields`).
pub const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

/// Field labels of core Events.
pub const EVENT_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// Field labels every kind has.
pub const META_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];

/// The value of a pod field label (empty when unset).
pub fn pod_field(pod: &Pod, field: &str) -> String {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let s = |o: Option<&String>| o.cloned().unwrap_or_default();
    match field {
        "metadata.name" => s(pod.metadata.name.as_ref()),
        "metadata.namespace" => s(pod.metadata.namespace.as_ref()),
        "spec.nodeName" => s(spec.and_then(|x| x.node_name.as_ref())),
        "spec.restartPolicy" => s(spec.and_then(|x| x.restart_policy.as_ref())),
        "spec.schedulerName" => s(spec.and_then(|x| x.scheduler_name.as_ref())),
        "spec.serviceAccountName" => s(spec.and_then(|x| x.service_account_name.as_ref())),
        "spec.hostNetwork" => spec
            .and_then(|x| x.host_network)
            .unwrap_or(false)
            .to_string(),
        "status.phase" => s(status.and_then(|x| x.phase.as_ref())),
        "status.podIP" => s(status.and_then(|x| x.pod_ip.as_ref())),
        "status.nominatedNodeName" => s(status.and_then(|x| x.nominated_node_name.as_ref())),
        _ => String::new(),
    }
}

/// The value of a field label of a JSON object (`a.b` walks maps; the
/// Event label `source` is `source.component`).
pub fn json_field(obj: &Value, field: &str) -> String {
    let path = if field == "source" {
        "source.component"
    } else {
        field
    };
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<(String, LabelOp)>,
}

/// Splits on commas that are not inside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

impl LabelSelector {
    /// Parses the label selector grammar.
    pub fn parse(s: &str) -> Result<Self, StatusError> {
        let bad = |t: &str| {
            StatusError::bad_request(format!(
                "unable to parse requirement: invalid label selector term {t:?}"
            ))
        };
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let req = if let Some(k) = term.strip_prefix('!') {
                (k.trim().to_string(), LabelOp::DoesNotExist)
            } else if let Some((k, v)) = term.split_once(" notin ") {
                (
                    k.trim().to_string(),
                    LabelOp::NotIn(set_values(v).ok_or_else(|| bad(term))?),
                )
            } else if let Some((k, v)) = term.split_once(" in ") {
                (
                    k.trim().to_string(),
                    LabelOp::In(set_values(v).ok_or_else(|| bad(term))?),
                )
            } else if let Some((k, v)) = term.split_once("!=") {
                (
                    k.trim().to_string(),
                    LabelOp::NotIn(vec![v.trim().to_string()]),
                )
            } else if let Some((k, v)) = term.split_once("==") {
                (
                    k.trim().to_string(),
                    LabelOp::In(vec![v.trim().to_string()]),
                )
            } else if let Some((k, v)) = term.split_once('=') {
                (
                    k.trim().to_string(),
                    LabelOp::In(vec![v.trim().to_string()]),
                )
            } else {
                (term.to_string(), LabelOp::Exists)
            };
            if req.0.is_empty() || req.0.contains([' ', '(', ')']) {
                return Err(bad(term));
            }
            reqs.push(req);
        }
        Ok(LabelSelector { reqs })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.reqs.iter().all(|(k, op)| {
            let v = labels.and_then(|l| l.get(k));
            match op {
                LabelOp::In(vals) => v.is_some_and(|v| vals.contains(v)),
                LabelOp::NotIn(vals) => v.is_none_or(|v| !vals.contains(v)),
                LabelOp::Exists => v.is_some(),
                LabelOp::DoesNotExist => v.is_none(),
            }
        })
    }
}

/// A label map from a JSON object's `metadata.labels`.
pub fn json_labels(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn field_selectors() {
        let p = pod(json!({"metadata": {"name": "web", "namespace": "default"},
                           "spec": {"nodeName": "node1", "containers": []},
                           "status": {"phase": "Running"}}));
        let unbound = pod(json!({"metadata": {"name": "other"}, "spec": {"containers": []}}));
        let cases = [
            ("spec.nodeName=node1", true, false),
            ("spec.nodeName==node1", true, false),
            ("spec.nodeName!=node1", false, true),
            ("spec.nodeName=", false, true),
            ("metadata.name=web,spec.nodeName=node1", true, false),
            ("metadata.name=web,status.phase=Pending", false, false),
            ("spec.hostNetwork=false", true, true),
            ("", true, true),
        ];
        for (sel, want_p, want_unbound) in cases {
            let s = FieldSelector::parse(sel, POD_FIELDS).unwrap();
            assert_eq!(s.matches(|f| pod_field(&p, f)), want_p, "{sel}");
            assert_eq!(s.matches(|f| pod_field(&unbound, f)), want_unbound, "{sel}");
        }
        let err = FieldSelector::parse("spec.foo=bar", POD_FIELDS).unwrap_err();
        assert_eq!(
            (err.code, err.message.as_str()),
            (400, "field label not supported: spec.foo")
        );
    }

    #[test]
    fn label_selectors() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "front".to_string()),
        ]
        .into();
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app=db", false),
            ("app", true),
            ("!app", false),
            ("missing", false),
            ("!missing", true),
            ("missing!=x", true),
            ("app in (web, db)", true),
            ("app notin (web,db)", false),
            ("tier in (back)", false),
            ("app=web,tier in (front,back)", true),
            ("", true),
        ];
        for (sel, want) in cases {
            let s = LabelSelector::parse(sel).unwrap();
            assert_eq!(s.matches(Some(&labels)), want, "{sel}");
        }
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("!app").unwrap().matches(None));
    }

    #[test]
    fn json_fields() {
        let ev = json!({"involvedObject": {"name": "web", "kind": "Pod"}, "source": {"component": "kubelet"}, "reason": "Started"});
        assert_eq!(json_field(&ev, "involvedObject.name"), "web");
        assert_eq!(json_field(&ev, "source"), "kubelet");
        assert_eq!(json_field(&ev, "type"), "");
    }
}
