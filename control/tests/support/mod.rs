//! Shared by the integration tests and the scale benchmark: the real
//! `tern-control` binary as a child process, and fake sidecars that speak
//! the push API through the generated tonic client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{anyhow, bail};
use tern_proto::control::v1 as pb;
use tern_proto::control::v1::control_plane_client::ControlPlaneClient;
use tern_proto::control::v1::sidecar_message::Kind;
use tern_test_support::{Proc, Signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// A running `tern-control`, stopped when dropped (SIGTERM, then SIGKILL).
pub struct ControlPlane {
    proc: Proc,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl ControlPlane {
    /// Starts `bin` on ports chosen by the OS and waits for its ready line.
    /// Its output goes to `log_dir/control.{stdout,stderr}`; its CA and token
    /// key are generated in `log_dir/state` (unless `extra` names a `--state-dir`).
    /// The fake sidecars speak plaintext, so it runs with
    /// `--insecure-plaintext-subscribers`: these tests are about the push
    /// protocol; who may subscribe is tested in `tests/tests/zero_trust.rs`.
    pub async fn start(
        bin: &Path,
        config_dir: &Path,
        log_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "--config-dir".to_owned(),
            config_dir.display().to_string(),
            "--grpc-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--admin-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--insecure-plaintext-subscribers".to_owned(),
        ];
        if !extra.iter().any(|a| a.starts_with("--state-dir")) {
            args.push("--state-dir".to_owned());
            args.push(log_dir.join("state").display().to_string());
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut proc = Proc::spawn(log_dir, "control", bin, &args)?;
        let rest = proc
            .wait_for_line("tern-control ready: ", Duration::from_secs(20))
            .await?;
        let mut grpc = None;
        let mut admin = None;
        for part in rest.split_whitespace() {
            match part.split_once('=') {
                Some(("grpc", a)) => grpc = Some(a.parse()?),
                Some(("admin", a)) => admin = Some(a.parse()?),
                _ => bail!("unexpected ready line {rest:?}"),
            }
        }
        let (Some(grpc), Some(admin)) = (grpc, admin) else {
            bail!("ready line {rest:?} lacks an address");
        };
        Ok(ControlPlane { proc, grpc, admin })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// What the control plane logged so far.
    pub fn log(&self) -> String {
        self.proc.stderr()
    }

    /// GET `path` on the admin port; the body of a 200 response.
    pub async fn get(&self, path: &str) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(self.admin).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: tern-control\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("bad response {raw:?}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET {path}: {head}");
        }
        Ok(body.to_owned())
    }

    pub async fn state(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/state").await?)?)
    }

    /// The value of an unlabelled metric.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.get("/metrics").await?;
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .ok_or_else(|| anyhow!("metric {name} missing"))?;
        Ok(line.split_whitespace().nth(1).unwrap_or_default().parse()?)
    }

    /// SIGTERM, then the exit status (within `within`).
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        self.proc.signal(Signal::SIGTERM)?;
        self.proc.wait_exit(within).await
    }
}

pub fn hello(service: &str, address: &str, version: &str, calls: &[&str]) -> pb::Hello {
    pb::Hello {
        service: service.into(),
        namespace: String::new(),
        identity: String::new(),
        address: address.into(),
        labels: [("version".to_owned(), version.to_owned())].into(),
        calls: calls.iter().map(|c| (*c).to_owned()).collect(),
        all_services: false,
        admin: String::new(),
        // A sidecar of before incremental snapshots; tests that want them say so.
        incremental: false,
    }
}

/// A fake sidecar: one Subscribe stream on its own connection.
pub struct Sidecar {
    tx: mpsc::Sender<pb::SidecarMessage>,
    stream: Streaming<pb::Snapshot>,
}

impl Sidecar {
    pub async fn connect(grpc: SocketAddr, hello: pb::Hello) -> anyhow::Result<Sidecar> {
        let mut client = ControlPlaneClient::connect(format!("http://{grpc}")).await?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(message(Kind::Hello(hello))).await?;
        let stream = client
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Sidecar { tx, stream })
    }

    /// The next snapshot, or an error if none arrives `within`.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<pb::Snapshot> {
        match tokio::time::timeout(within, self.stream.message()).await {
            Err(_) => bail!("no snapshot within {within:?}"),
            Ok(Ok(Some(s))) => Ok(s),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(status)) => Err(status.into()),
        }
    }

    /// The stream's next item, whatever it is (for checking how it ends).
    pub async fn next_raw(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<Result<Option<pb::Snapshot>, tonic::Status>> {
        Ok(tokio::time::timeout(within, self.stream.message()).await?)
    }

    pub async fn ack(&self, version: u64) -> anyhow::Result<()> {
        Ok(self
            .tx
            .send(message(Kind::Ack(pb::Ack { version })))
            .await?)
    }

    pub async fn nack(&self, version: u64, reason: &str) -> anyhow::Result<()> {
        let nack = pb::Nack {
            version,
            reason: reason.into(),
        };
        Ok(self.tx.send(message(Kind::Nack(nack))).await?)
    }

    pub async fn watch(&self, services: &[&str]) -> anyhow::Result<()> {
        let services = services.iter().map(|s| (*s).to_owned()).collect();
        Ok(self
            .tx
            .send(message(Kind::Watch(pb::Watch { services })))
            .await?)
    }
}

fn message(kind: Kind) -> pb::SidecarMessage {
    pb::SidecarMessage { kind: Some(kind) }
}

/// Endpoint addresses of `service` in a snapshot.
pub fn endpoints(s: &pb::Snapshot, service: &str) -> Vec<String> {
    s.services
        .iter()
        .find(|v| v.name == service)
        .map(|v| v.endpoints.iter().map(|e| e.address.clone()).collect())
        .unwrap_or_default()
}
