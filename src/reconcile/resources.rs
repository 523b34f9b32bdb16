//! The Linux resources the kubelet writes into a container's CRI config
//! (`generateLinuxContainerResources` and `calculateLinuxResources` in
//! `pkg/kubelet/kuberuntime/kuberuntime_container_linux.go`, Kubernetes
//! 1.36), and the pod's QoS class and OOM score they depend on
//! (`pkg/apis/core/v1/helper/qos`, `pkg/kubelet/qos/policy.go`).
//!
//! An ephemeral container has no requests or limits, yet its config is not
//! empty: the minimum CPU weight (2 shares), the CFS period, the OOM score
//! of the pod's QoS class (BestEffort 1000, Guaranteed and node-critical
//! −997, Burstable 999), a zero hugetlb limit for every page size of the
//! host, and on cgroup v2 `memory.oom.group` and a zero swap limit. Pod-level
//! resources (`spec.resources`, on by default since 1.34) count as the
//! kubelet counts them. Pure: the host's facts come in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::downward::Amount;
use crate::cri::proto::{HugepageLimit, LinuxContainerResources};
use crate::host::HostFacts;

/// A pod's quality-of-service class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    /// Every container has equal CPU and memory requests and limits.
    Guaranteed,
    /// Something is requested, but not Guaranteed.
    Burstable,
    /// Nothing is requested or limited.
    BestEffort,
}

/// The kubelet's minimum CPU weight (`cm.MinShares`), for no request.
pub const MIN_SHARES: i64 = 2;
const MAX_SHARES: i64 = 262_144;
/// The CFS period the kubelet sets on every container, µs (`cm.QuotaPeriod`,
/// the default `--cpu-cfs-quota-period`).
pub const QUOTA_PERIOD: i64 = 100_000;
const MIN_QUOTA: i64 = 1_000;
/// The OOM score of Guaranteed and node-critical pods.
pub const GUARANTEED_OOM_SCORE_ADJ: i64 = -997;
/// The OOM score of BestEffort pods.
pub const BEST_EFFORT_OOM_SCORE_ADJ: i64 = 1000;
/// `scheduling.SystemCriticalPriority`.
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

fn amount(q: &Quantity) -> Amount {
    // The API server validated every quantity; one that does not parse
    // counts as absent rather than failing the start.
    Amount::parse(&q.0).unwrap_or(Amount::ZERO)
}

fn get(list: Option<&BTreeMap<String, Quantity>>, name: &str) -> Option<Amount> {
    list.and_then(|l| l.get(name)).map(amount)
}

fn is_qos_resource(name: &str) -> bool {
    name == "cpu" || name == "memory"
}

/// Adds the positive cpu and memory quantities of `from` to `into`.
fn add_positive(into: &mut BTreeMap<String, Amount>, from: Option<&BTreeMap<String, Quantity>>) {
    for (name, q) in from.into_iter().flatten() {
        let a = amount(q);
        if is_qos_resource(name) && a.is_positive() {
            let sum = into.get(name).map_or(a, |have| have.plus(a));
            into.insert(name.clone(), sum);
        }
    }
}

fn has_cpu_and_memory(list: Option<&BTreeMap<String, Quantity>>) -> bool {
    ["cpu", "memory"]
        .iter()
        .all(|r| get(list, r).is_some_and(Amount::is_positive))
}

/// `GetPodQOS`: the class the API server recorded in `status.qosClass`,
/// else computed from the pod-level resources when the pod has them, else
/// from the regular and init containers (ephemeral containers never count:
/// they cannot have resources).
pub fn pod_qos(pod: &Pod) -> QosClass {
    match pod.status.as_ref().and_then(|s| s.qos_class.as_deref()) {
        Some("Guaranteed") => QosClass::Guaranteed,
        Some("BestEffort") => QosClass::BestEffort,
        // Any other recorded value is not one of the two special classes.
        Some(c) if !c.is_empty() => QosClass::Burstable,
        _ => compute_pod_qos(pod),
    }
}

