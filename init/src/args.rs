//! Flags and their `TERN_INIT_*` environment variables (an init container is
//! usually configured through env), validated into [`Settings`].

use std::net::IpAddr;

use clap::{Parser, ValueEnum};

use crate::rules::{Cidr, PortRange, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "tern-init",
    version,
    about = "Installs iptables NAT rules in the current network namespace that send the pod's TCP \
             traffic through its tern-proxy sidecar. Idempotent: a rerun leaves the same rules."
)]
pub struct Args {
    /// UID the sidecar runs as; its own traffic is never redirected.
    #[arg(long, env = "TERN_INIT_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,

    /// GID whose traffic is never redirected either [default: none].
    #[arg(long, env = "TERN_INIT_PROXY_GID")]
    pub proxy_gid: Option<u32>,

    /// The sidecar's inbound port: where inbound TCP is redirected.
    #[arg(long, env = "TERN_INIT_PROXY_INBOUND_PORT", default_value_t = 4143)]
    pub proxy_inbound_port: u16,

    /// The sidecar's outbound port: where outbound TCP is redirected.
    #[arg(long, env = "TERN_INIT_PROXY_OUTBOUND_PORT", default_value_t = 4140)]
    pub proxy_outbound_port: u16,

    /// The sidecar's admin port (metrics, probes): never redirected, either way.
    #[arg(long, env = "TERN_INIT_PROXY_ADMIN_PORT", default_value_t = 4191)]
    pub proxy_admin_port: u16,

    /// Inbound ports to redirect, e.g. 8080,50051,9000-9010 [default: all TCP ports]. Narrowing
    /// it leaves every other port reachable around the sidecar, in plaintext and unauthorized;
    /// prefer the default with --skip-inbound-ports for the few ports that must bypass it.
    #[arg(long, env = "TERN_INIT_INBOUND_PORTS", value_delimiter = ',')]
    pub inbound_ports: Vec<String>,

    /// Inbound ports never redirected (ports or ranges).
    #[arg(long, env = "TERN_INIT_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<String>,

    /// Outbound destination ports never redirected (ports or ranges).
    #[arg(long, env = "TERN_INIT_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<String>,

    /// Outbound destinations never redirected, as IPv4 or IPv6 CIDRs (e.g. 169.254.169.254/32,
    /// fd00:ec2::254/128); each goes to the rules of its address family.
    #[arg(long, env = "TERN_INIT_SKIP_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<String>,

    /// The same rules for IPv6 (ip6tables): auto installs them whenever the namespace has IPv6
    /// at all (a link-local address is enough to reach the pod around the sidecar).
    #[arg(long, env = "TERN_INIT_IPV6", value_enum, default_value_t = Ipv6::Auto)]
    pub ipv6: Ipv6,

    /// Which iptables to drive: auto (the back end that already holds rules,
    /// else the system's `iptables`), nft (iptables-nft) or legacy (iptables-legacy).
    #[arg(long, env = "TERN_INIT_IPTABLES_MODE", value_enum, default_value_t = Mode::Auto)]
    pub iptables_mode: Mode,

