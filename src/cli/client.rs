//! Client commands: call a running sidecar over gRPC.

use std::io::Read as _;

use tonic::transport::Channel;

use super::{BlindIndexArgs, DecryptArgs, EncryptArgs, PseudonymizeArgs, Scope, TenantCommand};
use crate::proto::pb::{
    self, CiphertextFormat, CreateTenantRequest, DecryptRequest, EncryptRequest, GetTenantRequest,
    RotateTenantKeyRequest, crypto_client::CryptoClient, keys_client::KeysClient,
};

/// A client command's failure: a gRPC status (mapped to an exit code) or anything else.
#[derive(Debug)]
pub enum CliError {
    /// The sidecar answered with an error status.
    Status(tonic::Status),
    /// Connection, input or other failure.
    Other(anyhow::Error),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        CliError::Status(s)
    }
}

pub(super) async fn connect(addr: &str) -> Result<Channel, CliError> {
    let endpoint = Channel::from_shared(addr.to_owned())
        .map_err(|e| CliError::Other(anyhow::anyhow!("invalid --addr {addr:?}: {e}")))?;
    endpoint.connect().await.map_err(|e| {
        CliError::Status(tonic::Status::unavailable(format!(
            "cannot connect to fieldkey at {addr}: {e} (is `fieldkey serve` running?)"
        )))
    })
}

pub(super) fn read_stdin() -> Result<Vec<u8>, CliError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| CliError::Other(anyhow::anyhow!("cannot read standard input: {e}")))?;
    Ok(buf)
}

fn subject(s: &Scope) -> String {
    s.subject.clone()
}

pub(super) async fn encrypt(args: EncryptArgs) -> Result<(), CliError> {
    let value = match args.value {
        Some(v) => v.into_bytes(),
        None => read_stdin()?,
    };
    let mut c = CryptoClient::new(connect(&args.target.addr).await?);
    let out = c
        .encrypt(EncryptRequest {
            tenant_id: args.scope.tenant.clone(),
            subject_id: subject(&args.scope),
            field: args.scope.field.clone(),
            context: args.scope.context.clone().into_bytes().into(),
            plaintext: value.into(),
            format: CiphertextFormat::Text as i32,
        })
        .await?
        .into_inner();
    println!("{}", String::from_utf8_lossy(&out.ciphertext));
    Ok(())
}

pub(super) async fn decrypt(args: DecryptArgs) -> Result<(), CliError> {
    let ct = match args.ciphertext {
        Some(v) => v.into_bytes(),
        None => read_stdin()?.trim_ascii().to_vec(),
    };
    let mut c = CryptoClient::new(connect(&args.target.addr).await?);
    let out = c
        .decrypt(DecryptRequest {
            tenant_id: args.scope.tenant.clone(),
            subject_id: subject(&args.scope),
            field: args.scope.field.clone(),
            context: args.scope.context.clone().into_bytes().into(),
            ciphertext: ct.into(),
            repair: false,
        })
        .await?
        .into_inner();
    use std::io::Write as _;
    let mut stdout = std::io::stdout();
    stdout
        .write_all(&out.plaintext)
        .and_then(|()| stdout.write_all(b"\n"))
        .map_err(|e| CliError::Other(anyhow::anyhow!("cannot write output: {e}")))?;
    Ok(())
}

pub(super) async fn blind_index(args: BlindIndexArgs) -> Result<(), CliError> {
    let value = match args.value {
        Some(v) => v.into_bytes(),
        None => {
            let mut v = read_stdin()?;
            if v.last() == Some(&b'\n') {
                v.pop();
                if v.last() == Some(&b'\r') {
                    v.pop();
                }
            }
            v
        }
    };
    let mut c = CryptoClient::new(connect(&args.target.addr).await?);
    let out = c
        .blind_index(pb::BlindIndexRequest {
            tenant_id: args.tenant,
            field: args.field,
            value,
            format: pb::IndexFormat::Text as i32,
            lookup: args.lookup,
        })
        .await?
        .into_inner();
    if args.lookup {
        for i in &out.lookup_indexes {
            println!("{}", String::from_utf8_lossy(i));
        }
    } else {
        println!("{}", String::from_utf8_lossy(&out.index));
    }
    Ok(())
}

pub(super) async fn pseudonymize(args: PseudonymizeArgs) -> Result<(), CliError> {
    let mut c = CryptoClient::new(connect(&args.target.addr).await?);
    let out = c
        .pseudonymize(pb::PseudonymizeRequest {
            tenant_id: args.tenant,
            subject_id: args.subject,
            purpose: args.purpose,
        })
        .await?
        .into_inner();
    println!("{}", out.pseudonym);
    Ok(())
}

