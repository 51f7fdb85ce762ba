//! `ternctl inject`: adds the Tern sidecar to every workload of a multi-document YAML file (or
//! stdin) and prints the result, ready for `kubectl apply -f -`.
//!
//! The mutation is `tern_inject`'s, the same one tern-control's admission webhook serves. What
//! happened to each document goes to stderr; on any error nothing is printed to stdout, so a
//! pipe into kubectl applies nothing half-injected.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

#[derive(Args)]
pub struct InjectArgs {
    /// Kubernetes YAML (one or more documents); `-` or nothing reads stdin.
    file: Option<PathBuf>,

    /// Run the proxy as a native sidecar (an init container with restartPolicy: Always) in
    /// every pod; Jobs, CronJobs and pods that run to completion get one anyway.
    #[arg(long)]
    native_sidecar: bool,

    /// The proxy image.
    #[arg(long, default_value_t = tern_inject::default_proxy_image())]
    proxy_image: String,

    /// The image holding `tern-init`, which installs the iptables redirects.
    #[arg(long, default_value_t = tern_inject::default_init_image())]
    init_image: String,

    /// Say nothing on stderr about each document.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: InjectArgs) -> anyhow::Result<i32> {
    let (source, input) = match args.file.as_deref() {
        None => ("stdin".to_owned(), read_stdin()?),
        Some(p) if p.as_os_str() == "-" => ("stdin".to_owned(), read_stdin()?),
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
    };
    let options = tern_inject::Options {
        proxy_image: args.proxy_image,
        init_image: args.init_image,
        native_sidecar: args.native_sidecar,
    };
    let injected = tern_inject::inject_yaml(&input, &options).with_context(|| source.clone())?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(injected.output.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    if !args.quiet {
        let mut stderr = std::io::stderr().lock();
        for report in &injected.reports {
            let _ = writeln!(stderr, "{source}: {report}");
        }
    }
    Ok(0)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    Ok(input)
}
