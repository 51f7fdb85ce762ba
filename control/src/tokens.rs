//! Who a workload is before it holds a certificate: its bootstrap token,
//! reviewed into a namespace and a service account.
//!
//! Certify asks a [`TokenReviewer`] and nothing else, so the check can be
//! swapped without touching issuance. `--token-review` picks it:
//! - `local` ([`LocalTokens`]): HMAC-signed Tern tokens (`tern1.<claims>.<tag>`,
//!   see [`tern_identity::token`]) minted by `ternctl token create` with the
//!   same key file;
//! - `kubernetes` ([`kube::KubeTokenReview`]): the workload's projected
//!   ServiceAccount token, posted to the API server's TokenReview
//!   (`authentication.k8s.io/v1`, audience `tern`);
//! - `both` ([`Both`]): a token that looks like a Tern token (`tern1.`) is
//!   checked locally, any other goes to the API server.
//!
//! The key file holds raw key bytes (any length from 16 bytes; generated: 32
//! random bytes, mode 0600). `ternctl token create` reads it the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::bail;
use futures::future::BoxFuture;
use tern_identity::token::{TokenError, TokenKey};

use crate::files::{self, Mode};

pub mod kube;
pub mod revoked;

/// How a Tern token starts (anything else, under `both`, is a Kubernetes token).
pub const TERN_TOKEN_PREFIX: &str = "tern1.";

/// Shorter keys are refused: an HMAC key should be as long as the hash.
pub const MIN_KEY_BYTES: usize = 16;
/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Which reviewer checks bootstrap tokens (`--token-review`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenReview {
    Local,
    Kubernetes,
    Both,
}

/// How Certify checks bootstrap tokens, decided once at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSettings {
    pub review: TokenReview,
    /// The HMAC key of Tern tokens (read, or generated, unless `review` is
    /// `kubernetes` alone).
    pub key_file: PathBuf,
    /// Token ids refused by Certify, re-read on every call.
    pub revoked_file: PathBuf,
    /// Where the API server is, for `kubernetes` and `both`.
    pub kube: kube::KubeSettings,
}

/// What a reviewed token says about its bearer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    /// Names the token in logs without showing it (a Tern token's `jti`),
    /// and in the revocation list.
    pub token_id: String,
    /// Past its expiry: it proves its bearer only to renew a certificate the
    /// caller already holds for that identity (see `identity`).
    pub expired: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The token proves nothing: missing, malformed, forged or expired (UNAUTHENTICATED).
    #[error("{0}")]
    Rejected(String),
    /// The reviewer could not decide (an API server out of reach, say): UNAVAILABLE.
    #[error("token review unavailable: {0}")]
    Unavailable(String),
}

/// Turns a bearer token into the namespace and service account it proves.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Reviewed, ReviewError>>;
}

/// Tern's own HMAC tokens, checked against the key file.
pub struct LocalTokens {
    key: TokenKey,
    path: PathBuf,
}

