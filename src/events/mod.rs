//! Container exit notifications, so a terminated status reaches the API
//! server as soon as a container exits instead of at the next resync.
//!
//! Sources, in order of preference: the CRI's `GetContainerEvents` stream
//! (where the runtime serves it), else containerd's own event service
//! (`/tasks/exit` in the CRI namespace, through `containerd-client`). If
//! neither is available the agent still works: the periodic resync notices
//! exits, only later. Streams that break are re-opened with backoff.
//!
//! Owns: the exit streams and their re-opening. Must not decide what an exit
//! means for a pod: it only reports container ids, and the exit forwarder
//! (`reconcile::exits`) requeues the pod.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_client::services::v1::SubscribeRequest;
use containerd_client::services::v1::events_client::EventsClient;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::cri::Runtime;
use crate::cri::proto::ContainerEventType;

/// A container stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Runtime container id.
    pub container_id: String,
}

/// Where exit events come from.
#[derive(Clone)]
pub struct Sources {
    /// The CRI runtime (tried first).
    pub runtime: Arc<dyn Runtime>,
    /// containerd's socket, for its event service; `None` disables it.
    pub containerd_socket: Option<PathBuf>,
    /// containerd namespace of the CRI's containers (`k8s.io`).
    pub namespace: String,
    /// Told each time a stream is (re)opened. Exits that happened while no
    /// stream was open (the runtime restarting, the stream re-opening) are
    /// lost, so the listener re-checks the containers it watches.
    pub opened: Option<mpsc::Sender<Source>>,
}

/// Errors of the event boundary.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// Neither source could be opened.
    #[error("no exit event source: CRI GetContainerEvents: {cri}; containerd events: {containerd}")]
    Unavailable {
        /// Why the CRI stream failed.
        cri: String,
        /// Why containerd's stream failed.
        containerd: String,
    },
}

/// Which source is delivering events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// CRI `GetContainerEvents`.
    Cri,
    /// containerd's event service.
    Containerd,
}

impl Sources {
    async fn announce(&self, source: Source) {
        if let Some(opened) = &self.opened {
            let _ = opened.send(source).await;
        }
    }
}

/// Forwards exits to `tx` until cancelled. Never returns an error: a lost
/// stream is logged and re-opened.
pub async fn run(sources: Sources, tx: mpsc::Sender<Exit>, cancel: CancellationToken) {
    let mut backoff = Backoff::watch();
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = stream_once(&sources, &tx) => r,
        };
        match result {
            Ok(source) => {
                tracing::warn!(?source, "exit event stream ended; re-opening");
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!(error = %e, "exit events unavailable; exits are noticed at the next resync");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Opens the best source and forwards its events until it ends.
async fn stream_once(sources: &Sources, tx: &mpsc::Sender<Exit>) -> Result<Source, EventsError> {
    let cri_err = match sources.runtime.container_events().await {
        Ok(mut stream) => {
            tracing::info!("exit events: CRI GetContainerEvents");
            sources.announce(Source::Cri).await;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev)
                        if ev.container_event_type
                            == ContainerEventType::ContainerStoppedEvent as i32 =>
                    {
                        if tx
                            .send(Exit {
                                container_id: ev.container_id,
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "CRI event stream error");
                        break;
                    }
                }
            }
            return Ok(Source::Cri);
        }
        Err(e) => {
            tracing::debug!(error = %e, "CRI GetContainerEvents not served; trying containerd's events");
            e.to_string()
        }
    };
    let Some(socket) = &sources.containerd_socket else {
        return Err(EventsError::Unavailable {
            cri: cri_err,
            containerd: "disabled".into(),
        });
    };
    match containerd_exits(sources, socket, tx).await {
        Ok(()) => Ok(Source::Containerd),
        Err(containerd) => Err(EventsError::Unavailable {
            cri: cri_err,
            containerd,
        }),
    }
}

/// Subscribes to containerd's `/tasks/exit` events in `namespace`.
async fn containerd_exits(
    sources: &Sources,
    socket: &std::path::Path,
    tx: &mpsc::Sender<Exit>,
) -> Result<(), String> {
    let namespace = sources.namespace.as_str();
    let channel = tokio::time::timeout(Duration::from_secs(5), containerd_client::connect(socket))
        .await
        .map_err(|_| format!("connecting to {} timed out", socket.display()))?
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    let mut client = EventsClient::new(channel);
    // containerd answers the subscription only with its first event; from
    // here on exits are delivered.
    tracing::info!(socket = %socket.display(), namespace, "exit events: subscribing to containerd /tasks/exit");
    let req = SubscribeRequest {
        filters: vec![format!("topic==\"/tasks/exit\",namespace=={namespace}")],
    };
    // Announced before the (blocking) subscribe: the re-checks it causes
    // take several CRI round trips, by which time the request is in.
    sources.announce(Source::Containerd).await;
    let mut stream = client
        .subscribe(req)
        .await
        .map_err(|s| format!("subscribe: {}", s.message()))?
        .into_inner();
    while let Some(item) = stream.next().await {
        let envelope = item.map_err(|s| format!("event stream: {}", s.message()))?;
        let Some(any) = envelope.event else { continue };
        if !any.type_url.ends_with("containerd.events.TaskExit") {
            continue;
        }
        let Ok(exit) = containerd_client::events::TaskExit::decode(any.value.as_slice()) else {
            continue;
        };
        // A task id equal to the container id is the container's init
        // process; other ids are exec sessions, whose exits do not matter.
        if exit.id != exit.container_id {
            continue;
        }
        if tx
            .send(Exit {
                container_id: exit.container_id,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}
