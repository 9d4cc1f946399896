//! Reading PEM certificates, keys and CA bundles, with errors that name the file and what to fix.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The bytes of `path`.
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM file (a chain: leaf first), at least one.
pub fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no `BEGIN CERTIFICATE` block found; give a PEM certificate file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!(
            "{}: no PEM private key (PKCS#8, RSA or EC) found: {e}",
            path.display()
        )
    })
}

/// A trust store of every certificate in a PEM CA bundle.
pub fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in certs(path, pem)? {
        store
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(store)
}

/// A set of files read together, so that a reload compares and rebuilds from one consistent read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub files: Vec<(PathBuf, Vec<u8>)>,
}

impl Snapshot {
    /// Reads every file in `paths`.
    pub fn read(paths: &[PathBuf]) -> Result<Self, String> {
        let files = paths
            .iter()
            .map(|p| Ok((p.clone(), read(p)?)))
            .collect::<Result<_, String>>()?;
        Ok(Self { files })
    }

    /// The path and bytes of file `i` (in the order given to [`Snapshot::read`]).
    pub fn file(&self, i: usize) -> (&Path, &[u8]) {
        let (p, b) = &self.files[i];
        (p, b)
    }
}
