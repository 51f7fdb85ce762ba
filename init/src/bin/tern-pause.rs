//! `tern-pause`: holds a pod's network namespace, like Kubernetes' pause
//! container. The pod's other containers (tern-init, the sidecar, the app) join
//! its namespace; it does nothing until SIGTERM or SIGINT, then exits 0. As PID
//! 1 of a container it must handle those signals itself: the kernel ignores a
//! signal PID 1 has no handler for.

use nix::sys::signal::{SigSet, Signal};

fn main() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if let Err(e) = set.thread_block() {
        eprintln!("tern-pause: cannot block signals: {e}");
        std::process::exit(1);
    }
    match set.wait() {
        Ok(signal) => eprintln!("tern-pause: {signal}, exiting"),
        Err(e) => {
            eprintln!("tern-pause: waiting for a signal failed: {e}");
            std::process::exit(1);
        }
    }
}
