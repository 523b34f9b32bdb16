//! Images for ephemeral containers, as the kubelet's image manager handles
//! them: the pull policy with the API defaults, the default `:latest` tag,
//! the image reference grammar (`InvalidImageName`), and matching the pod's
//! `imagePullSecrets` to a registry.
//!
//! Pure. Must not pull or ask the runtime: `execute` does, with these
//! rules.

use k8s_openapi::api::core::v1::EphemeralContainer;

use crate::cri::proto::AuthConfig;

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull only when the image is missing.
    IfNotPresent,
    /// Never pull; a missing image is `ErrImageNeverPull`.
    Never,
}

/// The container's pull policy, or the API server's default when unset:
/// `Always` for `:latest` or an image with neither tag nor digest, else
/// `IfNotPresent`.
pub fn pull_policy(c: &EphemeralContainer) -> PullPolicy {
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        Some("Never") => PullPolicy::Never,
        _ => default_pull_policy(c.image.as_deref().unwrap_or_default()),
    }
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference<'a> {
    /// Registry host, if the first path component names one.
    pub domain: Option<&'a str>,
    /// Repository path without the domain.
    pub path: &'a str,
    /// Tag after `:`.
    pub tag: Option<&'a str>,
    /// Digest after `@`.
    pub digest: Option<&'a str>,
}

/// Parses `[domain/]path[:tag][@digest]` by the distribution reference
/// grammar, as the kubelet's (and the API server's) image parser does.
pub fn parse(image: &str) -> Result<Reference<'_>, String> {
    const INVALID: &str = "invalid reference format";
    if image.is_empty() {
        return Err("repository name must have at least one component".into());
    }
    if image.len() == 64
        && image
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(format!(
            "invalid repository name ({image}), cannot specify 64-byte hexadecimal strings"
        ));
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) if valid_digest(d) => (r, Some(d)),
        Some(_) => return Err(INVALID.into()),
        None => (image, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if tag.is_some_and(|t| !valid_tag(t)) {
        return Err(INVALID.into());
    }
    // The first component names a registry if it looks like a host (a dot,
    // a port, `localhost`) or has upper case, which a repository cannot.
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    };
    if domain.is_some_and(|d| !valid_domain(d)) {
        return Err(INVALID.into());
    }
    for component in path.split('/') {
        if !valid_path_component(component) {
            return Err(if component.chars().any(|c| c.is_ascii_uppercase()) {
                format!("{INVALID}: repository name must be lowercase")
            } else {
                INVALID.into()
            });
        }
    }
    Ok(Reference {
        domain,
        path,
        tag,
        digest,
    })
}

/// A repository path component: `[a-z0-9]+` groups joined by `.`, `_`,
/// `__` or runs of `-`.
pub fn valid_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A registry host: dot-separated labels of letters, digits and inner
/// hyphens, with an optional numeric port.
pub fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A tag: `[\w][\w.-]{0,127}`.
pub fn valid_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|c| word(*c) || *c == b'.' || *c == b'-')
}

