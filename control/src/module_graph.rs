//! Keeps tern-control layered: this test reads the crate's sources and fails
//! on an import cycle between its top-level modules, naming the cycle.
//!
//! A module is a file of `src/` or a directory with its submodules; its
//! imports are the `crate::<module>` paths in its code, tests included (a
//! test that reaches up the graph ties the modules together just as much).
//! Comment lines are skipped: a doc link may point anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Each top-level module and the other top-level modules its code names.
fn graph(src: &Path) -> Graph {
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let path = entry.map(|e| e.path()).unwrap_or_default();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        // The crate roots and this test are not modules of the graph.
        if matches!(stem, "lib" | "main" | "module_graph") {
            continue;
        }
        let text = sources.entry(stem.to_owned()).or_default();
        read_rs(&path, text);
    }
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(m, text)| {
            let uses = crate_paths(text)
                .into_iter()
                .filter(|u| u != m && modules.contains(u))
                .collect();
            (m.clone(), uses)
        })
        .collect()
}

/// Appends the code lines of `path` (a `.rs` file, or every one under a directory).
fn read_rs(path: &Path, out: &mut String) {
    if path.is_dir() {
        let entries = std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for entry in entries.flatten() {
            read_rs(&entry.path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        let text =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            out.push_str(line);
            out.push('\n');
        }
    }
}

/// The first segment of every `crate::` path, `crate::{a, b::c}` groups included.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => found.extend(group_heads(group)),
            None => found.extend(ident(rest)),
        }
    }
    found
}

/// The leading identifier of each top-level item of a `{...}` use group.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && !c.is_whitespace() => {
                heads.extend(ident(&group[i..]));
                item_start = false;
            }
            _ => {}
        }
    }
    heads
}

fn ident(s: &str) -> Option<String> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| s[..end].to_owned())
}

/// A cycle, as the modules along it (the first repeated at the end), if any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        m: &'a str,
        graph: &'a Graph,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| *p == m) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| (*s).to_owned()).collect();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for next in graph.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_import_each_other_without_a_cycle() {
    let graph = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The parser sees imports at all (else an empty graph would pass).
    assert!(graph["app"].contains("cli"), "{graph:#?}");
    assert!(graph["identity"].contains("tokens"), "{graph:#?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "tern-control's modules import each other in a cycle: {}\nmove what both need \
             into a lower module (see control/README.md, \"Code layout\")",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_checker_finds_cycles_and_reads_use_groups() {
    let code = "use crate::{a::X, b::{self, Y}};\nlet z = crate::c::f();\n";
    let heads: Vec<String> = crate_paths(code).into_iter().collect();
    assert_eq!(heads, ["a", "b", "c"]);
    let graph: Graph = [("x", "y"), ("y", "z"), ("z", "y")]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), BTreeSet::from([b.to_owned()])))
        .collect();
    let cycle = find_cycle(&graph).map(|c| c.join(" → "));
    assert_eq!(cycle.as_deref(), Some("y → z → y"));
    let acyclic: Graph = [("x", "y"), ("y", "z")]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), BTreeSet::from([b.to_owned()])))
        .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
