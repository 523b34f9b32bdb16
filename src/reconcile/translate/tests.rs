//! Table-driven tests of the spec → CRI translation, one rule per test.

use super::*;
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, PodStatus, SeccompProfile,
    SecretKeySelector, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn pod(spec: PodSpec) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some("uid-1".into()),
            labels: Some(BTreeMap::from([("tier".into(), "front".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            termination_grace_period_seconds: Some(30),
            node_name: Some("node-a".into()),
            ..spec
        }),
        status: Some(PodStatus {
            pod_ip: Some("10.0.0.7".into()),
            host_ip: Some("192.168.1.2".into()),
            ..Default::default()
        }),
    }
}

fn debug() -> EphemeralContainer {
    EphemeralContainer {
        name: "dbg".into(),
        image: Some("busybox:1.36".into()),
        command: Some(vec!["sh".into()]),
        args: Some(vec!["-c".into(), "ps".into()]),
        target_container_name: Some("app".into()),
        ..Default::default()
    }
}

struct Case {
    pod: Pod,
    container: EphemeralContainer,
    target: Option<&'static str>,
    image: ResolvedImage,
    host_files: HostFiles,
}

impl Case {
    fn new() -> Self {
        Case {
            pod: pod(PodSpec::default()),
            container: debug(),
            target: Some("app-id"),
            image: ResolvedImage {
                id: "sha256:abc".into(),
                ..Default::default()
            },
            host_files: HostFiles::default(),
        }
    }
    fn run(&self) -> Result<ContainerConfig, TranslateError> {
        let node = NodeDirs {
            pod_logs: "/var/log/pods".into(),
            pods: "/var/lib/kubelet/pods".into(),
            seccomp: "/var/lib/kubelet/seccomp".into(),
        };
        container_config(&Inputs {
            pod: &self.pod,
            container: &self.container,
            target_id: self.target,
            image: &self.image,
            attempt: 0,
            host_files: &self.host_files,
            node: &node,
        })
    }
    fn sc(&self) -> LinuxContainerSecurityContext {
        self.run().unwrap().linux.unwrap().security_context.unwrap()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

#[test]
fn metadata_image_command_and_log_path() {
    let cfg = Case::new().run().unwrap();
    let md = cfg.metadata.unwrap();
    assert_eq!((md.name.as_str(), md.attempt), ("dbg", 0));
    let image = cfg.image.unwrap();
    assert_eq!(image.image, "sha256:abc", "the resolved id, not the tag");
    assert_eq!(image.user_specified_image, "busybox:1.36");
    assert_eq!(cfg.command, ["sh"]);
    assert_eq!(cfg.args, ["-c", "ps"]);
    assert_eq!(cfg.log_path, "dbg/0.log");
}

#[test]
fn labels_and_annotations_are_the_kubelets() {
    let cfg = Case::new().run().unwrap();
    assert_eq!(cfg.labels.len(), 4, "{:?}", cfg.labels);
    assert_eq!(cfg.labels[kubelet::POD_UID_LABEL], "uid-1");
    assert_eq!(cfg.labels[kubelet::CONTAINER_NAME_LABEL], "dbg");
    let a = &cfg.annotations;
    let keys: Vec<_> = a
        .keys()
        .map(String::as_str)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        keys,
        [
            "io.kubernetes.container.hash",
            "io.kubernetes.container.restartCount",
            "io.kubernetes.container.terminationMessagePath",
            "io.kubernetes.container.terminationMessagePolicy",
            "io.kubernetes.pod.terminationGracePeriod",
        ]
    );
    assert_eq!(
        a["io.kubernetes.container.terminationMessagePath"],
        "/dev/termination-log"
    );
    assert_eq!(
        a["io.kubernetes.container.terminationMessagePolicy"],
        "File"
    );
    assert_eq!(a["io.kubernetes.pod.terminationGracePeriod"], "30");
}

#[test]
fn no_resources_ever() {
    let cfg = Case::new().run().unwrap();
    assert!(cfg.linux.unwrap().resources.is_none());
}

#[test]
fn pid_namespace_modes() {
    // (hostPID, shareProcessNamespace, target) -> (pid mode, target_id)
    let table = [
        (
            false,
            false,
            Some("app-id"),
            NamespaceMode::Target,
            "app-id",
        ),
        (false, false, None, NamespaceMode::Container, ""),
        (false, true, Some("app-id"), NamespaceMode::Pod, ""),
        (true, false, Some("app-id"), NamespaceMode::Node, ""),
        (true, true, None, NamespaceMode::Node, ""),
    ];
    for (host_pid, share, target, want, want_id) in table {
        let mut case = Case::new();
        case.pod = pod(PodSpec {
            host_pid: Some(host_pid),
            share_process_namespace: Some(share),
            ..Default::default()
        });
        case.target = target;
        let ns = case.sc().namespace_options.unwrap();
        assert_eq!(
            ns.pid, want as i32,
            "hostPID={host_pid} share={share} target={target:?}"
        );
        assert_eq!(ns.target_id, want_id);
    }
}

#[test]
fn network_and_ipc_follow_the_pod() {
    let table = [
        (false, false, NamespaceMode::Pod, NamespaceMode::Pod),
        (true, false, NamespaceMode::Node, NamespaceMode::Pod),
        (false, true, NamespaceMode::Pod, NamespaceMode::Node),
    ];
    for (host_net, host_ipc, net, ipc) in table {
        let mut case = Case::new();
        case.pod = pod(PodSpec {
            host_network: Some(host_net),
            host_ipc: Some(host_ipc),
            ..Default::default()
        });
        let ns = case.sc().namespace_options.unwrap();
        assert_eq!((ns.network, ns.ipc), (net as i32, ipc as i32));
    }
}

#[test]
fn env_literals_field_refs_and_expansion() {
    let mut case = Case::new();
    case.container.env = Some(vec![
        env("A", "one"),
        env("B", "$(A)-two"),
        env("C", "$(MISSING) $$(A) $"),
        field_env("POD", "metadata.name"),
        field_env("NS", "metadata.namespace"),
        field_env("UID", "metadata.uid"),
        field_env("NODE", "spec.nodeName"),
        field_env("IP", "status.podIP"),
        field_env("HOST", "status.hostIP"),
        field_env("TIER", "metadata.labels['tier']"),
        env("A", "replaced"),
    ]);
    case.container.args = Some(vec!["$(B)".into(), "$(NOPE)".into()]);
    let cfg = case.run().unwrap();
    let got: Vec<(String, String)> = cfg
        .envs
        .iter()
        .map(|kv| (kv.key.clone(), String::from_utf8(kv.value.clone()).unwrap()))
        .collect();
    let want = [
        ("A", "replaced"),
        ("B", "one-two"),
        ("C", "$(MISSING) $(A) $"),
        ("POD", "web"),
        ("NS", "shop"),
        ("UID", "uid-1"),
        ("NODE", "node-a"),
        ("IP", "10.0.0.7"),
        ("HOST", "192.168.1.2"),
        ("TIER", "front"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(cfg.args, ["one-two", "$(NOPE)"]);
}

#[test]
fn expansion_rules() {
    let vars = |n: &str| if n == "X" { Some("x") } else { None };
    let table = [
        ("$(X)", "x"),
        ("a$(X)b", "axb"),
        ("$$(X)", "$(X)"),
        ("$(Y)", "$(Y)"),
        ("$(X", "$(X"),
        ("$", "$"),
        ("$a", "$a"),
        ("$$", "$"),
        ("", ""),
    ];
    for (input, want) in table {
        assert_eq!(expand(input, vars), want, "{input:?}");
    }
}

#[test]
fn unsupported_env_sources_are_reported_not_dropped() {
    let mut case = Case::new();
    case.container.env = Some(vec![EnvVar {
        name: "TOKEN".into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: "s".into(),
                key: "k".into(),
                optional: None,
            }),
            ..Default::default()
        }),
    }]);
    let err = case.run().unwrap_err();
    assert_eq!(
        err,
        TranslateError::UnsupportedEnvSource {
            name: "TOKEN".into(),
            source_kind: "secretKeyRef"
        }
    );
    assert!(err.to_string().contains("TOKEN"));

    let mut case = Case::new();
    case.container.env = Some(vec![field_env("X", "spec.bogus")]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "unsupported fieldPath: spec.bogus"
    );
}

