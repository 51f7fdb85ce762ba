//! Mutual TLS between sidecars with identities issued by tern-control: a strict inbound port
//! seen from `openssl s_client`, an endpoint with the wrong identity refused by its caller,
//! certificates rotating every few seconds under load without a failed call, an expired
//! certificate refused, and an AuthorizationPolicy enforced at the callee's sidecar.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use tern_proto::test::v1::EchoRequest;
use tern_tests::control::ConfigDir;
use tern_tests::demo::{Pay, Tally};
use tern_tests::identity::{certify, CONTROL_IDENTITY};
use tern_tests::load::Load;
use tern_tests::mesh::{connect, echo_client, stats, App};
use tern_tests::mtls::{spiffe, MeshCa};
use tern_tests::process::{free_addr, TestDir};
use tern_tests::{eventually, http1, within, Must, Proxy, ProxySpec, CALL_TIMEOUT};

/// One Echo unary call to `addr`.
async fn echo(addr: SocketAddr) -> Result<Result<(), tonic::Status>> {
    let mut client = echo_client(connect(addr).await?);
    let req = EchoRequest {
        message: "hello".into(),
        ..EchoRequest::default()
    };
    Ok(within(CALL_TIMEOUT, client.unary(req)).await?.map(drop))
}

fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `openssl s_client` to `addr` offering TLS 1.3 and ALPN h2, trusting `ca`, with `cert` and
/// `key` as its client certificate if given. With `wait_for_server` it reads until the server
/// closes (`-ign_eof`), so
/// a client certificate refused after the handshake shows as an alert. Returns (success,
/// everything printed).
fn s_client(
    addr: SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    wait_for_server: bool,
) -> Result<(bool, String)> {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "openssl", "s_client", "-connect"])
        .arg(addr.to_string())
        .args(["-tls1_3", "-alpn", "h2", "-CAfile"])
        .arg(ca)
        .stdin(std::process::Stdio::null());
    if wait_for_server {
        cmd.arg("-ign_eof");
    }
    if let Some((cert, key)) = client {
        // The file holds the leaf and its issuer; -cert alone would send only the leaf.
        cmd.arg("-cert")
            .arg(cert)
            .arg("-cert_chain")
            .arg(cert)
            .arg("-key")
            .arg(key);
    }
    let out = cmd.output().context("running openssl s_client")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// A CA of its own (made by openssl) and a leaf it signed for `id`: key and chain files.
fn foreign_certificate(dir: &Path, id: &str) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=other-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    run(&ca)?;
    let mut csr = vec!["req", "-new", "-subj", "/CN=order"];
    csr.extend(ec);
    csr.extend(["-keyout", "key.pem", "-out", "leaf.csr"]);
    run(&csr)?;
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=URI:{id}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"),
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "leaf.pem",
    ])?;
    let chain = std::fs::read_to_string(dir.join("leaf.pem"))?
        + &std::fs::read_to_string(dir.join("ca.pem"))?;
    std::fs::write(dir.join("chain.pem"), chain)?;
    Ok((dir.join("key.pem"), dir.join("chain.pem")))
}

