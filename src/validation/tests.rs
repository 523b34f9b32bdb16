//! kube-apiserver's ephemeral-container rules, case by case, with the
//! messages it renders.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::*;

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).expect("pod json")
}

/// A pod with containers `app` and init `init`, a volume `data`, and
/// the given ephemeral containers (defaulted like the API server does).
fn pod_with(ecs: Value) -> Pod {
    let mut p = pod(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "containers": [{"name": "app", "image": "app:1"}],
            "initContainers": [{"name": "init", "image": "init:1"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "ephemeralContainers": ecs,
        }
    }));
    for ec in p
        .spec
        .as_mut()
        .unwrap()
        .ephemeral_containers
        .iter_mut()
        .flatten()
    {
        default_ephemeral_container(ec);
    }
    p
}

fn messages(errs: &[FieldError]) -> Vec<String> {
    errs.iter().map(ToString::to_string).collect()
}

const FORB: &str = "Forbidden: cannot be set for an Ephemeral Container";

#[test]
fn error_rendering_matches_apimachinery() {
    let cases: Vec<(FieldError, &str, &str)> = vec![
        (
            FieldError::required("a.b", ""),
            "FieldValueRequired",
            "a.b: Required value",
        ),
        (
            FieldError::required("a", "must be set"),
            "FieldValueRequired",
            "a: Required value: must be set",
        ),
        (
            FieldError::invalid("a", "X y", "bad"),
            "FieldValueInvalid",
            "a: Invalid value: \"X y\": bad",
        ),
        (
            FieldError::invalid("a", "q\"\n", ""),
            "FieldValueInvalid",
            "a: Invalid value: \"q\\\"\\n\"",
        ),
        (
            FieldError::not_supported("p", "Sometimes", &PULL_POLICIES),
            "FieldValueNotSupported",
            "p: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"",
        ),
        (
            FieldError::duplicate("n", "app"),
            "FieldValueDuplicate",
            "n: Duplicate value: \"app\"",
        ),
        (
            FieldError::not_found("t", "nosuch"),
            "FieldValueNotFound",
            "t: Not found: \"nosuch\"",
        ),
        (
            FieldError::forbidden("f", "no"),
            "FieldValueForbidden",
            "f: Forbidden: no",
        ),
        (
            FieldError::forbidden("[]", STATIC_POD_REFUSAL),
            "FieldValueForbidden",
            "[]: Forbidden: static pods do not support ephemeral containers",
        ),
    ];
    for (e, reason, text) in cases {
        assert_eq!(e.type_.reason(), reason, "{text}");
        assert_eq!(e.to_string(), text);
        assert_eq!(format!("{}: {}", e.field, e.body()), text);
    }
}

