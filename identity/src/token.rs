//! Bootstrap tokens: how a workload proves which service account it runs as
//! before it holds a certificate.
//!
//! A token is `tern1.<claims>.<tag>`: base64url JSON claims (namespace,
//! service account, expiry, id) and an HMAC-SHA256 tag over them under a key
//! only the control plane and `ternctl token create` hold. The control plane
//! checks the token through a reviewer interface, so a Kubernetes projected
//! ServiceAccount token checked by TokenReview can take its place unchanged:
//! either way the answer is a namespace and a service account.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "tern1.";
/// Bytes of random key material; SHA-256's block size is 64.
pub const KEY_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "ns")]
    pub namespace: String,
    #[serde(rename = "sa")]
    pub service_account: String,
    /// Unix seconds after which the token is refused; absent: never expires.
    #[serde(rename = "exp", default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// Random id, so a token can be named in logs without showing it.
    #[serde(rename = "jti")]
    pub id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not a Tern bootstrap token")]
    Malformed,
    #[error("token signature does not verify (minted with another key, or altered)")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// The HMAC key tokens are signed with.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    pub fn new(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Fresh random key material, to be stored by the caller (mode 0600).
    pub fn generate() -> Result<Vec<u8>, ring::error::Unspecified> {
        let mut bytes = vec![0u8; KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
        Ok(bytes)
    }

    pub fn sign(&self, claims: &Claims) -> String {
        // Claims are plain strings and numbers: serialising cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let body = URL_SAFE_NO_PAD.encode(json);
        let tag = hmac::sign(&self.0, body.as_bytes());
        format!("{PREFIX}{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks the tag (in constant time) and expiry, and returns the claims.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        let claims = self.open(token)?;
        if claims.expired(now) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Checks the tag (in constant time) and returns the claims, expired or
    /// not: for a caller that decides what an expired token may still do.
    pub fn open(&self, token: &str) -> Result<Claims, TokenError> {
        let rest = token
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed)?;
        let (body, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.0, body.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
    }
}

impl Claims {
    /// Whether the token is past its expiry at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.expires.is_some_and(|exp| now >= exp)
    }
}

/// A random token id.
pub fn new_id() -> String {
    let mut bytes = [0u8; 9];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn claims() -> Claims {
        Claims {
            namespace: "default".into(),
            service_account: "order".into(),
            expires: Some(2_000_000_000),
            id: new_id(),
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let key = TokenKey::new(&TokenKey::generate().unwrap());
        let token = key.sign(&claims());
        let now = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        assert_eq!(key.verify(&token, now).unwrap().service_account, "order");
        assert_eq!(
            key.verify(&token, UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
            Err(TokenError::Expired)
        );
        let late = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let opened = key.open(&token).unwrap();
        assert!(opened.expired(late) && !opened.expired(now));
        let other = TokenKey::new(&TokenKey::generate().unwrap());
        assert_eq!(other.open(&token), Err(TokenError::BadSignature));
        assert_eq!(other.verify(&token, now), Err(TokenError::BadSignature));
        // Changing the claims (order → pay) breaks the tag.
        let (head, tag) = token.rsplit_once('.').unwrap();
        let forged_claims = Claims {
            service_account: "pay".into(),
            ..claims()
        };
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap());
        let _ = head;
        let forged = format!("{PREFIX}{forged_body}.{tag}");
        assert_eq!(key.verify(&forged, now), Err(TokenError::BadSignature));
        assert_eq!(key.verify("garbage", now), Err(TokenError::Malformed));
        assert_eq!(key.verify("tern1.x", now), Err(TokenError::Malformed));
    }
}
