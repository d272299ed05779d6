//! The KMS stack from the configuration: the provider (`[kms]`), each provider behind
//! its metering and its circuit breakers, and the disaster-recovery pair (`[kms.dr]`)
//! over two such stacks.
//!
//! Does not: decide which key wraps what (the keyring does) or validate ranges (the
//! configuration did).

use std::sync::Arc;

use anyhow::Context as _;

use crate::config::{Config, DrKmsConfig, KmsProvider};
use crate::kms::Kms;
use crate::kms::aws::{AwsKms, AwsKmsConfig};
use crate::kms::local::{KdfParams, LocalKms};
use crate::kms::openbao::OpenBaoKms;
use crate::kms::pkcs11::Pkcs11Kms;

/// The KMS the sidecar uses: the primary (and its DR pair), metered and guarded.
pub(super) async fn build_kms(
    cfg: &Config,
    metrics: Option<&Arc<crate::metrics::Metrics>>,
) -> anyhow::Result<Arc<dyn Kms>> {
    let k = &cfg.kms;
    let primary: Arc<dyn Kms> = match k.provider() {
        KmsProvider::Aws => {
            let key = k
                .aws_key_id
                .clone()
                .context("kms.provider is aws but kms.aws_key_id is not set")?;
            aws(key, k.aws_region.clone(), k.aws_endpoint_url.clone()).await?
        }
        KmsProvider::Local => Arc::new(
            LocalKms::open_or_create(
                &cfg.local_key_file(),
                &super::serve::local_passphrase(&cfg.data_dir)?,
                KdfParams::default(),
            )?
            // Epoch keys live beside the data directory, never in it: restoring a
            // backup of the data directory must not bring a deleted epoch key back.
            .with_keys_dir(&cfg.local_keys_dir())?,
        ),
        KmsProvider::Pkcs11 => {
            let s = k
                .pkcs11
                .as_ref()
                .context("kms.provider is pkcs11 but [kms.pkcs11] is not set")?;
            Arc::new(Pkcs11Kms::open(s).await?)
        }
        KmsProvider::Openbao => {
            let s = k
                .openbao
                .as_ref()
                .context("kms.provider is openbao but [kms.openbao] is not set")?;
            Arc::new(OpenBaoKms::connect(s).await?)
        }
    };
    let primary = guarded(primary, metrics);
    let Some(dr) = &k.dr else {
        return Ok(primary);
    };
    let secondary = guarded(secondary(dr).await?, metrics);
    tracing::info!(
        primary = primary.provider(),
        secondary = secondary.provider(),
        "disaster-recovery KMS configured: keys are wrapped under both"
    );
    Ok(Arc::new(crate::kms::dual::DualKms::new(
        primary,
        secondary,
        dr.key_map.clone().into_iter().collect(),
    )))
}

/// The disaster-recovery KMS of `[kms.dr]`.
async fn secondary(dr: &DrKmsConfig) -> anyhow::Result<Arc<dyn Kms>> {
    match dr.provider {
        KmsProvider::Aws => {
            let key = dr
                .aws_key_id
                .clone()
                .context("kms.dr.provider is aws but kms.dr.aws_key_id is not set")?;
            aws(key, dr.aws_region.clone(), dr.aws_endpoint_url.clone()).await
        }
        KmsProvider::Pkcs11 => {
            let s = dr
                .pkcs11
                .as_ref()
                .context("kms.dr.provider is pkcs11 but [kms.dr.pkcs11] is not set")?;
            Ok(Arc::new(Pkcs11Kms::open(s).await?))
        }
        KmsProvider::Openbao => {
            let s = dr
                .openbao
                .as_ref()
                .context("kms.dr.provider is openbao but [kms.dr.openbao] is not set")?;
            Ok(Arc::new(OpenBaoKms::connect(s).await?))
        }
        KmsProvider::Local => anyhow::bail!("kms.dr.provider local is not a disaster-recovery KMS"),
    }
}

async fn aws(
    key: String,
    region: Option<String>,
    endpoint: Option<String>,
) -> anyhow::Result<Arc<dyn Kms>> {
    let mut c = AwsKmsConfig::new(key);
    c.region = region;
    c.endpoint_url = endpoint;
    Ok(Arc::new(AwsKms::new(c).await?))
}

/// A provider behind its metering and, outside that (so the metrics count the calls
/// that reached the KMS), a breaker per KMS key: while the KMS is down, calls fail at
/// once and one probe at a time finds out when it is back.
fn guarded(kms: Arc<dyn Kms>, metrics: Option<&Arc<crate::metrics::Metrics>>) -> Arc<dyn Kms> {
    let kms: Arc<dyn Kms> = match metrics {
        Some(m) => Arc::new(crate::metrics::MeteredKms::new(kms, m.clone())),
        None => kms,
    };
    Arc::new(crate::kms::guarded::GuardedKms::new(kms))
}
