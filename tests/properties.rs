//! Property tests: arbitrary pods and ephemeral container specs — the ones
//! an API server would refuse included — through validation, translation,
//! planning and status. None may panic, and each keeps its promises: the
//! refusals name only containers of the pod, a translated config reserves
//! nothing (the kubelet's minimum CPU weight, a QoS class's OOM score) and
//! carries exactly the kubelet's labels, the plan never starts a
//! container the runtime holds, and the status list is the spec's names,
//! sorted, with terminated entries kept.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use ephemerald::reconcile::image;
use ephemerald::reconcile::observe::{Container, Observed, Sandbox, State};
use ephemerald::reconcile::plan::{self, Action, Gates};
use ephemerald::reconcile::status::{self, Failure};
use ephemerald::reconcile::translate::{self, HostFiles, NodeDirs, ResolvedImage};
use ephemerald::{kubelet, validation};
use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Short strings: plausible names, odd characters, and nothing at all.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,10}",
        Just(String::new()),
        "[ -~]{0,24}",
        "\\PC{0,12}",
        Just("app".to_string()),
    ]
    .boxed()
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    prop::option::of(s)
}

fn image_ref() -> BoxedStrategy<String> {
    prop_oneof![
        Just("busybox".to_string()),
        Just("ephemerald.local/busybox:1.35".to_string()),
        "[a-z0-9./:-]{0,30}",
        "[a-z]{1,8}(:[a-z0-9]{1,6})?(@sha256:[0-9a-f]{64})?",
        text(),
    ]
    .boxed()
}

fn field_path() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "metadata.name",
            "metadata.namespace",
            "metadata.uid",
            "metadata.labels",
            "metadata.annotations",
            "spec.nodeName",
            "spec.serviceAccountName",
            "status.podIP",
            "status.hostIP",
            "status.podIPs",
        ])
        .prop_map(String::from),
        text().prop_map(|k| format!("metadata.labels['{k}']")),
        text().prop_map(|k| format!("metadata.annotations['{k}']")),
        text(),
    ]
    .boxed()
}

fn env_var() -> BoxedStrategy<Value> {
    let value_from = prop_oneof![
        (field_path(), opt(text()))
            .prop_map(|(p, v)| json!({"fieldRef": {"fieldPath": p, "apiVersion": v}})),
        (text(), text(), opt(any::<bool>()))
            .prop_map(|(n, k, o)| json!({"configMapKeyRef": {"name": n, "key": k, "optional": o}})),
        (text(), text(), opt(any::<bool>()))
            .prop_map(|(n, k, o)| json!({"secretKeyRef": {"name": n, "key": k, "optional": o}})),
        (text(), opt(text()))
            .prop_map(|(r, c)| json!({"resourceFieldRef": {"resource": r, "containerName": c}})),
    ];
    (text(), opt(text()), opt(value_from))
        .prop_map(|(name, value, from)| json!({"name": name, "value": value, "valueFrom": from}))
        .boxed()
}

fn volume_mount() -> BoxedStrategy<Value> {
    (
        prop_oneof![Just("data".to_string()), Just("host".to_string()), text()],
        text(),
        opt(any::<bool>()),
        opt(text()),
        opt(prop_oneof![
            Just("None".to_string()),
            Just("HostToContainer".to_string()),
            Just("Bidirectional".to_string()),
            text()
        ]),
    )
        .prop_map(|(name, path, ro, sub, prop)| {
            json!({"name": name, "mountPath": path, "readOnly": ro, "subPath": sub,
                   "mountPropagation": prop})
        })
        .boxed()
}

fn security_context() -> BoxedStrategy<Value> {
    (
        opt(any::<bool>()),
        opt(any::<i64>()),
        opt(any::<i64>()),
        opt(any::<bool>()),
        prop::collection::vec(text(), 0..3),
        prop::collection::vec(text(), 0..3),
        opt((
            prop_oneof![
                Just("RuntimeDefault".to_string()),
                Just("Unconfined".to_string()),
                Just("Localhost".to_string()),
                text()
            ],
            opt(text()),
        )),
        opt(any::<bool>()),
        opt(text()),
    )
        .prop_map(|(priv_, user, group, non_root, add, drop, seccomp, ro, proc_mount)| {
            json!({
                "privileged": priv_, "runAsUser": user, "runAsGroup": group,
                "runAsNonRoot": non_root, "capabilities": {"add": add, "drop": drop},
                "seccompProfile": seccomp.map(|(t, p)| json!({"type": t, "localhostProfile": p})),
                "readOnlyRootFilesystem": ro, "procMount": proc_mount,
            })
        })
        .boxed()
}

