//! Small gRPC helpers the tests share: the stable reason code of a refused call, the
//! example identities of `policies/` and how a test calls as one of them, and the
//! one-line calls several tests make the same way (creating a tenant).
//!
//! What it does NOT do: build the requests a test is about (each test spells out the
//! fields it checks) or assert anything.

use fieldkey::proto::pb;
use tonic::transport::Channel;

/// The identities the example policies (`policies/*.cedar`) know, as in
/// `policies/README.md`.
pub mod ids {
    /// `app.cedar`: data operations over the local listener (whose configured identity
    /// it is in the tests, as in the application pod).
    pub const APP: &str = "spiffe://example.org/ns/shop/sa/web";
    /// `analytics.cedar`: Pseudonymize and BlindIndex; Decrypt forbidden.
    pub const ANALYTICS: &str = "spiffe://example.org/ns/analytics/sa/export";
    /// `operators.cedar`: tenants, keys, epochs and jobs.
    pub const OPS: &str = "spiffe://example.org/ns/ops/sa/keyops";
    /// `erasure.cedar`: shredding, restriction, receipts.
    pub const ERASURE: &str = "spiffe://example.org/ns/privacy/sa/erasure";
    /// `auditor.cedar`: audit export and head.
    pub const AUDITOR: &str = "spiffe://example.org/ns/audit/sa/auditor";
    /// Known to no policy.
    pub const STRANGER: &str = "spiffe://example.org/ns/other/sa/unknown";
}

/// A request from `who`: the application calls the local listener as itself (no
/// header: the listener's configured identity); every other identity arrives through
/// the mesh (`l5d-client-id`, trusted by the sidecars the tests start with
/// [`super::sidecar::TRUST_MESH`]).
pub fn as_id<T>(who: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if who != ids::APP
        && let Ok(v) = who.parse()
    {
        r.metadata_mut().insert("l5d-client-id", v);
    }
    r
}

/// The stable reason code of a refused call (the `fieldkey-error` metadata), "" when none.
pub fn reason(s: &tonic::Status) -> String {
    s.metadata()
        .get("fieldkey-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// CreateTenant `tenant` on the default KMS key, as the operator identity.
pub async fn create_tenant(ch: &Channel, tenant: &str) -> Result<(), tonic::Status> {
    pb::keys_client::KeysClient::new(ch.clone())
        .create_tenant(as_id(
            ids::OPS,
            pb::CreateTenantRequest {
                tenant_id: tenant.into(),
                kms_key_id: String::new(),
            },
        ))
        .await
        .map(|_| ())
}
