//! Carrying out one planned action of a pass: refuse a container (with its
//! Event and failure memory), resume one its creator created but never
//! started, or create and start one ([`super::execute`]); then record the
//! outcome in the memory, the timeline, the exit index and the metrics.
//!
//! Owns: the bookkeeping around a start. The start itself (image, create,
//! start, the kubelet's reasons) is `execute`'s; deciding what to start is
//! `plan`'s.

use k8s_openapi::api::core::v1::Pod;

use super::super::execute::{self, StartContext, Started};
use super::super::image;
use super::super::observe::{Observed, SandboxDetails, parse_sandbox_info};
use super::super::plan::{Action as PlanAction, Gates};
use super::super::timeline;
use super::super::translate;
use super::{Agent, START_IN_PROGRESS_RECHECK};
use crate::k8s::{ContainerEvent, EventType};
use crate::kubelet;
use crate::observe::{StartLabels, phase};

impl Agent {
    /// Carries out one planned action; returns whether the runtime changed.
    pub(super) async fn act(
        &self,
        pod: &Pod,
        uid: &str,
        observed: &Observed,
        gates: &Gates,
        action: PlanAction,
    ) -> bool {
        match action {
            PlanAction::Fail {
                name,
                reason,
                message,
            } => {
                let permanent = gates.refused.contains_key(&name);
                self.refuse(pod, uid, &name, reason, message, permanent);
                false
            }
            PlanAction::Resume { name, id } => self.resume(pod, uid, name, id).await,
            PlanAction::Start { name, target_id } => {
                self.start(pod, uid, observed, &name, target_id.as_deref())
                    .await
            }
        }
    }

