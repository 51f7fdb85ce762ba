//! A TCP relay a test can hold shut: connections it accepts wait, unanswered, until it is opened,
//! and then go through to the upstream address. Puts sidecars' connections to the control plane
//! in an order the test chooses.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub struct Relay {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port and relays to `upstream`; starts open.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a relay")?;
        let addr = listener
            .local_addr()
            .context("reading the relay's address")?;
        let (open, watch) = watch::channel(true);
        let task = tokio::spawn(async move {
            // Dropped with the accept loop, which aborts every relayed connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    // Out of descriptors, say: try again shortly rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let mut watch = watch.clone();
                connections.spawn(async move {
                    if watch.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    relay(inbound, upstream).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, open, task })
    }

    /// Lets waiting and new connections through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Makes new connections wait (accepted, nothing relayed) until [`Relay::open`]. Connections
    /// already relayed are not affected.
    pub fn hold(&self) {
        self.open.send_replace(false);
    }
}

/// Copies both ways until either side closes. An upstream that refuses closes the inbound
/// connection, as if the upstream itself had refused it.
async fn relay(mut inbound: TcpStream, upstream: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
