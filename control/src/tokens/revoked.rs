//! The revocation list: bootstrap token ids Certify refuses.
//!
//! A text file, one token id per line; `#` starts a comment and anything
//! after the id on its line is ignored (`ternctl token revoke` writes
//! `<id>  # revoked <time> <reason>`). It is read afresh on every Certify —
//! Certify runs once per workload certificate, so this costs nothing and a
//! revocation holds from the very next request, without a restart or a
//! watch. In Kubernetes the file can be a mounted ConfigMap key (the kubelet
//! updates it in place, within its sync period).
//!
//! A missing file revokes nothing. A file that exists but cannot be read (or
//! is absurdly large) fails closed: Certify answers UNAVAILABLE rather than
//! risk honouring a revoked token.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Larger files are refused unread (a million ids fit in ~16 MiB).
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct RevocationList {
    path: PathBuf,
}

impl RevocationList {
    pub fn new(path: PathBuf) -> Self {
        RevocationList { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `token_id` is revoked now; `Err` when the list cannot be read.
    pub async fn contains(&self, token_id: &str) -> Result<bool, String> {
        let what =
            |e: &dyn std::fmt::Display| format!("revocation list {}: {e}", self.path.display());
        let len = match tokio::fs::metadata(&self.path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(what(&e)),
        };
        if len > MAX_BYTES {
            return Err(what(&format!("{len} bytes, more than {MAX_BYTES}")));
        }
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(what(&e)),
        };
        Ok(parse(&String::from_utf8_lossy(&bytes)).contains(token_id))
    }
}

/// The ids in a revocation list's text.
pub fn parse(text: &str) -> HashSet<&str> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or_default();
            line.split_whitespace().next()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_comments_and_blank_lines() {
        let ids =
            parse("# revoked\nAbC-_1  # revoked 2026-01-01T00:00:00Z leaked\n\n  x2 trailing\n");
        let mut ids: Vec<&str> = ids.into_iter().collect();
        ids.sort();
        assert_eq!(ids, ["AbC-_1", "x2"]);
    }

    #[tokio::test]
    async fn missing_revokes_nothing_and_unreadable_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let list = RevocationList::new(dir.path().join("revoked-tokens"));
        assert!(!list.contains("a").await.unwrap());
        std::fs::write(list.path(), "a # leaked\n").unwrap();
        assert!(list.contains("a").await.unwrap());
        assert!(!list.contains("b").await.unwrap());
        // A directory where the file should be: unreadable.
        let odd = RevocationList::new(dir.path().to_path_buf());
        assert!(odd.contains("a").await.is_err());
    }
}
