//! Workload identity against the real `tern-control`: a control plane whose CA lives in the
//! test directory, bootstrap tokens minted by the real `ternctl token create`, and a client of
//! `tern.identity.v1.Identity/Certify` that speaks TLS to the control plane the way a sidecar
//! does (checking the control plane's SPIFFE id, presenting a workload certificate when it has
//! one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use hyper_util::rt::TokioIo;
use tern_identity::csr::WorkloadKey;
use tern_identity::tls::{client_config, server_config, server_name, ClientAuth, ALPN_H2};
use tern_identity::{CertStore, Credentials, SpiffeId, TrustAnchors};
use tern_proto::identity::v1::identity_client::IdentityClient;
use tern_proto::identity::v1::CertifyRequest;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::control::{ConfigDir, Control};
use crate::process::binary;
use crate::CALL_TIMEOUT;

/// The identity tern-control presents by default (trust domain `cluster.local`).
pub const CONTROL_IDENTITY: &str = "spiffe://cluster.local/ns/tern/sa/tern-control";

/// Starts `tern-control` watching `config` with its CA and token key generated in
/// `dir/control-state`, and returns it with the path of its trust anchor.
pub async fn start_control(
    dir: &Path,
    config: &ConfigDir,
    extra_args: &[&str],
) -> Result<(Control, PathBuf)> {
    let control = Control::start(dir, "tern-control", config, extra_args).await?;
    let anchor = control.trust_anchor();
    if !anchor.is_file() {
        bail!(
            "tern-control is ready but {} does not exist\n{}",
            anchor.display(),
            control.proc.diagnostics()
        );
    }
    Ok((control, anchor))
}

/// Runs the real `ternctl token create ARGS...` (no `TERN_*` variable inherited).
pub fn token_create(args: &[&str]) -> Result<Output> {
    ternctl_token("create", args)
}

/// Runs the real `ternctl token revoke ARGS...` (no `TERN_*` variable inherited).
pub fn token_revoke(args: &[&str]) -> Result<Output> {
    ternctl_token("revoke", args)
}

fn ternctl_token(command: &str, args: &[&str]) -> Result<Output> {
    let ternctl = binary("ternctl")?;
    let mut cmd = Command::new(&ternctl);
    cmd.args(["token", command]).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TERN_") {
            cmd.env_remove(key);
        }
    }
    cmd.output()
        .with_context(|| format!("running {} token {command}", ternctl.display()))
}

