//! Command line and environment: one clap definition, validated once at
//! start into a [`Config`] that is passed down by reference. Nothing deeper
//! in the agent reads environment variables.
//!
//! Owns: every flag and env var of `ephemerald run` and their validation
//! (exit code 64 for a bad one). Must not hold the lab's commands (those are
//! `ephemerald-testbed`'s) nor be read from deep inside the agent: parts get
//! the values they need.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// ephemerald: runs Kubernetes ephemeral containers through the node's CRI runtime.
#[derive(Debug, Parser)]
#[command(name = "ephemerald", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
}

/// Whether the agent starts containers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Start containers only on positive evidence that no kubelet serves
    /// this node (its Lease in kube-node-lease expired and the Node's Ready
    /// heartbeat stale, or neither exists); observe otherwise, also while
    /// they cannot be read.
    Auto,
    /// Always start (a node without a kubelet, or whose kubelet has its
    /// ephemeral-container path removed).
    Start,
    /// Never start; record what others start and when.
    Observe,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `ephemerald run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Name of this node; only pods bound to it are handled.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// kubeconfig file; without it the in-cluster service account (or the
    /// default kubeconfig) is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// CRI runtime endpoint (k3s: unix:///run/k3s/containerd/containerd.sock).
    #[arg(
        long,
        env = "EPHEMERALD_CRI_ENDPOINT",
        default_value = "unix:///run/containerd/containerd.sock"
    )]
    pub cri_endpoint: String,

    /// containerd socket for exit events; empty disables them (CRI events
    /// or the resync are used instead).
    #[arg(
        long,
        env = "EPHEMERALD_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: String,

    /// containerd namespace of the CRI's containers.
    #[arg(
        long,
        env = "EPHEMERALD_CONTAINERD_NAMESPACE",
        default_value = "k8s.io"
    )]
    pub containerd_namespace: String,

    /// Root of the pod log directories (the kubelet's --pod-logs-dir).
    #[arg(long, env = "EPHEMERALD_POD_LOGS_DIR", default_value = "/var/log/pods")]
    pub pod_logs_dir: PathBuf,

    /// Where the legacy log symlinks of started containers go
    /// (`<pod>_<namespace>_<container>-<id>.log`, read by node log
    /// collectors); empty turns them off.
    #[arg(
        long,
        env = "EPHEMERALD_CONTAINER_LOGS_DIR",
        default_value = "/var/log/containers"
    )]
    pub container_logs_dir: PathBuf,

    /// The kubelet's root directory (pods/ and seccomp/ live under it).
    #[arg(
        long,
        env = "EPHEMERALD_KUBELET_ROOT_DIR",
        default_value = "/var/lib/kubelet"
    )]
    pub kubelet_root_dir: PathBuf,

    /// How often every pod with ephemeral containers is reconciled even
    /// without a change (e.g. 10s, 1m).
    #[arg(long, env = "EPHEMERALD_RESYNC", default_value = "10s", value_parser = parse_duration)]
    pub resync: Duration,

    /// Whether to start containers: auto, start or observe.
    #[arg(long, env = "EPHEMERALD_MODE", value_enum, default_value = "auto")]
    pub mode: Mode,

    /// Address for /metrics, /healthz, /readyz and /timelines; `0` (or
    /// empty) disables. `--health-addr` is the old name.
    #[arg(
        long,
        visible_alias = "health-addr",
        env = "EPHEMERALD_METRICS_ADDR",
        default_value = "127.0.0.1:10259"
    )]
    pub metrics_addr: String,

    /// Deadline of one CRI call (the kubelet's --runtime-request-timeout).
    #[arg(long, env = "EPHEMERALD_RUNTIME_REQUEST_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub runtime_request_timeout: Duration,

    /// First delay after a failed start; doubles up to --backoff-max.
    #[arg(long, env = "EPHEMERALD_BACKOFF_INITIAL", default_value = "10s", value_parser = parse_duration)]
    pub backoff_initial: Duration,

    /// Longest delay between attempts to start one container.
    #[arg(long, env = "EPHEMERALD_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub backoff_max: Duration,

    /// How long a SIGTERM/SIGINT waits for running reconciles to finish.
    #[arg(long, env = "EPHEMERALD_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log format.
    #[arg(
        long,
        env = "EPHEMERALD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// A bad configuration: the process exits with 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag's value is unusable.
    #[error("--{flag}: {reason}")]
    Invalid {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The agent's validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node.
    pub node_name: String,
    /// kubeconfig, if given.
    pub kubeconfig: Option<PathBuf>,
    /// CRI endpoint (`unix:///…`).
    pub cri_endpoint: String,
    /// containerd socket for exit events.
    pub containerd_socket: Option<PathBuf>,
    /// containerd namespace.
    pub containerd_namespace: String,
    /// The node's directories.
    pub dirs: crate::kubelet::NodeDirs,
    /// Resync period.
    pub resync: Duration,
    /// Start mode.
    pub mode: Mode,
    /// Metrics and health listener.
    pub metrics_addr: Option<SocketAddr>,
    /// CRI call deadline.
    pub runtime_request_timeout: Duration,
    /// Per-container backoff.
    pub backoff_initial: Duration,
    /// Per-container backoff cap.
    pub backoff_max: Duration,
    /// Drain deadline.
    pub shutdown_timeout: Duration,
}

