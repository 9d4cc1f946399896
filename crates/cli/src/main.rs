//! `qwen-image`: the project's command line.

use clap::{Parser, Subcommand};

mod cn_inpaint;
mod detect_pose;
mod edit;
mod generate;
mod instruct;
mod model_dir;
mod parity;
mod pose;
mod serve;
mod settings;
mod stack;
mod weights;

/// Qwen-Image serving system command line.
#[derive(Parser)]
#[command(name = "qwen-image", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recompute a diffusers reference dump (refharness format) with our code and compare, tensor by tensor.
    Parity(parity::ParityArgs),
    /// Run the stack (text-encoder, denoiser, VAE and gateway) in this process, or one service of it.
    Serve(serve::ServeArgs),
    /// Generate an image from a prompt through a gateway (or a stack started for the call) and write a PNG.
    Generate(generate::GenerateArgs),
    /// Pose a character: ControlNet pose from a skeleton picture or OpenPose keypoints JSON, written as PNG.
    Pose(pose::PoseArgs),
    /// Detect the people in a picture (OpenPose body keypoints) and write them as OpenPose JSON.
    #[command(name = "detect-pose")]
    DetectPose(detect_pose::DetectPoseArgs),
    /// Regenerate the white region of a mask with an inpainting ControlNet (InstantX ControlNet-Inpainting).
    #[command(name = "controlnet-inpaint")]
    ControlnetInpaint(cn_inpaint::CnInpaintArgs),
    /// Restyle a picture from a prompt (image to image) and write a PNG.
    Img2img(edit::Img2ImgArgs),
    /// Repaint the white part of a mask from a prompt and write a PNG.
    Inpaint(edit::InpaintArgs),
    /// Extend a picture past its borders from a prompt and write a PNG.
    Outpaint(edit::OutpaintArgs),
    /// Edit one to three pictures by instruction (Qwen-Image-Edit-2509 / -2511) and write a PNG.
    Edit(instruct::InstructArgs),
}

fn main() -> std::process::ExitCode {
    qwen_image_common::launch::default_cpu_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Parity(args) => parity::run(&args),
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Pose(args) => pose::run(args),
        Command::DetectPose(args) => detect_pose::run(args),
        Command::ControlnetInpaint(args) => cn_inpaint::run(args),
        Command::Img2img(args) => edit::img2img(args),
        Command::Inpaint(args) => edit::inpaint(args),
        Command::Outpaint(args) => edit::outpaint(args),
        Command::Edit(args) => instruct::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
