//! `ternctl token create`: a bootstrap token with which a workload proves its
//! namespace and service account to tern-control's CA (Identity.Certify).
//!
//! The token is signed with the same key file tern-control checks tokens
//! against: `--token-key-file`, or `token.key` in tern-control's state
//! directory (`.tern-control` by default), with the same `TERN_CONTROL_*`
//! environment variables. The file holds the raw key bytes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use tern_identity::token::{new_id, Claims, TokenKey};
use tern_identity::SpiffeId;

/// Shorter key files are refused, as tern-control refuses them.
const MIN_KEY_BYTES: usize = 16;

#[derive(Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new bootstrap token (one line on stdout).
    Create(CreateArgs),
}

#[derive(Args)]
struct CreateArgs {
    /// The workload's namespace.
    #[arg(long, default_value = "default")]
    namespace: String,

    /// The workload's service account: the token lets it get spiffe://<td>/ns/<namespace>/sa/<this>.
    #[arg(long)]
    service_account: String,

    /// How long the token is accepted (e.g. 1h, 30d) [default: it does not expire; the sidecar
    /// renews its certificate with it].
    #[arg(long, value_parser = humantime::parse_duration)]
    expires: Option<Duration>,

    /// tern-control's state directory, holding token.key.
    #[arg(long, env = "TERN_CONTROL_STATE_DIR", default_value = ".tern-control")]
    state_dir: PathBuf,

    /// The token key file [default: <state-dir>/token.key].
    #[arg(long, env = "TERN_CONTROL_TOKEN_KEY_FILE")]
    token_key_file: Option<PathBuf>,

    /// Write the token to this file (replaced in one step) instead of stdout: for
    /// containers without a shell, such as the Compose deployment's token job.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: TokenArgs) -> anyhow::Result<i32> {
    match args.command {
        TokenCommand::Create(a) => {
            let token = create(&a)?;
            match &a.out {
                None => println!("{token}"),
                Some(path) => write_token(path, &token)?,
            }
            Ok(0)
        }
    }
}

/// A token for `namespace`/`service_account` signed with the key in `state_dir`
/// (what `ternctl token create --state-dir` prints); the demo and the benchmark
/// mint their sidecars' tokens with it.
pub fn mint(state_dir: &Path, namespace: &str, service_account: &str) -> anyhow::Result<String> {
    create(&CreateArgs {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        expires: None,
        state_dir: state_dir.to_path_buf(),
        token_key_file: None,
        out: None,
    })
}

fn create(a: &CreateArgs) -> anyhow::Result<String> {
    // The same rules as the SPIFFE id the token will be exchanged for.
    SpiffeId::new("cluster.local", &a.namespace, &a.service_account)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = a
        .token_key_file
        .clone()
        .unwrap_or_else(|| a.state_dir.join("token.key"));
    let key = read_key(&path)?;
    let expires = match a.expires {
        None => None,
        Some(d) => {
            let at = SystemTime::now()
                .checked_add(d)
                .context("--expires is too far away")?;
            Some(
                at.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            )
        }
    };
    Ok(key.sign(&Claims {
        namespace: a.namespace.clone(),
        service_account: a.service_account.clone(),
        expires,
        id: new_id(),
    }))
}

fn write_token(path: &Path, token: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{token}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn read_key(path: &Path) -> anyhow::Result<TokenKey> {
    if !path.exists() {
        bail!(
            "no token key at {}: start tern-control first or pass --token-key-file",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() < MIN_KEY_BYTES {
        bail!(
            "{}: a token key has at least {MIN_KEY_BYTES} bytes, this one {}",
            path.display(),
            bytes.len()
        );
    }
    Ok(TokenKey::new(&bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(dir: &Path, sa: &str) -> CreateArgs {
        CreateArgs {
            namespace: "default".into(),
            service_account: sa.into(),
            expires: Some(Duration::from_secs(3600)),
            state_dir: dir.to_path_buf(),
            token_key_file: None,
            out: None,
        }
    }

    #[test]
    fn tokens_verify_with_the_state_dirs_key() {
        let dir = tempfile::tempdir().unwrap();
        let e = create(&args(dir.path(), "pay")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no token key at {}: start tern-control first or pass --token-key-file",
                dir.path().join("token.key").display()
            )
        );
        let bytes = TokenKey::generate().unwrap();
        std::fs::write(dir.path().join("token.key"), &bytes).unwrap();
        let token = create(&args(dir.path(), "pay")).unwrap();
        assert!(!token.contains('\n'));
        let claims = TokenKey::new(&bytes)
            .verify(&token, SystemTime::now())
            .unwrap();
        assert_eq!(claims.service_account, "pay");
        assert!(claims.expires.is_some());
        assert!(create(&args(dir.path(), "not valid")).is_err());
    }
}
