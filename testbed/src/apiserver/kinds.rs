//! Registry rules of the kinds other than Pod that differ from the generic
//! "store the JSON" path: which part of a Node each endpoint takes, and the
//! field labels a Node can be selected by.
//!
//! From kube-apiserver's `pkg/registry/core/node/strategy.go`: a Node may
//! be created with its status (the kubelet registers the node with its
//! conditions, `nodeInfo` and `daemonEndpoints` already filled); a write
//! to `nodes/NAME` keeps the stored status, a write to `nodes/NAME/status`
//! keeps the stored spec. Field labels: the object meta ones plus
//! `spec.unschedulable` (`NodeToSelectableFields`).

use serde_json::Value;

use super::select::json_field;
use super::store::Kind;

/// Which endpoint a write of another kind came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ObjectSub {
    /// `…/NAME`.
    Main,
    /// `…/NAME/status` (served for Nodes only).
    Status,
}

/// Field labels of Nodes.
pub(crate) const NODE_FIELDS: &[&str] =
    &["metadata.name", "metadata.namespace", "spec.unschedulable"];

/// Whether `kind` serves a `status` subresource here.
pub(crate) fn has_status(kind: Kind) -> bool {
    kind == Kind::Node
}

/// The object a write through `sub` stores, before identity metadata is
/// restored: what the endpoint may not change is taken from `old`.
pub(crate) fn prepare_update(kind: Kind, sub: ObjectSub, old: &Value, mut new: Value) -> Value {
    if kind != Kind::Node {
        return new;
    }
    let keep = match sub {
        ObjectSub::Main => "status",
        ObjectSub::Status => "spec",
    };
    match old.get(keep) {
        Some(v) => new[keep] = v.clone(),
        None => {
            if let Some(m) = new.as_object_mut() {
                m.remove(keep);
            }
        }
    }
    if sub == ObjectSub::Status {
        // The status endpoint takes status only; metadata stays as stored
        // (identity fields are restored by the caller anyway).
        new["metadata"] = old["metadata"].clone();
    }
    new
}

/// The value of field label `field` of an object of `kind` (a Node's
/// `spec.unschedulable` reads `false` when unset, as Go prints the zero
/// bool).
pub(crate) fn field(kind: Kind, obj: &Value, field: &str) -> String {
    if kind == Kind::Node && field == "spec.unschedulable" {
        return obj["spec"]["unschedulable"]
            .as_bool()
            .unwrap_or(false)
            .to_string();
    }
    json_field(obj, field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_endpoints_take_their_own_part() {
        let old = json!({"metadata": {"name": "n", "labels": {"a": "1"}},
                         "spec": {"podCIDR": "10.0.0.0/24"},
                         "status": {"nodeInfo": {"kubeletVersion": "v1.36.0"}}});
        let new = json!({"metadata": {"name": "n", "labels": {"a": "2"}},
                         "spec": {"unschedulable": true},
                         "status": {"nodeInfo": {"kubeletVersion": "v9"}}});
        let main = prepare_update(Kind::Node, ObjectSub::Main, &old, new.clone());
        assert_eq!(main["spec"], json!({"unschedulable": true}));
        assert_eq!(main["status"], old["status"], "status kept on a main write");
        assert_eq!(main["metadata"]["labels"]["a"], "2");
        let status = prepare_update(Kind::Node, ObjectSub::Status, &old, new.clone());
        assert_eq!(status["spec"], old["spec"], "spec kept on a status write");
        assert_eq!(status["status"], new["status"]);
        assert_eq!(status["metadata"]["labels"]["a"], "1");
        let lease = prepare_update(Kind::Lease, ObjectSub::Main, &old, new.clone());
        assert_eq!(lease, new, "other kinds store what was sent");
    }

    #[test]
    fn node_field_labels() {
        let n = json!({"metadata": {"name": "n"}, "spec": {}});
        assert_eq!(field(Kind::Node, &n, "spec.unschedulable"), "false");
        assert_eq!(field(Kind::Node, &n, "metadata.name"), "n");
        let cordoned = json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}});
        assert_eq!(field(Kind::Node, &cordoned, "spec.unschedulable"), "true");
    }
}
