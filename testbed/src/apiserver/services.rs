//! Services as kube-apiserver creates them, for the part the agent reads
//! (the service environment variables): the API defaults (`type:
//! ClusterIP`, `sessionAffinity: None`, each port's `protocol: TCP` and
//! `targetPort`), a cluster IP allocated from `10.96.0.0/12` when none is
//! given (`10.96.0.1`, the first, is what kube-apiserver gives the
//! `kubernetes` Service, so allocation starts after it), `clusterIPs`
//! mirroring it, and the refusal of a Service with a cluster IP but no
//! ports (`spec.ports: Required value`) or of an IP already taken.
//! Headless (`clusterIP: None`) and `ExternalName` Services get no IP.
//! Left out: node ports, load balancers, dual stack, endpoints.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use ephemerald::validation::FieldError;

/// The service CIDR's base (kubeadm's and kind's default `10.96.0.0/12`).
const BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
const SIZE: u32 = 1 << 20;

/// Applies the defaults to a Service about to be created and allocates its
/// cluster IP, given the IPs of the Services that exist.
pub(crate) fn default_service(obj: &mut Value, taken: &BTreeSet<String>) -> Vec<FieldError> {
    let spec = &mut obj["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    let type_ = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    spec["type"] = json!(type_);
    if spec["sessionAffinity"].is_null() {
        spec["sessionAffinity"] = json!("None");
    }
    if let Some(ports) = spec["ports"].as_array_mut() {
        for p in ports {
            if p["protocol"].is_null() {
                p["protocol"] = json!("TCP");
            }
            if p["targetPort"].is_null() {
                p["targetPort"] = p["port"].clone();
            }
        }
    }
    if type_ == "ExternalName" {
        return vec![];
    }
    let mut errs = Vec::new();
    let given = spec["clusterIP"].as_str().unwrap_or("").to_string();
    let ip = match given.as_str() {
        "None" => None,
        "" => (2..SIZE - 1)
            .map(|i| Ipv4Addr::from(BASE + i).to_string())
            .find(|ip| !taken.contains(ip)),
        ip if taken.contains(ip) => {
            errs.push(FieldError::invalid(
                "spec.clusterIPs",
                ip,
                "failed to allocate IP: provided IP is already allocated",
            ));
            None
        }
        ip => Some(ip.to_string()),
    };
    if let Some(ip) = &ip {
        spec["clusterIP"] = json!(ip);
        spec["clusterIPs"] = json!([ip]);
        spec["ipFamilies"] = json!(["IPv4"]);
        spec["ipFamilyPolicy"] = json!("SingleStack");
        spec["internalTrafficPolicy"] = json!("Cluster");
        if spec["ports"].as_array().is_none_or(|p| p.is_empty()) {
            errs.push(FieldError::required("spec.ports", ""));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_defaulted_and_allocated_like_kube_apiservers() {
        let mut taken = BTreeSet::new();
        let mut s = json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}});
        assert!(default_service(&mut s, &taken).is_empty());
        assert_eq!(s["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(s["spec"]["clusterIPs"], json!(["10.96.0.2"]));
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        taken.insert("10.96.0.2".to_string());

        let mut next = json!({"spec": {"ports": [{"port": 80}]}});
        default_service(&mut next, &taken);
        assert_eq!(next["spec"]["clusterIP"], "10.96.0.3");

        let mut kubernetes =
            json!({"spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]}});
        assert!(default_service(&mut kubernetes, &taken).is_empty());
        assert_eq!(kubernetes["spec"]["clusterIP"], "10.96.0.1");

        let mut headless = json!({"spec": {"clusterIP": "None"}});
        assert!(default_service(&mut headless, &taken).is_empty());
        assert_eq!(headless["spec"]["clusterIP"], "None");

        let mut twice = json!({"spec": {"clusterIP": "10.96.0.2", "ports": [{"port": 1}]}});
        let errs = default_service(&mut twice, &taken);
        assert_eq!(errs.len(), 1);

        let mut no_ports = json!({"spec": {}});
        assert_eq!(default_service(&mut no_ports, &taken).len(), 1);
    }
}
