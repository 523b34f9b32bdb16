//! The local API server: an in-process HTTP/1.1 server on loopback that
//! speaks kube-apiserver's wire protocol for the part of the API that the
//! agent (`kube::Client`, kube-runtime's `watcher`) and the real `kubectl`
//! (`debug`, `get`, `get -w`, `patch --subresource=status`) use. It is the
//! demo's default API server and the fixture of the component tests.
//!
//! What it owns: pods, events (core/v1 and the events.k8s.io/v1 view of
//! them), secrets, configmaps, persistentvolumeclaims, persistentvolumes
//! and nodes (both cluster-scoped) and `coordination.k8s.io/v1` leases,
//! in memory, under one global resourceVersion counter like etcd's
//! revision. Namespaces are implicit (every name exists). Every kind is
//! created, read, listed, updated, patched, deleted and watched the same
//! way (`object_watch` for the kinds other than pods); Nodes also have
//! `nodes/NAME/status`, and which endpoint takes which part of a Node is
//! kube-apiserver's (`kinds`).
//!
//! Faithful to kube-apiserver (measured against kubectl 1.37 and read from
//! the registry code; see `notes/apiserver.md`):
//! * discovery, plain and aggregated (`apidiscovery.k8s.io/v2`), listing the
//!   `pods/ephemeralcontainers` and `pods/status` subresources;
//! * create fills `uid`, `creationTimestamp`, `resourceVersion`,
//!   `generation`, and applies the API defaults of pods and containers;
//! * list with `fieldSelector` (the field labels of each kind: the pod ones,
//!   the Event ones, a Node's `spec.unschedulable`, `metadata.*`), `labelSelector`,
//!   `limit`/`continue`; watch from a resourceVersion, synthetic ADDED
//!   events without one, BOOKMARKs, `sendInitialEvents` with the
//!   `k8s.io/initial-events-end` bookmark, `timeoutSeconds`, and a 410
//!   `Expired` ERROR event for a resourceVersion older than the history;
//! * `pods/ephemeralcontainers` GET/PUT/PATCH (strategic merge with
//!   `$setElementOrder`/`$patch`, JSON merge, JSON patch): only
//!   `spec.ephemeralContainers` is taken, defaulted and validated with
//!   [`ephemerald::validation`] (422 with kube-apiserver's causes), mirror pods
//!   refused, `generation` bumped only when they changed;
//! * `pods/status` GET/PUT/PATCH: only status (and labels/annotations) is
//!   taken; a terminated state going back is refused with the real message;
//! * a write that changes nothing is not persisted (no new resourceVersion,
//!   no event), so `kubectl patch` prints "(no change)";
//! * errors are `Status` objects with kube-apiserver's messages, always with
//!   `details`; Table output for `kubectl get`.
//!
//! Faults for tests: [`LocalApiServer::restart`] (every connection and
//! watch breaks), [`LocalApiServer::stop_serving`] /
//! [`LocalApiServer::serve_again`] (unreachable for a while: connections
//! refused), [`LocalApiServer::compact`] (410 on resume) and
//! [`LocalApiServer::conflict_next_status_writes`] (409 Conflict).
//!
//! Left out: authentication and authorization, admission (no service
//! account token volume, no default tolerations), graceful pod deletion
//! (DELETE removes the pod at once, as with `--grace-period=0`), validation
//! of Node and Lease specs, field ownership of server-side apply (an apply
//! patch is applied as a strategic merge), `dryRun`, the pod subresources
//! `log`/`exec`/`attach`/`binding`/`eviction`, protobuf (JSON is answered
//! instead, which clients accept), and validation of pod specs beyond names,
//! images and ephemeral containers.

mod discovery;
mod http;
mod kinds;
mod object_watch;
mod patch;
mod select;
mod status;
mod store;
mod table;
mod watch;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use status::StatusError;
pub use store::{SpecRecord, StatusRecord};

use store::{CreateMode, Kind, Store};

