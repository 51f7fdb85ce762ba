//! Graceful shutdown: on SIGTERM a sidecar stops accepting, lets its in-flight calls finish and
//! exits 0 within its drain grace period. The same is checked of the echo server itself, which
//! the other tests rely on for a clean teardown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tern_proto::test::v1::{EchoReply, EchoRequest};
use tern_tests::mesh::stats;
use tern_tests::{eventually, within, App, EchoMesh, Must, Proc, Route, TestDir, CALL_TIMEOUT};
use tokio::task::JoinHandle;

const IN_FLIGHT: usize = 5;
const DELAY_MS: u32 = 1000;
const GRACE: Duration = Duration::from_secs(5);

type Call = JoinHandle<anyhow::Result<EchoReply>>;

/// Starts the slow calls and returns once the server is working on all of them.
async fn start_slow_calls(mesh: &EchoMesh) -> Vec<Call> {
    let client = mesh.ok(mesh.client().await);
    let calls = (0..IN_FLIGHT)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let req = EchoRequest {
                    message: format!("in flight {i}"),
                    delay_ms: DELAY_MS,
                    ..EchoRequest::default()
                };
                Ok(within(CALL_TIMEOUT, client.unary(req)).await??.into_inner())
            })
        })
        .collect();
    let direct = mesh.apps[0].addr;
    mesh.ok(eventually(Duration::from_secs(5), move || async move {
        let calls = stats(direct).await?.calls;
        Ok((calls < IN_FLIGHT as u64).then(|| format!("{calls} calls at the server")))
    })
    .await);
    calls
}

/// Waits until connecting to `addr` is refused.
async fn refused(addr: SocketAddr) -> anyhow::Result<()> {
    eventually(Duration::from_secs(2), move || async move {
        Ok(match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => None,
            Err(e) => Some(format!("connect failed otherwise: {e}")),
            Ok(_) => Some("a new connection was accepted".to_string()),
        })
    })
    .await
}

/// Sends SIGTERM to `proc` (listening on `addr`) with calls in flight and checks the drain.
async fn drain(
    mesh: &mut EchoMesh,
    calls: Vec<Call>,
    pick: fn(&mut EchoMesh) -> (&mut Proc, SocketAddr),
) {
    let (proc, addr) = pick(mesh);
    proc.signal(Signal::SIGTERM).must();
    let signalled = Instant::now();
    let refusal = refused(addr).await;
    let alive_after_refusal = matches!(proc.try_status(), Ok(None));
    let (proc, _) = pick(mesh);
    let label = proc.label().to_string();
    let exit = proc.wait_exit(GRACE + Duration::from_secs(2)).await;
    let exited_after = signalled.elapsed();
    mesh.ok(refusal.map_err(|e| e.context(format!("connecting to {label} after SIGTERM"))));
    assert!(
        alive_after_refusal,
        "{label} exited instead of draining its {IN_FLIGHT} calls"
    );
    for (i, call) in calls.into_iter().enumerate() {
        let reply = mesh.ok(call.await.map_err(anyhow::Error::from).and_then(|r| r));
        assert_eq!(reply.message, format!("in flight {i}"));
    }
    let status = mesh.ok(exit);
    assert_eq!(
        status.code(),
        Some(0),
        "{label} exited with {status} after SIGTERM"
    );
    assert!(
        exited_after <= GRACE,
        "{label} took {exited_after:?} to exit, grace is {GRACE:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_drains_in_flight_calls_on_sigterm() {
    let dir = TestDir::new("lifecycle-sidecar").must();
    let app = App::echo_server(dir.path(), "echo-1").await.must();
    let mut mesh = EchoMesh::around_with(dir, Route::Sidecars, vec![app], &|spec| {
        spec.drain_grace(GRACE)
    })
    .await
    .must();
    let calls = start_slow_calls(&mesh).await;
    drain(&mut mesh, calls, |mesh| {
        let sidecar = &mut mesh.inbound[0];
        (&mut sidecar.proc, sidecar.inbound)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_server_drains_in_flight_calls_on_sigterm() {
    let mut mesh = EchoMesh::start("lifecycle-echo", Route::Direct, 1)
        .await
        .must();
    let calls = start_slow_calls(&mesh).await;
    drain(&mut mesh, calls, |mesh| {
        let app = &mut mesh.apps[0];
        (&mut app.proc, app.addr)
    })
    .await;
}
