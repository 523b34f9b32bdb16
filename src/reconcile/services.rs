//! Service environment variables, as the kubelet adds them to every
//! container (`getServiceEnvVarMap` in `pkg/kubelet/kubelet_pods.go` and
//! `FromServices` in `pkg/kubelet/envvars/envvars.go`, Kubernetes 1.36):
//! the `kubernetes` Service of the `default` namespace always, even with
//! `enableServiceLinks: false`, and with service links on (the default)
//! every Service of the pod's own namespace, which wins over the master
//! service of the same name. Services without a cluster IP (headless,
//! ExternalName) give nothing. Pure: the Services come in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};

use crate::kubelet;

/// The namespace of the master services.
pub const MASTER_NAMESPACE: &str = "default";
/// The master services (`masterServices`): always visible to every pod.
pub const MASTER_SERVICES: &[&str] = &["kubernetes"];

/// Whether `pod` sees the Services of its namespace (`enableServiceLinks`,
/// which the API server defaults to true).
pub fn service_links(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true)
}

fn cluster_ip(s: &Service) -> Option<&str> {
    s.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
}

/// The Services a pod in `namespace` sees, by name: the master services of
/// `default`, replaced by a same-named Service of the pod's namespace when
/// service links are on, and with links on every other Service there.
pub fn visible<'a>(
    namespace: &str,
    links: bool,
    services: &'a [Service],
) -> BTreeMap<&'a str, &'a Service> {
    let mut out = BTreeMap::new();
    for s in services.iter().filter(|s| cluster_ip(s).is_some()) {
        let name = s.metadata.name.as_deref().unwrap_or_default();
        let ns = s.metadata.namespace.as_deref().unwrap_or_default();
        if ns == MASTER_NAMESPACE && MASTER_SERVICES.contains(&name) {
            out.entry(name).or_insert(s);
        } else if ns == namespace && links {
            out.insert(name, s);
        }
    }
    out
}

/// `makeEnvVariableName`.
fn env_name(s: &str) -> String {
    s.replace('-', "_").to_uppercase()
}

/// `FromServices` for one Service: `<NAME>_SERVICE_HOST`,
/// `<NAME>_SERVICE_PORT` (the first port), `<NAME>_SERVICE_PORT_<PORT>` for
/// each named port, then the Docker link variables `<NAME>_PORT` (the first
/// port) and, per port, `<NAME>_PORT_<port>_<PROTO>{,_PROTO,_PORT,_ADDR}`.
pub fn service_env(s: &Service) -> Vec<(String, String)> {
    let Some(ip) = cluster_ip(s) else {
        return vec![];
    };
    let ports = s
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    // The API requires a port on a Service with a cluster IP; one without
    // any would have nothing to tell.
    let Some(first) = ports.first() else {
        return vec![];
    };
    let prefix = env_name(s.metadata.name.as_deref().unwrap_or_default());
    let mut out = vec![
        (format!("{prefix}_SERVICE_HOST"), ip.to_string()),
        (format!("{prefix}_SERVICE_PORT"), first.port.to_string()),
    ];
    for p in ports {
        if let Some(n) = p.name.as_deref().filter(|n| !n.is_empty()) {
            out.push((
                format!("{prefix}_SERVICE_PORT_{}", env_name(n)),
                p.port.to_string(),
            ));
        }
    }
    // Go's net.JoinHostPort: IPv6 addresses in brackets.
    let host_port = |port: i32| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    for (i, p) in ports.iter().enumerate() {
        let protocol = p
            .protocol
            .as_deref()
            .filter(|p| !p.is_empty())
            .unwrap_or("TCP");
        let url = format!("{}://{}", protocol.to_lowercase(), host_port(p.port));
        if i == 0 {
            out.push((format!("{prefix}_PORT"), url.clone()));
        }
        let port_prefix = format!("{prefix}_PORT_{}_{}", p.port, protocol.to_uppercase());
        out.push((port_prefix.clone(), url));
        out.push((format!("{port_prefix}_PROTO"), protocol.to_lowercase()));
        out.push((format!("{port_prefix}_PORT"), p.port.to_string()));
        out.push((format!("{port_prefix}_ADDR"), ip.to_string()));
    }
    out
}

