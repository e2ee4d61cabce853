//! The cluster's certificates: one CA, and one certificate per DC whose DNS name is the
//! DC's name. A gateway accepts a peer only with a certificate from this CA, and only for
//! the DC name it claims.

use std::fs;
use std::path::{Path, PathBuf};

use chinwag_core::DcName;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

pub fn cert_file(dc: &DcName) -> String {
    format!("{dc}.pem")
}

pub fn key_file(dc: &DcName) -> String {
    format!("{dc}.key")
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} already exists; refusing to overwrite cluster credentials")]
    Exists { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The CA's subject. Rebuilt identically when signing later, so a DC can be added to an
/// existing cluster with only the CA key.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "chinwag cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    if path.exists() {
        return Err(PkiError::Exists { path: path.to_owned() });
    }
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    fs::write(path, contents).map_err(err)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates a new CA in `dir` and a certificate for each DC.
pub fn init_cluster(dir: &Path, dcs: &[DcName]) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?.self_signed(&ca_key)?;
    write_new(&dir.join(CA_CERT), &ca.pem(), false)?;
    write_new(&dir.join(CA_KEY), &ca_key.serialize_pem(), true)?;
    for dc in dcs {
        issue(dir, dc)?;
    }
    Ok(())
}

/// Signs a certificate for one more DC with the CA in `dir`.
pub fn issue(dir: &Path, dc: &DcName) -> Result<(), PkiError> {
    let ca_key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![dc.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("chinwag DC {dc}"));
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&dir.join(cert_file(dc)), &cert.pem(), false)?;
    write_new(&dir.join(key_file(dc)), &key.serialize_pem(), true)?;
    Ok(())
}
