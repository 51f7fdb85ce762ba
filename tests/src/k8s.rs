//! Kubernetes side of the tests: the real `ternctl inject`, `kubernetes-validate` (PyPI) on
//! manifests, committed manifests kept equal to what generates them, and an HTTPS client for
//! tern-control's admission webhook.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use crate::http1;
use crate::process::{binary, repo_root};

/// The Kubernetes version the manifests are validated against (k8s-openapi's `v1_33` too).
pub const KUBERNETES_VERSION: &str = "1.33.0";
/// The name the API server calls the webhook by.
pub const WEBHOOK_NAME: &str = "tern-control.tern.svc";
/// `TERN_UPDATE_MANIFESTS=1` rewrites committed generated manifests instead of failing.
pub const UPDATE_ENV: &str = "TERN_UPDATE_MANIFESTS";

pub fn manifests_dir() -> PathBuf {
    repo_root().join("manifests")
}

/// Every `*.yaml` under `manifests/`, sorted; `manifests/compose/` is Docker Compose, not
/// Kubernetes, and is left out.
pub fn all_manifests() -> Result<Vec<PathBuf>> {
    // Prometheus rule files and their promtool unit tests are not Kubernetes objects;
    // tests/tests/prometheus.rs checks them with promtool instead.
    fn is_prometheus_rules(path: &Path) -> bool {
        path.parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "prometheus")
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("rules"))
    }
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "compose") {
                    continue;
                }
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && !is_prometheus_rules(&path)
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&manifests_dir(), &mut out)?;
    out.sort();
    Ok(out)
}

/// Runs `ternctl inject ARGS` with `stdin` (or none), no `TERN_*` variables inherited.
pub fn ternctl_inject(args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let program = binary("ternctl")?;
    let mut cmd = Command::new(&program);
    cmd.arg("inject").args(args).current_dir(repo_root());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TERN_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting ternctl inject")?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().ok_or_else(|| anyhow!("no stdin pipe"))?;
        pipe.write_all(text.as_bytes())
            .context("writing ternctl's stdin")?;
    }
    child
        .wait_with_output()
        .context("waiting for ternctl inject")
}

/// `ternctl inject ARGS` that must succeed; its stdout.
pub fn inject_ok(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = ternctl_inject(args, stdin)?;
    if !out.status.success() {
        bail!(
            "ternctl inject {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("ternctl inject printed no UTF-8")
}

/// The YAML documents of `text` as JSON values (empty documents skipped).
pub fn documents(text: &str) -> Result<Vec<serde_json::Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value: serde_yaml::Value = serde::Deserialize::deserialize(doc).context("YAML")?;
        if !value.is_null() {
            docs.push(serde_json::to_value(value).context("YAML as JSON")?);
        }
    }
    Ok(docs)
}

/// Runs `kubernetes-validate --strict` on `files`; `Ok(false)` when it is not installed (and
/// this is not CI, where that is an error). Fails unless every document passed.
pub fn kubernetes_validate(files: &[PathBuf]) -> Result<bool> {
    let run = Command::new("kubernetes-validate")
        .arg("--kubernetes-version")
        .arg(KUBERNETES_VERSION)
        .arg("--strict")
        .args(files)
        .output();
    let out = match run {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::missing(
                "kubernetes-validate is not installed (python3 -m pip install kubernetes-validate)",
            )?;
            return Ok(false);
        }
        Err(e) => return Err(e).context("running kubernetes-validate"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || text.contains("ERROR") || text.contains("WARN") {
        bail!("kubernetes-validate ({}):\n{text}", out.status);
    }
    let mut expected = 0;
    for f in files {
        let body =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        expected += documents(&body)?.len();
    }
    let passed = text.matches(" passed for resource ").count();
    if passed != expected {
        bail!("kubernetes-validate passed {passed} documents of {expected}:\n{text}");
    }
    Ok(true)
}

/// Checks that the committed `path` holds `expected`; with `TERN_UPDATE_MANIFESTS=1`, writes it.
pub fn check_generated(path: &Path, expected: &str, how: &str) -> Result<()> {
    if std::env::var(UPDATE_ENV).is_ok_and(|v| v == "1") {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, expected).with_context(|| format!("writing {}", path.display()))?;
        return Ok(());
    }
    let committed =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if committed != expected {
        let line = committed
            .lines()
            .zip(expected.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or_else(|| committed.lines().count().min(expected.lines().count()) + 1);
        bail!(
            "{} is not {how} (first difference at line {line}); regenerate it with \
             `{UPDATE_ENV}=1 cargo test -p tern-tests --test inject`",
            path.display()
        );
    }
    Ok(())
}

/// `manifests/control/mesh-config.yaml`: the ConfigMap tern-control reads its mesh config from,
/// holding the files of `control/examples/mesh/` as they are, less those that only declare
/// `tern.dev` Services: in the cluster tern-control runs with `--discovery kubernetes`, and the
/// cluster's own Services say what those do (ports, endpoints, identities by service account).
/// A file that mixes Services with other documents is an error, not silently half-copied.
pub fn mesh_config_manifest() -> Result<String> {
    let dir = repo_root().join("control/examples/mesh");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let mut out = String::from(
        "# The mesh config tern-control watches (mounted at /etc/tern/mesh): the files of\n\
         # control/examples/mesh/, one key each, but no Service: tern-control discovers the\n\
         # cluster's Services (--discovery kubernetes) and these documents apply on top by name.\n\
         # Edit and re-apply to push a change to every sidecar (the kubelet updates the mounted\n\
         # files within about a minute).\n\
         # Generated from control/examples/mesh/ by tests/tests/inject.rs.\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tern-mesh-config\n  namespace: tern\ndata:\n",
    );
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{} has no UTF-8 name", file.display()))?;
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let services = text
            .split("\n---")
            .filter(|d| declares_a_service(d))
            .count();
        if services > 0 {
            let documents = text.split("\n---").count();
            if services != documents {
                bail!("{} mixes Services with other documents", file.display());
            }
            continue;
        }
        out.push_str(&format!("  {name}: |\n"));
        for line in text.trim_end_matches('\n').lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    Ok(out)
}

/// Whether a YAML document (comments aside) is a `tern.dev` Service.
fn declares_a_service(doc: &str) -> bool {
    doc.lines().any(|l| l.trim_end() == "kind: Service")
}

/// `POST /mutate` with `body` to the webhook at `addr` over TLS, trusting the anchor PEM at
/// `anchor` and expecting the certificate for `server_name`.
pub async fn post_review(
    addr: SocketAddr,
    anchor: &Path,
    server_name: &str,
    body: &[u8],
) -> Result<http1::Response> {
    let pem = std::fs::read(anchor).with_context(|| format!("reading {}", anchor.display()))?;
    let roots = tern_identity::pem::roots(&pem).context("trust anchor")?;
    let config = rustls::ClientConfig::builder_with_provider(tern_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the webhook at {addr}"))?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS to the webhook as {server_name}"))?;
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: {server_name}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;
    let mut reader = BufReader::new(tls);
    http1::read_response(&mut reader, false).await
}
