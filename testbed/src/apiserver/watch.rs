//! Pod watches: newline-delimited JSON events on a chunked response, fed
//! from the store's history.
//!
//! Like kube-apiserver's watch cache: with `resourceVersion=R` every change
//! after R is sent (none before); with no RV or `0`, ADDED events for the
//! current state come first; with `sendInitialEvents=true` they are
//! followed by a BOOKMARK annotated `k8s.io/initial-events-end: "true"`. A
//! resourceVersion older than the kept history gets one ERROR event with a
//! 410 `Expired` Status and the stream ends. Selectors apply per event with
//! the cache's rule: an object that stops matching is sent as DELETED, one
//! that starts matching as ADDED. `allowWatchBookmarks=true` adds a
//! BOOKMARK every bookmark interval; `timeoutSeconds` ends the stream
//! cleanly. A server restart aborts the stream mid-body, as a dying server
//! would.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::select::{FieldSelector, LabelSelector, pod_field};
use super::status::StatusError;
use super::store::{Change, PodChange, Store};
use super::table::{TableOpts, pod_table};

/// Annotation of the bookmark that ends the initial events of a watch list.
pub(crate) const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start {
    /// Current state as ADDED events first (no RV, `0`, or `sendInitialEvents`).
    Snapshot,
    /// Changes after this resourceVersion.
    After(u64),
}

/// A parsed pod watch request.
#[derive(Debug, Clone)]
pub(crate) struct PodWatch {
    pub namespace: Option<String>,
    pub fields: FieldSelector,
    pub labels: LabelSelector,
    pub start: Start,
    pub bookmarks: bool,
    pub initial_events_end: bool,
    pub timeout: Option<Duration>,
    pub table: Option<TableOpts>,
}

impl PodWatch {
    fn matches(&self, pod: &Pod) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| pod.metadata.namespace.as_deref() == Some(ns))
            && self.fields.matches(|f| pod_field(pod, f))
            && self.labels.matches(pod.metadata.labels.as_ref())
    }

    /// The event a change becomes for this watch, if any.
    fn classify(&self, c: &PodChange) -> Option<(&'static str, Arc<Pod>)> {
        let new_matches = self.matches(&c.new);
        match c.change {
            Change::Added => new_matches.then_some(("ADDED", c.new.clone())),
            Change::Deleted => new_matches.then_some(("DELETED", c.new.clone())),
            Change::Modified => {
                let old_matches = c.old.as_deref().is_some_and(|o| self.matches(o));
                match (old_matches, new_matches) {
                    (true, true) => Some(("MODIFIED", c.new.clone())),
                    (true, false) => Some(("DELETED", c.new.clone())),
                    (false, true) => Some(("ADDED", c.new.clone())),
                    (false, false) => None,
                }
            }
        }
    }
}

/// Serializes one event line.
pub(crate) fn line(type_: &str, object: &Value) -> Bytes {
    let mut s =
        serde_json::to_string(&json!({"type": type_, "object": object})).unwrap_or_default();
    s.push('\n');
    Bytes::from(s)
}

/// The object of a BOOKMARK event, shaped as kube-apiserver sends it.
fn bookmark(rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({INITIAL_EVENTS_END: "true"});
    }
    json!({"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": {"containers": null}, "status": {}})
}

/// Starts streaming `w` and returns the response body.
pub(crate) fn start(store: Arc<Store>, kill: CancellationToken, w: PodWatch) -> Body {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    tokio::spawn(run(store, kill, w, tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Body::from_stream(stream)
}

async fn run(
    store: Arc<Store>,
    kill: CancellationToken,
    w: PodWatch,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut first_table = true;
    let mut render = |pod: &Pod| -> Value {
        match w.table {
            Some(opts) => {
                let rv = pod.metadata.resource_version.clone().unwrap_or_default();
                let t = pod_table([pod], &rv, None, first_table, opts);
                first_table = false;
                t
            }
            None => serde_json::to_value(pod).unwrap_or(Value::Null),
        }
    };
    let mut notify = store.subscribe();
    notify.borrow_and_update();
    let mut last = match w.start {
        Start::Snapshot => {
            let (pods, rv) = store.list_pods(w.namespace.as_deref(), |p| w.matches(p));
            for p in pods {
                if tx.send(Ok(line("ADDED", &render(&p)))).await.is_err() {
                    return;
                }
            }
            if w.initial_events_end
                && tx
                    .send(Ok(line("BOOKMARK", &bookmark(rv, true))))
                    .await
                    .is_err()
            {
                return;
            }
            rv
        }
        Start::After(rv) => rv,
    };
    let deadline = w.timeout.map(|t| Instant::now() + t);
    let period = store.bookmark_interval();
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        notify.borrow_and_update();
        match store.pod_changes_since(last) {
            Ok((changes, now)) => {
                for c in &changes {
                    if let Some((t, pod)) = w.classify(c)
                        && tx.send(Ok(line(t, &render(&pod)))).await.is_err()
                    {
                        return;
                    }
                }
                last = now;
            }
            Err(compacted) => {
                let _ = tx
                    .send(Ok(line(
                        "ERROR",
                        &StatusError::expired(last, compacted).body,
                    )))
                    .await;
                return;
            }
        }
        tokio::select! {
            _ = kill.cancelled() => {
                let _ = tx.send(Err(std::io::Error::other("server went away"))).await;
                return;
            }
            _ = tx.closed() => return,
            changed = notify.changed() => if changed.is_err() { return },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => return,
            _ = ticker.tick(), if w.bookmarks => {
                if tx.send(Ok(line("BOOKMARK", &bookmark(last, false)))).await.is_err() {
                    return;
                }
            }
        }
    }
}
