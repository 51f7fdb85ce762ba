//! A real dnsmasq for DNS discovery tests: it serves the records of one hosts file
//! (`--addn-hosts`) on a free loopback port with a 1 s TTL, and rereads the file on SIGHUP.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::ports::free_udp_tcp_port;
use crate::process::{Proc, Signal};

const DNSMASQ_PATHS: &[&str] = &["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"];
/// The TTL dnsmasq gives the records it serves (`--local-ttl`).
pub const TTL: Duration = Duration::from_secs(1);
/// The zone dnsmasq answers for itself and never forwards.
pub const ZONE: &str = "mesh.test";

/// Where dnsmasq is installed, if it is.
pub fn dnsmasq_binary() -> Option<PathBuf> {
    DNSMASQ_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A dnsmasq serving `dir/hosts` on 127.0.0.1; stopped with its guard.
pub struct Dnsmasq {
    pub proc: Proc,
    pub addr: SocketAddr,
    hosts: PathBuf,
}

impl Dnsmasq {
    /// Starts `binary` serving `hosts` (hosts-file lines) from a file in `dir`, where its log
    /// goes too; `extra` are further dnsmasq options (`--srv-host=...`, say).
    pub async fn start(binary: &Path, dir: &Path, hosts: &str, extra: &[&str]) -> Result<Self> {
        let hosts_path = dir.join("hosts");
        write_hosts(&hosts_path, hosts)?;
        let port = free_udp_tcp_port()?;
        let mut args = vec![
            "--no-daemon".to_string(),
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".to_string(),
            "--no-resolv".to_string(),
            "--no-hosts".to_string(),
            "--pid-file=".to_string(),
            "--bind-interfaces".to_string(),
            "--listen-address=127.0.0.1".to_string(),
            format!("--local=/{ZONE}/"),
            format!("--local-ttl={}", TTL.as_secs()),
            "--log-queries".to_string(),
            format!("--port={port}"),
            format!("--addn-hosts={}", hosts_path.display()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        // As root dnsmasq drops to `nobody`, which could not read the hosts file.
        if fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            args.push("--user=root".to_string());
        }
        let mut proc = Proc::spawn(dir, "dnsmasq", binary, &args)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = proc.try_status()? {
                bail!("dnsmasq exited with {status}\n{}", proc.diagnostics());
            }
            if TcpStream::connect(addr).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("dnsmasq not answering on {addr}\n{}", proc.diagnostics());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            proc,
            addr,
            hosts: hosts_path,
        })
    }

    /// Replaces the served records: rewrites the hosts file and sends SIGHUP.
    pub fn set_hosts(&self, hosts: &str) -> Result<()> {
        write_hosts(&self.hosts, hosts)?;
        self.proc.signal(Signal::SIGHUP)
    }
}

/// Written aside and renamed so dnsmasq never reads a half-written file.
fn write_hosts(path: &Path, hosts: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, hosts).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
