//! Per-request load balancing: 999 unary calls on ONE client connection, through the client
//! sidecar, spread evenly over three echo endpoints (counted by the servers themselves).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use futures::{StreamExt as _, TryStreamExt as _};
use tern_proto::test::v1::EchoRequest;
use tern_tests::{within, EchoMesh, Must, Route, CALL_TIMEOUT};

const CALLS: usize = 999;
/// Enough in flight to exercise the balancer under concurrency, few enough for a 2-core box.
const CONCURRENCY: usize = 8;

/// Makes `calls` unary calls on one channel; returns how many replies each server name gave.
async fn call_many(mesh: &EchoMesh, calls: usize) -> HashMap<String, u64> {
    let client = mesh.ok(mesh.client().await);
    let replies: Vec<String> = mesh.ok(futures::stream::iter(0..calls)
        .map(|i| {
            let mut client = client.clone();
            async move {
                let req = EchoRequest {
                    message: format!("call {i}"),
                    ..EchoRequest::default()
                };
                let reply = within(CALL_TIMEOUT, client.unary(req)).await??;
                anyhow::Ok(reply.into_inner().server)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await);
    let mut by_server = HashMap::new();
    for server in replies {
        *by_server.entry(server).or_insert(0) += 1;
    }
    by_server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_per_request_over_three_endpoints() {
    let mesh = EchoMesh::start("balance", Route::Sidecars, 3).await.must();
    let replies = call_many(&mesh, CALLS).await;
    let mut counted = 0;
    for i in 0..3 {
        let stats = mesh.ok(mesh.stats(i).await);
        counted += stats.calls;
        assert!(
            (332..=334).contains(&stats.calls),
            "{} served {} of {CALLS} calls, expected 333 ± 1 (replies by server: {replies:?})",
            stats.server,
            stats.calls
        );
        assert_eq!(replies.get(&stats.server).copied(), Some(stats.calls));
    }
    assert_eq!(counted, CALLS as u64, "servers counted {counted} calls");
}

/// Without a proxy every call lands on the one server dialled: the counters the balance test
/// relies on are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_calls_are_counted_exactly() {
    let mesh = EchoMesh::start("balance-direct", Route::Direct, 1)
        .await
        .must();
    let replies = call_many(&mesh, 300).await;
    let stats = mesh.ok(mesh.stats(0).await);
    assert_eq!(stats.calls, 300);
    assert_eq!(replies.get("echo-1").copied(), Some(300));
}
