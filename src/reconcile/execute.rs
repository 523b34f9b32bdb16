//! Starting one ephemeral container, step by step as the kubelet's
//! `startContainer` does: ensure the image (pull policy, pull secrets),
//! read the ConfigMaps, Secrets, Node and claims the spec refers to
//! ([`super::refs`]), prepare the host side (log directory,
//! termination-message file), build the config, check that the pod volumes
//! it mounts are set up, CreateContainer, StartContainer, the legacy log
//! symlink ([`super::logs`]) — with the
//! kubelet's Events and waiting reasons. A container someone else created first is adopted,
//! never duplicated.
//!
//! Owns: the steps of one start and their Events and waiting reasons. Must
//! not decide whether to start (that is `plan`) nor remember failures (that
//! is the pass, in `memory`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};

use super::image::{self, PullPolicy};
use super::refs;
use super::translate::{self, HostFiles, NodeDirs, Referenced, ResolvedImage, TranslateError};
use crate::cri::proto::{
    AuthConfig, ContainerConfig, ContainerFilter, ImageSpec, PodSandboxConfig,
};
use crate::cri::{CriError, Runtime};
use crate::k8s::{Cluster, ContainerEvent, EventSink, EventType, K8sError};
use crate::kubelet;

/// The kubelet's waiting reasons for a container that could not start.
pub mod reason {
    /// The spec could not be turned into a runtime config.
    pub const CREATE_CONTAINER_CONFIG: &str = "CreateContainerConfigError";
    /// CreateContainer failed.
    pub const CREATE_CONTAINER: &str = "CreateContainerError";
    /// StartContainer failed.
    pub const RUN_CONTAINER: &str = "RunContainerError";
    /// Pulling the image failed.
    pub const ERR_IMAGE_PULL: &str = "ErrImagePull";
    /// Waiting before the next pull attempt.
    pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
    /// The image name does not parse.
    pub const INVALID_IMAGE_NAME: &str = "InvalidImageName";
    /// The image is missing and the policy is Never.
    pub const ERR_IMAGE_NEVER_PULL: &str = "ErrImageNeverPull";
    /// The runtime could not tell whether the image is present.
    pub const IMAGE_INSPECT: &str = "ImageInspectError";
}

/// What a start needs besides the pod and container.
pub struct StartContext<'a> {
    /// The runtime.
    pub runtime: &'a dyn Runtime,
    /// Event sink.
    pub events: &'a dyn EventSink,
    /// The node's directories.
    pub dirs: &'a NodeDirs,
    /// The ready sandbox to start in.
    pub sandbox_id: &'a str,
    /// Its config, as the kubelet would regenerate it.
    pub sandbox_config: &'a PodSandboxConfig,
    /// Credentials from the pod's pull secrets that match the image.
    pub pull_auths: &'a [AuthConfig],
}

/// How a start ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// We created and started it.
    Started {
        /// Runtime id.
        id: String,
        /// Phase timings.
        timings: Timings,
    },
    /// Someone else (a kubelet) had already created it: adopted, not duplicated.
    Adopted {
        /// Runtime id of the existing container.
        id: String,
    },
}

/// Wall-clock phases of one start, for the timeline and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    /// Ensuring the image (status or pull).
    pub image: Duration,
    /// CreateContainer.
    pub create: Duration,
    /// StartContainer.
    pub start: Duration,
    /// When CreateContainer was issued.
    pub create_issued: SystemTime,
    /// When CreateContainer returned.
    pub created_at: SystemTime,
    /// When StartContainer returned.
    pub started_at: SystemTime,
}

/// Why a start failed: the waiting reason and message the status shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailure {
    /// A waiting reason from [`reason`].
    pub reason: &'static str,
    /// The message (the runtime's own words where it answered).
    pub message: String,
    /// Whether a later attempt may succeed without a spec change.
    pub retryable: bool,
    /// Set when the container was created but did not start; the kubelet
    /// leaves it and never tries again.
    pub created_id: Option<String>,
}

