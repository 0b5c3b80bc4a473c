//! gractl, the CLI for grad: people and AI agents create runners, run code in
//! them and read the results from here (see `ARCHITECTURE.md`, "gractl").
//!
//! The library holds everything so tests and benchmarks can drive it:
//! [`client`] (one gRPC connection to grad), [`config`] (login credentials and
//! workspace `config.yaml`), [`quantity`] (CPU, sizes, durations as typed),
//! [`ssh`] (SSH and SFTP to runners through grad's tunnels, gractl's key,
//! OpenSSH config), [`sync`] (runners' workspaces mounted locally), [`transfer`]
//! (`gractl cp` over SFTP), [`outputs`] (runners' collected outputs pulled by
//! presigned URL), [`terminal`] (raw
//! mode for interactive shells), [`output`] (the JSON contract and human
//! tables), [`exit`] (exit codes) and [`cli`] (the commands). `main.rs` only
//! parses, runs and reports.

pub mod cli;
pub mod client;
pub mod config;
pub mod dataset;
pub mod exit;
pub mod job;
pub mod output;
pub mod outputs;
pub mod quantity;
pub mod ssh;
pub mod sync;
pub mod terminal;
pub mod transfer;

pub use client::{Client, ClientError};
