//! The TLS flags: a server's (every service, flattened into [`crate::args::CommonArgs`]) and the
//! gateway's towards its stages.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{ServerTls, StageClientTls};

/// A server's TLS flags and its plaintext health listener.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain (leaf first) of this server: serve gRPC over TLS. Reloaded on SIGHUP and
    /// when the file changes. Needs --tls-key.
    #[arg(long, env = "QWEN_IMAGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, RSA or EC).
    #[arg(long, env = "QWEN_IMAGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require a client certificate signed by it (mutual TLS). Stages take it to accept
    /// only the gateway. Needs --tls-cert.
    #[arg(long, env = "QWEN_IMAGE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Also serve grpc.health.v1, and nothing else, in plaintext on this address (HOST:PORT), for
    /// probes that cannot speak TLS (the kubelet's gRPC probe).
    #[arg(long, env = "QWEN_IMAGE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
}

impl ServerTlsArgs {
    /// The server's TLS, `None` without --tls-cert.
    pub fn load(&self) -> Result<Option<ServerTls>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                ServerTls::load(cert.clone(), key.clone(), self.tls_client_ca.clone()).map(Some)
            }
            (None, None) if self.tls_client_ca.is_some() => {
                Err("--tls-client-ca needs --tls-cert and --tls-key".into())
            }
            (None, None) => Ok(None),
            _ => Err("--tls-cert and --tls-key go together".into()),
        }
    }
}

/// The gateway's TLS towards its stages.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StageClientTlsArgs {
    /// PEM CA bundle that signed the stages' certificates: dial the stages over TLS (their URLs must be
    /// https://, and their certificates must name the URLs' hosts).
    #[arg(long, env = "QWEN_IMAGE_STAGE_CA")]
    pub stage_ca: Option<PathBuf>,

    /// PEM client certificate the gateway presents to the stages (mutual TLS; the stages'
    /// --tls-client-ca must have signed it). Needs --stage-client-key and --stage-ca.
    #[arg(
        long,
        env = "QWEN_IMAGE_STAGE_CLIENT_CERT",
        requires = "stage_client_key"
    )]
    pub stage_client_cert: Option<PathBuf>,

    /// PEM private key of --stage-client-cert.
    #[arg(
        long,
        env = "QWEN_IMAGE_STAGE_CLIENT_KEY",
        requires = "stage_client_cert"
    )]
    pub stage_client_key: Option<PathBuf>,
}

impl StageClientTlsArgs {
    /// The stage clients' TLS, `None` without --stage-ca.
    pub fn load(&self) -> Result<Option<StageClientTls>, String> {
        let identity = match (&self.stage_client_cert, &self.stage_client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err("--stage-client-cert and --stage-client-key go together".into()),
        };
        match &self.stage_ca {
            Some(ca) => StageClientTls::load(ca.clone(), identity).map(Some),
            None if identity.is_some() => Err(
                "--stage-client-cert needs --stage-ca (the CA that signed the stages' certificates)"
                    .into(),
            ),
            None => Ok(None),
        }
    }
}