impl StartFailure {
    fn new(reason: &'static str, message: impl Into<String>, retryable: bool) -> Self {
        StartFailure {
            reason,
            message: message.into(),
            retryable,
            created_id: None,
        }
    }
}

/// Starts `c` in the pod's ready sandbox, with `target_id` as the PID target,
/// without reading anything from the API server (a reference to a
/// ConfigMap, Secret or claim reads as missing).
pub async fn start(
    cx: &StartContext<'_>,
    pod: &Pod,
    c: &EphemeralContainer,
    target_id: Option<&str>,
) -> Result<Started, StartFailure> {
    start_with(cx, None, pod, c, target_id).await
}

/// [`start`], reading the ConfigMaps, Secrets and claims `c` refers to from
/// `cluster` after the image is ensured (the kubelet's order: image, then
/// the container's config).
pub async fn start_with(
    cx: &StartContext<'_>,
    cluster: Option<&dyn Cluster>,
    pod: &Pod,
    c: &EphemeralContainer,
    target_id: Option<&str>,
) -> Result<Started, StartFailure> {
    let event = |type_, reason, msg: String| {
        cx.events
            .record(ContainerEvent::new(pod, &c.name, type_, reason, msg))
    };
    let fail_event = |msg: &str| event(EventType::Warning, "Failed", format!("Error: {msg}"));

    let t0 = Instant::now();
    let image = match ensure_image(cx, pod, c).await {
        Ok(i) => i,
        Err(f) => {
            fail_event(f.reason);
            return Err(f);
        }
    };
    let image_took = t0.elapsed();
    let (attempt, config) = container_config(cx, cluster, pod, c, target_id, &image).await?;

    // A log of an earlier attempt may be another creator's: it may have
    // started this container after the caller looked at the runtime (the log
    // appears at start), and then the attempts differ and the runtime's name
    // reservation cannot catch the race. Looking again after reading the log
    // directory closes it: a creator that starts later collides with us on
    // the reserved name instead.
    if attempt > 0
        && let Some(id) = existing(cx, pod, c).await
    {
        return Ok(adopted(pod, c, id));
    }
    create_and_start(cx, pod, c, config, image_took).await
}

/// The CRI config of `c` (and its attempt), with everything it needs read
/// and prepared first: the objects it refers to, its host files, its
/// volumes; any failure is the kubelet's `CreateContainerConfigError`.
async fn container_config(
    cx: &StartContext<'_>,
    cluster: Option<&dyn Cluster>,
    pod: &Pod,
    c: &EphemeralContainer,
    target_id: Option<&str>,
    image: &ResolvedImage,
) -> Result<(u32, ContainerConfig), StartFailure> {
    let fail_event = |msg: &str| {
        cx.events.record(ContainerEvent::new(
            pod,
            &c.name,
            EventType::Warning,
            "Failed",
            format!("Error: {msg}"),
        ))
    };
    let config_error = |e: String| {
        fail_event(&e);
        StartFailure::new(reason::CREATE_CONTAINER_CONFIG, e, true)
    };
    let refs = match cluster {
        Some(cluster) => refs::read(cluster, pod, c).await.map_err(|e| {
            // The API server's own words where it answered, as the kubelet shows them.
            config_error(match e {
                K8sError::Api { message, .. } => message,
                other => other.to_string(),
            })
        })?,
        None => Referenced::default(),
    };
    let (attempt, host_files) =
        prepare_host(cx.dirs, pod, c).map_err(|e| config_error(e.to_string()))?;
    let config = translate::container_config_with(
        &translate::Inputs {
            pod,
            container: c,
            target_id,
            image,
            attempt,
            host_files: &host_files,
            node: cx.dirs,
        },
        &refs,
    )
    .map_err(|e: TranslateError| config_error(e.to_string()))?;
    check_volumes_set_up(cx.dirs, pod, &config.mounts).map_err(config_error)?;
    Ok((attempt, config))
}

