//! The `fieldkey` command line: `serve` runs the sidecar; `encrypt`, `decrypt` and
//! `tenant` call a running one over gRPC; `kms init-local` prepares a development KMS.
//!
//! Exit codes (stable, for scripts): 0 success; 1 failure (server, transport, internal);
//! 2 usage error; 3 not found; 4 refused (invalid argument, malformed or unauthentic
//! ciphertext, destroyed or suspended key, unusable KMS key); 5 temporarily unavailable
//! (KMS or store down, deadline, overload: retry later).

mod audit;
mod client;
mod column;
mod epoch;
mod erasure;
mod jobs;
mod kms;
mod report;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit code for a gRPC status code.
pub fn exit_code_for(code: tonic::Code) -> u8 {
    use tonic::Code::*;
    match code {
        Ok => 0,
        NotFound => 3,
        InvalidArgument | DataLoss | FailedPrecondition | OutOfRange | AlreadyExists
        | PermissionDenied | Unauthenticated => 4,
        Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Cancelled => 5,
        _ => 1,
    }
}

/// The `fieldkey` command line.
#[derive(Parser, Debug)]
#[command(
    name = "fieldkey",
    version,
    about = "Field-level encryption and key-management sidecar",
    long_about = "Field-level encryption and key-management sidecar.\n\nRun `fieldkey serve` beside your application, then encrypt and decrypt field values over gRPC (or with the client commands below).",
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 3 not found, 4 refused (invalid input, unauthentic ciphertext, destroyed/suspended key), 5 unavailable (retry)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar (embedded defaults: SQLite and a local KMS under --data-dir, gRPC on 127.0.0.1:7450).
    Serve(ServeArgs),
    /// Encrypt one value with a running sidecar and print the ciphertext (text form).
    Encrypt(EncryptArgs),
    /// Decrypt one ciphertext with a running sidecar and print the value.
    Decrypt(DecryptArgs),
    /// Print a value's blind index (text form) from a running sidecar; with --lookup,
    /// every index a stored row may hold (one per line).
    BlindIndex(BlindIndexArgs),
    /// Print a subject's pseudonym for a purpose (e.g. analytics) from a running sidecar.
    Pseudonymize(PseudonymizeArgs),
    /// Create, show or rotate a tenant's keys on a running sidecar.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Re-encryption jobs: run one (`run`), or show and steer them on a sidecar.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Erasure (crypto-shredding) and restriction: request, cancel, follow, verify receipts.
    Erasure {
        #[command(subcommand)]
        command: erasure::ErasureCommand,
    },
    /// Key epochs: roll the key store to a new KMS key so that key-store backups
    /// cannot outlive an erasure (docs/ERASURE.md §6); status; verify a seal.
    Epoch {
        #[command(subcommand)]
        command: epoch::EpochCommand,
    },
    /// The audit log: export it, verify a store or an export offline.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// The compliance evidence report (JSON or HTML): every promise of the data
    /// processing agreement with its verdict, from the key store (or a sidecar).
    Report(report::ReportArgs),
    /// Key management service set-up.
    Kms {
        #[command(subcommand)]
        command: KmsCommand,
    },
}

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// Authorization policy directory (Cedar `*.cedar` + `limits.toml`); unset =
    /// authorization off (development only).
    #[arg(long, env = "FIELDKEY_POLICIES")]
    policies: Option<PathBuf>,
    /// Identity of callers on the loopback and Unix-socket listeners (the pod's own,
    /// e.g. its SPIFFE id); default `local`.
    #[arg(long, env = "FIELDKEY_LOCAL_IDENTITY")]
    local_identity: Option<String>,
    /// Loopback TCP address to serve gRPC on (port 0 picks a free port).
    #[arg(long, env = "FIELDKEY_LISTEN")]
    listen: Option<String>,
    /// Serve Prometheus metrics, /healthz and /readyz over HTTP on this address.
    #[arg(long, env = "FIELDKEY_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Also serve gRPC on this Unix socket.
    #[arg(long, env = "FIELDKEY_UNIX_SOCKET")]
    unix_socket: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "FIELDKEY_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
}

