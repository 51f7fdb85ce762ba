//! docs/CONFIGURATION.md shows every field of every mesh config kind: its
//! annotated example, read as the raw documents, sets each field of each
//! spec struct somewhere (and `parse_files` accepts it, so every key it shows
//! exists).

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern_test_support::key_paths::walk;

use super::super::raw;
use super::*;

fn example() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONFIGURATION.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let rest = &doc[doc.find("<!-- mesh-example -->").unwrap()..];
    let start = rest.find("```yaml\n").unwrap() + "```yaml\n".len();
    let len = rest[start..].find("\n```").unwrap();
    rest[start..start + len].to_string()
}

fn typed<T: DeserializeOwned + Serialize>(v: serde_yaml::Value) -> Value {
    serde_json::to_value(serde_yaml::from_value::<T>(v).unwrap()).unwrap()
}

#[test]
fn the_documented_mesh_example_sets_every_field_of_every_kind() {
    let text = example();
    parse_files(&[(PathBuf::from("CONFIGURATION.md"), text.clone())]).unwrap();
    let (mut all, mut set) = (BTreeSet::new(), BTreeSet::new());
    let mut kinds = BTreeSet::new();
    for de in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(de).unwrap();
        let doc: raw::Document = serde_yaml::from_value(value).unwrap();
        let kind = doc.kind.clone().unwrap();
        let spec = doc.spec.clone().unwrap();
        let spec = match kind.as_str() {
            "Service" => typed::<raw::ServiceSpec>(spec),
            "TrafficPolicy" => typed::<raw::TrafficPolicySpec>(spec),
            "AuthorizationPolicy" => typed::<raw::AuthorizationPolicySpec>(spec),
            "Endpoints" => typed::<raw::EndpointsSpec>(spec),
            other => panic!("unknown kind {other}"),
        };
        walk(&spec, &kind, &mut all, &mut set);
        let envelope = serde_json::to_value(&doc).unwrap();
        walk(&envelope["metadata"], "metadata", &mut all, &mut set);
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    let missing: Vec<&String> = all.difference(&set).collect();
    assert!(
        missing.is_empty(),
        "fields docs/CONFIGURATION.md's mesh example leaves out: {missing:?}"
    );
}
