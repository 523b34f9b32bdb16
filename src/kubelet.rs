//! The kubelet's conventions on the node, which ephemerald reproduces so that
//! `crictl`, log collectors and a kubelet on the same node take our containers
//! for ordinary containers of the pod: label and annotation keys, their value
//! formats, the container hash, and the log and pod directory layout.
//! (From the kubelet's `pkg/kubelet/kuberuntime/labels.go` and `helpers.go`.)
//!
//! Owns: names and formats only; no I/O. Must not depend on the rest of
//! the agent: everything else builds on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};

/// Label: the pod's name.
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
/// Label: the pod's namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Label: the pod's UID; the key for finding a pod's sandboxes and containers.
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// Label: the container's name in the pod spec.
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";

/// Annotation: hash of the container spec, lower-case hex.
pub const CONTAINER_HASH_ANNOTATION: &str = "io.kubernetes.container.hash";
/// Annotation: restart count (the CRI attempt), decimal.
pub const CONTAINER_RESTART_COUNT_ANNOTATION: &str = "io.kubernetes.container.restartCount";
/// Annotation: `terminationMessagePath` of the spec.
pub const CONTAINER_TERMINATION_MESSAGE_PATH_ANNOTATION: &str =
    "io.kubernetes.container.terminationMessagePath";
/// Annotation: `terminationMessagePolicy` of the spec.
pub const CONTAINER_TERMINATION_MESSAGE_POLICY_ANNOTATION: &str =
    "io.kubernetes.container.terminationMessagePolicy";
/// Annotation: the pod's `metadata.deletionGracePeriodSeconds`, when set.
pub const POD_DELETION_GRACE_PERIOD_ANNOTATION: &str = "io.kubernetes.pod.deletionGracePeriod";
/// Annotation: the pod's `spec.terminationGracePeriodSeconds`, when set.
pub const POD_TERMINATION_GRACE_PERIOD_ANNOTATION: &str =
    "io.kubernetes.pod.terminationGracePeriod";

/// The API server's default for `terminationMessagePath`.
pub const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The API server's default for `terminationMessagePolicy`.
pub const DEFAULT_TERMINATION_MESSAGE_POLICY: &str = "File";
/// Annotation that marks a mirror pod (the API copy of a static pod).
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Labels of the pod sandbox: the pod's own labels plus the three pod keys.
pub fn sandbox_labels(pod: &Pod) -> BTreeMap<String, String> {
    let mut labels = pod.metadata.labels.clone().unwrap_or_default();
    labels.insert(POD_NAME_LABEL.into(), name(pod).into());
    labels.insert(POD_NAMESPACE_LABEL.into(), namespace(pod).into());
    labels.insert(POD_UID_LABEL.into(), uid(pod).into());
    labels
}

/// Annotations of the pod sandbox (and of the image requests): the pod's own.
pub fn pod_annotations(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.annotations.clone().unwrap_or_default()
}

/// Labels of a container of the pod: exactly the four `io.kubernetes.*` keys.
pub fn container_labels(pod: &Pod, container_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (POD_NAME_LABEL.into(), name(pod).into()),
        (POD_NAMESPACE_LABEL.into(), namespace(pod).into()),
        (POD_UID_LABEL.into(), uid(pod).into()),
        (CONTAINER_NAME_LABEL.into(), container_name.into()),
    ])
}

/// Annotations of a container, as the kubelet writes them.
pub fn container_annotations(
    pod: &Pod,
    name: &str,
    image: &str,
    termination_message_path: &str,
    termination_message_policy: &str,
    restart_count: u32,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([
        (
            CONTAINER_HASH_ANNOTATION.into(),
            format!("{:x}", container_hash(name, image)),
        ),
        (
            CONTAINER_RESTART_COUNT_ANNOTATION.into(),
            restart_count.to_string(),
        ),
        (
            CONTAINER_TERMINATION_MESSAGE_PATH_ANNOTATION.into(),
            termination_message_path.into(),
        ),
        (
            CONTAINER_TERMINATION_MESSAGE_POLICY_ANNOTATION.into(),
            termination_message_policy.into(),
        ),
    ]);
    if let Some(secs) = pod.metadata.deletion_grace_period_seconds {
        a.insert(
            POD_DELETION_GRACE_PERIOD_ANNOTATION.into(),
            secs.to_string(),
        );
    }
    if let Some(secs) = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
    {
        a.insert(
            POD_TERMINATION_GRACE_PERIOD_ANNOTATION.into(),
            secs.to_string(),
        );
    }
    a
}

