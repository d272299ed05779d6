//! The `fieldkey` command. Thin: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fieldkey::kms::Kms as _;
use fieldkey::kms::local::{KdfParams, LocalKms};
use secrecy::SecretString;

#[derive(Parser)]
#[command(
    name = "fieldkey",
    version,
    about = "Field-level encryption and key management sidecar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Key management service set-up.
    Kms {
        #[command(subcommand)]
        command: KmsCommand,
    },
}

#[derive(Subcommand)]
enum KmsCommand {
    /// Create a local development KMS root key file (refuses to overwrite one).
    InitLocal {
        /// Where to write the root key file.
        #[arg(long, default_value = "fieldkey-local-kms.json")]
        path: PathBuf,
        /// Passphrase protecting the root key (at least 12 characters).
        #[arg(long, env = "FIELDKEY_LOCAL_KMS_PASSPHRASE", hide_env_values = true)]
        passphrase: String,
        /// Argon2id memory cost in KiB.
        #[arg(long, default_value_t = KdfParams::default().m_cost_kib)]
        argon2_m_kib: u32,
        /// Argon2id passes.
        #[arg(long, default_value_t = KdfParams::default().t_cost)]
        argon2_t: u32,
    },
}

fn main() -> ExitCode {
    #[cfg(target_arch = "x86_64")]
    if !(std::is_x86_feature_detected!("aes") && std::is_x86_feature_detected!("pclmulqdq")) {
        eprintln!("error: this CPU lacks AES-NI/PCLMULQDQ, which this build of fieldkey requires");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Kms {
            command:
                KmsCommand::InitLocal {
                    path,
                    passphrase,
                    argon2_m_kib,
                    argon2_t,
                },
        } => {
            let params = KdfParams {
                m_cost_kib: argon2_m_kib,
                t_cost: argon2_t,
                p_cost: 1,
            };
            let kms = LocalKms::create(&path, &SecretString::from(passphrase), params)?;
            println!(
                "created {} (key id {})",
                path.display(),
                kms.default_key_id()
            );
            Ok(())
        }
    }
}
