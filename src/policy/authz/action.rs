//! The actions a policy can name: one per RPC of the `fieldkey.v1` API, batch RPCs
//! folded into their single-item action (a batch is authorized item by item).

use std::fmt;

/// Which resource the service passes for an action (see [`super::AuthzRequest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A field of a tenant: `Field::"tenant/field"` (in `Tenant::"tenant"`).
    Field,
    /// A tenant: `Tenant::"acme"`.
    Tenant,
    /// A tenant if the request names one (a filter), else the service.
    TenantOrService,
    /// The service as a whole: `Service::"fieldkey"`.
    Service,
}

macro_rules! actions {
    ($( $variant:ident => $service:literal, $method:literal, $scope:ident, $doc:literal; )*) => {
        /// An action, named in policies as `Action::"<Service>::<Method>"`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Action {
            $( #[doc = $doc] $variant, )*
        }

        impl Action {
            /// Every action, in declaration order.
            pub const ALL: &'static [Action] = &[ $( Action::$variant, )* ];

            /// The policy name, e.g. `"Crypto::Encrypt"`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Action::$variant => concat!($service, "::", $method), )*
                }
            }

            /// The gRPC service (without package), e.g. `"Crypto"`; also the name of
            /// the action group that contains the action (`Action::"Crypto"`).
            pub fn service(self) -> &'static str {
                match self {
                    $( Action::$variant => $service, )*
                }
            }

            /// The gRPC method of the single-item RPC, e.g. `"Encrypt"`.
            pub fn method(self) -> &'static str {
                match self {
                    $( Action::$variant => $method, )*
                }
            }

            /// Which resource the service passes for this action.
            pub fn scope(self) -> Scope {
                match self {
                    $( Action::$variant => Scope::$scope, )*
                }
            }

            /// Parses a policy name such as `"Crypto::Encrypt"`.
            pub fn parse(name: &str) -> Option<Action> {
                match name {
                    $( concat!($service, "::", $method) => Some(Action::$variant), )*
                    _ => None,
                }
            }

            fn from_single(service: &str, method: &str) -> Option<Action> {
                match (service, method) {
                    $( ($service, $method) => Some(Action::$variant), )*
                    _ => None,
                }
            }
        }
    };
}

actions! {
    Encrypt => "Crypto", "Encrypt", Field, "Encrypt a value (also each item of `EncryptBatch`, and `EncryptColumn`).";
    Decrypt => "Crypto", "Decrypt", Field, "Decrypt a value (also each item of `DecryptBatch`, and `DecryptColumn`).";
    Rewrap => "Crypto", "Rewrap", Field, "Re-encrypt a ciphertext under the active key (also each item of `RewrapBatch`, and `RewrapColumn`).";
    BlindIndex => "Crypto", "BlindIndex", Field, "Compute a blind index (also each item of `BlindIndexBatch`, and `BlindIndexColumn`).";
    Pseudonymize => "Crypto", "Pseudonymize", Field, "Compute a pseudonym (also each item of `PseudonymizeBatch`); the resource's field is the purpose.";
    CreateTenant => "Keys", "CreateTenant", Tenant, "Create a tenant and its first key version.";
    GetTenant => "Keys", "GetTenant", Tenant, "Read a tenant's key versions and states.";
    RotateTenantKey => "Keys", "RotateTenantKey", Tenant, "Rotate a tenant's key.";
    ListTenants => "Keys", "ListTenants", Service, "List tenant ids.";
    CheckRotation => "Keys", "CheckRotation", Service, "Check (and optionally rotate) keys against the rotation policy.";
    RewrapKmsKey => "Keys", "RewrapKmsKey", Tenant, "Rewrap a tenant's key versions under another KMS key.";
    RetireKeyVersion => "Keys", "RetireKeyVersion", Tenant, "Retire a key version no ciphertext needs.";
    WhoAmI => "Keys", "WhoAmI", Service, "Report the caller's identity and transport.";
    RollEpoch => "Keys", "RollEpoch", Service, "Roll the key store to a new key epoch (or finish a roll).";
    GetEpochStatus => "Keys", "GetEpochStatus", Service, "Read the key epochs and the backup horizon.";
    ListJobs => "Jobs", "ListJobs", Service, "List re-encryption jobs.";
    GetJob => "Jobs", "GetJob", Service, "Read one job.";
    WatchJob => "Jobs", "WatchJob", Service, "Stream a job's progress.";
    PauseJob => "Jobs", "PauseJob", Service, "Pause a job.";
    ResumeJob => "Jobs", "ResumeJob", Service, "Resume a paused job.";
    CancelJob => "Jobs", "CancelJob", Service, "Cancel a job.";
    ShredSubject => "Erasures", "ShredSubject", Tenant, "Request the erasure of a subject's key.";
    ShredTenant => "Erasures", "ShredTenant", Tenant, "Request the erasure of a whole tenant.";
    CancelErasure => "Erasures", "CancelErasure", TenantOrService, "Cancel a pending erasure (authorized against the erasure's tenant).";
    GetErasure => "Erasures", "GetErasure", TenantOrService, "Read one erasure and its receipt (authorized against the erasure's tenant).";
    ListErasures => "Erasures", "ListErasures", TenantOrService, "List erasures (optionally of one tenant).";
    SuspendSubject => "Erasures", "SuspendSubject", Tenant, "Restrict a subject's key (GDPR Art. 18).";
    ResumeSubject => "Erasures", "ResumeSubject", Tenant, "Lift a subject's restriction.";
    SuspendTenant => "Erasures", "SuspendTenant", Tenant, "Restrict a whole tenant (`SuspendSubject` without a subject).";
    ResumeTenant => "Erasures", "ResumeTenant", Tenant, "Lift a whole tenant's restriction (`ResumeSubject` without a subject).";
    GetReceiptKey => "Erasures", "GetReceiptKey", Service, "Read the public key that verifies erasure receipts.";
    ExportAudit => "Audit", "ExportAudit", Service, "Export audit records.";
    GetAuditHead => "Audit", "GetAuditHead", Service, "Read the audit chain's head (signed checkpoint).";
    GetComplianceReport => "Audit", "GetComplianceReport", TenantOrService, "Read the compliance evidence report (every tenant, or one).";
}

