//! Reading the Services for the service variables through the API
//! (`reconcile::refs::read_services` on the production `KubeCluster`)
//! against the local API server: which reads a pod's namespace and
//! `enableServiceLinks` make, and what happens while the API server does
//! not answer (the reads answered last are used, as the kubelet's service
//! lister serves its cache; a read never answered is an error).

use ephemerald::k8s::KubeCluster;
use ephemerald::reconcile::{refs, services};
use ephemerald_testbed::apiserver::LocalApiServer;
use k8s_openapi::api::core::v1::{Pod, PodSpec, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

fn service(ns: &str, name: &str, ip: Option<&str>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: ip.map(Into::into),
            ports: Some(vec![ServicePort {
                name: Some("https".into()),
                port: 443,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod(ns: &str, links: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            enable_service_links: Some(links),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The names of the variables `pod` gets from the Services read for it.
async fn env_hosts(cluster: &KubeCluster, pod: &Pod) -> Result<Vec<String>, String> {
    let read = refs::read_services(cluster, pod)
        .await
        .map_err(|e| e.to_string())?;
    let mut hosts: Vec<String> = services::pod_service_env(pod, &read)
        .into_iter()
        .filter(|(k, _)| k.ends_with("_SERVICE_HOST"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    hosts.sort();
    Ok(hosts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_reads_follow_the_namespace_and_survive_an_unreachable_api_server() {
    let api = LocalApiServer::start().await.expect("local API server");
    for s in [
        service("default", "kubernetes", Some("10.96.0.1")),
        service("default", "other", None),
        service("shop", "web", None),
    ] {
        let ns = s.metadata.namespace.clone().unwrap();
        Api::<Service>::namespaced(api.client(), &ns)
            .create(&PostParams::default(), &s)
            .await
            .unwrap();
    }
    let cluster = KubeCluster::new(api.client());
    // The local API server allocates after 10.96.0.1, in creation order.
    let table = [
        (
            "a pod in shop with links: the master service and shop's",
            pod("shop", true),
            vec![
                "KUBERNETES_SERVICE_HOST=10.96.0.1",
                "WEB_SERVICE_HOST=10.96.0.3",
            ],
        ),
        (
            "without links: the master service only",
            pod("shop", false),
            vec!["KUBERNETES_SERVICE_HOST=10.96.0.1"],
        ),
        (
            "a pod in default with links: default's Services, read in one list",
            pod("default", true),
            vec![
                "KUBERNETES_SERVICE_HOST=10.96.0.1",
                "OTHER_SERVICE_HOST=10.96.0.2",
            ],
        ),
    ];
    for (rule, p, want) in &table {
        assert_eq!(env_hosts(&cluster, p).await.unwrap(), *want, "{rule}");
    }

    api.stop_serving().await;
    for (rule, p, want) in &table {
        assert_eq!(
            env_hosts(&cluster, p).await.unwrap(),
            *want,
            "API server away, the last reads: {rule}"
        );
    }
    let never_read = env_hosts(&cluster, &pod("elsewhere", true)).await;
    assert!(
        never_read
            .as_ref()
            .is_err_and(|e| e.contains("services in elsewhere")),
        "a namespace never read is an error: {never_read:?}"
    );

    api.serve_again().await;
    assert_eq!(
        env_hosts(&cluster, &pod("elsewhere", true)).await.unwrap(),
        ["KUBERNETES_SERVICE_HOST=10.96.0.1"]
    );
}
