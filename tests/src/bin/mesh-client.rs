//! `mesh-client`: the "app" of a client pod in the interception tests, run inside its network
//! namespace (`ip netns exec`), dialing addresses as any app would: it knows nothing of the mesh.
//! Prints one JSON line with what happened; exits 1 if anything failed.
//!
//! - `mesh-client grpc --target IP:PORT --calls N`: N unary `tern.test.v1.Echo` calls on one
//!   connection; reports `ok`, `failed`, replies per `server`, the first error, and the request
//!   metadata the server saw on the first call.
//! - `mesh-client tcp --target IP:PORT [--greeting] [--send TEXT] [--half-close]`: reads the
//!   server's greeting line first (with `--greeting`), sends TEXT, then either reads one line or,
//!   with `--half-close` (shut down its side first) or `--read-to-end`, reads to the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use tern_proto::test::v1::echo_client::EchoClient;
use tern_proto::test::v1::EchoRequest;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Bound on every connect, call and read.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "mesh-client",
    about = "A client app for the interception tests"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Grpc {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        calls: u32,
        /// The :authority to send instead of the target address.
        #[arg(long)]
        authority: Option<String>,
        /// KEY=VALUE request metadata sent with every call (repeatable).
        #[arg(long)]
        metadata: Vec<String>,
    },
    Tcp {
        #[arg(long)]
        target: SocketAddr,
        /// Read the server's first line before sending anything.
        #[arg(long)]
        greeting: bool,
        /// What to send (escapes: \n, \r).
        #[arg(long)]
        send: Option<String>,
        /// Shut down the write side after sending, then read to the end.
        #[arg(long)]
        half_close: bool,
        /// Read to the end (the server closes) instead of one line.
        #[arg(long)]
        read_to_end: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Grpc {
            target,
            calls,
            authority,
            metadata,
        } => grpc(target, calls, authority, &metadata).await,
        Cmd::Tcp {
            target,
            greeting,
            send,
            half_close,
            read_to_end,
        } => tcp(target, greeting, send, half_close, read_to_end).await,
    };
    match result {
        Ok((report, ok)) => {
            println!("{report}");
            std::process::exit(if ok { 0 } else { 1 });
        }
        Err(e) => {
            println!("{}", json!({ "error": format!("{e:#}") }));
            std::process::exit(1);
        }
    }
}

async fn grpc(
    target: SocketAddr,
    calls: u32,
    authority: Option<String>,
    extra: &[String],
) -> Result<(serde_json::Value, bool)> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    if let Some(a) = authority {
        endpoint = endpoint.origin(format!("http://{a}").parse()?);
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let mut client = EchoClient::new(channel);
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut servers: BTreeMap<String, u32> = BTreeMap::new();
    let mut first_error = None;
    let mut metadata = Vec::new();
    for i in 0..calls {
        let mut request = tonic::Request::new(EchoRequest {
            message: format!("call {i}"),
            ..Default::default()
        });
        for pair in extra {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("--metadata {pair:?} is not KEY=VALUE"))?;
            let key: tonic::metadata::AsciiMetadataKey = key.parse()?;
            request.metadata_mut().insert(key, value.parse()?);
        }
        match client.unary(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                ok += 1;
                *servers.entry(reply.server).or_default() += 1;
                if metadata.is_empty() {
                    metadata = reply.metadata;
                }
            }
            Err(status) => {
                failed += 1;
                first_error
                    .get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
    let report = json!({
        "calls": calls, "ok": ok, "failed": failed, "servers": servers,
        "error": first_error, "metadata": metadata,
    });
    Ok((report, failed == 0))
}

async fn tcp(
    target: SocketAddr,
    greeting: bool,
    send: Option<String>,
    half_close: bool,
    read_to_end: bool,
) -> Result<(serde_json::Value, bool)> {
    let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| anyhow!("connecting to {target} timed out"))?
        .with_context(|| format!("connecting to {target}"))?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let greeting = match greeting {
        true => Some(read_line(&mut read).await.context("the greeting")?),
        false => None,
    };
    if let Some(text) = &send {
        let text = text.replace("\\n", "\n").replace("\\r", "\r");
        write.write_all(text.as_bytes()).await.context("sending")?;
    }
    if half_close {
        write.shutdown().await.context("half-closing")?;
    }
    let reply = if half_close || read_to_end {
        let mut rest = String::new();
        tokio::time::timeout(TIMEOUT, read.read_to_string(&mut rest))
            .await
            .map_err(|_| anyhow!("no end of stream within {TIMEOUT:?}"))?
            .context("reading to the end")?;
        rest
    } else if send.is_some() {
        read_line(&mut read).await.context("the reply")?
    } else {
        String::new()
    };
    Ok((json!({ "greeting": greeting, "reply": reply }), true))
}

async fn read_line(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<String> {
    let mut line = String::new();
    tokio::time::timeout(TIMEOUT, read.read_line(&mut line))
        .await
        .map_err(|_| anyhow!("no line within {TIMEOUT:?}"))?
        .context("reading a line")?;
    Ok(line)
}
