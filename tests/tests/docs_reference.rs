//! The user docs stay true to the binaries: every flag (and its environment variable) that
//! `tern-proxy --help` and `tern-control --help` print is in docs/CONFIGURATION.md's tables, and
//! every flag there is one the binary has; the mesh config example passes `tern-control
//! --check`; and every relative link in README.md and docs/ leads to a file of this checkout.
//! (The YAML examples are checked field by field against the config structs in
//! proxy/src/config/reference.rs and control/src/config/tests/reference.rs.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use tern_tests::process::{binary, repo_root};
use tern_tests::{Must, TestDir};

fn doc() -> String {
    std::fs::read_to_string(repo_root().join("docs/CONFIGURATION.md")).unwrap()
}

/// The part of `doc` under the heading `heading`, up to the next `## `.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no {heading:?} in docs/CONFIGURATION.md"));
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    &rest[..end]
}

/// `(flags, environment variables)` of a table's rows: `| `--flag ARG` | `ENV` | ...`.
fn documented(table: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut flags, mut env) = (BTreeSet::new(), BTreeSet::new());
    for row in table.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let flag = cells[0].trim_start_matches("| `").trim_end_matches('`');
        let flag = flag.split([' ', '[', '=']).next().unwrap();
        flags.insert(flag.to_string());
        env.insert(cells[1].trim_matches('`').to_string());
    }
    (flags, env)
}

/// `(flags, environment variables)` that `program --help` prints (but `--help`, `--version`).
fn from_help(program: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(binary(program).must())
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} --help: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (mut flags, mut env) = (BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix("-h, ").unwrap_or(line);
        let line = line.strip_prefix("-V, ").unwrap_or(line);
        if let Some(rest) = line.strip_prefix("--") {
            let name = rest.split([' ', '[', '=']).next().unwrap();
            if name != "help" && name != "version" {
                flags.insert(format!("--{name}"));
            }
        }
        let mut rest = line;
        while let Some(i) = rest.find("[env: ") {
            rest = &rest[i + "[env: ".len()..];
            env.insert(rest.split('=').next().unwrap().to_string());
        }
    }
    (flags, env)
}

fn check(program: &str, heading: &str) {
    let doc = doc();
    let (doc_flags, doc_env) = documented(section(&doc, heading));
    let (help_flags, help_env) = from_help(program);
    assert!(help_flags.len() > 20, "{program}: {help_flags:?}");
    let undocumented: Vec<_> = help_flags.difference(&doc_flags).collect();
    let stale: Vec<_> = doc_flags.difference(&help_flags).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/CONFIGURATION.md {heading:?} lacks {undocumented:?}; {program} has no {stale:?}"
    );
    let undocumented: Vec<_> = help_env.difference(&doc_env).collect();
    let stale: Vec<_> = doc_env.difference(&help_env).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/CONFIGURATION.md {heading:?} lacks variables {undocumented:?}; {program} reads no {stale:?}"
    );
}

#[test]
fn every_tern_proxy_flag_is_documented_and_every_documented_one_exists() {
    check("tern-proxy", "## tern-proxy flags");
}

#[test]
fn every_tern_control_flag_is_documented_and_every_documented_one_exists() {
    check("tern-control", "## tern-control flags");
}

#[test]
fn the_mesh_config_example_is_valid() {
    let doc = doc();
    let rest = &doc[doc.find("<!-- mesh-example -->").unwrap()..];
    let start = rest.find("```yaml\n").unwrap() + "```yaml\n".len();
    let example = &rest[start..start + rest[start..].find("\n```").unwrap()];
    for kind in [
        "Service",
        "TrafficPolicy",
        "AuthorizationPolicy",
        "Endpoints",
    ] {
        assert!(example.contains(&format!("kind: {kind}")), "{kind} missing");
    }
    let dir = TestDir::new("docs-mesh-example").must();
    std::fs::write(dir.path().join("mesh.yaml"), example).unwrap();
    let out = Command::new(binary("tern-control").must())
        .args(["--check", "--config-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern-control --check refuses docs/CONFIGURATION.md's mesh example:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Relative link targets of a markdown file: `](target)`, without `#anchor`.
fn links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter(|t| !t.contains("://") && !t.starts_with('#') && !t.starts_with("mailto:"))
        .map(|t| t.split('#').next().unwrap_or(t).to_string())
        .collect()
}

fn markdown_files() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files
}

#[test]
fn readme_and_docs_link_only_to_files_of_this_checkout() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap_or(Path::new("."));
        for target in links(&text) {
            if !dir.join(&target).exists() {
                broken.push(format!("{}: {target}", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to nothing: {broken:#?}");
}
