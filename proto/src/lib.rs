//! The `grad.v1` API shared by grad, grad-runner and gractl: the protobuf
//! messages and the tonic clients and servers generated from `proto/`.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("grad.v1");

    /// Encoded `FileDescriptorSet` for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("grad_descriptor");
}

pub mod log_archive;
pub mod tunnel;

pub use v1::*;
