//! The legacy container log symlinks that node log collectors (Fluent Bit,
//! Vector, Promtail, the OpenTelemetry filelog receiver) read:
//! `<container logs dir>/<pod>_<namespace>_<container>-<id>.log` → the
//! container's log file under the pod log directory.
//!
//! Made as the kubelet makes them (`startContainer`, after StartContainer,
//! only when the log file exists; a failure is logged, never an error of
//! the start) and removed as the kubelet removes them, as far as the agent
//! can observe it: the kubelet removes a container's link when it removes
//! the container, and its garbage collection removes a link whose log file
//! is gone unless the container still runs. [`sweep`] does both from what
//! the runtime holds now, so it is level-triggered and survives restarts.
//! It only touches symlinks that point below the pod log directory.

use std::io;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

use super::translate::NodeDirs;
use crate::cri::proto::ContainerState;
use crate::cri::{CriError, Runtime};
use crate::kubelet;

/// Makes the legacy link for a container just started: `log_file` is the
/// sandbox's log directory joined with the config's `log_path`. Returns the
/// link, or `None` when the log file does not exist (the kubelet does not
/// make a link that would dangle) or `dir` is empty (links turned off).
pub fn link(
    dir: &Path,
    pod_name: &str,
    namespace: &str,
    container: &str,
    container_id: &str,
    log_file: &Path,
) -> io::Result<Option<PathBuf>> {
    if dir.as_os_str().is_empty() {
        return Ok(None);
    }
    match std::fs::metadata(log_file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // Any other answer (it exists, or cannot be looked at): the kubelet
        // tries to link anyway.
        _ => {}
    }
    let path = kubelet::legacy_log_symlink(dir, pod_name, namespace, container, container_id);
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::symlink(log_file, &path)?;
    Ok(Some(path))
}

/// [`link`] for a container started outside the start path (one left
/// created by a creator that died), its log file as the runtime reports
/// it; a failure is logged.
pub async fn link_started(
    runtime: &dyn Runtime,
    dirs: &NodeDirs,
    pod: &Pod,
    container: &str,
    container_id: &str,
) {
    let log = match runtime.container_status(container_id, false).await {
        Ok(r) => r.status.map(|s| s.log_path).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(container, id = container_id, error = %e, "no log path for the legacy symbolic link");
            return;
        }
    };
    if log.is_empty() {
        return;
    }
    let made = link(
        &dirs.container_logs,
        kubelet::name(pod),
        kubelet::namespace(pod),
        container,
        container_id,
        Path::new(&log),
    );
    if let Err(e) = made {
        tracing::warn!(container, id = container_id, log = %log, error = %e, "failed to create legacy symbolic link");
    }
}

/// What [`sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Links removed.
    pub removed: Vec<PathBuf>,
    /// Links that could not be removed, with why.
    pub failed: Vec<(PathBuf, String)>,
}

/// One link found in the directory.
struct Candidate {
    path: PathBuf,
    id: String,
    dangling: bool,
}

/// Removes the links in `dir` (pointing below `pod_logs`) whose container
/// the runtime no longer holds, and those whose log file is gone while
/// their container is not running. The directory is read before the
/// runtime is asked, so a link made meanwhile is never taken for a
/// removed container's (its container existed before it). No runtime call
/// when there is no such link.
pub async fn sweep(runtime: &dyn Runtime, dir: &Path, pod_logs: &Path) -> Result<Swept, CriError> {
    let candidates = candidates(dir, pod_logs);
    let mut out = Swept::default();
    if candidates.is_empty() {
        return Ok(out);
    }
    let containers = runtime.list_containers(None).await?;
    for c in candidates {
        let held: Vec<_> = containers
            .iter()
            .filter(|rc| rc.id.starts_with(&c.id))
            .collect();
        let gone = held.is_empty();
        let dead = held
            .iter()
            .all(|rc| rc.state == ContainerState::ContainerExited as i32);
        if !(gone || (c.dangling && dead)) {
            continue;
        }
        match std::fs::remove_file(&c.path) {
            Ok(()) => out.removed.push(c.path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => out.failed.push((c.path, e.to_string())),
        }
    }
    Ok(out)
}

/// [`sweep`] of the node's container logs directory, logged; a runtime
/// that does not answer is tried again at the next sweep.
pub async fn sweep_node(runtime: &dyn Runtime, dirs: &NodeDirs) {
    match sweep(runtime, &dirs.container_logs, &dirs.pod_logs).await {
        Ok(s) => {
            for link in &s.removed {
                tracing::info!(link = %link.display(), "removed the legacy log symlink of a container that is gone");
            }
            for (link, e) in &s.failed {
                tracing::warn!(link = %link.display(), error = %e, "failed to remove a legacy log symlink");
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "legacy log symlinks not swept: the runtime did not answer")
        }
    }
}

fn candidates(dir: &Path, pod_logs: &Path) -> Vec<Candidate> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let id = kubelet::container_id_of_legacy_log_symlink(&name)?.to_string();
            let path = e.path();
            let target = std::fs::read_link(&path).ok()?;
            if !target.starts_with(pod_logs) {
                return None;
            }
            let dangling = std::fs::metadata(&path).is_err();
            Some(Candidate { path, id, dangling })
        })
        .collect()
}
