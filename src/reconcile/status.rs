//! Pure status: the pod's `ephemeralContainerStatuses` from what the runtime
//! holds, the last start failures, and the statuses the API already has.
//! No I/O, no clock. The kubelet's rules (`convertToAPIContainerStatuses`):
//! - every spec'd container has a status; the default is
//!   `waiting: ContainerCreating` (`PodInitializing` if the pod has init
//!   containers);
//! - the newest runtime container decides the state: running →
//!   `running.startedAt`, exited → `terminated{…}`, created → `waiting`;
//! - a start failure shows as `waiting{reason, message}` while nothing runs;
//! - a terminated status is final: it is reused as it is, never moved back;
//! - ephemeral containers are never ready and never restarted;
//! - the list is sorted by name and always written whole.
//!
//! Must not write anything: the pass sends what this computes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::observe::{self, Observed, State};

/// The last failure to start a container (the kubelet's "reason cache").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Waiting reason.
    pub reason: String,
    /// Message.
    pub message: String,
}

/// Computes the whole `ephemeralContainerStatuses` list. `runtime_name`
/// prefixes container ids (`containerd://…`).
pub fn ephemeral_statuses(
    pod: &Pod,
    observed: &Observed,
    failures: &BTreeMap<String, Failure>,
    runtime_name: &str,
) -> Vec<ContainerStatus> {
    let Some(spec) = pod.spec.as_ref() else {
        return vec![];
    };
    let has_init = spec.init_containers.as_ref().is_some_and(|v| !v.is_empty());
    let never = spec.restart_policy.as_deref() == Some("Never");
    // One entry per name; of two with the same name (no API server keeps
    // them, but a status is only as good as its writer), a terminated one
    // wins, since terminated is final.
    let mut old: BTreeMap<&str, &ContainerStatus> = BTreeMap::new();
    for s in api_statuses(pod) {
        let keep = old
            .get(s.name.as_str())
            .is_some_and(|o| is_terminated(o) && !is_terminated(s));
        if !keep {
            old.insert(s.name.as_str(), s);
        }
    }

    let mut out: Vec<ContainerStatus> = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| {
            let prior = old.get(c.name.as_str()).copied();
            if let Some(p) = prior.filter(|p| is_terminated(p)) {
                return p.clone();
            }
            let mut st = ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                ready: false,
                restart_count: 0,
                state: Some(waiting(
                    if has_init {
                        "PodInitializing"
                    } else {
                        "ContainerCreating"
                    },
                    None,
                )),
                ..Default::default()
            };
            let failure = failures.get(&c.name);
            let may_show_failure = match observed.newest(&c.name) {
                Some(rc) => from_runtime(&mut st, rc, failure, never, runtime_name),
                None if prior.is_some_and(is_running) => {
                    gone(&mut st, prior.expect("checked above"));
                    false
                }
                None => true,
            };
            if may_show_failure && let Some(f) = failure {
                st.state = Some(waiting(&f.reason, Some(&f.message)));
            }
            st
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Fills in what the runtime shows of the container; returns whether a
/// remembered start failure may still show over it (not once it runs, or
/// exited for good).
fn from_runtime(
    st: &mut ContainerStatus,
    rc: &observe::Container,
    failure: Option<&Failure>,
    never: bool,
    runtime_name: &str,
) -> bool {
    let mut may_show_failure = true;
    st.container_id = Some(format!("{runtime_name}://{}", rc.id));
    if !rc.image.is_empty() {
        st.image = rc.image.clone();
    }
    st.image_id = rc.image_ref.clone();
    st.state = Some(match rc.state {
        State::Running => {
            may_show_failure = false;
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: time(rc.started_at),
                }),
                ..Default::default()
            }
        }
        State::Exited => {
            let terminated = ContainerState {
                terminated: Some(ContainerStateTerminated {
                    container_id: st.container_id.clone(),
                    exit_code: rc.exit_code,
                    reason: Some(rc.reason.clone()).filter(|r| !r.is_empty()),
                    message: Some(rc.message.clone()).filter(|m| !m.is_empty()),
                    started_at: time(rc.started_at),
                    finished_at: time(rc.finished_at),
                    signal: None,
                }),
                ..Default::default()
            };
            let start_failed =
                failure.is_some_and(|f| f.reason == super::execute::reason::RUN_CONTAINER);
            if start_failed && !never {
                st.last_state = Some(terminated);
                waiting_empty()
            } else {
                may_show_failure = false;
                terminated
            }
        }
        State::Created | State::Unknown => waiting_empty(),
    });
    may_show_failure
}