/// Every service variable `pod` gets, from the Services read for it (any
/// superset of the visible ones), Services by name; a later Service's value
/// of the same variable wins (the kubelet's map, in random order).
pub fn pod_service_env(pod: &Pod, services: &[Service]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let visible = visible(kubelet::namespace(pod), service_links(pod), services);
    for s in visible.values() {
        for (k, v) in service_env(s) {
            match out.iter_mut().find(|(have, _)| *have == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k, v)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(ns: &str, name: &str, ip: &str, ports: &[(Option<&str>, i32, Option<&str>)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, port, proto)| ServicePort {
                            name: n.map(Into::into),
                            port: *port,
                            protocol: proto.map(Into::into),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn kubernetes() -> Service {
        svc(
            "default",
            "kubernetes",
            "10.96.0.1",
            &[(Some("https"), 443, Some("TCP"))],
        )
    }

    fn pod(ns: &str, links: Option<bool>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                enable_service_links: links,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(env: &[(String, String)]) -> Vec<&str> {
        env.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn the_kubernetes_service_gives_what_every_pod_sees() {
        assert_eq!(
            service_env(&kubernetes()),
            [
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443"),
                ("KUBERNETES_SERVICE_PORT_HTTPS", "443"),
                ("KUBERNETES_PORT", "tcp://10.96.0.1:443"),
                ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
                ("KUBERNETES_PORT_443_TCP_PROTO", "tcp"),
                ("KUBERNETES_PORT_443_TCP_PORT", "443"),
                ("KUBERNETES_PORT_443_TCP_ADDR", "10.96.0.1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn from_services_names_ports_and_protocols() {
        let s = svc(
            "shop",
            "web-front",
            "fd00::10",
            &[(None, 80, None), (Some("dns-udp"), 53, Some("UDP"))],
        );
        let env: BTreeMap<String, String> = service_env(&s).into_iter().collect();
        let want: BTreeMap<String, String> = [
            ("WEB_FRONT_SERVICE_HOST", "fd00::10"),
            ("WEB_FRONT_SERVICE_PORT", "80"),
            ("WEB_FRONT_SERVICE_PORT_DNS_UDP", "53"),
            ("WEB_FRONT_PORT", "tcp://[fd00::10]:80"),
            ("WEB_FRONT_PORT_80_TCP", "tcp://[fd00::10]:80"),
            ("WEB_FRONT_PORT_80_TCP_PROTO", "tcp"),
            ("WEB_FRONT_PORT_80_TCP_PORT", "80"),
            ("WEB_FRONT_PORT_80_TCP_ADDR", "fd00::10"),
            ("WEB_FRONT_PORT_53_UDP", "udp://[fd00::10]:53"),
            ("WEB_FRONT_PORT_53_UDP_PROTO", "udp"),
            ("WEB_FRONT_PORT_53_UDP_PORT", "53"),
            ("WEB_FRONT_PORT_53_UDP_ADDR", "fd00::10"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(env, want);
    }

    #[test]
    fn which_services_a_pod_sees_follows_get_service_env_var_map() {
        let all = vec![
            kubernetes(),
            svc("default", "other", "10.96.0.9", &[(None, 80, None)]),
            svc("shop", "web", "10.96.7.7", &[(None, 80, None)]),
            svc("shop", "headless", "None", &[(None, 80, None)]),
            svc("shop", "external", "", &[(None, 80, None)]),
            svc("elsewhere", "db", "10.96.8.8", &[(None, 5432, None)]),
        ];
        let shadow = vec![
            kubernetes(),
            svc("shop", "kubernetes", "10.96.5.5", &[(None, 443, None)]),
        ];
        // (rule, pod, services, the prefixes of the variables it gets)
        let table: Vec<(&str, Pod, &[Service], &[&str])> = vec![
            (
                "links on (the default): the master service and every service of the namespace with a cluster IP",
                pod("shop", None),
                &all,
                &["KUBERNETES", "WEB"],
            ),
            (
                "links off: the master service only",
                pod("shop", Some(false)),
                &all,
                &["KUBERNETES"],
            ),
            (
                "a pod in default with links on sees default's services",
                pod("default", Some(true)),
                &all,
                &["KUBERNETES", "OTHER"],
            ),
            (
                "a pod in default with links off still sees only the master service",
                pod("default", Some(false)),
                &all,
                &["KUBERNETES"],
            ),
        ];
        for (rule, p, services, prefixes) in table {
            let env = pod_service_env(&p, services);
            let mut got: Vec<&str> = names(&env)
                .into_iter()
                .filter_map(|k| k.strip_suffix("_SERVICE_HOST"))
                .collect();
            got.sort();
            assert_eq!(got, prefixes, "{rule}");
        }
        // A same-named service of the pod's namespace replaces the master
        // service when links are on, and does not when they are off.
        let host = |p: Pod| {
            pod_service_env(&p, &shadow)
                .into_iter()
                .find(|(k, _)| k == "KUBERNETES_SERVICE_HOST")
                .map(|(_, v)| v)
        };
        assert_eq!(host(pod("shop", Some(true))).as_deref(), Some("10.96.5.5"));
        assert_eq!(host(pod("shop", Some(false))).as_deref(), Some("10.96.0.1"));
    }
}
