//! The signs of a kubelet on this node, as the API server shows them: the
//! node's Lease in `kube-node-lease` and its Node object, each followed by a
//! watch with `fieldSelector=metadata.name=NODE` (verbs: list and watch on
//! `leases` in `kube-node-lease` and on `nodes`).
//!
//! This module decides nothing; it publishes the latest [`Evidence`] on a
//! `tokio::sync::watch` channel, and `reconcile::mode` decides from it.
//!
//! Invariants: a source is [`Seen::Waiting`] until its first list completed;
//! after any failure of its watch (other than the 410 that makes the
//! watcher list again by itself) it is [`Seen::Unknown`] until a fresh list
//! completed: what the agent has not seen since cannot count, either way.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// The namespace of the node Leases (`v1.NamespaceNodeLease`).
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// What one source shows.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen<T> {
    /// Its first list has not completed yet.
    Waiting,
    /// Its watch failed; the sentence says how. Unknown until listed again.
    Unknown(String),
    /// Listed, and there is no such object.
    Absent,
    /// Listed (or watched since), and this is the object.
    Present(T),
}

impl<T> Seen<T> {
    /// Why its watch failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        match self {
            Seen::Unknown(why) => Some(why),
            _ => None,
        }
    }
}

/// Everything the API server shows about a kubelet on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// This node's name.
    pub node_name: String,
    /// `kube-node-lease/<node>`.
    pub lease: Seen<Lease>,
    /// The Node object.
    pub node: Seen<Node>,
}

impl Evidence {
    /// Nothing seen yet.
    pub fn waiting(node_name: &str) -> Self {
        Evidence {
            node_name: node_name.to_string(),
            lease: Seen::Waiting,
            node: Seen::Waiting,
        }
    }

    /// Whether a decision can be made from it: both sources listed, or one
    /// of them failed (then the decision is "cannot tell").
    pub fn settled(&self) -> bool {
        let waiting = matches!(self.lease, Seen::Waiting) || matches!(self.node, Seen::Waiting);
        let failed = self.lease.failure().is_some() || self.node.failure().is_some();
        !waiting || failed
    }
}

/// Told about each failed list or watch: (the call, e.g. `watch leases`,
/// and the HTTP code or `transport`), for the error metric.
pub type ErrorHook = Arc<dyn Fn(&'static str, &str) + Send + Sync>;

/// Follows this node's Lease and Node: the receiver always holds the
/// latest evidence; the future runs until `cancel`.
pub fn follow(
    client: kube::Client,
    node: &str,
    on_error: ErrorHook,
    cancel: CancellationToken,
) -> (
    watch::Receiver<Evidence>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = watch::channel(Evidence::waiting(node));
    let tx = Arc::new(tx);
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let lease_tx = tx.clone();
    let lease = follow_one(
        leases,
        node.to_string(),
        "leases",
        format!("Lease {NODE_LEASE_NAMESPACE}/{node}"),
        move |seen| lease_tx.send_modify(|e| e.lease = seen),
        on_error.clone(),
        cancel.clone(),
    );
    let node_follow = follow_one(
        nodes,
        node.to_string(),
        "nodes",
        format!("Node {node}"),
        move |seen| tx.send_modify(|e| e.node = seen),
        on_error,
        cancel,
    );
    (rx, async move {
        tokio::join!(lease, node_follow);
    })
}

/// Follows the one object named `name`: a watcher with a field selector on
/// the name; on a failure, says so and starts over with a new list after a
/// backoff (the stream policy).
async fn follow_one<K>(
    api: Api<K>,
    name: String,
    resource: &'static str,
    what: String,
    publish: impl Fn(Seen<K>),
    on_error: ErrorHook,
    cancel: CancellationToken,
) where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let selector = format!("metadata.name={name}");
    let mut backoff = Backoff::watch();
    loop {
        let mut stream = watcher(api.clone(), watcher::Config::default().fields(&selector)).boxed();
        // The objects of a list in progress, published at its end.
        let mut listing: Option<K> = None;
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                e = stream.next() => e,
            };
            let is_ours = |o: &K| o.meta().name.as_deref() == Some(name.as_str());
            match event {
                None => break,
                Some(Ok(watcher::Event::Init)) => listing = None,
                Some(Ok(watcher::Event::InitApply(o))) => {
                    if is_ours(&o) {
                        listing = Some(o);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    backoff.reset();
                    publish(listing.take().map_or(Seen::Absent, Seen::Present));
                }
                Some(Ok(watcher::Event::Apply(o))) => {
                    if is_ours(&o) {
                        publish(Seen::Present(o));
                    }
                }
                Some(Ok(watcher::Event::Delete(o))) => {
                    if is_ours(&o) {
                        publish(Seen::Absent);
                    }
                }
                Some(Err(e)) => {
                    let code = error_code(&e);
                    on_error(
                        if matches!(e, watcher::Error::InitialListFailed(_)) {
                            list_call(resource)
                        } else {
                            watch_call(resource)
                        },
                        &code,
                    );
                    // 410 Gone: the watcher lists again by itself, and what
                    // it publishes at the end of that list is current; until
                    // then the last state is at most that old.
                    if code == "410" {
                        tracing::debug!(error = %e, "{what}: watch expired; listing again");
                        continue;
                    }
                    let hint = if code == "403" {
                        format!(
                            " (the agent needs get, list and watch on {resource}{})",
                            if resource == "leases" {
                                format!(" in {NODE_LEASE_NAMESPACE}")
                            } else {
                                String::new()
                            }
                        )
                    } else {
                        String::new()
                    };
                    let why = format!("cannot watch {what}: {e}{hint}");
                    tracing::warn!("{why}; looking again");
                    publish(Seen::Unknown(why));
                    break;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

fn list_call(resource: &'static str) -> &'static str {
    match resource {
        "leases" => "list leases",
        _ => "list nodes",
    }
}

fn watch_call(resource: &'static str) -> &'static str {
    match resource {
        "leases" => "watch leases",
        _ => "watch nodes",
    }
}

/// The HTTP status code of a watcher failure, or `transport`.
fn error_code(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code.to_string(),
        watcher::Error::WatchError(s) => s.code.to_string(),
        _ => "transport".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_settles_when_both_listed_or_one_failed() {
        let mut e = Evidence::waiting("n");
        assert!(!e.settled());
        e.lease = Seen::Absent;
        assert!(!e.settled(), "the Node is not listed yet");
        e.node = Seen::Present(Node::default());
        assert!(e.settled());
        let mut failed = Evidence::waiting("n");
        failed.node = Seen::Unknown("cannot watch Node n: 403".into());
        assert!(failed.settled(), "a failure is a decision: cannot tell");
    }
}
