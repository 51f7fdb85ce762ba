//! The manifest check: which workloads of Kubernetes YAML files would run
//! without the sidecar, judged by the same code `ternctl inject` and the
//! admission webhook run.

use std::path::{Path, PathBuf};

use tern_inject::Outcome as Injection;

use super::Outcome;

pub fn check(path: &Path) -> Vec<Outcome> {
    let files = match yaml_files(path) {
        Ok(f) => f,
        Err(e) => {
            return vec![Outcome::fail(
                format!("manifests {}", path.display()),
                format!("cannot read: {e}"),
                "give a YAML file or a directory of them",
            )]
        }
    };
    files.iter().flat_map(|f| file(f)).collect()
}

fn file(path: &Path) -> Vec<Outcome> {
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return vec![Outcome::fail(
                name,
                format!("cannot read: {e}"),
                "check the path",
            )]
        }
    };
    let injected = match tern_inject::inject_yaml(&text, &tern_inject::Options::default()) {
        Ok(i) => i,
        Err(e) => return vec![Outcome::fail(name, e.to_string(), "fix the YAML")],
    };
    let mut out = Vec::new();
    for report in &injected.reports {
        let what = format!(
            "{name}: {} {}",
            report.kind.as_deref().unwrap_or("document"),
            report.name.as_deref().unwrap_or("(unnamed)")
        );
        let verdicts = match &report.outcome {
            Injection::List(items) => items.iter().collect(),
            one => vec![one],
        };
        for v in verdicts {
            match v {
                Injection::Injected { .. } => out.push(Outcome::fail(
                    &what,
                    "not injected: its pods run without the sidecar",
                    format!(
                        "ternctl inject {} | kubectl apply -f -  (or let tern-control's \
                         admission webhook inject it)",
                        path.display()
                    ),
                )),
                Injection::AlreadyInjected => out.push(Outcome::pass(&what, "injected")),
                Injection::OptedOut | Injection::HostNetwork => out.push(Outcome::pass(
                    &what,
                    format!("not injected on purpose ({v})"),
                )),
                Injection::NotAWorkload | Injection::List(_) => {}
            }
        }
    }
    out
}

/// The file itself, or the .yaml/.yml files under a directory, sorted.
fn yaml_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        std::fs::metadata(path)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_dir() {
            files.extend(yaml_files(&p)?);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn repo(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    }

    #[test]
    fn names_the_workloads_without_the_sidecar() {
        let plain = check(&repo("manifests/demo/demo.yaml"));
        let failed: Vec<&Outcome> = plain.iter().filter(|o| !o.ok).collect();
        assert!(!failed.is_empty(), "{plain:?}");
        assert!(failed.iter().all(|o| o.detail.starts_with("not injected")));
        let injected = check(&repo("manifests/demo-injected"));
        assert!(!injected.is_empty());
        assert!(injected.iter().all(|o| o.ok), "{injected:?}");
        assert!(!check(&repo("no/such/file.yaml"))[0].ok);
    }
}
