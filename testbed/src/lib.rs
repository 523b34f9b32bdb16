//! The lab (crate `ephemerald-testbed`): real parts for the demo, the tests
//! and the bench — a containerd started as a child, locally built images, a
//! pod runner standing in for the kubelet's pod path, a local API server and
//! a fake CRI runtime. It builds on the agent crate (`ephemerald`) and is
//! never part of it: nothing here is linked into `ephemerald run`, and the
//! agent must not import from here (the agent's integration tests use it as
//! a dev-dependency).
pub mod apiserver;
pub mod bench;
pub mod cli;
pub mod compare;
pub mod containerd;
pub mod demo;
pub mod fake_cri;
pub mod images;
pub mod pod_runner;
pub mod stack;

/// The repository (the workspace root), where `.testbed/`, `.tools/` and
/// `scripts/` are.
pub const REPO_ROOT: &str = env!("EPHEMERALD_REPO_ROOT");

/// A plain HTTP/1.0 GET of `path` on `addr` (`host:port`), as the tests and
/// the bench read the agent's health endpoints: the status code and the
/// body, or `None` when nothing answered.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}
