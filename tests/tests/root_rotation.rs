//! A full rotation of the mesh's root under load, following docs/SECURITY.md, "Rotating the trust
//! anchor", step by step: old root → bundle of old and new → issuer from the new root → new root
//! only, with two mTLS sidecars in front of the demo pay server, tern-control issuing
//! 15-second certificates, and not one failed call or handshake.
//!
//! The trust-anchor files are updated the way Kubernetes updates ConfigMap and Secret volumes
//! (a `..data` symlink swapped atomically); neither the sidecars nor tern-control restart for a
//! bundle change. tern-control restarts once, for the new issuer (step 3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tern_identity::tls::{client_config, server_name, ALPN_H2};
use tern_identity::{CertStore, Credentials, TrustAnchors};
use tern_tests::demo::{Pay, Tally};
use tern_tests::identity::CONTROL_IDENTITY;
use tern_tests::load::Load;
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::process::{free_addr, TestDir};
use tern_tests::roots::{Intermediate, MountedFile, Root};
use tern_tests::{eventually, Must, Proxy, ProxySpec};

const LIFETIME: &str = "15s";
/// Long enough for a bundle file change to be polled (every 2s) by everyone.
const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// tern-control's CA as a Secret volume: the anchor bundle and the issuer, each a mounted file.
struct CaFiles {
    anchor: MountedFile,
    issuer_cert: MountedFile,
    issuer_key: MountedFile,
}

impl CaFiles {
    fn create(dir: &Path, anchors: &str, issuer: &Intermediate) -> Result<Self> {
        let dir = dir.join("tern-ca");
        Ok(Self {
            anchor: MountedFile::create(&dir, "trust-anchor.pem", anchors)?,
            issuer_cert: MountedFile::create(&dir.join("cert"), "issuer.pem", &issuer.cert_pem)?,
            issuer_key: MountedFile::create(&dir.join("key"), "issuer-key.pem", &issuer.key_pem)?,
        })
    }

    fn args(&self) -> Vec<String> {
        let path = |f: &MountedFile| f.path().display().to_string();
        vec![
            "--ca-anchor".into(),
            path(&self.anchor),
            "--ca-issuer-cert".into(),
            path(&self.issuer_cert),
            "--ca-issuer-key".into(),
            path(&self.issuer_key),
            "--cert-lifetime".into(),
            LIFETIME.into(),
        ]
    }
}

/// Waits until every sidecar and tern-control hold a bundle of `roots` roots.
async fn bundles_in_force(ca: &MeshCa, sidecars: &[&Proxy], roots: f64) -> Result<()> {
    eventually(RELOAD_WAIT, || async {
        for p in sidecars {
            let n = p.metric("tern_identity_trust_anchors", &[]).await?;
            if n != roots {
                return Ok(Some(format!("{}: {n} roots in force", p.spec.label)));
            }
        }
        let n = ca.control.metric("tern_control_trust_anchors", &[]).await?;
        Ok((n != roots).then(|| format!("tern-control: {n} roots in force")))
    })
    .await
}

async fn renewals(p: &Proxy) -> Result<f64> {
    p.metric("tern_identity_renewals_total", &[("result", "ok")])
        .await
}

/// TLS handshakes refused or failed between the sidecars (either side; the control-plane
/// connection, which a restart may cut mid-handshake, aside).
async fn handshake_failures(p: &Proxy) -> Result<f64> {
    let name = "tern_tls_handshake_failures_total";
    let inbound = p.metric(name, &[("direction", "inbound")]).await?;
    Ok(inbound + p.metric(name, &[("direction", "outbound")]).await?)
}

