//! The `tern-init` binary: validate the flags, pick the iptables back end,
//! then install the rules (or, with `--dry-run`, print them).

use std::io::Write as _;

use clap::Parser;
use tern_init::args::Args;
use tern_init::{iptables, rules};

fn main() {
    let args = Args::parse();
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tern-init: {e}");
            std::process::exit(2);
        }
    };
    let steps = rules::plan(&settings);
    let binary = iptables::binary(args.iptables_mode);
    if args.dry_run {
        let mut script =
            format!("# tern-init --dry-run: the commands it would run ({binary}, nat table)\n");
        for step in &steps {
            script.push_str(&step.shell(binary));
            script.push('\n');
        }
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = std::io::stdout().write_all(script.as_bytes());
        return;
    }
    if let Err(e) = iptables::apply(binary, &steps) {
        eprintln!("tern-init: {e}");
        std::process::exit(1);
    }
    let summary = format!(
        "tern-init: TCP redirected through tern-proxy (inbound → :{}, outbound → :{}) with {binary}; \
         not redirected: uid {}{}, loopback, admin port {}",
        settings.inbound_port,
        settings.outbound_port,
        settings.proxy_uid,
        settings
            .proxy_gid
            .map(|g| format!(", gid {g}"))
            .unwrap_or_default(),
        settings.admin_port,
    );
    let _ = writeln!(
        std::io::stdout(),
        "{summary}\n{}",
        iptables::listing(binary)
    );
}