impl RunArgs {
    /// Validates the arguments once.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let invalid = |flag, reason: &str| ConfigError::Invalid {
            flag,
            reason: reason.to_string(),
        };
        let node = self.node_name.trim();
        if node.is_empty() {
            return Err(invalid("node-name", "must not be empty (set NODE_NAME)"));
        }
        if node.len() > 253
            || !node
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        {
            return Err(invalid(
                "node-name",
                "must be a lower-case DNS subdomain (a-z, 0-9, '-', '.')",
            ));
        }
        crate::cri::socket_path(&self.cri_endpoint)
            .map_err(|e| invalid("cri-endpoint", &e.to_string()))?;
        for (flag, d) in [
            ("resync", self.resync),
            ("runtime-request-timeout", self.runtime_request_timeout),
            ("backoff-initial", self.backoff_initial),
            ("backoff-max", self.backoff_max),
        ] {
            if d.is_zero() {
                return Err(invalid(flag, "must be greater than zero"));
            }
        }
        if self.backoff_max < self.backoff_initial {
            return Err(invalid(
                "backoff-max",
                "must not be less than --backoff-initial",
            ));
        }
        let metrics_addr = match self.metrics_addr.trim() {
            "" | "0" => None,
            addr => Some(addr.parse().map_err(|e| {
                invalid(
                    "metrics-addr",
                    &format!("{e} (want HOST:PORT, or 0 to disable)"),
                )
            })?),
        };
        if let Some(k) = &self.kubeconfig
            && !k.is_file()
        {
            return Err(invalid(
                "kubeconfig",
                &format!("{} is not a readable file", k.display()),
            ));
        }
        Ok(Config {
            node_name: node.to_string(),
            kubeconfig: self.kubeconfig.clone(),
            cri_endpoint: self.cri_endpoint.clone(),
            containerd_socket: Some(PathBuf::from(&self.containerd_socket))
                .filter(|p| !p.as_os_str().is_empty()),
            containerd_namespace: self.containerd_namespace.clone(),
            dirs: crate::kubelet::NodeDirs {
                pod_logs: self.pod_logs_dir.clone(),
                pods: self.kubelet_root_dir.join("pods"),
                seccomp: self.kubelet_root_dir.join("seccomp"),
                container_logs: self.container_logs_dir.clone(),
                // Read once, as the kubelet reads its machine info at start.
                host: crate::host::HostFacts::detect(),
            },
            resync: self.resync,
            mode: self.mode,
            metrics_addr,
            runtime_request_timeout: self.runtime_request_timeout,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

/// `250ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["ephemerald", "run"];
        argv.extend_from_slice(extra);
        let Command::Run(a) = Cli::try_parse_from(argv)?.command;
        Ok(*a)
    }

    #[test]
    fn durations() {
        let table = [
            ("250ms", 250),
            ("10s", 10_000),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("3", 3_000),
            ("1.5s", 1_500),
        ];
        for (s, ms) in table {
            assert_eq!(parse_duration(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn defaults_validate() {
        let c = args(&["--node-name", "node-a"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.mode, Mode::Auto);
        assert_eq!(c.cri_endpoint, "unix:///run/containerd/containerd.sock");
        assert_eq!(c.dirs.pods, PathBuf::from("/var/lib/kubelet/pods"));
        assert_eq!(c.dirs.container_logs, PathBuf::from("/var/log/containers"));
        assert_eq!(c.resync, Duration::from_secs(10));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:10259".parse().unwrap()));
    }

    #[test]
    fn metrics_addr_zero_disables_and_health_addr_is_an_alias() {
        let off = args(&["--node-name", "n", "--metrics-addr", "0"]).unwrap();
        assert_eq!(off.validate().unwrap().metrics_addr, None);
        let old = args(&["--node-name", "n", "--health-addr", "127.0.0.1:9481"]).unwrap();
        assert_eq!(
            old.validate().unwrap().metrics_addr,
            Some("127.0.0.1:9481".parse().unwrap())
        );
    }

    #[test]
    fn bad_values_are_config_errors() {
        let table: [(&[&str], &str); 5] = [
            (&["--node-name", ""], "node-name"),
            (&["--node-name", "Node_A"], "node-name"),
            (
                &["--node-name", "n", "--cri-endpoint", "/run/x.sock"],
                "cri-endpoint",
            ),
            (&["--node-name", "n", "--resync", "0s"], "resync"),
            (
                &["--node-name", "n", "--metrics-addr", "nope"],
                "metrics-addr",
            ),
        ];
        for (argv, flag) in table {
            let err = args(argv).unwrap().validate().unwrap_err();
            assert!(err.to_string().starts_with(&format!("--{flag}:")), "{err}");
        }
    }

    #[test]
    fn unparsable_flags_are_rejected_by_clap() {
        assert!(args(&["--node-name", "n", "--mode", "sometimes"]).is_err());
        assert!(args(&["--node-name", "n", "--resync", "soon"]).is_err());
    }
}
