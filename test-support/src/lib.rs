//! Helpers shared by Tern's tests that run real processes: a guard for a child process that
//! logs to files and always stops it ([`Proc`]), a per-test log directory ([`TestDir`]), free
//! loopback ports, a real dnsmasq ([`dnsmasq::Dnsmasq`]), the key paths of a JSON value
//! ([`key_paths::walk`]), and the rule for skipping a test whose
//! tools are missing ([`missing`]).
//!
//! For tests only: nothing here belongs in a shipped binary.

pub mod dnsmasq;
pub mod key_paths;
pub mod ports;
pub mod process;

use std::io::Write as _;

use anyhow::{anyhow, Result};

pub use ports::{free_addr, free_udp_tcp_port};
pub use process::{Proc, Signal, TestDir, START_TIMEOUT};

/// Whether this run is CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Called when a test cannot run because `what` is missing: an error under CI, otherwise a loud
/// line on stderr and `Ok`, after which the test returns early.
pub fn missing(what: &str) -> Result<()> {
    if in_ci() {
        return Err(anyhow!("{what} (required under CI=true)"));
    }
    // Written to the real stderr, not through eprintln!, which the test harness captures and
    // hides for passing tests.
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {what} ***\n");
    Ok(())
}