/// The subjectAltName of the first certificate in `pem_text`, as `openssl x509` prints it.
fn san_of(pem_text: &str) -> Result<String> {
    let start = pem_text
        .find("-----BEGIN CERTIFICATE-----")
        .context("no certificate printed")?;
    let end = pem_text[start..]
        .find("-----END CERTIFICATE-----")
        .context("unterminated certificate")?
        + start
        + "-----END CERTIFICATE-----".len();
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(&pem_text.as_bytes()[start..end])?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_inbound_port_takes_only_mesh_mtls() {
    if !openssl_available() {
        tern_tests::missing("openssl (Debian package openssl)").must();
        return;
    }
    let dir = TestDir::new("mtls-strict").must();
    let ca = MeshCa::start(dir.path(), &[]).await.must();
    let app = App::echo_server(dir.path(), "pay").await.must();
    let spec = ProxySpec::new("pay-sidecar", "pay").inbound(app.addr);
    let pay = Proxy::start(dir.path(), ca.sidecar(spec, "pay").must())
        .await
        .must();
    let port = pay.inbound;

    // Plaintext HTTP/2 is refused: no call gets through.
    let plain = echo(port).await;
    assert!(
        !matches!(plain, Ok(Ok(()))),
        "a plaintext call reached the app through a strict port"
    );

    // No client certificate: the server's certificate verifies, then the server refuses.
    let (ok, text) = s_client(port, &ca.anchors, None, true).must();
    assert!(!ok, "s_client without a certificate succeeded:\n{text}");
    assert!(text.contains("certificate required"), "{text}");

    // A certificate from another CA, for a mesh-looking identity.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let (fkey, fcert) = foreign_certificate(&foreign, &spiffe("order")).must();
    let (ok, text) = s_client(port, &ca.anchors, Some((&fcert, &fkey)), true).must();
    assert!(
        !ok,
        "s_client with a foreign certificate succeeded:\n{text}"
    );
    // rustls answers an unknown issuer with alert 46 (certificate unknown).
    assert!(
        text.contains("alert certificate unknown") || text.contains("alert unknown ca"),
        "{text}"
    );

    // A real mesh certificate (for order, from the mesh CA): TLS 1.3, h2, and pay's SPIFFE id.
    let anchors = std::fs::read_to_string(&ca.anchors).unwrap();
    let token = std::fs::read_to_string(ca.token_file("order").must()).unwrap();
    let (chain, key) = certify(
        ca.grpc(),
        &anchors,
        CONTROL_IDENTITY,
        &spiffe("order"),
        token.trim(),
    )
    .await
    .expect("certify order");
    let (ckey, ccert) = (
        dir.path().join("order-key.pem"),
        dir.path().join("order.pem"),
    );
    std::fs::write(&ckey, key).unwrap();
    std::fs::write(&ccert, chain).unwrap();
    let (_, text) = s_client(port, &ca.anchors, Some((&ccert, &ckey)), false).must();
    assert!(text.contains("TLSv1.3"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(!text.contains("alert"), "{text}");
    let san = san_of(&text).must();
    assert!(
        san.contains(&format!("URI:{}", spiffe("pay"))),
        "SAN: {san}"
    );

    let reasons = ["plaintext", "no_client_cert", "unknown_ca"];
    for reason in reasons {
        let n = pay
            .metric(
                "tern_tls_handshake_failures_total",
                &[("direction", "inbound"), ("reason", reason)],
            )
            .await
            .must();
        assert!(
            n >= 1.0,
            "no inbound handshake failure counted as {reason}\n{}",
            pay.proc.diagnostics()
        );
    }
    assert_eq!(stats(app.addr).await.must().calls, 0, "the app saw a call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_with_the_wrong_identity_is_refused() {
    let dir = TestDir::new("mtls-impostor").must();
    let ca = MeshCa::start(dir.path(), &[]).await.must();
    let app = App::echo_server(dir.path(), "impostor-app").await.must();
    // A workload of `order` listening where discovery says `pay` is.
    let spec = ProxySpec::new("impostor-sidecar", "order").inbound(app.addr);
    let impostor = Proxy::start(dir.path(), ca.sidecar(spec, "order").must())
        .await
        .must();
    let upstream = free_addr().must();
    let pay_identity = format!("pay={}", spiffe("pay"));
    let spec = ProxySpec::new("caller-sidecar", "client")
        .upstream("pay", upstream)
        .endpoints("pay", &[impostor.inbound])
        .args(&["--endpoint-identity", &pay_identity]);
    let caller = Proxy::start(dir.path(), ca.sidecar(spec, "client").must())
        .await
        .must();

    let status = echo(upstream).await.must().expect_err("the call must fail");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("wrong_identity"),
        "the status should say why: {status:?}"
    );
    let logged = caller.proc.stderr();
    assert!(
        logged.contains("mTLS handshake with endpoint failed")
            && logged.contains(&spiffe("order"))
            && logged.contains(&spiffe("pay")),
        "the caller's log should name both identities:\n{logged}"
    );
    let n = caller
        .metric(
            "tern_tls_handshake_failures_total",
            &[("direction", "outbound"), ("reason", "wrong_identity")],
        )
        .await
        .must();
    assert!(n >= 1.0);
    assert_eq!(
        stats(app.addr).await.must().calls,
        0,
        "the impostor's app saw a call"
    );
}

async fn renewals(proxy: &Proxy) -> Result<f64> {
    proxy
        .metric("tern_identity_renewals_total", &[("result", "ok")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_certificates_rotate_under_load_and_expire_without_the_ca() {
    let dir = TestDir::new("mtls-rotation").must();
    let mut ca = MeshCa::start(dir.path(), &["--cert-lifetime", "10s"])
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
    let before = (
        renewals(&order_sidecar).await.must(),
        renewals(&pay_sidecar).await.must(),
    );

    let load = Load::at_rate(upstream, 200).await.must();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let outcomes = load.stop().await.must();
    let tally = Tally::of(&outcomes);
    let failed: u64 = tally.failed.values().sum();
    assert!(tally.ok >= 60 * 150, "too few calls made: {} ok", tally.ok);
    assert_eq!(failed, 0, "failed calls: {:?}", tally.failed);
    for (proxy, before) in [(&order_sidecar, before.0), (&pay_sidecar, before.1)] {
        let rotations = renewals(proxy).await.must() - before;
        assert!(
            rotations >= 5.0,
            "{}: {rotations} rotations in 60s with 10s certificates",
            proxy.spec.label
        );
    }

    // Without the CA nothing is renewed: within one lifetime both certificates expire, the
    // sidecars say they are not ready, and peers refuse the expired certificates.
    ca.control.kill().await.must();
    let ready = |p: SocketAddr| async move { http1::get(p, "/ready").await.map(|r| r.status) };
    eventually(Duration::from_secs(15), || async {
        let (a, b) = (
            ready(order_sidecar.admin).await?,
            ready(pay_sidecar.admin).await?,
        );
        Ok((a != 503 || b != 503).then(|| format!("/ready: order {a}, pay {b}")))
    })
    .await
    .must();
    let status = echo_pay(upstream).await;
    assert!(
        status.is_err(),
        "a call succeeded with expired certificates"
    );
    let refused = order_sidecar
        .metrics()
        .await
        .must()
        .lines()
        .filter(|l| l.starts_with("tern_tls_handshake_failures_total{direction=\"outbound\""))
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(
        refused
            .iter()
            .any(|l| l.contains("expired") || l.contains("rejected_by_peer")),
        "no refused handshake counted: {refused:?}; the call: {status:?}\n{}",
        order_sidecar.proc.diagnostics()
    );
}

/// One Pay call to `addr`; the error is the status (or why no status came).
async fn echo_pay(addr: SocketAddr) -> Result<String, String> {
    let channel = connect(addr).await.map_err(|e| format!("{e:#}"))?;
    let mut client = tern_proto::demo::v1::pay_service_client::PayServiceClient::new(channel);
    match tern_tests::load::pay_once(&mut client, 0, &[]).await {
        Ok(o) => o.result.map_err(|s| format!("{s:?}")),
        Err(e) => Err(format!("{e:#}")),
    }
}

const AUTHZ: &str = "\
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  protocol: grpc
  ports: [{name: grpc, port: 50051}]
  identity: spiffe://cluster.local/ns/default/sa/pay
---
apiVersion: tern.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: pay-callers, namespace: default}
spec:
  service: pay
  default: deny
  rules:
    - from:
        - identity: spiffe://cluster.local/ns/default/sa/order
      methods:
        - {service: tern.test.v1.Echo}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policy_lets_only_order_call_pay() {
    let dir = TestDir::new("mtls-authz").must();
    let config = ConfigDir::with_services(dir.path(), AUTHZ).must();
    let ca = MeshCa::start_with(dir.path(), &config, &[]).await.must();
    let app = App::echo_server(dir.path(), "pay-app").await.must();
    let args = ca.subscribed_args("pay").must();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let spec = ProxySpec::new("pay-sidecar", "pay")
        .inbound(app.addr)
        .args(&args);
    let pay = Proxy::start(dir.path(), spec).await.must();

    let mut callers = Vec::new();
    for sa in ["order", "stranger"] {
        let upstream = free_addr().must();
        let args = ca.subscribed_args(sa).must();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let spec = ProxySpec::new(&format!("{sa}-sidecar"), sa)
            .upstream("pay", upstream)
            .args(&args);
        let proxy = Proxy::start(dir.path(), spec).await.must();
        callers.push((proxy, upstream));
    }
    // Wait until the callers know pay's endpoint (pushed with its identity).
    for (proxy, _) in &callers {
        eventually(Duration::from_secs(10), || async {
            let config = proxy.config().await?;
            let text = config["services"].to_string();
            Ok((!text.contains(&pay.inbound.to_string()))
                .then(|| format!("{}: services {text}", proxy.spec.label)))
        })
        .await
        .must();
    }
    // And until pay's sidecar holds the policy.
    eventually(Duration::from_secs(10), || async {
        let config = pay.config().await?;
        let applied = &config["control_plane"]["applied"]["inbound_policy"];
        Ok((applied != "pay-callers").then(|| format!("inbound policy {applied}")))
    })
    .await
    .must();

    let (order, stranger) = (&callers[0], &callers[1]);
    for _ in 0..3 {
        echo(order.1).await.must().expect("order may call pay");
    }
    let calls_before = stats(app.addr).await.must().calls;
    for _ in 0..3 {
        let status = echo(stranger.1)
            .await
            .must()
            .expect_err("stranger may not call pay");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(&spiffe("stranger")), "{status:?}");
    }
    assert_eq!(
        stats(app.addr).await.must().calls,
        calls_before,
        "a denied call reached the app"
    );
    let denied = pay
        .metric(
            "tern_authz_denied_total",
            &[("peer_identity", spiffe("stranger").as_str())],
        )
        .await
        .must();
    assert_eq!(denied, 3.0);
    let lines = pay.proc.stdout();
    let denied_lines = lines
        .lines()
        .filter(|l| l.contains("permission_denied") && l.contains(&spiffe("stranger")))
        .count();
    assert_eq!(
        denied_lines, 3,
        "access log lines of denied calls:\n{lines}"
    );
    check_identity_in_registry(&ca).await.must();
}

/// tern-control registered pay's endpoint under the identity its certificate proves.
async fn check_identity_in_registry(ca: &MeshCa) -> Result<()> {
    let state = ca.control.state().await?;
    let text = state.to_string();
    ensure!(
        text.contains(&spiffe("pay")),
        "pay's identity not in /state: {text}"
    );
    Ok(())
}
