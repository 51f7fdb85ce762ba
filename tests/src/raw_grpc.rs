//! A bare gRPC unary call over the `h2` crate. The request carries exactly the headers given
//! (a `grpc-timeout`, say) and the caller runs no timer of its own, unlike a tonic channel,
//! which enforces a `grpc-timeout` itself: what comes back is what the far side answered.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use bytes::{BufMut as _, Bytes, BytesMut};
use http::HeaderMap;
use tokio::net::TcpStream;

/// A response as it arrived: headers, the message bytes (gRPC framing included) and trailers.
#[derive(Debug)]
pub struct RawReply {
    pub headers: HeaderMap,
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl RawReply {
    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    pub fn grpc_status(&self) -> Option<u32> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse().ok())
    }

    /// A header of the response head or its trailers.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .or_else(|| self.trailers.as_ref().and_then(|t| t.get(name)))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// One unary call of `path` (`/package.Service/Method`) with `message` on a new HTTP/2
/// connection to `addr`; `headers` are added to the request's own.
pub async fn unary(
    addr: SocketAddr,
    path: &str,
    message: &impl prost::Message,
    headers: &[(&str, &str)],
) -> Result<RawReply> {
    unary_to(addr, &addr.to_string(), path, message, headers).await
}

/// [`unary`] with `authority` as the request's `:authority` (a service name, say).
pub async fn unary_to(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    message: &impl prost::Message,
    headers: &[(&str, &str)],
) -> Result<RawReply> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let (client, connection) = h2::client::handshake(tcp)
        .await
        .context("HTTP/2 handshake")?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = call(client, authority, path, message, headers).await;
    driver.abort();
    result
}

async fn call(
    client: h2::client::SendRequest<Bytes>,
    authority: &str,
    path: &str,
    message: &impl prost::Message,
    headers: &[(&str, &str)],
) -> Result<RawReply> {
    let mut client = client
        .ready()
        .await
        .context("HTTP/2 connection not ready")?;
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).context("building the request")?;
    let (response, mut send) = client
        .send_request(request, false)
        .context("sending the request head")?;
    let encoded = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + encoded.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(encoded.len()).context("message too large")?);
    frame.put_slice(&encoded);
    send.send_data(frame.freeze(), true)
        .context("sending the message")?;
    let response = response.await.context("waiting for the response head")?;
    let (parts, mut body) = response.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.context("reading the response body")?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.context("reading the trailers")?;
    Ok(RawReply {
        headers: parts.headers,
        data: data.freeze(),
        trailers,
    })
}
