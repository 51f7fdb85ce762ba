//! docs/CONFIGURATION.md stays true to the bootstrap config: its example
//! parses with this parser (so every key it shows exists) and validates, it
//! sets every key the config structs have (so none is undocumented), and the
//! flags table's YAML column names keys that exist.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use tern_test_support::key_paths::walk;

use super::FileConfig;

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONFIGURATION.md");
    std::fs::read_to_string(path).unwrap()
}

/// The body of the first ```yaml block after `marker`.
fn yaml_after<'a>(doc: &'a str, marker: &str) -> &'a str {
    let rest = &doc[doc.find(marker).unwrap()..];
    let start = rest.find("```yaml\n").unwrap() + "```yaml\n".len();
    let len = rest[start..].find("\n```").unwrap();
    &rest[start..start + len]
}

fn keys() -> BTreeSet<String> {
    let doc = doc();
    let file: FileConfig = serde_yaml::from_str(yaml_after(&doc, "<!-- bootstrap-example -->"))
        .unwrap_or_else(|e| panic!("docs/CONFIGURATION.md's bootstrap example: {e}"));
    if let Err(e) = file.validate() {
        panic!("docs/CONFIGURATION.md's bootstrap example does not validate: {e}");
    }
    let (mut all, mut set) = (BTreeSet::new(), BTreeSet::new());
    walk(
        &serde_json::to_value(&file).unwrap(),
        "",
        &mut all,
        &mut set,
    );
    let missing: Vec<&String> = all.difference(&set).collect();
    assert!(
        missing.is_empty(),
        "keys of the bootstrap config that docs/CONFIGURATION.md's example leaves out: {missing:?}"
    );
    all
}

#[test]
fn the_bootstrap_example_sets_every_key() {
    let all = keys();
    assert!(all.contains("admin.tap_headers") && all.contains("services[].dns"));
}

#[test]
fn the_flags_table_names_real_keys() {
    let all = keys();
    let doc = doc();
    let section = &doc[doc.find("## tern-proxy flags").unwrap()..];
    let section = &section[..section.find("\n## ").unwrap()];
    let mut named = 0;
    for row in section.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let key = cells[2].trim_matches('`');
        if key != "—" {
            assert!(all.contains(key), "{row}: no YAML key {key:?}");
            named += 1;
        }
    }
    assert!(named > 40, "{named} YAML keys in the flags table");
}
