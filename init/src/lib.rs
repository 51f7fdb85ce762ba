//! tern-init: the init step of a meshed pod. It installs iptables NAT rules
//! in the current network namespace, for IPv4 and (with `ip6tables`, when
//! the namespace has IPv6) IPv6, so that the pod's TCP traffic goes through
//! its tern-proxy sidecar:
//!
//! - inbound TCP (`PREROUTING`) to every port is redirected to the sidecar's
//!   inbound port (4143), which learns the port that was dialed from
//!   `SO_ORIGINAL_DST` and forwards only to the ports the app serves;
//! - outbound TCP (`OUTPUT`) is redirected to the sidecar's outbound port
//!   (4140), which routes by the original destination;
//! - never redirected: the sidecar's own traffic (its UID, optionally its
//!   GID), loopback (so the app reaches itself, on 127.0.0.1 or its own pod
//!   IP, directly), the sidecar's ports, and the ports and CIDRs given as
//!   skips.
//!
//! The rules live in Tern's own chains (`TERN_INBOUND`, `TERN_OUTBOUND` and
//! their `*_REDIRECT` targets), which every run flushes and refills, plus
//! one jump from `PREROUTING` and one from `OUTPUT`, added only when missing:
//! running it again leaves the same rules. It works with both iptables
//! back ends (`--iptables-mode auto|nft|legacy`, the same for both address
//! families), and `--dry-run` prints the commands as a shell script instead
//! of running them.
//!
//! [`rules`] turns the settings into that plan (pure, unit tested);
//! [`iptables`] picks the binary and runs it.

pub mod args;
pub mod iptables;
pub mod rules;
