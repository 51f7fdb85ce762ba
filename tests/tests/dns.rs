//! DNS discovery through the proxy, against a real dnsmasq: `echo.mesh.test` has one A record
//! per echo server (each on its own loopback address, all on the same port), with a 1 s TTL; the
//! client sidecar balances over whatever the name resolves to and follows changes to it.
//!
//! Without dnsmasq the test is skipped loudly, except under `CI=true` where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tern_proto::test::v1::EchoRequest;
use tern_tests::dns::{dnsmasq_binary, Dnsmasq, TTL};
use tern_tests::mesh::{connect, echo_client, stats};
use tern_tests::process::binary;
use tern_tests::{eventually, free_addr, within, App, Must, Proxy, ProxySpec, TestDir};

const NAME: &str = "echo.mesh.test";
const SERVICE: &str = "echo";
/// Loopback addresses of the echo servers; the first two are in DNS from the start.
const IPS: [[u8; 4]; 3] = [[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]];

fn hosts(n: usize) -> String {
    IPS[..n]
        .iter()
        .map(|ip| format!("{}.{}.{}.{} {NAME}\n", ip[0], ip[1], ip[2], ip[3]))
        .collect()
}

/// Three echo servers on the same port of 127.0.0.2, .3 and .4 (loopback aliases need no
/// setup on Linux). A port free on 127.0.0.1 is nearly always free on the others; if not, the
/// next one is tried.
async fn echo_servers(dir: &TestDir) -> (u16, Vec<App>) {
    let program = binary("echo-server").must();
    let mut last = None;
    for _ in 0..5 {
        let port = free_addr().must().port();
        let mut apps = Vec::new();
        for (i, ip) in IPS.iter().enumerate() {
            let listen = SocketAddr::from((*ip, port));
            let name = format!("echo-{}", i + 1);
            let args = [
                "--listen".to_string(),
                listen.to_string(),
                "--name".to_string(),
                name.clone(),
            ];
            let label = format!("{name}-port{port}");
            match App::start(dir.path(), &label, &program, &args).await {
                Ok(app) => apps.push(app),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        if apps.len() == IPS.len() {
            return (port, apps);
        }
    }
    panic!("cannot start the echo servers: {:#}", last.unwrap());
}

/// Calls made per observation while waiting for traffic to spread.
const BURST: usize = 6;

/// A few calls through the sidecar; failures are tolerated (no endpoints yet, say).
async fn burst(target: SocketAddr) {
    let Ok(channel) = connect(target).await else {
        return;
    };
    let mut client = echo_client(channel);
    for i in 0..BURST {
        let req = EchoRequest {
            message: format!("dns {i}"),
            ..EchoRequest::default()
        };
        let _ = within(Duration::from_secs(2), client.unary(req)).await;
    }
}

/// Calls each server counted, asked directly.
async fn counts(apps: &[App]) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    for app in apps {
        out.push(stats(app.addr).await?.calls);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoints_are_balanced_and_follow_record_changes() {
    let Some(dnsmasq_path) = dnsmasq_binary() else {
        tern_tests::missing("dnsmasq not installed (Debian package dnsmasq)").must();
        return;
    };
    let dir = TestDir::new("dns").must();
    let (port, apps) = echo_servers(&dir).await;
    let dns = Dnsmasq::start(&dnsmasq_path, dir.path(), &hosts(2), &[])
        .await
        .must();
    let upstream = free_addr().must();
    let mut spec = ProxySpec::new("client-sidecar", "client").upstream(SERVICE, upstream);
    spec.extra_args = vec![
        "--dns".to_string(),
        format!("{SERVICE}={NAME}:{port}"),
        "--dns-nameserver".to_string(),
        dns.addr.to_string(),
    ];
    let client = Proxy::start(dir.path(), spec).await.must();
    let diagnostics = || {
        let mut out = vec![client.proc.diagnostics(), dns.proc.diagnostics()];
        out.extend(apps.iter().map(|a| a.proc.diagnostics()));
        out.join("\n")
    };
    let endpoints = || client.metric("tern_endpoints", &[("service", SERVICE)]);

    // Both servers the name resolves to get calls; the third, not in DNS yet, none.
    let spread = eventually(Duration::from_secs(5), || async {
        burst(upstream).await;
        let seen = counts(&apps).await?;
        Ok((seen[0] == 0 || seen[1] == 0).then(|| format!("calls per server {seen:?}")))
    })
    .await;
    if let Err(e) = spread {
        panic!("{e:#}\n{}", diagnostics());
    }
    let before = counts(&apps).await.must();
    assert_eq!(before[2], 0, "a server not in DNS got calls: {before:?}");
    assert_eq!(
        endpoints().await.must(),
        2.0,
        "tern_endpoints before the change"
    );

    dns.set_hosts(&hosts(3)).must();
    let changed = Instant::now();
    let joined = eventually(Duration::from_secs(3), || async {
        burst(upstream).await;
        let seen = counts(&apps).await?;
        Ok((seen[2] == 0).then(|| format!("calls per server {seen:?}")))
    })
    .await;
    let took = changed.elapsed();
    if let Err(e) = joined {
        panic!(
            "the server added to DNS got no calls: {e:#}\n{}",
            diagnostics()
        );
    }
    eprintln!("the added server got calls {took:?} after the records changed");
    assert!(
        took <= TTL + Duration::from_secs(1),
        "the added server got its first call {took:?} after the change, TTL is {TTL:?}"
    );
    assert_eq!(
        endpoints().await.must(),
        3.0,
        "tern_endpoints after the change"
    );
}
