//! Multi-document YAML in, multi-document YAML out.
//!
//! The input is split at `---` lines (as `kubectl` splits it), so an error names the document
//! it is in and the line in the whole input. A document injection left unchanged is written
//! back exactly as it came, comments included; a changed one is re-serialised.

use std::fmt;

use serde_yaml::Value;

use crate::workload::{inject_object, Outcome};
use crate::{Error, Options};

/// The output, and what happened to each document.
#[derive(Clone, Debug)]
pub struct Injected {
    pub output: String,
    pub reports: Vec<Report>,
}

/// What happened to one document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Which document of the input, counting from 1.
    pub index: usize,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub outcome: Outcome,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            describe(self.index, &self.kind, &self.name),
            self.outcome
        )
    }
}

/// A document that cannot be injected: which one, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {error}", describe(*.index, .kind, .name))]
pub struct DocumentError {
    /// Which document of the input, counting from 1.
    pub index: usize,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub error: Error,
}

fn describe(index: usize, kind: &Option<String>, name: &Option<String>) -> String {
    match (kind, name) {
        (Some(k), Some(n)) => format!("document {index} ({k} {n})"),
        (Some(k), None) => format!("document {index} ({k})"),
        (None, Some(n)) => format!("document {index} ({n})"),
        (None, None) => format!("document {index}"),
    }
}

/// One document of the input: its text and the line it starts on (from 1).
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits at lines that are `---` (alone, or followed by a space and content that belongs to
/// the document it starts).
fn split(input: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut first_line = 1;
    let mut offset = 0;
    for (i, line) in input.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker {
            chunks.push(Chunk {
                text: &input[start..offset],
                first_line,
            });
            // Content after the marker on the same line belongs to the next document.
            start = offset + 3;
            first_line = i + 1;
        }
        offset += line.len();
    }
    chunks.push(Chunk {
        text: &input[start..],
        first_line,
    });
    chunks
}

/// Injects every workload among the YAML documents of `input`. Nothing is returned but the
/// first error when any document fails: half-injected output is never printed.
pub fn inject_yaml(input: &str, options: &Options) -> Result<Injected, DocumentError> {
    let mut output = String::new();
    let mut reports = Vec::new();
    let mut index = 0;
    for chunk in split(input) {
        let value: Value = match serde_yaml::from_str(chunk.text) {
            Ok(v) => v,
            Err(e) => {
                index += 1;
                let (kind, name) = guess_kind_and_name(chunk.text);
                return Err(DocumentError {
                    index,
                    kind,
                    name,
                    error: yaml_error(&e, chunk.first_line),
                });
            }
        };
        // Comments or nothing between two markers is no document (kubectl skips it too).
        if value.is_null() {
            continue;
        }
        index += 1;
        let kind = value.get("kind").and_then(Value::as_str).map(String::from);
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(String::from);
        let mut changed = value.clone();
        let outcome = inject_object(&mut changed, options).map_err(|error| DocumentError {
            index,
            kind: kind.clone(),
            name: name.clone(),
            error,
        })?;
        if !output.is_empty() {
            output.push_str("---\n");
        }
        if outcome.changed() {
            let text = serde_yaml::to_string(&changed).map_err(|e| DocumentError {
                index,
                kind: kind.clone(),
                name: name.clone(),
                error: yaml_error(&e, chunk.first_line),
            })?;
            output.push_str(&text);
        } else {
            output.push_str(chunk.text.trim_start_matches(['\n', '\r']));
            if !output.ends_with('\n') {
                output.push('\n');
            }
        }
        reports.push(Report {
            index,
            kind,
            name,
            outcome,
        });
    }
    Ok(Injected { output, reports })
}

/// serde_yaml's message without its own (document-relative) position, and the line in the
/// whole input.
fn yaml_error(e: &serde_yaml::Error, first_line: usize) -> Error {
    let mut message = e.to_string();
    let line = e.location().map(|l| {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = format!("{stripped} (column {})", l.column());
        }
        first_line + l.line() - 1
    });
    Error::Yaml { line, message }
}

/// For a document that does not parse: its top-level `kind:` and its `metadata.name`, as far
/// as simple lines tell.
fn guess_kind_and_name(text: &str) -> (Option<String>, Option<String>) {
    let value = |line: &str, key: &str| {
        line.strip_prefix(key)
            .map(|v| v.trim().trim_matches(['"', '\'']).to_owned())
            .filter(|v| !v.is_empty() && !v.contains(['{', '[', ':', '#']))
    };
    let mut kind = None;
    let mut name = None;
    let mut in_metadata = false;
    for line in text.lines() {
        if !line.starts_with([' ', '\t']) {
            in_metadata = line.trim_end() == "metadata:";
            if kind.is_none() {
                kind = value(line, "kind:");
            }
        } else if in_metadata && name.is_none() {
            name = value(line.trim_start(), "name:");
        }
    }
    (kind, name)
}
