//! HTTPS for the HTTP API: the gateway's gRPC certificate (`--tls-cert`/`--tls-key`, reloaded like it) on
//! the `--http-listen` address, with HTTP/1.1 and HTTP/2 offered by ALPN.

use std::net::SocketAddr;

use qwen_image_common::tls::ServerTls;
use qwen_image_common::tls::server::TlsConnection;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// TLS connections for `axum::serve` (handshakes run off the accept loop; failed ones are logged and
/// dropped by [`ServerTls::incoming_http`]).
pub struct HttpsListener {
    connections: ReceiverStream<std::io::Result<TlsConnection>>,
    local: SocketAddr,
}

impl HttpsListener {
    pub fn new(listener: TcpListener, tls: &ServerTls) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            connections: tls.incoming_http(listener),
            local,
        })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.connections.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (stream, peer);
                }
                Some(Err(_)) => continue,
                // The accept loop ended (it never does while the listener lives): accept nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
