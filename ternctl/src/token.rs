//! `ternctl token create`: a bootstrap token with which a workload proves its
//! namespace and service account to tern-control's CA (Identity.Certify);
//! `ternctl token revoke`: stop tern-control from accepting one.
//!
//! The token is signed with the same key file tern-control checks tokens
//! against: `--token-key-file`, or `token.key` in tern-control's state
//! directory (`.tern-control` by default), with the same `TERN_CONTROL_*`
//! environment variables. The file holds the raw key bytes.
//!
//! Tokens expire (24 hours unless `--ttl` says otherwise) and carry a random
//! id, printed on stderr when the token is made (stdout stays the token
//! alone, for scripts). Revoking appends the id to the revocation list
//! (`--revoked-tokens-file`, or `revoked-tokens` in the state directory),
//! which tern-control reads on every Certify.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use tern_identity::token::{new_id, Claims, TokenKey};
use tern_identity::SpiffeId;

/// Shorter key files are refused, as tern-control refuses them.
const MIN_KEY_BYTES: usize = 16;
/// How long a token is accepted unless `--ttl` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new bootstrap token (one line on stdout; its id and expiry on stderr).
    Create(CreateArgs),
    /// Revoke a token by its id: tern-control refuses it from its next Certify.
    Revoke(RevokeArgs),
}

#[derive(Args)]
struct CreateArgs {
    /// The workload's namespace.
    #[arg(long, default_value = "default")]
    namespace: String,

    /// The workload's service account: the token lets it get spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT.
    #[arg(long)]
    service_account: String,

    /// How long the token bootstraps a workload (e.g. 1h, 7d). After that it only renews the
    /// certificate of a workload that still holds a live one for its identity.
    #[arg(long, visible_alias = "expires", default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,

    #[command(flatten)]
    files: StateFiles,

    /// Write the token to this file (replaced in one step) instead of stdout: for
    /// containers without a shell, such as the Compose deployment's token job.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct RevokeArgs {
    /// The token's id (`token id:` when it was created; `token_id` in tern-control's log).
    /// Ids may start with `-`, which is taken as the id here, not as a flag.
    #[arg(allow_hyphen_values = true)]
    id: String,

    /// Why, kept beside the id in the list.
    #[arg(long)]
    reason: Option<String>,

    #[command(flatten)]
    files: StateFiles,
}

/// Where tern-control keeps the token key and the revocation list.
#[derive(Args)]
struct StateFiles {
    /// tern-control's state directory, holding token.key and revoked-tokens.
    #[arg(long, env = "TERN_CONTROL_STATE_DIR", default_value = ".tern-control")]
    state_dir: PathBuf,

    /// The token key file [default: STATE_DIR/token.key].
    #[arg(long, env = "TERN_CONTROL_TOKEN_KEY_FILE")]
    token_key_file: Option<PathBuf>,

    /// The revocation list tern-control reads [default: STATE_DIR/revoked-tokens].
    #[arg(long, env = "TERN_CONTROL_REVOKED_TOKENS_FILE")]
    revoked_tokens_file: Option<PathBuf>,
}

impl StateFiles {
    fn at(state_dir: &Path) -> Self {
        StateFiles {
            state_dir: state_dir.to_path_buf(),
            token_key_file: None,
            revoked_tokens_file: None,
        }
    }

    fn key(&self) -> PathBuf {
        self.token_key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("token.key"))
    }

    fn revoked(&self) -> PathBuf {
        self.revoked_tokens_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("revoked-tokens"))
    }
}

pub fn run(args: TokenArgs) -> anyhow::Result<i32> {
    match args.command {
        TokenCommand::Create(a) => {
            let (token, claims) = create(&a)?;
            match &a.out {
                None => println!("{token}"),
                Some(path) => write_token(path, &token)?,
            }
            eprintln!("{}", describe(&claims));
            Ok(0)
        }
        TokenCommand::Revoke(a) => {
            let path = revoke(&a, SystemTime::now())?;
            eprintln!(
                "revoked token {} in {}: tern-control refuses it from its next Certify \
                 (certificates already issued with it stay valid until they expire)",
                a.id,
                path.display()
            );
            Ok(0)
        }
    }
}

