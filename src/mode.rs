//! Whether this agent starts ephemeral containers now or only observes
//! them: the [`ModeGate`] every pass reads, and the mode watcher that keeps
//! it in line with `--mode` (for `auto`: whether a kubelet renews this
//! node's Lease in `kube-node-lease`).
//!
//! Owns: the gate and the decision rule. The reconcile pass only reads the
//! gate; nothing here touches the runtime or a pod. The watcher is one task
//! ([`Watcher::run`]) behind a narrow interface (a [`Cluster`] to read the
//! Lease, the gate to set, health and metrics to show it), so how it learns
//! about the Lease can change without touching the pass.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Mode;
use crate::k8s::Cluster;
use crate::observe::{Metrics, SharedHealth};

/// How often `--mode auto` looks at the node's Lease.
const LEASE_CHECK: Duration = Duration::from_secs(10);

/// Whether the agent starts containers now.
pub struct ModeGate {
    starting: AtomicBool,
    why: Mutex<String>,
}

impl ModeGate {
    /// A gate that starts (`true`) or observes.
    pub fn new(starting: bool, why: impl Into<String>) -> Self {
        ModeGate {
            starting: AtomicBool::new(starting),
            why: Mutex::new(why.into()),
        }
    }

    /// Whether containers are started (and statuses written) now.
    pub fn starting(&self) -> bool {
        self.starting.load(Ordering::SeqCst)
    }

    /// Changes the mode; returns whether it changed.
    pub fn set(&self, starting: bool, why: impl Into<String>) -> bool {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why.into();
        self.starting.swap(starting, Ordering::SeqCst) != starting
    }

    /// One line for logs and `/readyz`.
    pub fn describe(&self) -> String {
        let why = self.why.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if self.starting() {
            format!("starting ephemeral containers ({why})")
        } else {
            format!("observing only ({why})")
        }
    }
}

/// The mode watcher: sets the gate at start from `--mode`, and for `auto`
/// follows the node's Lease until shutdown.
pub struct Watcher {
    /// Where the Lease is read.
    pub cluster: Arc<dyn Cluster>,
    /// This node.
    pub node: String,
    /// The gate it sets.
    pub gate: Arc<ModeGate>,
    /// `/readyz` shows the mode.
    pub health: SharedHealth,
    /// `ephemerald_starting` shows it too.
    pub metrics: Arc<Metrics>,
}

impl Watcher {
    /// The gate at start: the flag, or for `auto` one look at the Lease.
    pub async fn initial(mode: Mode, cluster: &dyn Cluster, node: &str) -> ModeGate {
        match mode {
            Mode::Start => ModeGate::new(true, "--mode start"),
            Mode::Observe => ModeGate::new(false, "--mode observe"),
            Mode::Auto => {
                let (live, why) = kubelet_alive(cluster, node).await;
                ModeGate::new(!live, why)
            }
        }
    }

    /// Shows the gate's state on `/readyz` and in the metrics.
    pub fn show(&self) {
        self.metrics.starting.set(i64::from(self.gate.starting()));
        self.health.lock().unwrap_or_else(|e| e.into_inner()).mode = self.gate.describe();
    }

    /// `--mode auto`: looks at the Lease every `LEASE_CHECK` (10 s) and flips the
    /// gate when a kubelet appears or goes away, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(LEASE_CHECK) => {}
            }
            let (live, why) = kubelet_alive(self.cluster.as_ref(), &self.node).await;
            if self.gate.set(!live, why) {
                tracing::warn!("mode changed: {}", self.gate.describe());
            }
            self.show();
        }
    }
}

/// Whether a kubelet renews this node's Lease, and a sentence saying so.
pub async fn kubelet_alive(cluster: &dyn Cluster, node: &str) -> (bool, String) {
    match cluster.node_lease(node).await {
        Ok(None) => (
            false,
            format!("no Lease kube-node-lease/{node}: no kubelet serves this node"),
        ),
        Ok(Some(lease)) => {
            let spec = lease.spec.unwrap_or_default();
            let secs = i64::from(spec.lease_duration_seconds.unwrap_or(40));
            let renewed = spec.renew_time.map(|t| t.0.as_second()).unwrap_or(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            if renewed + secs > now {
                (
                    true,
                    format!(
                        "a kubelet renewed Lease kube-node-lease/{node} {}s ago; it starts ephemeral containers itself",
                        now - renewed
                    ),
                )
            } else {
                (
                    false,
                    format!(
                        "Lease kube-node-lease/{node} expired {}s ago: no live kubelet",
                        now - renewed - secs
                    ),
                )
            }
        }
        // Cannot tell: the safe choice is not to race a possible kubelet.
        Err(e) => (
            true,
            format!("cannot read the node Lease ({e}); not starting to avoid racing a kubelet"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_gate_reports_changes() {
        let g = ModeGate::new(false, "a kubelet renews the node lease");
        assert!(!g.starting());
        assert!(g.describe().starts_with("observing only"));
        assert!(g.set(true, "no live kubelet"));
        assert!(!g.set(true, "no live kubelet"));
        assert!(g.describe().contains("no live kubelet"));
    }
}
