//! Command-line flags, each also settable through a `TERN_CONTROL_*`
//! environment variable (Kubernetes sets env, not args). Flags win.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "tern-control",
    version,
    about = "Tern control plane: watches the mesh config, keeps the workload registry and pushes snapshots to sidecars."
)]
pub struct Args {
    /// Directory of mesh config YAML documents (*.yaml, *.yml); watched, and every valid change is pushed.
    #[arg(long, env = "TERN_CONTROL_CONFIG_DIR")]
    pub config_dir: PathBuf,

    /// Listener for the sidecars' gRPC Subscribe streams (port 0: any free port).
    #[arg(
        long,
        env = "TERN_CONTROL_GRPC_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    pub grpc_listen: SocketAddr,

    /// Admin listener: /metrics, /ready, /state (port 0: any free port).
    #[arg(
        long,
        env = "TERN_CONTROL_ADMIN_LISTEN",
        default_value = "127.0.0.1:9990"
    )]
    pub admin_listen: SocketAddr,

    /// How long a registered endpoint outlives its sidecar's stream, so a reconnect does not churn callers.
    #[arg(
        long,
        env = "TERN_CONTROL_REGISTRATION_GRACE",
        default_value = "1s",
        value_parser = humantime::parse_duration
    )]
    pub registration_grace: Duration,

    /// Quiet time after a change in the config directory before it is read, so a save is read whole
    /// (after a file is closed by its writer or renamed into place: 10ms).
    #[arg(
        long,
        env = "TERN_CONTROL_DEBOUNCE",
        default_value = "100ms",
        value_parser = humantime::parse_duration
    )]
    pub debounce: Duration,

    /// Tokio worker threads [default: one per core].
    #[arg(long, env = "TERN_CONTROL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Diagnostic log filter (tracing EnvFilter syntax), written to stderr.
    #[arg(long = "log", env = "TERN_CONTROL_LOG", default_value = "info")]
    pub log: String,

    /// Only validate the config directory: print each error (or "valid") and exit 0 if valid, 1 if not.
    #[arg(long, env = "TERN_CONTROL_CHECK")]
    pub check: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults() {
        let a = Args::try_parse_from(["tern-control", "--config-dir", "/etc/tern"]).unwrap();
        assert_eq!(a.grpc_listen, "127.0.0.1:8090".parse().unwrap());
        assert_eq!(a.admin_listen, "127.0.0.1:9990".parse().unwrap());
        assert_eq!(a.registration_grace, Duration::from_secs(1));
        assert_eq!(a.debounce, Duration::from_millis(100));
        let a = Args::try_parse_from([
            "tern-control",
            "--config-dir=/x",
            "--registration-grace=250ms",
            "--grpc-listen=127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(a.registration_grace, Duration::from_millis(250));
        assert_eq!(a.grpc_listen.port(), 0);
        assert!(Args::try_parse_from([
            "tern-control",
            "--config-dir=/x",
            "--registration-grace=soon"
        ])
        .is_err());
    }
}
