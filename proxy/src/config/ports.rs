//! Port lists such as `--opaque-ports 3306,6379,7000-7010`: parsed once into
//! a bit set, so the per-connection question "is this port opaque?" is one
//! lookup.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A list entry as written in YAML: a number (`6379`) or text (`"7000-7010"`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortItem {
    Port(u16),
    Text(String),
}

/// A set of TCP ports (1-65535).
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    bits: Box<[u64; 1024]>,
}

impl Default for PortSet {
    fn default() -> Self {
        Self {
            bits: Box::new([0; 1024]),
        }
    }
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port / 64)] & (1 << (port % 64)) != 0
    }

    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port / 64)] |= 1 << (port % 64);
    }

    pub fn remove(&mut self, port: u16) {
        self.bits[usize::from(port / 64)] &= !(1 << (port % 64));
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Reads entries like `6379`, `7000-7010` (each item may itself hold a
    /// comma-separated list); the error names the bad entry.
    pub fn parse(items: &[PortItem]) -> Result<Self, String> {
        let mut set = Self::default();
        for item in items {
            match item {
                PortItem::Port(0) => return Err("0 is not a port".into()),
                PortItem::Port(p) => set.insert(*p),
                PortItem::Text(text) => {
                    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let (lo, hi) = range(part)?;
                        for p in lo..=hi {
                            set.insert(p);
                        }
                    }
                }
            }
        }
        Ok(set)
    }

    /// The set as ranges, e.g. `[(3306, 3306), (7000, 7010)]`.
    pub fn ranges(&self) -> Vec<(u16, u16)> {
        let mut out: Vec<(u16, u16)> = Vec::new();
        for p in 1..=u16::MAX {
            if !self.contains(p) {
                continue;
            }
            match out.last_mut() {
                Some((_, hi)) if *hi + 1 == p => *hi = p,
                _ => out.push((p, p)),
            }
        }
        out
    }
}

fn range(part: &str) -> Result<(u16, u16), String> {
    let port = |s: &str| match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "{part:?} is not a port (1-65535) or a range like 7000-7010"
        )),
    };
    match part.split_once('-') {
        None => {
            let p = port(part)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let (lo, hi) = (port(a)?, port(b)?);
            if lo > hi {
                return Err(format!("{part:?}: the range ends before it starts"));
            }
            Ok((lo, hi))
        }
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ranges()
            .into_iter()
            .map(|(lo, hi)| match lo == hi {
                true => lo.to_string(),
                false => format!("{lo}-{hi}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for PortSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lists_and_ranges_parse() {
        let set = PortSet::parse(&[
            PortItem::Port(6379),
            PortItem::Text("3306, 7000-7002".into()),
        ])
        .unwrap();
        for p in [3306, 6379, 7000, 7001, 7002] {
            assert!(set.contains(p), "{p}");
        }
        assert!(!set.contains(7003) && !set.contains(80));
        assert_eq!(set.to_string(), "3306,6379,7000-7002");
        assert!(PortSet::parse(&[]).unwrap().is_empty());
        let all = PortSet::parse(&[PortItem::Text("1-65535".into())]).unwrap();
        assert!(all.contains(65535) && all.contains(1));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["0", "70000", "redis", "7010-7000", "1-"] {
            let e = PortSet::parse(&[PortItem::Text(bad.into())]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(PortSet::parse(&[PortItem::Port(0)]).is_err());
    }
}
