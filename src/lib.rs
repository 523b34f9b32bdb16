//! ephemerald: a node agent that runs Kubernetes ephemeral containers through the CRI.

pub mod backoff;
pub mod config;
pub mod cri;
pub mod events;
pub mod k8s;
pub mod kubelet;
pub mod reconcile;
pub mod testbed;
pub mod validation;
