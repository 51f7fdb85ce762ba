//! Reading Prometheus text exposition: samples by name and labels, and `promtool check metrics`.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

/// Metric names the proxy exposes, kept in one place so a rename is a one-line change here.
pub mod names {
    pub const REQUESTS_TOTAL: &str = "tern_requests_total";
    pub const RESPONSES_TOTAL: &str = "tern_responses_total";
    /// Values the `grpc_status` label may take for OK: Linkerd and Istio use the number, others
    /// the code's name; either is accepted.
    pub const GRPC_OK: [&str; 2] = ["0", "OK"];
}

/// Where Debian's `prometheus` package installs promtool.
pub const PROMTOOL: &str = "/usr/bin/promtool";

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample line of an exposition; comments and blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_line(line).with_context(|| format!("bad sample line {line:?}")))
        .collect()
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("no value")?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after_brace)?;
        labels = parsed;
        rest = remaining;
    }
    let value_text = rest.split_whitespace().next().context("no value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .with_context(|| format!("bad value {other:?}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `a="x",b="y\"z"}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Result<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').context("label without '='")?;
        let key = s[..eq].trim().to_string();
        let after = s[eq + 1..]
            .strip_prefix('"')
            .context("label value not quoted")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated escape"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.push((key, value));
        s = &after[end + 1..];
    }
}

/// Sum of the samples named `name` whose labels include every pair in `matching`.
pub fn sum(samples: &[Sample], name: &str, matching: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| matching.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// Whether promtool is installed; when it is not, the caller decides to skip or fail.
pub fn promtool_available() -> bool {
    std::path::Path::new(PROMTOOL).is_file()
}

/// Pipes `text` into `promtool check metrics`; any lint problem or parse error is an error that
/// quotes promtool's own report.
pub fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    {
        let mut stdin = child.stdin.take().context("promtool stdin")?;
        stdin
            .write_all(text.as_bytes())
            .context("writing to promtool")?;
    }
    let output = child.wait_with_output().context("waiting for promtool")?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "promtool check metrics failed ({}):\n{}",
            output.status,
            report.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const TEXT: &str = r#"# HELP tern_requests_total Requests.
# TYPE tern_requests_total counter
tern_requests_total{direction="outbound",service="echo",route="/a"} 3
tern_requests_total{direction="outbound",service="echo",route="/b"} 4
tern_requests_total{direction="inbound",service="echo",route="/a, \"x\"\\y"} 5
up 1 1700000000000
h_bucket{le="+Inf"} +Inf
"#;

    #[test]
    fn sums_by_labels() {
        let samples = parse(TEXT).unwrap();
        assert_eq!(
            sum(
                &samples,
                "tern_requests_total",
                &[("direction", "outbound")]
            ),
            7.0
        );
        assert_eq!(sum(&samples, "tern_requests_total", &[]), 12.0);
        assert_eq!(sum(&samples, "up", &[]), 1.0);
        assert_eq!(samples[2].label("route"), Some("/a, \"x\"\\y"));
        assert!(sum(&samples, "h_bucket", &[]).is_infinite());
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(parse("x{a=\"b} 1").is_err());
        assert!(parse("x 1x").is_err());
    }

    #[test]
    fn promtool_reports_lint_problems() {
        if !promtool_available() {
            crate::missing(&format!(
                "{PROMTOOL} not installed (Debian package prometheus)"
            ))
            .unwrap();
            return;
        }
        promtool_check("# HELP a_total A.\n# TYPE a_total counter\na_total 1\n").unwrap();
        // A counter without the _total suffix is a lint problem promtool reports.
        let err = promtool_check("# HELP a A.\n# TYPE a counter\na 1\n").unwrap_err();
        assert!(format!("{err:#}").contains("promtool"), "{err:#}");
    }
}