/// It ran and the runtime no longer has it: it is gone for good, as the
/// kubelet reports it (`ContainerStatusUnknown`, 137).
fn gone(st: &mut ContainerStatus, p: &ContainerStatus) {
    st.container_id = p.container_id.clone();
    st.image_id = p.image_id.clone();
    st.state = Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            container_id: p.container_id.clone(),
            exit_code: 137,
            reason: Some("ContainerStatusUnknown".into()),
            message: Some("The container could not be located when the pod was terminated".into()),
            started_at: p
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .and_then(|r| r.started_at.clone()),
            finished_at: None,
            signal: None,
        }),
        ..Default::default()
    });
}

/// How far along a status is: none < waiting < running < terminated.
fn progress(s: Option<&ContainerStatus>) -> u8 {
    match s.and_then(|s| s.state.as_ref()) {
        None => u8::from(s.is_some()),
        Some(st) if st.terminated.is_some() => 3,
        Some(st) if st.running.is_some() => 2,
        Some(_) => 1,
    }
}

/// The list written by an agent that does not start containers (now): the
/// API's entries, except that each container in `ours` (created by this
/// agent) takes its `computed` entry where that is further along than the
/// API's (no entry < waiting < running < terminated). Entries of others —
/// a kubelet that created its own containers and reports them — are never
/// touched, and an entry of ours that someone else already reports as far
/// along (say, both say running) is left as it is, so two writers never
/// take turns over details. Sorted by name.
pub fn ours_where_behind(
    pod: &Pod,
    computed: &[ContainerStatus],
    ours: &BTreeSet<String>,
) -> Vec<ContainerStatus> {
    let mut out: BTreeMap<String, ContainerStatus> = api_statuses(pod)
        .iter()
        .map(|s| (s.name.clone(), s.clone()))
        .collect();
    for c in computed.iter().filter(|c| ours.contains(&c.name)) {
        if progress(Some(c)) > progress(out.get(&c.name)) {
            out.insert(c.name.clone(), c.clone());
        }
    }
    out.into_values().collect()
}

/// The `ephemeralContainerStatuses` the API server holds for the pod.
pub fn api_statuses(pod: &Pod) -> &[ContainerStatus] {
    pod.status
        .as_ref()
        .and_then(|s| s.ephemeral_container_statuses.as_deref())
        .unwrap_or_default()
}

/// Whether the list differs from what the API holds (ignoring order-free
/// noise such as `None` vs empty strings is not attempted: we compare the
/// JSON the API server would store).
pub fn changed(pod: &Pod, new: &[ContainerStatus]) -> bool {
    let old = pod
        .status
        .as_ref()
        .and_then(|s| s.ephemeral_container_statuses.clone())
        .unwrap_or_default();
    serde_json::to_value(&old).ok() != serde_json::to_value(new).ok()
}

fn is_terminated(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|st| st.terminated.is_some())
}

fn is_running(s: &ContainerStatus) -> bool {
    s.state.as_ref().is_some_and(|st| st.running.is_some())
}

fn waiting(reason: &str, message: Option<&str>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_string()),
            message: message.filter(|m| !m.is_empty()).map(str::to_string),
        }),
        ..Default::default()
    }
}

fn waiting_empty() -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting::default()),
        ..Default::default()
    }
}

