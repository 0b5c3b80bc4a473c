//! grad-runner: the executor inside every runner. [`agent`] dials out to grad
//! and carries commands and events; [`kernel`] keeps one persistent Python
//! interpreter per session; [`outputs`] uploads `outputs/` when grad asks;
//! [`datasets`] mounts S3 buckets; [`jobs`] runs batch jobs as a worker
//! (`grad-runner agent`); [`ssh`] is the SSH/SFTP server that tunnels from
//! grad end in. See ARCHITECTURE.md ("grad-runner").

pub mod agent;
pub mod datasets;
pub mod jobs;
pub mod kernel;
pub mod outputs;
pub mod servers;
pub mod ssh;
