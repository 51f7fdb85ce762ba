//! Reading the config directory: which files count, how each is split into
//! documents, and how a document's envelope (`apiVersion`, `kind`,
//! `metadata`) and typed `spec` are read before validation.
//!
//! Files are `*.yaml` and `*.yml` directly in the directory, read in name
//! order, hidden files skipped (editors' swap files, and the `..data`
//! directories behind a Kubernetes ConfigMap mount, whose visible files are
//! symlinks and are followed).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::validate::{self, At, Kind, Parsed, Spec};
use super::{names, raw, ConfigError, ConfigErrors, LoadOptions, MeshConfig, API_VERSION};

/// Reads and validates every config file in `dir`.
pub fn load_dir(dir: &Path) -> Result<MeshConfig, ConfigErrors> {
    load_dir_with(dir, LoadOptions::default())
}

/// [`load_dir`] with `options`.
pub fn load_dir_with(dir: &Path, options: LoadOptions) -> Result<MeshConfig, ConfigErrors> {
    let files = read_dir(dir).map_err(|e| ConfigErrors(vec![e]))?;
    parse_files_with(&files, options)
}

/// Validates files already read: `(path, contents)` in the order given.
pub fn parse_files(files: &[(PathBuf, String)]) -> Result<MeshConfig, ConfigErrors> {
    parse_files_with(files, LoadOptions::default())
}

/// [`parse_files`] with `options`.
pub fn parse_files_with(
    files: &[(PathBuf, String)],
    options: LoadOptions,
) -> Result<MeshConfig, ConfigErrors> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (path, text) in files {
        split(path, text, &mut docs, &mut errors);
    }
    // References are only checked once every document has parsed, so that a
    // typo in a Service does not also show up as a bad reference everywhere.
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    validate::build(docs, options).map_err(ConfigErrors)
}

fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    let whole = |message: String| ConfigError {
        file: dir.to_path_buf(),
        doc: 0,
        field: String::new(),
        message,
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| whole(format!("cannot read the directory: {e}")))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| whole(format!("cannot list the directory: {e}")))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if name.starts_with('.') || !is_yaml {
            continue;
        }
        let path = entry.path();
        // metadata() follows symlinks: ConfigMap mounts are symlinks to files.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => paths.push(path),
            Ok(_) => {}
            // A file renamed away between listing and reading: its successor
            // triggers another reload.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(whole(format!("cannot read {}: {e}", path.display()))),
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push((path, text)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ConfigError {
                    file: path,
                    doc: 0,
                    field: String::new(),
                    message: format!("cannot read: {e}"),
                })
            }
        }
    }
    Ok(files)
}

fn split(file: &Path, text: &str, docs: &mut Vec<Parsed>, errors: &mut Vec<ConfigError>) {
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = At {
            file: file.to_path_buf(),
            doc: i + 1,
        };
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                // The YAML stream is broken; later documents cannot be trusted.
                errors.push(at.err("", format!("invalid YAML: {e}")));
                return;
            }
        };
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        match parse_doc(&at, value) {
            Ok(doc) => docs.push(doc),
            Err(e) => errors.push(e),
        }
    }
}

fn parse_doc(at: &At, value: serde_yaml::Value) -> Result<Parsed, ConfigError> {
    let doc: raw::Document = typed(at, "", value)?;
    match doc.api_version.as_deref() {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(at.err(
                "apiVersion",
                format!("`{other}` is not supported; use {API_VERSION}"),
            ))
        }
        None => return Err(at.err("apiVersion", format!("is required ({API_VERSION})"))),
    }
    let kind_name = doc.kind.ok_or_else(|| at.err("kind", "is required"))?;
    let kind = Kind::from_name(&kind_name).ok_or_else(|| {
        at.err(
            "kind",
            format!(
                "unknown kind `{kind_name}`; expected one of {}",
                Kind::ALL.map(|k| k.name()).join(", ")
            ),
        )
    })?;
    let meta = doc
        .metadata
        .ok_or_else(|| at.err("metadata", "is required"))?;
    let name = meta
        .name
        .ok_or_else(|| at.err("metadata.name", "is required"))?;
    let name_ok = match kind {
        // Service names are split out of `pay.namespace` by sidecars.
        Kind::Service => names::dns_label(&name),
        _ => names::dns_subdomain(&name),
    };
    name_ok.map_err(|m| at.err("metadata.name", m))?;
    let namespace = meta.namespace.unwrap_or_else(|| "default".to_owned());
    names::dns_label(&namespace).map_err(|m| at.err("metadata.namespace", m))?;
    let spec = doc.spec.ok_or_else(|| at.err("spec", "is required"))?;
    let spec = match kind {
        Kind::Service => Spec::Service(typed(at, "spec", spec)?),
        Kind::TrafficPolicy => Spec::TrafficPolicy(typed(at, "spec", spec)?),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(typed(at, "spec", spec)?),
        Kind::Endpoints => Spec::Endpoints(typed(at, "spec", spec)?),
    };
    Ok(Parsed {
        at: at.clone(),
        kind,
        name,
        namespace,
        spec,
    })
}

/// Deserializes `value` as `T`, reporting the path of the field that failed
/// below `prefix`.
fn typed<T: DeserializeOwned>(
    at: &At,
    prefix: &str,
    value: serde_yaml::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut field = join(prefix, &e.path().to_string());
        let message = e.inner().to_string();
        // serde names a missing field in the message only; put it in the path.
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            field = join(&field, missing);
        }
        at.err(field, message)
    })
}

fn join(prefix: &str, path: &str) -> String {
    let path = if path == "." { "" } else { path };
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}
