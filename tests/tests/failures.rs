//! A service whose only endpoint is dead gets a clear UNAVAILABLE naming the service, while
//! another service on the same sidecar keeps working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tern_proto::test::v1::EchoRequest;
use tern_tests::mesh::{connect, echo_client};
use tern_tests::{free_addr, within, App, Must, Proxy, ProxySpec, TestDir};
use tonic::Code;

/// A name that cannot appear in a status message by accident.
const DEAD_SERVICE: &str = "ghost";
/// Connect refused is immediate; the proxy's connect timeout (1 s default) bounds the rest.
const CALL_TIMEOUT_DEAD: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_only_endpoint_is_unavailable_and_other_service_works() {
    let dir = TestDir::new("failures").must();
    let app = App::echo_server(dir.path(), "echo-1").await.must();
    let echo_sidecar = Proxy::start(
        dir.path(),
        ProxySpec::new("echo-1-sidecar", "echo").inbound(app.addr),
    )
    .await
    .must();
    // Probed free and never bound: connecting there is refused.
    let dead = free_addr().must();
    let spec = ProxySpec::new("client-sidecar", "client")
        .upstream(DEAD_SERVICE, free_addr().must())
        .endpoints(DEAD_SERVICE, &[dead])
        .upstream("echo", free_addr().must())
        .endpoints("echo", &[echo_sidecar.inbound]);
    let client_sidecar = Proxy::start(dir.path(), spec).await.must();
    let diagnostics = || {
        format!(
            "{}\n{}",
            client_sidecar.proc.diagnostics(),
            echo_sidecar.proc.diagnostics()
        )
    };

    let mut ghost = echo_client(
        connect(client_sidecar.upstream(DEAD_SERVICE).must())
            .await
            .must(),
    );
    let mut echo = echo_client(connect(client_sidecar.upstream("echo").must()).await.must());
    for round in 1..=3 {
        let start = Instant::now();
        let (dead_result, live_result) = tokio::join!(
            within(CALL_TIMEOUT_DEAD, ghost.unary(EchoRequest::default())),
            within(
                Duration::from_secs(10),
                echo.unary(EchoRequest {
                    message: format!("round {round}"),
                    ..EchoRequest::default()
                })
            ),
        );
        let status = match dead_result {
            Err(e) => panic!(
                "round {round}: the call to {DEAD_SERVICE} hung: {e:#}\n{}",
                diagnostics()
            ),
            Ok(Ok(reply)) => panic!("round {round}: {DEAD_SERVICE} answered {reply:?}"),
            Ok(Err(status)) => status,
        };
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "round {round}: {status:?}\n{}",
            diagnostics()
        );
        assert!(
            status.message().contains(DEAD_SERVICE),
            "round {round}: UNAVAILABLE message {:?} does not name {DEAD_SERVICE}",
            status.message()
        );
        let reply = live_result
            .unwrap_or_else(|e| panic!("round {round}: echo hung: {e:#}"))
            .unwrap_or_else(|s| panic!("round {round}: echo failed: {s:?}\n{}", diagnostics()))
            .into_inner();
        assert_eq!(reply.message, format!("round {round}"));
        assert_eq!(reply.server, "echo-1");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "round {round} took {:?}: a refused connect should fail fast",
            start.elapsed()
        );
    }
}
