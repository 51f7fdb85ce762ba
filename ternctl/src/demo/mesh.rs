//! Starting the demo's processes: tern-control, the pay replicas and order,
//! each app behind its own tern-proxy, and the mesh config they share.
//!
//! Nothing lists pay's addresses: each pay sidecar registers its workload
//! with tern-control when it connects, and order's sidecar learns pay's
//! endpoints and routes from the snapshots tern-control pushes.
//!
//! Every sidecar has a workload identity: tern-control's CA (generated in
//! the demo's directory) issues each one a certificate for the token minted
//! for its service account, and the order→pay hop is mutual TLS 1.3 with
//! each side checking the other's SPIFFE id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;

use super::DemoArgs;
use crate::procs::{free_port, Proc};

const START_TIMEOUT: Duration = Duration::from_secs(15);

pub fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// One process with the arguments to start it again on the same ports.
pub struct Restartable {
    pub name: String,
    bin: &'static str,
    args: Vec<String>,
    ready_line: &'static str,
    pub proc: Option<Proc>,
}

impl Restartable {
    pub async fn start(
        name: &str,
        bin: &'static str,
        args: Vec<String>,
        ready_line: &'static str,
    ) -> anyhow::Result<Self> {
        let mut r = Self {
            name: name.to_string(),
            bin,
            args,
            ready_line,
            proc: None,
        };
        r.restart().await?;
        Ok(r)
    }

    pub async fn restart(&mut self) -> anyhow::Result<String> {
        let mut p = Proc::spawn(&self.name, self.bin, &self.args)?;
        let line = p.wait_for_line(self.ready_line, START_TIMEOUT).await?;
        self.proc = Some(p);
        Ok(line)
    }

    pub fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.signal(Signal::SIGKILL);
        }
    }

    pub async fn stop(&mut self, grace: Duration) {
        if let Some(p) = self.proc.as_mut() {
            p.stop(grace).await;
        }
    }
}

pub struct Mesh {
    pub control: Restartable,
    pub control_admin: String,
    /// The directory of mesh config tern-control watches.
    pub config_dir: PathBuf,
    /// order-proxy first, then pay-1-proxy, pay-2-proxy (and pay-v2-proxy).
    pub sidecars: Vec<(Restartable, String)>,
    /// pay-1, pay-2, (pay-v2,) order.
    pub apps: Vec<Restartable>,
    pub order_inbound: String,
    pub identities: Identities,
}

const SERVICES: &str = "\
# The demo's services. Sidecars register their replicas' endpoints when they connect.
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: pay, namespace: default}
spec:
  protocol: grpc
  ports: [{name: grpc, port: 50051}]
  identity: spiffe://cluster.local/ns/default/sa/pay
---
apiVersion: tern.dev/v1alpha1
kind: Service
metadata: {name: order, namespace: default}
spec:
  protocol: grpc
  ports: [{name: grpc, port: 50052}]
  identity: spiffe://cluster.local/ns/default/sa/order
";

/// The identities the demo's sidecars get.
pub const ORDER_ID: &str = "spiffe://cluster.local/ns/default/sa/order";
pub const PAY_ID: &str = "spiffe://cluster.local/ns/default/sa/pay";

/// Where a sidecar's identity comes from: the CA's trust anchor and a token
/// file per service account.
pub struct Identities {
    pub anchors: PathBuf,
    tokens: PathBuf,
}

impl Identities {
    /// Mints a token for each service account, as `ternctl token create` does.
    fn mint(state_dir: &Path, dir: &Path, accounts: &[&str]) -> anyhow::Result<Self> {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens)
            .with_context(|| format!("creating {}", tokens.display()))?;
        for sa in accounts {
            let token = crate::token::mint(state_dir, "default", sa)?;
            let path = tokens.join(format!("{sa}.token"));
            std::fs::write(&path, token + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(Self {
            anchors: state_dir.join("trust-anchor.pem"),
            tokens,
        })
    }

    fn args(&self, sa: &str) -> Vec<String> {
        vec![
            "--identity-trust-anchors".into(),
            self.anchors.display().to_string(),
            "--identity-token-file".into(),
            self.tokens
                .join(format!("{sa}.token"))
                .display()
                .to_string(),
        ]
    }
}

/// pay's TrafficPolicy: retries and timeouts, and the split between the
/// stable replicas and the canary (`v2_percent` of calls to `version: v2`).
pub fn pay_policy(v2_percent: Option<u32>) -> String {
    let backends = match v2_percent {
        None => String::new(),
        Some(p) => format!(
            "      backends:\n        - {{subset: {{version: v1}}, weight: {}}}\n        - {{subset: {{version: v2}}, weight: {p}}}\n",
            100 - p.min(100)
        ),
    };
    format!(
        "\
# How callers reach pay; rewrite this file and every caller's sidecar follows within a second.
apiVersion: tern.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: pay, namespace: default}}
spec:
  service: pay
  timeout: 5s
  retries:
    maxAttempts: 3
    retryableCodes: [UNAVAILABLE]
    budget: {{percent: 20, minPerSecond: 10}}
  routes:
    - name: pay
      match:
        - grpc: {{service: tern.demo.v1.PayService, method: Pay}}
{backends}"
    )
}

/// Replaces a file in one step (write, then rename), so the watcher never sees half of it.
pub fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// `--trace-collector` and `--trace-sample-rate` for every sidecar (`ternctl demo --trace`),
/// set once before the mesh starts.
static TRACE_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

