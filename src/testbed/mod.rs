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
