//! Generates the qwen_image.v1 messages and services into OUT_DIR (rust-stack.md §3.1).

const PROTOS: &[&str] = &[
    "../../proto/qwen_image/v1/tensor.proto",
    "../../proto/qwen_image/v1/stage.proto",
    "../../proto/qwen_image/v1/text_encoder.proto",
    "../../proto/qwen_image/v1/denoiser.proto",
    "../../proto/qwen_image/v1/vae.proto",
    "../../proto/qwen_image/v1/pose_detector.proto",
    "../../proto/qwen_image/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // prost/tonic build scripts emit no rerun-if-changed for .proto files.
    println!("cargo:rerun-if-changed=../../proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .bytes(".")
        .file_descriptor_set_path(out_dir.join("qwen_image_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["../../proto"])?;
    Ok(())
}
