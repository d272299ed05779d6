//! The wire vocabulary: the protobuf messages and gRPC stubs generated from `proto/`
//! (`fieldkey.v1` as [`pb`], the load generator's echo service as [`echo_pb`]) and the
//! descriptor set that gRPC reflection serves.
//!
//! Both sides of the wire import from here: the handlers in `crate::service` and the
//! command-line clients in `crate::cli`. Does NOT: hold handlers, map errors to
//! statuses (`crate::service::status` does), or add hand-written types to the
//! generated ones. The modules stay nested (`proto::pb`, `proto::echo_pb`) so that the
//! generated names never mix with one another or with this module's own items.
// Everything below is generated (or, for the descriptor set, included) code.
#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "generated code"
)]

/// Generated protobuf and gRPC code for `fieldkey.v1`.
pub mod pb {
    tonic::include_proto!("fieldkey.v1");

    /// Encoded descriptor set of the API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/fieldkey_descriptor.bin"));
}

/// The bare echo service used as the transport floor by the load generator
/// (`benches/loadgen.rs`). Not part of the API; never served by `fieldkey serve`.
#[doc(hidden)]
pub mod echo_pb {
    tonic::include_proto!("fieldkey.bench.v1");
}
