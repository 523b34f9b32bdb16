//! The reconcile path of one pod: observe the runtime, plan (pure), execute,
//! compute status (pure). `translate` turns one ephemeral container into the
//! CRI config the kubelet would send (with `resources`, `services` and the
//! host facts of [`crate::host`]); `refs` reads the API objects it refers to first; `logs`
//! keeps the legacy log symlinks; `mode` decides whether containers are
//! started at all.
//!
//! The pass is [`agent`]; what calls it is [`watch`]; [`exits`] turns exit
//! events into passes; [`memory`] and [`timeline`] are what a pass keeps
//! between passes. `plan`, `status` and `translate` are pure and hold the
//! kubelet's rules; `observe`, `execute` and `refs` do the I/O, through
//! `cri` and `k8s` only.

pub mod agent;
pub mod downward;
pub mod execute;
pub mod exits;
pub mod image;
pub mod logs;
pub mod memory;
pub mod mode;
pub mod observe;
pub mod plan;
pub mod refs;
pub mod resources;
pub mod services;
pub mod status;
pub mod timeline;
pub mod translate;
pub mod watch;
