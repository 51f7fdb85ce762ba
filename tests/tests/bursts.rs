//! What a burst of concurrent calls leaves behind. HTTP/2 connections keep a slot for every
//! stream they ever held at once (h2 never shrinks its stream slab), so the client sidecar's one
//! upstream connection, which carries every caller's streams, would keep a burst's memory for
//! as long as it lives. After a burst it is replaced; an ordinary load keeps its connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tern_proto::test::v1::EchoRequest;
use tern_tests::{eventually, within, EchoMesh, Must, Route};
use tokio::task::JoinSet;

const UPSTREAM_OPEN: &str = "tern_upstream_open_connections";
/// Every call waits this long at the app, so a burst's calls are all in flight at once.
const DELAY_MS: u32 = 500;

/// `calls` calls held at the app at once, spread over `channels` client connections (the
/// client sidecar takes 200 streams per connection). All must succeed.
async fn burst(mesh: &EchoMesh, calls: usize, channels: usize) {
    let mut clients = Vec::new();
    for _ in 0..channels {
        clients.push(mesh.ok(mesh.client().await));
    }
    let mut set = JoinSet::new();
    for i in 0..calls {
        let mut client = clients[i % channels].clone();
        set.spawn(async move {
            let req = EchoRequest {
                message: format!("burst {i}"),
                delay_ms: DELAY_MS,
                ..Default::default()
            };
            within(Duration::from_secs(30), client.unary(req)).await
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(Ok(Ok(_)))) {
            ok += 1;
        }
    }
    assert_eq!(ok, calls, "calls of the burst that succeeded");
}

async fn upstream_open(mesh: &EchoMesh) -> anyhow::Result<f64> {
    let client = mesh.client.as_ref().expect("a client sidecar");
    client.metric(UPSTREAM_OPEN, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_leaves_no_oversized_upstream_connection() {
    let mesh = EchoMesh::start("bursts", Route::Sidecars, 1).await.must();

    // An ordinary load: the connection stays for the next calls.
    burst(&mesh, 100, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mesh.ok(upstream_open(&mesh).await), 1.0);

    // 600 at once (the inbound sidecar takes 200; the rest queue on the connection): once
    // they are done, the connection that held them closes.
    burst(&mesh, 600, 4).await;
    let closed = eventually(Duration::from_secs(10), || async {
        let open = upstream_open(&mesh).await?;
        Ok((open != 0.0).then(|| format!("{open} upstream connections open")))
    })
    .await;
    mesh.ok(closed);

    // The next calls open a fresh one.
    burst(&mesh, 10, 1).await;
    assert_eq!(mesh.ok(upstream_open(&mesh).await), 1.0);
}
