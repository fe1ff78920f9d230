//! Compiles `proto/keypool/admin/v1/admin.proto` with the vendored `protoc` (unless `PROTOC`
//! names another), and writes the descriptor set reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("keypool/admin/v1/admin.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keypool_descriptor.bin"))
        .compile_with_config(config, &[proto], &[root])?;
    Ok(())
}