    /// Print the iptables commands (as a shell script) instead of running them.
    #[arg(long, env = "TERN_INIT_DRY_RUN", num_args = 0..=1, default_missing_value = "true")]
    #[arg(default_value_t = false)]
    pub dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ipv6 {
    Auto,
    True,
    False,
}

impl Ipv6 {
    /// Whether to install the IPv6 rules: `auto` asks the kernel whether this namespace has
    /// IPv6 (it lists its IPv6 addresses in /proc/net/if_inet6 only then).
    pub fn wanted(self) -> bool {
        match self {
            Self::True => true,
            Self::False => false,
            Self::Auto => std::path::Path::new("/proc/net/if_inet6").exists(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Auto,
    Nft,
    Legacy,
}

/// A flag with a bad value.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct ArgError {
    pub flag: &'static str,
    pub reason: String,
}

fn err(flag: &'static str, reason: impl Into<String>) -> ArgError {
    ArgError {
        flag,
        reason: reason.into(),
    }
}

impl Args {
    pub fn settings(&self) -> Result<Settings, ArgError> {
        for (flag, port) in [
            ("proxy-inbound-port", self.proxy_inbound_port),
            ("proxy-outbound-port", self.proxy_outbound_port),
            ("proxy-admin-port", self.proxy_admin_port),
        ] {
            if port == 0 {
                return Err(err(flag, "0 is not a port"));
            }
        }
        if self.proxy_inbound_port == self.proxy_outbound_port {
            return Err(err(
                "proxy-outbound-port",
                "the inbound and outbound ports must differ",
            ));
        }
        let inbound_ports = ports("inbound-ports", &self.inbound_ports)?;
        Ok(Settings {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            inbound_port: self.proxy_inbound_port,
            outbound_port: self.proxy_outbound_port,
            admin_port: self.proxy_admin_port,
            inbound_ports: (!inbound_ports.is_empty()).then_some(inbound_ports),
            skip_inbound_ports: ports("skip-inbound-ports", &self.skip_inbound_ports)?,
            skip_outbound_ports: ports("skip-outbound-ports", &self.skip_outbound_ports)?,
            skip_outbound_cidrs: cidrs(&self.skip_outbound_cidrs)?,
        })
    }
}

/// `8080`, `9000-9010` (or `9000:9010`); empty entries are ignored.
fn ports(flag: &'static str, items: &[String]) -> Result<Vec<PortRange>, ArgError> {
    let mut out = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let bad = || {
            err(
                flag,
                format!("{item:?} is not a port (1-65535) or a range like 9000-9010"),
            )
        };
        let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p > 0);
        let range = match item.split_once(['-', ':']) {
            None => port(item).map(|p| PortRange(p, p)),
            Some((a, b)) => match (port(a), port(b)) {
                (Some(lo), Some(hi)) if lo <= hi => Some(PortRange(lo, hi)),
                _ => None,
            },
        };
        out.push(range.ok_or_else(bad)?);
    }
    Ok(out)
}

/// `a.b.c.d/n`, `a.b.c.d` (a /32), `x::y/n` or `x::y` (a /128); host bits must be zero.
fn cidrs(items: &[String]) -> Result<Vec<Cidr>, ArgError> {
    let mut out = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let bad = |why: &str| err("skip-outbound-cidrs", format!("{item:?} {why}"));
        let (ip, len) = match item.split_once('/') {
            None => (item, None),
            Some((ip, len)) => (ip, Some(len)),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| bad("is not an IP address or CIDR"))?;
        let bits: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = match len.map(str::parse) {
            None => bits,
            Some(Ok(n)) if n <= bits => n,
            _ => return Err(bad(&format!("has a prefix length that is not 0-{bits}"))),
        };
        let host_bits = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)) & (u128::from(u32::MAX) >> len),
            IpAddr::V6(v6) => u128::from(v6) & u128::MAX.checked_shr(u32::from(len)).unwrap_or(0),
        };
        if host_bits != 0 {
            return Err(bad("has host bits set (did you mean the network address?)"));
        }
        out.push(Cidr(ip, len));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, ArgError> {
        let mut v = vec!["tern-init"];
        v.extend_from_slice(args);
        Args::try_parse_from(v).unwrap().settings()
    }

    #[test]
    fn defaults_match_the_sidecar() {
        let s = parse(&[]).unwrap();
        assert_eq!(
            (s.inbound_port, s.outbound_port, s.admin_port),
            (4143, 4140, 4191)
        );
        assert_eq!(s.proxy_uid, 2102);
        assert_eq!(s.proxy_gid, None);
        assert!(s.inbound_ports.is_none());
    }

    #[test]
    fn lists_parse_and_bad_values_name_the_flag() {
        let s = parse(&[
            "--inbound-ports",
            "8080,9000-9010",
            "--skip-outbound-ports",
            "25, 3306:3307",
            "--skip-outbound-cidrs",
            "169.254.169.254,10.96.0.0/12,fd00:ec2::254,fd00::/8",
        ])
        .unwrap();
        assert_eq!(
            s.inbound_ports.unwrap(),
            [PortRange(8080, 8080), PortRange(9000, 9010)]
        );
        assert_eq!(
            s.skip_outbound_ports,
            [PortRange(25, 25), PortRange(3306, 3307)]
        );
        let cidrs: Vec<String> = s
            .skip_outbound_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            cidrs,
            [
                "169.254.169.254/32",
                "10.96.0.0/12",
                "fd00:ec2::254/128",
                "fd00::/8"
            ]
        );
        for (args, flag) in [
            (["--inbound-ports", "http"], "inbound-ports"),
            (["--skip-inbound-ports", "0"], "skip-inbound-ports"),
            (
                ["--skip-outbound-ports", "9010-9000"],
                "skip-outbound-ports",
            ),
            (
                ["--skip-outbound-cidrs", "10.0.0.1/8"],
                "skip-outbound-cidrs",
            ),
            (
                ["--skip-outbound-cidrs", "10.0.0.0/33"],
                "skip-outbound-cidrs",
            ),
            (
                ["--skip-outbound-cidrs", "fd00::1/8"],
                "skip-outbound-cidrs",
            ),
            (
                ["--skip-outbound-cidrs", "fd00::/129"],
                "skip-outbound-cidrs",
            ),
            (
                ["--skip-outbound-cidrs", "0.0.0.0/0x"],
                "skip-outbound-cidrs",
            ),
            (["--proxy-outbound-port", "4143"], "proxy-outbound-port"),
        ] {
            let e = parse(&args).unwrap_err();
            assert_eq!(e.flag, flag, "{e}");
        }
        assert!(Args::try_parse_from(["tern-init", "--iptables-mode", "ebpf"]).is_err());
    }
}