/// The kubelet's container hash (`HashContainer`): FNV-1a (32 bit) over the
/// JSON object `{"image":…,"name":…}`, where the bytes are first rendered the
/// way the kubelet's `DeepHashObject` prints a byte slice with go-spew
/// (`([]uint8)[123 34 …]`). Only name and image count since Kubernetes 1.31,
/// so the hash of a container does not change with unrelated spec fields.
pub fn container_hash(name: &str, image: &str) -> u32 {
    // Go's encoder escapes <, > and & in strings; serde_json does not.
    let json = serde_json::json!({ "image": image, "name": name })
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let mut printed = String::from("([]uint8)[");
    for (i, b) in json.bytes().enumerate() {
        if i > 0 {
            printed.push(' ');
        }
        printed.push_str(&b.to_string());
    }
    printed.push(']');
    fnv1a32(printed.as_bytes())
}

fn fnv1a32(data: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in data {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// `<logs>/<namespace>_<name>_<uid>`: the pod's log directory, given to the
/// runtime as the sandbox's `log_directory`.
pub fn pod_log_dir(pod_logs_root: &Path, pod: &Pod) -> PathBuf {
    pod_logs_root.join(format!("{}_{}_{}", namespace(pod), name(pod), uid(pod)))
}

/// `<pod log dir>/<container>`: where a container's `<attempt>.log` files live.
pub fn container_log_dir(pod_logs_root: &Path, pod: &Pod, container: &str) -> PathBuf {
    pod_log_dir(pod_logs_root, pod).join(container)
}

/// `<container>/<attempt>.log`: the CRI `log_path`, relative to the sandbox's
/// log directory.
pub fn container_log_path(container: &str, attempt: u32) -> String {
    format!("{container}/{attempt}.log")
}

/// The longest file name ext4 allows; the kubelet cuts legacy log link
/// names to it (`ext4MaxFileNameLen`).
pub const MAX_FILE_NAME_LEN: usize = 255;

/// `<dir>/<pod>_<namespace>_<container>-<id>.log`: the legacy log symlink
/// the kubelet makes for every container it starts (`legacyLogSymlink`,
/// `logSymlink` in `kuberuntime/legacy.go`), which node log collectors
/// read. A name longer than the file-name limit is cut before `.log`, as
/// the kubelet does (it may cut into the container id).
pub fn legacy_log_symlink(
    dir: &Path,
    pod_name: &str,
    namespace: &str,
    container: &str,
    container_id: &str,
) -> PathBuf {
    const SUFFIX: &str = ".log";
    let mut name = format!("{pod_name}_{namespace}_{container}-{container_id}");
    let max = MAX_FILE_NAME_LEN - SUFFIX.len();
    if name.len() > max {
        // Names and ids are ASCII; a cut never splits a character anyway.
        let mut cut = max;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    dir.join(name + SUFFIX)
}

/// The container id (or the start of it, for a cut name) in a legacy log
/// link's file name (`getContainerIDFromLegacyLogSymlink`): what follows
/// the last `-`, before `.log`, at least 6 characters.
pub fn container_id_of_legacy_log_symlink(file_name: &str) -> Option<&str> {
    let id = file_name.rsplit('-').next()?.strip_suffix(".log")?;
    (id.len() >= 6).then_some(id)
}

/// The next attempt for a container that has no runtime container: one past
/// the highest `<n>.log` already in its log directory (the kubelet's
/// `calcRestartCountByLogDir`), so a recreated container never overwrites an
/// older log. Takes the file names found in the directory.
pub fn next_attempt_from_logs<'a>(file_names: impl IntoIterator<Item = &'a str>) -> u32 {
    file_names
        .into_iter()
        .filter_map(|f| f.strip_suffix(".log")?.parse::<u32>().ok())
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

/// `<pods>/<uid>`: the kubelet's per-pod directory (`/var/lib/kubelet/pods/<uid>`).
pub fn pod_dir(pods_root: &Path, pod: &Pod) -> PathBuf {
    pods_root.join(uid(pod))
}

/// `<pod dir>/etc-hosts`: the hosts file the kubelet writes for the pod and
/// mounts at `/etc/hosts` in every container of a pod with its own network.
pub fn etc_hosts_path(pods_root: &Path, pod: &Pod) -> PathBuf {
    pod_dir(pods_root, pod).join("etc-hosts")
}

/// `<pod dir>/containers/<name>/<file>`: host side of a container's
/// termination-message file.
pub fn termination_log_path(pods_root: &Path, pod: &Pod, container: &str, file: &str) -> PathBuf {
    pod_dir(pods_root, pod)
        .join("containers")
        .join(container)
        .join(file)
}

/// The terminationMessagePath of an ephemeral container, with the API default.
pub fn termination_message_path(c: &EphemeralContainer) -> &str {
    c.termination_message_path
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH)
}

/// The terminationMessagePolicy of an ephemeral container, with the API default.
pub fn termination_message_policy(c: &EphemeralContainer) -> &str {
    c.termination_message_policy
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or(DEFAULT_TERMINATION_MESSAGE_POLICY)
}

/// Whether the pod is the API copy of a static pod.
pub fn is_mirror_pod(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
}

/// `name_namespace(uid)`, the kubelet's `format.Pod`, used in its messages.
pub fn format_pod(pod: &Pod) -> String {
    format!("{}_{}({})", name(pod), namespace(pod), uid(pod))
}

/// The pod's name ("" when missing).
pub fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

/// The pod's namespace ("default" when missing, as the API server fills it).
pub fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

/// The pod's UID ("" when missing).
pub fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

/// The node: its directories in the kubelet's layout, and what the
/// kubelet reads from the host at start.
#[derive(Debug, Clone, Default)]
pub struct NodeDirs {
    /// Pod log directories (`/var/log/pods`).
    pub pod_logs: PathBuf,
    /// The kubelet's per-pod directories (`/var/lib/kubelet/pods`).
    pub pods: PathBuf,
    /// Where `Localhost` seccomp profiles live (`/var/lib/kubelet/seccomp`).
    pub seccomp: PathBuf,
    /// Where the legacy log symlinks go (`/var/log/containers`).
    pub container_logs: PathBuf,
    /// The host's memory, cgroup mode, huge page sizes, CPUs.
    pub host: crate::host::HostFacts,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("1234-abcd".into()),
                labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn legacy_log_symlinks_are_named_and_cut_like_the_kubelets() {
        let dir = Path::new("/var/log/containers");
        let id = "0123456789abcdef".repeat(4);
        let long = "p".repeat(240);
        // (rule, pod, namespace, container, link file name)
        let table = [
            (
                "<pod>_<namespace>_<container>-<id>.log",
                "web",
                "shop",
                "dbg",
                format!("web_shop_dbg-{id}.log"),
            ),
            (
                "cut to 255 bytes with .log kept, into the id",
                long.as_str(),
                "shop",
                "dbg",
                format!("{}.log", &format!("{long}_shop_dbg-{id}")[..251]),
            ),
        ];
        for (rule, pod, ns, c, want) in table {
            let got = legacy_log_symlink(dir, pod, ns, c, &id);
            assert_eq!(got, dir.join(&want), "{rule}");
            assert!(want.len() <= MAX_FILE_NAME_LEN, "{rule}");
        }
        let ids = [
            (format!("web_shop_dbg-{id}.log"), Some(id.as_str())),
            ("web_shop_my-dbg-abcdef.log".to_string(), Some("abcdef")),
            ("web_shop_dbg-abc.log".to_string(), None),
            ("web_shop_dbg-abcdefgh.txt".to_string(), None),
        ];
        for (name, want) in ids {
            assert_eq!(container_id_of_legacy_log_symlink(&name), want, "{name}");
        }
    }

    #[test]
    fn container_labels_are_exactly_the_four_keys() {
        let l = container_labels(&pod(), "dbg");
        assert_eq!(l.len(), 4);
        assert_eq!(l[POD_NAME_LABEL], "web");
        assert_eq!(l[POD_NAMESPACE_LABEL], "shop");
        assert_eq!(l[POD_UID_LABEL], "1234-abcd");
        assert_eq!(l[CONTAINER_NAME_LABEL], "dbg");
    }

    #[test]
    fn sandbox_labels_carry_the_pod_labels() {
        let l = sandbox_labels(&pod());
        assert_eq!(l["app"], "web");
        assert_eq!(l[POD_UID_LABEL], "1234-abcd");
        assert!(!l.contains_key(CONTAINER_NAME_LABEL));
    }

    #[test]
    fn annotations_use_the_kubelet_formats() {
        let mut p = pod();
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            termination_grace_period_seconds: Some(30),
            ..Default::default()
        });
        let a = container_annotations(&p, "dbg", "busybox", "/dev/termination-log", "File", 0);
        assert_eq!(a[CONTAINER_RESTART_COUNT_ANNOTATION], "0");
        assert_eq!(
            a[CONTAINER_TERMINATION_MESSAGE_PATH_ANNOTATION],
            "/dev/termination-log"
        );
        assert_eq!(a[CONTAINER_TERMINATION_MESSAGE_POLICY_ANNOTATION], "File");
        assert_eq!(a[POD_TERMINATION_GRACE_PERIOD_ANNOTATION], "30");
        assert!(!a.contains_key(POD_DELETION_GRACE_PERIOD_ANNOTATION));
        let hash = &a[CONTAINER_HASH_ANNOTATION];
        assert!(
            hash.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(
            u32::from_str_radix(hash, 16).unwrap(),
            container_hash("dbg", "busybox")
        );
    }

    #[test]
    fn fnv1a32_matches_the_reference_vectors() {
        // Published FNV-1a test vectors.
        assert_eq!(fnv1a32(b""), 0x811c9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn hash_depends_on_name_and_image_only() {
        assert_ne!(
            container_hash("a", "busybox"),
            container_hash("b", "busybox")
        );
        assert_ne!(
            container_hash("a", "busybox"),
            container_hash("a", "busybox:1")
        );
        assert_eq!(
            container_hash("a", "busybox"),
            container_hash("a", "busybox")
        );
    }

    #[test]
    fn log_paths_follow_the_kubelet_layout() {
        let root = Path::new("/var/log/pods");
        assert_eq!(
            container_log_dir(root, &pod(), "dbg"),
            Path::new("/var/log/pods/shop_web_1234-abcd/dbg")
        );
        assert_eq!(container_log_path("dbg", 2), "dbg/2.log");
    }

    #[test]
    fn next_attempt_skips_past_existing_logs() {
        let table: [(&[&str], u32); 4] = [
            (&[], 0),
            (&["0.log"], 1),
            (&["0.log", "3.log", "1.log"], 4),
            (&["notes.txt", "x.log", "0.log.20240101"], 0),
        ];
        for (files, want) in table {
            assert_eq!(
                next_attempt_from_logs(files.iter().copied()),
                want,
                "{files:?}"
            );
        }
    }

    #[test]
    fn format_pod_is_name_namespace_uid() {
        assert_eq!(format_pod(&pod()), "web_shop(1234-abcd)");
    }
}
