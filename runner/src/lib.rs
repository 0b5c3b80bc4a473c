//! grad-runner: the executor inside every runner. [`agent`] dials out to grad
//! and carries commands and events; [`kernel`] keeps one persistent Python
//! interpreter per session. See ARCHITECTURE.md ("grad-runner").

pub mod agent;
pub mod kernel;