/// `ComputePodQOS`.
pub fn compute_pod_qos(pod: &Pod) -> QosClass {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    let mut guaranteed = true;
    if let Some(r) = &spec.resources {
        // Pod-level resources decide alone, even when empty.
        add_positive(&mut requests, r.requests.as_ref());
        if r.limits.as_ref().is_some_and(|l| !l.is_empty()) {
            add_positive(&mut limits, r.limits.as_ref());
            guaranteed &= has_cpu_and_memory(r.limits.as_ref());
        }
    } else {
        for r in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .map(|c| c.resources.clone().unwrap_or_default())
        {
            add_positive(&mut requests, r.requests.as_ref());
            add_positive(&mut limits, r.limits.as_ref());
            guaranteed &= has_cpu_and_memory(r.limits.as_ref());
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return QosClass::BestEffort;
    }
    guaranteed &= requests.iter().all(|(name, req)| {
        limits
            .get(name)
            .is_some_and(|lim| lim.cmp_value(*req).is_eq())
    });
    if guaranteed && requests.len() == limits.len() {
        QosClass::Guaranteed
    } else {
        QosClass::Burstable
    }
}

/// `types.IsNodeCriticalPod`: a critical pod (static, mirror, or with a
/// priority of at least `system-cluster-critical`'s) of the
/// `system-node-critical` class. A pod read from the API server is static
/// only if its config source annotation says so.
pub fn is_node_critical(pod: &Pod) -> bool {
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |k: &str| annotations.and_then(|a| a.get(k));
    let static_pod = annotation("kubernetes.io/config.source").is_some_and(|s| s != "api");
    let mirror = annotation("kubernetes.io/config.mirror").is_some();
    let spec = pod.spec.as_ref();
    let priority = spec
        .and_then(|s| s.priority)
        .is_some_and(|p| p >= SYSTEM_CRITICAL_PRIORITY);
    (static_pod || mirror || priority)
        && spec.and_then(|s| s.priority_class_name.as_deref()) == Some("system-node-critical")
}

/// The pod-level memory request not given to any container, shared
/// equally among the regular and init containers
/// (`remainingPodMemReqPerContainer`).
fn remaining_pod_memory_per_container(pod: &Pod) -> i128 {
    let spec = pod.spec.clone().unwrap_or_default();
    let pod_req = get(
        spec.resources.as_ref().and_then(|r| r.requests.as_ref()),
        "memory",
    )
    .map_or(0, Amount::value);
    if pod_req == 0 {
        return 0;
    }
    let n = (spec.containers.len() + spec.init_containers.as_ref().map_or(0, Vec::len)) as i128;
    if n == 0 {
        return 0;
    }
    (pod_req - aggregate_container_memory_requests(pod)) / n
}

/// `AggregateContainerRequests` for memory: the regular containers and the
/// sidecars (restartable init containers) add up; each other init container
/// needs itself plus the sidecars started before it; the larger wins.
fn aggregate_container_memory_requests(pod: &Pod) -> i128 {
    let spec = pod.spec.clone().unwrap_or_default();
    let mem = |r: &Option<ResourceRequirements>| {
        get(r.as_ref().and_then(|r| r.requests.as_ref()), "memory").map_or(0, Amount::value)
    };
    let mut sum: i128 = spec.containers.iter().map(|c| mem(&c.resources)).sum();
    let (mut sidecars, mut init_max) = (0i128, 0i128);
    for c in spec.init_containers.iter().flatten() {
        if c.restart_policy.as_deref() == Some("Always") {
            sum += mem(&c.resources);
            sidecars += mem(&c.resources);
            init_max = init_max.max(sidecars);
        } else {
            init_max = init_max.max(mem(&c.resources) + sidecars);
        }
    }
    sum.max(init_max)
}

/// `GetContainerOOMScoreAdjust` for a container that is no sidecar (an
/// ephemeral container never is): −997 for node-critical and Guaranteed
/// pods, 1000 for BestEffort, and for Burstable `1000 − 1000 × request /
/// capacity` (the request plus the pod-level remainder when the pod has
/// pod-level requests), kept within 3…999 so that Guaranteed pods stay
/// below and BestEffort pods above.
pub fn oom_score_adj(pod: &Pod, memory_request: i128, memory_capacity: i64) -> i64 {
    if is_node_critical(pod) {
        return GUARANTEED_OOM_SCORE_ADJ;
    }
    match pod_qos(pod) {
        QosClass::Guaranteed => return GUARANTEED_OOM_SCORE_ADJ,
        QosClass::BestEffort => return BEST_EFFORT_OOM_SCORE_ADJ,
        QosClass::Burstable => {}
    }
    let pod_level_requests = pod
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .is_some_and(|r| r.keys().any(|k| is_pod_level_resource(k)));
    let request = if pod_level_requests {
        memory_request + remaining_pod_memory_per_container(pod)
    } else {
        memory_request
    };
    // A capacity of 0 (unknown) leaves the request out, like a request of 0.
    let share = match i128::from(memory_capacity) {
        0 => 0,
        cap => 1000i128.saturating_mul(request) / cap,
    };
    let adj = 1000 - share;
    let floor = i128::from(1000 + GUARANTEED_OOM_SCORE_ADJ);
    if adj < floor {
        floor as i64
    } else if adj == i128::from(BEST_EFFORT_OOM_SCORE_ADJ) {
        BEST_EFFORT_OOM_SCORE_ADJ - 1
    } else {
        adj.min(i128::from(BEST_EFFORT_OOM_SCORE_ADJ)) as i64
    }
}

fn is_pod_level_resource(name: &str) -> bool {
    is_qos_resource(name) || name.starts_with("hugepages-")
}

/// `IsPodLevelResourcesSet`: pod-level requests or limits of cpu, memory or
/// huge pages.
fn pod_level_resources_set(pod: &Pod) -> bool {
    let r = pod.spec.as_ref().and_then(|s| s.resources.as_ref());
    r.into_iter()
        .flat_map(|r| r.requests.iter().chain(r.limits.iter()))
        .flat_map(|m| m.keys())
        .any(|k| is_pod_level_resource(k))
}

/// `MilliCPUToShares`.
pub fn milli_cpu_to_shares(milli: i128) -> i64 {
    if milli == 0 {
        return MIN_SHARES;
    }
    let shares = milli.saturating_mul(1024) / 1000;
    shares.clamp(i128::from(MIN_SHARES), i128::from(MAX_SHARES)) as i64
}

/// `MilliCPUToQuota` with the default period: 0 (no quota) for no limit.
pub fn milli_cpu_to_quota(milli: i128, period: i64) -> i64 {
    if milli == 0 {
        return 0;
    }
    let quota = milli.saturating_mul(i128::from(period)) / 1000;
    quota.clamp(i128::from(MIN_QUOTA), i128::from(i64::MAX)) as i64
}

/// A huge page resource name's page size in the CRI's spelling
/// (`hugepages-2Mi` → `2MB`, `HugePageUnitSizeFromByteSize`).
pub fn hugepage_size_of(resource: &str) -> Option<String> {
    let size = Amount::parse(resource.strip_prefix("hugepages-")?)
        .ok()?
        .value();
    if size <= 0 {
        return None;
    }
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let (mut size, mut unit) = (size, 0);
    while size % 1024 == 0 && unit < UNITS.len() - 1 {
        size /= 1024;
        unit += 1;
    }
    (size <= 1024 || unit == UNITS.len() - 1).then(|| format!("{size}{}", UNITS[unit]))
}

/// The container's Linux resources as the kubelet generates them, for a
/// container with `resources` (none for an ephemeral container) in `pod`
/// on `host`. Only the container's own requests count for its CPU weight
/// and OOM score; unset limits fall back to the pod-level ones.
pub fn linux_resources(
    pod: &Pod,
    resources: Option<&ResourceRequirements>,
    host: &HostFacts,
) -> LinuxContainerResources {
    let requests = resources.and_then(|r| r.requests.as_ref());
    let limits = resources.and_then(|r| r.limits.as_ref());
    let pod_limits = pod
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.limits.as_ref());
    let pod_level = pod_level_resources_set(pod);
    // getCPULimit / getMemoryLimit: a zero container limit takes the pod's.
    let limit = |name: &str| {
        let own = get(limits, name).unwrap_or(Amount::ZERO);
        if own.cmp_value(Amount::ZERO).is_eq() && pod_level {
            get(pod_limits, name).unwrap_or(Amount::ZERO)
        } else {
            own
        }
    };
    let cpu_limit_milli = limit("cpu").milli_value();
    let memory_limit = limit("memory").value();

    // With no CPU request the weight follows the limit (the API server
    // defaults a missing request to the limit; the kubelet repeats that),
    // and with neither it is the minimum.
    let cpu_shares = match get(requests, "cpu") {
        Some(req) => milli_cpu_to_shares(req.milli_value()),
        None => milli_cpu_to_shares(cpu_limit_milli),
    };
    let mut out = LinuxContainerResources {
        cpu_shares,
        cpu_period: QUOTA_PERIOD,
        cpu_quota: milli_cpu_to_quota(cpu_limit_milli, QUOTA_PERIOD),
        memory_limit_in_bytes: memory_limit.clamp(0, i128::from(i64::MAX)) as i64,
        ..Default::default()
    };
    // The kubelet's default on cgroup v2 (`singleProcessOOMKill` unset):
    // the kernel kills the whole container on OOM.
    if host.cgroup2 {
        out.unified.insert("memory.oom.group".into(), "1".into());
    }
    let memory_request = get(requests, "memory").map_or(0, Amount::value);
    out.oom_score_adj = oom_score_adj(pod, memory_request, host.memory_capacity);
    out.hugepage_limits = hugepage_limits(pod_level.then_some(pod_limits).flatten(), limits, host);
    // NoSwap, the only behaviour for a container that requests no memory:
    // on cgroup v1 swap is capped at the memory limit, on v2 at zero.
    if host.swap_controller {
        if host.cgroup2 {
            out.unified.insert("memory.swap.max".into(), "0".into());
        } else {
            out.memory_swap_limit_in_bytes = out.memory_limit_in_bytes;
        }
    }
    out
}

