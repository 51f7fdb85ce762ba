//! Reading the Prometheus text format the admin listeners serve: one sample
//! per line, `name{label="value",...} value`; comments and malformed lines
//! are skipped, never fatal (a newer proxy may add what this does not know).

use std::collections::BTreeMap;

/// One sample of a scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map(String::as_str).unwrap_or("")
    }
}

/// The samples of a scrape whose names start with `prefix`.
pub fn parse(text: &str, prefix: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, after)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"} rest` → the labels and `rest`.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        rest = &after[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_samples_with_labels_escapes_and_infinity() {
        let text = "# HELP x y\n\
            tern_responses_total{direction=\"inbound\",grpc_status=\"OK\",route=\"a/b\"} 12\n\
            tern_request_duration_seconds_bucket{le=\"+Inf\",service=\"p\\\"q\"} 3 1700000000\n\
            tern_config_version 7\n\
            tern_broken{a=\"b\" 1\n";
        let s = parse(text, "tern_");
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].label("grpc_status"), "OK");
        assert_eq!(s[0].value, 12.0);
        assert_eq!(s[1].label("le"), "+Inf");
        assert_eq!(s[1].label("service"), "p\"q");
        assert_eq!(s[2].name, "tern_config_version");
        assert_eq!(s[2].value, 7.0);
    }
}