/// A bootstrap token for `namespace`/`service_account`, signed with the key in `state_dir`.
pub fn mint_token(state_dir: &Path, namespace: &str, service_account: &str) -> Result<String> {
    let state = state_dir.display().to_string();
    let out = token_create(&[
        "--state-dir",
        &state,
        "--namespace",
        namespace,
        "--service-account",
        service_account,
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "ternctl token create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lines: Vec<&str> = stdout.lines().collect();
    match lines.as_slice() {
        [token] if !token.is_empty() => Ok((*token).to_string()),
        _ => bail!("ternctl token create printed {stdout:?}, not one token line"),
    }
}

/// A gRPC channel to `grpc` over TLS that accepts only a server presenting `control_identity`
/// under `anchors_pem`, and presents `client` (chain PEM, key PEM) when given.
pub async fn tls_channel(
    grpc: SocketAddr,
    anchors_pem: &str,
    control_identity: &str,
    client: Option<(&str, &str)>,
) -> Result<Channel> {
    let roots = TrustAnchors::from_pem(anchors_pem.as_bytes())?;
    let store = match client {
        None => None,
        Some((chain, key)) => {
            let store = CertStore::new();
            store.set(credentials(chain, key)?);
            Some(store)
        }
    };
    let config = client_config(store, roots, Arc::from(control_identity), &[ALPN_H2])?;
    let connector = tower::service_fn(move |_: Uri| {
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
        async move {
            let tcp = TcpStream::connect(grpc).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name(grpc.ip()), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{grpc}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .map_err(|e| anyhow!("TLS connection to {grpc}: {}", chain(&e)))
}

/// Asks tern-control at `grpc` (over TLS, expecting `control_identity` under `anchors_pem`) to
/// certify `identity` with `token`, for a fresh key. Returns the chain and the key, as PEM. A
/// connection that fails (a handshake refused, say) is `UNAVAILABLE` with the reason.
pub async fn certify(
    grpc: SocketAddr,
    anchors_pem: &str,
    control_identity: &str,
    identity: &str,
    token: &str,
) -> Result<(String, String), tonic::Status> {
    certify_with(grpc, anchors_pem, control_identity, identity, token, None).await
}

/// Like [`certify`], presenting `client` (chain PEM, key PEM) on the TLS connection when given:
/// a renewal, as a sidecar that holds a certificate makes it.
pub async fn certify_with(
    grpc: SocketAddr,
    anchors_pem: &str,
    control_identity: &str,
    identity: &str,
    token: &str,
    client: Option<(&str, &str)>,
) -> Result<(String, String), tonic::Status> {
    let key = WorkloadKey::generate().map_err(|e| tonic::Status::internal(e.to_string()))?;
    let csr = match SpiffeId::parse(identity) {
        Ok(id) => key
            .csr_pem(&id)
            .map_err(|e| tonic::Status::internal(e.to_string()))?,
        // Still ask: the control plane is the one to refuse it.
        Err(_) => String::new(),
    };
    let channel = tls_channel(grpc, anchors_pem, control_identity, client)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let request = CertifyRequest {
        identity: identity.to_string(),
        token: token.to_string(),
        csr_pem: csr,
    };
    let response = IdentityClient::new(channel).certify(request).await?;
    Ok((response.into_inner().chain_pem, key.private_key_pem()))
}

/// The subject alternative names of the first certificate of `chain_pem`, as `URI:...`,
/// `DNS:...`, `IP:...` or the parser's own spelling for other kinds.
pub fn leaf_sans(chain_pem: &str) -> Result<Vec<String>> {
    let certs = tern_identity::pem::certs(chain_pem.as_bytes())?;
    let leaf = certs.first().ok_or_else(|| anyhow!("empty chain"))?;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| anyhow!("leaf: {e}"))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| anyhow!("leaf SAN: {e}"))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect())
}

/// Proves that `chain_pem` with `key_pem` is a certificate for `identity` that chains to
/// `anchors_pem`: a mesh TLS handshake (in memory) whose client trusts only those anchors and
/// accepts only that identity.
pub async fn verify_chain(
    anchors_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    identity: &str,
) -> Result<()> {
    let roots = TrustAnchors::from_pem(anchors_pem.as_bytes())?;
    let store = CertStore::new();
    store.set(credentials(chain_pem, key_pem)?);
    let server = server_config(store, Arc::clone(&roots), ClientAuth::Optional)?;
    let client = client_config(None, roots, Arc::from(identity), &[ALPN_H2])?;
    let (c, s) = tokio::io::duplex(64 * 1024);
    let accept = tokio_rustls::TlsAcceptor::from(server).accept(s);
    let name = server_name(std::net::Ipv4Addr::LOCALHOST.into());
    let connect = tokio_rustls::TlsConnector::from(client).connect(name, c);
    let (server, client) =
        crate::within(CALL_TIMEOUT, async { tokio::join!(accept, connect) }).await?;
    client.context("the chain does not verify (client side)")?;
    server.context("handshake (server side)")?;
    Ok(())
}

fn credentials(chain_pem: &str, key_pem: &str) -> Result<Credentials> {
    let chain = tern_identity::pem::certs(chain_pem.as_bytes())?;
    let key = tern_identity::pem::private_key(key_pem.as_bytes())?;
    Ok(Credentials::new(chain, &key)?)
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
