//! The server side: a reloadable `rustls::ServerConfig` (certificate, key, optional client CA) and the
//! stream of TLS connections tonic serves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use super::files;
use super::reload::{Reloadable, WatchGuard};

/// A server-side TLS connection.
pub type TlsConnection = TlsStream<TcpStream>;

/// How long a client may take to complete its TLS handshake before the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server's TLS identity and, with a client CA, its requirement of client certificates.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Reloadable<ServerConfig>,
    /// Client certificates are required (mutual TLS).
    pub mutual: bool,
}

impl ServerTls {
    /// Loads `cert` (PEM chain, leaf first) and `key`; with `client_ca`, every client must present a
    /// certificate signed by it.
    pub fn load(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> Result<Self, String> {
        let mutual = client_ca.is_some();
        let mut paths = vec![cert, key];
        paths.extend(client_ca);
        let config = Reloadable::load("server certificate", paths, |snapshot| {
            let (cert_path, cert_pem) = snapshot.file(0);
            let (key_path, key_pem) = snapshot.file(1);
            let chain = files::certs(cert_path, cert_pem)?;
            let key = files::key(key_path, key_pem)?;
            let builder = ServerConfig::builder_with_provider(super::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS protocol versions: {e}"))?;
            let builder = if snapshot.files.len() > 2 {
                let (ca_path, ca_pem) = snapshot.file(2);
                let roots = files::roots(ca_path, ca_pem)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), super::provider())
                        .build()
                        .map_err(|e| format!("{}: {e}", ca_path.display()))?;
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            let mut config = builder.with_single_cert(chain, key).map_err(|e| {
                format!(
                    "{} and {} do not make a usable certificate and key: {e}",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
            config.alpn_protocols = vec![super::ALPN_H2.to_vec()];
            Ok(config)
        })?;
        Ok(Self { config, mutual })
    }

    /// The config the next handshake uses.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.current()
    }

    /// Re-reads the files now (what SIGHUP does).
    pub fn reload(&self) -> Result<(), String> {
        self.config.reload(true).map(|_| ())
    }

    /// Reloads on SIGHUP and file changes while the guard lives.
    pub fn watch(&self) -> WatchGuard {
        self.config.watch()
    }

    /// The TLS connections accepted on `listener`: each handshake runs on its own task (a slow client
    /// never holds up the others) with the config current at its start; failed handshakes are logged
    /// and dropped. Ends when the stream is dropped (the server stopped).
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<TlsConnection>> {
        self.accept_loop(listener, None)
    }

    /// As [`ServerTls::incoming`], offering HTTP/1.1 beside HTTP/2 (the gateway's HTTP API).
    pub fn incoming_http(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<TlsConnection>> {
        self.accept_loop(
            listener,
            Some(vec![super::ALPN_H2.to_vec(), b"http/1.1".to_vec()]),
        )
    }

    /// The accept loop; `alpn` replaces the config's protocols (gRPC: h2 only).
    fn accept_loop(
        &self,
        listener: TcpListener,
        alpn: Option<Vec<Vec<u8>>>,
    ) -> ReceiverStream<std::io::Result<TlsConnection>> {
        let (tx, rx) = mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // As `transport::incoming` does for plaintext: no Nagle delay, TCP keepalive.
                let _ = tcp.set_nodelay(true);
                let keepalive =
                    socket2::TcpKeepalive::new().with_time(crate::transport::TCP_KEEPALIVE);
                let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
                let config = match &alpn {
                    Some(protocols) => {
                        let mut c = (*tls.current()).clone();
                        c.alpn_protocols = protocols.clone();
                        Arc::new(c)
                    }
                    None => tls.current(),
                };
                let (acceptor, tx) = (tokio_rustls::TlsAcceptor::from(config), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}
