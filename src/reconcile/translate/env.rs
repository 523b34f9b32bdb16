//! The container's environment as the kubelet's
//! `makeEnvironmentVariables` builds it: `envFrom`, then `env` with values
//! from ConfigMaps, Secrets, the downward API and resources, and `$(NAME)`
//! expansion.
//!
//! Pure; part of the parent module.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EphemeralContainer, Pod};

use super::{Referenced, TranslateError};
use crate::kubelet;
use crate::reconcile::services;

/// Sets `name` to `value`, replacing an earlier value in place.
pub(super) fn set_env(out: &mut Vec<(String, String)>, name: &str, value: String) {
    match out.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => out.push((name.to_string(), value)),
    }
}

/// The kubelet's `makeEnvironmentVariables`: `envFrom` first (in order,
/// with its prefix; every key taken as it is), then `env`, whose values
/// replace earlier ones in place, then the service variables the container
/// does not set itself. A literal value expands `$(NAME)` against
/// everything set before it, then the service variables; a value from a
/// source is taken verbatim. A missing optional source or key leaves the
/// variable unset; a missing required one is an error in the kubelet's words.
pub(super) fn environment(
    pod: &Pod,
    c: &EphemeralContainer,
    refs: &Referenced,
) -> Result<Vec<(String, String)>, TranslateError> {
    let service_env = services::pod_service_env(pod, &refs.services);
    let mut out = container_environment(pod, c, refs, &service_env)?;
    for (k, v) in service_env {
        if !out.iter().any(|(have, _)| *have == k) {
            out.push((k, v));
        }
    }
    Ok(out)
}

fn container_environment(
    pod: &Pod,
    c: &EphemeralContainer,
    refs: &Referenced,
    service_env: &[(String, String)],
) -> Result<Vec<(String, String)>, TranslateError> {
    let namespace = kubelet::namespace(pod);
    let mut out: Vec<(String, String)> = Vec::new();
    env_from(&mut out, c, refs)?;
    for var in c.env.iter().flatten() {
        let literal = var.value.as_deref().unwrap_or_default();
        let value = match &var.value_from {
            Some(src) if literal.is_empty() => {
                let key_missing = |kind, name: &str, key: &str| TranslateError::KeyNotFound {
                    key: key.to_string(),
                    kind,
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                };
                if let Some(f) = &src.field_ref {
                    field_value(pod, &f.field_path)?
                } else if let Some(r) = &src.config_map_key_ref {
                    let optional = r.optional == Some(true);
                    let Some(data) = refs.config_map(&r.name) else {
                        if optional {
                            continue;
                        }
                        return Err(not_found("configmap", &r.name));
                    };
                    match data.get(&r.key) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => return Err(key_missing("ConfigMap", &r.name, &r.key)),
                    }
                } else if let Some(r) = &src.secret_key_ref {
                    let optional = r.optional == Some(true);
                    let Some(data) = refs.secret(&r.name) else {
                        if optional {
                            continue;
                        }
                        return Err(not_found("secret", &r.name));
                    };
                    match data.get(&r.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if optional => continue,
                        None => return Err(key_missing("Secret", &r.name, &r.key)),
                    }
                } else if let Some(r) = &src.resource_field_ref {
                    crate::reconcile::downward::resource_value(
                        pod,
                        r,
                        refs.node_allocatable.as_ref(),
                    )?
                } else {
                    // The API requires one source; none known here means a
                    // newer one (`fileKeyRef`) that these API types drop.
                    return Err(TranslateError::UnknownEnvSource(var.name.clone()));
                }
            }
            _ => {
                let lookup = |name: &str| {
                    out.iter()
                        .chain(service_env)
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                expand(literal, lookup)
            }
        };
        set_env(&mut out, &var.name, value);
    }
    Ok(out)
}

/// `envFrom`, in order: every key of each ConfigMap or Secret, with its
/// prefix (a missing optional source adds nothing).
pub(super) fn env_from(
    out: &mut Vec<(String, String)>,
    c: &EphemeralContainer,
    refs: &Referenced,
) -> Result<(), TranslateError> {
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match refs.config_map(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        set_env(out, &format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(not_found("configmap", &r.name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match refs.secret(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        let v = String::from_utf8_lossy(v).into_owned();
                        set_env(out, &format!("{prefix}{k}"), v);
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(not_found("secret", &r.name)),
            }
        }
    }
    Ok(())
}

pub(super) fn not_found(kind: &'static str, name: &str) -> TranslateError {
    TranslateError::SourceNotFound {
        kind,
        name: name.to_string(),
    }
}

/// The downward API for env vars (the kubelet's `podFieldSelectorRuntimeValue`).
pub(super) fn field_value(pod: &Pod, path: &str) -> Result<String, TranslateError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let map_entry = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    let v = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => kubelet::namespace(pod).to_string(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "spec.terminationGracePeriodSeconds" => spec
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .to_string(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIPs" => status
            .and_then(|s| s.host_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        _ => map_entry(&meta.labels, "metadata.labels['")
            .or_else(|| map_entry(&meta.annotations, "metadata.annotations['"))
            .ok_or_else(|| TranslateError::UnsupportedFieldPath(path.to_string()))?,
    };
    Ok(v)
}

/// `$(NAME)` expansion as in the kubelet: known names are replaced, unknown
/// references stay as written, `$$` is an escaped `$`.
pub fn expand<'v>(input: &str, lookup: impl Fn(&str) -> Option<&'v str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match lookup(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}
