//! Process plumbing shared by the demo binaries: diagnostic logging to stderr (`RUST_LOG`)
//! and the shutdown signal (SIGTERM or ctrl-c).

use tracing_subscriber::EnvFilter;

/// Diagnostics go to stderr so stdout stays machine-readable (listening lines, JSON).
/// Quiet by default: nothing is logged per request unless `RUST_LOG` asks for it.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on the first SIGTERM (what Kubernetes and `ternctl demo` send) or ctrl-c.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    Ok(()) = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); only ctrl-c stops this process");
                ctrl_c_or_never().await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c_or_never().await;
}

/// A failed ctrl-c registration must not look like a signal, or we would stop at once.
async fn ctrl_c_or_never() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
