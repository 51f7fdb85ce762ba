//! `ternctl`: run the meshed demo on loopback, benchmark the proxy, mint
//! bootstrap tokens for tern-control's CA, inject the sidecar into
//! Kubernetes manifests, or look at a running mesh (`check`, `stat`,
//! `dashboard`, `tap`, `explain`).

mod admin_client;
mod bench;
mod check;
mod dashboard;
mod demo;
mod explain;
mod golden;
mod inject;
mod mesh_state;
mod procs;
mod prom_text;
mod scrape;
mod stat;
mod tap;
mod token;
mod trace_sink;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ternctl", version, about = "Tern's command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run order → pay (two replicas), each behind its own tern-proxy, with load, on loopback.
    Demo(demo::DemoArgs),
    /// Measure gRPC unary traffic direct, through one sidecar and through two.
    Bench(bench::BenchArgs),
    /// Bootstrap tokens: how a workload proves its service account to tern-control's CA.
    Token(token::TokenArgs),
    /// Add the tern-proxy sidecar and its init step to Kubernetes workloads (YAML in, YAML out).
    Inject(inject::InjectArgs),
    /// Is the mesh healthy? ✔/✖ per check with a fix hint; exit code 0 only when all pass.
    Check(check::CheckArgs),
    /// Golden metrics per service and route: request rate, success, latency, mTLS share.
    Stat(stat::StatArgs),
    /// A live HTML dashboard of the mesh, served on loopback.
    Dashboard(dashboard::DashboardArgs),
    /// Watch the requests passing through sidecars, live (metadata only, no bodies).
    Tap(tap::TapArgs),
    /// Show what a sidecar does with a request: route rule, backends, endpoints, policy, authorization.
    Explain(explain::ExplainArgs),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ternctl: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async {
        let result = match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Token(args) => token::run(args),
            Command::Inject(args) => inject::run(args),
            Command::Check(args) => check::run(args).await,
            Command::Stat(args) => stat::run(args).await,
            Command::Dashboard(args) => dashboard::run(args).await,
            Command::Tap(args) => tap::run(args).await,
            Command::Explain(args) => explain::run(args).await,
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ternctl: {e:#}");
                1
            }
        }
    });
    std::process::exit(code);
}
