//! Generated code for the `qwen_image.v1` gRPC API (see `proto/qwen_image/v1/*.proto`).

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("qwen_image.v1");

    /// Encoded file descriptor set of every qwen_image.v1 proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("qwen_image_descriptor");
}
