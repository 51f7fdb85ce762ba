//! CSRs sent to tern-control's Identity service: checked against the
//! identity the token proved, then signed by the CA. The first byte picks how
//! the rest is read: even, as PEM text; odd, as DER wrapped in PEM.
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use tern_control::ca::{check_csr, Ca, Source};
use tern_identity::spiffe::{spiffe_id_of, validity};
use tern_identity::SpiffeId;

static CA: LazyLock<Ca> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("tern-fuzz-ca-{}", std::process::id()));
    let ca = Ca::load(&Source::StateDir(dir.clone()), "cluster.local").expect("CA");
    let _ = std::fs::remove_dir_all(dir);
    ca
});

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let pem = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(rest);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
    };
    let _ = tern_identity::pem::certs(pem.as_bytes());
    let id = SpiffeId::new("cluster.local", "default", "pay").expect("id");
    let Ok(public_key) = check_csr(&pem, &id) else {
        return;
    };
    // A CSR that passes the check is signed, for exactly that identity.
    let issued = CA
        .issue(&id, &public_key, Duration::from_secs(3600))
        .expect("a checked CSR is signed");
    let leaf = issued.chain.first().expect("a leaf");
    assert_eq!(spiffe_id_of(leaf), Ok(id.to_string()));
    let (not_before, not_after) = validity(leaf).expect("validity");
    assert!(not_before <= SystemTime::now() && SystemTime::now() < not_after);
    let other = SpiffeId::new("cluster.local", "default", "order").expect("id");
    assert!(
        check_csr(&pem, &other).is_err(),
        "one CSR passes for two identities"
    );
});