    /// A container that cannot start (refused, or its target is not there):
    /// remember why, tell it (once when it is final).
    fn refuse(
        &self,
        pod: &Pod,
        uid: &str,
        name: &str,
        reason: &'static str,
        message: String,
        permanent: bool,
    ) {
        let first = self.memory.remember_failure(
            uid,
            name,
            "",
            execute::StartFailure {
                reason,
                message: message.clone(),
                retryable: !permanent,
                created_id: None,
            },
            &self.backoff,
        );
        if first || !permanent {
            self.events.record(ContainerEvent::new(
                pod,
                name,
                EventType::Warning,
                "Failed",
                format!("Error: {message}"),
            ));
        }
        tracing::warn!(container = %name, reason, %message, "cannot start");
        self.metrics
            .starts
            .get_or_create(&StartLabels {
                result: "failed".into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Starts a container its creator created but never started.
    async fn resume(&self, pod: &Pod, uid: &str, name: String, id: String) -> bool {
        let _starting = self.exits.start();
        tracing::info!(container = %name, %id, "created but never started (its creator stopped half-way); starting it");
        let result = match self.runtime.start_container(&id).await {
            Ok(()) => {
                self.events.record(ContainerEvent::new(
                    pod,
                    &name,
                    EventType::Normal,
                    "Started",
                    format!("Started container {name}"),
                ));
                // Whoever starts it links its log, as the kubelet does.
                super::super::logs::link_started(
                    self.runtime.as_ref(),
                    &self.dirs,
                    pod,
                    &name,
                    &id,
                )
                .await;
                Ok(Started::Adopted { id })
            }
            Err(e) if e.is_started_elsewhere() => {
                // The creator's own StartContainer got there first: still
                // under way in the runtime (containerd finishes or aborts it
                // even when the caller died) or settled since we looked. Not
                // a failure: look again.
                tracing::info!(container = %name, %id, error = %e.message(), "its creator's start got there first; looking again shortly");
                self.memory.recheck_in(uid, START_IN_PROGRESS_RECHECK);
                return false;
            }
            Err(e) => {
                self.events.record(ContainerEvent::new(
                    pod,
                    &name,
                    EventType::Warning,
                    "Failed",
                    format!("Error: {}", e.message().replace(&id, &name)),
                ));
                Err(execute::StartFailure {
                    reason: execute::reason::RUN_CONTAINER,
                    message: e.message(),
                    retryable: false,
                    created_id: Some(id),
                })
            }
        };
        self.after_start(pod, uid, &name, "", result)
    }

    /// Creates and starts an ephemeral container in the pod's ready sandbox.
    async fn start(
        &self,
        pod: &Pod,
        uid: &str,
        observed: &Observed,
        name: &str,
        target_id: Option<&str>,
    ) -> bool {
        let _starting = self.exits.start();
        let Some(c) = pod
            .spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers.as_ref())
            .and_then(|v| v.iter().find(|c| c.name == name))
        else {
            return false;
        };
        let Some(sandbox) = observed.ready_sandbox() else {
            return false;
        };
        let details = self.sandbox_details(uid, &sandbox.id).await;
        let mut sandbox_config = translate::sandbox_config(
            pod,
            &self.dirs.pod_logs,
            sandbox.attempt,
            &details.cgroup_parent,
        );
        if let Some(dir) = details.log_directory {
            sandbox_config.log_directory = dir;
        }
        let image = c.image.as_deref().unwrap_or_default();
        let auths = self.pull_auths(pod, image).await;
        let cx = StartContext {
            runtime: self.runtime.as_ref(),
            events: self.events.as_ref(),
            dirs: &self.dirs,
            sandbox_id: &sandbox.id,
            sandbox_config: &sandbox_config,
            pull_auths: &auths,
        };
        let result = execute::start_with(&cx, Some(self.cluster.as_ref()), pod, c, target_id).await;
        self.after_start(pod, uid, name, image, result)
    }

    /// Records a start's outcome; returns whether the runtime changed.
    fn after_start(
        &self,
        pod: &Pod,
        uid: &str,
        name: &str,
        image: &str,
        result: Result<Started, execute::StartFailure>,
    ) -> bool {
        let label = |result: &str, reason: &str| StartLabels {
            result: result.into(),
            reason: reason.into(),
        };
        match result {
            Ok(Started::Started { id, timings }) => {
                let retried = self.memory.clear_failure(uid, name);
                self.memory.with_timelines(uid, |t| {
                    if let Some(t) = t.get_mut(name) {
                        timeline::record_started(t, &timings, retried, &self.metrics);
                    }
                });
                for (p, d) in [
                    (phase::IMAGE, timings.image),
                    (phase::CREATE, timings.create),
                    (phase::START, timings.start),
                ] {
                    self.metrics.phase(p, d.as_secs_f64());
                }
                self.metrics
                    .starts
                    .get_or_create(&label("started", ""))
                    .inc();
                self.exits.insert(id, pod);
                true
            }
            Ok(Started::Adopted { id }) => {
                self.metrics
                    .starts
                    .get_or_create(&label("adopted", ""))
                    .inc();
                self.exits.insert(id, pod);
                true
            }
            Err(f) => {
                tracing::warn!(container = %name, reason = f.reason, message = %f.message, retryable = f.retryable, "start failed");
                self.metrics
                    .starts
                    .get_or_create(&label("failed", f.reason))
                    .inc();
                let created = f.created_id.is_some();
                self.memory
                    .remember_failure(uid, name, image, f, &self.backoff);
                created
            }
        }
    }

    async fn sandbox_details(&self, uid: &str, sandbox_id: &str) -> SandboxDetails {
        if let Some(d) = self.memory.sandbox_details(uid, sandbox_id) {
            return d;
        }
        let details = match self.runtime.pod_sandbox_status(sandbox_id, true).await {
            Ok(resp) => resp
                .info
                .get("info")
                .map(|s| parse_sandbox_info(s))
                .unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "sandbox status; using an empty cgroup parent");
                SandboxDetails::default()
            }
        };
        self.memory
            .set_sandbox_details(uid, sandbox_id, details.clone());
        details
    }

    async fn pull_auths(&self, pod: &Pod, image: &str) -> Vec<crate::cri::proto::AuthConfig> {
        let names: Vec<String> = pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.as_ref())
            .map(|v| v.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            return vec![];
        }
        match self
            .cluster
            .pull_secrets(kubelet::namespace(pod), &names)
            .await
        {
            Ok(configs) => image::credentials_for(image, &configs),
            Err(e) => {
                tracing::warn!(error = %e, "reading image pull secrets; pulling without them");
                vec![]
            }
        }
    }
}