/// CRI nanoseconds → API time, whole seconds as the API stores them.
pub fn time(ns: i64) -> Option<Time> {
    if ns <= 0 {
        return None;
    }
    k8s_openapi::jiff::Timestamp::from_second(ns / 1_000_000_000)
        .ok()
        .map(Time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::observe::{Container, Sandbox};
    use k8s_openapi::api::core::v1::{EphemeralContainer, PodSpec, PodStatus};

    const SEC: i64 = 1_000_000_000;

    fn pod(names: &[&str]) -> Pod {
        Pod {
            spec: Some(PodSpec {
                ephemeral_containers: Some(
                    names
                        .iter()
                        .map(|n| EphemeralContainer {
                            name: n.to_string(),
                            image: Some("busybox:1.36".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn observed(containers: Vec<Container>) -> Observed {
        Observed {
            sandboxes: vec![Sandbox {
                id: "sb".into(),
                attempt: 0,
                ready: true,
                created_at: 1,
            }],
            containers,
        }
    }

    fn rc(name: &str, state: State) -> Container {
        Container {
            id: format!("{name}-id"),
            name: name.into(),
            state,
            created_at: 10 * SEC,
            started_at: 11 * SEC + 5,
            finished_at: 15 * SEC,
            exit_code: 3,
            reason: "Error".into(),
            image: "ephemerald.local/busybox:1.36".into(),
            image_ref: "sha256:abc".into(),
            detailed: true,
            ..Default::default()
        }
    }

    fn status(p: &Pod, o: &Observed, f: &BTreeMap<String, Failure>) -> Vec<ContainerStatus> {
        ephemeral_statuses(p, o, f, "containerd")
    }

    fn waiting_reason(s: &ContainerStatus) -> Option<&str> {
        s.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
    }

    #[test]
    fn default_is_container_creating_or_pod_initializing() {
        let p = pod(&["dbg"]);
        let s = status(&p, &observed(vec![]), &BTreeMap::new());
        assert_eq!(waiting_reason(&s[0]), Some("ContainerCreating"));
        assert!(!s[0].ready);
        assert_eq!(s[0].restart_count, 0);
        assert!(
            s[0].started.is_none(),
            "ephemeral statuses carry no `started`"
        );

        let mut p = pod(&["dbg"]);
        p.spec.as_mut().unwrap().init_containers = Some(vec![Default::default()]);
        let s = status(&p, &observed(vec![]), &BTreeMap::new());
        assert_eq!(waiting_reason(&s[0]), Some("PodInitializing"));
    }

    #[test]
    fn running_has_container_id_and_started_at() {
        let s = status(
            &pod(&["dbg"]),
            &observed(vec![rc("dbg", State::Running)]),
            &BTreeMap::new(),
        );
        assert_eq!(s[0].container_id.as_deref(), Some("containerd://dbg-id"));
        let running = s[0].state.as_ref().unwrap().running.as_ref().unwrap();
        assert_eq!(running.started_at, time(11 * SEC));
        assert_eq!(s[0].image, "ephemerald.local/busybox:1.36");
        assert_eq!(s[0].image_id, "sha256:abc");
    }

    #[test]
    fn exited_is_terminated_with_code_reason_and_times() {
        let s = status(
            &pod(&["dbg"]),
            &observed(vec![rc("dbg", State::Exited)]),
            &BTreeMap::new(),
        );
        let t = s[0].state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(t.exit_code, 3);
        assert_eq!(t.reason.as_deref(), Some("Error"));
        assert_eq!(t.container_id.as_deref(), Some("containerd://dbg-id"));
        assert_eq!(t.started_at, time(11 * SEC));
        assert_eq!(t.finished_at, time(15 * SEC));
    }

    #[test]
    fn created_is_waiting_and_shows_a_run_failure() {
        let o = observed(vec![rc("dbg", State::Created)]);
        let s = status(&pod(&["dbg"]), &o, &BTreeMap::new());
        assert_eq!(waiting_reason(&s[0]), None);
        let f = BTreeMap::from([(
            "dbg".to_string(),
            Failure {
                reason: "RunContainerError".into(),
                message: "boom".into(),
            },
        )]);
        let s = status(&pod(&["dbg"]), &o, &f);
        assert_eq!(waiting_reason(&s[0]), Some("RunContainerError"));
    }

    #[test]
    fn failed_start_shows_run_container_error_with_the_exit_as_last_state() {
        // containerd leaves a container whose start failed EXITED 128 StartError.
        let mut exited = rc("dbg", State::Exited);
        exited.exit_code = 128;
        exited.reason = "StartError".into();
        let f = BTreeMap::from([(
            "dbg".to_string(),
            Failure {
                reason: "RunContainerError".into(),
                message: "runc create failed".into(),
            },
        )]);
        let s = status(&pod(&["dbg"]), &observed(vec![exited.clone()]), &f);
        assert_eq!(waiting_reason(&s[0]), Some("RunContainerError"));
        let last = s[0]
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        assert_eq!(
            (last.exit_code, last.reason.as_deref()),
            (128, Some("StartError"))
        );

        // With restartPolicy Never the kubelet reports the exit itself.
        let mut never = pod(&["dbg"]);
        never.spec.as_mut().unwrap().restart_policy = Some("Never".into());
        let s = status(&never, &observed(vec![exited]), &f);
        assert!(s[0].state.as_ref().unwrap().terminated.is_some());
    }

    #[test]
    fn failure_shows_while_nothing_exists_but_not_over_a_running_container() {
        let f = BTreeMap::from([(
            "dbg".to_string(),
            Failure {
                reason: "ErrImageNeverPull".into(),
                message: "Container image \"x\" is not present with pull policy of Never".into(),
            },
        )]);
        let s = status(&pod(&["dbg"]), &observed(vec![]), &f);
        let w = s[0].state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(w.reason.as_deref(), Some("ErrImageNeverPull"));
        assert!(
            w.message
                .as_deref()
                .unwrap()
                .contains("pull policy of Never")
        );
        let s = status(
            &pod(&["dbg"]),
            &observed(vec![rc("dbg", State::Running)]),
            &f,
        );
        assert!(s[0].state.as_ref().unwrap().running.is_some());
    }

    #[test]
    fn terminated_is_never_moved_back() {
        let mut p = pod(&["dbg"]);
        let old = status(
            &p,
            &observed(vec![rc("dbg", State::Exited)]),
            &BTreeMap::new(),
        );
        p.status = Some(PodStatus {
            ephemeral_container_statuses: Some(old.clone()),
            ..Default::default()
        });
        // The runtime now says running (or nothing at all): the API keeps terminated.
        for o in [observed(vec![rc("dbg", State::Running)]), observed(vec![])] {
            let s = status(&p, &o, &BTreeMap::new());
            assert_eq!(s, old);
            assert!(!changed(&p, &s));
        }
    }

    #[test]
    fn running_then_lost_becomes_terminated_unknown() {
        let mut p = pod(&["dbg"]);
        let old = status(
            &p,
            &observed(vec![rc("dbg", State::Running)]),
            &BTreeMap::new(),
        );
        p.status = Some(PodStatus {
            ephemeral_container_statuses: Some(old),
            ..Default::default()
        });
        let s = status(&p, &observed(vec![]), &BTreeMap::new());
        let t = s[0].state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(
            (t.exit_code, t.reason.as_deref()),
            (137, Some("ContainerStatusUnknown"))
        );
    }

    #[test]
    fn sorted_by_name_and_whole() {
        let s = status(
            &pod(&["zeta", "alpha", "mid"]),
            &observed(vec![]),
            &BTreeMap::new(),
        );
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
    }

    #[test]
    fn changed_only_when_different() {
        let mut p = pod(&["dbg"]);
        let s = status(
            &p,
            &observed(vec![rc("dbg", State::Running)]),
            &BTreeMap::new(),
        );
        assert!(changed(&p, &s));
        p.status = Some(PodStatus {
            ephemeral_container_statuses: Some(s.clone()),
            ..Default::default()
        });
        assert!(!changed(&p, &s));
    }

    #[test]
    fn an_observing_agent_writes_only_its_own_containers_where_behind() {
        let ours: BTreeSet<String> = ["mine".to_string()].into();
        let o = observed(vec![rc("mine", State::Exited), rc("theirs", State::Exited)]);
        let p = pod(&["mine", "theirs"]);
        let computed = status(&p, &o, &BTreeMap::new());
        let entry = |name: &str, state: Option<&str>| -> ContainerStatus {
            let mut st = ContainerStatus {
                name: name.into(),
                image: "busybox:1.36".into(),
                image_id: "kubelet's".into(),
                ..Default::default()
            };
            st.state = state.map(|s| match s {
                "running" => ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..Default::default()
                },
                "terminated" => ContainerState {
                    terminated: Some(ContainerStateTerminated::default()),
                    ..Default::default()
                },
                reason => waiting(reason, None),
            });
            st
        };
        let with_api = |api: Vec<ContainerStatus>| {
            let mut p = p.clone();
            p.status = Some(PodStatus {
                ephemeral_container_statuses: Some(api),
                ..Default::default()
            });
            p
        };
        let mine = computed.iter().find(|s| s.name == "mine").unwrap().clone();
        let table: Vec<(&str, Vec<ContainerStatus>, Vec<ContainerStatus>)> = vec![
            (
                "no entries yet: ours only, theirs left to its creator",
                vec![],
                vec![mine.clone()],
            ),
            (
                "the losing kubelet shows ours waiting: ours replaces it",
                vec![
                    entry("mine", Some("CreateContainerError")),
                    entry("theirs", Some("running")),
                ],
                vec![mine.clone(), entry("theirs", Some("running"))],
            ),
            (
                "running in the API, exited here: ours replaces it",
                vec![entry("mine", Some("running"))],
                vec![mine.clone()],
            ),
            (
                "already terminated in the API: left as it is",
                vec![entry("mine", Some("terminated")), entry("theirs", None)],
                vec![entry("mine", Some("terminated")), entry("theirs", None)],
            ),
            (
                "theirs behind the runtime: never touched",
                vec![entry("theirs", Some("ContainerCreating"))],
                vec![mine.clone(), entry("theirs", Some("ContainerCreating"))],
            ),
        ];
        for (name, api, want) in table {
            let got = ours_where_behind(&with_api(api), &computed, &ours);
            assert_eq!(got, want, "{name}");
        }
        // Both say running: ours is not written over theirs.
        let o = observed(vec![rc("mine", State::Running)]);
        let computed = status(&p, &o, &BTreeMap::new());
        let api = vec![entry("mine", Some("running"))];
        assert_eq!(
            ours_where_behind(&with_api(api.clone()), &computed, &ours),
            api,
            "as far along: left to the other writer"
        );
    }
}
