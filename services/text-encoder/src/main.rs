//! `qwen-image-text-encoder`: the stage skeleton's `main` for the text encoder.

fn main() -> std::process::ExitCode {
    qwen_image_common::stage::main::<qwen_image_text_encoder::TextEncoder>()
}
