//! HTTP/1.1 through the sidecars, with the demo chain: a raw client sends `POST /orders` to the
//! order app (through order's inbound sidecar), order calls pay over gRPC through its own sidecar's
//! `--upstream pay` port and pay's inbound sidecar. Two requests share one kept-alive connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use anyhow::{ensure, Context as _, Result};
use tern_tests::http1::Conn;
use tern_tests::process::START_TIMEOUT;
use tern_tests::{binary, free_addr, Must, Proc, Proxy, ProxySpec, Route, TestDir};

/// The demo chain; fields drop in order so processes stop before their log directory goes.
struct OrderChain {
    proxies: Vec<Proxy>,
    apps: Vec<Proc>,
    /// Where the HTTP client connects.
    target: SocketAddr,
    _dir: TestDir,
}

impl OrderChain {
    async fn start(route: Route) -> Result<Self> {
        let dir = TestDir::new(&format!("http1-{route:?}").to_lowercase())?;
        let mut apps = Vec::new();
        let mut proxies = Vec::new();

        let pay_args = ["--listen", "127.0.0.1:0", "--replica", "pay-1"].map(String::from);
        let mut pay = Proc::spawn(dir.path(), "pay-1", &binary("pay")?, &pay_args)?;
        let pay_addr = listening_addr(&mut pay, "pay listening on ").await?;
        apps.push(pay);

        // Order dials pay itself when direct, its sidecar's upstream port otherwise.
        let pay_dial = match route {
            Route::Direct => pay_addr,
            Route::Sidecars => {
                let pay_sidecar = Proxy::start(
                    dir.path(),
                    ProxySpec::new("pay-1-sidecar", "pay").inbound(pay_addr),
                )
                .await?;
                let upstream = free_addr()?;
                proxies.push(pay_sidecar);
                upstream
            }
        };
        let order_args = [
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--pay-host".to_string(),
            pay_dial.ip().to_string(),
            "--pay-port".to_string(),
            pay_dial.port().to_string(),
        ];
        let mut order = Proc::spawn(dir.path(), "order", &binary("order")?, &order_args)?;
        let order_addr = listening_addr(&mut order, "order listening on ").await?;
        apps.push(order);

        let target = match route {
            Route::Direct => order_addr,
            Route::Sidecars => {
                let pay_inbound = proxies[0].inbound;
                let spec = ProxySpec::new("order-sidecar", "order")
                    .inbound(order_addr)
                    .upstream("pay", pay_dial)
                    .endpoints("pay", &[pay_inbound]);
                let order_sidecar = Proxy::start(dir.path(), spec).await?;
                let target = order_sidecar.inbound;
                proxies.push(order_sidecar);
                target
            }
        };
        Ok(Self {
            proxies,
            apps,
            target,
            _dir: dir,
        })
    }

    fn diagnostics(&self) -> String {
        let apps = self.apps.iter().map(Proc::diagnostics);
        let proxies = self.proxies.iter().map(|p| p.proc.diagnostics());
        apps.chain(proxies).collect::<Vec<_>>().join("\n")
    }
}

/// The address from a "NAME listening on ADDR [more]" line.
async fn listening_addr(proc: &mut Proc, prefix: &str) -> Result<SocketAddr> {
    let rest = proc.wait_for_line(prefix, START_TIMEOUT).await?;
    let addr = rest.split_whitespace().next().unwrap_or_default();
    addr.parse()
        .with_context(|| format!("{} printed a bad address {rest:?}", proc.label()))
}

async fn two_orders_on_one_connection(chain: &OrderChain) -> Result<()> {
    let mut conn = Conn::connect(chain.target).await?;
    for n in 1..=2 {
        let body = format!(r#"{{"order_id":"o-{n}","amount_cents":1250,"currency":"EUR"}}"#);
        let response = conn
            .request(
                "POST",
                "/orders",
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            )
            .await
            .with_context(|| format!("request {n} on the shared connection"))?;
        ensure!(
            response.status == 200,
            "request {n}: status {} body {}",
            response.status,
            response.text()
        );
        let json: serde_json::Value = serde_json::from_slice(&response.body)
            .with_context(|| format!("request {n}: body is not JSON: {}", response.text()))?;
        ensure!(
            json["pay_replica"] == "pay-1",
            "request {n}: pay_replica {} in {json}",
            json["pay_replica"]
        );
        if n == 1 {
            let closing = response
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            ensure!(!closing, "the first response asked to close the connection");
        }
    }
    Ok(())
}

async fn run(route: Route) {
    let chain = OrderChain::start(route).await.must();
    if let Err(e) = two_orders_on_one_connection(&chain).await {
        panic!("{e:#}\n\n{}", chain.diagnostics());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_orders_direct() {
    run(Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_orders_sidecars() {
    run(Route::Sidecars).await;
}
