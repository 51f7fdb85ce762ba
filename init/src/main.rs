//! The `tern-init` binary: validate the flags, pick the iptables back end,
//! then install the rules for IPv4 and, where the namespace has it, IPv6
//! (or, with `--dry-run`, print them).

use std::io::Write as _;

use clap::Parser;
use tern_init::args::Args;
use tern_init::rules::Family;
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
    if settings.inbound_ports.is_some() {
        eprintln!(
            "tern-init: warning: with --inbound-ports, every other inbound port reaches the app \
             around tern-proxy (plaintext, no authorization)"
        );
    }
    let backend = iptables::backend(args.iptables_mode);
    let families: &[Family] = match args.ipv6.wanted() {
        true => &[Family::V4, Family::V6],
        false => &[Family::V4],
    };
    let binaries: Vec<&str> = families.iter().map(|f| backend.binary(*f)).collect();
    if args.dry_run {
        let mut script = format!(
            "# tern-init --dry-run: the commands it would run ({}, nat table)\n",
            binaries.join(" and ")
        );
        for (family, binary) in families.iter().zip(&binaries) {
            for step in &rules::plan(&settings, *family) {
                script.push_str(&step.shell(binary));
                script.push('\n');
            }
        }
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = std::io::stdout().write_all(script.as_bytes());
        return;
    }
    for (family, binary) in families.iter().zip(&binaries) {
        if let Err(e) = iptables::apply(binary, &rules::plan(&settings, *family)) {
            eprintln!("tern-init: {e}");
            std::process::exit(1);
        }
    }
    let summary = format!(
        "tern-init: TCP redirected through tern-proxy (inbound → :{}, outbound → :{}) with {}; \
         not redirected: uid {}{}, loopback, admin port {}",
        settings.inbound_port,
        settings.outbound_port,
        binaries.join(" and "),
        settings.proxy_uid,
        settings
            .proxy_gid
            .map(|g| format!(", gid {g}"))
            .unwrap_or_default(),
        settings.admin_port,
    );
    let listing: String = binaries.iter().map(|b| iptables::listing(b)).collect();
    let _ = writeln!(std::io::stdout(), "{summary}\n{listing}");
}
