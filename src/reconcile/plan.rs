//! Pure planning: from the pod's spec, its API status and what the runtime
//! holds, decide which ephemeral containers to start now. No I/O, no clock.
//!
//! The rules are the kubelet's (`computePodActions`):
//! - a container is started iff the runtime holds no container of this pod
//!   with its name — created, running or exited all count as started, and
//!   nothing is ever restarted;
//! - nothing starts in a pass that finds the sandbox missing or not ready;
//! - init containers do not block ephemeral containers;
//! - with `targetContainerName`, the target's newest runtime container is the
//!   PID target; no target container yet is `CreateContainerConfigError`.
//!
//! One rule is ours: a container the API status shows as having run (it has a
//! containerID) is never started again even if the runtime lost it, because
//! the API server refuses to move a terminated container back.
//!
//! Must not do I/O or read the clock; the caller passes the gates (backoff,
//! refusals, the resume deadline).

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::Pod;

use super::execute::reason;
use super::observe::{Observed, State};

/// What to do for one ephemeral container in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a container that was created but never started.
    Resume {
        /// Container name.
        name: String,
        /// Runtime id.
        id: String,
    },
    /// Start it, in the PID namespace of `target_id` when set.
    Start {
        /// Container name.
        name: String,
        /// Runtime id of the target container.
        target_id: Option<String>,
    },
    /// It cannot start now; report this waiting reason (and retry later).
    Fail {
        /// Container name.
        name: String,
        /// Waiting reason.
        reason: &'static str,
        /// Message.
        message: String,
    },
}

/// The plan for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// False when the newest sandbox is missing or not ready: nothing starts.
    pub sandbox_ready: bool,
    /// Actions in spec order.
    pub actions: Vec<Action>,
}

/// Inputs of [`plan`] besides the pod and the runtime's view.
#[derive(Debug, Clone, Default)]
pub struct Gates {
    /// Containers whose last failure is still backing off.
    pub backing_off: HashSet<String>,
    /// Containers refused outright (forbidden fields, mirror pod), with the
    /// message; they never start.
    pub refused: BTreeMap<String, String>,
    /// Resume CREATED containers created before this time (ns since the
    /// epoch); `None` never resumes.
    pub resume_created_before: Option<i64>,
}