fn print_tenant(t: &pb::Tenant) {
    println!(
        "tenant {}  kms key {}  active version {}",
        t.tenant_id, t.kms_key_id, t.active_version
    );
    println!(
        "{:>7}  {:<12}  {:<20}  fingerprint",
        "version", "state", "created (unix ms)"
    );
    for v in &t.versions {
        let state = pb::KeyState::try_from(v.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("KEY_STATE_")
                    .to_lowercase()
            })
            .unwrap_or_else(|_| "unknown".into());
        println!(
            "{:>7}  {:<12}  {:<20}  {}",
            v.version, state, v.created_at_unix_ms, v.fingerprint
        );
    }
}

fn rotation_status_name(s: i32) -> String {
    pb::RotationStatus::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ROTATION_STATUS_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| "unknown".into())
}

async fn rotate_due(addr: &str, dry_run: bool) -> Result<(), CliError> {
    let out = KeysClient::new(connect(addr).await?)
        .check_rotation(pb::CheckRotationRequest { dry_run })
        .await?
        .into_inner();
    println!(
        "policy: rotate after {} days, warn {} days before{}",
        out.max_key_age_days,
        out.warn_days,
        if dry_run {
            " (dry run: nothing rotated)"
        } else {
            ""
        }
    );
    println!(
        "{:<24}  {:>7}  {:>9}  {:<13}  action",
        "tenant", "version", "age days", "status"
    );
    let mut failed = 0;
    for t in &out.tenants {
        let action = if !t.error.is_empty() {
            failed += 1;
            format!("rotation FAILED: {}", t.error)
        } else if t.rotated_to != 0 {
            format!("rotated to v{}", t.rotated_to)
        } else {
            "-".to_owned()
        };
        println!(
            "{:<24}  {:>7}  {:>9.1}  {:<13}  {}",
            t.tenant_id,
            t.active_version,
            t.age_ms as f64 / 86_400_000.0,
            rotation_status_name(t.status),
            action
        );
    }
    if failed > 0 {
        return Err(CliError::Other(anyhow::anyhow!(
            "{failed} tenant(s) could not be rotated"
        )));
    }
    Ok(())
}

async fn rewrap_kms_key(
    addr: &str,
    kms_key_id: String,
    tenant: Option<String>,
) -> Result<(), CliError> {
    let mut c = KeysClient::new(connect(addr).await?);
    let tenants = match tenant {
        Some(t) => vec![t],
        None => {
            c.list_tenants(pb::ListTenantsRequest {})
                .await?
                .into_inner()
                .tenant_ids
        }
    };
    for t in tenants {
        let out = c
            .rewrap_kms_key(pb::RewrapKmsKeyRequest {
                tenant_id: t,
                kms_key_id: kms_key_id.clone(),
            })
            .await?
            .into_inner();
        println!(
            "{}: {} version(s) rewrapped, {} already under {}, {} without material",
            out.tenant_id, out.rewrapped, out.already, out.kms_key_id, out.without_material
        );
    }
    Ok(())
}

pub(super) async fn tenant(cmd: TenantCommand) -> Result<(), CliError> {
    let t = match cmd {
        TenantCommand::RotateDue { target, dry_run } => {
            return rotate_due(&target.addr, dry_run).await;
        }
        TenantCommand::RewrapKmsKey {
            target,
            kms_key_id,
            tenant,
            all: _,
        } => return rewrap_kms_key(&target.addr, kms_key_id, tenant).await,
        TenantCommand::Retire {
            target,
            tenant,
            version,
        } => {
            KeysClient::new(connect(&target.addr).await?)
                .retire_key_version(pb::RetireKeyVersionRequest {
                    tenant_id: tenant,
                    version,
                })
                .await?
        }
        TenantCommand::Create {
            target,
            tenant,
            kms_key_id,
        } => {
            KeysClient::new(connect(&target.addr).await?)
                .create_tenant(CreateTenantRequest {
                    tenant_id: tenant,
                    kms_key_id: kms_key_id.unwrap_or_default(),
                })
                .await?
        }
        TenantCommand::Show { target, tenant } => {
            KeysClient::new(connect(&target.addr).await?)
                .get_tenant(GetTenantRequest { tenant_id: tenant })
                .await?
        }
        TenantCommand::Rotate { target, tenant } => {
            KeysClient::new(connect(&target.addr).await?)
                .rotate_tenant_key(RotateTenantKeyRequest { tenant_id: tenant })
                .await?
        }
    };
    print_tenant(&t.into_inner());
    Ok(())
}
