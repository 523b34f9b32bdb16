//! Table-driven tests of the spec → CRI translation, one rule per test.

use super::*;
use crate::cri::proto::{LinuxContainerSecurityContext, MountPropagation};
use crate::host::HostFacts;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodStatus, ResourceFieldSelector,
    SeccompProfile, SecretEnvSource, SecretKeySelector, Volume, VolumeMount,
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
    refs: Referenced,
    host: HostFacts,
}

/// A cgroup v1 host with 8 GiB, memsw, 2 MiB and 1 GiB pages, no thermal
/// throttling directories.
fn host() -> HostFacts {
    HostFacts {
        memory_capacity: 8 << 30,
        cgroup2: false,
        swap_controller: true,
        hugepage_sizes: vec!["2MB".into(), "1GB".into()],
        thermal_throttle: vec![],
    }
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
            refs: Referenced::default(),
            host: host(),
        }
    }
    fn run(&self) -> Result<ContainerConfig, TranslateError> {
        let node = NodeDirs {
            pod_logs: "/var/log/pods".into(),
            pods: "/var/lib/kubelet/pods".into(),
            seccomp: "/var/lib/kubelet/seccomp".into(),
            container_logs: "/var/log/containers".into(),
            host: self.host.clone(),
        };
        container_config_with(
            &Inputs {
                pod: &self.pod,
                container: &self.container,
                target_id: self.target,
                image: &self.image,
                attempt: 0,
                host_files: &self.host_files,
                node: &node,
            },
            &self.refs,
        )
    }
    fn envs(&self) -> Result<Vec<(String, String)>, TranslateError> {
        Ok(self
            .run()?
            .envs
            .iter()
            .map(|kv| (kv.key.clone(), String::from_utf8(kv.value.clone()).unwrap()))
            .collect())
    }
    fn mounts(&self) -> Result<Vec<(String, String, bool)>, TranslateError> {
        Ok(self
            .run()?
            .mounts
            .into_iter()
            .map(|m| (m.container_path, m.host_path, m.readonly))
            .collect())
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

/// No requests or limits of its own, but the kubelet's resources for a
/// container without any (the details, per host and QoS class, are
/// `resources`' tests): `MilliCPUToShares(0)` = 2, the CFS period with no
/// quota, the QoS class's OOM score, zero hugetlb limits, no memory limit.
#[test]
fn resources_are_the_kubelets_minimum_for_a_container_that_requests_nothing() {
    let burstable = |mut p: Pod| {
        p.spec.as_mut().unwrap().containers = vec![k8s_openapi::api::core::v1::Container {
            name: "app".into(),
            resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                requests: Some(BTreeMap::from([("memory".into(), Quantity("1Gi".into()))])),
                ..Default::default()
            }),
            ..Default::default()
        }];
        p
    };
    let critical = |mut p: Pod| {
        let s = p.spec.as_mut().unwrap();
        s.priority_class_name = Some("system-node-critical".into());
        s.priority = Some(2_000_001_000);
        p
    };
    // (kubelet rule, pod, oom_score_adj)
    let table = [
        (
            "BestEffort pod: besteffortOOMScoreAdj",
            pod(PodSpec::default()),
            1000,
        ),
        (
            "Burstable pod, the ephemeral container requests nothing: 1000 - 0, kept below BestEffort",
            burstable(pod(PodSpec::default())),
            999,
        ),
        (
            "node-critical pod: guaranteedOOMScoreAdj",
            critical(pod(PodSpec::default())),
            -997,
        ),
    ];
    for (rule, p, oom) in table {
        let mut case = Case::new();
        case.pod = p;
        let r = case.run().unwrap().linux.unwrap().resources.unwrap();
        assert_eq!(r.cpu_shares, 2, "{rule}: MinShares");
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 0), "{rule}");
        assert_eq!(r.memory_limit_in_bytes, 0, "{rule}");
        assert_eq!(r.oom_score_adj, oom, "{rule}");
        assert_eq!(
            r.hugepage_limits
                .iter()
                .map(|h| (h.page_size.as_str(), h.limit))
                .collect::<Vec<_>>(),
            [("2MB", 0), ("1GB", 0)],
            "{rule}"
        );
        assert!(r.unified.is_empty(), "{rule}: cgroup v1");
    }
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

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn config_map_env(name: &str, map: &str, key: &str, optional: Option<bool>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: map.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        }),
    }
}

fn secret_env(name: &str, secret: &str, key: &str, optional: Option<bool>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        }),
    }
}

