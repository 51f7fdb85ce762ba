//! The rules, as a plan of iptables invocations (all in the `nat` table):
//!
//! ```text
//! PREROUTING  -p tcp -j TERN_INBOUND                 (added once)
//! TERN_INBOUND           the sidecar's inbound and admin ports, skipped ports: RETURN
//!                        the app's ports (or all TCP): -j TERN_INBOUND_REDIRECT
//! TERN_INBOUND_REDIRECT  -p tcp -j REDIRECT --to-ports 4143
//!
//! OUTPUT      -p tcp -j TERN_OUTBOUND                (added once)
//! TERN_OUTBOUND          the sidecar's UID (GID): RETURN   (no loop)
//!                        -o lo: RETURN   (127.0.0.1, and the pod's own IP, stay direct)
//!                        admin port, skipped ports, skipped CIDRs: RETURN
//!                        -p tcp -j TERN_OUTBOUND_REDIRECT
//! TERN_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140
//! ```
//!
//! Tern's chains are created when missing and flushed before they are
//! filled, and a jump is appended only when `-C` does not find it, so a
//! second run leaves exactly the same rules.
//!
//! The plan is the same for IPv4 (`iptables`) and IPv6 (`ip6tables`), but
//! for the skipped CIDRs, each of which goes to its own family's rules.

use std::fmt;
use std::net::IpAddr;

pub const INBOUND: &str = "TERN_INBOUND";
pub const INBOUND_REDIRECT: &str = "TERN_INBOUND_REDIRECT";
pub const OUTBOUND: &str = "TERN_OUTBOUND";
pub const OUTBOUND_REDIRECT: &str = "TERN_OUTBOUND_REDIRECT";
pub const TABLE: &str = "nat";
/// Tern's chains, in the order they are made.
pub const CHAINS: [&str; 4] = [INBOUND_REDIRECT, INBOUND, OUTBOUND_REDIRECT, OUTBOUND];

/// An inclusive port range; `PortRange(p, p)` is one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl fmt::Display for PortRange {
    /// As iptables writes it: `8080` or `9000:9010`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 == self.1 {
            true => write!(f, "{}", self.0),
            false => write!(f, "{}:{}", self.0, self.1),
        }
    }
}

/// An IPv4 or IPv6 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpAddr, pub u8);

/// Which iptables a plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// What to install, validated (see [`crate::args`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// `None`: every TCP port.
    pub inbound_ports: Option<Vec<PortRange>>,
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    pub skip_outbound_cidrs: Vec<Cidr>,
}

