//! gRPC transparency checks, run by a tonic client against any Echo server on any path.
//!
//! The same checks run direct and through two sidecars, against the tonic and the Python server,
//! so a difference between paths can only come from the proxy. Each returns an error saying what
//! differed; every call is bounded by [`CALL_TIMEOUT`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use base64::Engine as _;
use tern_proto::test::v1::echo_client::EchoClient;
use tern_proto::test::v1::{EchoReply, EchoRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::mesh::{connect, echo_client, stats};
use crate::{eventually, within, CALL_TIMEOUT};

/// A status message that percent-encoding in `grpc-message` must carry unchanged.
pub const UNICODE_MESSAGE: &str = "paiement refusé ✗ 支付";
/// Bigger than the 4 MiB default limits of most gRPC stacks, which a proxy must not impose.
pub const LARGE: usize = 5 * 1024 * 1024;
pub const TRAILER: &str = "x-echo-trailer";
pub const TRAILER_BIN: &str = "x-echo-trailer-bin";
pub const TRAILER_BIN_VALUE: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];
const ASCII_KEY: &str = "x-tern-test";
const ASCII_VALUE: &str = "hello, tern";
const BIN_KEY: &str = "x-tern-test-bin";
/// Includes bytes that are not valid in an ASCII header, and a NUL.
const BIN_VALUE: [u8; 6] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff];

/// Where a check sends its calls, where it reads the server's own counters, and who answers.
#[derive(Clone, Debug)]
pub struct Target {
    pub call: SocketAddr,
    /// The app itself, for `Stats` (never through a proxy).
    pub direct: SocketAddr,
    /// The `server` name every reply must carry.
    pub server: String,
}

impl Target {
    async fn client(&self) -> Result<EchoClient<Channel>> {
        Ok(echo_client(connect(self.call).await?))
    }
}

/// Every check in order; the first failure is returned with the check's name.
pub async fn run_all(target: &Target) -> Result<()> {
    unary(target).await.context("unary")?;
    server_stream(target).await.context("server_stream")?;
    client_stream(target).await.context("client_stream")?;
    bidi_stream(target).await.context("bidi_stream")?;
    metadata(target).await.context("metadata")?;
    trailers(target).await.context("trailers")?;
    error_status(target).await.context("error_status")?;
    large_messages(target).await.context("large_messages")?;
    cancellation(target).await.context("cancellation")?;
    deadline(target).await.context("deadline")?;
    Ok(())
}

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_string(),
        ..EchoRequest::default()
    }
}

/// The payload servers send for `reply_size`; must match the servers' own pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn check_reply(reply: &EchoReply, target: &Target, message: &str) -> Result<()> {
    ensure!(
        reply.message == message,
        "message {:?}, sent {message:?}",
        reply.message
    );
    ensure!(
        reply.server == target.server,
        "answered by {:?}, expected {:?}",
        reply.server,
        target.server
    );
    Ok(())
}

pub async fn unary(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    let mut req = request("ping");
    req.payload = vec![1, 2, 3];
    let reply = within(CALL_TIMEOUT, client.unary(req)).await??.into_inner();
    check_reply(&reply, target, "ping")?;
    ensure!(reply.payload == [1, 2, 3], "payload {:?}", reply.payload);
    Ok(())
}

pub async fn server_stream(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    let mut req = request("many");
    req.count = 5;
    let mut stream = within(CALL_TIMEOUT, client.server_stream(req))
        .await??
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(item) = within(CALL_TIMEOUT, stream.next()).await? {
        let reply = item.context("stream item")?;
        check_reply(&reply, target, "many")?;
        seqs.push(reply.seq);
    }
    ensure!(seqs == [1, 2, 3, 4, 5], "replies with seq {seqs:?}");
    Ok(())
}

pub async fn client_stream(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    let parts: Vec<EchoRequest> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, m)| EchoRequest {
            message: m.to_string(),
            payload: vec![i as u8],
            ..EchoRequest::default()
        })
        .collect();
    let reply = within(
        CALL_TIMEOUT,
        client.client_stream(tokio_stream::iter(parts)),
    )
    .await??
    .into_inner();
    check_reply(&reply, target, "abcd")?;
    ensure!(
        reply.seq == 4,
        "server counted {} messages, sent 4",
        reply.seq
    );
    ensure!(reply.payload == [0, 1, 2, 3], "payload {:?}", reply.payload);
    Ok(())
}