pub fn set_trace(collector: std::net::SocketAddr) {
    let _ = TRACE_ARGS.set(vec![
        "--trace-collector".into(),
        collector.to_string(),
        "--trace-sample-rate".into(),
        super::trace::SAMPLE_RATE.into(),
    ]);
}

fn sidecar_args(
    name: &str,
    admin: &str,
    control: &str,
    log_dir: &Path,
    identity: Vec<String>,
    extra: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut args = vec![
        "--admin-listen".to_string(),
        admin.to_string(),
        "--outbound-listen".into(),
        addr(free_port()?),
        "--control-plane".into(),
        format!("https://{control}"),
        "--access-log".into(),
        log_dir
            .join(format!("{name}.access.log"))
            .display()
            .to_string(),
        "--drain-grace".into(),
        "5s".into(),
    ];
    args.extend(identity);
    args.extend_from_slice(extra);
    args.extend(TRACE_ARGS.get().into_iter().flatten().cloned());
    Ok(args)
}

async fn start_pay(
    replica: &str,
    version: &str,
    fail: bool,
    control: &str,
    log_dir: &Path,
    ids: &Identities,
) -> anyhow::Result<(Restartable, (Restartable, String))> {
    let app = addr(free_port()?);
    let mut pay_args = vec![
        "--listen".to_string(),
        app.clone(),
        "--replica".into(),
        replica.into(),
        "--version".into(),
        version.into(),
    ];
    if fail {
        pay_args.extend([
            "--fail-rate".into(),
            "0.3".into(),
            "--fail-code".into(),
            "UNAVAILABLE".into(),
        ]);
    }
    let pay = Restartable::start(replica, "pay", pay_args, "pay listening").await?;
    let admin = addr(free_port()?);
    let name = format!("{replica}-proxy");
    let sc_args = sidecar_args(
        &name,
        &admin,
        control,
        log_dir,
        ids.args("pay"),
        &[
            "--service-name".into(),
            "pay".into(),
            "--label".into(),
            format!("version={version}"),
            "--inbound-listen".into(),
            addr(free_port()?),
            "--inbound-app".into(),
            app,
        ],
    )?;
    let sidecar = Restartable::start(&name, "tern-proxy", sc_args, "tern-proxy ready").await?;
    Ok((pay, (sidecar, admin)))
}

pub async fn start(args: &DemoArgs, log_dir: &Path) -> anyhow::Result<Mesh> {
    let config_dir = log_dir.join("mesh");
    std::fs::create_dir_all(&config_dir)
        .with_context(|| format!("creating {}", config_dir.display()))?;
    write_atomically(&config_dir.join("services.yaml"), SERVICES)?;
    // With a canary, v2 takes no traffic until the split is pushed.
    write_atomically(
        &config_dir.join("pay-traffic.yaml"),
        &pay_policy(args.canary.then_some(0)),
    )?;

    let state_dir = log_dir.join("control-state");
    let control_args = vec![
        "--config-dir".to_string(),
        config_dir.display().to_string(),
        "--grpc-listen".into(),
        addr(free_port()?),
        "--admin-listen".into(),
        addr(free_port()?),
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--cert-lifetime".into(),
        humantime::format_duration(args.cert_lifetime).to_string(),
    ];
    let control_admin = control_args[5].clone();
    let grpc = control_args[3].clone();
    let control = Restartable::start(
        "tern-control",
        "tern-control",
        control_args,
        "tern-control ready",
    )
    .await?;
    let ids = Identities::mint(&state_dir, log_dir, &["order", "pay"])?;

    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    let mut replicas = vec![("pay-1", "v1", args.faults), ("pay-2", "v1", false)];
    if args.canary {
        replicas.push(("pay-v2", "v2", false));
    }
    for (replica, version, fail) in replicas {
        let (pay, sidecar) = start_pay(replica, version, fail, &grpc, log_dir, &ids).await?;
        apps.push(pay);
        sidecars.push(sidecar);
    }

    // order dials pay at its sidecar's explicit pay port, like any app dials a server.
    let pay_port = free_port()?;
    let order_app = addr(free_port()?);
    let order_args = vec![
        "--listen".to_string(),
        order_app.clone(),
        "--pay-host".into(),
        "127.0.0.1".into(),
        "--pay-port".into(),
        pay_port.to_string(),
    ];
    apps.push(Restartable::start("order", "order", order_args, "order listening").await?);
    let order_inbound = addr(free_port()?);
    let admin = addr(free_port()?);
    let sc_args = sidecar_args(
        "order-proxy",
        &admin,
        &grpc,
        log_dir,
        ids.args("order"),
        &[
            "--service-name".into(),
            "order".into(),
            "--inbound-listen".into(),
            order_inbound.clone(),
            // loadgen stands for callers outside the mesh: order's port takes
            // plaintext beside mTLS, while pay's ports stay strict.
            "--inbound-tls".into(),
            "permissive".into(),
            "--inbound-app".into(),
            order_app,
            "--upstream".into(),
            format!("pay={}", addr(pay_port)),
        ],
    )?;
    // Ready only once the first snapshot (with pay's endpoints) has arrived.
    let order_sc =
        Restartable::start("order-proxy", "tern-proxy", sc_args, "tern-proxy ready").await?;
    sidecars.insert(0, (order_sc, admin));
    Ok(Mesh {
        control,
        control_admin,
        config_dir,
        sidecars,
        apps,
        order_inbound,
        identities: ids,
    })
}
