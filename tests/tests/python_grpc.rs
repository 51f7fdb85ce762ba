//! Tern is transparent to a gRPC stack other than tonic's: a Python grpcio client calls the
//! tonic echo server, and the tonic client calls a Python grpcio echo server, each direct and
//! through two sidecars, with the same checks as `grpc_transparency.rs`.
//!
//! Without grpcio the tests fail under `CI=true` and are skipped loudly elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tern_tests::{checks, python, App, EchoMesh, Must, Route, TestDir};

/// False (after a loud skip notice) when grpcio is missing outside CI; panics under CI.
async fn grpcio_ready() -> bool {
    if python::grpcio_installed().await {
        return true;
    }
    tern_tests::missing("python grpcio not installed (python3 -m pip install grpcio grpcio-tools)")
        .must();
    false
}

async fn python_client(route: Route) {
    if !grpcio_ready().await {
        return;
    }
    let label = format!("py-client-{route:?}").to_lowercase();
    let mesh = EchoMesh::start(&label, route, 1).await.must();
    let stubs = mesh.ok(python::generate_stubs(mesh.dir.path()).await);
    let app = &mesh.apps[0];
    let report =
        mesh.ok(
            python::run_client(mesh.dir.path(), &stubs, mesh.target, app.addr, &app.name).await,
        );
    eprintln!("{report}");
}

async fn python_server(route: Route) {
    if !grpcio_ready().await {
        return;
    }
    let label = format!("py-server-{route:?}").to_lowercase();
    let dir = TestDir::new(&label).must();
    let stubs = python::generate_stubs(dir.path()).await.must();
    let app: App = python::start_server(dir.path(), &stubs, "echo-py")
        .await
        .must();
    let mesh = EchoMesh::around(dir, route, vec![app]).await.must();
    let target = mesh.ok(mesh.check_target());
    mesh.ok(checks::run_all(&target).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_direct() {
    python_client(Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_sidecars() {
    python_client(Route::Sidecars).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_server_direct() {
    python_server(Route::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_server_sidecars() {
    python_server(Route::Sidecars).await;
}
