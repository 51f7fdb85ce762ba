//! DNS discovery: a service's endpoints are the A/AAAA records of a host name, or the targets
//! of its SRV records when the host is written `_service._proto.name`.
//!
//! Each watched name runs one task that re-resolves when the shortest TTL of the answer runs
//! out, so a scaled-up or scaled-down headless service is seen within one TTL. Names are always
//! taken as fully qualified: search domains are never appended, because mesh names are written
//! complete and a search-list walk would multiply queries and could match the wrong service.
//!
//! SRV: every target of the lowest priority that resolves to at least one address becomes an
//! endpoint on the record's port (the watch's port argument is ignored); higher priorities are
//! used only when no lower one has an address. Weights are ignored, the balancer spreads load.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as WireError, NetError, NoRecords};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::proto::ProtoError;
use hickory_resolver::TokioResolver;
use tern_backoff::ExpBackoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::{Endpoint, EndpointSet};

/// A shared resolver handle; clones share connections and the TTL-bounded response cache.
pub type Resolver = TokioResolver;

/// Re-resolution interval bounds: below 1s a zero-TTL name would be hammered, above 300s a
/// long-TTL name would hide scale events for too long.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Used when an answer carries no TTL at all (empty answer without an SOA record).
const NO_TTL_REFRESH: Duration = Duration::from_secs(5);
/// The delay before retry number `failures + 1` of a failing name: 1s, 2s, 4s ... capped at 30s.
const BACKOFF: ExpBackoff = ExpBackoff::new(Duration::from_secs(1), Duration::from_secs(30));
/// Entries expire with their TTL, so this only bounds memory across many watched names.
const CACHE_ENTRIES: u64 = 1024;

/// Where DNS discovery sends its queries.
#[derive(Clone, Debug)]
pub enum Nameserver {
    /// The nameservers of `/etc/resolv.conf`. Its `search` and `ndots` are not applied:
    /// names are taken as fully qualified.
    System,
    /// One server, e.g. the cluster DNS; queried over UDP and TCP on the given port.
    Addr(SocketAddr),
}

/// Why a resolver could not be built or a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the system DNS config (/etc/resolv.conf): {0}")]
    SystemConf(#[source] NetError),
    #[error("cannot build the DNS resolver: {0}")]
    Build(#[source] NetError),
    #[error("invalid DNS name {name:?}: {source}")]
    InvalidName { name: String, source: ProtoError },
    #[error("{record_type} lookup of {name} failed: {source}")]
    Lookup {
        name: String,
        record_type: RecordType,
        source: NetError,
    },
}

/// Builds one shared resolver querying `ns` over UDP, falling back to TCP for truncated answers.
pub fn resolver(ns: &Nameserver) -> Result<Resolver, DnsError> {
    let config = match ns {
        Nameserver::Addr(addr) => ResolverConfig::from_name_servers(vec![nameserver_config(*addr)]),
        // The resolver's own resolv.conf reader; its search/ndots options are replaced below.
        Nameserver::System => {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(DnsError::SystemConf)?
                .0
        }
    };
    let mut opts = ResolverOpts::default();
    opts.ndots = 0;
    // /etc/hosts answers carry no TTL and would pin a name forever.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.try_tcp_on_error = true;
    opts.cache_size = CACHE_ENTRIES;
    // A cached answer must not outlive the longest refresh interval, or a long negative TTL
    // (typical SOA minimum: an hour) would hide newly added records.
    opts.positive_max_ttl = Some(MAX_REFRESH);
    opts.negative_max_ttl = Some(MAX_REFRESH);
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(DnsError::Build)
}

fn nameserver_config(addr: SocketAddr) -> NameServerConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

/// Spawns a task that keeps `tx` holding the endpoints of `host` (see the module docs).
///
/// Publishes the sorted, deduplicated set whenever it changes and re-resolves when the shortest
/// TTL expires (clamped to 1s..300s). On a failed resolution the last good set stays and the
/// task retries with backoff from 1s to 30s; until the first success `tx` keeps its initial
/// value. NXDOMAIN or no records publishes an empty set. An IP literal is published once.
/// The task ends when every receiver of `tx` is gone.
pub fn spawn_watch(
    resolver: Resolver,
    service: String,
    host: String,
    port: u16,
    tx: watch::Sender<EndpointSet>,
) -> JoinHandle<()> {
    let span = info_span!("dns_watch", %service, %host);
    let task = async move {
        let parsed = Target::parse(&host);
        let Ok(target) = parsed.inspect_err(|error| error!(%error, "DNS discovery disabled"))
        else {
            return;
        };
        // Racing the whole loop against `closed` drops an in-flight query or sleep at once.
        tokio::select! {
            () = tx.closed() => debug!("DNS watch ended: no receivers"),
            () = run(&resolver, &target, port, &tx) => {}
        }
    };
    tokio::spawn(task.instrument(span))
}

#[derive(Debug, PartialEq)]
enum Target {
    Ip(IpAddr),
    Host(Name),
    Srv(Name),
}

impl Target {
    fn parse(host: &str) -> Result<Self, DnsError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let mut name = Name::from_ascii(host).map_err(|source| DnsError::InvalidName {
            name: host.to_owned(),
            source,
        })?;
        name.set_fqdn(true);
        let mut labels = name.iter();
        let underscored = |label: Option<&[u8]>| label.is_some_and(|l| l.starts_with(b"_"));
        let srv = name.num_labels() > 2 && underscored(labels.next()) && underscored(labels.next());
        Ok(if srv {
            Self::Srv(name)
        } else {
            Self::Host(name)
        })
    }
}

