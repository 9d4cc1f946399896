//! `qwen-image-vae`: the stage skeleton's `main` for the VAE.

fn main() -> std::process::ExitCode {
    qwen_image_common::stage::main::<qwen_image_vae::Vae>()
}
