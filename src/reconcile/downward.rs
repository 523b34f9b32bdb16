//! The downward API's resource values for env vars (`resourceFieldRef`), as
//! the kubelet computes them (`containerResourceRuntimeValue`,
//! `ExtractContainerResourceValue`): the container's requests and limits,
//! with unset cpu, memory and ephemeral-storage limits taken from the
//! node's allocatable, divided by the divisor and rounded up. Ephemeral
//! containers have no resources, so their requests read 0 and their limits
//! the node's allocatable. Pure: the allocatable comes in.
//!
//! Must not read anything: the caller passes what it needs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, ResourceFieldSelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// A quantity as an exact fraction `num / den`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount {
    num: i128,
    den: i128,
}

impl Amount {
    /// Zero.
    pub const ZERO: Amount = Amount { num: 0, den: 1 };
    const ONE: Amount = Amount { num: 1, den: 1 };

    /// Parses a Kubernetes quantity (`250m`, `1.5Gi`, `2e3`, `128974848`).
    pub fn parse(s: &str) -> Result<Amount, String> {
        let bad = || format!("quantities must match the regular expression: {s:?}");
        let s = s.trim();
        let (sign, rest) = match s.strip_prefix('-') {
            Some(r) => (-1, r),
            None => (1, s.strip_prefix('+').unwrap_or(s)),
        };
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(end);
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let digits: i128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
        let mut exp10 = -(frac.len() as i32);
        let mut exp2 = 0;
        match suffix {
            "" => {}
            "n" => exp10 -= 9,
            "u" => exp10 -= 6,
            "m" => exp10 -= 3,
            "k" => exp10 += 3,
            "M" => exp10 += 6,
            "G" => exp10 += 9,
            "T" => exp10 += 12,
            "P" => exp10 += 15,
            "E" => exp10 += 18,
            "Ki" => exp2 = 10,
            "Mi" => exp2 = 20,
            "Gi" => exp2 = 30,
            "Ti" => exp2 = 40,
            "Pi" => exp2 = 50,
            "Ei" => exp2 = 60,
            e => {
                let n: i32 = e
                    .strip_prefix(['e', 'E'])
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?;
                exp10 += n;
            }
        }
        let pow10 = |e: i32| 10i128.checked_pow(e.unsigned_abs()).ok_or_else(bad);
        let mut num = digits.checked_mul(1i128 << exp2).ok_or_else(bad)?;
        let mut den = 1;
        if exp10 >= 0 {
            num = num.checked_mul(pow10(exp10)?).ok_or_else(bad)?;
        } else {
            den = pow10(exp10)?;
        }
        Ok(Amount {
            num: sign * num,
            den,
        })
    }

    fn is_zero(self) -> bool {
        self.num == 0
    }

    /// Whether the quantity is above zero (Go's `Sign() == 1`).
    pub fn is_positive(self) -> bool {
        self.num > 0
    }

    /// The sum of two quantities.
    pub fn plus(self, other: Amount) -> Amount {
        // Denominators are powers of ten: the larger is a common one.
        let den = self.den.max(other.den);
        Amount {
            num: self
                .num
                .saturating_mul(den / self.den)
                .saturating_add(other.num.saturating_mul(den / other.den)),
            den,
        }
    }

    /// Go's `Quantity.Value()`: whole units, rounded up.
    pub fn value(self) -> i128 {
        self.ceil_scaled(1)
    }

    /// Go's `Quantity.MilliValue()`: thousandths, rounded up.
    pub fn milli_value(self) -> i128 {
        self.ceil_scaled(1000)
    }

    /// Exact comparison of the values (Go's `Quantity.Cmp`).
    pub fn cmp_value(self, other: Amount) -> std::cmp::Ordering {
        // Both denominators are positive powers of ten.
        self.num
            .saturating_mul(other.den)
            .cmp(&other.num.saturating_mul(self.den))
    }

    /// `ceil(self * scale)`. Saturating: an absurd quantity gives a huge
    /// number, never a panic.
    fn ceil_scaled(self, scale: i128) -> i128 {
        let scaled = self.num.saturating_mul(scale);
        scaled.div_euclid(self.den) + i128::from(scaled.rem_euclid(self.den) != 0)
    }