/// CreateContainer + StartContainer with the kubelet's Events; a name the
/// runtime reserves for someone else means another creator: adopt it.
async fn create_and_start(
    cx: &StartContext<'_>,
    pod: &Pod,
    c: &EphemeralContainer,
    config: ContainerConfig,
    image_took: Duration,
) -> Result<Started, StartFailure> {
    let event = |type_, reason, msg: String| {
        cx.events
            .record(ContainerEvent::new(pod, &c.name, type_, reason, msg))
    };
    let fail_event = |msg: &str| event(EventType::Warning, "Failed", format!("Error: {msg}"));

    let log_file = Path::new(&cx.sandbox_config.log_directory).join(&config.log_path);
    let t1 = Instant::now();
    let create_issued = SystemTime::now();
    let id = match cx
        .runtime
        .create_container(cx.sandbox_id, config, cx.sandbox_config.clone())
        .await
    {
        Ok(id) => id,
        Err(e) if e.is_name_reserved() => return adopt(cx, pod, c, &e).await,
        Err(e) => {
            fail_event(&e.message());
            return Err(StartFailure::new(
                reason::CREATE_CONTAINER,
                e.message(),
                e.is_retryable(),
            ));
        }
    };
    let create_took = t1.elapsed();
    let created_at = SystemTime::now();
    tracing::info!(pod = kubelet::name(pod), container = %c.name, id = %id, "created ephemeral container");
    event(
        EventType::Normal,
        "Created",
        format!("Created container: {}", c.name),
    );

    let t2 = Instant::now();
    if let Err(e) = cx.runtime.start_container(&id).await {
        // The kubelet names the container instead of its id in the Event.
        fail_event(&e.message().replace(&id, &c.name));
        return Err(StartFailure {
            created_id: Some(id),
            ..StartFailure::new(reason::RUN_CONTAINER, e.message(), false)
        });
    }
    let start_took = t2.elapsed();
    tracing::info!(pod = kubelet::name(pod), container = %c.name, id = %id, "started ephemeral container");
    // The kubelet names the link after the sandbox's metadata, which is the pod's.
    let meta = cx.sandbox_config.metadata.clone().unwrap_or_default();
    match super::logs::link(
        &cx.dirs.container_logs,
        &meta.name,
        &meta.namespace,
        &c.name,
        &id,
        &log_file,
    ) {
        Ok(Some(link)) => {
            tracing::debug!(container = %c.name, link = %link.display(), "legacy log symlink")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(container = %c.name, id = %id, log = %log_file.display(),
            error = %e, "failed to create legacy symbolic link"),
    }
    event(
        EventType::Normal,
        "Started",
        format!("Started container {}", c.name),
    );
    Ok(Started::Started {
        id,
        timings: Timings {
            image: image_took,
            create: create_took,
            start: start_took,
            create_issued,
            created_at,
            started_at: SystemTime::now(),
        },
    })
}

/// The runtime refused the name: another creator (a kubelet) holds it.
async fn adopt(
    cx: &StartContext<'_>,
    pod: &Pod,
    c: &EphemeralContainer,
    err: &CriError,
) -> Result<Started, StartFailure> {
    match existing(cx, pod, c).await {
        Some(id) => Ok(adopted(pod, c, id)),
        // Reserved but not listed yet: the other creator is mid-way. Look again later.
        None => Err(StartFailure::new(
            reason::CREATE_CONTAINER,
            err.message(),
            true,
        )),
    }
}

/// The newest runtime container of this pod with this container name.
async fn existing(cx: &StartContext<'_>, pod: &Pod, c: &EphemeralContainer) -> Option<String> {
    let mut labels = kubelet::container_labels(pod, &c.name);
    labels.retain(|k, _| k == kubelet::POD_UID_LABEL || k == kubelet::CONTAINER_NAME_LABEL);
    let mut found = cx
        .runtime
        .list_containers(Some(ContainerFilter {
            label_selector: labels.into_iter().collect(),
            ..Default::default()
        }))
        .await
        .ok()?;
    found.sort_by_key(|c| std::cmp::Reverse(c.created_at));
    found.into_iter().next().map(|c| c.id)
}

fn adopted(pod: &Pod, c: &EphemeralContainer, id: String) -> Started {
    tracing::info!(pod = kubelet::name(pod), container = %c.name, id = %id,
        "adopt: the runtime already holds this ephemeral container; not creating another");
    Started::Adopted { id }
}

/// The kubelet's `EnsureImageExists` with its Events.
async fn ensure_image(
    cx: &StartContext<'_>,
    pod: &Pod,
    c: &EphemeralContainer,
) -> Result<ResolvedImage, StartFailure> {
    let requested = c.image.clone().unwrap_or_default();
    let event = |type_, reason, msg: String| {
        cx.events
            .record(ContainerEvent::new(pod, &c.name, type_, reason, msg))
    };
    let image = match image::with_default_tag(&requested) {
        Ok(i) => i,
        Err(e) => {
            let msg = format!("Failed to apply default image tag {requested:?}: {e}");
            event(EventType::Warning, "InspectFailed", msg.clone());
            return Err(StartFailure::new(reason::INVALID_IMAGE_NAME, msg, false));
        }
    };
    let spec = ImageSpec {
        image: image.clone(),
        annotations: kubelet::pod_annotations(pod).into_iter().collect(),
        ..Default::default()
    };
    let policy = image::pull_policy(c);
    if policy != PullPolicy::Always {
        let present = match cx.runtime.image_status(spec.clone()).await {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("Failed to inspect image \"\": {}", e.message());
                event(EventType::Warning, "InspectFailed", msg.clone());
                return Err(StartFailure::new(reason::IMAGE_INSPECT, msg, true));
            }
        };
        match (present, policy) {
            (Some(img), _) => {
                event(
                    EventType::Normal,
                    "Pulled",
                    format!("Container image {requested:?} already present on machine"),
                );
                return Ok(resolved(img));
            }
            (None, PullPolicy::Never) => {
                let msg = format!(
                    "Container image {requested:?} is not present with pull policy of Never"
                );
                event(EventType::Warning, "ErrImageNeverPull", msg.clone());
                return Err(StartFailure::new(reason::ERR_IMAGE_NEVER_PULL, msg, true));
            }
            (None, _) => {}
        }
    }
    pull(cx, pod, c, spec, &requested).await
}

