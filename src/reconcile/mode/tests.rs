//! The `--mode auto` decision, sign by sign, and the gate.

use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use serde_json::json;

const NODE: &str = "node-a";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn ts(t: SystemTime) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::try_from(t).unwrap()
}

/// The Lease as the kubelet's lease controller keeps it.
fn lease(renewed: Option<SystemTime>, duration: Option<i32>) -> Seen<Lease> {
    let mut l: Lease = serde_json::from_value(json!({
        "metadata": {"name": NODE, "namespace": NODE_LEASE_NAMESPACE},
        "spec": {"holderIdentity": NODE},
    }))
    .unwrap();
    let spec = l.spec.as_mut().unwrap();
    spec.lease_duration_seconds = duration;
    spec.renew_time = renewed.map(|t| MicroTime(ts(t)));
    Seen::Present(l)
}

/// A Node: registered by a kubelet or by hand, with a Ready heartbeat.
fn node(kubelet: bool, heartbeat: Option<SystemTime>) -> Seen<Node> {
    let mut n: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE},
        "status": {},
    }))
    .unwrap();
    let status = n.status.as_mut().unwrap();
    if kubelet {
        *status = serde_json::from_value(json!({
            "nodeInfo": {"kubeletVersion": "v1.36.0", "machineID": "", "systemUUID": "",
                         "bootID": "", "kernelVersion": "", "osImage": "",
                         "containerRuntimeVersion": "containerd://1.6.20",
                         "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64"},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        }))
        .unwrap();
    }
    if let Some(hb) = heartbeat {
        status.conditions = Some(vec![
            serde_json::from_value(json!({
                "type": "Ready", "status": "True", "reason": "KubeletReady",
            }))
            .unwrap(),
        ]);
        status.conditions.as_mut().unwrap()[0].last_heartbeat_time = Some(Time(ts(hb)));
    }
    Seen::Present(n)
}

fn evidence(lease: Seen<Lease>, node: Seen<Node>) -> Evidence {
    Evidence {
        node_name: NODE.into(),
        lease,
        node,
    }
}

