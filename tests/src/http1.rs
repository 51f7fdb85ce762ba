//! A minimal HTTP/1.1 client over a raw TCP stream.
//!
//! Tests need to see exactly what travels on one connection (keep-alive reuse, framing), which a
//! full client library hides behind its pool; the admin scrapes use it too for the same reason.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Bound on every connect and every response read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A kept-alive HTTP/1.1 connection: requests go out one at a time on the same socket.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Sends one request with a Content-Length body (when given) and reads its response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: tern-e2e\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let stream = self.stream.get_mut();
        stream
            .write_all(head.as_bytes())
            .await
            .context("writing request head")?;
        if let Some(body) = body {
            stream
                .write_all(body)
                .await
                .context("writing request body")?;
        }
        stream.flush().await.context("flushing request")?;
        tokio::time::timeout(
            IO_TIMEOUT,
            read_response(&mut self.stream, method == "HEAD"),
        )
        .await
        .context("reading the response timed out")?
    }
}

/// `GET path` on a fresh connection that is closed afterwards.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    let mut conn = Conn::connect(addr).await?;
    conn.request("GET", path, &[("Connection", "close")], None)
        .await
}

/// Reads one response: status line, headers, then a body framed by Content-Length, chunked
/// transfer-encoding, or the end of the connection.
pub async fn read_response<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    head_only: bool,
) -> Result<Response> {
    let mut line = String::new();
    read_line(reader, &mut line).await?;
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {line:?}");
    }
    let status: u16 = parts
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    let mut head_len = line.len();
    loop {
        line.clear();
        read_line(reader, &mut line).await?;
        head_len += line.len();
        if head_len > MAX_HEAD {
            bail!("response head longer than {MAX_HEAD} bytes");
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed
            .split_once(':')
            .with_context(|| format!("bad header line {trimmed:?}"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        response.body = read_chunked(reader).await?;
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len
            .parse()
            .with_context(|| format!("bad content-length {len:?}"))?;
        let mut body = vec![0; len];
        reader
            .read_exact(&mut body)
            .await
            .context("reading the body")?;
        response.body = body;
    } else {
        reader
            .read_to_end(&mut response.body)
            .await
            .context("reading the body to end of connection")?;
    }
    Ok(response)
}

async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut String) -> Result<()> {
    let n = reader.read_line(line).await.context("reading a line")?;
    if n == 0 {
        bail!("connection closed before a complete response head");
    }
    Ok(())
}

async fn read_chunked<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        read_line(reader, &mut line).await?;
        let size_text = line.trim_end().split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        if size == 0 {
            // Trailer fields, if any, then the empty line.
            loop {
                line.clear();
                read_line(reader, &mut line).await?;
                if line.trim_end().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .await
            .context("reading a chunk")?;
        line.clear();
        read_line(reader, &mut line).await?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn reads_content_length_then_next_response() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloHTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        let mut reader = BufReader::new(&wire[..]);
        let first = read_response(&mut reader, false).await.unwrap();
        assert_eq!(first.status, 200);
        assert_eq!(first.body, b"hello");
        assert_eq!(first.header("x-a"), Some("b"));
        let second = read_response(&mut reader, false).await.unwrap();
        assert_eq!(second.status, 404);
        assert!(second.body.is_empty());
    }

    #[tokio::test]
    async fn reads_chunked() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let mut reader = BufReader::new(&wire[..]);
        let response = read_response(&mut reader, false).await.unwrap();
        assert_eq!(response.body, b"abcde");
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let mut reader = BufReader::new(&b"SSH-2.0-OpenSSH\r\n"[..]);
        assert!(read_response(&mut reader, false).await.is_err());
    }
}