#[test]
fn defaults_follow_the_image_tag() {
    let cases = [
        ("busybox", "Always"),
        ("busybox:latest", "Always"),
        ("busybox:1.36", "IfNotPresent"),
        ("ephemerald.local/busybox:1.35", "IfNotPresent"),
        ("localhost:5000/busybox", "Always"),
        ("localhost:5000/busybox:v1", "IfNotPresent"),
        (
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "IfNotPresent",
        ),
        (
            "busybox:latest@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Always",
        ),
        ("Busybox", "IfNotPresent"),
        ("Registry.Example/busybox", "Always"),
        ("", "IfNotPresent"),
    ];
    for (image, want) in cases {
        assert_eq!(default_image_pull_policy(image), want, "{image}");
    }
    let mut ec = EphemeralContainer {
        name: "dbg".into(),
        image: Some("busybox".into()),
        ..Default::default()
    };
    default_ephemeral_container(&mut ec);
    assert_eq!(ec.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        ec.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(ec.termination_message_policy.as_deref(), Some("File"));
    // Set values are kept.
    let mut ec = EphemeralContainer {
        name: "dbg".into(),
        image: Some("busybox".into()),
        image_pull_policy: Some("Never".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    default_ephemeral_container(&mut ec);
    assert_eq!(ec.image_pull_policy.as_deref(), Some("Never"));
    assert_eq!(
        ec.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
}

#[test]
fn validate_table() {
    let label = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
    let long = "a".repeat(64);
    let cases: Vec<(&str, Value, Vec<String>)> = vec![
        ("kubectl's debug container is valid",
         json!([{"name": "dbg", "image": "busybox:1.36", "command": ["sh"], "resources": {},
                 "securityContext": {"capabilities": {"add": ["SYS_PTRACE"]}},
                 "targetContainerName": "app", "terminationMessagePolicy": "File",
                 "stdin": true, "tty": true, "env": [{"name": "A", "value": "b"}],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]),
         vec![]),
        ("name empty", json!([{"name": "", "image": "b"}]),
         vec!["spec.ephemeralContainers[0].name: Required value".into()]),
        ("name not a label", json!([{"name": "Dbg", "image": "b"}]),
         vec![format!("spec.ephemeralContainers[0].name: Invalid value: \"Dbg\": {label}")]),
        ("name with dots", json!([{"name": "a.b", "image": "b"}]),
         vec!["spec.ephemeralContainers[0].name: Invalid value: \"a.b\": must not contain dots".into()]),
        ("name too long", json!([{"name": long, "image": "b"}]),
         vec![format!("spec.ephemeralContainers[0].name: Invalid value: \"{long}\": must be no more than 63 characters")]),
        ("image empty", json!([{"name": "dbg"}]),
         vec!["spec.ephemeralContainers[0].image: Required value".into()]),
        ("image whitespace", json!([{"name": "dbg", "image": " busybox"}]),
         vec!["spec.ephemeralContainers[0].image: Invalid value: \" busybox\": must not have leading or trailing whitespace".into()]),
        ("termination message policy", json!([{"name": "dbg", "image": "b", "terminationMessagePolicy": "Sometimes"}]),
         vec!["spec.ephemeralContainers[0].terminationMessagePolicy: Unsupported value: \"Sometimes\": supported values: \"File\", \"FallbackToLogsOnError\"".into()]),
        ("pull policy", json!([{"name": "dbg", "image": "b", "imagePullPolicy": "Sometimes"}]),
         vec!["spec.ephemeralContainers[0].imagePullPolicy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"IfNotPresent\", \"Never\"".into()]),
        ("collides with a container", json!([{"name": "app", "image": "b"}]),
         vec!["spec.ephemeralContainers[0].name: Duplicate value: \"app\"".into()]),
        ("collides with an init container", json!([{"name": "init", "image": "b"}]),
         vec!["spec.ephemeralContainers[0].name: Duplicate value: \"init\"".into()]),
        ("collides with an earlier ephemeral container",
         json!([{"name": "dbg", "image": "b"}, {"name": "dbg", "image": "c"}]),
         vec!["spec.ephemeralContainers[1].name: Duplicate value: \"dbg\"".into()]),
        ("unknown target", json!([{"name": "dbg", "image": "b", "targetContainerName": "nosuch"}]),
         vec!["spec.ephemeralContainers[0].targetContainerName: Not found: \"nosuch\"".into()]),
        ("target may be an init container", json!([{"name": "dbg", "image": "b", "targetContainerName": "init"}]),
         vec![]),
        ("target may not be an ephemeral container",
         json!([{"name": "dbg", "image": "b"}, {"name": "dbg2", "image": "b", "targetContainerName": "dbg"}]),
         vec!["spec.ephemeralContainers[1].targetContainerName: Not found: \"dbg\"".into()]),
        ("every forbidden field, in declaration order",
         json!([{"name": "dbg", "image": "b",
                 "lifecycle": {"preStop": {"exec": {"command": ["x"]}}},
                 "startupProbe": {"exec": {"command": ["x"]}},
                 "readinessProbe": {"exec": {"command": ["x"]}},
                 "livenessProbe": {"exec": {"command": ["x"]}},
                 "restartPolicy": "Always",
                 "resizePolicy": [{"resourceName": "cpu", "restartPolicy": "NotRequired"}],
                 "resources": {"limits": {"cpu": "1"}},
                 "ports": [{"containerPort": 80}]}]),
         ["ports", "resources", "resizePolicy", "restartPolicy", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle"]
             .iter().map(|f| format!("spec.ephemeralContainers[0].{f}: {FORB}")).collect()),
        ("empty resources are allowed, empty ports are not",
         json!([{"name": "dbg", "image": "b", "resources": {}, "ports": []}]),
         vec![format!("spec.ephemeralContainers[0].ports: {FORB}")]),
        ("empty limits are set", json!([{"name": "dbg", "image": "b", "resources": {"limits": {}}}]),
         vec![format!("spec.ephemeralContainers[0].resources: {FORB}")]),
        ("subPath and subPathExpr",
         json!([{"name": "dbg", "image": "b", "volumeMounts": [
             {"name": "data", "mountPath": "/a", "subPath": "x"},
             {"name": "data", "mountPath": "/b", "subPathExpr": "$(X)"}]}]),
         vec![format!("spec.ephemeralContainers[0].volumeMounts[0].subPath: {FORB}"),
              format!("spec.ephemeralContainers[0].volumeMounts[1].subPathExpr: {FORB}")]),
        ("mount of an unknown volume", json!([{"name": "dbg", "image": "b", "volumeMounts": [{"name": "nosuch", "mountPath": "/a"}]}]),
         vec!["spec.ephemeralContainers[0].volumeMounts[0].name: Not found: \"nosuch\"".into()]),
        ("mount propagation: Bidirectional needs privileged, unknown modes are not supported",
         json!([{"name": "dbg", "image": "b", "volumeMounts": [
             {"name": "data", "mountPath": "/a", "mountPropagation": "Bidirectional"},
             {"name": "data", "mountPath": "/b", "mountPropagation": "Shared"}]},
                {"name": "root", "image": "b", "securityContext": {"privileged": true}, "volumeMounts": [
             {"name": "data", "mountPath": "/a", "mountPropagation": "Bidirectional"},
             {"name": "data", "mountPath": "/b", "mountPropagation": "HostToContainer"}]}]),
         vec!["spec.ephemeralContainers[0].volumeMounts.mountPropagation: Forbidden: Bidirectional mount propagation is available only to privileged containers".into(),
              "spec.ephemeralContainers[0].volumeMounts.mountPropagation: Unsupported value: \"Shared\": supported values: \"Bidirectional\", \"HostToContainer\", \"None\"".into()]),
        ("recursiveReadOnly needs readOnly and no propagation",
         json!([{"name": "dbg", "image": "b", "volumeMounts": [
             {"name": "data", "mountPath": "/a", "recursiveReadOnly": "Enabled"},
             {"name": "data", "mountPath": "/b", "readOnly": true, "recursiveReadOnly": "IfPossible", "mountPropagation": "HostToContainer"},
             {"name": "data", "mountPath": "/c", "readOnly": true, "recursiveReadOnly": "Enabled"}]}]),
         vec!["spec.ephemeralContainers[0].volumeMounts.recursiveReadOnly: Forbidden: may only be specified when readOnly is true".into(),
              "spec.ephemeralContainers[0].volumeMounts.recursiveReadOnly: Forbidden: may only be specified when mountPropagation is None or not specified".into()]),
        ("common errors come before the collision and the allow list",
         json!([{"name": "app", "image": "", "ports": [{"containerPort": 80}]}]),
         vec!["spec.ephemeralContainers[0].image: Required value".into(),
              "spec.ephemeralContainers[0].name: Duplicate value: \"app\"".into(),
              format!("spec.ephemeralContainers[0].ports: {FORB}")]),
    ];
    for (name, ecs, want) in cases {
        let got = messages(&validate_ephemeral_containers(&pod_with(ecs)));
        assert_eq!(got, want, "case: {name}");
    }
}

#[test]
fn undefaulted_spec_lacks_pull_policy_and_termination_policy() {
    let p = pod(
        json!({"spec": {"containers": [{"name": "app"}], "ephemeralContainers": [{"name": "dbg", "image": "b"}]}}),
    );
    assert_eq!(
        messages(&validate_ephemeral_containers(&p)),
        vec![
            "spec.ephemeralContainers[0].terminationMessagePolicy: Required value",
            "spec.ephemeralContainers[0].imagePullPolicy: Required value",
        ]
    );
}

#[test]
fn update_table() {
    let dbg = json!({"name": "dbg", "image": "busybox:1.36"});
    let dbg2 = json!({"name": "dbg2", "image": "busybox:1.36"});
    let changed = json!({"name": "dbg", "image": "busybox:1.37"});
    let cases: Vec<(&str, Value, Value, Vec<String>)> = vec![
        ("append", json!([dbg]), json!([dbg, dbg2]), vec![]),
        ("reorder is fine", json!([dbg, dbg2]), json!([dbg2, dbg]), vec![]),
        ("unchanged", json!([dbg]), json!([dbg]), vec![]),
        ("removed", json!([dbg]), json!([dbg2]),
         vec!["spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed\n".into()]),
        ("removed all", json!([dbg, dbg2]), json!([]),
         vec!["spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed\n".into(),
              "spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg2\" may not be removed\n".into()]),
    ];
    for (name, old, new, want) in cases {
        let got = messages(&validate_ephemeral_containers_update(
            &pod_with(new),
            &pod_with(old),
        ));
        assert_eq!(got, want, "case: {name}");
    }
    let errs =
        validate_ephemeral_containers_update(&pod_with(json!([changed])), &pod_with(json!([dbg])));
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].field, "spec.ephemeralContainers");
    assert!(
        errs[0]
            .detail
            .starts_with("existing ephemeral containers \"dbg\" may not be changed\n"),
        "{}",
        errs[0].detail
    );
    assert!(
        errs[0].detail.contains("busybox:1.37"),
        "{}",
        errs[0].detail
    );
}

#[test]
fn mirror_pod_gets_only_the_static_pod_error() {
    let mut old = pod_with(json!([]));
    old.metadata.annotations =
        Some([(MIRROR_POD_ANNOTATION.to_string(), "abc".to_string())].into());
    let mut new = pod_with(json!([{"name": "dbg", "image": "b", "ports": [{"containerPort": 1}]}]));
    new.metadata.annotations = old.metadata.annotations.clone();
    let errs = validate_ephemeral_containers_update(&new, &old);
    assert_eq!(
        messages(&errs),
        vec!["[]: Forbidden: static pods do not support ephemeral containers"]
    );
    assert_eq!(
        refusals(&new),
        BTreeMap::from([(
            "dbg".to_string(),
            "static pods do not support ephemeral containers".to_string()
        )])
    );
}

#[test]
fn refusals_per_container() {
    let p = pod(json!({"spec": {
    "containers": [{"name": "app"}],
    "ephemeralContainers": [
        {"name": "ok", "image": "busybox"},
        {"name": "bad", "image": "busybox", "ports": [{"containerPort": 80}], "resources": {"limits": {"cpu": "1"}}},
        {"name": "mnt", "image": "busybox", "volumeMounts": [{"name": "v", "mountPath": "/v", "subPath": "x"}]},
    ]}}));
    let r = refusals(&p);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        r["bad"],
        format!(
            "spec.ephemeralContainers[1].ports: {FORB}; spec.ephemeralContainers[1].resources: {FORB}"
        )
    );
    assert_eq!(
        r["mnt"],
        format!(
            "spec.ephemeralContainers[2].volumeMounts[0].name: Not found: \"v\"; spec.ephemeralContainers[2].volumeMounts[0].subPath: {FORB}"
        )
    );
}

#[test]
fn status_transitions() {
    let term = json!({"terminated": {"exitCode": 0}});
    let run = json!({"running": {}});
    let wait = json!({"waiting": {"reason": "CreateContainerError"}});
    let mk = |policy: &str, ecs: Value, cs: Value| {
        pod(
            json!({"spec": {"restartPolicy": policy, "containers": [{"name": "app"}]},
                   "status": {"ephemeralContainerStatuses": ecs, "containerStatuses": cs}}),
        )
    };
    let st = |name: &str, state: &Value| json!({"name": name, "state": state, "image": "", "imageID": "", "ready": false, "restartCount": 0});
    let cases: Vec<(&str, Pod, Pod, Vec<String>)> = vec![
        ("ephemeral terminated -> waiting",
         mk("Always", json!([st("a", &run), st("dbg", &term)]), json!([])),
         mk("Always", json!([st("a", &run), st("dbg", &wait)]), json!([])),
         vec!["status.ephemeralContainerStatuses[1].state: Forbidden: may not be transitioned to non-terminated state".into()]),
        ("ephemeral index is the old one",
         mk("Always", json!([st("dbg", &term)]), json!([])),
         mk("Always", json!([st("a", &run), st("dbg", &run)]), json!([])),
         vec!["status.ephemeralContainerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state".into()]),
        ("ephemeral running -> terminated is fine",
         mk("Always", json!([st("dbg", &run)]), json!([])),
         mk("Always", json!([st("dbg", &term)]), json!([])), vec![]),
        ("ephemeral dropped from the list is not a transition",
         mk("Always", json!([st("dbg", &term)]), json!([])),
         mk("Always", json!([]), json!([])), vec![]),
        ("container restart allowed with Always",
         mk("Always", json!([]), json!([st("app", &term)])),
         mk("Always", json!([]), json!([st("app", &run)])), vec![]),
        ("container restart refused with Never",
         mk("Never", json!([]), json!([st("app", &term)])),
         mk("Never", json!([]), json!([st("app", &run)])),
         vec!["status.containerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state".into()]),
        ("OnFailure refuses after exit 0",
         mk("OnFailure", json!([]), json!([st("app", &term)])),
         mk("OnFailure", json!([]), json!([st("app", &run)])),
         vec!["status.containerStatuses[0].state: Forbidden: may not be transitioned to non-terminated state".into()]),
    ];
    for (name, old, new, want) in cases {
        assert_eq!(
            messages(&validate_pod_status_update(&new, &old)),
            want,
            "case: {name}"
        );
    }
    let old = pod(json!({"status": {"qosClass": "BestEffort"}}));
    let new = pod(json!({"status": {"qosClass": "Guaranteed"}}));
    assert_eq!(
        messages(&validate_pod_status_update(&new, &old)),
        vec!["status.qosClass: Invalid value: \"Guaranteed\": field is immutable"]
    );
}

#[test]
fn invalid_status_shape() {
    let one = [FieldError::forbidden(
        "spec.ephemeralContainers[0].ports",
        FORBIDDEN_FOR_EPHEMERAL,
    )];
    assert_eq!(
        invalid_status("Pod", "web", &one),
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
               "message":"Pod \"web\" is invalid: spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container",
               "reason":"Invalid",
               "details":{"name":"web","kind":"Pod",
                          "causes":[{"reason":"FieldValueForbidden","message":"Forbidden: cannot be set for an Ephemeral Container","field":"spec.ephemeralContainers[0].ports"}]},
               "code":422})
    );
    let two = [
        one[0].clone(),
        FieldError::forbidden(
            "spec.ephemeralContainers[0].resources",
            FORBIDDEN_FOR_EPHEMERAL,
        ),
        one[0].clone(),
    ];
    let s = invalid_status("Pod", "web", &two);
    assert_eq!(
        s["message"],
        "Pod \"web\" is invalid: [spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container, spec.ephemeralContainers[0].resources: Forbidden: cannot be set for an Ephemeral Container]"
    );
    assert_eq!(
        s["details"]["causes"].as_array().unwrap().len(),
        3,
        "causes are not de-duplicated"
    );
    assert_eq!(
        invalid_status("Pod", "web", &[])["message"],
        "Pod \"web\" is invalid"
    );
    let dup = [one[0].clone(), one[0].clone()];
    assert_eq!(
        invalid_status("Pod", "web", &dup)["message"],
        "Pod \"web\" is invalid: spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral Container"
    );
    let lease = invalid_status(
        "Lease.coordination.k8s.io",
        "n",
        &[FieldError::required("spec", "")],
    );
    assert_eq!(lease["details"]["group"], "coordination.k8s.io");
    assert_eq!(lease["details"]["kind"], "Lease");
    assert_eq!(
        lease["message"],
        "Lease.coordination.k8s.io \"n\" is invalid: spec: Required value"
    );
}