/// The gRPC package prefix of the services.
const PACKAGE: &str = "fieldkey.v1.";

impl Action {
    /// The action guarding an RPC. `service` may carry the package
    /// (`"fieldkey.v1.Crypto"`) or not (`"Crypto"`). Batch methods map to their
    /// single-item action (`EncryptBatch` and `EncryptColumn` → [`Action::Encrypt`]): the
    /// service authorizes each item (each column once: one tenant and field). `None` for an unknown RPC (which the caller must refuse).
    pub fn from_rpc(service: &str, method: &str) -> Option<Action> {
        let service = service.strip_prefix(PACKAGE).unwrap_or(service);
        let single = match (service, method) {
            ("Crypto", "EncryptBatch") => "Encrypt",
            ("Crypto", "DecryptBatch") => "Decrypt",
            ("Crypto", "RewrapBatch") => "Rewrap",
            ("Crypto", "BlindIndexBatch") => "BlindIndex",
            ("Crypto", "PseudonymizeBatch") => "Pseudonymize",
            ("Crypto", "EncryptColumn") => "Encrypt",
            ("Crypto", "DecryptColumn") => "Decrypt",
            ("Crypto", "RewrapColumn") => "Rewrap",
            ("Crypto", "BlindIndexColumn") => "BlindIndex",
            _ => method,
        };
        Action::from_single(service, single)
    }

    /// The action guarding a gRPC request path such as `/fieldkey.v1.Crypto/Encrypt`
    /// (what a tower layer sees in the HTTP/2 `:path`).
    pub fn from_path(path: &str) -> Option<Action> {
        let rest = path.strip_prefix('/')?;
        let (service, method) = rest.split_once('/')?;
        Action::from_rpc(service, method)
    }

    /// Whether `method` of `service` is a batch RPC (item batches are authorized per
    /// item, columns once for all their values: one tenant and field).
    pub fn is_batch_rpc(method: &str) -> bool {
        matches!(
            method,
            "EncryptBatch"
                | "DecryptBatch"
                | "RewrapBatch"
                | "BlindIndexBatch"
                | "PseudonymizeBatch"
                | "EncryptColumn"
                | "DecryptColumn"
                | "RewrapColumn"
                | "BlindIndexColumn"
        )
    }

    /// Position in [`Action::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indices_match_all() {
        assert_eq!(Action::ALL.len(), 34);
        for (i, a) in Action::ALL.iter().enumerate() {
            assert_eq!(a.index(), i);
            assert_eq!(Action::parse(a.as_str()), Some(*a));
            assert_eq!(a.as_str(), format!("{}::{}", a.service(), a.method()));
            assert_eq!(Action::from_rpc(a.service(), a.method()), Some(*a));
            assert_eq!(
                Action::from_rpc(&format!("fieldkey.v1.{}", a.service()), a.method()),
                Some(*a)
            );
        }
        assert_eq!(Action::Encrypt.as_str(), "Crypto::Encrypt");
        assert_eq!(Action::WhoAmI.to_string(), "Keys::WhoAmI");
    }

    #[test]
    fn batch_rpcs_map_to_their_item_action_and_unknown_rpcs_to_none() {
        assert_eq!(
            Action::from_rpc("Crypto", "EncryptBatch"),
            Some(Action::Encrypt)
        );
        assert_eq!(
            Action::from_rpc("fieldkey.v1.Crypto", "DecryptBatch"),
            Some(Action::Decrypt)
        );
        assert_eq!(
            Action::from_rpc("Crypto", "RewrapBatch"),
            Some(Action::Rewrap)
        );
        assert_eq!(
            Action::from_rpc("Crypto", "BlindIndexBatch"),
            Some(Action::BlindIndex)
        );
        assert_eq!(
            Action::from_rpc("Crypto", "PseudonymizeBatch"),
            Some(Action::Pseudonymize)
        );
        assert_eq!(
            Action::from_rpc("Crypto", "DecryptColumn"),
            Some(Action::Decrypt)
        );
        assert_eq!(
            Action::from_rpc("Crypto", "BlindIndexColumn"),
            Some(Action::BlindIndex)
        );
        assert!(Action::is_batch_rpc("EncryptColumn"));
        assert!(Action::is_batch_rpc("PseudonymizeBatch"));
        assert!(Action::is_batch_rpc("DecryptBatch"));
        assert!(!Action::is_batch_rpc("Decrypt"));
        assert_eq!(
            Action::from_path("/fieldkey.v1.Erasures/ShredSubject"),
            Some(Action::ShredSubject)
        );
        assert_eq!(Action::from_rpc("Keys", "Encrypt"), None);
        assert_eq!(Action::from_rpc("Crypto", "EncryptBatchX"), None);
        assert_eq!(Action::from_rpc("other.v1.Crypto", "Encrypt"), None);
        assert_eq!(Action::from_path("fieldkey.v1.Crypto/Encrypt"), None);
        assert_eq!(Action::from_path("/grpc.health.v1.Health/Check"), None);
        assert_eq!(Action::parse("Crypto::encrypt"), None);
    }
}
