//! The `tern-proxy` binary: parse bootstrap config, start the runtime, run.

use clap::Parser;
use tern_proxy::config::args::Args;

/// jemalloc, with its background thread purging freed pages (after its
/// decay time, 10 s), gives memory back after a burst; glibc's malloc kept
/// ~270 MiB after three rounds of 9,000 idle connections had closed.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let args = Args::parse();
    let (file, config) = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern-proxy: {e}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc background purging not enabled");
    }
    let runtime = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern-proxy: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(tern_proxy::app::run(config, file)) {
        eprintln!("tern-proxy: {e:#}");
        std::process::exit(1);
    }
}
