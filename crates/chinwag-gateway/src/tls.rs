//! Mutual TLS between gateways: TLS 1.3 only, both sides present a certificate from the
//! cluster CA, and the certificate must name the DC on the other end.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chinwag_core::DcName;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot load {path}: {detail}")]
    Load { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where a gateway's credentials are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Load {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| load_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_err(path, e))?;
    if certs.is_empty() {
        return Err(load_err(path, "no certificate in file"));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots.add(ca).map_err(|e| load_err(&files.ca, e))?;
    }
    let roots = Arc::new(roots);
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| load_err(&files.key, e))?;
    let config = |e: rustls::Error| TlsError::Config(e.to_string());

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(config)?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(config)?;
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
    })
}

/// The name a client uses to check that it reached DC `dc`.
pub fn server_name(dc: &DcName) -> Result<ServerName<'static>, TlsError> {
    DnsName::try_from(dc.to_string())
        .map(ServerName::DnsName)
        .map_err(|e| TlsError::Config(format!("DC name {dc} is not a DNS name: {e}")))
}

/// The DC an (already CA-verified) certificate was issued to, other than `me`.
pub fn identify(cert: &CertificateDer<'_>, me: &DcName) -> Option<DcName> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let named = cert
        .valid_dns_names()
        .filter_map(|n| DcName::parse(n).ok())
        .find(|dc| dc != me)?;
    // The listing above is not a verification; this is.
    let name = server_name(&named).ok()?;
    cert.verify_is_valid_for_subject_name(&name).ok()?;
    Some(named)
}
