//! The three patch types of kube-apiserver applied to an object's JSON:
//! JSON patch (RFC 6902, the `json-patch` crate), JSON merge patch
//! (RFC 7386) and strategic merge patch (written here, after
//! apimachinery's `strategicpatch` semantics), plus server-side apply
//! approximated as a strategic merge.
//!
//! Strategic merge: maps merge recursively, `null` deletes a key, lists
//! with a patch merge key (`containers` by `name`, `conditions` by `type`,
//! …) merge element by element and append new elements, other lists are
//! replaced, `finalizers` is a set. Directives: `$patch: replace|delete|merge`
//! on maps and list elements, `$retainKeys`, `$deleteFromPrimitiveList/<f>`,
//! `$setElementOrder/<f>` (listed elements in that order, unlisted ones
//! after them in their previous order).

use serde_json::{Map, Value};

use super::status::StatusError;

/// How a list merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStrategy {
    /// Replaced as a whole (atomic, or no merge key).
    Replace,
    /// Merged element by element on this key.
    MergeKey(&'static str),
    /// A set of primitives: union.
    MergePrimitive,
}

/// The patch strategy of a list at `path` (map keys joined by `.`, list
/// levels skipped): `metadata.finalizers`, `spec.containers.env`, …
pub type Schema = fn(&str) -> ListStrategy;

/// Lists every kind has.
pub fn meta_strategy(path: &str) -> ListStrategy {
    match path {
        "metadata.finalizers" => ListStrategy::MergePrimitive,
        "metadata.ownerReferences" => ListStrategy::MergeKey("uid"),
        _ => ListStrategy::Replace,
    }
}

/// `core/v1` Pod's patch merge keys (the `patchMergeKey` tags of the Go types).
pub fn pod_strategy(path: &str) -> ListStrategy {
    use ListStrategy::*;
    match path {
        "spec.containers" | "spec.initContainers" | "spec.ephemeralContainers" => MergeKey("name"),
        "spec.volumes"
        | "spec.imagePullSecrets"
        | "spec.resourceClaims"
        | "spec.schedulingGates" => MergeKey("name"),
        "spec.hostAliases" => MergeKey("ip"),
        "spec.topologySpreadConstraints" => MergeKey("topologyKey"),
        "status.conditions" => MergeKey("type"),
        "status.podIPs" | "status.hostIPs" => MergeKey("ip"),
        "status.resourceClaimStatuses" => MergeKey("name"),
        _ => {
            for c in [
                "spec.containers.",
                "spec.initContainers.",
                "spec.ephemeralContainers.",
            ] {
                if let Some(rest) = path.strip_prefix(c) {
                    return match rest {
                        "ports" => MergeKey("containerPort"),
                        "env" => MergeKey("name"),
                        "volumeMounts" => MergeKey("mountPath"),
                        "volumeDevices" => MergeKey("devicePath"),
                        _ => Replace,
                    };
                }
            }
            meta_strategy(path)
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn bad(msg: impl Into<String>) -> StatusError {
    StatusError::bad_request(msg)
}

/// Applies a strategic merge patch to `original`.
pub fn strategic_merge(
    original: &Value,
    patch: &Value,
    schema: Schema,
) -> Result<Value, StatusError> {
    let Some(pm) = patch.as_object() else {
        return Err(bad("strategic merge patch must be a JSON object"));
    };
    let om = original.as_object().cloned().unwrap_or_default();
    Ok(merge_map(&om, pm, "", schema)?
        .map(Value::Object)
        .unwrap_or(Value::Object(Map::new())))
}

/// Merges a patch map into `orig`; `None` means the map is deleted.
fn merge_map(
    orig: &Map<String, Value>,
    patch: &Map<String, Value>,
    path: &str,
    schema: Schema,
) -> Result<Option<Map<String, Value>>, StatusError> {
    match patch.get("$patch").map(|d| d.as_str().unwrap_or("")) {
        None | Some("merge") => {}
        Some("replace") => {
            let mut p = patch.clone();
            p.remove("$patch");
            return merge_map(&Map::new(), &p, path, schema);
        }
        Some("delete") => return Ok(None),
        Some(other) => return Err(bad(format!("unknown patch type: {other:?} in map"))),
    }
    let mut out = orig.clone();
    if let Some(retain) = patch.get("$retainKeys") {
        let keys: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| bad("$retainKeys must be a list"))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        out.retain(|k, _| keys.contains(&k.as_str()));
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let drop = v
                .as_array()
                .ok_or_else(|| bad(format!("{k} must be a list")))?;
            if let Some(Value::Array(list)) = out.get_mut(field) {
                list.retain(|x| !drop.contains(x));
            }
        }
    }
    for (k, v) in patch {
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            out.remove(k);
            continue;
        }
        match merge_value(out.get(k), v, &join(path, k), schema)? {
            Some(nv) => {
                out.insert(k.clone(), nv);
            }
            None => {
                out.remove(k);
            }
        }
    }
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            let order = v
                .as_array()
                .ok_or_else(|| bad(format!("{k} must be a list")))?;
            let strategy = schema(&join(path, field));
            if let Some(Value::Array(list)) = out.get_mut(field) {
                reorder(list, order, strategy);
            }
        }
    }
    Ok(Some(out))
}

