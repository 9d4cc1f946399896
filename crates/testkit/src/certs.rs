//! Test certificates, made at test time with rcgen: a private CA and the server and client certificates it
//! signs, written as PEM files into a directory the test owns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as written to disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's DER bytes (what a TLS peer presents).
    pub der: Vec<u8>,
}

/// A private CA writing its files into `dir`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate (PEM): what clients and mTLS servers trust.
    pub cert: PathBuf,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/NAME.crt`.
    pub fn new(dir: &Path, name: &str) -> Result<Self, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(err)?).map_err(err)?;
        let cert = dir.join(format!("{name}.crt"));
        std::fs::write(&cert, issuer.pem()).map_err(err)?;
        Ok(Self {
            issuer,
            dir: dir.to_path_buf(),
            cert,
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses), common name `cn`, written to
    /// `dir/FILE.crt` and `dir/FILE.key` (overwriting: reload tests swap files this way).
    pub fn server(&self, file: &str, cn: &str, names: &[&str]) -> Result<CertFiles, String> {
        self.issue(file, cn, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, file: &str, cn: &str) -> Result<CertFiles, String> {
        self.issue(file, cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertFiles, String> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        // Key first, then the certificate, each replaced atomically (rename), as a Secret volume update
        // would: a reader never sees half a file.
        write_atomically(&files.key, key.serialize_pem().as_bytes())?;
        write_atomically(&files.cert, cert.pem().as_bytes())?;
        Ok(files)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A tonic client endpoint for `https://NAME:PORT` at `addr` (the certificate must carry `name`), verified
/// against the CA file `ca`, presenting `identity` (a client certificate) when given.
pub fn endpoint(
    addr: SocketAddr,
    name: &str,
    ca: &Path,
    identity: Option<&CertFiles>,
) -> Result<tonic::transport::Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut tls = ClientTlsConfig::new()
        .domain_name(name)
        .ca_certificate(Certificate::from_pem(read(ca)?));
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(read(&id.cert)?, read(&id.key)?));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(err)?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .map_err(err)
}

/// A rustls client config trusting the CA file `ca`, offering `alpn`.
fn client_config(ca: &Path, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(err)?).map_err(err)?;
    }
    // The same provider as the services' (crates/common/src/tls/mod.rs).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS handshake with `addr` for `name`, verified against the CA file `ca`.
async fn connect(
    addr: SocketAddr,
    name: &str,
    ca: &Path,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::ServerName;
    let config = client_config(ca, alpn)?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(err)?;
    let name = ServerName::try_from(name.to_string()).map_err(err)?;
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| format!("no TLS handshake with {addr} in 30 s"))?
    .map_err(err)
}

/// The leaf certificate (DER) that the TLS server at `addr` presents in a new handshake for `name`,
/// verified against the CA file `ca`: what a reload test compares with the files it wrote.
pub async fn peer_certificate(addr: SocketAddr, name: &str, ca: &Path) -> Result<Vec<u8>, String> {
    let tls = connect(addr, name, ca, &[b"h2"]).await?;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| format!("{addr} presented no certificate"))
}

/// `GET path` over HTTPS (HTTP/1.1, `Connection: close`) at `addr` for `name`, verified against the CA
/// file `ca`: the status and the body.
pub async fn https_get(
    addr: SocketAddr,
    name: &str,
    ca: &Path,
    path: &str,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = connect(addr, name, ca, &[b"http/1.1"]).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(err)?;
    let mut out = Vec::new();
    // A peer closing without close_notify still leaves the whole answer in `out`.
    let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut out))
        .await
        .map_err(|_| format!("no HTTPS answer from {addr} in 30 s"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
