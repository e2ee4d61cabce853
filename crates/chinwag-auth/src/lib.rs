//! Login tokens: HS256 JSON Web Tokens signed with one shared secret, the *token key*.
//!
//! Every node of every DC verifies with the same key, so a token minted anywhere works
//! everywhere. The key lives in a file (`token.key` in the data directory by default),
//! created with fresh randomness the first time anything needs it.
//!
//! Only HS256 is accepted; `alg: none` and every other algorithm are refused before the
//! signature is even looked at. `exp` is required; `nbf`, `iss` and `aud` are checked
//! when present or configured. The caller supplies the time, so verification is pure.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chinwag_core::{AuthError, Authenticate, IdError, UserId};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// File name of the token key inside a data directory.
pub const KEY_FILE: &str = "token.key";

/// Bytes of randomness in a generated key (256 bits, the HS256 block strength).
const KEY_BYTES: usize = 32;

/// Problems with the token key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read token key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write token key {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("token key {path} is not valid: {why}")]
    Invalid { path: PathBuf, why: &'static str },
    #[error("no randomness available to make a token key: {0}")]
    Random(String),
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("algorithm is not HS256")]
    WrongAlgorithm,
    #[error("signature does not match")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("issuer not accepted")]
    WrongIssuer,
    #[error("audience not accepted")]
    WrongAudience,
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    #[error("subject is not a valid user id: {0}")]
    BadSubject(IdError),
}

/// The shared HS256 secret.
#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Reads the key at `path`, or creates it if there is none. Safe against two processes
    /// racing to create it: exactly one key wins and both end up using it.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match Self::load(path) {
            Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            other => other,
        }
    }

    /// A key from its bytes, which must be at least 32.
    pub fn from_secret(secret: Vec<u8>) -> Option<Self> {
        (secret.len() >= KEY_BYTES).then_some(Self { secret })
    }

    /// Reads an existing key file: hex text, at least 32 bytes of key.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |why| KeyError::Invalid {
            path: path.to_owned(),
            why,
        };
        let secret = decode_hex(text.trim()).ok_or_else(|| invalid("not hexadecimal"))?;
        if secret.len() < KEY_BYTES {
            return Err(invalid("shorter than 32 bytes"));
        }
        Ok(Self { secret })
    }

    fn create(path: &Path) -> Result<Self, KeyError> {
        let mut secret = vec![0u8; KEY_BYTES];
        getrandom::fill(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
        let write_err = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(write_err)?;
        }
        // Write a private temporary file, then link it into place: linking fails if another
        // process got there first, and nobody ever sees a half-written key.
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| KeyError::Random(e.to_string()))?;
        let tmp = path.with_extension(format!("tmp.{}", encode_hex(&nonce)));
        let mut file = private_file(&tmp).map_err(write_err)?;
        file.write_all(format!("{}\n", encode_hex(&secret)).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_err)?;
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Self { secret }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(write_err(e)),
        }
    }
}

#[cfg(unix)]
fn private_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().write(true).create_new(true).open(path)
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The claims chinwag reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The claims `verify` looks at, each optional so a missing one can be reported by name.
#[derive(Deserialize)]
struct CheckedClaims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

/// Which tokens a verifier accepts beyond a good signature and expiry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenPolicy {
    /// If set, tokens must carry exactly this `iss`.
    pub issuer: Option<String>,
    /// If set, tokens must carry this `aud`.
    pub audience: Option<String>,
}

/// Makes a token for `user`, valid from `now_ms` for `ttl`.
pub fn mint(key: &TokenKey, user: &UserId, ttl: Duration, now_ms: u64, policy: &TokenPolicy) -> String {
    let now_s = now_ms / 1000;
    let claims = Claims {
        sub: user.to_string(),
        exp: now_s.saturating_add(ttl.as_secs()),
        iat: Some(now_s),
        nbf: None,
        iss: policy.issuer.clone(),
        aud: policy.audience.clone(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&key.secret),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

/// Checks tokens against the key and a policy.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(key: &TokenKey, policy: &TokenPolicy) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Time-based checks are done by `verify` with the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        // `exp` and `sub` are checked by `verify` so that their absence is named precisely.
        let mut required = vec![];
        if let Some(iss) = &policy.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &policy.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Self {
            key: DecodingKey::from_secret(&key.secret),
            validation,
        }
    }

    /// Verifies `token` at time `now_ms` and returns its user.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<UserId, TokenError> {
        let data = jsonwebtoken::decode::<CheckedClaims>(token, &self.key, &self.validation).map_err(classify)?;
        let claims = data.claims;
        let missing = |claim: &str| TokenError::MissingClaim(claim.into());
        let exp = claims.exp.ok_or_else(|| missing("exp"))?;
        let sub = claims.sub.ok_or_else(|| missing("sub"))?;
        let now_s = now_ms / 1000;
        if exp <= now_s {
            return Err(TokenError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf > now_s) {
            return Err(TokenError::NotYetValid);
        }
        UserId::parse(&sub).map_err(TokenError::BadSubject)
    }
}

fn classify(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.into_kind() {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
            TokenError::WrongAlgorithm
        }
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim),
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        other => TokenError::Malformed(format!("{other:?}")),
    }
}

impl Authenticate for Verifier {
    fn authenticate(&self, token: &str, now_ms: u64) -> Result<UserId, AuthError> {
        match self.verify(token, now_ms) {
            Ok(user) => Ok(user),
            Err(TokenError::Expired) => Err(AuthError::Expired),
            Err(e) => Err(AuthError::Invalid(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;