    /// `ceil(self * scale / (divisor * scale))`, i.e. `ceil(self / divisor)`
    /// after both are rounded up to whole units of `1/scale` (Go's
    /// `MilliValue` with scale 1000, `Value` with scale 1).
    fn divided_by(self, divisor: Amount, scale: i128) -> i128 {
        let (n, d) = (self.ceil_scaled(scale), divisor.ceil_scaled(scale));
        if d == 0 {
            return 0;
        }
        n.div_euclid(d) + i128::from(n.rem_euclid(d) != 0)
    }
}

/// Why a resource value cannot be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownwardError {
    /// Not a resource the downward API exposes (the kubelet's words).
    #[error("unsupported container resource : {0}")]
    Unsupported(String),
    /// `containerName` names no container of the pod.
    #[error("container {0} not found")]
    NoContainer(String),
    /// A quantity that does not parse.
    #[error("{0}")]
    Quantity(String),
    /// A limit falls back to the node's allocatable, which was not read.
    #[error("the allocatable resources of node {0:?} are unknown")]
    NoAllocatable(String),
}

/// The value of a `resourceFieldRef` of an ephemeral container of `pod`:
/// its own resources (none), or those of the regular or init container it
/// names in `containerName`.
pub fn resource_value(
    pod: &Pod,
    sel: &ResourceFieldSelector,
    allocatable: Option<&BTreeMap<String, Quantity>>,
) -> Result<String, DownwardError> {
    let spec = pod.spec.as_ref();
    let unsupported = || DownwardError::Unsupported(sel.resource.clone());
    let (kind, resource) = sel.resource.split_once('.').ok_or_else(unsupported)?;
    let known = matches!(resource, "cpu" | "memory" | "ephemeral-storage")
        || resource.starts_with("hugepages-");
    if !known || !matches!(kind, "requests" | "limits") {
        return Err(unsupported());
    }

    // Whose resources, and whether unset limits default to the node's
    // allocatable (the kubelet does that for the container itself and the
    // pod's regular containers, not for init containers).
    let (owner, node_default): (Option<&Container>, bool) =
        match sel.container_name.as_deref().filter(|n| !n.is_empty()) {
            None => (None, true),
            Some(name) => {
                let regular = spec.and_then(|s| s.containers.iter().find(|x| x.name == name));
                let init = spec
                    .and_then(|s| s.init_containers.as_ref())
                    .and_then(|v| v.iter().find(|x| x.name == name));
                match (regular, init) {
                    (Some(c), _) => (Some(c), true),
                    (None, Some(c)) => (Some(c), false),
                    (None, None) => return Err(DownwardError::NoContainer(name.to_string())),
                }
            }
        };
    let resources = owner.and_then(|c| c.resources.as_ref());
    let list = if kind == "requests" {
        resources.and_then(|r| r.requests.as_ref())
    } else {
        resources.and_then(|r| r.limits.as_ref())
    };
    let get = |list: Option<&BTreeMap<String, Quantity>>| -> Result<Amount, DownwardError> {
        match list.and_then(|l| l.get(resource)) {
            Some(q) => Amount::parse(&q.0).map_err(DownwardError::Quantity),
            None => Ok(Amount::ZERO),
        }
    };
    let mut value = get(list)?;
    // MergeContainerResourceLimits: unset or zero cpu, memory and
    // ephemeral-storage limits become the node's allocatable (never hugepages).
    if kind == "limits" && node_default && !resource.starts_with("hugepages-") && value.is_zero() {
        let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        value = get(Some(allocatable.ok_or(DownwardError::NoAllocatable(node))?))?;
    }
    let divisor = match &sel.divisor {
        Some(q) => Amount::parse(&q.0).map_err(DownwardError::Quantity)?,
        None => Amount::ZERO,
    };
    let divisor = if divisor.is_zero() {
        Amount::ONE
    } else {
        divisor
    };
    let scale = if resource == "cpu" { 1000 } else { 1 };
    Ok(value.divided_by(divisor, scale).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn quantities_parse_exactly() {
        let table = [
            ("1", 1, 1),
            ("250m", 250, 1000),
            ("1.5", 15, 10),
            ("2k", 2000, 1),
            ("1Ki", 1024, 1),
            ("1.5Gi", 15 << 30, 10),
            ("2e3", 2000, 1),
            ("5E-1", 5, 10),
            ("100n", 100, 1_000_000_000),
            ("-3", -3, 1),
        ];
        for (s, num, den) in table {
            assert_eq!(Amount::parse(s), Ok(Amount { num, den }), "{s}");
        }
        for bad in ["", "m", "1x", "1.2.3", "Gi", "1e", "1e40"] {
            assert!(Amount::parse(bad).is_err(), "{bad:?}");
        }
        // Huge but valid: saturates instead of overflowing.
        let huge = Amount::parse("1e37").unwrap();
        assert!(huge.divided_by(Amount::ONE, 1000) > 10i128.pow(30));
    }

    fn pod() -> Pod {
        let limited = |name: &str| Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                limits: Some(BTreeMap::from([("memory".into(), q("256Mi"))])),
                requests: Some(BTreeMap::from([
                    ("cpu".into(), q("250m")),
                    ("memory".into(), q("128Mi")),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        };
        Pod {
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                containers: vec![limited("app")],
                init_containers: Some(vec![limited("init")]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn allocatable() -> BTreeMap<String, Quantity> {
        BTreeMap::from([
            ("cpu".into(), q("3500m")),
            ("memory".into(), q("7Gi")),
            ("ephemeral-storage".into(), q("100G")),
        ])
    }

    #[test]
    fn values_like_the_kubelets_downward_api() {
        let table: [(&str, Option<&str>, Option<&str>, &str); 13] = [
            // The ephemeral container itself: no requests, limits from the node.
            ("requests.cpu", None, None, "0"),
            ("requests.memory", None, None, "0"),
            ("limits.cpu", None, None, "4"),
            ("limits.cpu", None, Some("1m"), "3500"),
            ("limits.memory", None, None, "7516192768"),
            ("limits.memory", None, Some("1Mi"), "7168"),
            ("limits.ephemeral-storage", None, Some("1G"), "100"),
            ("limits.hugepages-2Mi", None, None, "0"),
            // Another container of the pod.
            ("requests.cpu", Some("app"), Some("1m"), "250"),
            ("requests.cpu", Some("app"), None, "1"),
            ("limits.memory", Some("app"), Some("1Mi"), "256"),
            ("limits.cpu", Some("app"), None, "4"),
            ("limits.cpu", Some("init"), None, "0"),
        ];
        let alloc = allocatable();
        for (resource, container, divisor, want) in table {
            let sel = ResourceFieldSelector {
                resource: resource.into(),
                container_name: container.map(Into::into),
                divisor: divisor.map(q),
            };
            assert_eq!(
                resource_value(&pod(), &sel, Some(&alloc)).as_deref(),
                Ok(want),
                "{resource} of {container:?} / {divisor:?}"
            );
        }
    }

    #[test]
    fn errors() {
        let sel = |r: &str, c: Option<&str>| ResourceFieldSelector {
            resource: r.into(),
            container_name: c.map(Into::into),
            divisor: None,
        };
        let alloc = allocatable();
        assert_eq!(
            resource_value(&pod(), &sel("limits.gpu", None), Some(&alloc))
                .unwrap_err()
                .to_string(),
            "unsupported container resource : limits.gpu"
        );
        assert_eq!(
            resource_value(&pod(), &sel("limits.cpu", Some("nope")), Some(&alloc))
                .unwrap_err()
                .to_string(),
            "container nope not found"
        );
        assert_eq!(
            resource_value(&pod(), &sel("limits.cpu", None), None)
                .unwrap_err()
                .to_string(),
            "the allocatable resources of node \"node-a\" are unknown"
        );
        assert_eq!(
            resource_value(&pod(), &sel("requests.cpu", None), None).as_deref(),
            Ok("0"),
            "requests need no node"
        );
    }
}