#[test]
fn the_rules_table() {
    let now = at(1000);
    let w = Windows::default();
    let grace = w.node_monitor_grace.as_secs();
    struct Case {
        name: &'static str,
        evidence: Evidence,
        start: bool,
        rule: Rule,
        recheck_at: Option<SystemTime>,
        says: &'static str,
    }
    let cases = [
        Case {
            name: "nothing listed yet: wait, start nothing",
            evidence: Evidence::waiting(NODE),
            start: false,
            rule: Rule::Waiting,
            recheck_at: None,
            says: "waiting for the first look",
        },
        Case {
            name: "only the Lease listed: still waiting",
            evidence: evidence(Seen::Absent, Seen::Waiting),
            start: false,
            rule: Rule::Waiting,
            recheck_at: None,
            says: "waiting for the first look",
        },
        Case {
            name: "a watch failed: cannot tell, start nothing",
            evidence: evidence(
                Seen::Unknown("cannot watch Lease: 503".into()),
                Seen::Absent,
            ),
            start: false,
            rule: Rule::CannotTell,
            recheck_at: None,
            says: "cannot watch Lease: 503; cannot tell",
        },
        Case {
            name: "a failure counts even when the other source shows no kubelet",
            evidence: evidence(Seen::Absent, Seen::Unknown("cannot watch Node: 403".into())),
            start: false,
            rule: Rule::CannotTell,
            recheck_at: None,
            says: "cannot watch Node: 403",
        },
        Case {
            name: "lease renewed within its duration: a kubelet serves",
            evidence: evidence(lease(Some(at(990)), Some(40)), Seen::Absent),
            start: false,
            rule: Rule::LeaseRenewed,
            recheck_at: Some(at(1030)),
            says: "Lease kube-node-lease/node-a renewed 10.0s ago (it holds 40s)",
        },
        Case {
            name: "lease duration missing: the kubelet's default 40 s",
            evidence: evidence(lease(Some(at(970)), None), Seen::Absent),
            start: false,
            rule: Rule::LeaseRenewed,
            recheck_at: Some(at(1010)),
            says: "it holds 40s",
        },
        Case {
            name: "lease exactly at its end: expired",
            evidence: evidence(lease(Some(at(960)), Some(40)), Seen::Absent),
            start: true,
            rule: Rule::NoKubelet,
            recheck_at: None,
            says: "no Node node-a; Lease kube-node-lease/node-a expired 0.0s ago: no kubelet serves this node",
        },
        Case {
            name: "ready heartbeat within the grace: a kubelet serves",
            evidence: evidence(Seen::Absent, node(false, Some(at(990)))),
            start: false,
            rule: Rule::ReadyHeartbeat,
            recheck_at: Some(at(990 + grace)),
            says: "Node node-a's Ready heartbeat is 10.0s old",
        },
        Case {
            name: "registered by a kubelet, lease not there yet: a kubelet serves",
            evidence: evidence(Seen::Absent, node(true, Some(at(100)))),
            start: false,
            rule: Rule::RegisteredAwaitingLease,
            recheck_at: None,
            says: "a kubelet v1.36.0 registered Node node-a and its Lease kube-node-lease/node-a is not there yet",
        },
        Case {
            name: "registered, heartbeat fresh, no lease: both signs, no end by time",
            evidence: evidence(Seen::Absent, node(true, Some(at(999)))),
            start: false,
            rule: Rule::ReadyHeartbeat,
            recheck_at: None,
            says: "heartbeat is 1.0s old (grace 50s); a kubelet v1.36.0 registered",
        },
        Case {
            name: "lease and heartbeat fresh: decided until the later one runs out",
            evidence: evidence(lease(Some(at(995)), Some(10)), node(true, Some(at(990)))),
            start: false,
            rule: Rule::LeaseRenewed,
            recheck_at: Some(at(990 + grace)),
            says: "renewed 5.0s ago (it holds 10s); Node node-a's Ready heartbeat",
        },
        Case {
            name: "lease expired and heartbeat stale: start",
            evidence: evidence(lease(Some(at(900)), Some(40)), node(true, Some(at(900)))),
            start: true,
            rule: Rule::NoKubelet,
            recheck_at: None,
            says: "Node node-a's last Ready heartbeat is 100.0s old, past the 50s grace; Lease kube-node-lease/node-a expired 60.0s ago: no kubelet serves this node",
        },
        Case {
            name: "registered by a kubelet once, lease expired since: start",
            evidence: evidence(lease(Some(at(10)), Some(40)), node(true, None)),
            start: true,
            rule: Rule::NoKubelet,
            recheck_at: None,
            says: "Node node-a has no Ready heartbeat; Lease kube-node-lease/node-a expired",
        },
        Case {
            name: "no node object and no lease (the testbed): start",
            evidence: evidence(Seen::Absent, Seen::Absent),
            start: true,
            rule: Rule::NoKubelet,
            recheck_at: None,
            says: "no Node node-a; no Lease kube-node-lease/node-a: no kubelet serves this node",
        },
        Case {
            name: "a node made by hand, no heartbeat, no lease: start",
            evidence: evidence(Seen::Absent, node(false, None)),
            start: true,
            rule: Rule::NoKubelet,
            recheck_at: None,
            says: "Node node-a has no Ready heartbeat; no Lease",
        },
        Case {
            name: "a lease never renewed is no sign",
            evidence: evidence(lease(None, Some(40)), Seen::Absent),
            start: true,
            rule: Rule::NoKubelet,
            recheck_at: None,
            says: "Lease kube-node-lease/node-a was never renewed",
        },
        Case {
            name: "a renewal in the future (clock step) still holds",
            evidence: evidence(lease(Some(at(1005)), Some(40)), Seen::Absent),
            start: false,
            rule: Rule::LeaseRenewed,
            recheck_at: Some(at(1045)),
            says: "renewed 0.0s ago",
        },
    ];
    for c in cases {
        let d = decide(&c.evidence, now, &w);
        assert_eq!(
            (d.start, d.rule, d.recheck_at),
            (c.start, c.rule, c.recheck_at),
            "{}: {}",
            c.name,
            d.why
        );
        assert!(d.why.contains(c.says), "{}: {:?}", c.name, d.why);
    }
}

#[test]
fn a_kubelet_dying_is_seen_when_the_last_window_runs_out() {
    // Lease for 10 s and a heartbeat that stays fresh 3 s longer.
    let e = evidence(
        lease(Some(at(0)), Some(10)),
        node(true, Some(at(13) - NODE_MONITOR_GRACE_PERIOD)),
    );
    let w = Windows::default();
    let d = decide(&e, at(5), &w);
    assert_eq!((d.start, d.recheck_at), (false, Some(at(13))));
    assert!(!decide(&e, at(12), &w).start, "the heartbeat still holds");
    assert!(decide(&e, at(13), &w).start, "both ran out");
}

#[test]
fn the_gate_reports_changes_of_the_mode_only() {
    let g = ModeGate::new(false, "a kubelet renews the node lease");
    let mut rx = g.subscribe();
    assert!(!g.starting());
    assert!(g.describe().starts_with("observing only"));
    assert!(g.set(true, "no live kubelet"));
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();
    assert!(!g.set(true, "no live kubelet"), "same mode, same reason");
    assert!(!rx.has_changed().unwrap());
    assert!(!g.set(true, "still none"), "a new reason is not a change");
    assert!(rx.has_changed().unwrap(), "but subscribers see it");
    assert!(g.describe().contains("still none"));
}
