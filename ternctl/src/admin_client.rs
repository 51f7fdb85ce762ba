//! GET requests to a sidecar's admin port (HTTP/1.1, plaintext: the admin
//! port is loopback, or reached through `kubectl port-forward`).

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Sends `GET path_and_query` to `admin` (`host:port`); any status comes back.
pub async fn get(admin: &str, path_and_query: &str) -> Result<Response<Incoming>> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("connecting to the admin port {admin}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP to {admin}"))?;
    tokio::spawn(conn);
    let req = Request::get(path_and_query)
        .header(header::HOST, admin)
        .body(Empty::<Bytes>::new())
        .with_context(|| format!("request {path_and_query}"))?;
    sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path_and_query} from {admin}"))
}

/// The whole body of a `GET`, which must answer 200 (otherwise its text is the error).
pub async fn get_ok(admin: &str, path_and_query: &str) -> Result<String> {
    let rsp = get(admin, path_and_query).await?;
    let status = rsp.status();
    let body = rsp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {path_and_query} from {admin}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).trim_end().to_string();
    if status != StatusCode::OK {
        bail!("{admin} answered {status}: {text}");
    }
    Ok(text)
}

/// A query string from `(key, value)` pairs, percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            query(&[("header", "x-canary:1"), ("caller", "spiffe://a/ns/b c")]),
            "header=x-canary%3A1&caller=spiffe%3A//a/ns/b%20c"
        );
    }
}
