//! The local API server against the clients that use it: `kube::Client`,
//! kube-runtime's `watcher`, and the real kubectl (installed by
//! `scripts/install-kubectl.sh`; these tests fail, never skip, when it
//! cannot be had).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use ephemerald_testbed::apiserver::LocalApiServer;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::Status;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);
const FORB: &str = "Forbidden: cannot be set for an Ephemeral Container";

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": "ephemerald.local/app:1"}],
            "initContainers": [{"name": "init", "image": "ephemerald.local/app:1"}],
        }
    }))
    .unwrap()
}

fn api_error(e: kube::Error) -> Box<Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn causes(s: &Status) -> Vec<(String, String, String)> {
    s.details
        .as_ref()
        .map(|d| {
            d.causes
                .iter()
                .map(|c| (c.reason.clone(), c.message.clone(), c.field.clone()))
                .collect()
        })
        .unwrap_or_default()
}

async fn started() -> (LocalApiServer, Api<Pod>) {
    let server = LocalApiServer::start().await.expect("server starts");
    let pods = Api::namespaced(server.client(), "default");
    (server, pods)
}

fn ec_patch(ec: Value) -> Patch<Value> {
    Patch::Strategic(json!({"spec": {"ephemeralContainers": [ec]}}))
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
) -> WatchEvent<Pod> {
    timeout(WAIT, stream.next())
        .await
        .expect("a watch event in time")
        .expect("the stream is open")
        .expect("a decodable event")
}

fn name_of(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or("")
}

// ---------------------------------------------------------------------------
// kube::Client

