//! Real parts for the demo and the tests: a containerd started as a child, locally built images,
//! a pod runner and a local API server. Nothing here is used by `ephemerald run`.
pub mod apiserver;
pub mod bench;
pub mod containerd;
pub mod demo;
pub mod fake_cri;
pub mod images;
pub mod pod_runner;
pub mod stack;
