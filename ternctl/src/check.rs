//! `ternctl check`: is the mesh healthy? One line per check, ✔ or ✖ with a
//! fix hint: tern-control reachable and ready, its CA's certificates, every
//! sidecar it knows (connected, answering, on the config it was sent, no
//! NACK, a certificate not near expiry), and for manifests given as
//! arguments, the workloads that are not injected. Exit code 0 only when
//! every check passes; `--output json` for scripts.

mod manifests;
mod mesh;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// tern-control's admin listener (host:port); its /state answers loopback peers, so
    /// reach it through `kubectl port-forward` in a cluster.
    #[arg(long, env = "TERN_CONTROL_ADMIN", default_value = "127.0.0.1:9990")]
    control: String,
    /// Kubernetes manifests (files or directories of .yaml/.yml): report the workloads that
    /// would run without the sidecar.
    manifests: Vec<PathBuf>,
    /// A CA certificate (trust anchor or issuer) with less validity left fails.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30days")]
    ca_min_validity: Duration,
    /// A workload certificate with less validity left fails (so does one past the point where
    /// its sidecar should have renewed it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    cert_min_validity: Duration,
    /// `text` (one line per check) or `json`.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// The outcome of one check.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// What was checked, e.g. `sidecar pay.default 127.0.0.1:4143: config`.
    pub check: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix it, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Outcome {
    pub fn pass(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn fail(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What decides pass or fail.
pub struct Limits {
    pub ca_min_validity: Duration,
    pub cert_min_validity: Duration,
}

pub async fn run(args: CheckArgs) -> anyhow::Result<i32> {
    let limits = Limits {
        ca_min_validity: args.ca_min_validity,
        cert_min_validity: args.cert_min_validity,
    };
    let mut outcomes = mesh::check(&args.control, &limits).await;
    for path in &args.manifests {
        outcomes.extend(manifests::check(path));
    }
    let ok = outcomes.iter().all(|o| o.ok);
    if args.output == "json" {
        let doc = serde_json::json!({"ok": ok, "checks": outcomes});
        println!("{doc}");
    } else {
        for o in &outcomes {
            println!("{}", render(o));
        }
        let failed = outcomes.iter().filter(|o| !o.ok).count();
        match failed {
            0 => println!("\nStatus check results are ✔ ({} checks)", outcomes.len()),
            n => println!("\n{n} of {} checks failed ✖", outcomes.len()),
        }
    }
    Ok(if ok { 0 } else { 1 })
}

fn render(o: &Outcome) -> String {
    let mark = if o.ok { "✔" } else { "✖" };
    let mut line = format!("{mark} {}: {}", o.check, o.detail);
    if let Some(fix) = &o.fix {
        line.push_str(&format!("\n    fix: {fix}"));
    }
    line
}

/// `3d 4h`, `12m 5s`: the two largest units of a duration, for people.
pub fn approx(d: Duration) -> String {
    let secs = d.as_secs();
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, unit) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_durations_read_well() {
        assert_eq!(
            approx(Duration::from_secs(3 * 86_400 + 4 * 3600 + 7)),
            "3d 4h"
        );
        assert_eq!(approx(Duration::from_secs(65)), "1m 5s");
        assert_eq!(approx(Duration::from_secs(0)), "0s");
        let o = Outcome::fail("sidecar x", "not answering", "restart it");
        assert_eq!(
            render(&o),
            "✖ sidecar x: not answering\n    fix: restart it"
        );
        assert_eq!(render(&Outcome::pass("a", "b")), "✔ a: b");
    }
}