#[test]
fn security_context_fields() {
    let mut case = Case::new();
    case.pod = pod(PodSpec {
        security_context: Some(PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(3000),
            fs_group: Some(2000),
            supplemental_groups: Some(vec![4000, 5000]),
            ..Default::default()
        }),
        ..Default::default()
    });
    case.container.security_context = Some(SecurityContext {
        capabilities: Some(Capabilities {
            add: Some(vec!["SYS_PTRACE".into()]),
            drop: Some(vec!["ALL".into()]),
        }),
        run_as_user: Some(1001),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        ..Default::default()
    });
    let sc = case.sc();
    let caps = sc.capabilities.unwrap();
    assert_eq!(
        caps.add_capabilities,
        ["SYS_PTRACE"],
        "no CAP_ prefix added"
    );
    assert_eq!(caps.drop_capabilities, ["ALL"]);
    assert_eq!(
        sc.run_as_user.unwrap().value,
        1001,
        "container wins over pod"
    );
    assert_eq!(sc.run_as_group.unwrap().value, 3000, "pod value inherited");
    assert!(sc.readonly_rootfs);
    assert!(sc.no_new_privs);
    assert!(!sc.privileged);
    assert_eq!(sc.supplemental_groups, [2000, 4000, 5000], "fsGroup first");
    assert_eq!(sc.masked_paths.len(), DEFAULT_MASKED_PATHS.len());
    assert_eq!(sc.readonly_paths.len(), DEFAULT_READONLY_PATHS.len());
}

