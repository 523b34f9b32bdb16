//! What the runtime holds for one pod, read through the CRI: its sandboxes
//! and containers, found by the `io.kubernetes.pod.uid` label, newest first.
//! Also reads the termination messages of exited ephemeral containers, the
//! way the kubelet does (from the file bound at `terminationMessagePath`, or
//! the log tail for `FallbackToLogsOnError`), and the sandbox details
//! (cgroup parent, log directory) from containerd's verbose sandbox info.
//!
//! Owns: reading the runtime's view of a pod. Must not change anything in
//! the runtime.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::cri::proto::{ContainerFilter, ContainerState, PodSandboxFilter, PodSandboxState};
use crate::cri::{CriError, Runtime};
use crate::kubelet;

/// The most of a termination message the kubelet reads (bytes, from the end).
pub const MAX_TERMINATION_MESSAGE: u64 = 4096;
/// Log lines and bytes the kubelet keeps for `FallbackToLogsOnError`.
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;

/// One sandbox of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Runtime id.
    pub id: String,
    /// CRI attempt.
    pub attempt: u32,
    /// Whether the runtime reports it READY.
    pub ready: bool,
    /// Creation time, ns since the epoch.
    pub created_at: i64,
}

/// One container of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Container {
    /// Runtime id.
    pub id: String,
    /// `io.kubernetes.container.name`.
    pub name: String,
    /// Sandbox it belongs to.
    pub sandbox_id: String,
    /// CRI attempt.
    pub attempt: u32,
    /// CRI state.
    pub state: State,
    /// Timestamps in ns since the epoch; 0 when not reached.
    pub created_at: i64,
    /// Start time.
    pub started_at: i64,
    /// Exit time.
    pub finished_at: i64,
    /// Exit code, when exited.
    pub exit_code: i32,
    /// Runtime's reason (`Completed`, `Error`, `OOMKilled`).
    pub reason: String,
    /// Runtime's message plus the termination message, as the kubelet joins them.
    pub message: String,
    /// Image as the runtime names it.
    pub image: String,
    /// Image reference (digest) the runtime resolved.
    pub image_ref: String,
    /// Whether details came from ContainerStatus (only for ephemeral containers).
    pub detailed: bool,
}

/// The CRI container state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    /// Created, not started.
    #[default]
    Created,
    /// Running.
    Running,
    /// Exited.
    Exited,
    /// The runtime does not know.
    Unknown,
}

impl State {
    fn from_cri(v: i32) -> Self {
        match ContainerState::try_from(v) {
            Ok(ContainerState::ContainerCreated) => State::Created,
            Ok(ContainerState::ContainerRunning) => State::Running,
            Ok(ContainerState::ContainerExited) => State::Exited,
            _ => State::Unknown,
        }
    }
}

/// Everything the runtime holds for one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Sandboxes, newest first.
    pub sandboxes: Vec<Sandbox>,
    /// Containers of every sandbox of the pod, newest first.
    pub containers: Vec<Container>,
}

impl Observed {
    /// The newest sandbox, if it is ready (the kubelet recreates the sandbox
    /// otherwise, and starts no ephemeral container in that pass).
    pub fn ready_sandbox(&self) -> Option<&Sandbox> {
        self.sandboxes.first().filter(|s| s.ready)
    }

    /// The newest container with this name, from any sandbox of the pod.
    pub fn newest(&self, name: &str) -> Option<&Container> {
        self.containers.iter().find(|c| c.name == name)
    }
}

/// Lists the pod's sandboxes and containers; fetches full status for the
/// containers named in `detail` (the ephemeral ones).
pub async fn observe(
    rt: &dyn Runtime,
    pod_uid: &str,
    detail: &HashSet<&str>,
) -> Result<Observed, CriError> {
    observe_known(rt, pod_uid, detail, &HashMap::new()).await
}

/// Containers whose details do not change while their state does not: a
/// running container's start time and image, an exited one's exit code and
/// messages. Another observation may reuse them instead of asking again.
pub fn settled(observed: &Observed) -> HashMap<String, Container> {
    observed
        .containers
        .iter()
        .filter(|c| c.detailed && matches!(c.state, State::Running | State::Exited))
        .map(|c| (c.id.clone(), c.clone()))
        .collect()
}

