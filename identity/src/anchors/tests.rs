#![allow(clippy::unwrap_used)]

use std::os::unix::fs::symlink;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::UnixTime;

use super::*;

/// A self-signed root, as PEM.
fn root(name: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.self_signed(&key).unwrap().pem()
}

/// A ConfigMap volume: `dir/anchors.pem -> ..data/anchors.pem`, `..data -> ..<version>`.
struct ConfigMapDir {
    dir: tempfile::TempDir,
    version: u32,
}

impl ConfigMapDir {
    fn new(pem: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cm = Self { dir, version: 0 };
        cm.update(pem);
        symlink("..data/anchors.pem", cm.file()).unwrap();
        cm
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("anchors.pem")
    }

    /// What the kubelet does: a new version directory, then `..data` swapped by a rename.
    fn update(&mut self, pem: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.path().join(&version)).unwrap();
        std::fs::write(self.dir.path().join(&version).join("anchors.pem"), pem).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

#[test]
fn a_bundle_holds_every_root_of_the_file() {
    let (a, b) = (root("root a"), root("root b"));
    let bundle = Bundle::parse(format!("{a}{b}").as_bytes()).unwrap();
    assert_eq!(bundle.len(), 2);
    assert_eq!(bundle.roots().len(), 2);
    assert_eq!(bundle.fingerprint().len(), 16);
}

#[test]
fn empty_and_unparsable_bundles_are_refused() {
    let a = root("root a");
    let truncated = &a[..a.len() / 2];
    let bad_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    for bad in [
        "",
        "\n",
        "not pem at all",
        truncated,
        bad_der,
        &format!("{a}{bad_der}"),
    ] {
        assert!(
            Bundle::parse(bad.as_bytes()).is_err(),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn a_configmap_update_is_picked_up_and_a_bad_one_refused_once() {
    let (a, b) = (root("root a"), root("root b"));
    let mut cm = ConfigMapDir::new(&a);
    let mut file = AnchorsFile::open(&cm.file()).unwrap();
    let anchors = Arc::clone(file.anchors());
    let first = anchors.current().fingerprint();
    assert!(matches!(file.poll(|_| Ok(())), Polled::Unchanged));

    cm.update(&format!("{a}{b}"));
    match file.poll(|_| Ok(())) {
        Polled::Reloaded { roots, .. } => assert_eq!(roots, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(anchors.current().len(), 2);
    let both = anchors.current().fingerprint();
    assert_ne!(both, first);

    // Empty, then garbage: refused once each, and the last good bundle stays.
    for bad in ["", "garbage"] {
        cm.update(bad);
        assert!(
            matches!(file.poll(|_| Ok(())), Polled::Rejected(_)),
            "{bad:?}"
        );
        assert!(
            matches!(file.poll(|_| Ok(())), Polled::Unchanged),
            "{bad:?}"
        );
        assert_eq!(anchors.current().fingerprint(), both);
    }
    // Gone (the volume unmounted, say): the same.
    std::fs::remove_file(cm.dir.path().join("..data")).unwrap();
    assert!(matches!(
        file.poll(|_| Ok(())),
        Polled::Rejected(AnchorsError::Read { .. })
    ));
    assert!(matches!(file.poll(|_| Ok(())), Polled::Unchanged));
    assert_eq!(anchors.current().len(), 2);

    cm.update(&b);
    assert!(matches!(
        file.poll(|_| Ok(())),
        Polled::Reloaded { roots: 1, .. }
    ));
    assert_eq!(anchors.current().len(), 1);
}

#[test]
fn the_caller_may_refuse_a_valid_bundle() {
    let (a, b) = (root("root a"), root("root b"));
    let mut cm = ConfigMapDir::new(&a);
    let mut file = AnchorsFile::open(&cm.file()).unwrap();
    cm.update(&b);
    let polled = file.poll(|_| Err("the issuer does not chain to it".into()));
    assert!(
        matches!(polled, Polled::Rejected(AnchorsError::Refused(_))),
        "{polled:?}"
    );
    assert_eq!(file.anchors().current().len(), 1);
    assert_eq!(
        file.anchors().current().certs(),
        Bundle::parse(a.as_bytes()).unwrap().certs()
    );
}

#[test]
fn a_bad_file_at_start_is_an_error() {
    let cm = ConfigMapDir::new("");
    assert!(AnchorsFile::open(&cm.file()).is_err());
    assert!(AnchorsFile::open(Path::new("/nonexistent/anchors.pem")).is_err());
}

#[test]
fn client_verifiers_follow_the_bundle() {
    let a = root("root a");
    let anchors = TrustAnchors::from_pem(a.as_bytes()).unwrap();
    let ca = anchors.current();
    let required = ca.client_verifier(ClientAuth::Required);
    assert!(required.client_auth_mandatory());
    assert!(!ca
        .client_verifier(ClientAuth::Optional)
        .client_auth_mandatory());
    // A self-signed root is not a client certificate of itself.
    let cert = &ca.certs()[0];
    assert!(required
        .verify_client_cert(cert, &[], UnixTime::now())
        .is_err());
}