/// A digest: `algorithm:hex` with at least 32 hex digits.
pub fn valid_digest(d: &str) -> bool {
    match d.split_once(':') {
        Some((alg, hex)) => {
            !alg.is_empty()
                && alg.as_bytes()[0].is_ascii_alphabetic()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_+.".contains(&b))
                && hex.len() >= 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// The API server's default `imagePullPolicy` (`SetDefaults_Container`):
/// `Always` when the image's tag is `latest` (no tag and no digest counts
/// as `latest`), else `IfNotPresent` — also for a name that does not parse.
pub fn default_pull_policy(image: &str) -> PullPolicy {
    match parse(image) {
        Ok(r) if r.tag == Some("latest") || (r.tag.is_none() && r.digest.is_none()) => {
            PullPolicy::Always
        }
        _ => PullPolicy::IfNotPresent,
    }
}

/// The kubelet's `applyDefaultImageTag`: `:latest` when there is neither tag
/// nor digest. An unparsable name is the kubelet's `InvalidImageName`.
pub fn with_default_tag(image: &str) -> Result<String, String> {
    let r = parse(image)?;
    if r.tag.is_none() && r.digest.is_none() {
        Ok(format!("{image}:latest"))
    } else {
        Ok(image.to_string())
    }
}

/// The registry an image comes from, as docker config keys name it.
pub fn registry(image: &str) -> String {
    match parse(image).ok().and_then(|r| r.domain) {
        Some(d) if d != "docker.io" && d != "index.docker.io" => d.to_string(),
        _ => "docker.io".to_string(),
    }
}

// The pull secrets' payload is the API boundary's type (`k8s` reads the
// Secrets); it is re-exported here, where credentials are matched.
pub use crate::k8s::{DockerAuth, DockerConfig};

/// Credentials from the pull secrets that match the image's registry, in
/// secret order; the kubelet tries them one after the other.
pub fn credentials_for(image: &str, configs: &[DockerConfig]) -> Vec<AuthConfig> {
    let want = registry(image);
    let normalise = |key: &str| -> String {
        let k = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let host = k.split('/').next().unwrap_or(k);
        match host {
            "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
            h => h.to_string(),
        }
    };
    configs
        .iter()
        .flat_map(|c| c.auths.iter())
        .filter(|(key, _)| normalise(key) == want)
        // Like the kubelet, no server address: containerd 1.6 would drop
        // credentials whose address is not a URL of the registry host.
        .map(|(_, a)| AuthConfig {
            username: a.username.clone(),
            password: a.password.clone(),
            auth: a.auth.clone(),
            server_address: String::new(),
            identity_token: a.identity_token.clone(),
            registry_token: a.registry_token.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(image: &str, policy: Option<&str>) -> EphemeralContainer {
        EphemeralContainer {
            name: "dbg".into(),
            image: Some(image.into()),
            image_pull_policy: policy.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn pull_policy_defaults_like_the_api_server() {
        let digest =
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let latest_digest = digest.replace("busybox@", "busybox:latest@");
        let table = [
            ("busybox", None, PullPolicy::Always),
            ("busybox:latest", None, PullPolicy::Always),
            ("busybox:1.36", None, PullPolicy::IfNotPresent),
            (digest, None, PullPolicy::IfNotPresent),
            (&latest_digest, None, PullPolicy::Always),
            ("registry:5000/team/tool", None, PullPolicy::Always),
            ("registry:5000/team/tool:v2", None, PullPolicy::IfNotPresent),
            ("busybox", Some("Never"), PullPolicy::Never),
            ("busybox:1.36", Some("Always"), PullPolicy::Always),
        ];
        for (image, policy, want) in table {
            assert_eq!(
                pull_policy(&container(image, policy)),
                want,
                "{image} {policy:?}"
            );
        }
    }

    #[test]
    fn default_tag_and_invalid_names() {
        assert_eq!(with_default_tag("busybox").unwrap(), "busybox:latest");
        assert_eq!(with_default_tag("a/b:1").unwrap(), "a/b:1");
        assert_eq!(
            with_default_tag("localhost:5000/x").unwrap(),
            "localhost:5000/x:latest"
        );
        for bad in [
            "",
            "Busybox",
            "bad name",
            "x::y",
            "a//b",
            "x:",
            "-x",
            "x@sha256:zz",
        ] {
            assert!(with_default_tag(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn parse_splits_domain_path_tag() {
        let r = parse("ephemerald.local/busybox:1.35").unwrap();
        assert_eq!(r.domain, Some("ephemerald.local"));
        assert_eq!(r.path, "busybox");
        assert_eq!(r.tag, Some("1.35"));
        let r = parse("library/busybox").unwrap();
        assert_eq!((r.domain, r.path, r.tag), (None, "library/busybox", None));
    }

    #[test]
    fn pull_secrets_match_by_registry() {
        let cfg: DockerConfig = serde_json::from_str(
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"dXNlcjpwdw=="},
                "quay.io":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let hub = credentials_for("busybox", std::slice::from_ref(&cfg));
        assert_eq!(hub.len(), 1);
        assert_eq!(hub[0].auth, "dXNlcjpwdw==");
        let quay = credentials_for("quay.io/org/tool:1", std::slice::from_ref(&cfg));
        assert_eq!(
            (quay[0].username.as_str(), quay[0].password.as_str()),
            ("u", "p")
        );
        assert!(quay[0].server_address.is_empty(), "as the kubelet sends it");
        assert!(credentials_for("ghcr.io/x/y", &[cfg]).is_empty());
    }
}
