//! Topologies for the gRPC tests: echo apps reached directly, or through the two-sidecar path
//! (client → client sidecar's `--upstream` port → an app's inbound sidecar → the app), the
//! real mesh path: the sidecars hold certificates from a `tern-control` CA and the hop between
//! them is mTLS, with each app's sidecar checked for the `echo` identity.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tern_proto::test::v1::echo_client::EchoClient;
use tern_proto::test::v1::{StatsReply, StatsRequest};
use tonic::transport::{Channel, Endpoint};

use crate::checks::Target;
use crate::mtls::{spiffe, MeshCa};
use crate::process::{binary, Proc, TestDir, START_TIMEOUT};
use crate::proxy::{Proxy, ProxySpec};
use crate::{within, CALL_TIMEOUT};

/// Larger than the 5 MiB messages the tests send, so only a proxy can cause a size error.
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;
/// The service name the echo apps are registered under in the client sidecar.
pub const ECHO_SERVICE: &str = "echo";
/// What echo servers (tonic and Python alike) print once bound.
pub const LISTENING: &str = "echo-server listening on ";

/// Which way a test's calls travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The client dials the (first) app itself: proves the harness and the app without a proxy.
    Direct,
    /// The client dials its sidecar's upstream port; the call crosses two sidecars, mTLS between them.
    Sidecars,
}

/// A gRPC app under test and the address it listens on.
pub struct App {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub name: String,
}

impl App {
    /// Starts `program args...` and waits for its "echo-server listening on ADDR" line.
    pub async fn start(dir: &Path, name: &str, program: &Path, args: &[String]) -> Result<Self> {
        Self::start_with_env(dir, name, program, args, &[]).await
    }

    pub async fn start_with_env(
        dir: &Path,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let mut proc = Proc::spawn_with_env(dir, name, program, args, env)?;
        let addr_text = proc.wait_for_line(LISTENING, START_TIMEOUT).await?;
        let addr = addr_text
            .parse()
            .with_context(|| format!("{name} printed a bad address {addr_text:?}"))?;
        Ok(Self {
            proc,
            addr,
            name: name.to_string(),
        })
    }

    /// The tonic `echo-server` of this crate on a free port.
    pub async fn echo_server(dir: &Path, name: &str) -> Result<Self> {
        Self::echo_server_with(dir, name, &[]).await
    }

    /// The tonic `echo-server` with extra flags (`--content-length`, say).
    pub async fn echo_server_with(dir: &Path, name: &str, extra: &[&str]) -> Result<Self> {
        let program = binary("echo-server")?;
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--name".to_string(),
            name.to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::start(dir, name, &program, &args).await
    }
}

/// Echo apps, optionally each behind an inbound sidecar with one client sidecar in front.
///
/// Fields drop in order: processes stop before their log directory goes away.
pub struct EchoMesh {
    pub client: Option<Proxy>,
    pub inbound: Vec<Proxy>,
    pub apps: Vec<App>,
    /// The CA the sidecars' certificates come from (Route::Sidecars).
    pub ca: Option<MeshCa>,
    /// Where the test's client dials.
    pub target: SocketAddr,
    pub route: Route,
    pub dir: TestDir,
}

impl EchoMesh {
    /// `n` tonic echo servers named `echo-1..n`.
    pub async fn start(label: &str, route: Route, n: usize) -> Result<Self> {
        let dir = TestDir::new(label)?;
        let mut apps = Vec::with_capacity(n);
        for i in 1..=n {
            apps.push(App::echo_server(dir.path(), &format!("echo-{i}")).await?);
        }
        Self::around(dir, route, apps).await
    }

    /// Puts the route's sidecars (if any) in front of apps already started in `dir`.
    pub async fn around(dir: TestDir, route: Route, apps: Vec<App>) -> Result<Self> {
        Self::around_with(dir, route, apps, &|spec| spec).await
    }

