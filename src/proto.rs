//! The wire vocabulary: the protobuf messages and gRPC stubs generated from `proto/`
//! (`fieldkey.v1` as [`pb`], the load generator's echo service as [`echo_pb`]) and the
//! descriptor set that gRPC reflection serves.
//!
//! Both sides of the wire import from here: the handlers in `crate::service` and the
//! command-line clients in `crate::cli`. Does NOT: hold handlers, map errors to
//! statuses (`crate::service::status` does), or add hand-written types to the
//! generated ones. The hand-written pieces are the codec the stubs are generated with
//! ([`codec`]: a request that does not decode is the caller's fault) and the name of
//! the trailer entry that carries a refusal's reason ([`REASON_KEY`]). The modules
//! stay nested (`proto::pb`, `proto::echo_pb`) so that the generated names never mix
//! with one another or with this module's own items.
pub mod codec;

/// The trailer (metadata) entry that names why a call was refused, e.g.
/// `fieldkey-error: KEY_DESTROYED` (the reasons are listed in `proto/`).
pub const REASON_KEY: &str = "fieldkey-error";

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

/// The bare echo service used as the transport floor by the load generator
/// (`benches/loadgen.rs`). Not part of the API; never served by `fieldkey serve`.
#[doc(hidden)]
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
pub mod echo_pb {
    tonic::include_proto!("fieldkey.bench.v1");
}