/// One step of the plan; each is one iptables invocation, or two for the
/// idempotent ones (check, then change).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create `chain` unless it exists.
    EnsureChain(&'static str),
    Flush(&'static str),
    /// Append `rule` to one of Tern's chains (just flushed).
    Append(&'static str, Vec<String>),
    /// Append `rule` to a built-in chain unless it is already there.
    EnsureRule(&'static str, Vec<String>),
}

impl Step {
    /// The arguments after `iptables -w` that make the change.
    pub fn args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec!["-t".into(), TABLE.into()];
        match self {
            Self::EnsureChain(c) => v.extend(["-N".into(), c.to_string()]),
            Self::Flush(c) => v.extend(["-F".into(), c.to_string()]),
            Self::Append(c, rule) | Self::EnsureRule(c, rule) => {
                v.extend(["-A".into(), c.to_string()]);
                v.extend(rule.iter().cloned());
            }
        }
        v
    }

    /// The arguments of the check that makes the step a no-op when it succeeds.
    pub fn check_args(&self) -> Option<Vec<String>> {
        let mut v: Vec<String> = vec!["-t".into(), TABLE.into()];
        match self {
            Self::EnsureChain(c) => v.extend(["-n".into(), "-L".into(), c.to_string()]),
            Self::EnsureRule(c, rule) => {
                v.extend(["-C".into(), c.to_string()]);
                v.extend(rule.iter().cloned());
            }
            Self::Flush(_) | Self::Append(..) => return None,
        }
        Some(v)
    }

    /// The step as a shell line for `binary` (what `--dry-run` prints).
    pub fn shell(&self, binary: &str) -> String {
        let change = format!("{binary} -w {}", self.args().join(" "));
        match self.check_args() {
            None => change,
            Some(check) => format!(
                "{binary} -w {} >/dev/null 2>&1 || {change}",
                check.join(" ")
            ),
        }
    }
}

fn rule(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

fn tcp_dport(range: PortRange, target: &str) -> Vec<String> {
    let range = range.to_string();
    rule(&["-p", "tcp", "--dport", &range, "-j", target])
}

/// Every step for `family`, in order: chains first (filled while nothing
/// jumps to them yet on a first run), the jumps from the built-in chains last.
pub fn plan(s: &Settings, family: Family) -> Vec<Step> {
    let mut steps = Vec::new();
    for chain in CHAINS {
        steps.push(Step::EnsureChain(chain));
        steps.push(Step::Flush(chain));
    }

    let inbound = s.inbound_port.to_string();
    steps.push(Step::Append(
        INBOUND_REDIRECT,
        rule(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound]),
    ));
    // The sidecar's own ports are reached directly: other sidecars dial the
    // inbound port, probes and Prometheus the admin port.
    let own = [s.inbound_port, s.admin_port].map(|p| PortRange(p, p));
    for range in own.iter().chain(&s.skip_inbound_ports) {
        steps.push(Step::Append(INBOUND, tcp_dport(*range, "RETURN")));
    }
    match &s.inbound_ports {
        None => steps.push(Step::Append(
            INBOUND,
            rule(&["-p", "tcp", "-j", INBOUND_REDIRECT]),
        )),
        Some(ports) => {
            for range in ports {
                steps.push(Step::Append(INBOUND, tcp_dport(*range, INBOUND_REDIRECT)));
            }
        }
    }

    let outbound = s.outbound_port.to_string();
    steps.push(Step::Append(
        OUTBOUND_REDIRECT,
        rule(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound]),
    ));
    // The sidecar's own connections (to endpoints, to the app, to the
    // control plane) leave as they are: redirecting them would loop.
    let uid = s.proxy_uid.to_string();
    steps.push(Step::Append(
        OUTBOUND,
        rule(&["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]),
    ));
    if let Some(gid) = s.proxy_gid {
        let gid = gid.to_string();
        steps.push(Step::Append(
            OUTBOUND,
            rule(&["-m", "owner", "--gid-owner", &gid, "-j", "RETURN"]),
        ));
    }
    // Everything that stays in the pod leaves through lo: 127.0.0.1 (::1),
    // and the app calling its own pod IP, which then reaches it directly.
    steps.push(Step::Append(OUTBOUND, rule(&["-o", "lo", "-j", "RETURN"])));
    let admin = PortRange(s.admin_port, s.admin_port);
    for range in std::iter::once(&admin).chain(&s.skip_outbound_ports) {
        steps.push(Step::Append(OUTBOUND, tcp_dport(*range, "RETURN")));
    }
    let ours = s
        .skip_outbound_cidrs
        .iter()
        .filter(|c| Family::of(c.0) == family);
    for cidr in ours {
        let cidr = cidr.to_string();
        steps.push(Step::Append(OUTBOUND, rule(&["-d", &cidr, "-j", "RETURN"])));
    }
    steps.push(Step::Append(
        OUTBOUND,
        rule(&["-p", "tcp", "-j", OUTBOUND_REDIRECT]),
    ));

    steps.push(Step::EnsureRule(
        "PREROUTING",
        rule(&["-p", "tcp", "-j", INBOUND]),
    ));
    steps.push(Step::EnsureRule(
        "OUTPUT",
        rule(&["-p", "tcp", "-j", OUTBOUND]),
    ));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        Settings {
            proxy_uid: 2102,
            proxy_gid: None,
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            inbound_ports: None,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
        }
    }

    /// The rules appended, as `iptables -S` lists them.
    fn rules(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Append(c, r) | Step::EnsureRule(c, r) => {
                    Some(format!("-A {c} {}", r.join(" ")))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn default_rules_redirect_everything_but_the_sidecar() {
        assert_eq!(
            rules(&plan(&defaults(), Family::V4)),
            [
                "-A TERN_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143",
                "-A TERN_INBOUND -p tcp --dport 4143 -j RETURN",
                "-A TERN_INBOUND -p tcp --dport 4191 -j RETURN",
                "-A TERN_INBOUND -p tcp -j TERN_INBOUND_REDIRECT",
                "-A TERN_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4140",
                "-A TERN_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                "-A TERN_OUTBOUND -o lo -j RETURN",
                "-A TERN_OUTBOUND -p tcp --dport 4191 -j RETURN",
                "-A TERN_OUTBOUND -p tcp -j TERN_OUTBOUND_REDIRECT",
                "-A PREROUTING -p tcp -j TERN_INBOUND",
                "-A OUTPUT -p tcp -j TERN_OUTBOUND",
            ]
        );
    }

    #[test]
    fn chains_are_made_and_flushed_before_anything_jumps_to_them() {
        let steps = plan(&defaults(), Family::V4);
        let first_jump = steps
            .iter()
            .position(|s| matches!(s, Step::EnsureRule(..)))
            .unwrap_or(0);
        for chain in [INBOUND, INBOUND_REDIRECT, OUTBOUND, OUTBOUND_REDIRECT] {
            let made = steps.iter().position(|s| *s == Step::EnsureChain(chain));
            let flushed = steps.iter().position(|s| *s == Step::Flush(chain));
            assert!(made < flushed && flushed < Some(first_jump), "{chain}");
        }
        // Only the jumps and chain creation are conditional.
        assert_eq!(steps.iter().filter(|s| s.check_args().is_some()).count(), 6);
    }

    #[test]
    fn ports_cidrs_and_gid_shape_the_rules() {
        let s = Settings {
            proxy_gid: Some(2103),
            inbound_ports: Some(vec![PortRange(8080, 8080), PortRange(9000, 9010)]),
            skip_inbound_ports: vec![PortRange(22, 22)],
            skip_outbound_ports: vec![PortRange(3306, 3307)],
            skip_outbound_cidrs: vec![
                Cidr(IpAddr::from([169, 254, 169, 254]), 32),
                Cidr(
                    "fd00:ec2::254".parse().unwrap_or(IpAddr::from([0; 16])),
                    128,
                ),
            ],
            ..defaults()
        };
        let r = rules(&plan(&s, Family::V4));
        let r6 = rules(&plan(&s, Family::V6));
        // Each CIDR in its own family's rules; everything else the same.
        let cidr6 = "-A TERN_OUTBOUND -d fd00:ec2::254/128 -j RETURN";
        assert!(r6.iter().any(|l| l == cidr6), "{r6:#?}");
        assert!(!r.iter().any(|l| l == cidr6) && !r6.iter().any(|l| l.contains("169.254")));
        assert_eq!(r.len(), r6.len());
        for want in [
            "-A TERN_INBOUND -p tcp --dport 22 -j RETURN",
            "-A TERN_INBOUND -p tcp --dport 8080 -j TERN_INBOUND_REDIRECT",
            "-A TERN_INBOUND -p tcp --dport 9000:9010 -j TERN_INBOUND_REDIRECT",
            "-A TERN_OUTBOUND -m owner --gid-owner 2103 -j RETURN",
            "-A TERN_OUTBOUND -p tcp --dport 3306:3307 -j RETURN",
            "-A TERN_OUTBOUND -d 169.254.169.254/32 -j RETURN",
        ] {
            assert!(r.iter().any(|l| l == want), "missing {want}: {r:#?}");
        }
        assert!(!r.contains(&"-A TERN_INBOUND -p tcp -j TERN_INBOUND_REDIRECT".to_string()));
        // Every exclusion comes before the catch-all redirect of its chain.
        let last = |prefix: &str| r.iter().rposition(|l| l.starts_with(prefix));
        let redirect = r
            .iter()
            .position(|l| l.ends_with("-j TERN_OUTBOUND_REDIRECT"));
        assert!(last("-A TERN_OUTBOUND -d") < redirect);
    }

    #[test]
    fn shell_lines_are_idempotent_commands() {
        let steps = plan(&defaults(), Family::V4);
        assert_eq!(
            steps[0].shell("iptables-nft"),
            "iptables-nft -w -t nat -n -L TERN_INBOUND_REDIRECT >/dev/null 2>&1 || \
             iptables-nft -w -t nat -N TERN_INBOUND_REDIRECT"
        );
        assert_eq!(
            steps[1].shell("iptables"),
            "iptables -w -t nat -F TERN_INBOUND_REDIRECT"
        );
        assert_eq!(
            steps[steps.len() - 1].shell("iptables"),
            "iptables -w -t nat -C OUTPUT -p tcp -j TERN_OUTBOUND >/dev/null 2>&1 || \
             iptables -w -t nat -A OUTPUT -p tcp -j TERN_OUTBOUND"
        );
    }
}