/// `GetHugepageLimitsFromResources`: 0 for every page size of the host,
/// unless the pod-level or (taking precedence) the container's limits name
/// that size.
fn hugepage_limits(
    pod_limits: Option<&BTreeMap<String, Quantity>>,
    limits: Option<&BTreeMap<String, Quantity>>,
    host: &HostFacts,
) -> Vec<HugepageLimit> {
    let mut wanted = BTreeMap::new();
    for (name, q) in pod_limits.into_iter().chain(limits).flatten() {
        if let Some(size) = hugepage_size_of(name) {
            wanted.insert(
                size,
                amount(q).value().clamp(0, i128::from(u64::MAX)) as u64,
            );
        }
    }
    host.hugepage_sizes
        .iter()
        .map(|size| HugepageLimit {
            page_size: size.clone(),
            limit: wanted.get(size).copied().unwrap_or(0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};

    fn list(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
        (!pairs.is_empty()).then(|| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect()
        })
    }

    fn req_lim(req: &[(&str, &str)], lim: &[(&str, &str)]) -> Option<ResourceRequirements> {
        Some(ResourceRequirements {
            requests: list(req),
            limits: list(lim),
            ..Default::default()
        })
    }

    type Pairs<'a> = &'a [(&'a str, &'a str)];

    /// A pod whose regular containers have these (requests, limits).
    fn pod(containers: &[(Pairs<'_>, Pairs<'_>)]) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: containers
                    .iter()
                    .enumerate()
                    .map(|(i, (req, lim))| Container {
                        name: format!("c{i}"),
                        resources: req_lim(req, lim),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const GUARANTEED: &[(&str, &str)] = &[("cpu", "500m"), ("memory", "64Mi")];

    #[test]
    fn qos_class_follows_get_pod_qos() {
        let with_init = |mut p: Pod, req: &'static [(&str, &str)]| {
            p.spec.as_mut().unwrap().init_containers = Some(vec![Container {
                name: "init".into(),
                resources: req_lim(req, &[]),
                ..Default::default()
            }]);
            p
        };
        let with_status = |mut p: Pod, class: &str| {
            p.status = Some(PodStatus {
                qos_class: Some(class.into()),
                ..Default::default()
            });
            p
        };
        let with_pod_level = |mut p: Pod, req: &[(&str, &str)], lim: &[(&str, &str)]| {
            p.spec.as_mut().unwrap().resources = req_lim(req, lim);
            p
        };
        let table: Vec<(&str, Pod, QosClass)> = vec![
            (
                "no requests or limits: BestEffort",
                pod(&[(&[], &[])]),
                QosClass::BestEffort,
            ),
            (
                "requests equal limits for cpu and memory in every container: Guaranteed",
                pod(&[(GUARANTEED, GUARANTEED), (GUARANTEED, GUARANTEED)]),
                QosClass::Guaranteed,
            ),
            (
                "only limits (the API server defaults requests to them; the kubelet sees limits only): Burstable",
                pod(&[(&[], GUARANTEED)]),
                QosClass::Burstable,
            ),
            (
                "a memory request only: Burstable",
                pod(&[(&[("memory", "1Gi")], &[])]),
                QosClass::Burstable,
            ),
            (
                "one container without limits breaks Guaranteed",
                pod(&[(GUARANTEED, GUARANTEED), (&[], &[])]),
                QosClass::Burstable,
            ),
            (
                "zero quantities count as unset",
                pod(&[(&[("cpu", "0"), ("memory", "0")], &[])]),
                QosClass::BestEffort,
            ),
            (
                "other resources do not count",
                pod(&[(&[("ephemeral-storage", "1Gi")], &[("nvidia.com/gpu", "1")])]),
                QosClass::BestEffort,
            ),
            (
                "equal values written differently are equal",
                pod(&[(
                    &[("cpu", "0.5"), ("memory", "64Mi")],
                    &[("cpu", "500m"), ("memory", "67108864")],
                )]),
                QosClass::Guaranteed,
            ),
            (
                "init containers count too",
                with_init(pod(&[(&[], &[])]), &[("cpu", "100m")]),
                QosClass::Burstable,
            ),
            (
                "status.qosClass wins over the spec",
                with_status(pod(&[(GUARANTEED, GUARANTEED)]), "BestEffort"),
                QosClass::BestEffort,
            ),
            (
                "pod-level resources decide alone",
                with_pod_level(pod(&[(&[], &[])]), GUARANTEED, GUARANTEED),
                QosClass::Guaranteed,
            ),
            (
                "pod-level requests without limits: Burstable",
                with_pod_level(pod(&[(GUARANTEED, GUARANTEED)]), &[("memory", "1Gi")], &[]),
                QosClass::Burstable,
            ),
        ];
        for (rule, p, want) in table {
            assert_eq!(pod_qos(&p), want, "{rule}");
        }
    }

    #[test]
    fn oom_score_adj_follows_get_container_oom_score_adjust() {
        const GI: i64 = 1 << 30;
        let critical = |mut p: Pod, class: &str, priority: i32| {
            let s = p.spec.as_mut().unwrap();
            s.priority_class_name = Some(class.into());
            s.priority = Some(priority);
            p
        };
        let pod_level = |mut p: Pod, mem: &'static str| {
            p.spec.as_mut().unwrap().resources = req_lim(&[("memory", mem)], &[]);
            p
        };
        let burstable = pod(&[(&[("memory", "1Gi")], &[])]);
        // (rule, pod, the container's memory request, capacity, want)
        let table: Vec<(&str, Pod, i128, i64, i64)> = vec![
            ("BestEffort pod: 1000", pod(&[(&[], &[])]), 0, 8 * GI, 1000),
            (
                "Guaranteed pod: -997",
                pod(&[(GUARANTEED, GUARANTEED)]),
                0,
                8 * GI,
                -997,
            ),
            (
                "system-node-critical with critical priority: -997 whatever the class",
                critical(pod(&[(&[], &[])]), "system-node-critical", 2_000_001_000),
                0,
                8 * GI,
                -997,
            ),
            (
                "system-node-critical class name without the priority: its QoS class",
                critical(pod(&[(&[], &[])]), "system-node-critical", 0),
                0,
                8 * GI,
                1000,
            ),
            (
                "system-cluster-critical is not node-critical",
                critical(pod(&[(&[], &[])]), "system-cluster-critical", 2_000_000_000),
                0,
                8 * GI,
                1000,
            ),
            (
                "Burstable, a container requesting nothing (an ephemeral one): 999, never BestEffort's 1000",
                burstable.clone(),
                0,
                8 * GI,
                999,
            ),
            (
                "Burstable, 1 GiB of 8: 1000 - 125",
                burstable.clone(),
                i128::from(GI),
                8 * GI,
                875,
            ),
            (
                "Burstable, the whole node: at least 3, above Guaranteed",
                burstable.clone(),
                i128::from(8 * GI),
                8 * GI,
                3,
            ),
            (
                "Burstable with pod-level requests: the unassigned share per container counts",
                pod_level(pod(&[(&[], &[]), (&[], &[])]), "4Gi"),
                0,
                8 * GI,
                750,
            ),
            (
                "unknown capacity: as if nothing were requested",
                burstable,
                i128::from(GI),
                0,
                999,
            ),
        ];
        for (rule, p, req, cap, want) in table {
            assert_eq!(oom_score_adj(&p, req, cap), want, "{rule}");
        }
    }

    #[test]
    fn cpu_shares_and_quota_follow_the_kubelets_conversions() {
        // (milli-CPU, shares, quota at the default period)
        let table = [
            (0, 2, 0),
            (1, 2, 1000),
            (10, 10, 1000),
            (250, 256, 25_000),
            (1000, 1024, 100_000),
            (300_000, 262_144, 30_000_000),
        ];
        for (milli, shares, quota) in table {
            assert_eq!(milli_cpu_to_shares(milli), shares, "{milli}m shares");
            assert_eq!(
                milli_cpu_to_quota(milli, QUOTA_PERIOD),
                quota,
                "{milli}m quota"
            );
        }
    }

    #[test]
    fn hugepage_resource_names_become_page_sizes() {
        let table = [
            ("hugepages-2Mi", Some("2MB")),
            ("hugepages-1Gi", Some("1GB")),
            ("hugepages-64Ki", Some("64KB")),
            ("hugepages-0", None),
            ("memory", None),
        ];
        for (name, want) in table {
            assert_eq!(hugepage_size_of(name).as_deref(), want, "{name}");
        }
    }

    fn host(cgroup2: bool, swap: bool) -> HostFacts {
        HostFacts {
            memory_capacity: 8 << 30,
            cgroup2,
            swap_controller: swap,
            hugepage_sizes: vec!["2MB".into(), "1GB".into()],
            thermal_throttle: vec![],
        }
    }

    #[test]
    fn an_ephemeral_container_gets_the_minimum_not_nothing() {
        let best_effort = pod(&[(&[], &[])]);
        let zero_hugepages = vec![
            HugepageLimit {
                page_size: "2MB".into(),
                limit: 0,
            },
            HugepageLimit {
                page_size: "1GB".into(),
                limit: 0,
            },
        ];
        // (rule, pod, host, want)
        let table: Vec<(&str, Pod, HostFacts, LinuxContainerResources)> = vec![
            (
                "cgroup v1 with memsw: shares 2, the CFS period without a quota, BestEffort's score, zero hugetlb limits, swap capped at the (absent) memory limit",
                best_effort.clone(),
                host(false, true),
                LinuxContainerResources {
                    cpu_shares: 2,
                    cpu_period: 100_000,
                    oom_score_adj: 1000,
                    hugepage_limits: zero_hugepages.clone(),
                    ..Default::default()
                },
            ),
            (
                "cgroup v2 with a swap controller: memory.oom.group and no swap",
                best_effort.clone(),
                host(true, true),
                LinuxContainerResources {
                    cpu_shares: 2,
                    cpu_period: 100_000,
                    oom_score_adj: 1000,
                    hugepage_limits: zero_hugepages.clone(),
                    unified: [
                        ("memory.oom.group".to_string(), "1".to_string()),
                        ("memory.swap.max".to_string(), "0".to_string()),
                    ]
                    .into(),
                    ..Default::default()
                },
            ),
            (
                "Burstable pod: 999",
                pod(&[(&[("memory", "1Gi")], &[])]),
                host(false, false),
                LinuxContainerResources {
                    cpu_shares: 2,
                    cpu_period: 100_000,
                    oom_score_adj: 999,
                    hugepage_limits: zero_hugepages.clone(),
                    ..Default::default()
                },
            ),
            (
                "pod-level limits apply to a container without its own (getCPULimit, getMemoryLimit); the weight follows the CPU limit",
                {
                    let mut p = pod(&[(&[], &[])]);
                    p.spec.as_mut().unwrap().resources = req_lim(
                        &[],
                        &[("cpu", "2"), ("memory", "1Gi"), ("hugepages-2Mi", "4Mi")],
                    );
                    p
                },
                host(false, true),
                LinuxContainerResources {
                    cpu_shares: 2048,
                    cpu_period: 100_000,
                    cpu_quota: 200_000,
                    memory_limit_in_bytes: 1 << 30,
                    memory_swap_limit_in_bytes: 1 << 30,
                    oom_score_adj: 999,
                    hugepage_limits: vec![
                        HugepageLimit {
                            page_size: "2MB".into(),
                            limit: 4 << 20,
                        },
                        zero_hugepages[1].clone(),
                    ],
                    ..Default::default()
                },
            ),
        ];
        for (rule, p, h, want) in table {
            assert_eq!(linux_resources(&p, None, &h), want, "{rule}");
        }
    }

    #[test]
    fn a_regular_container_with_resources_as_the_kubelet_sets_them() {
        let r = req_lim(
            &[("cpu", "250m"), ("memory", "64Mi")],
            &[("cpu", "500m"), ("memory", "128Mi")],
        );
        let p = pod(&[(
            &[("cpu", "250m"), ("memory", "64Mi")],
            &[("cpu", "500m"), ("memory", "128Mi")],
        )]);
        let got = linux_resources(&p, r.as_ref(), &host(false, false));
        assert_eq!(got.cpu_shares, 256);
        assert_eq!(got.cpu_quota, 50_000);
        assert_eq!(got.memory_limit_in_bytes, 128 << 20);
        // Burstable: 1000 - 1000 × 64 MiB / 8 GiB = 1000 - 7.8 → 993.
        assert_eq!(got.oom_score_adj, 993);
    }
}
