//! The HTTP surface: routes, query parameters, bodies and content types,
//! mapped onto the store with kube-apiserver's request semantics. Answers
//! are always JSON (a protobuf `Accept` is answered with JSON, which
//! client-go accepts), errors are always `Status` objects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::discovery;
use super::kinds::{self, ObjectSub};
use super::object_watch;
use super::patch::{self, PatchType, meta_strategy, pod_strategy};
use super::select::{
    EVENT_FIELDS, FieldSelector, LabelSelector, META_FIELDS, POD_FIELDS, json_labels, pod_field,
};
use super::status::StatusError;
use super::store::{CreateMode, Kind, Store, Subresource};
use super::table::{pod_table, table_opts};
use super::watch::{self, PodWatch, Start};
use ephemerald::validation::FieldError;

/// Per-serving state of the router.
#[derive(Clone)]
pub(crate) struct App {
    pub store: Arc<Store>,
    /// Cancelled when this serving ends (restart, shutdown): open watches abort.
    pub kill: CancellationToken,
    /// `host:port`, for `/api`'s `serverAddressByClientCIDRs`.
    pub address: String,
}

type Params = Query<HashMap<String, String>>;
type ApiResult = Result<Response, StatusError>;

/// A JSON response with `Content-Type: application/json`.
pub(crate) fn json_response(code: StatusCode, body: &impl Serialize) -> Response {
    json_with_type(code, body, "application/json")
}

fn json_with_type(code: StatusCode, body: &impl Serialize, content_type: &'static str) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn ok(body: &impl Serialize) -> ApiResult {
    Ok(json_response(StatusCode::OK, body))
}

fn param<'a>(q: &'a HashMap<String, String>, k: &str) -> &'a str {
    q.get(k).map_or("", String::as_str)
}

fn is_true(q: &HashMap<String, String>, k: &str) -> bool {
    matches!(param(q, k), "true" | "1")
}

/// The request body as JSON; bodies in other encodings are refused.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, StatusError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let base = ct.split(';').next().unwrap_or("").trim();
    if !(base == "application/json"
        || base == "application/yaml"
        || base.is_empty()
        || base == "*/*")
    {
        return Err(StatusError::unsupported_media_type(ct));
    }
    serde_json::from_slice(body)
        .map_err(|e| StatusError::bad_request(format!("the object provided is unrecognized: {e}")))
}

fn patch_type(headers: &HeaderMap, q: &HashMap<String, String>) -> Result<PatchType, StatusError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let pt = PatchType::from_content_type(ct)?;
    if pt == PatchType::Apply && param(q, "fieldManager").is_empty() {
        return Err(StatusError::invalid(
            "PatchOptions.meta.k8s.io",
            "",
            &[FieldError::required(
                "fieldManager",
                "is required for apply patch",
            )],
        ));
    }
    Ok(pt)
}

