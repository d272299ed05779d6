//! The `fieldkey` command. Thin: checks the CPU, parses arguments, runs the library's CLI.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    #[cfg(target_arch = "x86_64")]
    if !(std::is_x86_feature_detected!("aes") && std::is_x86_feature_detected!("pclmulqdq")) {
        eprintln!("error: this CPU lacks AES-NI/PCLMULQDQ, which this build of fieldkey requires");
        return ExitCode::FAILURE;
    }
    fieldkey::cli::run(fieldkey::cli::Cli::parse())
}
