//! Harness for Tern's end-to-end tests: real `tern-proxy`, demo and test-server processes on
//! loopback, started and stopped by the tests themselves.
//!
//! The tests need every workspace binary built with the same profile, so the test command is
//! `cargo build --workspace --bins && cargo test --workspace`. Cargo builds only this crate's own
//! binaries (`echo-server`) before its integration tests, and a nested `cargo build` from inside a
//! test would wait forever on the build-directory lock the running `cargo test` holds, so the
//! harness looks the binaries up next to the test executable and fails with that command in the
//! message when one is missing or older than its sources.
//!
//! Tests run on tokio's multi-thread runtime: a guard's drop blocks while its process drains,
//! and the client connections still open must keep being served meanwhile (a server's GOAWAY
//! gets answered), or every teardown would wait for the SIGKILL fallback.
//!
//! Every wait is bounded (see [`CALL_TIMEOUT`], [`process::START_TIMEOUT`]) so a broken proxy
//! fails a test quickly instead of hanging it. `TERN_E2E_KEEP=1` keeps each test's directory of
//! process logs.

pub mod checks;
pub mod containers;
pub mod control;
pub mod control_mesh;
pub mod demo;
pub mod go;
pub mod goaway_server;
pub mod http1;
pub mod identity;
pub mod k8s;
pub mod kube_api;
pub mod kube_watch;
pub mod load;
pub mod mesh;
pub mod metrics;
pub mod mtls;
pub mod netns;
pub mod otlp;
pub mod pay_mesh;
pub mod pods;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod python;
pub mod raw_grpc;
pub mod relay;
pub mod roots;
pub mod subscribe;

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Result};

pub use mesh::{App, EchoMesh, Route};
pub use process::{binary, free_addr, Proc, TestDir};
pub use proxy::{Proxy, ProxySpec};
pub use tern_test_support::dnsmasq as dns;
pub use tern_test_support::{in_ci, missing};

/// Bound on any single RPC or connect made by a test.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `fut`, failing if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("timed out after {limit:?}"))
}

/// Polls `check` until it returns `Ok(true)` or `limit` passes; returns the last observation
/// (from `describe`) in the error so the failure says what was seen.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(None) => return Ok(()),
            Ok(Some(observed)) => observed,
            Err(e) => format!("{e:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!("not reached within {limit:?}; last seen: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Unwrapping for test bodies that prints the whole error chain (and not a backtrace of the
/// harness) when a step fails.
pub trait Must<T> {
    fn must(self) -> T;
}

impl<T> Must<T> for Result<T> {
    #[track_caller]
    fn must(self) -> T {
        match self {
            Ok(value) => value,
            Err(e) => panic!("{e:#}"),
        }
    }
}
