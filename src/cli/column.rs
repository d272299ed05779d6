//! `fieldkey encrypt --lines` and `fieldkey decrypt --lines`: standard input as a
//! column of values (one per line, optionally `CONTEXT<TAB>VALUE`), sent as
//! EncryptColumn / DecryptColumn calls of `--column-size` values, one result printed
//! per line in order. Ciphertexts are printed and read in the text form (`fk1:`).
//!
//! Does NOT: handle values that contain a newline (one value per line: encode such
//! values first), or retry a call that failed as a whole.

use std::io::Write as _;

use bytes::Bytes;
use tonic::transport::Channel;

use super::client::{CliError, connect, read_stdin};
use super::{ColumnArgs, DecryptArgs, EncryptArgs, Scope};
use crate::proto::pb::{
    CiphertextFormat, ColumnError, DecryptColumnRequest, EncryptColumnRequest,
    crypto_client::CryptoClient,
};

/// Standard input's lines as (context, value), in order.
fn read_lines(scope: &Scope, column: &ColumnArgs) -> Result<Vec<(Bytes, Bytes)>, CliError> {
    let input = Bytes::from(read_stdin()?);
    let default = Bytes::from(scope.context.clone().into_bytes());
    let mut out = Vec::new();
    let mut start = 0;
    while start < input.len() {
        let end = input
            .iter()
            .skip(start)
            .position(|b| *b == b'\n')
            .map_or(input.len(), |p| start + p);
        let mut line = input.slice(start..end);
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        start = end + 1;
        if column.tab_context {
            let tab = line.iter().position(|b| *b == b'\t').ok_or_else(|| {
                CliError::Other(anyhow::anyhow!(
                    "line {}: --tab-context expects CONTEXT<TAB>VALUE",
                    out.len() + 1
                ))
            })?;
            out.push((line.slice(..tab), line.slice(tab + 1..)));
        } else {
            out.push((default.clone(), line));
        }
    }
    Ok(out)
}

/// Prints `results` (one line each) and reports `errors` on standard error, numbered
/// from `first_line`; returns how many failed.
fn print_column(
    results: &[Bytes],
    errors: &[ColumnError],
    first_line: usize,
) -> Result<usize, CliError> {
    let mut stdout = std::io::stdout().lock();
    for r in results {
        stdout
            .write_all(r)
            .and_then(|()| stdout.write_all(b"\n"))
            .map_err(|e| CliError::Other(anyhow::anyhow!("cannot write output: {e}")))?;
    }
    for e in errors {
        let (reason, message) = e
            .error
            .as_ref()
            .map_or(("", ""), |ie| (ie.reason.as_str(), ie.message.as_str()));
        let line = first_line + usize::try_from(e.index).unwrap_or(usize::MAX);
        eprintln!("line {line}: {reason}: {message}");
    }
    Ok(errors.len())
}

fn finish(failed: usize, total: usize) -> Result<(), CliError> {
    if failed > 0 {
        return Err(CliError::Other(anyhow::anyhow!(
            "{failed} of {total} values failed (their lines are empty)"
        )));
    }
    Ok(())
}

fn column_size(column: &ColumnArgs) -> Result<usize, CliError> {
    if column.column_size == 0 {
        return Err(CliError::Other(anyhow::anyhow!(
            "--column-size must be at least 1"
        )));
    }
    Ok(column.column_size)
}

/// Sends standard input's lines as columns of `--column-size` values: `call` makes one
/// request of a chunk's contexts and values and returns the reply's results and errors;
/// prints them, and fails if any value failed.
async fn columns(
    scope: &Scope,
    column: &ColumnArgs,
    addr: &str,
    mut call: impl AsyncFnMut(
        &mut CryptoClient<Channel>,
        Vec<Bytes>,
        Vec<Bytes>,
    ) -> Result<(Vec<Bytes>, Vec<ColumnError>), CliError>,
) -> Result<(), CliError> {
    let size = column_size(column)?;
    let lines = read_lines(scope, column)?;
    let mut c = CryptoClient::new(connect(addr).await?);
    let mut failed = 0;
    for (n, chunk) in lines.chunks(size).enumerate() {
        let contexts = chunk.iter().map(|(c, _)| c.clone()).collect();
        let values = chunk.iter().map(|(_, v)| v.clone()).collect();
        let (results, errors) = call(&mut c, contexts, values).await?;
        failed += print_column(&results, &errors, n * size + 1)?;
    }
    finish(failed, lines.len())
}

pub(super) async fn encrypt(args: EncryptArgs) -> Result<(), CliError> {
    let scope = &args.scope;
    columns(
        scope,
        &args.column,
        &args.target.addr,
        async |c, contexts, plaintexts| {
            let out = c
                .encrypt_column(EncryptColumnRequest {
                    tenant_id: scope.tenant.clone(),
                    field: scope.field.clone(),
                    subject_id: scope.subject.clone(),
                    subject_ids: Vec::new(),
                    contexts,
                    plaintexts,
                    format: CiphertextFormat::Text as i32,
                })
                .await?
                .into_inner();
            Ok((out.ciphertexts, out.errors))
        },
    )
    .await
}

pub(super) async fn decrypt(args: DecryptArgs) -> Result<(), CliError> {
    let scope = &args.scope;
    columns(
        scope,
        &args.column,
        &args.target.addr,
        async |c, contexts, ciphertexts| {
            let out = c
                .decrypt_column(DecryptColumnRequest {
                    tenant_id: scope.tenant.clone(),
                    field: scope.field.clone(),
                    subject_id: scope.subject.clone(),
                    subject_ids: Vec::new(),
                    contexts,
                    ciphertexts,
                    repair: false,
                })
                .await?
                .into_inner();
            Ok((out.plaintexts, out.errors))
        },
    )
    .await
}
