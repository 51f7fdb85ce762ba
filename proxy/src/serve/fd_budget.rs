//! A reserve of file descriptors that downstream connections can never take.
//!
//! Under a connection flood the process runs out of descriptors, and then
//! every `accept` fails, the admin port's included: probes and scrapes fail
//! exactly when they should report. So the soft `RLIMIT_NOFILE` is raised to
//! the hard limit, and the data listeners together may hold at most half of
//! what is left after [`RESERVE`] (each downstream connection may need an
//! upstream one). The admin listener is not counted against it.

use std::sync::Arc;

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::sync::Semaphore;

/// Descriptors kept for the admin port, the access log, the control plane,
/// DNS and the process's own files.
pub const RESERVE: u64 = 128;

/// The semaphore every data listener takes a permit from per connection.
pub fn data_connections() -> Arc<Semaphore> {
    let limit = raise_nofile();
    Arc::new(Semaphore::new(budget(limit)))
}

fn budget(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(RESERVE) / 2;
    usize::try_from(usable.max(1))
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// Raises the soft limit to the hard one; returns the soft limit in force.
fn raise_nofile() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_leaves_the_reserve() {
        assert_eq!(budget(256), 64);
        assert_eq!(budget(100), 1);
        assert!(budget(u64::MAX) <= Semaphore::MAX_PERMITS);
    }
}
