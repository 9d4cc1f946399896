//! `qwen-image-pose-detector`: the stage skeleton's `main` for the pose detector.

fn main() -> std::process::ExitCode {
    qwen_image_common::stage::main::<qwen_image_pose_detector::PoseDetectorStage>()
}
