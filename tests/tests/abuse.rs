//! One bad client must never hurt another: each attack runs against two sidecars in front of a
//! real gRPC server while well-behaved clients call alongside, and the test asserts that the
//! attacker is answered or cut off, the app sees nothing it should not, the others keep 100%
//! success, and the sidecars count what happened.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tern_proto::test::v1::EchoRequest;
use tern_tests::{python, raw_grpc, within, App, EchoMesh, Must, Route, TestDir, CALL_TIMEOUT};

const UNARY: &str = "/tern.test.v1.Echo/Unary";
/// gRPC INTERNAL: what gRPC servers answer to a malformed `grpc-timeout`.
const INTERNAL: u32 = 13;

/// `n` unary calls on one fresh channel; all must succeed.
async fn well_behaved_calls(mesh: &EchoMesh, n: usize) -> anyhow::Result<()> {
    let mut client = mesh.client().await?;
    for i in 0..n {
        let req = EchoRequest {
            message: format!("call {i}"),
            ..Default::default()
        };
        within(CALL_TIMEOUT, client.unary(req))
            .await?
            .map_err(|s| anyhow::anyhow!("call {i} failed: {s:?}"))?;
    }
    Ok(())
}

/// A malformed `grpc-timeout` is answered INTERNAL by the first sidecar and never forwarded:
/// grpcio fails every later call on a connection that carried one, and the sidecars share that
/// connection among all their callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grpc_timeout_is_answered_by_the_proxy() {
    if !python::grpcio_installed().await {
        tern_tests::missing("python grpcio not installed").must();
        return;
    }
    let dir = TestDir::new("abuse-grpc-timeout").must();
    let stubs = python::generate_stubs(dir.path()).await.must();
    let app: App = python::start_server(dir.path(), &stubs, "echo-py")
        .await
        .must();
    let mesh = EchoMesh::around(dir, Route::Sidecars, vec![app])
        .await
        .must();
    mesh.ok(well_behaved_calls(&mesh, 3).await);
    let calls_before = mesh.ok(mesh.stats(0).await).calls;
    let req = EchoRequest::default();
    for bad in ["-1S", "abc", "99999999999H", "1000000000n", "", "1.5S"] {
        let reply = within(
            CALL_TIMEOUT,
            raw_grpc::unary(mesh.target, UNARY, &req, &[("grpc-timeout", bad)]),
        )
        .await
        .and_then(|r| r);
        let reply = mesh.ok(reply);
        assert_eq!(reply.grpc_status(), Some(INTERNAL), "{bad:?}: {reply:?}");
        assert!(
            reply.header("x-tern-proxy-error").is_some(),
            "{bad:?}: the proxy must say it answered: {reply:?}"
        );
        mesh.ok(well_behaved_calls(&mesh, 5).await);
    }
    // A valid one is honoured and passed on canonically.
    let reply = within(
        CALL_TIMEOUT,
        raw_grpc::unary(mesh.target, UNARY, &req, &[("grpc-timeout", "00005S")]),
    )
    .await
    .and_then(|r| r);
    assert_eq!(mesh.ok(reply).grpc_status(), Some(0));
    let stats = mesh.ok(mesh.stats(0).await);
    assert_eq!(
        stats.calls,
        calls_before + 6 * 5 + 1,
        "the app saw only the well-behaved calls"
    );
    let client = mesh.client.as_ref().expect("client sidecar");
    let rejected = mesh.ok(client
        .metric(
            "tern_proxy_errors_total",
            &[("reason", "invalid_grpc_timeout")],
        )
        .await);
    assert_eq!(rejected, 6.0);
}
