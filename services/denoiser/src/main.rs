//! `qwen-image-denoiser`: the stage skeleton's `main` for the denoiser.

fn main() -> std::process::ExitCode {
    qwen_image_common::stage::main::<qwen_image_denoiser::Denoiser>()
}
