//! fieldkey: field-level encryption and key management for multi-tenant applications.
//!
//! The crate is a library with a thin binary on top. Data flows one way:
//! `service -> keyring -> (crypto, cache, kms, store)`; see `docs/ARCHITECTURE.md`.
//!
//! - [`crypto`]: the v1 envelope, XAES-256-GCM, HKDF derivations (pure, no I/O).
//! - [`kms`]: wrapping and unwrapping of tenant keys (local dev KMS, AWS KMS).
//! - [`store`]: durable wrapped key material and key states (SQLite, PostgreSQL).
//! - [`cache`]: the hot-key cache of unwrapped keys.
//! - [`keyring`]: the one place that decides which key encrypts and which may decrypt.
//! - [`error`]: the keyring's error enum.
#![forbid(unsafe_code)]

pub mod audit;
pub mod breaker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod epochs;
pub mod erasure;
pub mod error;
pub mod harden;
pub mod jobs;
pub mod keyring;
pub mod kms;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod proto;
pub mod report;
pub mod service;
pub mod signing;
pub mod store;
pub mod transport;
pub mod wiring;

pub use error::{Error, Result};
pub use keyring::{Keyring, KeyringConfig};
