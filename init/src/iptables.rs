//! Which iptables to drive, and driving it.
//!
//! Both back ends can be present (`iptables-nft` and `iptables-legacy`), and
//! rules must go where the kernel's other rules already are, or the two
//! sets would be evaluated separately. `auto` counts the rules each back
//! end's `-save` lists, IPv4 and IPv6 together, and picks the one holding
//! more (the way kube-proxy's iptables wrapper decides); with none anywhere
//! (a fresh pod) it uses the system's default `iptables`. IPv4 and IPv6 use
//! the same back end: `ip6tables-nft` goes with `iptables-nft`.

use std::io;
use std::process::{Command, Output};

use crate::args::Mode;
use crate::rules::{Family, Step};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{binary} not found in PATH (install iptables, or pick another --iptables-mode)")]
    Missing { binary: String },
    #[error("could not run {binary}: {source}")]
    Spawn { binary: String, source: io::Error },
    #[error("`{command}` failed ({status}): {stderr}{hint}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
        hint: &'static str,
    },
}

/// An iptables back end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Whatever `iptables` and `ip6tables` are on this system.
    System,
    Nft,
    Legacy,
}

impl Backend {
    /// The binary that drives `family` with this back end.
    pub fn binary(self, family: Family) -> &'static str {
        match (self, family) {
            (Self::System, Family::V4) => "iptables",
            (Self::System, Family::V6) => "ip6tables",
            (Self::Nft, Family::V4) => "iptables-nft",
            (Self::Nft, Family::V6) => "ip6tables-nft",
            (Self::Legacy, Family::V4) => "iptables-legacy",
            (Self::Legacy, Family::V6) => "ip6tables-legacy",
        }
    }
}

/// The back end `mode` names; `auto` looks at the rules in place.
pub fn backend(mode: Mode) -> Backend {
    match mode {
        Mode::Nft => Backend::Nft,
        Mode::Legacy => Backend::Legacy,
        Mode::Auto => detect(),
    }
}

fn detect() -> Backend {
    let legacy = count_rules("iptables-legacy-save") + count_rules("ip6tables-legacy-save");
    let nft = count_rules("iptables-nft-save") + count_rules("ip6tables-nft-save");
    choose(legacy, nft)
}

/// Picks the back end from the number of rules each holds.
pub fn choose(legacy: usize, nft: usize) -> Backend {
    if legacy > nft {
        Backend::Legacy
    } else if nft > 0 {
        Backend::Nft
    } else {
        Backend::System
    }
}

/// Rules (`-A` lines) a `-save` binary lists; 0 when it is missing or fails.
fn count_rules(save: &str) -> usize {
    match Command::new(save).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count(),
        _ => 0,
    }
}

/// Runs every step with `binary`, stopping at the first failure.
pub fn apply(binary: &str, steps: &[Step]) -> Result<(), Error> {
    for step in steps {
        if let Some(check) = step.check_args() {
            if run(binary, &check)?.status.success() {
                continue;
            }
        }
        let args = step.args();
        let out = run(binary, &args)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            let hint = if stderr.contains("ermission denied") || stderr.contains("must be root") {
                " (tern-init needs root or the NET_ADMIN capability)"
            } else {
                ""
            };
            return Err(Error::Failed {
                command: format!("{binary} -w {}", args.join(" ")),
                status: out.status.to_string(),
                stderr,
                hint,
            });
        }
    }
    Ok(())
}

fn run(binary: &str, args: &[String]) -> Result<Output, Error> {
    Command::new(binary)
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::Missing {
                binary: binary.to_string(),
            },
            _ => Error::Spawn {
                binary: binary.to_string(),
                source: e,
            },
        })
}

/// The rules now in Tern's chains and the jumps to them, as `-S` lists
/// them (what the success message shows).
pub fn listing(binary: &str) -> String {
    let mut out = String::new();
    for chain in ["PREROUTING", "OUTPUT"]
        .into_iter()
        .chain(crate::rules::CHAINS)
    {
        let args = ["-t", "nat", "-S", chain].map(String::from);
        if let Ok(o) = run(binary, &args) {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let ours = line.contains("TERN_");
                if ours && !line.starts_with("-P ") {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_rules_in_place() {
        assert_eq!(choose(0, 0), Backend::System);
        assert_eq!(choose(12, 0), Backend::Legacy);
        assert_eq!(choose(0, 3), Backend::Nft);
        assert_eq!(choose(3, 12), Backend::Nft);
        assert_eq!(backend(Mode::Legacy), Backend::Legacy);
        assert_eq!(backend(Mode::Nft).binary(Family::V6), "ip6tables-nft");
        assert_eq!(Backend::System.binary(Family::V6), "ip6tables");
        assert_eq!(Backend::Legacy.binary(Family::V4), "iptables-legacy");
    }
}