#[tokio::test]
async fn create_get_list_with_field_selector() {
    let (server, pods) = started().await;
    let a = pods
        .create(&PostParams::default(), &pod("a", "node1"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b", "node2"))
        .await
        .unwrap();
    assert_eq!(a.metadata.generation, Some(1));
    assert_eq!(a.metadata.resource_version.as_deref(), Some("1"));
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());
    let spec = a.spec.as_ref().unwrap();
    assert_eq!(
        spec.containers[0].image_pull_policy.as_deref(),
        Some("IfNotPresent")
    );
    assert_eq!(
        spec.containers[0].termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(a.status.as_ref().unwrap().phase.as_deref(), Some("Pending"));

    let list = pods
        .list(&ListParams::default().fields("spec.nodeName=node1"))
        .await
        .unwrap();
    assert_eq!(
        list.items.iter().map(name_of).collect::<Vec<_>>(),
        vec!["a"]
    );
    assert_eq!(list.metadata.resource_version.as_deref(), Some("2"));
    let by_label = pods
        .list(&ListParams::default().labels("app in (b,c)"))
        .await
        .unwrap();
    assert_eq!(
        by_label.items.iter().map(name_of).collect::<Vec<_>>(),
        vec!["b"]
    );
    let all: Api<Pod> = Api::all(server.client());
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    // Paging follows `continue`.
    let page = pods.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().expect("a continue token");
    let rest = pods
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(
        rest.items.iter().map(name_of).collect::<Vec<_>>(),
        vec!["b"]
    );
    assert_eq!(rest.metadata.continue_, None);

    let missing = api_error(pods.get("nosuch").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "pods \"nosuch\" not found");
    let details = missing.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("nosuch", "pods")
    );

    let dup = api_error(
        pods.create(&PostParams::default(), &pod("a", "node1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (dup.code, dup.reason.as_str(), dup.message.as_str()),
        (409, "AlreadyExists", "pods \"a\" already exists")
    );

    let unsupported = api_error(
        pods.list(&ListParams::default().fields("spec.image=x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (unsupported.code, unsupported.message.as_str()),
        (400, "field label not supported: spec.image")
    );

    // kube-rs' `?&` query form is understood.
    let req = axum::http::Request::get(
        "/api/v1/namespaces/default/pods?&fieldSelector=spec.nodeName%3Dnode2&limit=500",
    )
    .body(Vec::new())
    .unwrap();
    let text = server.client().request_text(req).await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["kind"], "PodList");

    let deleted = pods.delete("a", &Default::default()).await.unwrap();
    assert!(deleted.left().is_some());
    assert!(server.pod("default", "a").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn watch_with_field_selector_resumes_from_resource_version() {
    let (server, pods) = started().await;
    pods.create(&PostParams::default(), &pod("a", "node1"))
        .await
        .unwrap();
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default()
        .fields("spec.nodeName=node1")
        .disable_bookmarks();
    let mut stream = pods.watch(&wp, &rv).await.unwrap().boxed();
    pods.create(&PostParams::default(), &pod("other", "node2"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b", "node1"))
        .await
        .unwrap();
    let first_rv = match next_event(&mut stream).await {
        WatchEvent::Added(p) => {
            assert_eq!(name_of(&p), "b", "node2's pod is filtered out");
            p.metadata.resource_version.unwrap()
        }
        other => panic!("expected ADDED, got {other:?}"),
    };
    pods.patch_status(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();
    let second_rv = match next_event(&mut stream).await {
        WatchEvent::Modified(p) => p.metadata.resource_version.unwrap(),
        other => panic!("expected MODIFIED, got {other:?}"),
    };
    drop(stream);

    // From the first event's RV only the second event comes again.
    let mut resumed = pods.watch(&wp, &first_rv).await.unwrap().boxed();
    match next_event(&mut resumed).await {
        WatchEvent::Modified(p) => assert_eq!(p.metadata.resource_version.unwrap(), second_rv),
        other => panic!("expected MODIFIED, got {other:?}"),
    }

    // An object that stops matching leaves the watch as DELETED, one that
    // starts matching enters as ADDED (the watch cache's rule).
    let mut running = pods
        .watch(
            &WatchParams::default()
                .fields("status.phase=Running")
                .disable_bookmarks(),
            &second_rv,
        )
        .await
        .unwrap()
        .boxed();
    pods.patch_status(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .unwrap();
    pods.patch_status(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();
    assert!(matches!(next_event(&mut running).await, WatchEvent::Deleted(p) if name_of(&p) == "b"));
    assert!(matches!(next_event(&mut running).await, WatchEvent::Added(p) if name_of(&p) == "a"));
    server.shutdown().await;
}

#[tokio::test]
async fn pod_updates_and_deletes() {
    let (server, pods) = started().await;
    pods.create(&PostParams::default(), &pod("web", "node1"))
        .await
        .unwrap();
    let rv = server.resource_version();
    let mut stream = pods
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    let pp = PatchParams::default();

    // Metadata and container images may change; generation follows the spec.
    let p = pods
        .patch(
            "web",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.labels.unwrap()["tier"], "front");
    assert_eq!(p.metadata.generation, Some(1));
    let p = pods
        .patch(
            "web",
            &pp,
            &Patch::Strategic(json!({"spec": {"containers": [{"name": "app", "image": "ephemerald.local/app:2"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(2));
    assert!(matches!(
        next_event(&mut stream).await,
        WatchEvent::Modified(_)
    ));
    assert!(matches!(
        next_event(&mut stream).await,
        WatchEvent::Modified(_)
    ));

    // Other spec fields are immutable.
    let err = api_error(
        pods.patch(
            "web",
            &pp,
            &Patch::Merge(json!({"spec": {"nodeName": "node2"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message.starts_with(
            "Pod \"web\" is invalid: spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
        ),
        "{}",
        err.message
    );

    // DELETE removes the pod at once; watchers get its last state with a new RV.
    pods.delete("web", &Default::default()).await.unwrap();
    match next_event(&mut stream).await {
        WatchEvent::Deleted(p) => {
            assert_eq!(p.metadata.resource_version, Some(server.resource_version()))
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
    let err = api_error(pods.delete("web", &Default::default()).await.unwrap_err());
    assert_eq!(err.message, "pods \"web\" not found");
    server.shutdown().await;
}

#[tokio::test]
async fn bookmarks_and_initial_events() {
    let (server, pods) = started().await;
    server.set_bookmark_interval(Duration::from_millis(100));
    pods.create(&PostParams::default(), &pod("a", "node1"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b", "node1"))
        .await
        .unwrap();
    let rv = server.resource_version();
    let mut stream = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, rv);
            assert_eq!(
                (b.types.kind.as_str(), b.types.api_version.as_str()),
                ("Pod", "v1")
            );
        }
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    pods.create(&PostParams::default(), &pod("c", "node1"))
        .await
        .unwrap();
    loop {
        match next_event(&mut stream).await {
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Added(p) => {
                assert_eq!(name_of(&p), "c");
                break;
            }
            other => panic!("expected ADDED, got {other:?}"),
        }
    }
    match next_event(&mut stream).await {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, server.resource_version())
        }
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    drop(stream);

    // Watch list: the current state, then the bookmark that ends it.
    let mut list = pods
        .watch(&WatchParams::streaming_lists(), "0")
        .await
        .unwrap()
        .boxed();
    let mut names = Vec::new();
    loop {
        match next_event(&mut list).await {
            WatchEvent::Added(p) => names.push(name_of(&p).to_string()),
            WatchEvent::Bookmark(b)
                if b.metadata
                    .annotations
                    .get("k8s.io/initial-events-end")
                    .map(String::as_str)
                    == Some("true") =>
            {
                assert_eq!(b.metadata.resource_version, server.resource_version());
                break;
            }
            WatchEvent::Bookmark(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(names, ["a", "b", "c"]);

    // sendInitialEvents without its companions is refused, not ignored.
    // (kube refuses to send this, so the request is written by hand.)
    let req = axum::http::Request::get(
        "/api/v1/namespaces/default/pods?watch=true&sendInitialEvents=true",
    )
    .body(Vec::new())
    .unwrap();
    let err = api_error(server.client().request_text(req).await.unwrap_err());
    assert_eq!(err.code, 422);
    assert_eq!(
        err.message,
        "ListOptions.meta.k8s.io \"\" is invalid: [resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan, allowWatchBookmarks: Required value: sendInitialEvents requires setting allowWatchBookmarks=true]"
    );

    // timeoutSeconds ends the stream cleanly.
    let mut short = pods
        .watch(
            &WatchParams::default().timeout(1).disable_bookmarks(),
            &server.resource_version(),
        )
        .await
        .unwrap()
        .boxed();
    assert!(
        timeout(WAIT, short.next())
            .await
            .expect("the stream ends")
            .is_none()
    );
    server.shutdown().await;
}

type WatcherEvents = mpsc::UnboundedReceiver<Result<watcher::Event<Pod>, String>>;

/// The names of one (re)list of the watcher, up to its `InitDone`.
async fn init_done(rx: &mut WatcherEvents) -> Vec<String> {
    let fut = async {
        let mut names = Vec::new();
        loop {
            match rx.recv().await.expect("watcher runs") {
                Ok(watcher::Event::InitApply(p)) => names.push(name_of(&p).to_string()),
                Ok(watcher::Event::InitDone) => return names,
                _ => {}
            }
        }
    };
    timeout(WAIT, fut)
        .await
        .expect("the watcher (re)lists in time")
}

/// Runs a watcher in the background, forwarding what it yields.
fn spawn_watcher(
    api: Api<Pod>,
    config: watcher::Config,
) -> (WatcherEvents, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut w = watcher(api, config).default_backoff().boxed();
        while let Some(ev) = w.next().await {
            if tx.send(ev.map_err(|e| e.to_string())).is_err() {
                return;
            }
        }
    });
    (rx, task)
}

#[tokio::test]
async fn expired_after_compact_is_410_and_the_watcher_relists() {
    let (server, pods) = started().await;
    // No bookmarks in the window: the watcher must keep its old RV.
    server.set_bookmark_interval(Duration::from_secs(600));
    pods.create(&PostParams::default(), &pod("a", "node1"))
        .await
        .unwrap();
    let old_rv = server.resource_version();
    pods.create(&PostParams::default(), &pod("other", "node2"))
        .await
        .unwrap();
    server.compact();
    let current = server.resource_version();

    let mut stream = pods
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    match next_event(&mut stream).await {
        WatchEvent::Error(s) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert_eq!(
                s.message,
                format!("too old resource version: {old_rv} ({current})")
            );
            assert!(s.details.is_none(), "the watch cache sends no details");
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    assert!(
        timeout(WAIT, stream.next()).await.unwrap().is_none(),
        "the stream ends after the error"
    );

    // kube-runtime's watcher: list, watch; then the server compacts and
    // goes away, the re-watch gets 410, and the watcher relists.
    let (mut rx, task) = spawn_watcher(
        pods.clone(),
        watcher::Config::default().fields("spec.nodeName=node1"),
    );
    assert_eq!(init_done(&mut rx).await, ["a"]);
    pods.create(&PostParams::default(), &pod("unseen", "node2"))
        .await
        .unwrap();
    server.compact();
    server.restart().await;
    pods.create(&PostParams::default(), &pod("b", "node1"))
        .await
        .unwrap();
    assert_eq!(init_done(&mut rx).await, ["a", "b"], "a relist after 410");
    let lists = server
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /api/v1/namespaces/default/pods?")
                && !r.contains("watch=true")
                && r.contains("fieldSelector")
        })
        .count();
    assert_eq!(
        lists,
        2,
        "one list at start, one after 410: {:#?}",
        server.requests()
    );
    task.abort();
    server.shutdown().await;
}

#[tokio::test]
async fn restart_breaks_the_watch_and_the_watcher_resumes() {
    let (server, pods) = started().await;
    pods.create(&PostParams::default(), &pod("a", "node1"))
        .await
        .unwrap();
    let (mut rx, task) = spawn_watcher(pods.clone(), watcher::Config::default());
    assert_eq!(init_done(&mut rx).await, ["a"]);
    let watches_before = server
        .requests()
        .iter()
        .filter(|r| r.contains("watch=true"))
        .count();
    server.restart().await;
    pods.create(&PostParams::default(), &pod("b", "node1"))
        .await
        .unwrap();
    let mut saw_error = false;
    timeout(WAIT, async {
        loop {
            match rx.recv().await.expect("watcher runs") {
                Ok(watcher::Event::Apply(p)) if name_of(&p) == "b" => return,
                Err(_) => saw_error = true,
                _ => {}
            }
        }
    })
    .await
    .expect("the watcher sees the pod created after the restart");
    let requests = server.requests();
    let watches = requests.iter().filter(|r| r.contains("watch=true")).count();
    assert!(watches > watches_before, "a new watch after the restart");
    let lists = requests
        .iter()
        .filter(|r| r.contains("limit=500") && !r.contains("watch=true"))
        .count();
    assert_eq!(
        lists, 1,
        "resumed from its resourceVersion without a relist (error seen: {saw_error})"
    );
    task.abort();
    server.shutdown().await;
}

#[tokio::test]
async fn ephemeral_containers_with_each_patch_type() {
    let (server, pods) = started().await;
    pods.create(&PostParams::default(), &pod("web", "node1"))
        .await
        .unwrap();
    let pp = PatchParams::default();

    // Strategic merge, exactly as kubectl debug sends it.
    let p = pods
        .patch_ephemeral_containers(
            "web",
            &pp,
            &ec_patch(json!({"command": ["sh", "-c", "ps"], "image": "busybox:1.36", "name": "dbg", "resources": {},
                             "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}},
                             "targetContainerName": "app", "terminationMessagePolicy": "File"})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(2));
    let ec = &p
        .spec
        .as_ref()
        .unwrap()
        .ephemeral_containers
        .as_ref()
        .unwrap()[0];
    assert_eq!(ec.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        ec.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    let rv_after_first = p.metadata.resource_version.clone();

    // The same patch again changes nothing: no new RV, no generation bump.
    let again = pods
        .patch_ephemeral_containers(
            "web",
            &pp,
            &ec_patch(json!({"command": ["sh", "-c", "ps"], "image": "busybox:1.36", "name": "dbg", "resources": {},
                             "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}},
                             "targetContainerName": "app", "terminationMessagePolicy": "File"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            again.metadata.resource_version.clone(),
            again.metadata.generation
        ),
        (rv_after_first, Some(2))
    );

    // kubectl's second debug: $setElementOrder plus the new element.
    let p = pods
        .patch_ephemeral_containers(
            "web",
            &pp,
            &Patch::Strategic(json!({"spec": {
                "$setElementOrder/ephemeralContainers": [{"name": "dbg"}, {"name": "dbg2"}],
                "ephemeralContainers": [{"name": "dbg2", "image": "busybox", "resources": {}, "terminationMessagePolicy": "File"}]}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(3));

    // JSON merge patch replaces the list: it must carry the existing ones.
    let mut list = serde_json::to_value(&p.spec.as_ref().unwrap().ephemeral_containers).unwrap();
    list.as_array_mut()
        .unwrap()
        .push(json!({"name": "dbg3", "image": "busybox:1.36"}));
    let p = pods
        .patch_ephemeral_containers(
            "web",
            &pp,
            &Patch::Merge(json!({"spec": {"ephemeralContainers": list}})),
        )
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(4));

    // JSON patch appends.
    let jp: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/spec/ephemeralContainers/-", "value": {"name": "dbg4", "image": "busybox:1.36"}}
    ]))
    .unwrap();
    let p = pods
        .patch_ephemeral_containers("web", &pp, &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(5));

    // PUT takes only spec.ephemeralContainers of the body.
    let mut body = p.clone();
    body.metadata.labels = Some([("ignored".to_string(), "yes".to_string())].into());
    body.spec
        .as_mut()
        .unwrap()
        .ephemeral_containers
        .as_mut()
        .unwrap()
        .push(serde_json::from_value(json!({"name": "dbg5", "image": "busybox:1.36"})).unwrap());
    let p = pods
        .replace_ephemeral_containers("web", &PostParams::default(), &body)
        .await
        .unwrap();
    assert_eq!(p.metadata.generation, Some(6));
    assert_eq!(p.metadata.labels.as_ref().unwrap().get("ignored"), None);

    let names: Vec<_> = p
        .spec
        .as_ref()
        .unwrap()
        .ephemeral_containers
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, ["dbg", "dbg2", "dbg3", "dbg4", "dbg5"]);
    assert_eq!(
        server
            .spec_history("default", "web")
            .iter()
            .map(|r| r.names.len())
            .collect::<Vec<_>>(),
        [1, 1, 2, 3, 4, 5]
    );
    assert_eq!(
        pods.get_ephemeral_containers("web").await.unwrap(),
        p,
        "GET returns the whole pod"
    );

    // A stale resourceVersion in a PUT is a conflict.
    let mut stale = p.clone();
    stale.metadata.resource_version = Some("1".into());
    let err = api_error(
        pods.replace_ephemeral_containers("web", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert_eq!(
        err.message,
        "Operation cannot be fulfilled on pods \"web\": the object has been modified; please apply your changes to the latest version and try again"
    );

    // Unknown pod: NotFound with details (kubectl tells it from "disabled").
    let err = api_error(
        pods.patch_ephemeral_containers(
            "nosuch",
            &pp,
            &ec_patch(json!({"name": "x", "image": "b"})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (err.code, err.message.as_str()),
        (404, "pods \"nosuch\" not found")
    );
    assert_eq!(err.details.unwrap().name, "nosuch");

    // An unsupported patch type is 415.
    let req = axum::http::Request::patch("/api/v1/namespaces/default/pods/web/ephemeralcontainers")
        .header("content-type", "text/plain")
        .body(b"{}".to_vec())
        .unwrap();
    let err = api_error(server.client().request_text(req).await.unwrap_err());
    assert_eq!(
        (err.code, err.reason.as_str()),
        (415, "UnsupportedMediaType")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn forbidden_fields_are_refused_with_the_exact_causes() {
    let (server, pods) = started().await;
    pods.create(&PostParams::default(), &pod("web", "node1"))
        .await
        .unwrap();
    let pp = PatchParams::default();
    let probe = json!({"exec": {"command": ["true"]}});
    let single = [
        ("ports", json!([{"containerPort": 80}])),
        ("resources", json!({"limits": {"cpu": "1"}})),
        (
            "resizePolicy",
            json!([{"resourceName": "cpu", "restartPolicy": "NotRequired"}]),
        ),
        ("restartPolicy", json!("Always")),
        ("livenessProbe", probe.clone()),
        ("readinessProbe", probe.clone()),
        ("startupProbe", probe.clone()),
        (
            "lifecycle",
            json!({"preStop": {"exec": {"command": ["true"]}}}),
        ),
    ];
    for (field, value) in &single {
        let mut ec = json!({"name": "dbg", "image": "busybox"});
        ec[field] = value.clone();
        let err = api_error(
            pods.patch_ephemeral_containers("web", &pp, &ec_patch(ec))
                .await
                .unwrap_err(),
        );
        assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"), "{field}");
        assert_eq!(
            err.message,
            format!("Pod \"web\" is invalid: spec.ephemeralContainers[0].{field}: {FORB}"),
            "{field}"
        );
        let details = err.details.as_ref().unwrap();
        assert_eq!(
            (
                details.name.as_str(),
                details.kind.as_str(),
                details.group.as_str()
            ),
            ("web", "Pod", "")
        );
        assert_eq!(
            causes(&err),
            [(
                "FieldValueForbidden".into(),
                FORB.to_string(),
                format!("spec.ephemeralContainers[0].{field}")
            )]
        );
    }

    // All at once, plus subPath: one cause each, in the server's order.
    let mut ec = json!({"name": "dbg", "image": "busybox",
                        "volumeMounts": [{"name": "data", "mountPath": "/d", "subPath": "x"}]});
    for (field, value) in &single {
        ec[field] = value.clone();
    }
    let err = api_error(
        pods.patch_ephemeral_containers("web", &pp, &ec_patch(ec))
            .await
            .unwrap_err(),
    );
    let mut want: Vec<(String, String, String)> = vec![(
        "FieldValueNotFound".into(),
        "Not found: \"data\"".into(),
        "spec.ephemeralContainers[0].volumeMounts[0].name".into(),
    )];
    want.extend(single.iter().map(|(f, _)| {
        (
            "FieldValueForbidden".into(),
            FORB.into(),
            format!("spec.ephemeralContainers[0].{f}"),
        )
    }));
    want.push((
        "FieldValueForbidden".into(),
        FORB.into(),
        "spec.ephemeralContainers[0].volumeMounts[0].subPath".into(),
    ));
    assert_eq!(causes(&err), want);
    let joined: Vec<String> = want.iter().map(|(_, m, f)| format!("{f}: {m}")).collect();
    assert_eq!(
        err.message,
        format!("Pod \"web\" is invalid: [{}]", joined.join(", "))
    );

    // `resources: {}` (kubectl always sends it) is allowed.
    pods.patch_ephemeral_containers(
        "web",
        &pp,
        &ec_patch(json!({"name": "ok", "image": "busybox", "resources": {}})),
    )
    .await
    .unwrap();
    assert_eq!(
        server.pod("default", "web").unwrap().metadata.generation,
        Some(2)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn names_targets_removal_change_and_mirror_pods() {
    let (server, pods) = started().await;
    pods.create(&PostParams::default(), &pod("web", "node1"))
        .await
        .unwrap();
    let pp = PatchParams::default();
    let refused = |ec: Value| {
        let pods = pods.clone();
        async move {
            api_error(
                pods.patch_ephemeral_containers("web", &PatchParams::default(), &ec_patch(ec))
                    .await
                    .unwrap_err(),
            )
        }
    };
    let cases = [
        (
            json!({"name": "app", "image": "b"}),
            "spec.ephemeralContainers[0].name: Duplicate value: \"app\"",
        ),
        (
            json!({"name": "init", "image": "b"}),
            "spec.ephemeralContainers[0].name: Duplicate value: \"init\"",
        ),
        (
            json!({"name": "Dbg", "image": "b"}),
            "spec.ephemeralContainers[0].name: Invalid value: \"Dbg\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        ),
        (
            json!({"name": "dbg", "image": "b", "targetContainerName": "nosuch"}),
            "spec.ephemeralContainers[0].targetContainerName: Not found: \"nosuch\"",
        ),
        (
            json!({"name": "dbg"}),
            "spec.ephemeralContainers[0].image: Required value",
        ),
        (
            json!({"name": "dbg", "image": "b", "imagePullPolicy": "Sometimes"}),
            "spec.ephemeralContainers[0].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"",
        ),
    ];
    for (ec, want) in cases {
        let err = refused(ec).await;
        assert_eq!(err.message, format!("Pod \"web\" is invalid: {want}"));
    }
    // Two new ones with the same name in one write.
    let err = api_error(
        pods.patch_ephemeral_containers(
            "web",
            &pp,
            &Patch::Merge(json!({"spec": {"ephemeralContainers": [{"name": "d", "image": "b"}, {"name": "d", "image": "c"}]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        err.message,
        "Pod \"web\" is invalid: spec.ephemeralContainers[1].name: Duplicate value: \"d\""
    );

    // Existing ones may be neither changed nor removed.
    pods.patch_ephemeral_containers(
        "web",
        &pp,
        &ec_patch(json!({"name": "dbg", "image": "busybox:1.36"})),
    )
    .await
    .unwrap();
    let err = refused(json!({"name": "dbg", "image": "busybox:1.37"})).await;
    assert!(
        err.message.starts_with("Pod \"web\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be changed\n"),
        "{}",
        err.message
    );
    let err = api_error(
        pods.patch_ephemeral_containers(
            "web",
            &pp,
            &Patch::Merge(json!({"spec": {"ephemeralContainers": []}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        err.message,
        "Pod \"web\" is invalid: spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed\n"
    );
    assert_eq!(
        causes(&err),
        [(
            "FieldValueForbidden".into(),
            "Forbidden: existing ephemeral containers \"dbg\" may not be removed\n".into(),
            "spec.ephemeralContainers".into()
        )]
    );
    assert_eq!(
        server.pod("default", "web").unwrap().metadata.generation,
        Some(2)
    );

    // Mirror pods: only the static pod error, whatever else is wrong.
    let mut mirror = pod("static-node1", "node1");
    mirror.metadata.annotations =
        Some([("kubernetes.io/config.mirror".to_string(), "abc".to_string())].into());
    pods.create(&PostParams::default(), &mirror).await.unwrap();
    let err = api_error(
        pods.patch_ephemeral_containers(
            "static-node1",
            &pp,
            &ec_patch(json!({"name": "dbg", "image": "b", "ports": [{"containerPort": 1}]})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        err.message,
        "Pod \"static-node1\" is invalid: []: Forbidden: static pods do not support ephemeral containers"
    );
    assert_eq!(
        causes(&err),
        [(
            "FieldValueForbidden".into(),
            "Forbidden: static pods do not support ephemeral containers".into(),
            "[]".into()
        )]
    );
    server.shutdown().await;
}

#[tokio::test]
async fn status_writes_and_the_terminated_rule() {
    let (server, pods) = started().await;
    pods.create(&PostParams::default(), &pod("web", "node1"))
        .await
        .unwrap();
    pods.patch_ephemeral_containers(
        "web",
        &PatchParams::default(),
        &ec_patch(json!({"name": "dbg", "image": "busybox:1.36"})),
    )
    .await
    .unwrap();
    let status = |state: Value| {
        json!({"status": {"ephemeralContainerStatuses": [
            {"name": "dbg", "image": "busybox:1.36", "imageID": "", "ready": false, "restartCount": 0, "state": state}]}})
    };
    let pp = PatchParams::default();
    let running = pods
        .patch_status(
            "web",
            &pp,
            &Patch::Strategic(status(
                json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}}),
            )),
        )
        .await
        .unwrap();
    assert_eq!(
        running.metadata.generation,
        Some(2),
        "status writes do not bump generation"
    );
    let done = pods
        .patch_status(
            "web",
            &pp,
            &Patch::Merge(status(
                json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
            )),
        )
        .await
        .unwrap();
    // The same write again is accepted but changes nothing.
    let same = pods
        .patch_status(
            "web",
            &pp,
            &Patch::Merge(status(
                json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
            )),
        )
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        done.metadata.resource_version
    );

    let err = api_error(
        pods.patch_status(
            "web",
            &pp,
            &Patch::Merge(status(
                json!({"waiting": {"reason": "CreateContainerError"}}),
            )),
        )
        .await
        .unwrap_err(),
    );
    let msg = "Pod \"web\" is invalid: status.ephemeralContainerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state";
    assert_eq!((err.code, err.message.as_str()), (422, msg));
    assert_eq!(
        server.rejected_status_writes(),
        [("default/web".to_string(), msg.to_string())]
    );
    let history = server.status_history("default", "web");
    assert_eq!(history.len(), 3);
    assert!(
        history[1].ephemeral_container_statuses[0]
            .state
            .as_ref()
            .unwrap()
            .terminated
            .is_some()
    );
    assert_eq!(history[1].resource_version, history[2].resource_version);

    // The agent pins its status patch to the pod's UID; another UID (a
    // recreated pod with the same name) is refused.
    let uid = server.pod("default", "web").unwrap().metadata.uid.unwrap();
    pods.patch_status(
        "web",
        &pp,
        &Patch::Merge(json!({"metadata": {"uid": uid}, "status": {"message": "pinned"}})),
    )
    .await
    .unwrap();
    let err = api_error(
        pods.patch_status(
            "web",
            &pp,
            &Patch::Merge(json!({"metadata": {"uid": "other"}, "status": {"message": "x"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        err.message,
        "Pod \"web\" is invalid: metadata.uid: Invalid value: \"other\": field is immutable"
    );
    assert_eq!(server.rejected_status_writes().len(), 2);

    // Status writes cannot change the spec.
    let p = pods
        .patch_status(
            "web",
            &pp,
            &Patch::Merge(
                json!({"spec": {"nodeName": "elsewhere"}, "status": {"phase": "Running"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(p.spec.unwrap().node_name.as_deref(), Some("node1"));
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Running"));
    server.shutdown().await;
}

#[tokio::test]
async fn events_leases_secrets_and_discovery() {
    let server = LocalApiServer::start().await.unwrap();
    let client = server.client();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let ev: Event = serde_json::from_value(json!({
        "metadata": {"generateName": "web."},
        "involvedObject": {"kind": "Pod", "namespace": "default", "name": "web", "fieldPath": "spec.ephemeralContainers{dbg}"},
        "reason": "Started", "message": "Started container dbg", "type": "Normal",
        "source": {"component": "ephemerald", "host": "node1"}
    }))
    .unwrap();
    let created = events.create(&PostParams::default(), &ev).await.unwrap();
    assert!(
        created
            .metadata
            .name
            .as_deref()
            .unwrap()
            .starts_with("web.")
    );
    let listed = events
        .list(&ListParams::default().fields("involvedObject.name=web,reason=Started"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].message.as_deref(),
        Some("Started container dbg")
    );

    // events.k8s.io/v1 is a view of the same objects.
    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "default");
    let e1: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "web.pulled"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": {"kind": "Pod", "namespace": "default", "name": "web"},
        "reason": "Pulled", "note": "Container image already present", "type": "Normal",
        "action": "Pulling", "reportingController": "ephemerald", "reportingInstance": "node1"
    }))
    .unwrap();
    v1.create(&PostParams::default(), &e1).await.unwrap();
    let patched = v1
        .patch(
            "web.pulled",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(patched.series.unwrap().count, 2);
    let all = server.events();
    assert_eq!(all.len(), 2);
    let pulled = all
        .iter()
        .find(|e| e.reason.as_deref() == Some("Pulled"))
        .unwrap();
    assert_eq!(
        pulled.message.as_deref(),
        Some("Container image already present")
    );
    assert_eq!(pulled.involved_object.name.as_deref(), Some("web"));
    assert_eq!(pulled.reporting_component.as_deref(), Some("ephemerald"));

    // Leases in kube-node-lease: create, get, update with optimistic concurrency.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "node1"},
        "spec": {"holderIdentity": "node1", "leaseDurationSeconds": 40, "renewTime": "2026-01-01T00:00:00.000000Z"}
    }))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut renewed = leases.get("node1").await.unwrap();
    assert_eq!(renewed, created);
    renewed.spec.as_mut().unwrap().renew_time =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            "2026-01-01T00:00:10Z".parse().unwrap(),
        ));
    let updated = leases
        .replace("node1", &PostParams::default(), &renewed)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    let err = api_error(
        leases
            .replace("node1", &PostParams::default(), &renewed)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code, 409);
    assert!(
        err.message
            .starts_with("Operation cannot be fulfilled on leases.coordination.k8s.io \"node1\""),
        "{}",
        err.message
    );
    let missing = api_error(leases.get("node2").await.unwrap_err());
    assert_eq!(
        missing.message,
        "leases.coordination.k8s.io \"node2\" not found"
    );

    // Secrets: stringData folds into data.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "pull"}, "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": "{\"auths\":{}}"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let got = secrets.get("pull").await.unwrap();
    assert_eq!(got.data.unwrap()[".dockerconfigjson"].0, b"{\"auths\":{}}");

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let core = client.list_core_api_resources("v1").await.unwrap();
    let names: Vec<_> = core.resources.iter().map(|r| r.name.as_str()).collect();
    for want in [
        "pods",
        "pods/ephemeralcontainers",
        "pods/status",
        "events",
        "secrets",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    let groups = client.list_api_groups().await.unwrap();
    assert!(
        groups
            .groups
            .iter()
            .any(|g| g.name == "coordination.k8s.io")
    );
    server.shutdown().await;
}

/// ConfigMaps and PersistentVolumeClaims are namespaced like Secrets;
/// PersistentVolumes are cluster-scoped: served at `/api/v1/persistentvolumes`,
/// not under a namespace. Missing objects are 404 Status bodies in
/// kube-apiserver's words.
/// A Node as a kubelet registers it (status with conditions, nodeInfo,
/// daemonEndpoints).
fn kubelet_node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "containerd://1.6.20",
                         "kernelVersion": "6.1.0", "kubeProxyVersion": "", "kubeletVersion": "v1.36.0",
                         "machineID": "m", "operatingSystem": "linux", "osImage": "Debian GNU/Linux 12",
                         "systemUUID": "s"},
        },
    }))
    .unwrap()
}

async fn next_watch_event<K: Clone + serde::de::DeserializeOwned + std::fmt::Debug>(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<K>>> + Unpin),
) -> WatchEvent<K> {
    timeout(WAIT, stream.next())
        .await
        .expect("a watch event in time")
        .expect("the stream is open")
        .expect("a decodable event")
}

/// Nodes and Leases as the kubelet writes them and `--mode auto` reads
/// them: a Node created with its status, `nodes/NAME` keeping the status
/// and `nodes/NAME/status` keeping the spec; lists and watches with the
/// `metadata.name` field selector from a resourceVersion (other objects'
/// changes unseen, deletes seen); a Lease renewed by PUT with optimistic
/// concurrency; 410 after compaction and kube's watcher listing again.
#[tokio::test]
async fn nodes_and_leases_list_and_watch_by_name() {
    let server = LocalApiServer::start().await.unwrap();
    let client = server.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let created = nodes
        .create(&PostParams::default(), &kubelet_node("node-a"))
        .await
        .unwrap();
    let status = created.status.as_ref().unwrap();
    assert_eq!(
        status.node_info.as_ref().unwrap().kubelet_version,
        "v1.36.0"
    );
    assert_eq!(
        status
            .daemon_endpoints
            .as_ref()
            .unwrap()
            .kubelet_endpoint
            .as_ref()
            .unwrap()
            .port,
        10250
    );
    assert!(created.metadata.namespace.is_none(), "cluster-scoped");
    nodes
        .create(&PostParams::default(), &kubelet_node("node-b"))
        .await
        .unwrap();

    let listed = nodes
        .list(&ListParams::default().fields("metadata.name=node-a"))
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect::<Vec<_>>(),
        ["node-a"]
    );
    let schedulable = nodes
        .list(&ListParams::default().fields("spec.unschedulable=false"))
        .await
        .unwrap();
    assert_eq!(schedulable.items.len(), 2);
    let bad = api_error(
        nodes
            .list(&ListParams::default().fields("spec.nodeName=node-a"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (bad.code, bad.message.as_str()),
        (400, "field label not supported: spec.nodeName")
    );

    let rv = listed.metadata.resource_version.clone().unwrap();
    let mut w = nodes
        .watch(&WatchParams::default().fields("metadata.name=node-a"), &rv)
        .await
        .unwrap()
        .boxed();

    // The main resource keeps the status; the status subresource the spec.
    let mut edited = created.clone();
    edited
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("tier".into(), "edge".into());
    edited
        .status
        .as_mut()
        .unwrap()
        .node_info
        .as_mut()
        .unwrap()
        .kubelet_version = "v0".into();
    let put = nodes
        .replace("node-a", &PostParams::default(), &edited)
        .await
        .unwrap();
    assert_eq!(put.metadata.labels.as_ref().unwrap()["tier"], "edge");
    assert_eq!(
        put.status, created.status,
        "a write of nodes/NAME keeps the status"
    );
    let heartbeat = json!({"status": {"conditions": [{"type": "Ready", "status": "True",
        "reason": "KubeletReady", "lastHeartbeatTime": "2026-01-01T00:00:10Z",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}, "spec": {"unschedulable": true}});
    nodes
        .patch_status("node-b", &PatchParams::default(), &Patch::Merge(&heartbeat))
        .await
        .unwrap();
    let beat = nodes
        .patch_status("node-a", &PatchParams::default(), &Patch::Merge(&heartbeat))
        .await
        .unwrap();
    assert_eq!(
        beat.spec, put.spec,
        "a write of nodes/NAME/status keeps the spec"
    );
    let cond = &beat.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
    assert_eq!(
        cond.last_heartbeat_time.as_ref().unwrap().0.to_string(),
        "2026-01-01T00:00:10Z"
    );
    // node-b's change is not node-a's watch's business.
    for want in [&put, &beat] {
        match next_watch_event(&mut w).await {
            WatchEvent::Modified(n) => assert_eq!(&n, want),
            other => panic!("expected MODIFIED node-a, got {other:?}"),
        }
    }
    nodes.delete("node-a", &Default::default()).await.unwrap();
    match next_watch_event(&mut w).await {
        WatchEvent::Deleted(n) => {
            assert_eq!(n.metadata.name.as_deref(), Some("node-a"));
            assert_ne!(n.metadata.resource_version, beat.metadata.resource_version);
        }
        other => panic!("expected DELETED node-a, got {other:?}"),
    }
    let gone = api_error(nodes.get("node-a").await.unwrap_err());
    assert_eq!(gone.message, "nodes \"node-a\" not found");
    let no_sub = api_error(
        Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
            .get_status("node-a")
            .await
            .unwrap_err(),
    );
    assert_eq!(no_sub.code, 404, "leases have no status subresource");

    // The Lease: watched from the start (ADDED), renewed by PUT (MODIFIED).
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let mut lw = leases
        .watch(&WatchParams::default().fields("metadata.name=node-a"), "0")
        .await
        .unwrap()
        .boxed();
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 40,
                 "renewTime": "2026-01-01T00:00:00.123456Z"}
    }))
    .unwrap();
    let other: Lease = serde_json::from_value(json!({
        "metadata": {"name": "node-b"}, "spec": {"holderIdentity": "node-b"}
    }))
    .unwrap();
    leases.create(&PostParams::default(), &other).await.unwrap();
    let made = leases.create(&PostParams::default(), &lease).await.unwrap();
    match next_watch_event(&mut lw).await {
        WatchEvent::Added(l) => assert_eq!(l, made),
        other => panic!("expected ADDED node-a, got {other:?}"),
    }
    let mut renew = made.clone();
    renew.spec.as_mut().unwrap().renew_time =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            "2026-01-01T00:00:10.654321Z".parse().unwrap(),
        ));
    let renewed = leases
        .replace("node-a", &PostParams::default(), &renew)
        .await
        .unwrap();
    match next_watch_event(&mut lw).await {
        WatchEvent::Modified(l) => {
            assert_eq!(l, renewed);
            assert_eq!(
                l.spec.unwrap().renew_time.unwrap().0.to_string(),
                "2026-01-01T00:00:10.654321Z",
                "microseconds kept"
            );
        }
        other => panic!("expected MODIFIED node-a, got {other:?}"),
    }
    let stale = api_error(
        leases
            .replace("node-a", &PostParams::default(), &renew)
            .await
            .unwrap_err(),
    );
    assert_eq!(stale.code, 409);

    // An RV older than the history: 410, and kube's watcher lists again.
    server.compact();
    let mut expired = leases
        .watch(
            &WatchParams::default(),
            made.metadata.resource_version.as_deref().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    match next_watch_event(&mut expired).await {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR, got {other:?}"),
    }
    let mut watcher_stream = watcher(
        leases.clone(),
        watcher::Config::default().fields("metadata.name=node-a"),
    )
    .applied_objects()
    .boxed();
    let first = timeout(WAIT, watcher_stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, renewed);
    server.shutdown().await;
}

#[tokio::test]
async fn configmaps_claims_and_persistent_volumes() {
    let server = LocalApiServer::start().await.unwrap();
    let client = server.client();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "settings"}, "data": {"LEVEL": "debug"}}),
    )
    .unwrap();
    maps.create(&PostParams::default(), &cm).await.unwrap();
    let got = maps.get("settings").await.unwrap();
    assert_eq!(got.data.unwrap()["LEVEL"], "debug");
    assert_eq!(got.metadata.namespace.as_deref(), Some("default"));
    let missing = api_error(maps.get("absent").await.unwrap_err());
    assert_eq!(
        (
            missing.code,
            missing.reason.as_str(),
            missing.message.as_str()
        ),
        (404, "NotFound", "configmaps \"absent\" not found")
    );
    assert!(maps.get_opt("absent").await.unwrap().is_none());

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "volumeName": "pv-1",
                 "resources": {"requests": {"storage": "1Gi"}}},
        "status": {"phase": "Bound"}}))
    .unwrap();
    claims.create(&PostParams::default(), &pvc).await.unwrap();
    let got = claims.get("data").await.unwrap();
    assert_eq!(got.spec.unwrap().volume_name.as_deref(), Some("pv-1"));

    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "pv-1", "namespace": "ignored"},
        "spec": {"capacity": {"storage": "1Gi"}, "csi": {"driver": "d", "volumeHandle": "h"}}}))
    .unwrap();
    let created = pvs.create(&PostParams::default(), &pv).await.unwrap();
    assert_eq!(created.metadata.namespace, None, "cluster-scoped");
    assert_eq!(pvs.get("pv-1").await.unwrap(), created);
    assert_eq!(
        pvs.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    let missing = api_error(pvs.get("pv-2").await.unwrap_err());
    assert_eq!(missing.message, "persistentvolumes \"pv-2\" not found");
    let namespaced: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<PersistentVolume>(&()),
    );
    let err = api_error(namespaced.get("pv-1").await.unwrap_err());
    assert_eq!(
        (err.code, err.message.as_str()),
        (404, "the server could not find the requested resource")
    );
    let err = api_error(
        Api::<Secret>::all(client.clone())
            .create(&PostParams::default(), &Secret::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.code, 404,
        "namespaced kinds are not created outside a namespace"
    );

    let core = client.list_core_api_resources("v1").await.unwrap();
    let scoped: Vec<(&str, bool)> = core
        .resources
        .iter()
        .filter(|r| r.name.starts_with("configmaps") || r.name.starts_with("persistent"))
        .map(|r| (r.name.as_str(), r.namespaced))
        .collect();
    assert_eq!(
        scoped,
        [
            ("configmaps", true),
            ("persistentvolumeclaims", true),
            ("persistentvolumes", false)
        ]
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// The real kubectl

/// `.tools/bin/kubectl`, installed by the project's script when missing.
fn kubectl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(ephemerald_testbed::REPO_ROOT);
        let bin = root.join(".tools/bin/kubectl");
        if !bin.exists() {
            let status = std::process::Command::new(root.join("scripts/install-kubectl.sh"))
                .status()
                .expect("scripts/install-kubectl.sh runs");
            assert!(
                status.success(),
                "scripts/install-kubectl.sh failed ({status}); these tests need the real kubectl"
            );
        }
        assert!(
            bin.exists(),
            "kubectl is still missing at {}: run scripts/install-kubectl.sh",
            bin.display()
        );
        bin
    })
}

/// kubectl against one server, each run with a fresh HOME so that no
/// discovery cache carries over.
struct Kubectl {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(server: &LocalApiServer) -> Kubectl {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).unwrap();
        Kubectl { dir, kubeconfig }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let home = tempfile::tempdir_in(self.dir.path()).unwrap().keep();
        let mut cmd = tokio::process::Command::new(kubectl_bin());
        cmd.args(args)
            .env("HOME", &home)
            .env("KUBECONFIG", &self.kubeconfig)
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        cmd
    }

    async fn run(&self, args: &[&str]) -> Output {
        let out = timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish in 60 s"))
            .expect("kubectl runs");
        eprintln!(
            "kubectl {args:?} -> {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn kubectl_debug_get_and_patch_status() {
    let server = LocalApiServer::start().await.unwrap();
    let mut web = pod("web", "node1");
    web.spec.as_mut().unwrap().init_containers = None;
    server.create_pod(web).unwrap();
    let k = Kubectl::new(&server);

    let out = k
        .run(&[
            "debug",
            "web",
            "--image=ephemerald.local/busybox:1.35",
            "--image-pull-policy=Never",
            "--target=app",
            "-c",
            "dbg",
            "--",
            "sh",
            "-c",
            "ps",
        ])
        .await;
    assert!(
        out.status.success(),
        "kubectl debug failed: {}",
        stderr(&out)
    );
    assert_eq!(
        stdout(&out),
        "Targeting container \"app\". If you don't see processes from this container it may be because the container runtime doesn't support this feature.\n"
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r == "PATCH /api/v1/namespaces/default/pods/web/ephemeralcontainers"),
        "{:#?}",
        server.requests()
    );
    let p = server.pod("default", "web").unwrap();
    assert_eq!(p.metadata.generation, Some(2));
    let ec = &p
        .spec
        .as_ref()
        .unwrap()
        .ephemeral_containers
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        serde_json::to_value(ec).unwrap(),
        json!({
            "name": "dbg", "image": "ephemerald.local/busybox:1.35", "command": ["sh", "-c", "ps"],
            "imagePullPolicy": "Never", "resources": {},
            "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}},
            "targetContainerName": "app",
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
        })
    );
    assert_eq!(server.spec_history("default", "web").len(), 1);

    let out = k
        .run(&[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.spec.ephemeralContainers[0].name}",
        ])
        .await;
    assert!(out.status.success());
    assert_eq!(stdout(&out), "dbg");

    // Refusals come back the way kubectl prints a 422.
    let out = k
        .run(&["debug", "web", "--image=busybox", "-c", "app"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "The Pod \"web\" is invalid: spec.ephemeralContainers[1].name: Duplicate value: \"app\""
    );
    let out = k.run(&["debug", "nosuch", "--image=busybox"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "Error from server (NotFound): pods \"nosuch\" not found"
    );
    let mut mirror = pod("static-node1", "node1");
    mirror.metadata.annotations =
        Some([("kubernetes.io/config.mirror".to_string(), "abc".to_string())].into());
    server.create_pod(mirror).unwrap();
    let out = k
        .run(&["debug", "static-node1", "--image=busybox", "-c", "dbg"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "The Pod \"static-node1\" is invalid: []: Forbidden: static pods do not support ephemeral containers"
    );

    // Status patches: applied, then "(no change)" for the same patch.
    let patch = r#"{"status":{"phase":"Running"}}"#;
    let out = k
        .run(&[
            "patch",
            "pod",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        ])
        .await;
    assert!(out.status.success());
    assert_eq!(stdout(&out), "pod/web patched\n");
    let out = k
        .run(&[
            "patch",
            "pod",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            patch,
        ])
        .await;
    assert_eq!(stdout(&out), "pod/web patched (no change)\n");
    assert_eq!(
        server
            .pod("default", "web")
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Running")
    );

    // The terminated rule, as kubectl reports it.
    let st = |state: &str| {
        format!(
            r#"{{"status":{{"ephemeralContainerStatuses":[{{"name":"dbg","image":"b","imageID":"","ready":false,"restartCount":0,"state":{state}}}]}}}}"#
        )
    };
    let out = k
        .run(&[
            "patch",
            "pod",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            &st(r#"{"terminated":{"exitCode":0}}"#),
        ])
        .await;
    assert!(out.status.success());
    let out = k
        .run(&[
            "patch",
            "pod",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            &st(r#"{"running":{}}"#),
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "The Pod \"web\" is invalid: status.ephemeralContainerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn kubectl_get_watch_sees_a_change() {
    let server = LocalApiServer::start().await.unwrap();
    server.create_pod(pod("web", "node1")).unwrap();
    let k = Kubectl::new(&server);
    let mut child = k
        .command(&["get", "pods", "-w"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut wait_for = async |needle: &str, seen: &mut Vec<String>| {
        timeout(WAIT, async {
            while let Some(l) = lines.next_line().await.unwrap() {
                seen.push(l.clone());
                if l.contains(needle) {
                    return;
                }
            }
            panic!("kubectl get -w ended; output: {seen:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no line with {needle:?} in time; output so far: {seen:?}"))
    };
    wait_for("Pending", &mut seen).await;
    let pods: Api<Pod> = Api::namespaced(server.client(), "default");
    pods.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "containerStatuses": [
            {"name": "app", "image": "ephemerald.local/app:1", "imageID": "", "ready": true, "restartCount": 0, "state": {"running": {}}}],
            "initContainerStatuses": [
            {"name": "init", "image": "ephemerald.local/app:1", "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}})),
    )
    .await
    .unwrap();
    wait_for("Running", &mut seen).await;
    assert!(
        seen[0].starts_with("NAME") && seen[0].contains("READY") && seen[0].contains("STATUS"),
        "{seen:?}"
    );
    let running = seen.last().unwrap();
    assert!(
        running.starts_with("web") && running.contains("1/1"),
        "{running}"
    );
    child.kill().await.unwrap();
    let list_then_watch: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api/v1/namespaces/default/pods"))
        .collect();
    assert!(
        list_then_watch.len() >= 2 && list_then_watch[1].contains("watch=true"),
        "{list_then_watch:?}"
    );
    server.shutdown().await;
}