/// One resolution: the endpoint addresses and the shortest TTL seen, if any answer had one.
#[derive(Debug)]
struct Resolution {
    addrs: BTreeSet<SocketAddr>,
    ttl: Option<Duration>,
}

async fn run(resolver: &Resolver, target: &Target, port: u16, tx: &watch::Sender<EndpointSet>) {
    let mut failures = 0;
    let mut was_empty = false;
    loop {
        let result = match target {
            Target::Srv(name) => resolve_srv(resolver, name).await,
            Target::Host(name) => resolve_ips(resolver, name, port).await,
            Target::Ip(ip) => Ok(Resolution {
                addrs: BTreeSet::from([SocketAddr::new(*ip, port)]),
                ttl: Some(MAX_REFRESH),
            }),
        };
        let wait = match result {
            Ok(resolution) => {
                failures = 0;
                let empty = resolution.addrs.is_empty();
                if empty && !was_empty {
                    warn!("DNS returned no records; publishing an empty endpoint set");
                }
                was_empty = empty;
                apply(tx, &resolution)
            }
            Err(error) => {
                let retry_in = BACKOFF.delay(failures);
                failures = failures.saturating_add(1);
                warn!(%error, ?retry_in, "DNS resolution failed; keeping the last endpoint set");
                retry_in
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Publishes the resolution if it differs and returns when to resolve again.
fn apply(tx: &watch::Sender<EndpointSet>, resolution: &Resolution) -> Duration {
    let (count, refresh) = (resolution.addrs.len(), refresh_interval(resolution.ttl));
    debug!(count, ttl = ?resolution.ttl, ?refresh, "DNS resolved");
    let endpoints = resolution.addrs.iter().map(|&a| Endpoint::new(a)).collect();
    if publish(tx, endpoints) {
        info!(count, endpoints = ?resolution.addrs, "DNS endpoint set changed");
    }
    refresh
}

/// Replaces the published set only when it differs, so receivers wake on real changes only.
fn publish(tx: &watch::Sender<EndpointSet>, endpoints: Vec<Endpoint>) -> bool {
    tx.send_if_modified(|current| {
        if current.as_slice() == endpoints.as_slice() {
            false
        } else {
            *current = Arc::new(endpoints);
            true
        }
    })
}

fn refresh_interval(ttl: Option<Duration>) -> Duration {
    ttl.unwrap_or(NO_TTL_REFRESH)
        .clamp(MIN_REFRESH, MAX_REFRESH)
}

fn min_ttl(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The answers of one query of `record_type`; "no such name" and "no records of that type" are
/// an empty answer (with the negative TTL when the server sent an SOA), anything else an error.
async fn query(
    resolver: &Resolver,
    name: &Name,
    record_type: RecordType,
) -> Result<(Vec<RData>, Option<Duration>), DnsError> {
    match resolver.lookup(name.clone(), record_type).await {
        Ok(lookup) => {
            let ttl = lookup
                .valid_until()
                .saturating_duration_since(Instant::now());
            let data = lookup
                .answers()
                .iter()
                .filter(|record| record.data.record_type() == record_type)
                .map(|record| record.data.clone())
                .collect();
            Ok((data, Some(ttl)))
        }
        Err(NetError::Dns(WireError::NoRecordsFound(NoRecords { negative_ttl, .. }))) => Ok((
            Vec::new(),
            negative_ttl.map(|s| Duration::from_secs(u64::from(s))),
        )),
        Err(source) => Err(DnsError::Lookup {
            name: name.to_ascii(),
            record_type,
            source,
        }),
    }
}

/// A and AAAA of `name`; both must answer, so a timeout on one family cannot drop its endpoints.
async fn resolve_ips(resolver: &Resolver, name: &Name, port: u16) -> Result<Resolution, DnsError> {
    let (v4, v6) = tokio::join!(
        query(resolver, name, RecordType::A),
        query(resolver, name, RecordType::AAAA)
    );
    let ((v4, v4_ttl), (v6, v6_ttl)) = (v4?, v6?);
    Ok(Resolution {
        addrs: v4
            .iter()
            .chain(&v6)
            .filter_map(RData::ip_addr)
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
        ttl: min_ttl(v4_ttl, v6_ttl),
    })
}

async fn resolve_srv(resolver: &Resolver, name: &Name) -> Result<Resolution, DnsError> {
    let (records, srv_ttl) = query(resolver, name, RecordType::SRV).await?;
    let srvs: Vec<_> = records
        .into_iter()
        .filter_map(|data| match data {
            // A "." target means the service is decidedly not available there.
            RData::SRV(srv) if !srv.target.is_root() => Some(srv),
            _ => None,
        })
        .collect();
    let targets = join_all(
        srvs.iter()
            .map(|srv| resolve_ips(resolver, &srv.target, srv.port)),
    )
    .await;
    let mut ttl = srv_ttl;
    let mut by_priority = Vec::with_capacity(srvs.len());
    for (srv, target) in srvs.iter().zip(targets) {
        // A failing target fails the whole resolution: the last good set beats a partial one.
        let target = target?;
        ttl = min_ttl(ttl, target.ttl);
        by_priority.push((srv.priority, target));
    }
    Ok(Resolution {
        addrs: pick_srv(by_priority),
        ttl,
    })
}

/// The addresses of the lowest SRV priority that has any; higher priorities are fallbacks.
fn pick_srv(mut targets: Vec<(u16, Resolution)>) -> BTreeSet<SocketAddr> {
    targets.sort_by_key(|(priority, _)| *priority);
    let chosen = targets
        .iter()
        .find(|(_, t)| !t.addrs.is_empty())
        .map(|(p, _)| *p);
    targets
        .into_iter()
        .filter(|(priority, _)| Some(*priority) == chosen)
        .flat_map(|(_, target)| target.addrs)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refresh_interval_is_clamped() {
        let secs = Duration::from_secs;
        assert_eq!(refresh_interval(Some(Duration::ZERO)), secs(1));
        assert_eq!(refresh_interval(Some(Duration::from_millis(999))), secs(1));
        assert_eq!(refresh_interval(Some(secs(42))), secs(42));
        assert_eq!(refresh_interval(Some(secs(86_400))), secs(300));
        assert_eq!(refresh_interval(None), NO_TTL_REFRESH);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let delays: Vec<u64> = [0, 1, 2, 3, 4, 5, 6, u32::MAX]
            .map(|failures| BACKOFF.delay(failures).as_secs())
            .into();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn shortest_ttl_ignores_missing() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(min_ttl(secs(5), secs(3)), secs(3));
        assert_eq!(min_ttl(None, secs(3)), secs(3));
        assert_eq!(min_ttl(None, None), None);
    }

    #[test]
    fn srv_prefers_lowest_priority_with_addresses() {
        let target = |addrs: &[&str]| Resolution {
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ttl: None,
        };
        let picked = pick_srv(vec![
            (20, target(&["10.0.0.3:1"])),
            (10, target(&[])),
            (30, target(&["10.0.0.5:1"])),
            (20, target(&["10.0.0.4:2"])),
        ]);
        assert_eq!(picked, target(&["10.0.0.3:1", "10.0.0.4:2"]).addrs);
        assert!(pick_srv(vec![(10, target(&[]))]).is_empty());
    }

    #[test]
    fn targets() {
        let name = |s| Name::from_ascii(s).unwrap();
        let ip = Target::Ip("10.1.2.3".parse().unwrap());
        let host = Target::Host(name("pay.mesh.test."));
        let srv = Target::Srv(name("_grpc._tcp.pay.mesh.test."));
        // One underscored label alone is just an unusual host name.
        let odd = Target::Host(name("_pay.mesh.test."));
        for (input, want) in [
            ("10.1.2.3", ip),
            ("pay.mesh.test", host),
            ("_grpc._tcp.pay.mesh.test", srv),
            ("_pay.mesh.test.", odd),
        ] {
            assert_eq!(Target::parse(input).unwrap(), want, "{input}");
        }
        assert_eq!(
            Target::parse("pay.mesh.test.").unwrap(),
            Target::parse("pay.mesh.test").unwrap()
        );
        assert!(Target::parse("bad..name").is_err());
    }

    #[test]
    fn publish_notifies_only_on_change() {
        let (tx, mut rx) = watch::channel(EndpointSet::default());
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert!(!publish(&tx, Vec::new()));
        assert!(publish(&tx, vec![Endpoint::new(addr)]));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!publish(&tx, vec![Endpoint::new(addr)]));
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn ip_literal_is_published_and_task_ends_with_receivers() {
        let resolver = resolver(&Nameserver::Addr("127.0.0.1:9".parse().unwrap())).unwrap();
        let (tx, mut rx) = watch::channel(EndpointSet::default());
        let task = spawn_watch(resolver, "pay".into(), "10.1.2.3".into(), 8080, tx);
        rx.changed().await.unwrap();
        let addr: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(*rx.borrow(), Arc::new(vec![Endpoint::new(addr)]));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
