//! Watches of the kinds other than Pod (Nodes, Leases, Events, …): the same
//! protocol as the pod watch ([`super::watch`]), fed from the store's
//! object history.
//!
//! As kube-apiserver's watch cache: with `resourceVersion=R` every change
//! after R; with no RV or `0` (or `sendInitialEvents=true`, then ended by
//! the `k8s.io/initial-events-end` BOOKMARK) ADDED events for the current
//! state first; an RV older than the kept history gets one 410 `Expired`
//! ERROR event. Selectors apply per event: an object that stops matching
//! is sent as DELETED, one that starts matching as ADDED.
//! `allowWatchBookmarks=true` adds a BOOKMARK every bookmark interval,
//! `timeoutSeconds` ends the stream cleanly, a server restart aborts it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::status::StatusError;
use super::store::{Change, Kind, ObjectChange, Store};
use super::watch::{INITIAL_EVENTS_END, Start, line};

/// Which objects a watch sees, as the caller decides it (namespace, field
/// and label selectors, in the URL's view).
pub(crate) type Matcher = Box<dyn Fn(&Value) -> bool + Send + Sync>;
/// How a stored object is shown in this watch's view.
pub(crate) type Shower = Box<dyn Fn(Value) -> Value + Send + Sync>;

/// A parsed watch request of another kind.
pub(crate) struct ObjectWatch {
    pub kind: Kind,
    /// `apiVersion` of the objects as shown (for BOOKMARKs).
    pub api_version: &'static str,
    pub matches: Matcher,
    pub show: Shower,
    pub start: Start,
    pub bookmarks: bool,
    pub initial_events_end: bool,
    pub timeout: Option<Duration>,
}

impl ObjectWatch {
    /// The event a change becomes for this watch, if any.
    fn classify(&self, c: &ObjectChange) -> Option<(&'static str, Value)> {
        let new_matches = (self.matches)(&c.new);
        let event = match c.change {
            Change::Added => new_matches.then_some("ADDED"),
            Change::Deleted => new_matches.then_some("DELETED"),
            Change::Modified => {
                let old_matches = c.old.as_ref().is_some_and(|o| (self.matches)(o));
                match (old_matches, new_matches) {
                    (true, true) => Some("MODIFIED"),
                    (true, false) => Some("DELETED"),
                    (false, true) => Some("ADDED"),
                    (false, false) => None,
                }
            }
        }?;
        Some((event, (self.show)(c.new.clone())))
    }

    /// The object of a BOOKMARK event: only kind, apiVersion and the RV.
    fn bookmark(&self, rv: u64, initial_end: bool) -> Value {
        let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end {
            meta["annotations"] = json!({INITIAL_EVENTS_END: "true"});
        }
        json!({"kind": self.kind.kind(), "apiVersion": self.api_version, "metadata": meta})
    }
}

/// Starts streaming `w` and returns the response body.
pub(crate) fn start(store: Arc<Store>, kill: CancellationToken, w: ObjectWatch) -> Body {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    tokio::spawn(run(store, kill, w, tx));
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Body::from_stream(stream)
}

async fn run(
    store: Arc<Store>,
    kill: CancellationToken,
    w: ObjectWatch,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut notify = store.subscribe();
    notify.borrow_and_update();
    let mut last = match w.start {
        Start::Snapshot => {
            let (objects, rv) = store.list_objects(w.kind, None);
            for o in objects.into_iter().filter(|o| (w.matches)(o)) {
                if tx.send(Ok(line("ADDED", &(w.show)(o)))).await.is_err() {
                    return;
                }
            }
            if w.initial_events_end
                && tx
                    .send(Ok(line("BOOKMARK", &w.bookmark(rv, true))))
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
        match store.object_changes_since(w.kind, last) {
            Ok((changes, now)) => {
                for c in &changes {
                    if let Some((t, obj)) = w.classify(c)
                        && tx.send(Ok(line(t, &obj))).await.is_err()
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
                if tx.send(Ok(line("BOOKMARK", &w.bookmark(last, false)))).await.is_err() {
                    return;
                }
            }
        }
    }
}