/// The pull half of `EnsureImageExists`: each pull secret that matches in
/// turn (or none), then the pulled image's status, with the kubelet's
/// Events and wording.
async fn pull(
    cx: &StartContext<'_>,
    pod: &Pod,
    c: &EphemeralContainer,
    spec: ImageSpec,
    requested: &str,
) -> Result<ResolvedImage, StartFailure> {
    let event = |type_, reason, msg: String| {
        cx.events
            .record(ContainerEvent::new(pod, &c.name, type_, reason, msg))
    };
    event(
        EventType::Normal,
        "Pulling",
        format!("Pulling image {requested:?}"),
    );
    let t = Instant::now();
    let mut last_err = None;
    let auths: Vec<Option<AuthConfig>> = if cx.pull_auths.is_empty() {
        vec![None]
    } else {
        cx.pull_auths.iter().cloned().map(Some).collect()
    };
    let mut image_ref = None;
    for auth in auths {
        match cx
            .runtime
            .pull_image(spec.clone(), auth, Some(cx.sandbox_config.clone()))
            .await
        {
            Ok(r) => {
                image_ref = Some(r);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some(image_ref) = image_ref else {
        // The kubelet's CRI client keeps gRPC's "rpc error: code = … desc = …"
        // wording for every pull error but UNKNOWN.
        let e = last_err
            .map(|e| match e.code() {
                Some(tonic::Code::Unknown) | None => e.message(),
                Some(_) => e.go_status_text(),
            })
            .unwrap_or_default();
        event(
            EventType::Warning,
            "Failed",
            format!("Failed to pull image {requested:?}: {e}"),
        );
        return Err(StartFailure::new(reason::ERR_IMAGE_PULL, e, true));
    };
    let took = t.elapsed();
    let status = cx
        .runtime
        .image_status(ImageSpec {
            image: image_ref.clone(),
            ..Default::default()
        })
        .await
        .ok()
        .flatten();
    let size = status.as_ref().map_or(0, |i| i.size);
    event(
        EventType::Normal,
        "Pulled",
        format!(
            "Successfully pulled image {requested:?} in {} ({} including waiting). Image size: {size} bytes.",
            go_duration(took),
            go_duration(took)
        ),
    );
    Ok(match status {
        Some(img) => ResolvedImage {
            id: image_ref,
            ..resolved(img)
        },
        None => ResolvedImage {
            id: image_ref,
            ..Default::default()
        },
    })
}

fn resolved(img: crate::cri::proto::Image) -> ResolvedImage {
    ResolvedImage {
        id: img.id,
        uid: img.uid.map(|u| u.value),
        username: img.username,
    }
}

/// A duration the way Go prints `Duration.Truncate(time.Millisecond)`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = format!("{:.3}", d.as_millis() as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    } else {
        let mins = ms / 60_000;
        let rest = (ms % 60_000) as f64 / 1000.0;
        let s = format!("{rest:.3}");
        format!("{mins}m{}s", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Host side of a start: the container's log directory and next attempt,
/// the termination-message file, and the pod's hosts file if it has one.
fn prepare_host(
    dirs: &NodeDirs,
    pod: &Pod,
    c: &EphemeralContainer,
) -> std::io::Result<(u32, HostFiles)> {
    let log_dir = kubelet::container_log_dir(&dirs.pod_logs, pod, &c.name);
    std::fs::create_dir_all(&log_dir).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "create container log directory for container {} failed: {e}",
                c.name
            ),
        )
    })?;
    let names: Vec<String> = std::fs::read_dir(&log_dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let attempt = kubelet::next_attempt_from_logs(names.iter().map(String::as_str));

    let etc_hosts = Some(kubelet::etc_hosts_path(&dirs.pods, pod)).filter(|p| p.is_file());
    let termination_log = if kubelet::termination_message_path(c).is_empty() {
        None
    } else {
        termination_file(&dirs.pods, pod, &c.name)
    };
    Ok((
        attempt,
        HostFiles {
            etc_hosts,
            termination_log,
        },
    ))
}

/// A mount of a volume the kubelet manages (under the pod's `volumes`
/// directory) must find it set up: the runtime would otherwise create an
/// empty directory in its place, and the container would see none of the
/// pod's data. The kubelet waits for its volume manager instead; here it is
/// a retried config error.
fn check_volumes_set_up(
    dirs: &NodeDirs,
    pod: &Pod,
    mounts: &[crate::cri::proto::Mount],
) -> Result<(), String> {
    let volumes = kubelet::pod_dir(&dirs.pods, pod).join("volumes");
    for m in mounts {
        let host = Path::new(&m.host_path);
        if host.starts_with(&volumes) && !host.exists() {
            return Err(format!(
                "volume for mount {} is not set up on this node: {} does not exist",
                m.container_path, m.host_path
            ));
        }
    }
    Ok(())
}

/// `<pods>/<uid>/containers/<name>/<8 hex>`, created empty and world-writable
/// so any container user can write its message. On failure the kubelet logs
/// and mounts nothing, and so do we.
fn termination_file(pods: &Path, pod: &Pod, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let file = format!("{:08x}", rand::random::<u32>());
    let path = kubelet::termination_log_path(pods, pod, name, &file);
    let made = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))?;
        std::fs::File::create(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
    })();
    match made {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "error on creating termination-log file");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_go() {
        let table = [
            (0, "0s"),
            (532, "532ms"),
            (1234, "1.234s"),
            (2000, "2s"),
            (62_500, "1m2.5s"),
        ];
        for (ms, want) in table {
            assert_eq!(go_duration(Duration::from_millis(ms)), want);
        }
    }
}
