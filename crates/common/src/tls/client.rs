//! The gateway's stage clients over TLS: a reloadable `rustls::ClientConfig` (the CA that signed the
//! stages' certificates and, for mutual TLS, the gateway's client certificate) and a connector that dials
//! with the config current at each (re)connection.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::Channel;

use super::files;
use super::reload::{Reloadable, WatchGuard};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the gateway verifies its stages and, for mutual TLS, proves who it is.
#[derive(Debug, Clone)]
pub struct StageClientTls {
    config: Reloadable<ClientConfig>,
}

impl StageClientTls {
    /// Trusts the CA bundle `ca`; with `identity` (certificate chain, key), presents it to the stages.
    pub fn load(ca: PathBuf, identity: Option<(PathBuf, PathBuf)>) -> Result<Self, String> {
        let mut paths = vec![ca];
        if let Some((cert, key)) = identity {
            paths.extend([cert, key]);
        }
        let config = Reloadable::load("stage client", paths, |snapshot| {
            let (ca_path, ca_pem) = snapshot.file(0);
            let roots = files::roots(ca_path, ca_pem)?;
            let builder = ClientConfig::builder_with_provider(super::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS protocol versions: {e}"))?
                .with_root_certificates(roots);
            let mut config = if snapshot.files.len() > 1 {
                let (cert_path, cert_pem) = snapshot.file(1);
                let (key_path, key_pem) = snapshot.file(2);
                let chain = files::certs(cert_path, cert_pem)?;
                let key = files::key(key_path, key_pem)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "{} and {} do not make a usable certificate and key: {e}",
                        cert_path.display(),
                        key_path.display()
                    )
                })?
            } else {
                builder.with_no_client_auth()
            };
            config.alpn_protocols = vec![super::ALPN_H2.to_vec()];
            Ok(config)
        })?;
        Ok(Self { config })
    }

    /// Reloads on SIGHUP and file changes while the guard lives.
    pub fn watch(&self) -> WatchGuard {
        self.config.watch()
    }
}

/// A lazily connected channel to a stage at `uri`: `https://` with `tls` (the stage's certificate must
/// name `server_name`, else the URL's host: a replica found by DNS is dialled at its address but verified
/// against the DNS name it was resolved from), `http://` without. A scheme that does not match the TLS
/// settings is refused, so that a missing flag never silently downgrades a hop to plaintext.
pub fn channel(
    uri: &str,
    tls: Option<&StageClientTls>,
    server_name: Option<&str>,
) -> Result<Channel, String> {
    let parsed: Uri = uri
        .parse()
        .map_err(|e| format!("`{uri}` is not a valid URL: {e}"))?;
    match (parsed.scheme_str(), tls) {
        (Some("http"), None) => Ok(crate::transport::endpoint(uri)?.connect_lazy()),
        (Some("https"), Some(tls)) => {
            let host = match server_name {
                Some(name) => name,
                None => parsed
                    .host()
                    .ok_or_else(|| format!("`{uri}` has no host"))?,
            }
            .trim_start_matches('[')
            .trim_end_matches(']');
            let server_name = ServerName::try_from(host.to_string())
                .map_err(|e| format!("`{uri}`: `{host}` is not a DNS name or IP address: {e}"))?;
            // The channel dials plain TCP (`http://`) through the connector, which adds TLS; requests
            // still carry the `https` origin.
            let authority = parsed
                .authority()
                .ok_or_else(|| format!("`{uri}` has no host"))?;
            let endpoint =
                crate::transport::endpoint(&format!("http://{authority}"))?.origin(parsed.clone());
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http.set_keepalive(Some(crate::transport::TCP_KEEPALIVE));
            http.set_connect_timeout(Some(crate::transport::CONNECT_TIMEOUT));
            let connector = TlsConnector {
                http,
                tls: tls.clone(),
                server_name,
            };
            Ok(endpoint.connect_with_connector_lazy(connector))
        }
        (Some("https"), None) => Err(format!(
            "`{uri}` is https:// but no --stage-ca was given to verify the stage's certificate"
        )),
        (Some("http"), Some(_)) => Err(format!(
            "`{uri}` is plaintext http:// but stage TLS is configured (--stage-ca): use https://"
        )),
        _ => Err(format!("`{uri}`: use an http:// or https:// URL")),
    }
}

/// TCP, then a TLS handshake with the current client config; HTTP/2 must be negotiated.
#[derive(Clone)]
struct TlsConnector {
    http: HttpConnector,
    tls: StageClientTls,
    server_name: ServerName<'static>,
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connect = self.http.call(uri);
        let config: Arc<ClientConfig> = self.tls.config.current();
        let name = self.server_name.clone();
        Box::pin(async move {
            let tcp = connect.await?.into_inner();
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            if stream.get_ref().1.alpn_protocol() != Some(super::ALPN_H2) {
                return Err("the stage did not negotiate HTTP/2 (ALPN h2) over TLS".into());
            }
            Ok(TokioIo::new(stream))
        })
    }
}

/// A client endpoint for `url` (the CLI and tools towards the gateway): `https://` verified against the
/// PEM CA bundle `ca`, or the system's roots without one; `http://` is plaintext (then `ca` is refused,
/// so that a forgotten `https://` does not silently send in clear).
pub fn endpoint(
    url: &str,
    ca: Option<&std::path::Path>,
) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = crate::transport::endpoint(url)?;
    let https = endpoint.uri().scheme_str() == Some("https");
    match (https, ca) {
        (false, None) => Ok(endpoint),
        (false, Some(_)) => Err(format!(
            "`{url}` is plaintext http:// but a CA certificate was given: use https://"
        )),
        (true, ca) => {
            let tls = tonic::transport::ClientTlsConfig::new();
            let tls = match ca {
                Some(path) => {
                    tls.ca_certificate(tonic::transport::Certificate::from_pem(files::read(path)?))
                }
                None => tls.with_native_roots(),
            };
            endpoint
                .tls_config(tls)
                .map_err(|e| format!("`{url}`: TLS setup failed: {e}"))
        }
    }
}