/// An ephemeral container, with any of the fields the API server forbids.
fn ephemeral_container() -> BoxedStrategy<Value> {
    let common = (
        text(),
        opt(image_ref()),
        opt(prop_oneof![
            Just("Always".to_string()),
            Just("IfNotPresent".to_string()),
            Just("Never".to_string()),
            text()
        ]),
        opt(prop::collection::vec(text(), 0..4)),
        opt(prop::collection::vec(text(), 0..3)),
        opt(text()),
        opt(prop::collection::vec(env_var(), 0..4)),
        opt(prop::collection::vec(
            (text(), opt(text()), any::<bool>()).prop_map(|(n, p, cm)| {
                if cm {
                    json!({"configMapRef": {"name": n}, "prefix": p})
                } else {
                    json!({"secretRef": {"name": n}, "prefix": p})
                }
            }),
            0..2,
        )),
    );
    let more = (
        opt(prop::collection::vec(volume_mount(), 0..3)),
        opt(security_context()),
        opt(prop_oneof![Just("app".to_string()), text()]),
        opt(text()),
        opt(prop_oneof![
            Just("File".to_string()),
            Just("FallbackToLogsOnError".to_string()),
            text()
        ]),
        (opt(any::<bool>()), opt(any::<bool>())),
        // Fields the API server refuses on ephemeral containers.
        opt(any::<i32>()),
        any::<bool>(),
        opt(text()),
    );
    (common, more)
        .prop_map(
            |(
                (name, image, policy, command, args, workdir, env, env_from),
                (mounts, sc, target, tm_path, tm_policy, (stdin, tty), port, probe, restart),
            )| {
                json!({
                    "name": name, "image": image, "imagePullPolicy": policy,
                    "command": command, "args": args, "workingDir": workdir,
                    "env": env, "envFrom": env_from, "volumeMounts": mounts,
                    "securityContext": sc, "targetContainerName": target,
                    "terminationMessagePath": tm_path, "terminationMessagePolicy": tm_policy,
                    "stdin": stdin, "tty": tty,
                    "ports": port.map(|p| vec![json!({"containerPort": p})]),
                    "livenessProbe": probe.then(|| json!({"exec": {"command": ["true"]}})),
                    "resources": probe.then(|| json!({"limits": {"cpu": "1"}})),
                    "restartPolicy": restart,
                })
            },
        )
        .boxed()
}

fn volume() -> BoxedStrategy<Value> {
    (
        prop_oneof![Just("data".to_string()), Just("host".to_string()), text()],
        0..7u8,
        text(),
    )
        .prop_map(|(name, kind, s)| match kind {
            0 => json!({"name": name, "emptyDir": {}}),
            1 => json!({"name": name, "hostPath": {"path": s}}),
            2 => json!({"name": name, "configMap": {"name": s}}),
            3 => json!({"name": name, "secret": {"secretName": s}}),
            4 => json!({"name": name, "persistentVolumeClaim": {"claimName": s}}),
            5 => json!({"name": name, "nfs": {"server": s, "path": "/x"}}),
            _ => json!({"name": name, "projected": {"sources": []}}),
        })
        .boxed()
}

fn api_status() -> BoxedStrategy<Value> {
    (
        prop_oneof![Just("dbg".to_string()), text()],
        opt(text()),
        0..4u8,
        any::<i32>(),
    )
        .prop_map(|(name, id, state, code)| {
            let state = match state {
                0 => json!({"waiting": {"reason": "ContainerCreating"}}),
                1 => json!({"running": {"startedAt": "2026-11-22T05:00:00Z"}}),
                2 => json!({"terminated": {"exitCode": code, "reason": "Error"}}),
                _ => json!({}),
            };
            json!({"name": name, "containerID": id, "state": state, "ready": false,
                   "restartCount": 0, "image": "busybox", "imageID": ""})
        })
        .boxed()
}

