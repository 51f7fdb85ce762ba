//! Shared by the integration tests and the scale benchmark: the real
//! `tern-control` binary as a child process, and fake sidecars that speak
//! the push API through the generated tonic client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tern_proto::control::v1 as pb;
use tern_proto::control::v1::control_plane_client::ControlPlaneClient;
use tern_proto::control::v1::sidecar_message::Kind;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// A running `tern-control`, killed when dropped.
pub struct ControlPlane {
    child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
}

impl ControlPlane {
    /// Starts `bin` on ports chosen by the OS and waits for its ready line.
    /// Its stderr goes to `log_dir/control.log`; its CA and token key are
    /// generated in `log_dir/state` (unless `extra` names a `--state-dir`).
    pub async fn start(
        bin: &Path,
        config_dir: &Path,
        log_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log = log_dir.join("control.log");
        let stderr = std::fs::File::create(&log).context("creating the log file")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config-dir").arg(config_dir).args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        if !extra.iter().any(|a| a.starts_with("--state-dir")) {
            cmd.arg("--state-dir").arg(log_dir.join("state"));
        }
        let mut child = cmd
            .args(extra)
            .env_remove("TERN_CONTROL_LOG")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .map_err(|_| anyhow!("no ready line within 20s; log:\n{}", read(&log)))??
            .ok_or_else(|| {
                anyhow!(
                    "tern-control exited before it was ready; log:\n{}",
                    read(&log)
                )
            })?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let rest = line
            .strip_prefix("tern-control ready: ")
            .ok_or_else(|| anyhow!("unexpected first line {line:?}"))?;
        let mut grpc = None;
        let mut admin = None;
        for part in rest.split_whitespace() {
            match part.split_once('=') {
                Some(("grpc", a)) => grpc = Some(a.parse()?),
                Some(("admin", a)) => admin = Some(a.parse()?),
                _ => bail!("unexpected ready line {line:?}"),
            }
        }
        let (Some(grpc), Some(admin)) = (grpc, admin) else {
            bail!("ready line {line:?} lacks an address");
        };
        Ok(ControlPlane {
            child,
            grpc,
            admin,
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What the control plane logged so far.
    pub fn log(&self) -> String {
        read(&self.log)
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
        let pid = self.pid().ok_or_else(|| anyhow!("already exited"))?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(within, self.child.wait()).await??)
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
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
