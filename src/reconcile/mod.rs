//! The reconcile path of one pod: observe the runtime, plan (pure), execute,
//! compute status (pure). `translate` turns one ephemeral container into the
//! CRI config the kubelet would send (with `resources`, `services` and the
//! `host` facts); `refs` reads the API objects it refers to first; `logs`
//! keeps the legacy log symlinks; `mode` decides whether containers are
//! started at all.

pub mod agent;
pub mod downward;
pub mod execute;
pub mod host;
pub mod image;
pub mod logs;
pub mod mode;
pub mod observe;
pub mod plan;
pub mod refs;
pub mod resources;
pub mod services;
pub mod status;
pub mod translate;