/// [`observe`], reusing the details of `known` containers (from [`settled`])
/// whose listed state is unchanged, so a steady pod costs two list calls
/// however many ephemeral containers it has. The two lists, and the status
/// calls still needed, go to the runtime concurrently.
pub async fn observe_known(
    rt: &dyn Runtime,
    pod_uid: &str,
    detail: &HashSet<&str>,
    known: &HashMap<String, Container>,
) -> Result<Observed, CriError> {
    let by_uid = BTreeMap::from([(kubelet::POD_UID_LABEL.to_string(), pod_uid.to_string())]);
    let (listed_sandboxes, listed) = futures::try_join!(
        rt.list_pod_sandbox(Some(PodSandboxFilter {
            label_selector: by_uid.clone().into_iter().collect(),
            ..Default::default()
        })),
        rt.list_containers(Some(ContainerFilter {
            label_selector: by_uid.into_iter().collect(),
            ..Default::default()
        })),
    )?;
    let mut sandboxes: Vec<Sandbox> = listed_sandboxes
        .into_iter()
        .map(|s| Sandbox {
            attempt: s.metadata.as_ref().map_or(0, |m| m.attempt),
            ready: s.state == PodSandboxState::SandboxReady as i32,
            created_at: s.created_at,
            id: s.id,
        })
        .collect();
    sandboxes.sort_by_key(|s| std::cmp::Reverse(s.created_at));

    let listed: Vec<Container> = listed
        .into_iter()
        .map(|c| {
            let name = c
                .labels
                .get(kubelet::CONTAINER_NAME_LABEL)
                .cloned()
                .unwrap_or_default();
            Container {
                id: c.id.clone(),
                sandbox_id: c.pod_sandbox_id.clone(),
                attempt: c.metadata.as_ref().map_or(0, |m| m.attempt),
                state: State::from_cri(c.state),
                created_at: c.created_at,
                image: c
                    .image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or_default(),
                image_ref: c.image_ref.clone(),
                name,
                ..Default::default()
            }
        })
        .collect();
    let detailed = futures::future::join_all(listed.into_iter().map(|info| async move {
        if !detail.contains(info.name.as_str()) {
            return Ok(Some(info));
        }
        if let Some(k) = known.get(&info.id).filter(|k| k.state == info.state) {
            return Ok(Some(k.clone()));
        }
        details(rt, info).await
    }))
    .await;
    let mut containers = Vec::with_capacity(detailed.len());
    for c in detailed {
        containers.extend(c?);
    }
    containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
    Ok(Observed {
        sandboxes,
        containers,
    })
}