    /// Like [`EchoMesh::around`], with each inbound sidecar's spec adjusted by `inbound_spec`.
    pub async fn around_with(
        dir: TestDir,
        route: Route,
        apps: Vec<App>,
        inbound_spec: &dyn Fn(ProxySpec) -> ProxySpec,
    ) -> Result<Self> {
        let first = apps.first().context("a mesh needs at least one app")?.addr;
        if route == Route::Direct {
            return Ok(Self {
                client: None,
                inbound: Vec::new(),
                apps,
                ca: None,
                target: first,
                route,
                dir,
            });
        }
        let ca = MeshCa::start(dir.path(), &[]).await?;
        let mut inbound = Vec::with_capacity(apps.len());
        for app in &apps {
            let spec =
                ProxySpec::new(&format!("{}-sidecar", app.name), ECHO_SERVICE).inbound(app.addr);
            let spec = ca.sidecar(inbound_spec(spec), ECHO_SERVICE)?;
            inbound.push(Proxy::start(dir.path(), spec).await?);
        }
        let endpoints: Vec<SocketAddr> = inbound.iter().map(|p| p.inbound).collect();
        let upstream = crate::process::free_addr()?;
        let echo_identity = format!("{ECHO_SERVICE}={}", spiffe(ECHO_SERVICE));
        let spec = ProxySpec::new("client-sidecar", "client")
            .upstream(ECHO_SERVICE, upstream)
            .endpoints(ECHO_SERVICE, &endpoints)
            .args(&["--endpoint-identity", &echo_identity]);
        let client = Proxy::start(dir.path(), ca.sidecar(spec, "client")?).await?;
        Ok(Self {
            client: Some(client),
            inbound,
            apps,
            ca: Some(ca),
            target: upstream,
            route,
            dir,
        })
    }

    /// A fresh channel (one HTTP/2 connection) to the target.
    pub async fn channel(&self) -> Result<Channel> {
        connect(self.target).await
    }

    /// An Echo client on a fresh channel to the target, with the large-message limits set.
    pub async fn client(&self) -> Result<EchoClient<Channel>> {
        Ok(echo_client(self.channel().await?))
    }

    /// Stats of app `i`, asked directly (never through a proxy).
    pub async fn stats(&self, i: usize) -> Result<StatsReply> {
        let app = self
            .apps
            .get(i)
            .with_context(|| format!("no app number {i}"))?;
        stats(app.addr).await
    }

    /// What the transparency checks need to call app 0 along this mesh's route.
    pub fn check_target(&self) -> Result<Target> {
        let app = self.apps.first().context("the mesh has no app")?;
        Ok(Target {
            call: self.target,
            direct: app.addr,
            server: app.name.clone(),
        })
    }

    /// The inbound sidecars' listen addresses (the client sidecar's endpoints).
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound.iter().map(|p| p.inbound).collect()
    }

    /// Unwraps a test step's result, or panics with the error and every process's output.
    #[track_caller]
    pub fn ok<T>(&self, result: Result<T>) -> T {
        match result {
            Ok(value) => value,
            Err(e) => panic!("{e:#}\n\n{}", self.diagnostics()),
        }
    }

    /// Everything every process printed, for a failing assertion's message.
    pub fn diagnostics(&self) -> String {
        let mut out = Vec::new();
        for app in &self.apps {
            out.push(app.proc.diagnostics());
        }
        if let Some(ca) = &self.ca {
            out.push(ca.control.proc.diagnostics());
        }
        for proxy in self.inbound.iter().chain(self.client.iter()) {
            out.push(proxy.proc.diagnostics());
        }
        out.join("\n")
    }
}

impl Drop for EchoMesh {
    fn drop(&mut self) {
        // Signal everyone first so the sidecars' drain periods overlap.
        for proxy in self.client.iter_mut().chain(self.inbound.iter_mut()) {
            proxy.proc.begin_stop();
        }
        for app in &mut self.apps {
            app.proc.begin_stop();
        }
    }
}

/// Connects one HTTP/2 channel, bounded in time.
pub async fn connect(addr: SocketAddr) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .context("building the endpoint")?
        .connect_timeout(Duration::from_secs(5));
    within(CALL_TIMEOUT, endpoint.connect())
        .await?
        .with_context(|| format!("connecting to {addr}"))
}

pub fn echo_client(channel: Channel) -> EchoClient<Channel> {
    EchoClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// `Stats` of the echo server at `addr`, over its own short-lived connection.
pub async fn stats(addr: SocketAddr) -> Result<StatsReply> {
    let mut client = echo_client(connect(addr).await?);
    let reply = within(CALL_TIMEOUT, client.stats(StatsRequest {}))
        .await?
        .with_context(|| format!("Stats on {addr}"))?;
    Ok(reply.into_inner())
}
