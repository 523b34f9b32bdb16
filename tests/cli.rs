//! The binary as an operator meets it: exit code 64 and a clear message for
//! bad configuration, `/readyz` saying what the agent does, and SIGTERM
//! draining without touching any container (against the local API server
//! and the fake CRI runtime; no root needed).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ephemerald_testbed::apiserver::LocalApiServer;
use ephemerald_testbed::fake_cri::FakeRuntime;
use ephemerald_testbed::http_get;

fn ephemerald(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ephemerald"))
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("KUBECONFIG")
        .output()
        .expect("binary runs")
}

#[test]
fn bad_configuration_exits_64_naming_the_flag() {
    let table: [(&[&str], &str); 5] = [
        (&["run"], "--node-name"),
        (&["run", "--node-name", "Bad_Name"], "--node-name"),
        (
            &["run", "--node-name", "n", "--cri-endpoint", "/run/x.sock"],
            "--cri-endpoint",
        ),
        (&["run", "--node-name", "n", "--resync", "soon"], "--resync"),
        (
            &["run", "--node-name", "n", "--mode", "sometimes"],
            "--mode",
        ),
    ];
    for (args, flag) in table {
        let out = ephemerald(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
    }
    let kubeconfig = ephemerald(&[
        "run",
        "--node-name",
        "n",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]);
    assert_eq!(kubeconfig.status.code(), Some(64));
}

#[test]
fn help_exits_0() {
    let out = ephemerald(&["run", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--node-name",
        "--cri-endpoint",
        "--mode",
        "NODE_NAME",
        "EPHEMERALD_CRI_ENDPOINT",
        "k3s",
    ] {
        assert!(text.contains(flag), "help mentions {flag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_the_mode_and_sigterm_drains_leaving_containers_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::start(tmp.path());
    let api = LocalApiServer::start().await.unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let health = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ephemerald"))
        .args(["run", "--node-name", "node-a", "--mode", "start"])
        .args(["--kubeconfig", &kubeconfig.display().to_string()])
        .args([
            "--cri-endpoint",
            &fake.endpoint(),
            "--containerd-socket",
            "",
        ])
        .args(["--metrics-addr", &health])
        .args([
            "--pod-logs-dir",
            &tmp.path().join("logs").display().to_string(),
            "--container-logs-dir",
            &tmp.path().join("containers").display().to_string(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Some((200, body)) = http_get(&health, "/readyz").await {
            break body;
        }
        assert!(Instant::now() < deadline, "/readyz never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.contains("mode: starting ephemeral containers (--mode start)"),
        "{body}"
    );
    assert!(body.contains("runtime: containerd"), "{body}");
    let (code, metrics) = http_get(&health, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("ephemerald_starting 1"), "{metrics}");
    let (code, timelines) = http_get(&health, "/timelines").await.unwrap();
    assert_eq!(
        (code, timelines.as_str()),
        (200, "[]"),
        "no ephemeral container yet"
    );

    fake.clear_calls();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "graceful drain exits 0");
    let touched: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("Stop") || c.starts_with("Remove"))
        .collect();
    assert!(
        touched.is_empty(),
        "shutdown must not stop or remove anything: {touched:?}"
    );
}

/// A metrics address someone else holds (kube-scheduler's 10259 on a
/// control-plane node, say) stops the agent at once with a message naming
/// the address and the flag, instead of probes failing later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_address_is_a_clear_error_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::start(tmp.path());
    let api = LocalApiServer::start().await.unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = tokio::task::spawn_blocking({
        let (kubeconfig, endpoint, addr) = (kubeconfig.clone(), fake.endpoint(), addr.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_ephemerald"))
                .args(["run", "--node-name", "node-a", "--mode", "start"])
                .args(["--kubeconfig", &kubeconfig.display().to_string()])
                .args(["--cri-endpoint", &endpoint, "--containerd-socket", ""])
                .args(["--metrics-addr", &addr])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot serve /healthz, /readyz and /metrics on {addr} (--metrics-addr)"
        )),
        "{err}"
    );
    assert!(err.contains("in use"), "the OS's reason: {err}");
    drop(taken);
}
