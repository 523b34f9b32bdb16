//! API discovery: `/api`, `/apis`, `/api/v1`, the group documents and
//! `/version`, in both the plain form and the aggregated
//! (`apidiscovery.k8s.io/v2`) form that kubectl asks for first. Lists what
//! this server serves: pods (with `ephemeralcontainers` and `status`),
//! events, secrets, configmaps, persistentvolumeclaims, persistentvolumes,
//! nodes, namespaces, `coordination.k8s.io/v1` leases and `events.k8s.io/v1` events.

use serde_json::{Value, json};

/// Content-Type of an aggregated discovery document.
pub(crate) const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether the client's `Accept` takes aggregated discovery v2.
pub(crate) fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|m| {
        let params: Vec<&str> = m.split(';').map(str::trim).collect();
        params.first() == Some(&"application/json")
            && params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"v=v2")
            && params.contains(&"as=APIGroupDiscoveryList")
    })
}

const RW: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

struct Resource {
    name: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    verbs: &'static [&'static str],
    short: &'static [&'static str],
    categories: &'static [&'static str],
    subresources: &'static [&'static str],
}

struct Group {
    name: &'static str,
    version: &'static str,
    resources: &'static [Resource],
}

const CORE: Group = Group {
    name: "",
    version: "v1",
    resources: &[
        Resource {
            name: "configmaps",
            singular: "configmap",
            kind: "ConfigMap",
            namespaced: true,
            verbs: &RW,
            short: &["cm"],
            categories: &[],
            subresources: &[],
        },
        Resource {
            name: "events",
            singular: "event",
            kind: "Event",
            namespaced: true,
            verbs: &RW,
            short: &["ev"],
            categories: &[],
            subresources: &[],
        },
        Resource {
            name: "namespaces",
            singular: "namespace",
            kind: "Namespace",
            namespaced: false,
            verbs: &["get", "list"],
            short: &["ns"],
            categories: &[],
            subresources: &[],
        },
        Resource {
            name: "nodes",
            singular: "node",
            kind: "Node",
            namespaced: false,
            verbs: &RW,
            short: &["no"],
            categories: &[],
            subresources: &["status"],
        },
        Resource {
            name: "persistentvolumeclaims",
            singular: "persistentvolumeclaim",
            kind: "PersistentVolumeClaim",
            namespaced: true,
            verbs: &RW,
            short: &["pvc"],
            categories: &[],
            subresources: &[],
        },
        Resource {
            name: "persistentvolumes",
            singular: "persistentvolume",
            kind: "PersistentVolume",
            namespaced: false,
            verbs: &["create", "get", "list"],
            short: &["pv"],
            categories: &[],
            subresources: &[],
        },
        Resource {
            name: "pods",
            singular: "pod",
            kind: "Pod",
            namespaced: true,
            verbs: &RW,
            short: &["po"],
            categories: &["all"],
            subresources: &["ephemeralcontainers", "status"],
        },
        Resource {
            name: "secrets",
            singular: "secret",
            kind: "Secret",
            namespaced: true,
            verbs: &RW,
            short: &[],
            categories: &[],
            subresources: &[],
        },
    ],
};

const GROUPS: [Group; 2] = [
    Group {
        name: "coordination.k8s.io",
        version: "v1",
        resources: &[Resource {
            name: "leases",
            singular: "lease",
            kind: "Lease",
            namespaced: true,
            verbs: &RW,
            short: &[],
            categories: &[],
            subresources: &[],
        }],
    },
    Group {
        name: "events.k8s.io",
        version: "v1",
        resources: &[Resource {
            name: "events",
            singular: "event",
            kind: "Event",
            namespaced: true,
            verbs: &RW,
            short: &["ev"],
            categories: &[],
            subresources: &[],
        }],
    },
];

fn group_version(g: &Group) -> String {
    if g.name.is_empty() {
        g.version.to_string()
    } else {
        format!("{}/{}", g.name, g.version)
    }
}

/// `APIResourceList` of one group version.
fn resource_list(g: &Group) -> Value {
    let mut resources = Vec::new();
    for r in g.resources {
        let mut e = json!({
            "name": r.name, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": r.verbs,
        });
        if !r.short.is_empty() {
            e["shortNames"] = json!(r.short);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        resources.push(e);
        for s in r.subresources {
            resources.push(json!({
                "name": format!("{}/{s}", r.name), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version(g), "resources": resources})
}

/// One group of an `APIGroupDiscoveryList`.
fn aggregated_group(g: &Group) -> Value {
    let resources: Vec<Value> = g
        .resources
        .iter()
        .map(|r| {
            let kind = json!({"group": g.name, "version": g.version, "kind": r.kind});
            let mut e = json!({
                "resource": r.name, "responseKind": kind,
                "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": r.singular, "verbs": r.verbs,
            });
            if !r.short.is_empty() {
                e["shortNames"] = json!(r.short);
            }
            if !r.categories.is_empty() {
                e["categories"] = json!(r.categories);
            }
            if !r.subresources.is_empty() {
                e["subresources"] = r
                    .subresources
                    .iter()
                    .map(|s| json!({"subresource": s, "responseKind": kind, "verbs": ["get", "patch", "update"]}))
                    .collect();
            }
            e
        })
        .collect();
    let mut meta = json!({"creationTimestamp": null});
    if !g.name.is_empty() {
        meta["name"] = json!(g.name);
    }
    json!({"metadata": meta, "versions": [{"version": g.version, "resources": resources, "freshness": "Current"}]})
}

fn aggregated(groups: &[&Group]) -> Value {
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": groups.iter().map(|g| aggregated_group(g)).collect::<Vec<_>>(),
    })
}

/// `/api`: plain `APIVersions` or aggregated.
pub(crate) fn api(aggregated_form: bool, server_address: &str) -> Value {
    if aggregated_form {
        aggregated(&[&CORE])
    } else {
        json!({"kind": "APIVersions", "versions": ["v1"],
               "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]})
    }
}

fn group_doc(g: &Group) -> Value {
    let gv = json!({"groupVersion": group_version(g), "version": g.version});
    json!({"name": g.name, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `/apis`: plain `APIGroupList` or aggregated.
pub(crate) fn apis(aggregated_form: bool) -> Value {
    if aggregated_form {
        aggregated(&GROUPS.iter().collect::<Vec<_>>())
    } else {
        json!({"kind": "APIGroupList", "apiVersion": "v1",
               "groups": GROUPS.iter().map(group_doc).collect::<Vec<_>>()})
    }
}

/// `/api/v1`.
pub(crate) fn core_v1() -> Value {
    resource_list(&CORE)
}

/// `/apis/GROUP`.
pub(crate) fn group(name: &str) -> Option<Value> {
    let g = GROUPS.iter().find(|g| g.name == name)?;
    let mut doc = group_doc(g);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc)
}

/// `/apis/GROUP/VERSION`.
pub(crate) fn group_version_doc(name: &str, version: &str) -> Option<Value> {
    GROUPS
        .iter()
        .find(|g| g.name == name && g.version == version)
        .map(resource_list)
}

/// `/version`: the Kubernetes version whose rules this server follows.
pub(crate) fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0+ephemerald",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none", "compiler": "rustc", "platform": "linux/amd64",
    })
}