fn pod() -> BoxedStrategy<Pod> {
    (
        (text(), text(), text(), any::<bool>()),
        (
            opt(any::<bool>()),
            opt(any::<bool>()),
            opt(any::<bool>()),
            opt(any::<bool>()),
        ),
        prop::collection::vec(volume(), 0..4),
        prop::collection::vec(ephemeral_container(), 0..4),
        prop::collection::vec(api_status(), 0..3),
        opt(security_context()),
        any::<bool>(),
    )
        .prop_filter_map(
            "a pod the API types can hold",
            |((name, ns, uid, mirror), (host_pid, host_net, host_ipc, share), volumes, ecs, statuses, psc, init)| {
                let annotations = mirror.then(|| json!({"kubernetes.io/config.mirror": "x"}));
                let v = json!({
                    "metadata": {"name": name, "namespace": ns, "uid": uid, "annotations": annotations},
                    "spec": {
                        "containers": [{"name": "app", "image": "app"}],
                        "initContainers": init.then(|| json!([{"name": "init", "image": "init"}])),
                        "hostPID": host_pid, "hostNetwork": host_net, "hostIPC": host_ipc,
                        "shareProcessNamespace": share, "volumes": volumes,
                        "securityContext": psc.map(|mut s| { s.as_object_mut().unwrap().remove("capabilities"); s }),
                        "ephemeralContainers": ecs,
                    },
                    "status": {"podIP": "10.0.0.7", "ephemeralContainerStatuses": statuses},
                });
                serde_json::from_value::<Pod>(v).ok()
            },
        )
        .boxed()
}

fn observed(names: Vec<String>) -> BoxedStrategy<Observed> {
    let sandbox = (text(), any::<u32>(), any::<bool>(), any::<i64>()).prop_map(
        |(id, attempt, ready, created_at)| Sandbox {
            id,
            attempt,
            ready,
            created_at,
        },
    );
    let mut pool = names;
    pool.extend(["app".to_string(), "init".to_string(), "other".to_string()]);
    let container = (
        prop::sample::select(pool),
        text(),
        0..4u8,
        (any::<i64>(), any::<i64>(), any::<i64>()),
        any::<i32>(),
        (text(), text()),
        any::<u32>(),
    )
        .prop_map(
            |(name, id, state, (c, s, f), exit_code, (reason, message), attempt)| Container {
                id,
                name,
                attempt,
                state: [
                    State::Created,
                    State::Running,
                    State::Exited,
                    State::Unknown,
                ][state as usize],
                created_at: c,
                started_at: s,
                finished_at: f,
                exit_code,
                reason,
                message,
                ..Default::default()
            },
        );
    (
        prop::collection::vec(sandbox, 0..3),
        prop::collection::vec(container, 0..6),
    )
        .prop_map(|(sandboxes, mut containers)| {
            containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
            Observed {
                sandboxes,
                containers,
            }
        })
        .boxed()
}