/// A token for `namespace`/`service_account` signed with the key in `state_dir`,
/// valid for [`DEFAULT_TTL`] (what `ternctl token create --state-dir` prints); the
/// demo and the benchmark mint their sidecars' tokens with it.
pub fn mint(state_dir: &Path, namespace: &str, service_account: &str) -> anyhow::Result<String> {
    let (token, _) = create(&CreateArgs {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        ttl: DEFAULT_TTL,
        files: StateFiles::at(state_dir),
        out: None,
    })?;
    Ok(token)
}

fn create(a: &CreateArgs) -> anyhow::Result<(String, Claims)> {
    // The same rules as the SPIFFE id the token will be exchanged for.
    SpiffeId::new("cluster.local", &a.namespace, &a.service_account)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = read_key(&a.files.key())?;
    let at = SystemTime::now()
        .checked_add(a.ttl)
        .context("--ttl is too far away")?;
    let expires = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        namespace: a.namespace.clone(),
        service_account: a.service_account.clone(),
        expires: Some(expires),
        id: new_id(),
    };
    Ok((key.sign(&claims), claims))
}

/// What `token create` says about a token on stderr.
fn describe(c: &Claims) -> String {
    let expires = c
        .expires
        .map(|s| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string())
        .unwrap_or_else(|| "never".into());
    format!(
        "token id: {} (service account {}/{}, expires {expires}; revoke with `ternctl token revoke {}`)",
        c.id, c.namespace, c.service_account, c.id
    )
}

/// Appends the id to the revocation list (creating it); returns its path.
fn revoke(a: &RevokeArgs, now: SystemTime) -> anyhow::Result<PathBuf> {
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if a.id.is_empty() || a.id.len() > 128 || !a.id.chars().all(valid) {
        bail!("`{}` is not a token id (letters, digits, - and _)", a.id);
    }
    let path = a.files.revoked();
    let reason = a
        .reason
        .as_deref()
        .map(|r| r.replace(['\n', '\r'], " "))
        .unwrap_or_default();
    let line = format!(
        "{}  # revoked {} {reason}\n",
        a.id,
        humantime::format_rfc3339_seconds(now)
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening the revocation list {}", path.display()))?;
    file.write_all(line.trim_end().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
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
            ttl: Duration::from_secs(3600),
            files: StateFiles::at(dir),
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
        let (token, made) = create(&args(dir.path(), "pay")).unwrap();
        assert!(!token.contains('\n'));
        let claims = TokenKey::new(&bytes)
            .verify(&token, SystemTime::now())
            .unwrap();
        assert_eq!(claims, made);
        assert_eq!(claims.service_account, "pay");
        let left = claims.expires.unwrap() as i64
            - SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
        assert!((3590..=3600).contains(&left), "{left}");
        assert!(describe(&claims).contains(&format!("token id: {}", claims.id)));
        assert!(create(&args(dir.path(), "not valid")).is_err());
        // The demo's tokens expire too.
        let minted = mint(dir.path(), "default", "pay").unwrap();
        let c = TokenKey::new(&bytes).open(&minted).unwrap();
        assert!(c.expires.is_some());
    }

    #[test]
    fn an_id_may_start_with_a_hyphen() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: TokenCommand,
        }
        let cli = Cli::try_parse_from(["token", "revoke", "-1aB_x", "--reason", "r"]).unwrap();
        let TokenCommand::Revoke(a) = cli.command else {
            panic!("not revoke");
        };
        assert_eq!(a.id, "-1aB_x");
        assert_eq!(a.reason.as_deref(), Some("r"));
    }

    #[test]
    fn revoking_appends_to_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let revoke_args = |id: &str| RevokeArgs {
            id: id.into(),
            reason: Some("leaked\nin a log".into()),
            files: StateFiles::at(dir.path()),
        };
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let path = revoke(&revoke_args("AbC-_1"), t).unwrap();
        revoke(&revoke_args("second"), t).unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            text,
            "AbC-_1  # revoked 2027-01-15T08:00:00Z leaked in a log\n\
             second  # revoked 2027-01-15T08:00:00Z leaked in a log\n"
        );
        for bad in ["", "a b", "x#y", "../etc"] {
            assert!(revoke(&revoke_args(bad), t).is_err(), "{bad:?}");
        }
    }
}
