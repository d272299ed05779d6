//! The `[listen]` section: which listeners serve gRPC, and which one sits behind the
//! pod's Linkerd proxy (the only place `l5d-client-id` may name a caller).

use std::path::PathBuf;

use serde::Deserialize;

use super::{AuthzSettings, ConfigError};

/// Where the sidecar listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Plaintext gRPC on TCP; keep it on loopback (the application in the same pod),
    /// unless it is declared behind the Linkerd proxy.
    pub tcp: Option<String>,
    /// The `tcp` listener sits behind the pod's Linkerd proxy: only connections from
    /// inside the pod (the proxy's) are served there, and `l5d-client-id` names the
    /// caller when `authz.trust_linkerd_identity` is on. Linkerd 2.11 and later forward
    /// to the pod's own address, not to loopback, so such a listener binds the pod
    /// address (or `0.0.0.0`); fieldkey itself refuses callers from outside the pod.
    pub tcp_behind_linkerd: bool,
    /// Plaintext gRPC on a Unix socket.
    pub unix: Option<PathBuf>,
    /// mTLS gRPC for remote callers (admin, erasure workflow, jobs).
    pub mtls: Option<crate::transport::mtls::MtlsConfig>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            tcp: Some("127.0.0.1:7450".into()),
            tcp_behind_linkerd: false,
            unix: None,
            mtls: None,
        }
    }
}

impl ListenConfig {
    /// At least one listener; the Linkerd declaration names a TCP listener; trusting
    /// `l5d-client-id` needs a listener declared behind the proxy.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub(super) fn validate(&self, authz: &AuthzSettings) -> Result<(), ConfigError> {
        if self.tcp.is_none() && self.unix.is_none() && self.mtls.is_none() {
            return Err(ConfigError::Invalid(
                "configure at least one listener (listen.tcp, listen.unix or listen.mtls)".into(),
            ));
        }
        if self.tcp_behind_linkerd && self.tcp.is_none() {
            return Err(ConfigError::Invalid(
                "listen.tcp_behind_linkerd declares the listen.tcp listener, which is not configured"
                    .into(),
            ));
        }
        if authz.trust_linkerd_identity && !self.tcp_behind_linkerd {
            return Err(ConfigError::Invalid(
                "authz.trust_linkerd_identity needs a listener declared behind the Linkerd proxy \
                 (listen.tcp_behind_linkerd = true): l5d-client-id is honoured nowhere else"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn check(toml: &str) -> Result<(), String> {
        let c: Config = toml::from_str(toml).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())
    }

    // Review finding 2 (issue 19): trusting l5d-client-id was possible with no listener
    // declared behind the proxy (the header was honoured on every plaintext listener).
    #[test]
    fn trusting_the_linkerd_header_needs_a_declared_mesh_listener() {
        let e = check("[authz]\ntrust_linkerd_identity = true\n").unwrap_err();
        assert!(e.contains("listen.tcp_behind_linkerd"), "{e}");
        check("[listen]\ntcp = \"0.0.0.0:7450\"\ntcp_behind_linkerd = true\n[authz]\ntrust_linkerd_identity = true\n").unwrap();
        // Declared without trust: allowed (the listener still refuses outsiders).
        check("[listen]\ntcp_behind_linkerd = true\n").unwrap();
        // Nothing to declare.
        let mut c = Config::default();
        c.listen.tcp = None;
        c.listen.unix = Some("/tmp/x.sock".into());
        c.listen.tcp_behind_linkerd = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not configured"), "{e}");
    }
}
