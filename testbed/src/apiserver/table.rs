//! Server-side printing for `kubectl get` (`Accept: …;as=Table;g=meta.k8s.io;v=v1`):
//! a `meta.k8s.io/v1` `Table` with the pod columns kube-apiserver prints
//! (NAME READY STATUS RESTARTS AGE, and IP NODE NOMINATED NODE READINESS
//! GATES for `-o wide`). The STATUS column follows the printer's main rules
//! (init progress, waiting and terminated reasons, Terminating) but not all
//! of its corner cases (sidecars, restart timestamps in RESTARTS).

use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// What a table row carries as `object` (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// Table rendering options, present when the client asked for a Table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TableOpts {
    pub include: IncludeObject,
}

/// Whether the `Accept` header asks for a Table (first choice wins; kubectl
/// lists Table first and JSON as the fallback).
pub(crate) fn table_opts(headers: &HeaderMap, include_object: Option<&str>) -> Option<TableOpts> {
    let accept = headers.get(axum::http::header::ACCEPT)?.to_str().ok()?;
    let first = accept.split(',').next()?;
    let params: Vec<&str> = first.split(';').map(str::trim).collect();
    if !params.contains(&"as=Table") {
        return None;
    }
    let include = match include_object {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    };
    Some(TableOpts { include })
}

fn columns() -> Value {
    let col = |name: &str, format: &str, desc: &str, priority: u8| json!({"name": name, "type": "string", "format": format, "description": desc, "priority": priority});
    json!([
        col(
            "Name",
            "name",
            "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
            0
        ),
        col(
            "Ready",
            "",
            "The aggregate readiness state of this pod for accepting traffic.",
            0
        ),
        col(
            "Status",
            "",
            "The aggregate status of the containers in this pod.",
            0
        ),
        col(
            "Restarts",
            "",
            "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            0
        ),
        col(
            "Age",
            "",
            "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
            0
        ),
        col(
            "IP",
            "",
            "podIP is the IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            1
        ),
        col(
            "Node",
            "",
            "nodeName indicates in which node this pod is scheduled. If empty, this pod is a candidate for scheduling by the scheduler defined in schedulerName. Once this field is set, the kubelet for this node becomes responsible for the lifecycle of this pod. This field should not be used to express a desire for the pod to be scheduled on a specific node. https://kubernetes.io/docs/concepts/scheduling-eviction/assign-pod-node/#nodename",
            1
        ),
        col(
            "Nominated Node",
            "",
            "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods. This field does not guarantee that the pod will be scheduled on this node. Scheduler may decide to place the pod elsewhere if other nodes become available sooner. Scheduler may also decide to give the resources on this node to a higher priority pod that is created after preemption. As a result, this field may be different than PodSpec.nodeName when the pod is scheduled.",
            1
        ),
        col(
            "Readiness Gates",
            "",
            "If specified, all readiness gates will be evaluated for pod readiness. A pod is ready when all its containers are ready AND all conditions specified in the readiness gates have status equal to \"True\" More info: https://git.k8s.io/enhancements/keps/sig-network/580-pod-readiness-gates",
            1
        ),
    ])
}

/// apimachinery's `duration.HumanDuration`, the AGE column.
pub(crate) fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn none_if_empty(s: Option<&String>) -> String {
    s.filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| "<none>".into())
}

