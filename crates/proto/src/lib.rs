//! The generated `keypool.admin.v1` types, client and server, and the encoded descriptor set
//! that gRPC reflection serves.

#![allow(clippy::all, clippy::pedantic)]

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("keypool.admin.v1");
    }
}

/// The encoded `FileDescriptorSet` of `admin.proto`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keypool_descriptor");