impl LocalTokens {
    /// Reads the key at `path`, generating it (mode 0600) if there is none.
    pub fn load_or_generate(path: &Path) -> anyhow::Result<LocalTokens> {
        if !path.exists() {
            let bytes = TokenKey::generate()
                .map_err(|_| anyhow::anyhow!("no randomness for a token key"))?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                files::ensure_dir(parent)?;
            }
            files::write(path, &bytes, Mode::Private)?;
            tracing::info!(path = %path.display(), "generated the bootstrap token key");
        }
        Self::load(path)
    }

    pub fn load(path: &Path) -> anyhow::Result<LocalTokens> {
        let bytes = files::read(path)?;
        if bytes.len() < MIN_KEY_BYTES {
            bail!(
                "{}: a token key has at least {MIN_KEY_BYTES} bytes, this one {}",
                path.display(),
                bytes.len()
            );
        }
        Ok(LocalTokens {
            key: TokenKey::new(&bytes),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, token: &str) -> Result<Reviewed, ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Rejected("no token".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(ReviewError::Rejected(format!(
                "token longer than {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let claims = self
            .key
            .open(token)
            .map_err(|e| ReviewError::Rejected(describe(&e).into()))?;
        Ok(Reviewed {
            expired: claims.expired(SystemTime::now()),
            namespace: claims.namespace,
            service_account: claims.service_account,
            token_id: claims.id,
        })
    }
}

fn describe(e: &TokenError) -> &'static str {
    match e {
        TokenError::Malformed => "not a Tern bootstrap token",
        TokenError::BadSignature => {
            "token signature does not verify (minted with another key, or altered)"
        }
        TokenError::Expired => "token expired",
    }
}

impl TokenReviewer for LocalTokens {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Reviewed, ReviewError>> {
        Box::pin(std::future::ready(self.check(token)))
    }
}

/// Tern tokens locally, every other token through the API server.
pub struct Both {
    pub local: LocalTokens,
    pub kube: kube::KubeTokenReview,
}

impl TokenReviewer for Both {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Reviewed, ReviewError>> {
        if token.starts_with(TERN_TOKEN_PREFIX) {
            self.local.review(token)
        } else {
            self.kube.review(token)
        }
    }
}

/// The reviewer `--token-review` asks for; the token key (read, or generated)
/// unless it is `kubernetes` alone.
pub fn reviewer(settings: &TokenSettings) -> anyhow::Result<Arc<dyn TokenReviewer>> {
    let mode = settings.review;
    let key_path = &settings.key_file;
    let local = || {
        LocalTokens::load_or_generate(key_path)
            .map_err(|e| anyhow::anyhow!("bootstrap token key {}: {e:#}", key_path.display()))
    };
    let kube = || {
        let kube = kube::KubeTokenReview::from_settings(&settings.kube)
            .map_err(|e| anyhow::anyhow!("--token-review {mode:?}: {e:#}"))?;
        tracing::info!(url = %kube.url(), "reviewing ServiceAccount tokens with the Kubernetes API server");
        Ok::<_, anyhow::Error>(kube)
    };
    Ok(match mode {
        TokenReview::Local => Arc::new(local()?),
        TokenReview::Kubernetes => Arc::new(kube()?),
        TokenReview::Both => Arc::new(Both {
            local: local()?,
            kube: kube()?,
        }),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt as _;

    use tern_identity::token::{new_id, Claims};

    use super::*;

    #[tokio::test]
    async fn generated_key_is_private_and_reviews_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state/token.key");
        let tokens = LocalTokens::load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = TokenKey::new(&std::fs::read(&path).unwrap());
        let token = key.sign(&Claims {
            namespace: "default".into(),
            service_account: "pay".into(),
            expires: None,
            id: new_id(),
        });
        let r = tokens.review(&token).await.unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.service_account.as_str()),
            ("default", "pay")
        );
        assert!(!r.expired);
        // An expired token reviews, marked expired: Certify decides what it may do.
        let old = key.sign(&Claims {
            namespace: "default".into(),
            service_account: "pay".into(),
            expires: Some(1),
            id: new_id(),
        });
        assert!(tokens.review(&old).await.unwrap().expired);
        // The same file again: the same key.
        let again = LocalTokens::load_or_generate(&path).unwrap();
        assert!(again.review(&token).await.is_ok());
        for bad in ["", "tern1.x", "garbage"] {
            assert!(matches!(
                tokens.review(bad).await,
                Err(ReviewError::Rejected(_))
            ));
        }
        let other = LocalTokens::load_or_generate(&tmp.path().join("other.key")).unwrap();
        let e = other.review(&token).await.unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        assert!(!e.to_string().contains(&token));
    }

    #[test]
    fn short_keys_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let short = tmp.path().join("short.key");
        std::fs::write(&short, b"tiny").unwrap();
        assert!(LocalTokens::load(&short).is_err());
    }
}
