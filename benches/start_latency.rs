//! Start latency on real containerd, side by side in one run:
//!
//! - `direct`: CreateContainer + StartContainer with a prepared config, the
//!   least any agent must do;
//! - `agent`: the agent's start path (`reconcile::execute::start`): image
//!   check, host files, translation, CreateContainer, StartContainer, Events;
//! - `end_to_end`: a strategic merge patch on the local API server until the
//!   API status says running, through the in-process agent.
//!
//! Rounds alternate the variants so drift on the machine hits all of them.
//! Prints medians and the ratio to `direct`. Needs root; run `make bench`.

use std::time::{Duration, Instant};

use ephemerald::config::Mode;
use ephemerald::cri::Runtime;
use ephemerald::k8s::MemoryEvents;
use ephemerald::reconcile::execute::{self, StartContext};
use ephemerald::reconcile::translate::{self, HostFiles, ResolvedImage};
use ephemerald::testbed::containerd::ContainerdOpts;
use ephemerald::testbed::images::{APP_IMAGE, BUSYBOX_IMAGE};
use ephemerald::testbed::stack::Stack;
use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio_util::sync::CancellationToken;

const ROUNDS: usize = 21;

fn debug(name: &str) -> EphemeralContainer {
    EphemeralContainer {
        name: name.into(),
        image: Some(BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("Never".into()),
        command: Some(vec!["sh".into(), "-c".into(), "sleep 30".into()]),
        target_container_name: Some("app".into()),
        termination_message_policy: Some("File".into()),
        termination_message_path: Some("/dev/termination-log".into()),
        ..Default::default()
    }
}

fn pod(name: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            host_network: Some(true),
            termination_grace_period_seconds: Some(1),
            containers: vec![Container {
                name: "app".into(),
                image: Some(APP_IMAGE.into()),
                image_pull_policy: Some("Never".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let stack = Stack::start(ContainerdOpts::unique("bench"), "bench-node")
        .await
        .expect("testbed (run as root after scripts/install-deps.sh)");
    let (p, running) = stack.run_pod(pod("bench")).await.expect("pod");
    let app_id = running.containers["app"].clone();
    let rt = stack.cri.clone();
    let image = rt
        .image_status(ephemerald::cri::proto::ImageSpec {
            image: BUSYBOX_IMAGE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .unwrap();
    let resolved = ResolvedImage {
        id: image.id,
        ..Default::default()
    };

    // The agent, for the end-to-end variant.
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(ephemerald::run_with_client(
        stack.agent_config(Mode::Start, Duration::from_secs(30)),
        stack.api.client(),
        cancel.clone(),
        |_| {},
    ));
    let events = MemoryEvents::default();

    let (mut direct, mut via_agent, mut e2e) = (vec![], vec![], vec![]);
    let (mut create, mut start) = (vec![], vec![]);
    for round in 0..ROUNDS {
        // Rotate the order so warm-up and drift hit every variant alike.
        for variant in (0..3).map(|k| (k + round) % 3) {
            match variant {
                0 => {
                    let c = debug(&format!("direct-{round}"));
                    let cfg = translate::container_config(&translate::Inputs {
                        pod: &p,
                        container: &c,
                        target_id: Some(&app_id),
                        image: &resolved,
                        attempt: 0,
                        host_files: &HostFiles::default(),
                        node: &stack.dirs,
                    })
                    .unwrap();
                    let t = Instant::now();
                    let id = rt
                        .create_container(&running.sandbox_id, cfg, running.sandbox_config.clone())
                        .await
                        .unwrap();
                    let created = t.elapsed();
                    rt.start_container(&id).await.unwrap();
                    direct.push(t.elapsed());
                    create.push(created);
                    start.push(t.elapsed() - created);
                }
                1 => {
                    let c = debug(&format!("agent-{round}"));
                    let cx = StartContext {
                        runtime: rt.as_ref() as &dyn Runtime,
                        events: &events,
                        dirs: &stack.dirs,
                        sandbox_id: &running.sandbox_id,
                        sandbox_config: &running.sandbox_config,
                        pull_auths: &[],
                    };
                    let t = Instant::now();
                    execute::start(&cx, &p, &c, Some(&app_id)).await.unwrap();
                    via_agent.push(t.elapsed());
                }
                _ => {
                    let name = format!("e2e-{round}");
                    let t = Instant::now();
                    stack
                        .add_ephemeral("default", "bench", &debug(&name))
                        .await
                        .unwrap();
                    stack
                        .wait_pod(
                            "default",
                            "bench",
                            "running",
                            Duration::from_secs(30),
                            |pod| {
                                pod.status
                                    .as_ref()?
                                    .ephemeral_container_statuses
                                    .as_ref()?
                                    .iter()
                                    .find(|s| s.name == name)?
                                    .state
                                    .as_ref()?
                                    .running
                                    .as_ref()
                                    .map(|_| ())
                            },
                        )
                        .await
                        .unwrap();
                    e2e.push(t.elapsed());
                }
            }
        }
    }
    println!(
        "CRI calls alone: CreateContainer median {:.1} ms, StartContainer median {:.1} ms",
        median(create).as_secs_f64() * 1e3,
        median(start).as_secs_f64() * 1e3
    );
    cancel.cancel();
    let _ = agent.await;

    let d = median(direct.clone());
    println!("start latency on containerd, {ROUNDS} rounds, medians:");
    for (name, v) in [
        ("direct CRI create+start", direct),
        ("agent start path", via_agent),
        ("end to end (patch → API running)", e2e),
    ] {
        let (lo, hi) = (*v.iter().min().unwrap(), *v.iter().max().unwrap());
        let m = median(v);
        println!(
            "  {name:<36} median {:>7.1} ms  (min {:>6.1}, max {:>6.1})  ratio to direct {:.2}",
            m.as_secs_f64() * 1e3,
            lo.as_secs_f64() * 1e3,
            hi.as_secs_f64() * 1e3,
            m.as_secs_f64() / d.as_secs_f64()
        );
    }
    stack.teardown().await.expect("teardown");
}
