//! The generated `keypool.admin.v1` types, client and server, the encoded descriptor set that
//! gRPC reflection serves, and the conversions between the config file's shapes and their
//! messages ([`convert`]).

pub mod convert;

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("keypool.admin.v1");
    }
}

/// The encoded `FileDescriptorSet` of `admin.proto`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keypool_descriptor");
