//! gRPC handlers: translate requests into keyring calls and errors into statuses.
//!
//! One file per gRPC service (`crypto` with `index` and `column`, `keys`, `jobs`, `erasure`,
//! `audit`); the shared edge around them: who is calling and the audit trail (`gate`),
//! the admit-and-audit wrappers every handler runs through (`call`), the limits
//! (`guard`), the single error mapping (`status`), and the wiring (`context`). The
//! generated protobuf types are in `crate::proto`. Must not: hold keys, decide key use
//! (the keyring does), or log plaintext.

pub mod audit;
mod call;
mod column;
mod context;
mod crypto;
pub mod erasure;
pub mod gate;
mod guard;
mod index;
mod jobs;
mod keys;
mod screen;
pub mod status;

pub use context::{Context, routes};
pub use crypto::CryptoService;
pub use guard::Guard;
pub use keys::KeysService;
