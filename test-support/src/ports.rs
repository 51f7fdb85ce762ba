//! Free loopback ports for the processes a test starts.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context as _, Result};

/// A free loopback port. Ports handed out once are never handed out again by this process, so
/// tests running in parallel threads cannot pick the same one between the probe and the bind.
pub fn free_addr() -> Result<SocketAddr> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
        let addr = listener.local_addr().context("reading the probed port")?;
        if first_time(addr.port()) {
            return Ok(addr);
        }
    }
    bail!("no free loopback port found")
}

/// A port free for both UDP and TCP on 127.0.0.1 (a DNS server binds both), never handed out
/// before by this process.
pub fn free_udp_tcp_port() -> Result<u16> {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").context("probing a UDP port")?;
        let port = udp.local_addr().context("reading the probed port")?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && first_time(port) {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP")
}

fn first_time(port: u16) -> bool {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Mutex::default);
    given.lock().unwrap_or_else(|p| p.into_inner()).insert(port)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn free_ports_are_never_repeated() {
        let tcp: HashSet<u16> = (0..50).map(|_| free_addr().unwrap().port()).collect();
        assert_eq!(tcp.len(), 50);
        let both: HashSet<u16> = (0..20).map(|_| free_udp_tcp_port().unwrap()).collect();
        assert_eq!(both.len(), 20);
        assert!(tcp.is_disjoint(&both));
    }
}
