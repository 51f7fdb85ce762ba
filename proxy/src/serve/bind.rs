//! Binding a listener, and its IPv6 twin.
//!
//! A listener on `0.0.0.0` or `127.0.0.1` (the inbound, outbound and admin
//! defaults) also gets a twin on `[::]` or `[::1]`, same port, where the
//! host has IPv6: in a dual-stack or IPv6-only pod, inbound connections and
//! probes arrive on the pod's IPv6 address, and ip6tables' REDIRECT sends the
//! app's outbound connections to `[::1]`. The twin is IPv6-only, so each
//! family keeps its own socket and no address is ever IPv4-mapped; a host
//! without IPv6 just has the IPv4 listener. Port 0 (tests, local runs) gets
//! no twin: the OS picks the port for the IPv4 socket alone.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};

use anyhow::Context as _;
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket};

pub async fn bind(name: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {name} listener on {addr}"))
}

/// `addr`'s listener, then its IPv6 twin when there is one to bind.
pub async fn bind_with_twin(name: &str, addr: SocketAddr) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = vec![bind(name, addr).await?];
    let Some(twin) = ipv6_twin(addr) else {
        return Ok(listeners);
    };
    match bind_ipv6_only(twin) {
        Ok(l) => {
            tracing::info!(listener = name, addr = %twin, "listening");
            listeners.push(l);
        }
        // No IPv6 in this namespace (or no ::1): nothing can arrive over it.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
            ) =>
        {
            tracing::debug!(listener = name, addr = %twin, error = %e, "no IPv6 listener");
        }
        Err(e) => return Err(e).with_context(|| format!("binding the {name} listener on {twin}")),
    }
    Ok(listeners)
}

/// `[::]` for `0.0.0.0:P`, `[::1]` for `127.0.0.1:P`; none for other
/// addresses or port 0.
pub fn ipv6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let ip = match *v4.ip() {
        _ if v4.port() == 0 => return None,
        ip if ip.is_unspecified() => Ipv6Addr::UNSPECIFIED,
        ip if ip.is_loopback() => Ipv6Addr::LOCALHOST,
        _ => return None,
    };
    Some(SocketAddr::from((ip, v4.port())))
}

fn bind_ipv6_only(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v6()?;
    // Without it, `[::]` would claim the IPv4 port too (bindv6only=0).
    setsockopt(&socket, sockopt::Ipv6V6Only, &true).map_err(io::Error::from)?;
    // As TcpListener::bind does: a restart need not wait out TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn twins_of_the_wildcard_and_loopback_only() {
        let twin = |a: &str| ipv6_twin(a.parse().unwrap()).map(|t| t.to_string());
        assert_eq!(twin("0.0.0.0:4143").as_deref(), Some("[::]:4143"));
        assert_eq!(twin("127.0.0.1:4140").as_deref(), Some("[::1]:4140"));
        assert_eq!(twin("127.0.0.1:0"), None);
        assert_eq!(twin("10.0.0.7:4143"), None);
        assert_eq!(twin("[::]:4143"), None);
    }

    #[tokio::test]
    async fn loopback_gets_an_ipv6_twin_on_the_same_port() {
        let probe = bind("test", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let listeners = bind_with_twin("test", SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let mut want = vec![format!("127.0.0.1:{port}")];
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            want.push(format!("[::1]:{port}"));
        }
        assert_eq!(addrs, want);
    }
}