/// `ValidateListOptions` for the parameters this server reads.
fn validate_list_options(q: &HashMap<String, String>, watch: bool) -> Result<(), StatusError> {
    let mut errs = Vec::new();
    let rvm = param(q, "resourceVersionMatch");
    let rv = param(q, "resourceVersion");
    let send_initial = q.get("sendInitialEvents");
    if watch {
        if send_initial.is_some_and(|v| v == "true") {
            if rvm != "NotOlderThan" {
                errs.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            if !is_true(q, "allowWatchBookmarks") {
                errs.push(FieldError::required(
                    "allowWatchBookmarks",
                    "sendInitialEvents requires setting allowWatchBookmarks=true",
                ));
            }
        } else if !rvm.is_empty() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
    } else {
        if send_initial.is_some() {
            errs.push(FieldError::forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for list",
            ));
        }
        if !rvm.is_empty() {
            if rv.is_empty() {
                errs.push(FieldError::forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            } else if !["Exact", "NotOlderThan"].contains(&rvm) {
                errs.push(FieldError::not_supported(
                    "resourceVersionMatch",
                    rvm,
                    &["Exact", "NotOlderThan"],
                ));
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(StatusError::invalid("ListOptions.meta.k8s.io", "", &errs))
    }
}

fn parse_rv(rv: &str) -> Result<u64, StatusError> {
    rv.parse()
        .map_err(|_| StatusError::bad_request(format!("invalid resource version: {rv:?}")))
}

/// `limit`/`continue` paging over items sorted by (namespace, name). The
/// token carries the first page's resourceVersion and the last key.
struct Page {
    start_after: Option<(String, String)>,
    list_rv: Option<u64>,
    limit: Option<usize>,
}

impl Page {
    fn parse(q: &HashMap<String, String>) -> Result<Page, StatusError> {
        let limit = param(q, "limit").parse::<usize>().ok().filter(|l| *l > 0);
        let tok = param(q, "continue");
        if tok.is_empty() {
            return Ok(Page {
                start_after: None,
                list_rv: None,
                limit,
            });
        }
        let bad = || {
            StatusError::bad_request(
                "continue key is not valid: incorrect encoded start resourceVersion",
            )
        };
        let mut parts = tok.splitn(3, '/');
        let rv = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
        let ns = parts.next().ok_or_else(bad)?.to_string();
        let name = parts.next().ok_or_else(bad)?.to_string();
        Ok(Page {
            start_after: Some((ns, name)),
            list_rv: Some(rv),
            limit,
        })
    }

    /// Cuts `items` (sorted by key); returns the page, the continue token
    /// and the remaining count.
    fn apply<T>(
        &self,
        items: Vec<T>,
        key: impl Fn(&T) -> (String, String),
        rv: u64,
    ) -> (Vec<T>, u64, Option<String>, usize) {
        let list_rv = self.list_rv.unwrap_or(rv);
        let mut items: Vec<T> = match &self.start_after {
            Some(after) => items.into_iter().filter(|i| key(i) > *after).collect(),
            None => items,
        };
        match self.limit {
            Some(l) if items.len() > l => {
                let remaining = items.len() - l;
                items.truncate(l);
                let (ns, name) = items.last().map(&key).unwrap_or_default();
                (
                    items,
                    list_rv,
                    Some(format!("{list_rv}/{ns}/{name}")),
                    remaining,
                )
            }
            _ => (items, list_rv, None, 0),
        }
    }
}

fn list_meta(rv: u64, cont: &Option<String>, remaining: usize) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
        meta["remainingItemCount"] = json!(remaining);
    }
    meta
}

// -- routes ----------------------------------------------------------------

pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route("/api", get(api))
        .route("/apis", get(apis))
        .route("/api/v1", get(|| async { ok(&discovery::core_v1()) }))
        .route("/version", get(|| async { ok(&discovery::version()) }))
        .route("/apis/{group}", get(api_group))
        .route("/apis/{group}/{version}", get(api_group_version))
        .route("/api/v1/pods", get(all_pods))
        .route("/api/v1/namespaces", get(namespaces))
        .route("/api/v1/namespaces/{ns}", get(namespace))
        .route(
            "/api/v1/namespaces/{ns}/pods",
            get(ns_pods).post(create_pod),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}",
            get(get_pod)
                .put(put_pod)
                .patch(patch_pod)
                .delete(delete_pod),
        )
        .route(
            "/api/v1/namespaces/{ns}/pods/{name}/{sub}",
            get(get_pod_sub).put(put_pod_sub).patch(patch_pod_sub),
        )
        .route("/api/v1/{resource}", get(core_all).post(cluster_create))
        .route(
            "/api/v1/{resource}/{name}",
            get(cluster_get)
                .put(cluster_put)
                .patch(cluster_patch)
                .delete(cluster_delete),
        )
        .route(
            "/api/v1/{resource}/{name}/{sub}",
            get(cluster_sub_get)
                .put(cluster_sub_put)
                .patch(cluster_sub_patch),
        )
        .route(
            "/api/v1/namespaces/{ns}/{resource}",
            get(core_list).post(core_create),
        )
        .route(
            "/api/v1/namespaces/{ns}/{resource}/{name}",
            get(core_get)
                .put(core_put)
                .patch(core_patch)
                .delete(core_delete),
        )
        .route("/apis/{group}/{version}/{resource}", get(group_all))
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{resource}",
            get(group_list).post(group_create),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{resource}/{name}",
            get(group_get)
                .put(group_put)
                .patch(group_patch)
                .delete(group_delete),
        )
        .fallback(|| async { StatusError::no_such_path() })
        .method_not_allowed_fallback(|| async {
            StatusError::method_not_allowed("this method", "the requested resource")
        })
        .layer(middleware::from_fn_with_state(app.clone(), log_request))
        .with_state(app)
}