/// Connects to `addr` presenting `leaf` (chain and key PEM), expecting a server of `identity`
/// under `anchors_pem`, and reads: a refused client certificate shows as the server's alert.
async fn present(
    addr: SocketAddr,
    identity: &str,
    anchors_pem: &str,
    leaf: &(String, String),
) -> Result<()> {
    let chain = tern_identity::pem::certs(leaf.0.as_bytes())?;
    let key = tern_identity::pem::private_key(leaf.1.as_bytes())?;
    let store = CertStore::new();
    store.set(Credentials::new(chain, &key)?);
    let anchors = TrustAnchors::from_pem(anchors_pem.as_bytes())?;
    let config = client_config(Some(store), anchors, Arc::from(identity), &[ALPN_H2])?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    // TLS 1.3: the client is done before the server has checked its certificate, so the
    // refusal usually arrives on the first read; sometimes already during the handshake.
    let Ok(mut tls) = connector.connect(server_name(addr.ip()), tcp).await else {
        return Ok(());
    };
    let mut buf = [0u8; 64];
    let read = tokio::io::AsyncReadExt::read(&mut tls, &mut buf);
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Err(_)) | Ok(Ok(0)) => Ok(()),
        other => Err(anyhow!("the server kept the connection: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_rotates_under_load_without_a_failed_call() {
    let dir = TestDir::new("root-rotation").must();
    let old = Root::new("tern root 2025").must();
    let new = Root::new("tern root 2026").must();
    let old_issuer = old.intermediate("tern issuer 2025").must();
    let new_issuer = new.intermediate("tern issuer 2026").must();
    let both = format!("{}{}", old.pem, new.pem);

    // Before: everyone trusts the old root, tern-control issues from the old issuer. (The
    // runbook's step 0, making the new root and issuer, is done above.)
    let mut ca_files = CaFiles::create(dir.path(), &old.pem, &old_issuer).must();
    let mut sidecar_anchors =
        MountedFile::create(&dir.path().join("tern-trust-anchors"), "ca.pem", &old.pem).must();
    let args = ca_files.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut ca = MeshCa::start_with_ca_files(dir.path(), &args, sidecar_anchors.path())
        .await
        .must();
    let pay = Pay::start(dir.path(), "pay-1", &[]).await.must();
    let spec = ProxySpec::new("pay-sidecar", "pay")
        .inbound(pay.addr)
        .access_log("off");
    let pay_sidecar = Proxy::start(dir.path(), ca.sidecar(spec, "pay").must())
        .await
        .must();
    let upstream = free_addr().must();
    let pay_identity = format!("pay={}", spiffe("pay"));
    let spec = ProxySpec::new("order-sidecar", "order")
        .upstream("pay", upstream)
        .endpoints("pay", &[pay_sidecar.inbound])
        .access_log("off")
        .args(&["--endpoint-identity", &pay_identity]);
    let order_sidecar = Proxy::start(dir.path(), ca.sidecar(spec, "order").must())
        .await
        .must();
    let sidecars = [&order_sidecar, &pay_sidecar];
    bundles_in_force(&ca, &sidecars, 1.0).await.must();
    let load = Load::at_rate(upstream, 200).await.must();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Step 1: the bundle of both roots, to tern-control's Secret and every ConfigMap.
    ca_files.anchor.update(&both).must();
    sidecar_anchors.update(&both).must();
    bundles_in_force(&ca, &sidecars, 2.0).await.must();

    // A bad bundle is refused, counted and changes nothing: empty for the sidecars, and for
    // tern-control one without the root its issuer (still the old one) chains to.
    sidecar_anchors.update("").must();
    ca_files.anchor.update(&new.pem).must();
    eventually(RELOAD_WAIT, || async {
        let refused = [("result", "rejected")];
        let mut counts = Vec::new();
        for p in sidecars {
            counts.push(
                p.metric("tern_identity_trust_anchor_reloads_total", &refused)
                    .await?,
            );
        }
        let control = ca
            .control
            .metric("tern_control_trust_anchor_reloads_total", &refused);
        counts.push(control.await?);
        Ok(counts
            .iter()
            .any(|&n| n != 1.0)
            .then(|| format!("refusals: {counts:?}")))
    })
    .await
    .must();
    bundles_in_force(&ca, &sidecars, 2.0).await.must();
    ca_files.anchor.update(&both).must();
    sidecar_anchors.update(&both).must();

    // Step 2: the new issuer; tern-control restarts with it, and every sidecar renews from it
    // (twice, so no certificate from the old issuer is left).
    ca_files.issuer_cert.update(&new_issuer.cert_pem).must();
    ca_files.issuer_key.update(&new_issuer.key_pem).must();
    ca.control.kill().await.must();
    ca.control = ca
        .control
        .restart(dir.path(), "tern-control-2")
        .await
        .must();
    let before = [
        renewals(&order_sidecar).await.must(),
        renewals(&pay_sidecar).await.must(),
    ];
    eventually(Duration::from_secs(40), || async {
        let now = [
            renewals(&order_sidecar).await?,
            renewals(&pay_sidecar).await?,
        ];
        let done = now.iter().zip(before).all(|(n, b)| n - b >= 2.0);
        Ok((!done).then(|| format!("renewals since the restart: {now:?} - {before:?}")))
    })
    .await
    .must();

    // Step 3: the new root only. Connections retire when a certificate they were made with
    // expires, so within a lifetime the calls go over connections handshaken under it.
    ca_files.anchor.update(&new.pem).must();
    sidecar_anchors.update(&new.pem).must();
    bundles_in_force(&ca, &sidecars, 1.0).await.must();
    let handshakes = || async {
        let outbound = [("direction", "outbound")];
        order_sidecar
            .metric("tern_tls_handshakes_total", &outbound)
            .await
    };
    let before = handshakes().await.must();
    eventually(Duration::from_secs(20), || async {
        let n = handshakes().await?;
        Ok((n < before + 2.0).then(|| format!("{n} outbound handshakes, {before} before")))
    })
    .await
    .must();
    let made = handshakes().await.must();
    eprintln!("root rotation: {made} outbound handshakes by order's sidecar, {before} before the new root alone");

    let outcomes = load.stop().await.must();
    let tally = Tally::of(&outcomes);
    eprintln!(
        "root rotation: {} calls ok, failed {:?}",
        tally.ok, tally.failed
    );
    assert_eq!(
        tally.failures(),
        0,
        "failed calls: {:?} {:?}",
        tally.failed,
        tally.samples
    );
    assert!(tally.ok >= 200 * 20, "too few calls made: {} ok", tally.ok);
    for p in sidecars {
        let failed = handshake_failures(p).await.must();
        assert_eq!(failed, 0.0, "{}: failed handshakes", p.spec.label);
    }

    // The old root is gone for real: a certificate from the old issuer is refused now, by a
    // sidecar and by tern-control (which last started with both roots).
    let old_leaf = old_issuer.leaf(&spiffe("order")).must();
    present(pay_sidecar.inbound, &spiffe("pay"), &new.pem, &old_leaf)
        .await
        .must();
    present(ca.grpc(), CONTROL_IDENTITY, &new.pem, &old_leaf)
        .await
        .must();
    let unknown = [("direction", "inbound"), ("reason", "unknown_ca")];
    eventually(Duration::from_secs(5), || async {
        let sidecar = pay_sidecar
            .metric("tern_tls_handshake_failures_total", &unknown)
            .await?;
        let control = ca
            .control
            .metric(
                "tern_control_tls_handshake_failures_total",
                &[("reason", "unknown_ca")],
            )
            .await?;
        Ok((sidecar != 1.0 || control != 1.0)
            .then(|| format!("unknown_ca failures: sidecar {sidecar}, tern-control {control}")))
    })
    .await
    .must();
}
