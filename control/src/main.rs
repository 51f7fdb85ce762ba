//! The `tern-control` binary: parse and check the flags, start the runtime, run.

use clap::Parser;
use tern_control::cli::{Args, ConfigSettings};

fn main() {
    let args = Args::parse();
    if args.check {
        // Only the directory matters to --check, so other flags are not checked.
        std::process::exit(check(&args.config()));
    }
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tern-control: {e:#}");
            std::process::exit(1);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tern-control: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(tern_control::app::run(settings)) {
        eprintln!("tern-control: {e:#}");
        std::process::exit(1);
    }
}

/// `--check`: validate the directory once, for CI on config repositories.
fn check(config: &ConfigSettings) -> i32 {
    match tern_control::config::load_dir_with(&config.dir, config.options) {
        Ok(c) => {
            println!(
                "{}: valid (services: {}, traffic policies: {}, authorization policies: {}, services with static endpoints: {})",
                config.dir.display(),
                c.services.len(),
                c.traffic.len(),
                c.authorization.len(),
                c.endpoints.len()
            );
            0
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            1
        }
    }
}