async fn log_request(State(app): State<App>, req: Request, next: Next) -> Response {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |pq| pq.to_string());
    tracing::debug!(method = %req.method(), %target, "local apiserver request");
    app.store.log_request(format!("{} {target}", req.method()));
    next.run(req).await
}

// -- discovery -------------------------------------------------------------

fn accept(headers: &HeaderMap) -> &str {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn api(State(app): State<App>, headers: HeaderMap) -> Response {
    if discovery::wants_aggregated(accept(&headers)) {
        json_with_type(
            StatusCode::OK,
            &discovery::api(true, &app.address),
            discovery::AGGREGATED_CONTENT_TYPE,
        )
    } else {
        json_response(StatusCode::OK, &discovery::api(false, &app.address))
    }
}

async fn apis(headers: HeaderMap) -> Response {
    if discovery::wants_aggregated(accept(&headers)) {
        json_with_type(
            StatusCode::OK,
            &discovery::apis(true),
            discovery::AGGREGATED_CONTENT_TYPE,
        )
    } else {
        json_response(StatusCode::OK, &discovery::apis(false))
    }
}

async fn api_group(Path(group): Path<String>) -> ApiResult {
    discovery::group(&group).map_or_else(|| Err(StatusError::no_such_path()), |d| ok(&d))
}

async fn api_group_version(Path((group, version)): Path<(String, String)>) -> ApiResult {
    discovery::group_version_doc(&group, &version)
        .map_or_else(|| Err(StatusError::no_such_path()), |d| ok(&d))
}

fn namespace_object(name: &str) -> Value {
    json!({"kind": "Namespace", "apiVersion": "v1",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

async fn namespaces(State(app): State<App>) -> ApiResult {
    let (names, rv) = app.store.namespaces();
    let items: Vec<Value> = names.iter().map(|n| namespace_object(n)).collect();
    ok(
        &json!({"kind": "NamespaceList", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

/// Namespaces are implicit: every name exists and is Active.
async fn namespace(Path(ns): Path<String>) -> ApiResult {
    ok(&namespace_object(&ns))
}

// -- pods ------------------------------------------------------------------

async fn all_pods(State(app): State<App>, Query(q): Params, headers: HeaderMap) -> ApiResult {
    pods_collection(&app, None, &q, &headers)
}

async fn ns_pods(
    State(app): State<App>,
    Path(ns): Path<String>,
    Query(q): Params,
    headers: HeaderMap,
) -> ApiResult {
    pods_collection(&app, Some(ns), &q, &headers)
}

fn pods_collection(
    app: &App,
    ns: Option<String>,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
) -> ApiResult {
    let fields = FieldSelector::parse(param(q, "fieldSelector"), POD_FIELDS)?;
    let labels = LabelSelector::parse(param(q, "labelSelector"))?;
    let table = table_opts(headers, q.get("includeObject").map(String::as_str));
    let watch = is_true(q, "watch");
    validate_list_options(q, watch)?;
    if watch {
        let send_initial = is_true(q, "sendInitialEvents");
        let start = match param(q, "resourceVersion") {
            _ if send_initial => Start::Snapshot,
            "" | "0" => Start::Snapshot,
            rv => Start::After(parse_rv(rv)?),
        };
        let timeout = param(q, "timeoutSeconds")
            .parse::<u64>()
            .ok()
            .filter(|t| *t > 0)
            .map(Duration::from_secs);
        let w = PodWatch {
            namespace: ns,
            fields,
            labels,
            start,
            bookmarks: is_true(q, "allowWatchBookmarks"),
            initial_events_end: send_initial,
            timeout,
            table,
        };
        let mut r = Response::new(watch::start(app.store.clone(), app.kill.clone(), w));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        return Ok(r);
    }
    let page = Page::parse(q)?;
    let (items, rv) = app.store.list_pods(ns.as_deref(), |p| {
        fields.matches(|f| pod_field(p, f)) && labels.matches(p.metadata.labels.as_ref())
    });
    let key = |p: &Arc<Pod>| {
        (
            p.metadata.namespace.clone().unwrap_or_default(),
            p.metadata.name.clone().unwrap_or_default(),
        )
    };
    let (items, list_rv, cont, remaining) = page.apply(items, key, rv);
    if let Some(opts) = table {
        return ok(&pod_table(
            items.iter().map(|p| &**p),
            &list_rv.to_string(),
            cont.as_deref(),
            true,
            opts,
        ));
    }
    let items: Vec<Value> = items
        .iter()
        .map(|p| serde_json::to_value(&**p).unwrap_or(Value::Null))
        .collect();
    ok(
        &json!({"kind": "PodList", "apiVersion": "v1", "metadata": list_meta(list_rv, &cont, remaining), "items": items}),
    )
}

async fn create_pod(
    State(app): State<App>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let pod: Pod = json_body(&headers, &body)?;
    let created = app.store.create_pod(&ns, pod, CreateMode::Post)?;
    Ok(json_response(StatusCode::CREATED, &created))
}

fn pod_response(pod: &Pod, headers: &HeaderMap, q: &HashMap<String, String>) -> ApiResult {
    match table_opts(headers, q.get("includeObject").map(String::as_str)) {
        Some(opts) => ok(&pod_table(
            [pod],
            pod.metadata.resource_version.as_deref().unwrap_or(""),
            None,
            true,
            opts,
        )),
        None => ok(pod),
    }
}

async fn get_pod(
    State(app): State<App>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Params,
    headers: HeaderMap,
) -> ApiResult {
    pod_response(&app.store.get_pod(&ns, &name)?, &headers, &q)
}

async fn delete_pod(State(app): State<App>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    ok(&app.store.delete_pod(&ns, &name)?)
}

fn put(
    app: &App,
    ns: &str,
    name: &str,
    sub: Subresource,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    let pod: Pod = json_body(headers, body)?;
    ok(&app.store.update_pod(ns, name, sub, |_| Ok(pod))?)
}

fn patch_pod_json(
    app: &App,
    ns: &str,
    name: &str,
    sub: Subresource,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    let pt = patch_type(headers, q)?;
    let updated = app.store.update_pod(ns, name, sub, |old| {
        let current =
            serde_json::to_value(old).map_err(|e| StatusError::internal(e.to_string()))?;
        let patched = patch::apply(pt, &current, body, pod_strategy)?;
        serde_json::from_value(patched).map_err(|e| {
            StatusError::bad_request(format!("the patched object is not a valid Pod: {e}"))
        })
    })?;
    ok(&updated)
}

async fn put_pod(
    State(app): State<App>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    put(&app, &ns, &name, Subresource::Main, &headers, &body)
}

async fn patch_pod(
    State(app): State<App>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    patch_pod_json(&app, &ns, &name, Subresource::Main, &q, &headers, &body)
}

fn subresource(sub: &str) -> Result<Subresource, StatusError> {
    match sub {
        "ephemeralcontainers" => Ok(Subresource::Ephemeral),
        "status" => Ok(Subresource::Status),
        _ => Err(StatusError::no_such_path()),
    }
}

async fn get_pod_sub(
    State(app): State<App>,
    Path((ns, name, sub)): Path<(String, String, String)>,
    Query(q): Params,
    headers: HeaderMap,
) -> ApiResult {
    subresource(&sub)?;
    pod_response(&app.store.get_pod(&ns, &name)?, &headers, &q)
}

async fn put_pod_sub(
    State(app): State<App>,
    Path((ns, name, sub)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    put(&app, &ns, &name, subresource(&sub)?, &headers, &body)
}

async fn patch_pod_sub(
    State(app): State<App>,
    Path((ns, name, sub)): Path<(String, String, String)>,
    Query(q): Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    patch_pod_json(&app, &ns, &name, subresource(&sub)?, &q, &headers, &body)
}

// -- other kinds -------------------------------------------------------------

/// How an object is shown: `core/v1` form, or events.k8s.io/v1's view of a
/// core Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Core,
    EventsV1,
}

/// core/v1 Event field ↔ events.k8s.io/v1 Event field.
const EVENT_RENAMES: [(&str, &str); 7] = [
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename(mut obj: Value, to_v1: bool) -> Value {
    if let Some(m) = obj.as_object_mut() {
        for (core, v1) in EVENT_RENAMES {
            let (from, to) = if to_v1 { (core, v1) } else { (v1, core) };
            if let Some(v) = m.remove(from) {
                m.insert(to.to_string(), v);
            }
        }
    }
    obj
}

impl View {
    fn api_version(self, kind: Kind) -> &'static str {
        match self {
            View::Core => kind.api_version(),
            View::EventsV1 => "events.k8s.io/v1",
        }
    }

    fn show(self, obj: Value) -> Value {
        match self {
            View::Core => obj,
            View::EventsV1 => {
                let mut o = rename(obj, true);
                o["apiVersion"] = json!("events.k8s.io/v1");
                o
            }
        }
    }

    fn store_form(self, obj: Value) -> Value {
        match self {
            View::Core => obj,
            View::EventsV1 => rename(obj, false),
        }
    }

    /// A field selector label of this view in core terms.
    fn core_field(self, f: &str) -> String {
        if self == View::Core {
            return f.to_string();
        }
        for (core, v1) in EVENT_RENAMES {
            if f == v1 {
                return core.to_string();
            }
            if let Some(rest) = f.strip_prefix(&format!("{v1}.")) {
                return format!("{core}.{rest}");
            }
        }
        f.to_string()
    }
}

/// A collection by its URL parts.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    group: &'a str,
    version: &'a str,
    resource: &'a str,
}

impl<'a> Target<'a> {
    fn core(resource: &'a str) -> Self {
        Target {
            group: "",
            version: "v1",
            resource,
        }
    }

    /// The stored kind and the view this URL shows it in.
    fn resolve(self) -> Result<(Kind, View), StatusError> {
        resolve(self.group, self.version, self.resource)
    }

    /// [`Target::resolve`] for an object path: namespaced kinds are served
    /// under a namespace (`ns` non-empty), cluster-scoped ones outside.
    fn resolve_in(self, ns: &str) -> Result<(Kind, View), StatusError> {
        let (kind, view) = self.resolve()?;
        if kind.namespaced() == ns.is_empty() {
            return Err(StatusError::no_such_path());
        }
        Ok((kind, view))
    }
}

fn resolve(group: &str, version: &str, resource: &str) -> Result<(Kind, View), StatusError> {
    match (group, version, resource) {
        ("", "v1", "events") => Ok((Kind::Event, View::Core)),
        ("", "v1", "secrets") => Ok((Kind::Secret, View::Core)),
        ("", "v1", "configmaps") => Ok((Kind::ConfigMap, View::Core)),
        ("", "v1", "persistentvolumeclaims") => Ok((Kind::PersistentVolumeClaim, View::Core)),
        ("", "v1", "persistentvolumes") => Ok((Kind::PersistentVolume, View::Core)),
        ("", "v1", "nodes") => Ok((Kind::Node, View::Core)),
        ("events.k8s.io", "v1", "events") => Ok((Kind::Event, View::EventsV1)),
        ("coordination.k8s.io", "v1", "leases") => Ok((Kind::Lease, View::Core)),
        _ => Err(StatusError::no_such_path()),
    }
}

fn obj_list(
    app: &App,
    target: Target<'_>,
    ns: Option<&str>,
    q: &HashMap<String, String>,
) -> ApiResult {
    let (kind, view) = target.resolve()?;
    if ns.is_some() && !kind.namespaced() {
        return Err(StatusError::no_such_path());
    }
    let watch = is_true(q, "watch");
    validate_list_options(q, watch)?;
    let supported = match kind {
        Kind::Event => EVENT_FIELDS,
        Kind::Node => kinds::NODE_FIELDS,
        _ => META_FIELDS,
    };
    let translated: Vec<String> = param(q, "fieldSelector")
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let split = t.find(['=', '!']).unwrap_or(t.len());
            format!("{}{}", view.core_field(&t[..split]), &t[split..])
        })
        .collect();
    let fields = FieldSelector::parse(&translated.join(","), supported)?;
    let labels = LabelSelector::parse(param(q, "labelSelector"))?;
    if watch {
        return obj_watch(app, kind, view, ns, fields, labels, q);
    }
    let page = Page::parse(q)?;
    let (items, rv) = app.store.list_objects(kind, ns);
    let items: Vec<Value> = items
        .into_iter()
        .filter(|o| {
            fields.matches(|f| kinds::field(kind, o, f)) && labels.matches(Some(&json_labels(o)))
        })
        .collect();
    let key = |o: &Value| {
        (
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            o["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    };
    let (items, list_rv, cont, remaining) = page.apply(items, key, rv);
    let items: Vec<Value> = items.into_iter().map(|o| view.show(o)).collect();
    ok(&json!({
        "kind": format!("{}List", kind.kind()),
        "apiVersion": view.api_version(kind),
        "metadata": list_meta(list_rv, &cont, remaining),
        "items": items,
    }))
}

/// A watch of another kind ([`object_watch`]).
fn obj_watch(
    app: &App,
    kind: Kind,
    view: View,
    ns: Option<&str>,
    fields: FieldSelector,
    labels: LabelSelector,
    q: &HashMap<String, String>,
) -> ApiResult {
    let send_initial = is_true(q, "sendInitialEvents");
    let start = match param(q, "resourceVersion") {
        _ if send_initial => Start::Snapshot,
        "" | "0" => Start::Snapshot,
        rv => Start::After(parse_rv(rv)?),
    };
    let timeout = param(q, "timeoutSeconds")
        .parse::<u64>()
        .ok()
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let ns = ns.map(str::to_string);
    let w = object_watch::ObjectWatch {
        kind,
        api_version: view.api_version(kind),
        matches: Box::new(move |o: &Value| {
            ns.as_deref()
                .is_none_or(|ns| o["metadata"]["namespace"].as_str() == Some(ns))
                && fields.matches(|f| kinds::field(kind, o, f))
                && labels.matches(Some(&json_labels(o)))
        }),
        show: Box::new(move |o| view.show(o)),
        start,
        bookmarks: is_true(q, "allowWatchBookmarks"),
        initial_events_end: send_initial,
        timeout,
    };
    let mut r = Response::new(object_watch::start(app.store.clone(), app.kill.clone(), w));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn obj_create(
    app: &App,
    target: Target<'_>,
    ns: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    let (kind, view) = target.resolve_in(ns)?;
    let obj: Value = json_body(headers, body)?;
    let created = app.store.create_object(kind, ns, view.store_form(obj))?;
    Ok(json_response(StatusCode::CREATED, &view.show(created)))
}

fn obj_get(app: &App, target: Target<'_>, ns: &str, name: &str) -> ApiResult {
    let (kind, view) = target.resolve_in(ns)?;
    ok(&view.show(app.store.get_object(kind, ns, name)?))
}

fn obj_put(
    app: &App,
    target: Target<'_>,
    ns: &str,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    obj_put_via(app, target, ns, name, ObjectSub::Main, headers, body)
}

fn obj_put_via(
    app: &App,
    target: Target<'_>,
    ns: &str,
    name: &str,
    sub: ObjectSub,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    let (kind, view) = target.resolve_in(ns)?;
    let obj: Value = json_body(headers, body)?;
    let updated = app
        .store
        .update_object_via(kind, ns, name, sub, |_| Ok(view.store_form(obj)))?;
    ok(&view.show(updated))
}

fn obj_patch(
    app: &App,
    target: Target<'_>,
    ns: &str,
    name: &str,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    obj_patch_via(app, target, ns, name, ObjectSub::Main, q, headers, body)
}

#[allow(clippy::too_many_arguments)]
fn obj_patch_via(
    app: &App,
    target: Target<'_>,
    ns: &str,
    name: &str,
    sub: ObjectSub,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    let (kind, view) = target.resolve_in(ns)?;
    let pt = patch_type(headers, q)?;
    let updated = app.store.update_object_via(kind, ns, name, sub, |old| {
        let patched = patch::apply(pt, &view.show(old.clone()), body, meta_strategy)?;
        Ok(view.store_form(patched))
    })?;
    ok(&view.show(updated))
}

fn obj_delete(app: &App, target: Target<'_>, ns: &str, name: &str) -> ApiResult {
    let (kind, view) = target.resolve_in(ns)?;
    ok(&view.show(app.store.delete_object(kind, ns, name)?))
}

async fn core_all(
    State(app): State<App>,
    Path(resource): Path<String>,
    Query(q): Params,
) -> ApiResult {
    obj_list(&app, Target::core(&resource), None, &q)
}

async fn cluster_create(
    State(app): State<App>,
    Path(resource): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_create(&app, Target::core(&resource), "", &headers, &body)
}

async fn cluster_get(
    State(app): State<App>,
    Path((resource, name)): Path<(String, String)>,
) -> ApiResult {
    obj_get(&app, Target::core(&resource), "", &name)
}

async fn cluster_put(
    State(app): State<App>,
    Path((resource, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_put(&app, Target::core(&resource), "", &name, &headers, &body)
}

async fn cluster_patch(
    State(app): State<App>,
    Path((resource, name)): Path<(String, String)>,
    Query(q): Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_patch(
        &app,
        Target::core(&resource),
        "",
        &name,
        &q,
        &headers,
        &body,
    )
}

async fn cluster_delete(
    State(app): State<App>,
    Path((resource, name)): Path<(String, String)>,
) -> ApiResult {
    obj_delete(&app, Target::core(&resource), "", &name)
}

/// The `status` subresource of a cluster-scoped kind that has one (Nodes).
fn status_sub(target: Target<'_>, sub: &str) -> Result<(), StatusError> {
    let (kind, _) = target.resolve_in("")?;
    if sub == "status" && kinds::has_status(kind) {
        Ok(())
    } else {
        Err(StatusError::no_such_path())
    }
}

async fn cluster_sub_get(
    State(app): State<App>,
    Path((resource, name, sub)): Path<(String, String, String)>,
) -> ApiResult {
    status_sub(Target::core(&resource), &sub)?;
    obj_get(&app, Target::core(&resource), "", &name)
}

async fn cluster_sub_put(
    State(app): State<App>,
    Path((resource, name, sub)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    status_sub(Target::core(&resource), &sub)?;
    let target = Target::core(&resource);
    obj_put_via(&app, target, "", &name, ObjectSub::Status, &headers, &body)
}

async fn cluster_sub_patch(
    State(app): State<App>,
    Path((resource, name, sub)): Path<(String, String, String)>,
    Query(q): Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    status_sub(Target::core(&resource), &sub)?;
    let target = Target::core(&resource);
    obj_patch_via(
        &app,
        target,
        "",
        &name,
        ObjectSub::Status,
        &q,
        &headers,
        &body,
    )
}

async fn core_list(
    State(app): State<App>,
    Path((ns, resource)): Path<(String, String)>,
    Query(q): Params,
) -> ApiResult {
    obj_list(&app, Target::core(&resource), Some(&ns), &q)
}

async fn core_create(
    State(app): State<App>,
    Path((ns, resource)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_create(&app, Target::core(&resource), &ns, &headers, &body)
}

async fn core_get(
    State(app): State<App>,
    Path((ns, resource, name)): Path<(String, String, String)>,
) -> ApiResult {
    obj_get(&app, Target::core(&resource), &ns, &name)
}

async fn core_put(
    State(app): State<App>,
    Path((ns, resource, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_put(&app, Target::core(&resource), &ns, &name, &headers, &body)
}

async fn core_patch(
    State(app): State<App>,
    Path((ns, resource, name)): Path<(String, String, String)>,
    Query(q): Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_patch(
        &app,
        Target::core(&resource),
        &ns,
        &name,
        &q,
        &headers,
        &body,
    )
}

async fn core_delete(
    State(app): State<App>,
    Path((ns, resource, name)): Path<(String, String, String)>,
) -> ApiResult {
    obj_delete(&app, Target::core(&resource), &ns, &name)
}

async fn group_all(
    State(app): State<App>,
    Path((group, version, resource)): Path<(String, String, String)>,
    Query(q): Params,
) -> ApiResult {
    obj_list(
        &app,
        Target {
            group: &group,
            version: &version,
            resource: &resource,
        },
        None,
        &q,
    )
}

async fn group_list(
    State(app): State<App>,
    Path((group, version, ns, resource)): Path<(String, String, String, String)>,
    Query(q): Params,
) -> ApiResult {
    obj_list(
        &app,
        Target {
            group: &group,
            version: &version,
            resource: &resource,
        },
        Some(&ns),
        &q,
    )
}

async fn group_create(
    State(app): State<App>,
    Path((group, version, ns, resource)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_create(
        &app,
        Target {
            group: &group,
            version: &version,
            resource: &resource,
        },
        &ns,
        &headers,
        &body,
    )
}

type GroupObjectPath = Path<(String, String, String, String, String)>;

async fn group_get(
    State(app): State<App>,
    Path((group, version, ns, resource, name)): GroupObjectPath,
) -> ApiResult {
    obj_get(
        &app,
        Target {
            group: &group,
            version: &version,
            resource: &resource,
        },
        &ns,
        &name,
    )
}

async fn group_put(
    State(app): State<App>,
    Path((group, version, ns, resource, name)): GroupObjectPath,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_put(
        &app,
        Target {
            group: &group,
            version: &version,
            resource: &resource,
        },
        &ns,
        &name,
        &headers,
        &body,
    )
}

async fn group_patch(
    State(app): State<App>,
    Path((group, version, ns, resource, name)): GroupObjectPath,
    Query(q): Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    obj_patch(
        &app,
        Target {
            group: &group,
            version: &version,
            resource: &resource,
        },
        &ns,
        &name,
        &q,
        &headers,
        &body,
    )
}

async fn group_delete(
    State(app): State<App>,
    Path((group, version, ns, resource, name)): GroupObjectPath,
) -> ApiResult {
    obj_delete(
        &app,
        Target {
            group: &group,
            version: &version,
            resource: &resource,
        },
        &ns,
        &name,
    )
}
