//! Transport security: rustls (ring provider) on every gRPC hop.
//!
//! - Servers ([`server`]): `--tls-cert`/`--tls-key`, and `--tls-client-ca` to require client certificates
//!   (mutual TLS). Handshakes run in our own accept loop (tokio-rustls) whose connections tonic serves with
//!   `serve_with_incoming`, so every handshake reads the *current* `rustls::ServerConfig`.
//! - The gateway's stage clients ([`client`]): `--stage-ca`, `--stage-client-cert`, `--stage-client-key`,
//!   through a custom connector that also reads the current `rustls::ClientConfig` on every dial.
//! - Reload ([`reload`]): on SIGHUP, and when the files' contents change (checked every
//!   [`reload::POLL_INTERVAL`]), the configs are rebuilt and swapped; connections already open keep the
//!   session they negotiated, so calls in flight are not dropped. A bad new set of files (a certificate
//!   whose key has not been written yet) is logged and the previous config stays.
//! - [`serve`]: one server on its listener, over TLS or not, and the plaintext health-only listener
//!   (`--health-listen`) for the kubelet's gRPC probes, which cannot speak TLS.

pub mod args;
pub mod client;
pub mod files;
pub mod reload;
pub mod serve;
pub mod server;

pub use args::{ServerTlsArgs, StageClientTlsArgs};
pub use client::StageClientTls;
pub use serve::{Listeners, serve};
pub use server::ServerTls;

/// The ALPN protocol every hop negotiates (gRPC is HTTP/2 only).
pub const ALPN_H2: &[u8] = b"h2";

/// The crypto provider of every TLS config we build (the same as tonic's `tls-ring`).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider(),
    )
}
