//! Compiles `proto/grad/v1/*.proto` with protox (pure Rust), so building needs
//! no system `protoc`, and keeps the encoded descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const FILES: &[&str] = &[
    "proto/grad/v1/runners.proto",
    "proto/grad/v1/exec.proto",
    "proto/grad/v1/users.proto",
    "proto/grad/v1/agent.proto",
    "proto/grad/v1/tunnel.proto",
    "proto/grad/v1/outputs.proto",
    "proto/grad/v1/datasets.proto",
    "proto/grad/v1/secrets.proto",
    "proto/grad/v1/jobs.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(FILES, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("grad_descriptor.bin"), descriptors.encode_to_vec())?;
    // Tunnel bytes are handed on without copies where the codec allows.
    tonic_prost_build::configure()
        .bytes(".grad.v1.TunnelFrame.data")
        .compile_fds(descriptors)?;
    Ok(())
}