fn from_map(map: &str, prefix: Option<&str>, optional: Option<bool>) -> EnvFromSource {
    EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource {
            name: map.into(),
            optional,
        }),
        prefix: prefix.map(Into::into),
        secret_ref: None,
    }
}

fn from_secret(secret: &str, prefix: Option<&str>, optional: Option<bool>) -> EnvFromSource {
    EnvFromSource {
        config_map_ref: None,
        prefix: prefix.map(Into::into),
        secret_ref: Some(SecretEnvSource {
            name: secret.into(),
            optional,
        }),
    }
}

/// A ConfigMap `settings` {LEVEL: debug, MODE: $(LEVEL)} and a Secret
/// `creds` {user: admin, pass: s3cret}.
fn refs() -> Referenced {
    Referenced {
        config_maps: BTreeMap::from([(
            "settings".to_string(),
            Some(BTreeMap::from([
                ("LEVEL".to_string(), "debug".to_string()),
                ("MODE".to_string(), "$(LEVEL)".to_string()),
            ])),
        )]),
        secrets: BTreeMap::from([(
            "creds".to_string(),
            Some(BTreeMap::from([
                ("user".to_string(), b"admin".to_vec()),
                ("pass".to_string(), b"s3cret".to_vec()),
            ])),
        )]),
        claims: BTreeMap::new(),
        node_allocatable: None,
        services: vec![],
    }
}

#[test]
fn env_from_first_then_env_overrides_and_sources_are_verbatim() {
    let mut case = Case::new();
    case.refs = refs();
    case.container.env_from = Some(vec![
        from_map("settings", None, None),
        from_secret("creds", Some("DB_"), None),
    ]);
    case.container.env = Some(vec![
        env("LEVEL", "info"),
        env("URL", "$(DB_user)@db/$(LEVEL)"),
        config_map_env("COPY", "settings", "MODE", None),
        secret_env("PASSWORD", "creds", "pass", None),
    ]);
    case.container.command = Some(vec!["echo".into(), "$(PASSWORD)".into()]);
    assert_eq!(
        case.envs().unwrap(),
        pairs(&[
            ("LEVEL", "info"),
            ("MODE", "$(LEVEL)"),
            ("DB_pass", "s3cret"),
            ("DB_user", "admin"),
            ("URL", "admin@db/info"),
            ("COPY", "$(LEVEL)"),
            ("PASSWORD", "s3cret"),
        ])
    );
    assert_eq!(case.run().unwrap().command, ["echo", "s3cret"]);
}

#[test]
fn optional_sources_and_keys_leave_the_variable_unset() {
    let mut case = Case::new();
    case.refs = refs();
    case.container.env_from = Some(vec![
        from_map("absent", None, Some(true)),
        from_secret("gone", Some("X_"), Some(true)),
        from_map("settings", None, None),
    ]);
    case.container.env = Some(vec![
        config_map_env("A", "absent", "k", Some(true)),
        config_map_env("B", "settings", "nokey", Some(true)),
        secret_env("C", "gone", "k", Some(true)),
        secret_env("D", "creds", "nokey", Some(true)),
        // A skipped optional keeps what envFrom set.
        config_map_env("LEVEL", "settings", "nokey", Some(true)),
    ]);
    assert_eq!(
        case.envs().unwrap(),
        pairs(&[("LEVEL", "debug"), ("MODE", "$(LEVEL)")])
    );
}

#[test]
fn missing_sources_and_keys_are_errors_in_the_kubelets_words() {
    let table: [(&str, Option<EnvFromSource>, Option<EnvVar>, &str); 6] = [
        (
            "configMapKeyRef, no such ConfigMap",
            None,
            Some(config_map_env("A", "absent", "k", None)),
            "configmap \"absent\" not found",
        ),
        (
            "configMapKeyRef, no such key",
            None,
            Some(config_map_env("A", "settings", "k", Some(false))),
            "couldn't find key k in ConfigMap shop/settings",
        ),
        (
            "secretKeyRef, no such Secret",
            None,
            Some(secret_env("A", "gone", "k", None)),
            "secret \"gone\" not found",
        ),
        (
            "secretKeyRef, no such key",
            None,
            Some(secret_env("A", "creds", "token", None)),
            "couldn't find key token in Secret shop/creds",
        ),
        (
            "envFrom ConfigMap",
            Some(from_map("absent", Some("P_"), None)),
            None,
            "configmap \"absent\" not found",
        ),
        (
            "envFrom Secret",
            Some(from_secret("gone", None, Some(false))),
            None,
            "secret \"gone\" not found",
        ),
    ];
    for (name, from, var, want) in table {
        let mut case = Case::new();
        case.refs = refs();
        case.container.env_from = from.map(|f| vec![f]);
        case.container.env = var.map(|v| vec![v]);
        assert_eq!(case.run().unwrap_err().to_string(), want, "{name}");
    }
    // Without anything read (`container_config`), a reference reads as missing.
    let mut case = Case::new();
    case.container.env = Some(vec![secret_env("A", "creds", "user", None)]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "secret \"creds\" not found"
    );
}