fn merge_value(
    orig: Option<&Value>,
    patch: &Value,
    path: &str,
    schema: Schema,
) -> Result<Option<Value>, StatusError> {
    match patch {
        Value::Object(pm) => {
            let empty = Map::new();
            let om = orig.and_then(Value::as_object).unwrap_or(&empty);
            Ok(merge_map(om, pm, path, schema)?.map(Value::Object))
        }
        Value::Array(pa) => {
            let empty = Vec::new();
            let oa = orig.and_then(Value::as_array).unwrap_or(&empty);
            Ok(Some(Value::Array(merge_list(oa, pa, path, schema)?)))
        }
        other => Ok(Some(other.clone())),
    }
}

/// A patch element with only its directive: `{"$patch": "replace"}`.
fn is_directive(v: &Value, directive: &str) -> bool {
    v.get("$patch").and_then(Value::as_str) == Some(directive)
}

fn merge_list(
    orig: &[Value],
    patch: &[Value],
    path: &str,
    schema: Schema,
) -> Result<Vec<Value>, StatusError> {
    let strip = |items: &[Value]| -> Result<Vec<Value>, StatusError> {
        let mut out = Vec::new();
        for v in items {
            if let Some(x) = merge_value(None, v, path, schema)? {
                out.push(x);
            }
        }
        Ok(out)
    };
    match schema(path) {
        ListStrategy::Replace => strip(patch),
        ListStrategy::MergePrimitive => {
            let mut out = orig.to_vec();
            for v in patch {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeKey(key) => {
            if patch.iter().any(|v| is_directive(v, "replace")) {
                let rest: Vec<Value> = patch
                    .iter()
                    .filter(|v| !is_directive(v, "replace"))
                    .cloned()
                    .collect();
                return strip(&rest);
            }
            let mut out = orig.to_vec();
            for el in patch {
                let Some(em) = el.as_object() else {
                    return Err(bad(format!("{path}: list element {el} is not a map")));
                };
                let Some(kv) = em.get(key) else {
                    return Err(bad(format!(
                        "map: {el} does not contain declared merge key: {key}"
                    )));
                };
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                if is_directive(el, "delete") {
                    out.retain(|o| o.get(key) != Some(kv));
                    continue;
                }
                match pos {
                    Some(i) => {
                        let empty = Map::new();
                        let om = out[i].as_object().unwrap_or(&empty).clone();
                        match merge_map(&om, em, path, schema)? {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    None => {
                        if let Some(m) = merge_map(&Map::new(), em, path, schema)? {
                            out.push(Value::Object(m));
                        }
                    }
                }
            }
            Ok(out)
        }
    }
}

/// `$setElementOrder`: listed elements first, in the listed order (each
/// once), then the unlisted ones in their previous order.
fn reorder(list: &mut Vec<Value>, order: &[Value], strategy: ListStrategy) {
    let ident = |v: &Value| -> Value {
        match strategy {
            ListStrategy::MergeKey(k) => v.get(k).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let mut rest: Vec<Option<Value>> = std::mem::take(list).into_iter().map(Some).collect();
    let mut out = Vec::new();
    for o in order {
        let want = ident(o);
        if let Some(slot) = rest
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|v| ident(v) == want))
        {
            out.extend(slot.take());
        }
    }
    out.extend(rest.into_iter().flatten());
    *list = out;
}

/// The patch types kube-apiserver accepts, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/json-patch+json`.
    Json,
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml` (JSON bodies only; applied as a
    /// strategic merge without field ownership).
    Apply,
}

impl PatchType {
    /// From a `Content-Type` header (parameters ignored); 415 otherwise.
    pub fn from_content_type(ct: &str) -> Result<Self, StatusError> {
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchType::Apply),
            _ => Err(StatusError::unsupported_media_type(ct)),
        }
    }
}

/// Applies a patch body of `kind` to `original`.
pub fn apply(
    kind: PatchType,
    original: &Value,
    body: &[u8],
    schema: Schema,
) -> Result<Value, StatusError> {
    match kind {
        PatchType::Json => {
            let p: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| bad(format!("error decoding patch: {e}")))?;
            let mut doc = original.clone();
            json_patch::patch(&mut doc, &p)
                .map_err(|e| StatusError::unprocessable(e.to_string()))?;
            Ok(doc)
        }
        PatchType::Merge => {
            let p: Value = serde_json::from_slice(body)
                .map_err(|e| bad(format!("error decoding patch: {e}")))?;
            let mut doc = original.clone();
            json_patch::merge(&mut doc, &p);
            Ok(doc)
        }
        PatchType::Strategic | PatchType::Apply => {
            let p: Value = serde_json::from_slice(body)
                .map_err(|e| bad(format!("error decoding patch: {e}")))?;
            strategic_merge(original, &p, schema)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(orig: Value, patch: Value) -> Value {
        strategic_merge(&orig, &patch, pod_strategy).unwrap()
    }

    #[test]
    fn kubectl_debug_appends_an_ephemeral_container() {
        let pod = json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "app"}]}});
        let got = smp(
            pod,
            json!({"spec": {"ephemeralContainers": [{"name": "dbg", "image": "busybox", "resources": {}}]}}),
        );
        assert_eq!(
            got,
            json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "app"}],
                   "ephemeralContainers": [{"name": "dbg", "image": "busybox", "resources": {}}]}})
        );
    }

    #[test]
    fn set_element_order_and_merge_by_name() {
        let pod = json!({"spec": {"ephemeralContainers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        // kubectl's second debug: the order directive lists all, the list only the new one.
        let got = smp(
            pod.clone(),
            json!({"spec": {"$setElementOrder/ephemeralContainers": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                            "ephemeralContainers": [{"name": "c", "image": "z"}]}}),
        );
        assert_eq!(
            got["spec"]["ephemeralContainers"],
            json!([{"name": "a", "image": "x"}, {"name": "b", "image": "y"}, {"name": "c", "image": "z"}])
        );
        // Re-using a name merges into the existing entry; the order may list it twice.
        let got = smp(
            pod.clone(),
            json!({"spec": {"$setElementOrder/ephemeralContainers": [{"name": "b"}, {"name": "a"}, {"name": "a"}],
                            "ephemeralContainers": [{"name": "a", "command": ["sh"]}]}}),
        );
        assert_eq!(
            got["spec"]["ephemeralContainers"],
            json!([{"name": "b", "image": "y"}, {"name": "a", "image": "x", "command": ["sh"]}])
        );
        // Unlisted elements stay, after the listed ones.
        let got = smp(
            pod,
            json!({"spec": {"$setElementOrder/ephemeralContainers": [{"name": "b"}]}}),
        );
        assert_eq!(
            got["spec"]["ephemeralContainers"],
            json!([{"name": "b", "image": "y"}, {"name": "a", "image": "x"}])
        );
    }

    #[test]
    fn directives() {
        let pod = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
                         "spec": {"containers": [{"name": "app", "env": [{"name": "A", "value": "1"}], "command": ["a", "b"]}],
                                  "ephemeralContainers": [{"name": "a"}, {"name": "b"}]}});
        let cases = [
            (
                "null deletes a key",
                json!({"metadata": {"labels": {"a": null}}}),
                "/metadata/labels",
                json!({"b": "2"}),
            ),
            (
                "map replace",
                json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}}}),
                "/metadata/labels",
                json!({"c": "3"}),
            ),
            (
                "map delete",
                json!({"metadata": {"labels": {"$patch": "delete"}}}),
                "/metadata/labels",
                Value::Null,
            ),
            (
                "element delete",
                json!({"spec": {"ephemeralContainers": [{"name": "a", "$patch": "delete"}]}}),
                "/spec/ephemeralContainers",
                json!([{"name": "b"}]),
            ),
            (
                "list replace",
                json!({"spec": {"ephemeralContainers": [{"$patch": "replace"}, {"name": "c"}]}}),
                "/spec/ephemeralContainers",
                json!([{"name": "c"}]),
            ),
            (
                "primitive lists are replaced",
                json!({"spec": {"containers": [{"name": "app", "command": ["c"]}]}}),
                "/spec/containers/0/command",
                json!(["c"]),
            ),
            (
                "nested merge key",
                json!({"spec": {"containers": [{"name": "app", "env": [{"name": "B", "value": "2"}]}]}}),
                "/spec/containers/0/env",
                json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]),
            ),
            (
                "finalizers are a set",
                json!({"metadata": {"finalizers": ["x", "y"]}}),
                "/metadata/finalizers",
                json!(["x", "y"]),
            ),
            (
                "deleteFromPrimitiveList",
                json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
                "/metadata/finalizers",
                json!([]),
            ),
            (
                "retainKeys",
                json!({"metadata": {"labels": {"$retainKeys": ["b"]}}}),
                "/metadata/labels",
                json!({"b": "2"}),
            ),
        ];
        for (name, patch, pointer, want) in cases {
            let got = smp(pod.clone(), patch);
            assert_eq!(
                got.pointer(pointer).cloned().unwrap_or(Value::Null),
                want,
                "{name}"
            );
        }
        let err = strategic_merge(
            &pod,
            &json!({"spec": {"ephemeralContainers": [{"image": "x"}]}}),
            pod_strategy,
        )
        .unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .contains("does not contain declared merge key: name"),
            "{}",
            err.message
        );
    }

    #[test]
    fn status_lists() {
        let pod = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}],
                                    "ephemeralContainerStatuses": [{"name": "a"}, {"name": "b"}]}});
        let got = smp(
            pod,
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}],
                                             "ephemeralContainerStatuses": [{"name": "b"}]}}),
        );
        assert_eq!(
            got["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}])
        );
        assert_eq!(
            got["status"]["ephemeralContainerStatuses"],
            json!([{"name": "b"}]),
            "atomic list"
        );
    }

    #[test]
    fn patch_types() {
        let doc = json!({"a": {"b": 1, "c": [1, 2]}});
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchType::Merge
        );
        assert_eq!(
            PatchType::from_content_type("text/plain").unwrap_err().code,
            415
        );
        let merged = apply(
            PatchType::Merge,
            &doc,
            br#"{"a":{"b":null,"c":[3]}}"#,
            pod_strategy,
        )
        .unwrap();
        assert_eq!(merged, json!({"a": {"c": [3]}}));
        let jp = apply(
            PatchType::Json,
            &doc,
            br#"[{"op":"add","path":"/a/c/-","value":3}]"#,
            pod_strategy,
        )
        .unwrap();
        assert_eq!(jp, json!({"a": {"b": 1, "c": [1, 2, 3]}}));
        let err = apply(
            PatchType::Json,
            &doc,
            br#"[{"op":"test","path":"/a/b","value":2}]"#,
            pod_strategy,
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            apply(PatchType::Merge, &doc, b"{", pod_strategy)
                .unwrap_err()
                .code,
            400
        );
    }
}
