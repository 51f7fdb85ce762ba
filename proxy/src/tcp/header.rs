//! The opening of an opaque TCP connection between two sidecars.
//!
//! The calling sidecar dials the peer's inbound port with mTLS offering ALPN
//! `tern.tcp/1` (nothing else), and right after the handshake sends a
//! 4-byte header naming the port the app dialed:
//!
//! ```text
//! +------+---------+-----------+-----------+
//! | 0x54 | version | port (big-endian u16) |
//! | 'T'  |  0x01   |  hi       |  lo       |
//! +------+---------+-----------+-----------+
//! ```
//!
//! The peer checks it (a port the app serves), authorizes the caller's
//! identity and connects to the app's port, then answers with one status byte ([`Status`]): `0`
//! and the connection carries the two apps' bytes from then on, unchanged in
//! both directions (a half-close is passed on); anything else, and the peer
//! closes the connection. The status comes before any byte of the app, so a
//! protocol whose server speaks first works, and the caller can try another
//! endpoint when an app refuses.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

pub const MAGIC: u8 = b'T';
pub const VERSION: u8 = 1;
pub const LEN: usize = 4;

/// How long either side waits for the other's header or status.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The peer's answer to a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Connected = 0,
    /// Nothing accepts connections on that port of the app.
    AppRefused = 1,
    /// The inbound authorization policy does not allow the caller.
    Denied = 2,
    /// The app does not serve the port (or it is one of the sidecar's own).
    PortNotAllowed = 3,
    BadHeader = 4,
}

impl Status {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Connected,
            1 => Self::AppRefused,
            2 => Self::Denied,
            3 => Self::PortNotAllowed,
            4 => Self::BadHeader,
            _ => return None,
        })
    }

    /// The outcome label for metrics and logs.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Connected => "ok",
            Self::AppRefused => "app_refused",
            Self::Denied => "denied",
            Self::PortNotAllowed => "port_not_allowed",
            Self::BadHeader => "bad_header",
        }
    }
}

pub fn encode(port: u16) -> [u8; LEN] {
    let [hi, lo] = port.to_be_bytes();
    [MAGIC, VERSION, hi, lo]
}

/// The port a header names; `None` for anything that is not a version-1 header.
pub fn decode(h: [u8; LEN]) -> Option<u16> {
    match h {
        [MAGIC, VERSION, hi, lo] => Some(u16::from_be_bytes([hi, lo])).filter(|p| *p != 0),
        _ => None,
    }
}

/// Caller side: sends the header, waits for the peer's status.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    port: u16,
) -> std::io::Result<Option<Status>> {
    let exchange = async {
        io.write_all(&encode(port)).await?;
        io.flush().await?;
        let mut status = [0u8; 1];
        io.read_exact(&mut status).await?;
        Ok(Status::from_byte(status[0]))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Peer side: the port the header names (`Ok(None)` for a bad header).
pub async fn read<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<Option<u16>> {
    let mut h = [0u8; LEN];
    match tokio::time::timeout(TIMEOUT, io.read_exact(&mut h)).await {
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) => Ok(decode(h)),
    }
}

pub async fn answer<S: AsyncWrite + Unpin>(io: &mut S, status: Status) -> std::io::Result<()> {
    io.write_all(&[status as u8]).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        assert_eq!(encode(6379), [b'T', 1, 0x18, 0xeb]);
        assert_eq!(decode(encode(6379)), Some(6379));
        assert_eq!(decode(encode(65535)), Some(65535));
        assert_eq!(decode(encode(0)), None);
        assert_eq!(decode(*b"GET "), None);
        assert_eq!(decode([b'T', 2, 0, 80]), None);
        for b in 0..=4 {
            assert_eq!(Status::from_byte(b).unwrap() as u8, b);
        }
        assert_eq!(Status::from_byte(9), None);
    }

    #[tokio::test]
    async fn the_exchange_works_over_a_stream() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let peer = tokio::spawn(async move {
            let port = read(&mut server).await.unwrap();
            answer(&mut server, Status::Connected).await.unwrap();
            server.write_all(b"hello").await.unwrap();
            port
        });
        assert_eq!(
            open(&mut client, 7000).await.unwrap(),
            Some(Status::Connected)
        );
        let mut greeting = [0u8; 5];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"hello");
        assert_eq!(peer.await.unwrap(), Some(7000));
    }
}