/// Sends each message only after the previous reply arrived: a proxy that buffered the request
/// stream instead of forwarding it frame by frame would deadlock here (and time out).
pub async fn bidi_stream(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    let (tx, rx) = mpsc::channel(1);
    tx.send(request("m1")).await.context("queueing m1")?;
    let mut replies = within(CALL_TIMEOUT, client.bidi_stream(ReceiverStream::new(rx)))
        .await??
        .into_inner();
    for i in 1..=3u32 {
        let reply = within(CALL_TIMEOUT, replies.next())
            .await?
            .context("stream ended early")?
            .context("stream item")?;
        check_reply(&reply, target, &format!("m{i}"))?;
        ensure!(reply.seq == i, "seq {} for message {i}", reply.seq);
        if i < 3 {
            tx.send(request(&format!("m{}", i + 1)))
                .await
                .context("queueing next message")?;
        }
    }
    drop(tx);
    let end = within(CALL_TIMEOUT, replies.next()).await?;
    ensure!(
        end.is_none(),
        "extra item after the request stream ended: {end:?}"
    );
    let trailers = within(CALL_TIMEOUT, replies.trailers()).await??;
    check_trailers(trailers.as_ref(), "bidi")
}

pub async fn metadata(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    let mut req = Request::new(request("md"));
    req.metadata_mut()
        .insert(ASCII_KEY, MetadataValue::from_static(ASCII_VALUE));
    req.metadata_mut()
        .insert_bin(BIN_KEY, MetadataValue::from_bytes(&BIN_VALUE));
    let reply = within(CALL_TIMEOUT, client.unary(req)).await??.into_inner();
    let seen = &reply.metadata;
    let ascii = format!("{ASCII_KEY}={ASCII_VALUE}");
    ensure!(
        seen.contains(&ascii),
        "server did not see {ascii:?}; saw {seen:?}"
    );
    let prefix = format!("{BIN_KEY}=");
    let bin = seen
        .iter()
        .find_map(|entry| entry.strip_prefix(&prefix))
        .with_context(|| format!("server did not see {BIN_KEY}; saw {seen:?}"))?;
    let decoded = decode_base64(bin)?;
    ensure!(
        decoded == BIN_VALUE,
        "{BIN_KEY} arrived as {decoded:?}, sent {BIN_VALUE:?}"
    );
    Ok(())
}

/// Decodes base64 with or without padding (gRPC allows both on the wire).
pub fn decode_base64(text: &str) -> Result<Vec<u8>> {
    let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
    engine
        .decode(text.trim_end_matches('='))
        .with_context(|| format!("not base64: {text:?}"))
}

fn check_trailers(trailers: Option<&MetadataMap>, call: &str) -> Result<()> {
    let trailers = trailers.with_context(|| format!("{call}: no trailers"))?;
    let text = trailers
        .get(TRAILER)
        .with_context(|| format!("{call}: no {TRAILER} in {trailers:?}"))?;
    ensure!(text == "done", "{call}: {TRAILER} = {text:?}");
    let bin = trailers
        .get_bin(TRAILER_BIN)
        .with_context(|| format!("{call}: no {TRAILER_BIN} in {trailers:?}"))?
        .to_bytes()
        .with_context(|| format!("{call}: {TRAILER_BIN} is not base64"))?;
    ensure!(
        bin.as_ref() == TRAILER_BIN_VALUE,
        "{call}: {TRAILER_BIN} = {bin:?}"
    );
    Ok(())
}

pub async fn trailers(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    // tonic merges a unary call's trailers into the response metadata.
    let response = within(CALL_TIMEOUT, client.unary(request("t"))).await??;
    check_trailers(Some(response.metadata()), "unary")?;
    // A stream keeps them apart, which proves they travelled as trailers, not headers.
    let mut req = request("t");
    req.count = 2;
    let mut stream = within(CALL_TIMEOUT, client.server_stream(req))
        .await??
        .into_inner();
    while let Some(item) = within(CALL_TIMEOUT, stream.next()).await? {
        item.context("stream item")?;
    }
    let trailers = within(CALL_TIMEOUT, stream.trailers()).await??;
    check_trailers(trailers.as_ref(), "server_stream")
}

pub async fn error_status(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    // FAILED_PRECONDITION: never retried, so the status must come back exactly as sent.
    let mut req = request(UNICODE_MESSAGE);
    req.fail_code = Code::FailedPrecondition as i32;
    let result = within(CALL_TIMEOUT, client.unary(req)).await?;
    let status = match result {
        Ok(reply) => bail!(
            "expected FAILED_PRECONDITION, got OK {:?}",
            reply.into_inner()
        ),
        Err(status) => status,
    };
    ensure!(
        status.code() == Code::FailedPrecondition,
        "code {:?} ({status:?})",
        status.code()
    );
    ensure!(
        status.message() == UNICODE_MESSAGE,
        "message {:?}, sent {UNICODE_MESSAGE:?}",
        status.message()
    );
    Ok(())
}

pub async fn large_messages(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    let payload: Vec<u8> = (0..LARGE)
        .map(|i| (i.wrapping_mul(7) % 256) as u8)
        .collect();
    let mut req = request("big");
    req.payload = payload.clone();
    let reply = within(CALL_TIMEOUT, client.unary(req)).await??.into_inner();
    ensure!(
        reply.payload.len() == LARGE && reply.payload == payload,
        "5 MiB echo came back as {} bytes{}",
        reply.payload.len(),
        if reply.payload.len() == LARGE {
            " with different content"
        } else {
            ""
        }
    );
    let mut req = request("big-reply");
    req.reply_size = LARGE as u32;
    let reply = within(CALL_TIMEOUT, client.unary(req)).await??.into_inner();
    ensure!(
        reply.payload == pattern(LARGE),
        "asked for {LARGE} bytes, got {} bytes (or wrong content)",
        reply.payload.len()
    );
    Ok(())
}