/// `info` completed from ContainerStatus; `None` when it is gone already.
async fn details(rt: &dyn Runtime, mut info: Container) -> Result<Option<Container>, CriError> {
    match rt.container_status(&info.id, false).await {
        Ok(resp) => {
            if let Some(s) = resp.status {
                info.state = State::from_cri(s.state);
                info.started_at = s.started_at;
                info.finished_at = s.finished_at;
                info.exit_code = s.exit_code;
                info.reason = s.reason.clone();
                info.image = s
                    .image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or(info.image);
                info.image_ref = s.image_ref.clone();
                info.message = s.message.clone();
                info.detailed = true;
                if info.state == State::Exited {
                    info.message = full_message(&s);
                }
            }
            Ok(Some(info))
        }
        // Removed between list and status: the next pass sees it gone.
        Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The runtime's message joined with the termination message (`msg: term`).
fn full_message(s: &crate::cri::proto::ContainerStatus) -> String {
    let path = s
        .annotations
        .get(kubelet::CONTAINER_TERMINATION_MESSAGE_PATH_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let policy = s
        .annotations
        .get(kubelet::CONTAINER_TERMINATION_MESSAGE_POLICY_ANNOTATION)
        .map(String::as_str)
        .unwrap_or(kubelet::DEFAULT_TERMINATION_MESSAGE_POLICY);
    let file = s
        .mounts
        .iter()
        .find(|m| !path.is_empty() && m.container_path == path)
        .map(|m| m.host_path.clone());
    let mut term = match &file {
        Some(f) => match read_tail(Path::new(f), MAX_TERMINATION_MESSAGE) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => format!("Error on reading termination log {f}: {e}"),
        },
        None => String::new(),
    };
    if term.is_empty()
        && policy == "FallbackToLogsOnError"
        && s.exit_code != 0
        && s.reason != "ContainerCannotRun"
    {
        term = match std::fs::read(&s.log_path) {
            Ok(bytes) => log_tail(&String::from_utf8_lossy(&bytes)),
            Err(e) => format!("Error on reading termination message from logs: {e}"),
        };
    }
    match (s.message.is_empty(), term.is_empty()) {
        (_, true) => s.message.clone(),
        (true, false) => term,
        (false, false) => format!("{}: {}", s.message, term),
    }
}

/// The last `max` bytes of a file, as text.
fn read_tail(path: &Path, max: u64) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The message part of the last lines of a CRI log file
/// (`<time> <stream> <P|F> <message>`), at most 80 lines and 2048 bytes.
pub fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(FALLBACK_LOG_LINES);
    let mut out = cri_log_messages(&lines[start..].join("\n"));
    if out.len() > FALLBACK_LOG_BYTES {
        let mut cut = out.len() - FALLBACK_LOG_BYTES;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = out[cut..].to_string();
    }
    out
}

/// The messages of a CRI log file, partial lines (`P`) joined.
pub fn cri_log_messages(log: &str) -> String {
    let mut out = String::new();
    for line in log.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_, _, tag, msg) = (parts.next(), parts.next(), parts.next(), parts.next());
        out.push_str(msg.unwrap_or_default());
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

/// What the agent needs from a sandbox to recreate its config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxDetails {
    /// cgroup parent the sandbox was created with.
    pub cgroup_parent: String,
    /// Its log directory.
    pub log_directory: Option<String>,
}

/// containerd's verbose sandbox info holds the config it was created with.
pub fn parse_sandbox_info(info: &str) -> SandboxDetails {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(info) else {
        return SandboxDetails::default();
    };
    let config = &v["config"];
    let linux = &config["linux"];
    let cgroup_parent = linux["cgroup_parent"]
        .as_str()
        .or(linux["cgroupParent"].as_str())
        .unwrap_or_default()
        .to_string();
    let log_directory = config["log_directory"]
        .as_str()
        .or(config["logDirectory"].as_str())
        .map(str::to_string);
    SandboxDetails {
        cgroup_parent,
        log_directory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_info_gives_cgroup_parent_and_log_dir() {
        let info = r#"{"pid":1,"config":{"log_directory":"/var/log/pods/ns_p_u",
            "linux":{"cgroup_parent":"/kubepods/besteffort/podu"}}}"#;
        assert_eq!(
            parse_sandbox_info(info),
            SandboxDetails {
                cgroup_parent: "/kubepods/besteffort/podu".into(),
                log_directory: Some("/var/log/pods/ns_p_u".into()),
            }
        );
        assert_eq!(parse_sandbox_info("not json"), SandboxDetails::default());
    }

    #[test]
    fn log_tail_strips_the_cri_prefix_and_joins_partials() {
        let log = "2024-01-01T00:00:00.1Z stdout F hello\n\
                   2024-01-01T00:00:00.2Z stderr P par\n\
                   2024-01-01T00:00:00.3Z stderr F tial\n";
        assert_eq!(log_tail(log), "hello\npartial\n");
    }

    #[test]
    fn log_tail_keeps_the_last_2048_bytes() {
        let line = format!("t stdout F {}\n", "x".repeat(100));
        let log = line.repeat(100);
        let tail = log_tail(&log);
        assert_eq!(tail.len(), 2048);
    }

    #[test]
    fn ready_sandbox_is_only_the_newest() {
        let sb = |id: &str, ready, created_at| Sandbox {
            id: id.into(),
            attempt: 0,
            ready,
            created_at,
        };
        let o = Observed {
            sandboxes: vec![sb("new", false, 2), sb("old", true, 1)],
            containers: vec![],
        };
        assert!(
            o.ready_sandbox().is_none(),
            "an older ready sandbox does not count"
        );
    }
}
