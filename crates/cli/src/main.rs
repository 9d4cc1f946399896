//! `qwen-image`: the project's command line.

use clap::{Parser, Subcommand};

mod parity;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Parity(args) => parity::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
