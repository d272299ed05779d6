//! Small gRPC helpers the tests share: the stable reason code of a refused call and the
//! one-line calls several tests make the same way (creating a tenant).
//!
//! What it does NOT do: build the requests a test is about (each test spells out the
//! fields it checks) or assert anything.

use fieldkey::proto::pb;
use tonic::transport::Channel;

/// The stable reason code of a refused call (the `fieldkey-error` metadata), "" when none.
pub fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get("fieldkey-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// CreateTenant `tenant` on the default KMS key.
pub async fn create_tenant(ch: &Channel, tenant: &str) -> Result<(), tonic::Status> {
    pb::keys_client::KeysClient::new(ch.clone())
        .create_tenant(pb::CreateTenantRequest {
            tenant_id: tenant.into(),
            kms_key_id: String::new(),
        })
        .await
        .map(|_| ())
}
