//! Plain HTTP/1.1 GETs to admin listeners (tern-control's, the sidecars')
//! and to Prometheus: one connection per request. A whole exchange has a
//! deadline and gives its body as text; a stream (`/tap`) is handed back
//! open. The admin port is loopback, or reached through `kubectl port-forward`.

use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// How long one admin request may take, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// A response: its status and its body.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.status == 200
    }
}

/// `GET path_and_query` from `addr` (host:port).
pub async fn get(addr: &str, path_and_query: &str) -> anyhow::Result<Reply> {
    tokio::time::timeout(TIMEOUT, exchange(addr, path_and_query))
        .await
        .with_context(|| {
            format!("GET http://{addr}{path_and_query}: no answer within {TIMEOUT:?}")
        })?
        .with_context(|| format!("GET http://{addr}{path_and_query}"))
}

async fn exchange(addr: &str, path_and_query: &str) -> anyhow::Result<Reply> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(path_and_query)
        .header(http::header::HOST, addr)
        .body(Empty::<Bytes>::new())?;
    let rsp = sender.send_request(req).await?;
    let status = rsp.status().as_u16();
    let bytes = rsp.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// The body of `GET path_and_query`, which must answer 200 (otherwise its text is the error).
pub async fn get_ok(addr: &str, path_and_query: &str) -> anyhow::Result<String> {
    let reply = get(addr, path_and_query).await?;
    let text = reply.body.trim_end().to_string();
    if !reply.ok() {
        bail!("{addr} answered {}: {text}", reply.status);
    }
    Ok(text)
}

/// Sends `GET path_and_query` to `addr` and hands back the response with its
/// body still streaming (no deadline: the caller reads as long as it wants).
pub async fn open_stream(
    addr: &str,
    path_and_query: &str,
) -> anyhow::Result<http::Response<Incoming>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the admin port {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP to {addr}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(path_and_query)
        .header(http::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("request {path_and_query}"))?;
    sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path_and_query} from {addr}"))
}

/// A query string from `(key, value)` pairs, percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode_query(k), encode_query(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `http://host:port[/prefix]` → (`host:port`, `/prefix` without a trailing slash).
pub fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    anyhow::ensure!(!host.is_empty(), "{url:?}: no host");
    Ok((host.to_string(), path.trim_end_matches('/').to_string()))
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 2);
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_and_queries() {
        assert_eq!(
            split_url("http://127.0.0.1:9090/").unwrap(),
            ("127.0.0.1:9090".into(), String::new())
        );
        assert_eq!(
            split_url("http://prom:9090/sub/").unwrap(),
            ("prom:9090".into(), "/sub".into())
        );
        assert!(split_url("https://prom:9090").is_err());
        assert_eq!(
            query(&[("header", "x-canary:1"), ("caller", "spiffe://a/ns/b c")]),
            "header=x-canary%3A1&caller=spiffe%3A%2F%2Fa%2Fns%2Fb%20c"
        );
        assert_eq!(
            encode_query("sum(rate(x{a=\"b\"}[1m]))"),
            "sum%28rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%29"
        );
    }
}