/// The cells of one pod row.
fn cells(pod: &Pod) -> Value {
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let total = spec.containers.len();
    let mut reason = status
        .reason
        .clone()
        .or(status.phase.clone())
        .unwrap_or_default();
    let mut restarts = 0;
    let mut ready = 0;
    let mut initializing = false;
    let inits = status.init_container_statuses.clone().unwrap_or_default();
    let n_init = spec.init_containers.as_ref().map_or(0, Vec::len);
    for (i, c) in inits.iter().enumerate() {
        restarts += c.restart_count;
        let state = c.state.clone().unwrap_or_default();
        if let Some(t) = state.terminated.as_ref() {
            if t.exit_code == 0 {
                continue;
            }
            reason = match t.reason.as_deref().filter(|r| !r.is_empty()) {
                Some(r) => format!("Init:{r}"),
                None if t.signal.unwrap_or(0) != 0 => {
                    format!("Init:Signal:{}", t.signal.unwrap_or(0))
                }
                None => format!("Init:ExitCode:{}", t.exit_code),
            };
        } else if let Some(r) = state
            .waiting
            .as_ref()
            .and_then(|w| w.reason.clone())
            .filter(|r| !r.is_empty() && r != "PodInitializing")
        {
            reason = format!("Init:{r}");
        } else {
            reason = format!("Init:{i}/{n_init}");
        }
        initializing = true;
        break;
    }
    if !initializing {
        restarts = 0;
        let mut has_running = false;
        for c in status
            .container_statuses
            .clone()
            .unwrap_or_default()
            .iter()
            .rev()
        {
            restarts += c.restart_count;
            let state = c.state.clone().unwrap_or_default();
            if let Some(r) = state
                .waiting
                .as_ref()
                .and_then(|w| w.reason.clone())
                .filter(|r| !r.is_empty())
            {
                reason = r;
            } else if let Some(t) = state.terminated.as_ref() {
                reason = match t.reason.as_deref().filter(|r| !r.is_empty()) {
                    Some(r) => r.to_string(),
                    None if t.signal.unwrap_or(0) != 0 => {
                        format!("Signal:{}", t.signal.unwrap_or(0))
                    }
                    None => format!("ExitCode:{}", t.exit_code),
                };
            } else if state.running.is_some() && c.ready {
                has_running = true;
                ready += 1;
            }
        }
        if reason == "Completed" && has_running {
            reason = "Running".into();
        }
    }
    if pod.metadata.deletion_timestamp.is_some() {
        reason = if status.reason.as_deref() == Some("NodeLost") {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    let age = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| human_duration(Timestamp::now().as_second() - t.0.as_second()))
        .unwrap_or_else(|| "<unknown>".into());
    let gates = spec.readiness_gates.as_ref().map(|g| {
        let conds = status.conditions.clone().unwrap_or_default();
        let ok = g
            .iter()
            .filter(|gate| {
                conds
                    .iter()
                    .any(|c| c.type_ == gate.condition_type && c.status == "True")
            })
            .count();
        format!("{ok}/{}", g.len())
    });
    json!([
        pod.metadata.name.clone().unwrap_or_default(),
        format!("{ready}/{total}"),
        reason,
        restarts.to_string(),
        age,
        none_if_empty(status.pod_ip.as_ref()),
        none_if_empty(spec.node_name.as_ref()),
        none_if_empty(status.nominated_node_name.as_ref()),
        gates.unwrap_or_else(|| "<none>".into()),
    ])
}

fn row(pod: &Pod, opts: TableOpts) -> Value {
    let object = match opts.include {
        IncludeObject::None => Value::Null,
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": serde_json::to_value(&pod.metadata).unwrap_or(Value::Null),
        }),
        IncludeObject::Object => serde_json::to_value(pod).unwrap_or(Value::Null),
    };
    let mut r = json!({"cells": cells(pod)});
    if !object.is_null() {
        r["object"] = object;
    }
    r
}

/// A Table of `pods`; `headers` false leaves out the column definitions
/// (watch events after the first, like the real server).
pub(crate) fn pod_table<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    resource_version: &str,
    cont: Option<&str>,
    headers: bool,
    opts: TableOpts,
) -> Value {
    let mut meta = json!({"resourceVersion": resource_version});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "rows": pods.into_iter().map(|p| row(p, opts)).collect::<Vec<_>>(),
    });
    if headers {
        t["columnDefinitions"] = columns();
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        let cases = [
            (-5, "<invalid>"),
            (0, "0s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 120, "3h2m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 3600, "3d1h"),
            (30 * 86400, "30d"),
            (3 * 365 * 86400 + 86400, "3y1d"),
            (10 * 365 * 86400, "10y"),
        ];
        for (s, want) in cases {
            assert_eq!(human_duration(s), want, "{s}");
        }
    }

    #[test]
    fn status_column() {
        let pod = |status: Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "web"},
                "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "init"}]},
                "status": status}))
            .unwrap()
        };
        let cases = [
            (json!({"phase": "Pending"}), "Pending", "0/1"),
            (
                json!({"phase": "Pending", "initContainerStatuses": [{"name": "init", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"running": {}}}]}),
                "Init:0/1",
                "0/1",
            ),
            (
                json!({"phase": "Running",
                "initContainerStatuses": [{"name": "init", "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}],
                "containerStatuses": [{"name": "app", "image": "", "imageID": "", "ready": true, "restartCount": 2, "state": {"running": {}}}]}),
                "Running",
                "1/1",
            ),
            (
                json!({"phase": "Pending",
                "initContainerStatuses": [{"name": "init", "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}],
                "containerStatuses": [{"name": "app", "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull"}}}]}),
                "ErrImagePull",
                "0/1",
            ),
        ];
        for (status, want, ready) in cases {
            let c = cells(&pod(status));
            assert_eq!(
                (c[2].as_str().unwrap(), c[1].as_str().unwrap()),
                (want, ready)
            );
        }
    }
}