fn ec_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .map(|v| v.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

fn with_observed() -> BoxedStrategy<(Pod, Observed)> {
    pod()
        .prop_flat_map(|p| {
            let names = ec_names(&p);
            (Just(p), observed(names))
        })
        .boxed()
}

fn dirs() -> NodeDirs {
    NodeDirs {
        pod_logs: PathBuf::from("/var/log/pods"),
        pods: PathBuf::from("/var/lib/kubelet/pods"),
        seccomp: PathBuf::from("/var/lib/kubelet/seccomp"),
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn validation_never_panics_and_refuses_only_the_pods_containers(p in pod()) {
        let errs = validation::validate_ephemeral_containers(&p);
        let _ = validation::aggregate_message(&errs);
        let _ = validation::invalid_status("Pod", kubelet::name(&p), &errs);
        let mut old = p.clone();
        old.spec.as_mut().unwrap().ephemeral_containers = None;
        let _ = validation::validate_ephemeral_containers_update(&p, &old);
        let _ = validation::validate_pod_status_update(&p, &old);
        let names: HashSet<String> = ec_names(&p).into_iter().collect();
        let refused = validation::refusals(&p);
        for (name, why) in &refused {
            prop_assert!(names.contains(name), "refused {name:?} is not in the pod");
            prop_assert!(!why.is_empty());
        }
        if kubelet::is_mirror_pod(&p) {
            prop_assert_eq!(refused.len(), names.len(), "a mirror pod's containers are all refused");
        }
    }

    #[test]
    fn translation_never_panics_reserves_nothing_and_labels_like_the_kubelet(p in pod()) {
        let node = dirs();
        for c in p.spec.as_ref().unwrap().ephemeral_containers.iter().flatten() {
            let mut c = c.clone();
            validation::default_ephemeral_container(&mut c);
            let _ = image::pull_policy(&c);
            for target in [None, Some("0123abcd")] {
                let config = translate::container_config(&translate::Inputs {
                    pod: &p,
                    container: &c,
                    target_id: target,
                    image: &ResolvedImage { id: "sha256:0".into(), uid: None, username: String::new() },
                    attempt: 0,
                    host_files: &HostFiles::default(),
                    node: &node,
                });
                let Ok(config) = config else { continue };
                prop_assert_eq!(&config.metadata.as_ref().unwrap().name, &c.name);
                let mut keys: Vec<&str> = config.labels.keys().map(String::as_str).collect();
                keys.sort();
                prop_assert_eq!(keys, [
                    kubelet::CONTAINER_NAME_LABEL,
                    "io.kubernetes.pod.name",
                    "io.kubernetes.pod.namespace",
                    kubelet::POD_UID_LABEL,
                ]);
                // Nothing reserved: the kubelet's minimum weight, no quota, no
                // memory limit, one of the QoS classes' scores (a container
                // that requests nothing is never between them).
                let res = config.linux.as_ref().and_then(|l| l.resources.as_ref());
                let pod_level = p.spec.as_ref().unwrap().resources.is_some();
                if c.resources.is_none() && !pod_level {
                    prop_assert!(res.is_some_and(|r| r.cpu_quota == 0 && r.memory_limit_in_bytes == 0
                        && r.cpu_shares == 2 && [1000, 999, -997].contains(&r.oom_score_adj)),
                        "the kubelet's minimum: {res:?}");
                }
            }
        }
    }

    #[test]
    fn plan_never_starts_what_the_runtime_holds((p, o) in with_observed(), backing in any::<bool>()) {
        let names = ec_names(&p);
        let gates = Gates {
            backing_off: if backing { names.iter().take(1).cloned().collect() } else { HashSet::new() },
            refused: validation::refusals(&p),
            resume_created_before: Some(i64::MAX),
        };
        let got = plan::plan(&p, &o, &gates);
        if o.ready_sandbox().is_none() {
            prop_assert!(got.actions.is_empty());
        }
        for a in &got.actions {
            match a {
                Action::Start { name, target_id } => {
                    prop_assert!(o.newest(name).is_none(), "{name} exists in the runtime");
                    prop_assert!(!gates.backing_off.contains(name));
                    prop_assert!(!gates.refused.contains_key(name));
                    if let Some(t) = target_id {
                        prop_assert!(o.containers.iter().any(|c| &c.id == t));
                    }
                }
                Action::Resume { name, id } => {
                    let c = o.newest(name);
                    prop_assert!(c.is_some_and(|c| &c.id == id && c.state == State::Created));
                }
                Action::Fail { name, .. } => prop_assert!(names.contains(name)),
            }
        }
    }

    #[test]
    fn status_is_the_specs_names_sorted_and_terminated_stays((p, o) in with_observed(), fail in opt(text())) {
        let mut failures = BTreeMap::new();
        if let (Some(msg), Some(first)) = (fail, ec_names(&p).first()) {
            failures.insert(first.clone(), Failure { reason: "CreateContainerError".into(), message: msg });
        }
        let out = status::ephemeral_statuses(&p, &o, &failures, "containerd");
        let got: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        let mut want: Vec<String> = ec_names(&p);
        want.sort();
        want.dedup();
        let mut sorted = got.clone();
        sorted.sort();
        prop_assert_eq!(&got, &sorted, "sorted by name");
        for n in &got {
            prop_assert!(want.iter().any(|w| w == n), "{n} is not in the spec");
        }
        for old in status::api_statuses(&p) {
            let was_terminated = old.state.as_ref().is_some_and(|s| s.terminated.is_some());
            if was_terminated && let Some(new) = out.iter().find(|s| s.name == old.name) {
                prop_assert!(new.state.as_ref().is_some_and(|s| s.terminated.is_some()),
                    "{} moved back from terminated", old.name);
            }
        }
        let _ = status::changed(&p, &out);
    }

    #[test]
    fn image_references_never_panic(r in image_ref(), server in text()) {
        let _ = image::parse(&r);
        let _ = image::with_default_tag(&r);
        let _ = image::registry(&r);
        let _ = image::default_pull_policy(&r);
        let _ = validation::default_image_pull_policy(&r);
        let _ = kubelet::container_hash(&server, &r);
    }
}
