//! The key paths of a JSON value, for tests that check a documented example
//! sets every field of a config type.

use std::collections::BTreeSet;

use serde_json::Value;

/// Every key path in `v` under `path` (`a.b`, `list[].c`) into `all`, and
/// into `set` those with a value: not null, not an empty list.
pub fn walk(v: &Value, path: &str, all: &mut BTreeSet<String>, set: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            set.insert(path.to_string());
            for (k, v) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                all.insert(p.clone());
                walk(v, &p, all, set);
            }
        }
        Value::Array(items) => {
            if !items.is_empty() {
                set.insert(path.to_string());
            }
            for item in items {
                walk(item, &format!("{path}[]"), all, set);
            }
        }
        Value::Null => {}
        _ => {
            set.insert(path.to_string());
        }
    }
}
