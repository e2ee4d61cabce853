use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::*;

const NOW_MS: u64 = 1_800_000_000_000;

fn key() -> TokenKey {
    TokenKey {
        secret: vec![7; KEY_BYTES],
    }
}

fn bob() -> UserId {
    UserId::parse("bob").unwrap()
}

fn raw_token(header: &str, claims: &str, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims),
        signature
    )
}

fn sign_claims(claims: &Claims, alg: Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn claims(exp_s: u64) -> Claims {
    Claims {
        sub: "bob".into(),
        exp: exp_s,
        iat: None,
        nbf: None,
        iss: None,
        aud: None,
    }
}

#[test]
fn minted_tokens_verify() {
    let token = mint(&key(), &bob(), Duration::from_secs(60), NOW_MS, &TokenPolicy::default());
    let v = Verifier::new(&key(), &TokenPolicy::default());
    assert_eq!(v.verify(&token, NOW_MS), Ok(bob()));
    assert_eq!(v.verify(&token, NOW_MS + 59_000), Ok(bob()));
    assert_eq!(v.verify(&token, NOW_MS + 60_000), Err(TokenError::Expired));
}

#[test]
fn alg_none_is_refused() {
    let exp = NOW_MS / 1000 + 60;
    let token = raw_token(
        r#"{"alg":"none","typ":"JWT"}"#,
        &format!(r#"{{"sub":"bob","exp":{exp}}}"#),
        "",
    );
    let v = Verifier::new(&key(), &TokenPolicy::default());
    assert!(v.verify(&token, NOW_MS).is_err());
}

#[test]
fn other_algorithms_are_refused_even_with_the_right_key() {
    let exp = NOW_MS / 1000 + 60;
    let v = Verifier::new(&key(), &TokenPolicy::default());
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign_claims(&claims(exp), alg, &key().secret);
        assert_eq!(v.verify(&token, NOW_MS), Err(TokenError::WrongAlgorithm), "{alg:?}");
    }
}

#[test]
fn a_different_key_is_a_bad_signature() {
    let token = sign_claims(&claims(NOW_MS / 1000 + 60), Algorithm::HS256, &[8; 32]);
    let v = Verifier::new(&key(), &TokenPolicy::default());
    assert_eq!(v.verify(&token, NOW_MS), Err(TokenError::BadSignature));
}

#[test]
fn a_tampered_payload_is_a_bad_signature() {
    let token = mint(&key(), &bob(), Duration::from_secs(60), NOW_MS, &TokenPolicy::default());
    let parts: Vec<&str> = token.split('.').collect();
    let forged_claims = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"alice","exp":{}}}"#, NOW_MS / 1000 + 60));
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
    let v = Verifier::new(&key(), &TokenPolicy::default());
    assert_eq!(v.verify(&forged, NOW_MS), Err(TokenError::BadSignature));
}

#[test]
fn not_yet_valid_is_refused() {
    let mut c = claims(NOW_MS / 1000 + 600);
    c.nbf = Some(NOW_MS / 1000 + 300);
    let token = sign_claims(&c, Algorithm::HS256, &key().secret);
    let v = Verifier::new(&key(), &TokenPolicy::default());
    assert_eq!(v.verify(&token, NOW_MS), Err(TokenError::NotYetValid));
    assert_eq!(v.verify(&token, NOW_MS + 301_000), Ok(bob()));
}

#[test]
fn missing_exp_or_sub_is_refused() {
    let v = Verifier::new(&key(), &TokenPolicy::default());
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    for body in [r#"{"sub":"bob"}"#, r#"{"exp":99999999999}"#] {
        let c: serde_json::Value = serde_json::from_str(body).unwrap();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(&key().secret),
        )
        .unwrap();
        let r = v.verify(&token, NOW_MS);
        assert!(matches!(r, Err(TokenError::MissingClaim(_))), "{body} {header} {r:?}");
    }
}

#[test]
fn issuer_and_audience_are_enforced_when_configured() {
    let policy = TokenPolicy {
        issuer: Some("chinwag".into()),
        audience: Some("chat".into()),
    };
    let v = Verifier::new(&key(), &policy);
    let good = mint(&key(), &bob(), Duration::from_secs(60), NOW_MS, &policy);
    assert_eq!(v.verify(&good, NOW_MS), Ok(bob()));
    let mut c = claims(NOW_MS / 1000 + 60);
    c.iss = Some("someone-else".into());
    c.aud = Some("chat".into());
    assert_eq!(
        v.verify(&sign_claims(&c, Algorithm::HS256, &key().secret), NOW_MS),
        Err(TokenError::WrongIssuer)
    );
    c.iss = Some("chinwag".into());
    c.aud = Some("mail".into());
    assert_eq!(
        v.verify(&sign_claims(&c, Algorithm::HS256, &key().secret), NOW_MS),
        Err(TokenError::WrongAudience)
    );
    c.aud = None;
    assert!(matches!(
        v.verify(&sign_claims(&c, Algorithm::HS256, &key().secret), NOW_MS),
        Err(TokenError::MissingClaim(_))
    ));
}

#[test]
fn garbage_is_malformed() {
    let v = Verifier::new(&key(), &TokenPolicy::default());
    for garbage in [
        "",
        "abc",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.!!!.x",
        &"x".repeat(10_000),
    ] {
        assert!(v.verify(garbage, NOW_MS).is_err(), "{garbage}");
    }
}

#[test]
fn subject_must_be_a_valid_user_id() {
    let mut c = claims(NOW_MS / 1000 + 60);
    c.sub = "bob smith".into();
    let v = Verifier::new(&key(), &TokenPolicy::default());
    assert!(matches!(
        v.verify(&sign_claims(&c, Algorithm::HS256, &key().secret), NOW_MS),
        Err(TokenError::BadSubject(_))
    ));
}

#[test]
fn key_file_is_created_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join(KEY_FILE);
    let a = TokenKey::load_or_create(&path).unwrap();
    let b = TokenKey::load_or_create(&path).unwrap();
    assert_eq!(a.secret, b.secret);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn racing_creators_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    let keys: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| TokenKey::load_or_create(&path).unwrap().secret))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn bad_key_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(KEY_FILE);
    fs::write(&path, "zz").unwrap();
    assert!(matches!(TokenKey::load(&path), Err(KeyError::Invalid { .. })));
    fs::write(&path, "abcd").unwrap();
    assert!(matches!(TokenKey::load(&path), Err(KeyError::Invalid { .. })));
}
