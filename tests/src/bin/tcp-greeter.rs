//! `tcp-greeter`: a TCP server whose side speaks first, like MySQL or SMTP, for the interception
//! tests (a proxy that waits for the client's first bytes before choosing a route would hang on
//! it).
//!
//! Usage: `tcp-greeter --listen 0.0.0.0:7000 --name b`. On every connection it writes
//! `hello from NAME\n` at once, answers each line it reads with `NAME: LINE\n`, and when the
//! client half-closes writes `bye from NAME after N bytes\n` and closes. Prints
//! `tcp-greeter listening on ADDR` (one line per `--listen`) once bound; stops on SIGTERM.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(name = "tcp-greeter", about = "A server-speaks-first TCP test server")]
struct Args {
    /// Addresses to listen on (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Name in every line it writes.
    #[arg(long, default_value = "greeter")]
    name: String,
}

async fn serve(stream: TcpStream, name: String) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("hello from {name}\n").as_bytes())
        .await?;
    let mut lines = BufReader::new(read);
    let mut total = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines.read_line(&mut line).await?;
        if n == 0 {
            break;
        }
        total += n;
        let text = line.trim_end_matches(['\r', '\n']);
        write
            .write_all(format!("{name}: {text}\n").as_bytes())
            .await?;
    }
    write
        .write_all(format!("bye from {name} after {total} bytes\n").as_bytes())
        .await?;
    write.shutdown().await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr().context("reading the bound address")?;
        println!("tcp-greeter listening on {local}");
        let name = args.name.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, name).await {
                        eprintln!("tcp-greeter: connection: {e}");
                    }
                });
            }
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