/// Why the local API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The loopback listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address tried.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The client for the server could not be built.
    #[error("cannot build a client for {url}")]
    Client {
        /// The server URL.
        url: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
}

/// One period of serving: the accept loop and the token that kills its
/// connections and watches.
struct Serving {
    task: JoinHandle<()>,
    kill: CancellationToken,
}

/// An in-process kube-apiserver for tests and the demo (see the module docs).
pub struct LocalApiServer {
    store: Arc<Store>,
    addr: SocketAddr,
    serving: Mutex<Option<Serving>>,
}

/// A connection whose reads and writes fail once `kill` fires, so that a
/// restart drops open connections at once instead of draining them.
struct KillableIo {
    io: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableIo {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.poll_unpin(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "local apiserver restarted",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The listener handed to `axum::serve`: hands out [`KillableIo`]s.
struct KillableListener {
    inner: TcpListener,
    kill: CancellationToken,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let _ = io.set_nodelay(true);
                    let killed = Box::pin(self.kill.clone().cancelled_owned());
                    return (KillableIo { io, killed }, addr);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "local apiserver accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, ApiServerError> {
    let err = |source| ApiServerError::Bind { addr, source };
    let socket = TcpSocket::new_v4().map_err(err)?;
    // A restart binds the same port while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

impl LocalApiServer {
    /// Starts a server on `127.0.0.1` on a free port.
    pub async fn start() -> Result<LocalApiServer, ApiServerError> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener
            .local_addr()
            .map_err(|source| ApiServerError::Bind {
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                source,
            })?;
        let server = LocalApiServer {
            store: Arc::new(Store::new()),
            addr,
            serving: Mutex::new(None),
        };
        server.serve(listener);
        tracing::info!(url = %server.url(), "local apiserver listening");
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) {
        let kill = CancellationToken::new();
        let app = http::App {
            store: self.store.clone(),
            kill: kill.clone(),
            address: self.addr.to_string(),
        };
        let router = http::router(app);
        let listener = KillableListener {
            inner: listener,
            kill: kill.clone(),
        };
        let task = tokio::spawn(async move {
            // The accept loop never ends by itself; it is aborted.
            let _ = axum::serve(listener, router).await;
        });
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(Serving { task, kill });
    }

    async fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = serving {
            s.kill.cancel();
            s.task.abort();
            let _ = s.task.await;
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for this server (no authentication, namespace `default`).
    pub fn client(&self) -> kube::Client {
        self.try_client()
            .expect("a plain http client for a loopback URL builds")
    }

    fn try_client(&self) -> Result<kube::Client, ApiServerError> {
        let url = self.url();
        let uri: axum::http::Uri = url.parse().expect("the server URL is a valid URI");
        kube::Client::try_from(kube::Config::new(uri))
            .map_err(|source| ApiServerError::Client { url, source })
    }

    /// Writes a kubeconfig for kubectl; cluster, user and context are all
    /// named `ephemerald-local`, the context's namespace is `default`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: ephemerald-local\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: ephemerald-local\n  user: {{}}\n\
             contexts:\n\
             - name: ephemerald-local\n  context:\n    cluster: ephemerald-local\n    user: ephemerald-local\n    namespace: default\n\
             current-context: ephemerald-local\n",
            url = self.url()
        );
        std::fs::write(path, text)
    }

    /// Drops every open connection and watch, as if the server went away,
    /// then serves again on the same port with the same state.
    pub async fn restart(&self) {
        self.stop().await;
        self.serve_again().await;
    }

    /// Goes away until [`serve_again`](Self::serve_again): open connections
    /// and watches break, new connections are refused (the port is closed),
    /// as when the API server is down or unreachable. The state is kept.
    pub async fn stop_serving(&self) {
        self.stop().await;
        tracing::info!(url = %self.url(), "local apiserver stopped serving");
    }

    /// Serves again on the same port with the same state (a no-op while
    /// serving).
    pub async fn serve_again(&self) {
        if self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match bind(self.addr) {
                Ok(l) => {
                    self.serve(l);
                    tracing::info!(url = %self.url(), "local apiserver serving again");
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "local apiserver rebind failed, retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("local apiserver cannot rebind {}: {e}", self.addr),
            }
        }
    }

    /// Forgets the watch history: a watch from an older resourceVersion now
    /// gets 410 Expired (open watches are not affected).
    pub fn compact(&self) {
        self.store.compact();
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK
    /// (default 1 min, as kube-apiserver's watch cache). Applies
    /// to watches started afterwards.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.store.set_bookmark_interval(every);
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> String {
        self.store.resource_version().to_string()
    }

    /// Creates a pod as a POST would (defaults, metadata, validation), in
    /// the pod's namespace (`default` when unset). Unlike a POST it may
    /// carry ephemeral containers (defaulted and validated), so tests can
    /// start from a pod that already has some.
    pub fn create_pod(&self, pod: Pod) -> Result<Pod, StatusError> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        self.store.create_pod(&ns, pod, CreateMode::Direct)
    }

    /// Stores a pod as given, creating or replacing it, with no defaults
    /// and no validation (only `uid`, `creationTimestamp`, `generation` and
    /// `resourceVersion` are filled) — the spec an old or modified API
    /// server could hand the agent. Watchers see ADDED or MODIFIED.
    pub fn put_pod_unchecked(&self, pod: Pod) -> Pod {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        self.store
            .create_pod(&ns, pod, CreateMode::Unchecked)
            .expect("an unchecked write cannot fail")
    }

    /// Deletes a pod at once (watchers see DELETED).
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<Pod, StatusError> {
        self.store.delete_pod(namespace, name)
    }

    /// The stored pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.store.get_pod(namespace, name).ok()
    }

    /// Every accepted write to `pods/NAME/status`, oldest first (no-op
    /// writes included, with the unchanged resourceVersion).
    pub fn status_history(&self, namespace: &str, name: &str) -> Vec<StatusRecord> {
        self.store.status_history(namespace, name)
    }

    /// Every accepted write to `pods/NAME/ephemeralcontainers`, oldest first.
    pub fn spec_history(&self, namespace: &str, name: &str) -> Vec<SpecRecord> {
        self.store.spec_history(namespace, name)
    }

    /// Makes the next `n` writes to any `pods/NAME/status` fail with 409
    /// Conflict, kube-apiserver's answer when another writer keeps winning
    /// the race for the object (its patch handler gives up after a few
    /// internal retries) or a precondition is stale. The refused writes
    /// change nothing and are listed in
    /// [`conflicted_status_writes`](Self::conflicted_status_writes).
    pub fn conflict_next_status_writes(&self, n: usize) {
        self.store.conflict_next_status_writes(n);
    }

    /// Status writes answered 409 by
    /// [`conflict_next_status_writes`](Self::conflict_next_status_writes):
    /// (`namespace/name`, the ephemeral container statuses they carried).
    pub fn conflicted_status_writes(&self) -> Vec<(String, Vec<ContainerStatus>)> {
        self.store.conflicted_status_writes()
    }

    /// Refused status writes: (`namespace/name`, the Status message).
    pub fn rejected_status_writes(&self) -> Vec<(String, String)> {
        self.store.rejected_status_writes()
    }

    /// All Events (created through core/v1 or events.k8s.io/v1), in
    /// (namespace, name) order, as core/v1 Events.
    pub fn events(&self) -> Vec<Event> {
        self.store
            .list_objects(Kind::Event, None)
            .0
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// The request log, one `METHOD path?query` per request, oldest first
    /// (the most recent 50 000–100 000).
    pub fn requests(&self) -> Vec<String> {
        self.store.requests()
    }

    /// Stops serving and drops every connection.
    pub async fn shutdown(self) {
        self.stop().await;
    }
}

impl Drop for LocalApiServer {
    fn drop(&mut self) {
        if let Some(s) = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            s.kill.cancel();
            s.task.abort();
        }
    }
}
