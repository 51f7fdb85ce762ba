//! gRPC passes through two Tern sidecars unchanged: every call kind, ASCII and `-bin` metadata,
//! trailers, non-OK statuses with unicode messages, 5 MiB messages, cancellation and deadlines.
//!
//! Each check runs twice: `direct` (client → echo server, proving the check and the harness) and
//! `sidecars` (client → client sidecar → echo's inbound sidecar → echo server). A third run,
//! `content_length`, takes the sidecar route to an echo server that announces the size of its
//! unary responses with `content-length`, as plain HTTP/2 servers do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tern_tests::{checks, App, EchoMesh, Must, Route, TestDir};

async fn run_check(name: &str, route: Route) {
    let label = format!("{name}-{route:?}").to_lowercase();
    let mesh = EchoMesh::start(&label, route, 1).await.must();
    check_on(name, mesh).await;
}

async fn run_check_content_length(name: &str) {
    let dir = TestDir::new(&format!("{name}-content-length")).must();
    let app = App::echo_server_with(dir.path(), "echo-1", &["--content-length"])
        .await
        .must();
    let mesh = EchoMesh::around(dir, Route::Sidecars, vec![app])
        .await
        .must();
    check_on(name, mesh).await;
}

async fn check_on(name: &str, mesh: EchoMesh) {
    let route = mesh.route;
    let target = mesh.ok(mesh.check_target());
    let result = match name {
        "unary" => checks::unary(&target).await,
        "server_stream" => checks::server_stream(&target).await,
        "client_stream" => checks::client_stream(&target).await,
        "bidi_stream" => checks::bidi_stream(&target).await,
        "metadata" => checks::metadata(&target).await,
        "trailers" => checks::trailers(&target).await,
        "error_status" => checks::error_status(&target).await,
        "large_messages" => checks::large_messages(&target).await,
        "cancellation" => checks::cancellation(&target).await,
        "deadline" => checks::deadline(&target).await,
        other => panic!("no check named {other}"),
    };
    mesh.ok(result.map_err(|e| e.context(format!("{name} via {route:?}"))));
}

/// One module per check, with a `direct`, a `sidecars` and a `content_length` test in each.
macro_rules! on_both_routes {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn direct() {
                run_check(stringify!($check), Route::Direct).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sidecars() {
                run_check(stringify!($check), Route::Sidecars).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn content_length() {
                run_check_content_length(stringify!($check)).await;
            }
        }
    )*};
}

on_both_routes!(
    unary,
    server_stream,
    client_stream,
    bidi_stream,
    metadata,
    trailers,
    error_status,
    large_messages,
    cancellation,
    deadline,
);
