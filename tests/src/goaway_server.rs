//! An HTTP/2 gRPC echo server written frame by frame, to send what no server library lets a
//! test choose: on its first connection it waits for a number of complete calls, then sends
//! GOAWAY with an error code and a last-stream-id below most of them, answers the calls up to
//! that id except the last one (taken, then dropped unanswered), and closes the connection.
//! Later connections are answered normally. It records which calls it served and dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _, Result};
use prost::Message as _;
use tern_proto::test::v1::EchoRequest;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;

/// What the server saw, by the calls' `message`.
#[derive(Debug, Default)]
pub struct Seen {
    /// Answered, with the connection (1, 2, ...) each came on.
    pub served: Vec<(String, usize)>,
    /// Taken on the first connection, at its GOAWAY's last-stream-id, and never answered.
    pub dropped: Vec<String>,
    /// Above the GOAWAY's last-stream-id on the first connection: never processed.
    pub ignored: Vec<String>,
}

pub struct GoAwayServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for GoAwayServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GoAwayServer {
    /// On the first connection, once `hold` calls are complete, GOAWAY with `code` and the
    /// id of the `processed`-th call as last-stream-id.
    pub async fn start(hold: usize, processed: usize, code: u32) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                n += 1;
                let plan = (n == 1).then_some((hold, processed, code));
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, n, plan, record).await {
                        eprintln!("goaway server: connection {n}: {e:#}");
                    }
                });
            }
        });
        Ok(Self { addr, seen, task })
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.extend([kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header field as an HPACK literal without indexing, new name, no Huffman coding.
fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0);
    for s in [name, value] {
        block.push(s.len() as u8);
        block.extend_from_slice(s.as_bytes());
    }
}

/// A gRPC OK answer carrying `message` (the request's own gRPC frame: EchoRequest and
/// EchoReply share field 1, `message`).
fn answer(stream: u32, grpc_frame: &[u8]) -> Vec<u8> {
    let mut head = vec![0x88]; // :status 200, static table
    literal(&mut head, "content-type", "application/grpc");
    let mut trailers = Vec::new();
    literal(&mut trailers, "grpc-status", "0");
    let mut out = frame(HEADERS, END_HEADERS, stream, &head);
    out.extend(frame(DATA, 0, stream, grpc_frame));
    out.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &trailers));
    out
}

fn message_of(body: &[u8]) -> String {
    body.get(5..)
        .and_then(|m| EchoRequest::decode(m).ok())
        .map(|r| r.message)
        .unwrap_or_default()
}

async fn serve(
    mut sock: TcpStream,
    conn: usize,
    plan: Option<(usize, usize, u32)>,
    seen: Arc<Mutex<Seen>>,
) -> Result<()> {
    let mut preface = [0u8; 24];
    sock.read_exact(&mut preface).await?;
    if preface != PREFACE {
        bail!("not an HTTP/2 client");
    }
    sock.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let mut bodies: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut complete: Vec<u32> = Vec::new();
    loop {
        let mut head = [0u8; 9];
        if sock.read_exact(&mut head).await.is_err() {
            return Ok(());
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        sock.read_exact(&mut payload).await?;
        let mut ended = false;
        match kind {
            SETTINGS if flags & ACK == 0 => sock.write_all(&frame(SETTINGS, ACK, 0, &[])).await?,
            PING if flags & ACK == 0 => sock.write_all(&frame(PING, ACK, 0, &payload)).await?,
            GOAWAY => return Ok(()),
            HEADERS => {
                // The request's headers are not needed: only that the stream exists.
                bodies.push((stream, Vec::new()));
                ended = flags & END_STREAM != 0;
            }
            DATA => {
                let data = match flags & PADDED {
                    0 => &payload[..],
                    _ => {
                        let pad = *payload.first().context("padded DATA")? as usize;
                        payload
                            .get(1..len.saturating_sub(pad))
                            .context("bad padding")?
                    }
                };
                if let Some((_, body)) = bodies.iter_mut().find(|(id, _)| *id == stream) {
                    body.extend_from_slice(data);
                }
                ended = flags & END_STREAM != 0;
            }
            _ => {}
        }
        if !ended {
            continue;
        }
        let body = bodies
            .iter()
            .find(|(id, _)| *id == stream)
            .map(|(_, b)| b.clone())
            .unwrap_or_default();
        let Some((hold, processed, code)) = plan else {
            sock.write_all(&answer(stream, &body)).await?;
            record(&seen, |s| s.served.push((message_of(&body), conn)));
            continue;
        };
        complete.push(stream);
        if complete.len() < hold {
            continue;
        }
        complete.sort_unstable();
        let last = complete[processed - 1];
        let mut goaway = last.to_be_bytes().to_vec();
        goaway.extend_from_slice(&code.to_be_bytes());
        sock.write_all(&frame(GOAWAY, 0, 0, &goaway)).await?;
        for id in &complete {
            let body = bodies
                .iter()
                .find(|(s, _)| s == id)
                .map(|(_, b)| b.clone())
                .unwrap_or_default();
            let message = message_of(&body);
            if *id < last {
                sock.write_all(&answer(*id, &body)).await?;
                record(&seen, |s| s.served.push((message, conn)));
            } else if *id == last {
                record(&seen, |s| s.dropped.push(message));
            } else {
                record(&seen, |s| s.ignored.push(message));
            }
        }
        sock.flush().await?;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        return Ok(());
    }
}

fn record(seen: &Mutex<Seen>, f: impl FnOnce(&mut Seen)) {
    if let Ok(mut s) = seen.lock() {
        f(&mut s);
    }
}