/// Where the keys are: configuration, key store and KMS (shared by `serve` and
/// `jobs run`).
#[derive(Args, Debug)]
struct KeyArgs {
    /// TOML configuration file (see README); flags and environment variables override it.
    #[arg(long, env = "FIELDKEY_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the embedded SQLite store and local KMS key file.
    #[arg(long, env = "FIELDKEY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Rotation policy file (default: 365 days, 30-day warning).
    #[arg(long, env = "FIELDKEY_ROTATION_POLICY")]
    rotation_policy: Option<PathBuf>,
    /// Use PostgreSQL at this DSN as the key store (replicas share keys).
    #[arg(long, env = "FIELDKEY_POSTGRES_URL", hide_env_values = true)]
    postgres_url: Option<String>,
    /// Use AWS KMS with this key id/ARN (credentials from the environment).
    #[arg(long, env = "FIELDKEY_AWS_KMS_KEY_ID")]
    aws_kms_key_id: Option<String>,
    /// AWS region for the KMS.
    #[arg(long, env = "FIELDKEY_AWS_REGION")]
    aws_region: Option<String>,
    /// AWS KMS endpoint override.
    #[arg(long, env = "FIELDKEY_AWS_KMS_ENDPOINT")]
    aws_kms_endpoint: Option<String>,
}

#[derive(Args, Debug)]
struct Target {
    /// Address of the sidecar.
    #[arg(
        long,
        env = "FIELDKEY_ADDR",
        default_value = "http://127.0.0.1:7450",
        global = true
    )]
    addr: String,
}

#[derive(Args, Debug)]
struct Scope {
    /// Tenant id.
    #[arg(long, short = 't')]
    tenant: String,
    /// Subject (user) id; omit for tenant-scoped data.
    #[arg(long, short = 's', default_value = "")]
    subject: String,
    /// Field name.
    #[arg(long, short = 'f')]
    field: String,
    /// Record context bound to the ciphertext (e.g. a row id).
    #[arg(long, short = 'c', default_value = "")]
    context: String,
}

#[derive(Args, Debug)]
struct EncryptArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    scope: Scope,
    /// Value to encrypt; read from standard input when omitted.
    #[arg(conflicts_with = "lines")]
    value: Option<String>,
    #[command(flatten)]
    column: ColumnArgs,
}

/// Many values at once: `--lines` reads standard input as a column.
#[derive(Args, Debug, Clone)]
struct ColumnArgs {
    /// Read values from standard input, one per line, and send them as columns
    /// (EncryptColumn / DecryptColumn, one tenant, subject and field); print one result
    /// per line, in order. A value that fails prints an empty line, and its line number
    /// and reason on standard error; the exit status is then 1.
    #[arg(long)]
    lines: bool,
    /// With --lines: each line is `CONTEXT<TAB>VALUE`, the context (a row id) bound to
    /// that value (else --context, for every value).
    #[arg(long, requires = "lines")]
    tab_context: bool,
    /// With --lines: values per call.
    #[arg(long, default_value_t = 1000, requires = "lines")]
    column_size: usize,
}

#[derive(Args, Debug)]
struct DecryptArgs {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    scope: Scope,
    /// Ciphertext (text form `fk1:...`); read from standard input when omitted.
    #[arg(conflicts_with = "lines")]
    ciphertext: Option<String>,
    #[command(flatten)]
    column: ColumnArgs,
}

#[derive(Args, Debug)]
struct BlindIndexArgs {
    #[command(flatten)]
    target: Target,
    /// Tenant id.
    #[arg(long, short = 't')]
    tenant: String,
    /// Field name (needs a [blind_index.fields.NAME] profile in the sidecar's configuration).
    #[arg(long, short = 'f')]
    field: String,
    /// Print the index under every usable key version (to match rows not yet re-indexed).
    #[arg(long)]
    lookup: bool,
    /// Value to index; read from standard input when omitted (one trailing newline removed).
    value: Option<String>,
}