#[test]
fn no_new_privs_only_when_escalation_is_denied() {
    for (allow, want) in [(None, false), (Some(true), false), (Some(false), true)] {
        let mut case = Case::new();
        case.container.security_context = Some(SecurityContext {
            allow_privilege_escalation: allow,
            ..Default::default()
        });
        assert_eq!(case.sc().no_new_privs, want, "{allow:?}");
    }
}

#[test]
fn privileged_and_unmasked_proc() {
    let mut case = Case::new();
    case.container.security_context = Some(SecurityContext {
        privileged: Some(true),
        proc_mount: Some("Unmasked".into()),
        ..Default::default()
    });
    let sc = case.sc();
    assert!(sc.privileged);
    assert!(sc.masked_paths.is_empty() && sc.readonly_paths.is_empty());
}

#[test]
fn seccomp_profiles() {
    let prof = |t: &str, l: Option<&str>| SeccompProfile {
        type_: t.into(),
        localhost_profile: l.map(Into::into),
    };
    // (pod profile, container profile) -> (type, localhost_ref)
    let table = [
        (None, None, ProfileType::Unconfined, ""),
        (
            Some(prof("RuntimeDefault", None)),
            None,
            ProfileType::RuntimeDefault,
            "",
        ),
        (
            Some(prof("RuntimeDefault", None)),
            Some(prof("Unconfined", None)),
            ProfileType::Unconfined,
            "",
        ),
        (
            None,
            Some(prof("Localhost", Some("profiles/audit.json"))),
            ProfileType::Localhost,
            "/var/lib/kubelet/seccomp/profiles/audit.json",
        ),
    ];
    for (pod_p, c_p, want, want_ref) in table {
        let mut case = Case::new();
        case.pod = pod(PodSpec {
            security_context: Some(PodSecurityContext {
                seccomp_profile: pod_p.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
        case.container.security_context = Some(SecurityContext {
            seccomp_profile: c_p.clone(),
            ..Default::default()
        });
        let s = case.sc().seccomp.unwrap();
        assert_eq!(
            (s.profile_type, s.localhost_ref.as_str()),
            (want as i32, want_ref)
        );
    }
}

#[test]
fn image_user_is_the_fallback() {
    let mut case = Case::new();
    case.image.uid = Some(65534);
    assert_eq!(case.sc().run_as_user.unwrap().value, 65534);

    let mut case = Case::new();
    case.image.username = "nobody".into();
    let sc = case.sc();
    assert!(sc.run_as_user.is_none());
    assert_eq!(sc.run_as_username, "nobody");
}

#[test]
fn run_as_non_root_is_enforced_with_the_kubelets_messages() {
    let non_root = |user: Option<i64>| SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: user,
        ..Default::default()
    };
    // (runAsUser, image uid, image username) -> error prefix, or None when allowed
    type Row = (Option<i64>, Option<i64>, &'static str, Option<&'static str>);
    let table: [Row; 5] = [
        (
            Some(0),
            None,
            "",
            Some("container's runAsUser breaks non-root policy"),
        ),
        (Some(1000), Some(0), "", None),
        (
            None,
            Some(0),
            "",
            Some("container has runAsNonRoot and image will run as root"),
        ),
        (
            None,
            None,
            "app",
            Some("container has runAsNonRoot and image has non-numeric user (app)"),
        ),
        (None, Some(1000), "", None),
    ];
    for (user, uid, username, want) in table {
        let mut case = Case::new();
        case.container.security_context = Some(non_root(user));
        case.image.uid = uid;
        case.image.username = username.into();
        match (case.run(), want) {
            (Ok(_), None) => {}
            (Err(TranslateError::NonRoot(msg)), Some(prefix)) => {
                assert!(msg.starts_with(prefix), "{msg}");
                assert!(
                    msg.ends_with("(pod: \"web_shop(uid-1)\", container: dbg)"),
                    "{msg}"
                );
            }
            (got, want) => panic!("user={user:?} uid={uid:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn stdin_tty_and_working_dir() {
    let mut case = Case::new();
    case.container.stdin = Some(true);
    case.container.stdin_once = Some(true);
    case.container.tty = Some(true);
    case.container.working_dir = Some("/tmp".into());
    let cfg = case.run().unwrap();
    assert!(cfg.stdin && cfg.stdin_once && cfg.tty);
    assert_eq!(cfg.working_dir, "/tmp");
}

#[test]
fn mounts_in_kubelet_order() {
    let mut case = Case::new();
    case.pod = pod(PodSpec {
        volumes: Some(vec![
            Volume {
                name: "data".into(),
                empty_dir: Some(Default::default()),
                ..Default::default()
            },
            Volume {
                name: "host".into(),
                host_path: Some(k8s_openapi::api::core::v1::HostPathVolumeSource {
                    path: "/srv".into(),
                    type_: None,
                }),
                ..Default::default()
            },
        ]),
        ..Default::default()
    });
    case.container.volume_mounts = Some(vec![
        VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "host".into(),
            mount_path: "/srv".into(),
            mount_propagation: Some("HostToContainer".into()),
            ..Default::default()
        },
    ]);
    case.host_files = HostFiles {
        etc_hosts: Some("/var/lib/kubelet/pods/uid-1/etc-hosts".into()),
        termination_log: Some("/var/lib/kubelet/pods/uid-1/containers/dbg/0a1b2c3d".into()),
    };
    let m = case.run().unwrap().mounts;
    let got: Vec<(&str, &str, bool)> = m
        .iter()
        .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.readonly))
        .collect();
    assert_eq!(
        got,
        [
            (
                "/data",
                "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/data",
                true
            ),
            ("/srv", "/srv", false),
            ("/etc/hosts", "/var/lib/kubelet/pods/uid-1/etc-hosts", false),
            (
                "/dev/termination-log",
                "/var/lib/kubelet/pods/uid-1/containers/dbg/0a1b2c3d",
                false
            ),
        ]
    );
    assert_eq!(
        m[1].propagation,
        MountPropagation::PropagationHostToContainer as i32
    );
}

#[test]
fn missing_volume_is_a_config_error() {
    let mut case = Case::new();
    case.container.volume_mounts = Some(vec![VolumeMount {
        name: "nope".into(),
        mount_path: "/x".into(),
        ..Default::default()
    }]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "cannot find volume \"nope\" to mount into container \"dbg\""
    );
}

#[test]
fn kubelet_hash_matches_its_own_test_vector() {
    // pkg/kubelet/container: name "test_container", image "foo/image:v1" hashes to 0x8e45cbd0.
    assert_eq!(
        kubelet::container_hash("test_container", "foo/image:v1"),
        0x8e45cbd0
    );
}

#[test]
fn sandbox_config_like_the_kubelet() {
    let p = pod(PodSpec::default());
    let cfg = sandbox_config(&p, Path::new("/var/log/pods"), 0, "/kubepods/podx");
    assert_eq!(cfg.hostname, "web");
    assert_eq!(cfg.log_directory, "/var/log/pods/shop_web_uid-1");
    assert_eq!(cfg.labels["tier"], "front");
    assert_eq!(cfg.labels[kubelet::POD_UID_LABEL], "uid-1");
    let linux = cfg.linux.unwrap();
    assert_eq!(linux.cgroup_parent, "/kubepods/podx");
    let ns = linux.security_context.unwrap().namespace_options.unwrap();
    assert_eq!(ns.pid, NamespaceMode::Container as i32);

    let host = pod(PodSpec {
        host_network: Some(true),
        ..Default::default()
    });
    let cfg = sandbox_config(&host, Path::new("/var/log/pods"), 1, "");
    assert_eq!(cfg.hostname, "", "host network needs an empty hostname");
    assert_eq!(cfg.metadata.unwrap().attempt, 1);
}
