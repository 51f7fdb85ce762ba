//! The mesh trust anchors, replaceable while the process runs.
//!
//! A [`Bundle`] is every root of one PEM file (a rotation holds the old and
//! the new root at once), parsed and checked once, with the client-certificate
//! verifiers built from it. [`TrustAnchors`] holds the bundle in force behind
//! an `ArcSwap`: the verifiers of [`crate::tls`] load it at each handshake (an
//! atomic load, no lock, no allocation), so a replaced bundle applies to the
//! next handshake while open connections, already authenticated, carry on.
//!
//! [`AnchorsFile`] follows the file a bundle came from. It is polled, not
//! watched: a Kubernetes ConfigMap or Secret volume swaps a `..data` symlink,
//! which inotify on the file itself never reports, and polling the content's
//! SHA-256 also sees in-place edits, bind mounts and network filesystems, at
//! the cost of reading a few kilobytes every few seconds. A file that does not
//! read or parse is refused and the bundle in force stays.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::pem::PemError;
use crate::tls::ClientAuth;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum AnchorsError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{0}")]
    Pem(#[from] PemError),
    #[error("no verifier from these roots: {0}")]
    Verifier(String),
    #[error("{0}")]
    Refused(String),
}

/// The roots of one bundle file and what is built from them.
pub struct Bundle {
    roots: Arc<RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
    digest: [u8; 32],
    required: Arc<dyn ClientCertVerifier>,
    optional: Arc<dyn ClientCertVerifier>,
}

impl Bundle {
    /// Every certificate in `pem` as a root; refused when there is none or one does not parse.
    pub fn parse(pem: &[u8]) -> Result<Bundle, AnchorsError> {
        let certs = crate::pem::certs(pem)?;
        let mut roots = RootCertStore::empty();
        for cert in &certs {
            roots.add(cert.clone()).map_err(PemError::Anchor)?;
        }
        let roots = Arc::new(roots);
        let provider = crate::tls::provider();
        let builder = || {
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
        };
        let verifier =
            |e: rustls::server::VerifierBuilderError| AnchorsError::Verifier(e.to_string());
        let required = builder().build().map_err(verifier)?;
        let optional = builder()
            .allow_unauthenticated()
            .build()
            .map_err(verifier)?;
        Ok(Bundle {
            roots,
            certs,
            digest: sha256(pem),
            required,
            optional,
        })
    }

    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The roots, in the order of the file.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// The first bytes of the file's SHA-256, in hex: names a bundle in logs.
    pub fn fingerprint(&self) -> String {
        self.digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub(crate) fn client_verifier(&self, auth: ClientAuth) -> &Arc<dyn ClientCertVerifier> {
        match auth {
            ClientAuth::Required => &self.required,
            ClientAuth::Optional => &self.optional,
        }
    }
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("roots", &self.len())
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// The bundle in force, swapped whole.
pub struct TrustAnchors {
    current: ArcSwap<Bundle>,
}

impl TrustAnchors {
    pub fn new(bundle: Bundle) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(bundle),
        })
    }

    /// A fixed set of anchors (tests, tools): [`Bundle::parse`] of `pem`.
    pub fn from_pem(pem: &[u8]) -> Result<Arc<Self>, AnchorsError> {
        Ok(Self::new(Bundle::parse(pem)?))
    }

    /// The bundle in force; handshakes take a cheaper guard through `TrustAnchors::with`.
    pub fn current(&self) -> Arc<Bundle> {
        self.current.load_full()
    }

    pub fn replace(&self, bundle: Bundle) {
        self.current.store(Arc::new(bundle));
    }

    /// Runs `f` on the bundle in force without touching reference counts.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&Bundle) -> T) -> T {
        f(&self.current.load())
    }
}

impl fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with(|b| fmt::Debug::fmt(b, f))
    }
}

/// What one look at the file found.
#[derive(Debug)]
pub enum Polled {
    /// The same content as last time (in force, or already refused and reported).
    Unchanged,
    /// A new bundle is in force.
    Reloaded { roots: usize, fingerprint: String },
    /// New content that was refused; the bundle in force stays.
    Rejected(AnchorsError),
}

/// A bundle file and the anchors it feeds.
pub struct AnchorsFile {
    path: PathBuf,
    anchors: Arc<TrustAnchors>,
    /// What the last poll saw, good or bad, so a refused file is reported once.
    last_seen: Seen,
}

#[derive(PartialEq, Eq)]
enum Seen {
    Content([u8; 32]),
    Unreadable(String),
}

impl AnchorsFile {
    /// Reads the file: at start there is no last good bundle, so a bad one is an error.
    pub fn open(path: &Path) -> Result<Self, AnchorsError> {
        let pem = read(path)?;
        let bundle = Bundle::parse(&pem)?;
        Ok(Self {
            path: path.to_path_buf(),
            last_seen: Seen::Content(bundle.digest),
            anchors: TrustAnchors::new(bundle),
        })
    }

    /// Follows `path` for `anchors`, read from it earlier: the next poll reloads only if the
    /// file no longer holds the bundle in force.
    pub fn new(path: &Path, anchors: Arc<TrustAnchors>) -> Self {
        Self {
            path: path.to_path_buf(),
            last_seen: Seen::Content(anchors.with(|b| b.digest)),
            anchors,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn anchors(&self) -> &Arc<TrustAnchors> {
        &self.anchors
    }

    /// Re-reads the file; a changed, valid bundle that `accept` agrees to replaces the one in
    /// force. `accept` lets a caller refuse more (the control plane: a bundle without the root
    /// its issuer chains to).
    pub fn poll(&mut self, accept: impl FnOnce(&Bundle) -> Result<(), String>) -> Polled {
        let pem = match read(&self.path) {
            Ok(pem) => pem,
            Err(e) => return self.seen(Seen::Unreadable(e.to_string()), e),
        };
        let digest = sha256(&pem);
        if self.last_seen == Seen::Content(digest) {
            return Polled::Unchanged;
        }
        let current = self.anchors.with(|b| b.digest);
        if digest == current {
            // Back to the bundle in force after a refused one.
            self.last_seen = Seen::Content(digest);
            return Polled::Unchanged;
        }
        let checked =
            Bundle::parse(&pem).and_then(|b| accept(&b).map(|()| b).map_err(AnchorsError::Refused));
        match checked {
            Ok(bundle) => {
                self.last_seen = Seen::Content(digest);
                let polled = Polled::Reloaded {
                    roots: bundle.len(),
                    fingerprint: bundle.fingerprint(),
                };
                self.anchors.replace(bundle);
                polled
            }
            Err(e) => self.seen(Seen::Content(digest), e),
        }
    }

    fn seen(&mut self, seen: Seen, error: AnchorsError) -> Polled {
        if self.last_seen == seen {
            return Polled::Unchanged;
        }
        self.last_seen = seen;
        Polled::Rejected(error)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AnchorsError> {
    std::fs::read(path).map_err(|error| AnchorsError::Read {
        path: path.display().to_string(),
        error,
    })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests;