#[derive(Args, Debug)]
struct PseudonymizeArgs {
    #[command(flatten)]
    target: Target,
    /// Tenant id.
    #[arg(long, short = 't')]
    tenant: String,
    /// Subject (user) id.
    #[arg(long, short = 's')]
    subject: String,
    /// Purpose (e.g. analytics): pseudonyms of different purposes cannot be linked.
    #[arg(long, short = 'p')]
    purpose: String,
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    /// Create a tenant (idempotent).
    Create {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
        /// The tenant's own KMS key (bring your own key).
        #[arg(long)]
        kms_key_id: Option<String>,
    },
    /// Show a tenant's key versions and states.
    Show {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
    },
    /// Rotate: a new active key version; the previous becomes decrypt-only.
    Rotate {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
    },
    /// Check every tenant's key age against the rotation policy and rotate the overdue
    /// ones (a CronJob's command). Exits 1 if any rotation failed.
    RotateDue {
        #[command(flatten)]
        target: Target,
        /// Only report the key ages; rotate nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// KEK rotation: rewrap the stored key material of one tenant (or all) under another
    /// KMS key. Touches no application data; run again to resume after an interruption.
    RewrapKmsKey {
        #[command(flatten)]
        target: Target,
        /// The new KMS key id/ARN.
        #[arg(long)]
        kms_key_id: String,
        /// Tenant id (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        tenant: Option<String>,
        /// Every tenant.
        #[arg(long)]
        all: bool,
    },
    /// Retire a decrypt-only key version after re-encryption jobs moved every
    /// ciphertext off it. Its material is erased for good.
    Retire {
        #[command(flatten)]
        target: Target,
        /// Tenant id.
        tenant: String,
        /// Version to retire.
        version: u32,
    },
}

#[derive(Subcommand, Debug)]
enum JobsCommand {
    /// Run (or resume) the re-encryption job a spec file describes, in this process,
    /// against the configured key store and KMS; shows a progress bar. Running the same
    /// spec again resumes from the last checkpoints; with shards, several runners work
    /// the table at once, otherwise a second runner stands by.
    Run {
        #[command(flatten)]
        keys: KeyArgs,
        /// Job spec (TOML; see docs/ROTATION.md).
        spec: PathBuf,
        /// Lease length in seconds: another runner takes over after this long without
        /// a checkpoint from this one.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        lease_seconds: u64,
        /// No progress bar (progress is logged every few seconds instead).
        #[arg(long)]
        no_progress: bool,
        /// Shards the job is cut into when it is created (1..=256; overrides the spec's
        /// `shards`): disjoint primary-key ranges, one runner each at a time. Every
        /// runner of a job must give the same number.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
        shards: Option<u32>,
        /// This runner's own shard (from 0), worked first; then it takes over shards
        /// whose runner died. Defaults to $JOB_COMPLETION_INDEX (set by a Kubernetes
        /// Indexed Job); without either, any shard.
        #[arg(long, env = "JOB_COMPLETION_INDEX")]
        shard: Option<u32>,
    },
    /// List jobs (on a sidecar sharing the key store).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show one job.
    Status {
        #[command(flatten)]
        target: Target,
        /// Job id.
        job: String,
    },
    /// Follow a job's progress until it finishes.
    Watch {
        #[command(flatten)]
        target: Target,
        /// Job id.
        job: String,
    },
    /// Pause a job after its current batch.
    Pause {
        #[command(flatten)]
        target: Target,
        /// Job id.
        job: String,
    },
    /// Resume a paused job, or re-open a failed one (then run it again).
    Resume {
        #[command(flatten)]
        target: Target,
        /// Job id.
        job: String,
    },
    /// Cancel a job after its current batch (rewrapped rows stay rewrapped).
    Cancel {
        #[command(flatten)]
        target: Target,
        /// Job id.
        job: String,
    },
}

#[derive(Subcommand, Debug)]
enum KmsCommand {
    /// Create a local development KMS root key file (refuses to overwrite one).
    InitLocal {
        /// Where to write the root key file.
        #[arg(long, default_value = "fieldkey-local-kms.json")]
        path: PathBuf,
        /// Passphrase protecting the root key (at least 12 characters).
        #[arg(long, env = "FIELDKEY_LOCAL_KMS_PASSPHRASE", hide_env_values = true)]
        passphrase: String,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let log_format = match &cli.command {
        Command::Serve(a) => a.log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await.map_err(client::CliError::Other),
            Command::Encrypt(args) if args.column.lines => column::encrypt(args).await,
            Command::Decrypt(args) if args.column.lines => column::decrypt(args).await,
            Command::Encrypt(args) => client::encrypt(args).await,
            Command::Decrypt(args) => client::decrypt(args).await,
            Command::BlindIndex(args) => client::blind_index(args).await,
            Command::Pseudonymize(args) => client::pseudonymize(args).await,
            Command::Tenant { command } => client::tenant(command).await,
            Command::Jobs { command } => jobs::jobs(command).await,
            Command::Erasure { command } => erasure::erasure(command).await,
            Command::Audit { command } => audit::audit(command).await,
            Command::Epoch { command } => epoch::epoch(command).await,
            Command::Report(args) => report::report(args).await,
            Command::Kms {
                command: KmsCommand::InitLocal { path, passphrase },
            } => serve::init_local_kms(&path, passphrase).map_err(client::CliError::Other),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(client::CliError::Status(s)) => {
            let reason = s
                .metadata()
                .get(crate::service::status::REASON_KEY)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            eprintln!(
                "error: {} ({:?}{}{})",
                s.message(),
                s.code(),
                if reason.is_empty() { "" } else { ", " },
                reason
            );
            ExitCode::from(exit_code_for(s.code()))
        }
        Err(client::CliError::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