#[test]
fn resource_field_refs_read_the_node_allocatable() {
    let cpu = |divisor: Option<&str>| EnvVar {
        name: "CPU".into(),
        value: None,
        value_from: Some(EnvVarSource {
            resource_field_ref: Some(ResourceFieldSelector {
                resource: "limits.cpu".into(),
                divisor: divisor.map(|d| Quantity(d.into())),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let mut case = Case::new();
    case.container.env = Some(vec![cpu(None)]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "the allocatable resources of node \"node-a\" are unknown"
    );
    case.refs.node_allocatable = Some(BTreeMap::from([(
        "cpu".to_string(),
        Quantity("3500m".into()),
    )]));
    case.container.env = Some(vec![cpu(None), env("MILLI", "$(CPU)000")]);
    assert_eq!(
        case.envs().unwrap(),
        pairs(&[("CPU", "4"), ("MILLI", "4000")])
    );
    case.container.env = Some(vec![cpu(Some("1m"))]);
    assert_eq!(case.envs().unwrap(), pairs(&[("CPU", "3500")]));
}

#[test]
fn unknown_field_paths_and_sources_are_refused_clearly() {
    let mut case = Case::new();
    case.container.env = Some(vec![EnvVar {
        name: "FILE".into(),
        value: None,
        value_from: Some(EnvVarSource::default()),
    }]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "env var \"FILE\": valueFrom has no source ephemerald supports"
    );
    let mut case = Case::new();
    case.container.env = Some(vec![field_env("X", "spec.bogus")]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "unsupported fieldPath: spec.bogus"
    );

    let mut case = Case::new();
    case.container.env = Some(vec![field_env(
        "GRACE",
        "spec.terminationGracePeriodSeconds",
    )]);
    assert_eq!(case.envs().unwrap(), pairs(&[("GRACE", "30")]));
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

/// `ConvertToRuntimeMaskedPaths` / `ConvertToRuntimeReadonlyPaths` (1.36):
/// the default lists (with `/proc/interrupts`, and the host's CPU
/// `thermal_throttle` directories after them) unless `procMount: Unmasked`,
/// which masks nothing and makes nothing read-only.
#[test]
fn masked_and_read_only_paths_follow_proc_mount() {
    let thermal = "/sys/devices/system/cpu/cpu0/thermal_throttle".to_string();
    let defaults: Vec<String> = DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect();
    let readonly: Vec<String> = DEFAULT_READONLY_PATHS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let with_thermal: Vec<String> = defaults.iter().cloned().chain([thermal.clone()]).collect();
    // (rule, procMount, the host's thermal_throttle dirs, masked, read-only)
    type Row<'a> = (
        &'a str,
        Option<&'a str>,
        Vec<String>,
        Vec<String>,
        Vec<String>,
    );
    let table: [Row; 4] = [
        (
            "no procMount: the defaults",
            None,
            vec![],
            defaults.clone(),
            readonly.clone(),
        ),
        (
            "procMount Default: the defaults",
            Some("Default"),
            vec![],
            defaults.clone(),
            readonly.clone(),
        ),
        (
            "the host's thermal_throttle directories are masked after the defaults",
            None,
            vec![thermal.clone()],
            with_thermal,
            readonly.clone(),
        ),
        (
            "procMount Unmasked: nothing",
            Some("Unmasked"),
            vec![thermal],
            vec![],
            vec![],
        ),
    ];
    for (rule, proc_mount, thermal, masked, ro) in table {
        let mut case = Case::new();
        case.host.thermal_throttle = thermal;
        case.container.security_context = Some(SecurityContext {
            privileged: Some(true),
            proc_mount: proc_mount.map(Into::into),
            ..Default::default()
        });
        let sc = case.sc();
        assert!(sc.privileged, "{rule}");
        assert_eq!(sc.masked_paths, masked, "{rule}");
        assert_eq!(sc.readonly_paths, ro, "{rule}");
    }
    assert!(DEFAULT_MASKED_PATHS.contains(&"/proc/interrupts"));
    assert_eq!(DEFAULT_MASKED_PATHS.len(), 12);
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

/// `determineEffectiveSecurityContext` with `getImageUser`: without a
/// `runAsUser` the image's numeric user is `run_as_user`, a user name is
/// `run_as_username`, and an image that names no user runs as uid 0 —
/// always set, as the kubelet sets it.
#[test]
fn image_user_is_the_fallback() {
    // (rule, runAsUser, image uid, image user name, run_as_user, run_as_username)
    let table = [
        ("numeric image user", None, Some(65534), "", Some(65534), ""),
        ("named image user", None, None, "nobody", None, "nobody"),
        (
            "no image user: root, said explicitly",
            None,
            None,
            "",
            Some(0),
            "",
        ),
        (
            "runAsUser wins over the image",
            Some(1000),
            Some(65534),
            "",
            Some(1000),
            "",
        ),
        (
            "runAsUser wins over a named user",
            Some(1000),
            None,
            "nobody",
            Some(1000),
            "",
        ),
    ];
    for (rule, run_as, uid, name, want_uid, want_name) in table {
        let mut case = Case::new();
        case.image.uid = uid;
        case.image.username = name.into();
        case.container.security_context = run_as.map(|u| SecurityContext {
            run_as_user: Some(u),
            ..Default::default()
        });
        let sc = case.sc();
        assert_eq!(sc.run_as_user.map(|u| u.value), want_uid, "{rule}");
        assert_eq!(sc.run_as_username, want_name, "{rule}");
    }
}

/// `supplementalGroupsPolicy` of the pod goes to the runtime; one the CRI
/// has no value for is the kubelet's config error.
#[test]
fn supplemental_groups_policy_is_passed_on() {
    let with = |policy: Option<&str>| {
        let mut case = Case::new();
        case.pod = pod(PodSpec {
            security_context: Some(PodSecurityContext {
                supplemental_groups_policy: policy.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        });
        case.run().map(|c| {
            c.linux
                .unwrap()
                .security_context
                .unwrap()
                .supplemental_groups_policy
        })
    };
    let merge = proto::SupplementalGroupsPolicy::Merge as i32;
    let strict = proto::SupplementalGroupsPolicy::Strict as i32;
    assert_eq!(with(None), Ok(merge));
    assert_eq!(with(Some("Merge")), Ok(merge));
    assert_eq!(with(Some("Strict")), Ok(strict));
    assert_eq!(
        with(Some("Loose")).unwrap_err().to_string(),
        "unsupported supplementalGroupsPolicy: Loose"
    );
}

fn service(ns: &str, name: &str, ip: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ip: Some(ip.into()),
            ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
                name: Some("https".into()),
                port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `makeEnvironmentVariables`: the container's own variables first, then
/// the service variables it does not set; `$(VAR)` in a value and in the
/// command sees the service variables; with `enableServiceLinks: false`
/// only the master service's.
#[test]
fn service_variables_come_after_the_containers_own_and_never_override_them() {
    let services = vec![
        service("default", "kubernetes", "10.96.0.1", 443),
        service("shop", "web", "10.96.7.7", 8443),
    ];
    let mut case = Case::new();
    case.refs.services = services.clone();
    case.container.env = Some(vec![
        env("KUBERNETES_SERVICE_PORT", "6443"),
        env(
            "API",
            "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)",
        ),
    ]);
    case.container.args = Some(vec!["-c".into(), "curl $(WEB_SERVICE_HOST)".into()]);
    let envs = case.envs().unwrap();
    assert_eq!(
        envs[..2],
        pairs(&[
            ("KUBERNETES_SERVICE_PORT", "6443"),
            ("API", "https://10.96.0.1:6443"),
        ])[..],
        "the container's own first; its value wins"
    );
    let services_env: Vec<&str> = envs[2..].iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        services_env.contains(&"KUBERNETES_SERVICE_HOST"),
        "{services_env:?}"
    );
    assert!(
        services_env.contains(&"WEB_PORT_8443_TCP_ADDR"),
        "{services_env:?}"
    );
    assert!(
        !services_env.contains(&"KUBERNETES_SERVICE_PORT"),
        "set once, by the container: {services_env:?}"
    );
    assert_eq!(case.run().unwrap().args, ["-c", "curl 10.96.7.7"]);

    let mut case = Case::new();
    case.refs.services = services;
    case.pod.spec.as_mut().unwrap().enable_service_links = Some(false);
    let names: Vec<String> = case.envs().unwrap().into_iter().map(|(k, _)| k).collect();
    assert!(
        names.iter().all(|k| k.starts_with("KUBERNETES_")),
        "{names:?}"
    );
    assert_eq!(names.len(), 8, "{names:?}");
}

#[test]
fn run_as_non_root_is_enforced_with_the_kubelets_messages() {
    let non_root = |user: Option<i64>| SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: user,
        ..Default::default()
    };
    // (runAsUser, image uid, image username) -> error prefix, or None when
    // allowed. An image that names no user at all runs as root.
    type Row = (Option<i64>, Option<i64>, &'static str, Option<&'static str>);
    let table: [Row; 6] = [
        (
            None,
            None,
            "",
            Some("container has runAsNonRoot and image will run as root"),
        ),
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

fn volume(name: &str, source: serde_json::Value) -> Volume {
    let mut v = source;
    v["name"] = serde_json::json!(name);
    serde_json::from_value(v).unwrap()
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..Default::default()
    }
}

fn bound(pv: &str, source: ClaimSource) -> BoundClaim {
    BoundClaim {
        pv: pv.into(),
        source,
    }
}

/// Each volume type, mounted at `/<name>`, lands on the directory the
/// kubelet's plugin set it up in; the atomic-writer types are read-only.
#[test]
fn volume_types_map_to_the_kubelets_directories() {
    use serde_json::json;
    let vols = "/var/lib/kubelet/pods/uid-1/volumes";
    let table = [
        (
            volume("empty", json!({"emptyDir": {}})),
            format!("{vols}/kubernetes.io~empty-dir/empty"),
            false,
        ),
        (
            volume("mem", json!({"emptyDir": {"medium": "Memory"}})),
            format!("{vols}/kubernetes.io~empty-dir/mem"),
            false,
        ),
        (
            volume(
                "host",
                json!({"hostPath": {"path": "/var/log", "type": "Directory"}}),
            ),
            "/var/log".to_string(),
            false,
        ),
        (
            volume("cfg", json!({"configMap": {"name": "settings"}})),
            format!("{vols}/kubernetes.io~configmap/cfg"),
            true,
        ),
        (
            volume("sec", json!({"secret": {"secretName": "creds"}})),
            format!("{vols}/kubernetes.io~secret/sec"),
            true,
        ),
        (
            volume("proj", json!({"projected": {"sources": []}})),
            format!("{vols}/kubernetes.io~projected/proj"),
            true,
        ),
        (
            volume("down", json!({"downwardAPI": {"items": []}})),
            format!("{vols}/kubernetes.io~downward-api/down"),
            true,
        ),
        (
            volume("inline", json!({"csi": {"driver": "d"}})),
            format!("{vols}/kubernetes.io~csi/inline/mount"),
            false,
        ),
        (
            volume(
                "inline-ro",
                json!({"csi": {"driver": "d", "readOnly": true}}),
            ),
            format!("{vols}/kubernetes.io~csi/inline-ro/mount"),
            true,
        ),
        (
            volume(
                "pvc-csi",
                json!({"persistentVolumeClaim": {"claimName": "c1"}}),
            ),
            format!("{vols}/kubernetes.io~csi/pv-1/mount"),
            false,
        ),
        (
            volume(
                "pvc-ro",
                json!({"persistentVolumeClaim": {"claimName": "c1", "readOnly": true}}),
            ),
            format!("{vols}/kubernetes.io~csi/pv-1/mount"),
            true,
        ),
        (
            volume(
                "pvc-local",
                json!({"persistentVolumeClaim": {"claimName": "c2"}}),
            ),
            format!("{vols}/kubernetes.io~local-volume/pv-2"),
            false,
        ),
        (
            volume(
                "pvc-host",
                json!({"persistentVolumeClaim": {"claimName": "c3"}}),
            ),
            "/srv/pv-3".to_string(),
            false,
        ),
        (
            volume(
                "pvc-nfs",
                json!({"persistentVolumeClaim": {"claimName": "c4"}}),
            ),
            format!("{vols}/kubernetes.io~nfs/pv-4"),
            false,
        ),
        (
            volume(
                "scratch",
                json!({"ephemeral": {"volumeClaimTemplate": {"spec": {}}}}),
            ),
            format!("{vols}/kubernetes.io~csi/pv-5/mount"),
            false,
        ),
    ];
    let mut case = Case::new();
    case.refs.claims = BTreeMap::from([
        ("c1".to_string(), bound("pv-1", ClaimSource::Csi)),
        ("c2".to_string(), bound("pv-2", ClaimSource::Local)),
        (
            "c3".to_string(),
            bound("pv-3", ClaimSource::HostPath("/srv/pv-3".into())),
        ),
        ("c4".to_string(), bound("pv-4", ClaimSource::Nfs)),
        ("web-scratch".to_string(), bound("pv-5", ClaimSource::Csi)),
    ]);
    case.pod = pod(PodSpec {
        volumes: Some(table.iter().map(|(v, _, _)| v.clone()).collect()),
        ..Default::default()
    });
    case.container.volume_mounts = Some(
        table
            .iter()
            .map(|(v, _, _)| mount(&v.name, &format!("/{}", v.name)))
            .collect(),
    );
    let want: Vec<(String, String, bool)> = table
        .iter()
        .map(|(v, host, ro)| (format!("/{}", v.name), host.clone(), *ro))
        .collect();
    assert_eq!(case.mounts().unwrap(), want);
}

#[test]
fn mount_propagation_like_the_kubelet() {
    let table = [
        (None, Ok(MountPropagation::PropagationPrivate)),
        (Some("None"), Ok(MountPropagation::PropagationPrivate)),
        (
            Some("HostToContainer"),
            Ok(MountPropagation::PropagationHostToContainer),
        ),
        (
            Some("Bidirectional"),
            Ok(MountPropagation::PropagationBidirectional),
        ),
        (
            Some("Shared"),
            Err("invalid MountPropagation mode: \"Shared\""),
        ),
    ];
    for (mode, want) in table {
        let mut case = Case::new();
        case.pod = pod(PodSpec {
            volumes: Some(vec![volume(
                "host",
                serde_json::json!({"hostPath": {"path": "/mnt"}}),
            )]),
            ..Default::default()
        });
        case.container.volume_mounts = Some(vec![VolumeMount {
            mount_propagation: mode.map(Into::into),
            ..mount("host", "/mnt")
        }]);
        let got = case
            .run()
            .map(|c| c.mounts[0].propagation)
            .map_err(|e| e.to_string());
        assert_eq!(
            got,
            want.map(|p| p as i32).map_err(str::to_string),
            "{mode:?}"
        );
    }
}

#[test]
fn volumes_the_agent_cannot_locate_are_clear_config_errors() {
    use serde_json::json;
    let table = [
        (
            volume(
                "unbound",
                json!({"persistentVolumeClaim": {"claimName": "pending"}}),
            ),
            None,
            "volume \"unbound\": persistentvolumeclaim \"pending\" is not bound to a persistent volume",
        ),
        (
            volume("disk", json!({"persistentVolumeClaim": {"claimName": "c"}})),
            None,
            "volume \"disk\": persistent volume \"pv-9\" is of type iscsi; ephemerald can mount csi, hostPath, local and nfs persistent volumes",
        ),
        (
            volume(
                "old",
                json!({"iscsi": {"targetPortal": "t", "iqn": "i", "lun": 0}}),
            ),
            None,
            "volume \"old\": only hostPath, emptyDir, configMap, secret, projected, downwardAPI, csi, persistentVolumeClaim and ephemeral volumes can be mounted by ephemerald",
        ),
        (
            volume("ro", json!({"emptyDir": {}})),
            Some("Enabled"),
            "volume \"ro\": recursiveReadOnly: Enabled is not supported by ephemerald",
        ),
    ];
    let mut case = Case::new();
    case.container.volume_devices = Some(vec![k8s_openapi::api::core::v1::VolumeDevice {
        name: "raw".into(),
        device_path: "/dev/xvda".into(),
    }]);
    assert_eq!(
        case.run().unwrap_err().to_string(),
        "volumeDevices are not supported by ephemerald (volume \"raw\")"
    );
    for (vol, rro, want) in table {
        let mut case = Case::new();
        case.refs.claims = BTreeMap::from([(
            "c".to_string(),
            bound("pv-9", ClaimSource::Other("iscsi".into())),
        )]);
        case.container.volume_mounts = Some(vec![VolumeMount {
            read_only: Some(true),
            recursive_read_only: rro.map(Into::into),
            ..mount(&vol.name, "/v")
        }]);
        case.pod = pod(PodSpec {
            volumes: Some(vec![vol]),
            ..Default::default()
        });
        assert_eq!(case.run().unwrap_err().to_string(), want);
    }
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