/// Drops a call the server is still working on; the reset must reach the server.
pub async fn cancellation(target: &Target) -> Result<()> {
    let before = stats(target.direct).await?;
    let (calls_before, cancelled_before) = (before.calls, before.cancelled);
    let mut client = target.client().await?;
    let mut req = request("slow");
    req.delay_ms = 3000;
    let call = tokio::spawn(async move { client.unary(req).await });
    // Cancel only once the server is working on the call, so the cancel is what is tested.
    let direct = target.direct;
    eventually(Duration::from_secs(5), move || async move {
        let now = stats(direct).await?;
        Ok((now.calls <= calls_before).then(|| format!("calls {}", now.calls)))
    })
    .await
    .context("the call never reached the server")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    if call.is_finished() {
        let outcome = call.await.context("the call's task")?;
        bail!("a 3 s call ended within 200 ms: {outcome:?}");
    }
    call.abort();
    eventually(Duration::from_secs(5), move || async move {
        let now = stats(direct).await?;
        Ok((now.cancelled != cancelled_before + 1).then(|| {
            format!(
                "cancelled {} (was {} before the call)",
                now.cancelled, cancelled_before
            )
        }))
    })
    .await
    .context("the server did not see the cancellation")?;
    Ok(())
}

/// A 200 ms deadline on a 2 s call: the client gets DEADLINE_EXCEEDED in time and the server
/// saw the `grpc-timeout` header (possibly lowered by a proxy, never raised).
///
/// tonic's own client enforces the deadline with a timer that reports CANCELLED "Timeout
/// expired" (grpc-go, grpc-java and grpcio say DEADLINE_EXCEEDED); that local expiry is accepted
/// too, since it is indistinguishable from the client side. The Python client checks the strict
/// code.
pub async fn deadline(target: &Target) -> Result<()> {
    let mut client = target.client().await?;
    let mut req = Request::new(request("late"));
    req.get_mut().delay_ms = 2000;
    req.set_timeout(Duration::from_millis(200));
    let start = Instant::now();
    let result = within(CALL_TIMEOUT, client.unary(req)).await?;
    let elapsed = start.elapsed();
    let status = match result {
        Ok(reply) => bail!(
            "expected DEADLINE_EXCEEDED, got OK {:?}",
            reply.into_inner()
        ),
        Err(status) => status,
    };
    let tonic_local =
        status.code() == Code::Cancelled && status.message().contains("Timeout expired");
    ensure!(
        status.code() == Code::DeadlineExceeded || tonic_local,
        "expected DEADLINE_EXCEEDED, got {status:?}"
    );
    ensure!(
        elapsed < Duration::from_millis(1500),
        "the 200 ms deadline took {elapsed:?} to expire"
    );
    let seen = stats(target.direct).await?.last_grpc_timeout;
    let timeout =
        parse_grpc_timeout(&seen).with_context(|| format!("server saw grpc-timeout {seen:?}"))?;
    // Some stacks round the encoded value up (grpc core sends 200 ms as "201m"); anything near
    // 200 ms shows the deadline travelled and was not replaced by a longer one.
    ensure!(
        timeout > Duration::ZERO && timeout <= Duration::from_millis(250),
        "server saw grpc-timeout {seen:?} ({timeout:?}), client set 200ms"
    );
    Ok(())
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Result<Duration> {
    let value = value.trim();
    ensure!(!value.is_empty(), "empty");
    let (digits, unit) = value.split_at(value.len() - 1);
    ensure!(
        !digits.is_empty() && digits.len() <= 8,
        "bad digit count in {value:?}"
    );
    let n: u64 = digits
        .parse()
        .with_context(|| format!("bad number in {value:?}"))?;
    Ok(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => bail!("bad unit in {value:?}"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            parse_grpc_timeout("200000u").unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(
            parse_grpc_timeout("199m").unwrap(),
            Duration::from_millis(199)
        );
        assert_eq!(parse_grpc_timeout("1S").unwrap(), Duration::from_secs(1));
        assert!(parse_grpc_timeout("").is_err());
        assert!(parse_grpc_timeout("123456789m").is_err());
        assert!(parse_grpc_timeout("10x").is_err());
    }

    #[test]
    fn base64_with_and_without_padding() {
        assert_eq!(decode_base64("AAF/gP7/").unwrap(), BIN_VALUE);
        assert_eq!(decode_base64("3q2+7w==").unwrap(), TRAILER_BIN_VALUE);
        assert_eq!(decode_base64("3q2+7w").unwrap(), TRAILER_BIN_VALUE);
    }
}