/// Decides what to start.
pub fn plan(pod: &Pod, observed: &Observed, gates: &Gates) -> Plan {
    let Some(spec) = pod.spec.as_ref() else {
        return Plan::default();
    };
    let ecs = spec.ephemeral_containers.as_deref().unwrap_or_default();
    if ecs.is_empty() {
        return Plan {
            sandbox_ready: observed.ready_sandbox().is_some(),
            actions: vec![],
        };
    }
    if observed.ready_sandbox().is_none() {
        return Plan {
            sandbox_ready: false,
            actions: vec![],
        };
    }
    let ran_per_api: HashSet<&str> = super::status::api_statuses(pod)
        .iter()
        .filter(|s| s.container_id.as_deref().is_some_and(|id| !id.is_empty()))
        .map(|s| s.name.as_str())
        .collect();

    let mut actions = Vec::new();
    for c in ecs {
        let name = c.name.as_str();
        if let Some(existing) = observed.newest(name) {
            let stale = gates
                .resume_created_before
                .is_some_and(|cutoff| existing.created_at < cutoff);
            if existing.state == State::Created && stale && !gates.backing_off.contains(name) {
                actions.push(Action::Resume {
                    name: name.into(),
                    id: existing.id.clone(),
                });
            }
            continue;
        }
        if ran_per_api.contains(name) {
            continue;
        }
        if let Some(message) = gates.refused.get(name) {
            actions.push(Action::Fail {
                name: name.into(),
                reason: reason::CREATE_CONTAINER_CONFIG,
                message: message.clone(),
            });
            continue;
        }
        if gates.backing_off.contains(name) {
            continue;
        }
        let target = c.target_container_name.as_deref().filter(|t| !t.is_empty());
        match target {
            None => actions.push(Action::Start {
                name: name.into(),
                target_id: None,
            }),
            Some(t) => match observed.newest(t) {
                Some(found) => actions.push(Action::Start {
                    name: name.into(),
                    target_id: Some(found.id.clone()),
                }),
                None => actions.push(Action::Fail {
                    name: name.into(),
                    reason: reason::CREATE_CONTAINER_CONFIG,
                    message: format!("unable to find target container {t}"),
                }),
            },
        }
    }
    Plan {
        sandbox_ready: true,
        actions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::observe::{Container, Sandbox, State};
    use k8s_openapi::api::core::v1::{ContainerStatus, EphemeralContainer, PodSpec, PodStatus};

    fn ec(name: &str, target: Option<&str>) -> EphemeralContainer {
        EphemeralContainer {
            name: name.into(),
            image: Some("busybox".into()),
            target_container_name: target.map(Into::into),
            ..Default::default()
        }
    }

    fn pod(ecs: Vec<EphemeralContainer>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                ephemeral_containers: Some(ecs),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sandbox(ready: bool) -> Sandbox {
        Sandbox {
            id: "sb".into(),
            attempt: 0,
            ready,
            created_at: 1,
        }
    }

    fn ctr(name: &str, id: &str, state: State, created_at: i64) -> Container {
        Container {
            id: id.into(),
            name: name.into(),
            state,
            created_at,
            ..Default::default()
        }
    }

    fn observed(ready: bool, containers: Vec<Container>) -> Observed {
        let mut containers = containers;
        containers.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        Observed {
            sandboxes: vec![sandbox(ready)],
            containers,
        }
    }

    fn run(p: &Pod, o: &Observed) -> Plan {
        plan(p, o, &Gates::default())
    }

    fn start(name: &str, target: Option<&str>) -> Action {
        Action::Start {
            name: name.into(),
            target_id: target.map(Into::into),
        }
    }

    #[test]
    fn new_container_with_target_starts_in_the_targets_namespace() {
        let o = observed(true, vec![ctr("app", "app-1", State::Running, 1)]);
        let p = run(&pod(vec![ec("dbg", Some("app"))]), &o);
        assert_eq!(p.actions, [start("dbg", Some("app-1"))]);
    }

    #[test]
    fn target_is_the_newest_instance() {
        let o = observed(
            true,
            vec![
                ctr("app", "app-old", State::Exited, 1),
                ctr("app", "app-new", State::Running, 5),
            ],
        );
        let p = run(&pod(vec![ec("dbg", Some("app"))]), &o);
        assert_eq!(p.actions, [start("dbg", Some("app-new"))]);
    }

    #[test]
    fn exited_do_not_restart() {
        for state in [
            State::Created,
            State::Running,
            State::Exited,
            State::Unknown,
        ] {
            let o = observed(true, vec![ctr("dbg", "d1", state, 2)]);
            assert!(
                run(&pod(vec![ec("dbg", None)]), &o).actions.is_empty(),
                "{state:?}"
            );
        }
    }

    #[test]
    fn exited_in_an_older_sandbox_still_counts() {
        let mut o = observed(true, vec![ctr("dbg", "d1", State::Exited, 2)]);
        o.containers[0].sandbox_id = "old-sandbox".into();
        assert!(run(&pod(vec![ec("dbg", None)]), &o).actions.is_empty());
    }

    #[test]
    fn sandbox_not_ready_starts_nothing() {
        let o = observed(false, vec![]);
        let p = run(&pod(vec![ec("dbg", None)]), &o);
        assert!(!p.sandbox_ready);
        assert!(p.actions.is_empty());
        let none = Observed::default();
        assert!(run(&pod(vec![ec("dbg", None)]), &none).actions.is_empty());
    }

    #[test]
    fn init_running_start_anyway() {
        let o = observed(true, vec![ctr("init", "i1", State::Running, 1)]);
        let mut p = pod(vec![ec("dbg", None)]);
        p.spec.as_mut().unwrap().init_containers = Some(vec![Default::default()]);
        assert_eq!(run(&p, &o).actions, [start("dbg", None)]);
    }

    #[test]
    fn missing_target_is_a_config_error() {
        let o = observed(true, vec![]);
        let p = run(&pod(vec![ec("dbg", Some("app"))]), &o);
        assert_eq!(
            p.actions,
            [Action::Fail {
                name: "dbg".into(),
                reason: "CreateContainerConfigError",
                message: "unable to find target container app".into()
            }]
        );
    }

    #[test]
    fn one_failing_container_blocks_no_other() {
        let o = observed(true, vec![]);
        let p = run(&pod(vec![ec("a", Some("nope")), ec("b", None)]), &o);
        assert!(matches!(p.actions[0], Action::Fail { .. }));
        assert_eq!(p.actions[1], start("b", None));
    }

    #[test]
    fn backing_off_and_refused_are_gated() {
        let o = observed(true, vec![]);
        let backing_off = HashSet::from(["a".to_string()]);
        let refused = BTreeMap::from([("b".to_string(), "ports: Forbidden".to_string())]);
        let p = plan(
            &pod(vec![ec("a", None), ec("b", None), ec("c", None)]),
            &o,
            &Gates {
                backing_off,
                refused,
                ..Default::default()
            },
        );
        assert_eq!(
            p.actions,
            [
                Action::Fail {
                    name: "b".into(),
                    reason: "CreateContainerConfigError",
                    message: "ports: Forbidden".into()
                },
                start("c", None)
            ]
        );
    }

    #[test]
    fn created_but_never_started_is_resumed_after_the_grace() {
        let o = observed(true, vec![ctr("dbg", "d1", State::Created, 100)]);
        let p = pod(vec![ec("dbg", None)]);
        let gates = |cutoff| Gates {
            resume_created_before: cutoff,
            ..Default::default()
        };
        assert!(
            plan(&p, &o, &gates(None)).actions.is_empty(),
            "observe mode never resumes"
        );
        assert!(
            plan(&p, &o, &gates(Some(50))).actions.is_empty(),
            "too young: its creator may be starting it"
        );
        assert_eq!(
            plan(&p, &o, &gates(Some(200))).actions,
            [Action::Resume {
                name: "dbg".into(),
                id: "d1".into()
            }]
        );
        let backing_off = HashSet::from(["dbg".to_string()]);
        let g = Gates {
            backing_off,
            resume_created_before: Some(200),
            ..Default::default()
        };
        assert!(
            plan(&p, &o, &g).actions.is_empty(),
            "a known start failure is not retried"
        );
    }

    /// The kubelet's own decision cases for ephemeral containers
    /// (`TestComputePodActionsWithInitAndEphemeralContainers` in
    /// pkg/kubelet/kuberuntime/kuberuntime_manager_test.go), on the same base
    /// pod: three regular containers and one init container that completed,
    /// plus ephemeral container `debug` running. Only the ephemeral part of
    /// each expected action applies here: the agent never kills a pod or
    /// creates a sandbox.
    mod kubelet_cases {
        use super::*;
        use k8s_openapi::api::core::v1::Container as SpecContainer;

        fn base_pod() -> Pod {
            let mut p = pod(vec![ec("debug", None)]);
            let spec = p.spec.as_mut().unwrap();
            spec.containers = ["foo1", "foo2", "foo3"]
                .map(|n| SpecContainer {
                    name: n.into(),
                    image: Some("busybox".into()),
                    ..Default::default()
                })
                .into();
            spec.init_containers = Some(vec![SpecContainer {
                name: "init1".into(),
                image: Some("bar-image".into()),
                ..Default::default()
            }]);
            p
        }

        /// foo1..foo3 running, init1 exited, debug running — in this order,
        /// as the kubelet's fixture lists them.
        fn base_status() -> Vec<Container> {
            vec![
                ctr("foo1", "id1", State::Running, 1),
                ctr("foo2", "id2", State::Running, 2),
                ctr("foo3", "id3", State::Running, 3),
                ctr("init1", "initid1", State::Exited, 0),
                ctr("debug", "debug1", State::Running, 4),
            ]
        }

        fn check(desc: &str, p: &Pod, ready: bool, status: Vec<Container>, want: &[Action]) {
            let got = run(p, &observed(ready, status));
            assert_eq!(got.actions, want, "{desc}");
        }

        #[test]
        fn steady_state_do_nothing_ignore_ephemeral_container() {
            check("steady state", &base_pod(), true, base_status(), &[]);
        }

        #[test]
        fn no_ephemeral_containers_running_start_one() {
            let mut s = base_status();
            s.truncate(4);
            check("start one", &base_pod(), true, s, &[start("debug", None)]);
        }

        #[test]
        fn start_second_ephemeral_container() {
            let mut p = base_pod();
            let ecs = p.spec.as_mut().unwrap().ephemeral_containers.as_mut();
            ecs.unwrap().push(ec("debug2", None));
            check("second", &p, true, base_status(), &[start("debug2", None)]);
        }

        #[test]
        fn ephemeral_container_exited_do_not_restart() {
            let mut s = base_status();
            s[4].state = State::Exited;
            check("exited", &base_pod(), true, s, &[]);
        }

        #[test]
        fn initialization_in_progress_start_ephemeral_container() {
            let mut s = base_status();
            s[3].state = State::Running;
            s.truncate(4);
            check(
                "init running",
                &base_pod(),
                true,
                s,
                &[start("debug", None)],
            );
        }

        #[test]
        fn kill_pod_and_do_not_restart_ephemeral_container_if_the_pod_sandbox_is_dead() {
            let mut p = base_pod();
            p.spec.as_mut().unwrap().restart_policy = Some("Always".into());
            check("sandbox dead", &p, false, base_status(), &[]);
            // Nor when debug is gone: nothing starts in a pass that finds the
            // sandbox not ready.
            let mut s = base_status();
            s.truncate(4);
            let got = run(&p, &observed(false, s));
            assert!(!got.sandbox_ready);
            assert!(got.actions.is_empty());
        }

        #[test]
        fn create_a_new_pod_sandbox_if_the_pod_sandbox_is_dead_init_container_failed() {
            let mut p = base_pod();
            p.spec.as_mut().unwrap().restart_policy = Some("OnFailure".into());
            let mut s = base_status()[3..].to_vec();
            s[0].exit_code = 137;
            check("sandbox dead, init failed", &p, false, s, &[]);
        }

        #[test]
        fn kill_pod_if_all_containers_exited_except_ephemeral_container() {
            // The kubelet kills the pod; killing pods is not the agent's job,
            // and the running debug container needs nothing.
            let mut p = base_pod();
            p.spec.as_mut().unwrap().restart_policy = Some("Never".into());
            let mut s = base_status();
            for c in &mut s[..3] {
                c.state = State::Exited;
            }
            check("all regular exited", &p, true, s, &[]);
        }

        #[test]
        fn ephemeral_container_is_in_unknown_state_leave_it_alone() {
            let mut p = base_pod();
            p.spec.as_mut().unwrap().restart_policy = Some("Never".into());
            let mut s = base_status();
            s[4].state = State::Unknown;
            check("unknown", &p, true, s, &[]);
        }

        #[test]
        fn created_but_not_started_counts_as_started() {
            // Without the resume grace (observe mode, or a creator that may
            // still be starting it), CREATED is left alone, never recreated.
            let mut s = base_status();
            s[4].state = State::Created;
            check("created", &base_pod(), true, s, &[]);
        }

        #[test]
        fn exited_instances_from_an_older_sandbox_still_count_as_started() {
            let mut s = base_status();
            s[4].state = State::Exited;
            s[4].sandbox_id = "previous-sandbox".into();
            check("older sandbox", &base_pod(), true, s, &[]);
        }
    }

    #[test]
    fn api_status_that_ran_is_never_restarted_even_if_the_runtime_lost_it() {
        let o = observed(true, vec![]);
        let mut p = pod(vec![ec("dbg", None)]);
        p.status = Some(PodStatus {
            ephemeral_container_statuses: Some(vec![ContainerStatus {
                name: "dbg".into(),
                container_id: Some("containerd://gone".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(run(&p, &o).actions.is_empty());
    }
}
