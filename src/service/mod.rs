//! gRPC handlers: translate requests into keyring calls and errors into statuses.
//!
//! Owns: the generated protobuf types ([`pb`]), the `Crypto` and `Keys` services, the
//! health and reflection services, and the single error mapping ([`status`]). Must not:
//! hold keys, decide key use (the keyring does), or log plaintext.

pub mod status;

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroize as _;

use crate::crypto::{Aad, Envelope, to_text};
use crate::error::Error;
use crate::keyring::{Keyring, TenantInfo};
use crate::store::KeyState;

/// Generated protobuf and gRPC code for `fieldkey.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "generated code"
)]
pub mod pb {
    tonic::include_proto!("fieldkey.v1");

    /// Encoded descriptor set of the API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/fieldkey_descriptor.bin"));
}

use pb::{
    CiphertextFormat, CreateTenantRequest, DecryptBatchRequest, DecryptBatchResponse,
    DecryptRequest, DecryptResponse, DecryptResult, EncryptBatchRequest, EncryptBatchResponse,
    EncryptRequest, EncryptResponse, EncryptResult, GetTenantRequest, ItemError,
    RotateTenantKeyRequest, decrypt_result, encrypt_result,
};

fn subject(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn item_error(e: &Error) -> ItemError {
    let (code, reason) = status::classify(e);
    ItemError {
        code: code as i32,
        reason: reason.to_owned(),
        message: status::public_message(e, code),
    }
}

/// The `fieldkey.v1.Crypto` service.
#[derive(Debug, Clone)]
pub struct CryptoService {
    keyring: Arc<Keyring>,
}

impl CryptoService {
    /// A service over `keyring`.
    pub fn new(keyring: Arc<Keyring>) -> Self {
        Self { keyring }
    }

    async fn encrypt_one(&self, mut r: EncryptRequest) -> Result<EncryptResponse, Error> {
        let aad = Aad {
            tenant: &r.tenant_id,
            subject: subject(&r.subject_id),
            field: &r.field,
            context: &r.context,
        };
        let result = self.keyring.encrypt(&aad, &r.plaintext).await;
        r.plaintext.zeroize();
        let env = result?;
        let key_version = Envelope::parse(&env)?.key_version();
        let ciphertext = if r.format == CiphertextFormat::Text as i32 {
            to_text(&env).into_bytes()
        } else {
            env
        };
        Ok(EncryptResponse {
            ciphertext,
            key_version,
        })
    }

    async fn decrypt_one(&self, r: DecryptRequest) -> Result<DecryptResponse, Error> {
        let aad = Aad {
            tenant: &r.tenant_id,
            subject: subject(&r.subject_id),
            field: &r.field,
            context: &r.context,
        };
        let pt = self.keyring.decrypt(&aad, &r.ciphertext).await?;
        let key_version = crate::crypto::decode_any(&r.ciphertext)
            .ok()
            .and_then(|b| Envelope::parse(&b).ok().map(|e| e.key_version()))
            .unwrap_or(0);
        Ok(DecryptResponse {
            plaintext: pt.to_vec(),
            key_version,
        })
    }
}

#[tonic::async_trait]
impl pb::crypto_server::Crypto for CryptoService {
    async fn encrypt(
        &self,
        req: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        self.encrypt_one(req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| status::to_status(&e))
    }

    async fn decrypt(
        &self,
        req: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        self.decrypt_one(req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| status::to_status(&e))
    }

    async fn encrypt_batch(
        &self,
        req: Request<EncryptBatchRequest>,
    ) -> Result<Response<EncryptBatchResponse>, Status> {
        let items = req.into_inner().items;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match self.encrypt_one(item).await {
                Ok(ok) => encrypt_result::Result::Ok(ok),
                Err(e) => encrypt_result::Result::Error(item_error(&e)),
            };
            results.push(EncryptResult {
                result: Some(result),
            });
        }
        Ok(Response::new(EncryptBatchResponse { results }))
    }

    async fn decrypt_batch(
        &self,
        req: Request<DecryptBatchRequest>,
    ) -> Result<Response<DecryptBatchResponse>, Status> {
        let items = req.into_inner().items;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = match self.decrypt_one(item).await {
                Ok(ok) => decrypt_result::Result::Ok(ok),
                Err(e) => decrypt_result::Result::Error(item_error(&e)),
            };
            results.push(DecryptResult {
                result: Some(result),
            });
        }
        Ok(Response::new(DecryptBatchResponse { results }))
    }
}

/// The `fieldkey.v1.Keys` administration service.
#[derive(Debug, Clone)]
pub struct KeysService {
    keyring: Arc<Keyring>,
}

impl KeysService {
    /// A service over `keyring`.
    pub fn new(keyring: Arc<Keyring>) -> Self {
        Self { keyring }
    }
}

fn key_state(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Active => pb::KeyState::Active,
        KeyState::DecryptOnly => pb::KeyState::DecryptOnly,
        KeyState::Suspended => pb::KeyState::Suspended,
        KeyState::Destroyed => pb::KeyState::Destroyed,
    }
}

fn tenant_pb(t: TenantInfo) -> pb::Tenant {
    pb::Tenant {
        active_version: t.active_version().unwrap_or(0),
        tenant_id: t.tenant_id,
        kms_key_id: t.kms_key_id,
        created_at_unix_ms: t.created_at,
        versions: t
            .versions
            .into_iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                state: key_state(v.state) as i32,
                kms_key_id: v.kms_key_id,
                fingerprint: v.fingerprint.to_string(),
                created_at_unix_ms: v.created_at,
                updated_at_unix_ms: v.updated_at,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::keys_server::Keys for KeysService {
    async fn create_tenant(
        &self,
        req: Request<CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let r = req.into_inner();
        let kms_key = (!r.kms_key_id.is_empty()).then_some(r.kms_key_id.as_str());
        self.keyring
            .create_tenant(&r.tenant_id, kms_key)
            .await
            .map(|t| Response::new(tenant_pb(t)))
            .map_err(|e| status::to_status(&e))
    }

    async fn get_tenant(
        &self,
        req: Request<GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.keyring
            .tenant(&req.into_inner().tenant_id)
            .await
            .map(|t| Response::new(tenant_pb(t)))
            .map_err(|e| status::to_status(&e))
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.keyring
            .rotate_tenant(&req.into_inner().tenant_id)
            .await
            .map(|t| Response::new(tenant_pb(t)))
            .map_err(|e| status::to_status(&e))
    }
}

/// The full set of gRPC services: Crypto, Keys, standard health and reflection.
///
/// # Errors
/// Only if the embedded descriptor set is invalid (a build error).
pub async fn routes(keyring: Arc<Keyring>) -> Result<tonic::service::Routes, Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<pb::crypto_server::CryptoServer<CryptoService>>()
        .await;
    reporter
        .set_serving::<pb::keys_server::KeysServer<KeysService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection descriptor: {e}")))?;
    Ok(
        tonic::service::Routes::new(pb::crypto_server::CryptoServer::new(CryptoService::new(
            keyring.clone(),
        )))
        .add_service(pb::keys_server::KeysServer::new(KeysService::new(keyring)))
        .add_service(health)
        .add_service(reflection),
    )
}
