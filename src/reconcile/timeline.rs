//! Each ephemeral container's timeline: when this agent saw it in the spec,
//! issued CreateContainer, when the runtime created, started and reaped it,
//! and when the API status showed it (and accepted this agent's writes).
//! Served at `/timelines` and the source of the start-phase histograms.
//!
//! Owns: the [`Timeline`] record and the rules that fill it in (each stamp
//! is set once, the first time it is seen). The map of one pod's timelines
//! lives in the pod's memory ([`super::memory`]); this module only updates a
//! map it is handed, and never talks to the runtime or the API server.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde::Serialize;

use super::execute::Timings;
use super::observe::{Observed, State};
use crate::kubelet;
use crate::observe::{Metrics, phase};

/// Who created a container whose timeline is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Creator {
    /// This agent.
    Agent,
    /// Someone else (a kubelet), observed.
    Other,
}

/// When things happened to one ephemeral container, as this agent saw them.
/// The same record whether the agent started it or watched another creator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timeline {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Who created it (unknown until created).
    pub creator: Option<Creator>,
    /// The agent received the watch event that first showed it in the pod
    /// spec (or, without one, the pass that first saw it began).
    #[serde(serialize_with = "rfc3339")]
    pub seen: SystemTime,
    /// This agent issued CreateContainer for it (the last attempt).
    #[serde(serialize_with = "rfc3339_opt")]
    pub create_issued: Option<SystemTime>,
    /// The runtime created it.
    #[serde(serialize_with = "rfc3339_opt")]
    pub created: Option<SystemTime>,
    /// The runtime started it.
    #[serde(serialize_with = "rfc3339_opt")]
    pub started: Option<SystemTime>,
    /// The runtime reports it exited.
    #[serde(serialize_with = "rfc3339_opt")]
    pub exited: Option<SystemTime>,
    /// The API status first showed it running.
    #[serde(serialize_with = "rfc3339_opt")]
    pub api_running: Option<SystemTime>,
    /// The API status first showed it terminated.
    #[serde(serialize_with = "rfc3339_opt")]
    pub api_terminated: Option<SystemTime>,
    /// The API server accepted this agent's status write saying running.
    #[serde(serialize_with = "rfc3339_opt")]
    pub running_written: Option<SystemTime>,
    /// The API server accepted this agent's status write saying terminated.
    #[serde(serialize_with = "rfc3339_opt")]
    pub terminated_written: Option<SystemTime>,
}

/// RFC 3339 with nanoseconds, e.g. `2026-11-22T04:02:25.606919465Z`.
fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    match k8s_openapi::jiff::Timestamp::try_from(*t) {
        Ok(ts) => s.serialize_str(&ts.to_string()),
        Err(_) => s.serialize_none(),
    }
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// Brings the timelines of `pod`'s ephemeral containers up to date with
/// what the runtime (`observed`) and the API status show: a container new
/// in the spec gets a timeline seen at `seen`; other stamps are taken at
/// `now` where the runtime has no time of its own.
pub fn record(
    timelines: &mut BTreeMap<String, Timeline>,
    pod: &Pod,
    observed: &Observed,
    seen: SystemTime,
    now: SystemTime,
) {
    let pod_key = format!("{}/{}", kubelet::namespace(pod), kubelet::name(pod));
    let api: BTreeMap<&str, &ContainerStatus> = super::status::api_statuses(pod)
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    for c in pod
        .spec
        .iter()
        .flat_map(|s| s.ephemeral_containers.iter().flatten())
    {
        let t = timelines.entry(c.name.clone()).or_insert_with(|| {
            tracing::info!(container = %c.name, "ephemeral container seen in the spec");
            Timeline {
                pod: pod_key.clone(),
                container: c.name.clone(),
                creator: None,
                seen,
                create_issued: None,
                created: None,
                started: None,
                exited: None,
                api_running: None,
                api_terminated: None,
                running_written: None,
                terminated_written: None,
            }
        });
        let before = t.clone();
        if let Some(rc) = observed.newest(&c.name) {
            if t.created.is_none() {
                t.creator.get_or_insert(Creator::Other);
                t.created = ns_time(rc.created_at);
            }
            if t.started.is_none() {
                t.started = ns_time(rc.started_at);
            }
            if t.exited.is_none() && rc.state == State::Exited {
                t.exited = ns_time(rc.finished_at).or(Some(now));
            }
        }
        if let Some(st) = api.get(c.name.as_str()).and_then(|s| s.state.as_ref()) {
            if st.running.is_some() && t.api_running.is_none() {
                t.api_running = Some(now);
            }
            if st.terminated.is_some() && t.api_terminated.is_none() {
                t.api_terminated = Some(now);
            }
        }
        if *t != before {
            tracing::info!(container = %c.name, timeline = %serde_json::to_string(t).unwrap_or_default(), "timeline");
        }
    }
}

/// This agent started the container: stamps its start and times the
/// phases. `retried`: the start followed a failure, so the wait since the
/// container was seen is backoff policy, not the agent's cost.
pub fn record_started(t: &mut Timeline, timings: &Timings, retried: bool, metrics: &Metrics) {
    t.creator = Some(Creator::Agent);
    t.create_issued = Some(timings.create_issued);
    t.created = Some(timings.created_at);
    t.started = Some(timings.started_at);
    if let Ok(d) = timings.started_at.duration_since(t.seen) {
        metrics.seen_to_running.observe(d.as_secs_f64());
    }
    if !retried && let Ok(d) = timings.create_issued.duration_since(t.seen) {
        metrics.phase(phase::EVENT_TO_CREATE, d.as_secs_f64());
    }
}

/// The API server accepted `statuses` at `now`: notes the first running
/// and terminated write of each container.
pub fn record_written(
    timelines: &mut BTreeMap<String, Timeline>,
    statuses: &[ContainerStatus],
    now: SystemTime,
    metrics: &Metrics,
) {
    for s in statuses {
        let Some(t) = timelines.get_mut(&s.name) else {
            continue;
        };
        let state = s.state.as_ref();
        if state.is_some_and(|st| st.running.is_some()) && t.running_written.is_none() {
            t.running_written = Some(now);
            if let Some(d) = t.started.and_then(|s| now.duration_since(s).ok()) {
                metrics.phase(phase::START_TO_STATUS, d.as_secs_f64());
            }
        }
        if state.is_some_and(|st| st.terminated.is_some()) && t.terminated_written.is_none() {
            t.terminated_written = Some(now);
            if let Some(d) = t.exited.and_then(|e| now.duration_since(e).ok()) {
                metrics.phase(phase::EXIT_TO_STATUS, d.as_secs_f64());
            }
        }
    }
}

/// A CRI timestamp (ns since the epoch; 0 for none).
fn ns_time(ns: i64) -> Option<SystemTime> {
    (ns > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timelines_serialise_times_as_rfc3339() {
        let t = Timeline {
            pod: "default/web".into(),
            container: "dbg".into(),
            creator: Some(Creator::Agent),
            seen: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500_000_001),
            create_issued: None,
            created: None,
            started: None,
            exited: None,
            api_running: None,
            api_terminated: None,
            running_written: None,
            terminated_written: None,
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["seen"], "1970-01-01T00:00:01.500000001Z");
        assert_eq!(v["created"], serde_json::Value::Null);
        assert_eq!(v["creator"], "agent");
    }
}
