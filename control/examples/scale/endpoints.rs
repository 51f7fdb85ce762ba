//! `--scenario endpoint-change`: tern-control holding a large mesh (by
//! default 10,000 services of 3 static endpoints each) and many simulated
//! sidecars that each use a few services (by default 1,000 using 10: nine of
//! their own group's and `svc-0`, which all of them use). Each round
//! registers one new endpoint of a service (a sidecar subscribing as that
//! service, as a new pod does) and times it until every watcher of the
//! service has ACKed a snapshot carrying it; rounds alternate between
//! `svc-0` (watched by every sidecar) and a group service (watched by ten).
//! Also reports the bytes pushed per change and the control plane's RSS.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use prost::Message as _;
use tokio::sync::{mpsc, Semaphore};

use super::support::{hello, ControlPlane, Sidecar};
use super::{mib, rss_kib, summary, Args};

/// (sidecar index, endpoint addresses in the snapshot, its encoded size, when it was ACKed)
type Seen = (usize, Vec<String>, usize, Instant);

/// Sidecars per group: they share nine services.
const GROUP: usize = 10;

pub async fn run(args: &Args, bin: &std::path::Path) -> anyhow::Result<()> {
    let (n, services, per) = (
        args.subscribers,
        args.mesh_services.max(GROUP * 10),
        args.endpoints,
    );
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("mesh");
    std::fs::create_dir(&config)?;
    std::fs::write(config.join("services.yaml"), mesh_yaml(services, per))?;
    let mut flags = vec!["--log", "warn", "--registration-grace", "1h"];
    let threads = args.worker_threads.map(|n| n.to_string());
    if let Some(t) = &threads {
        flags.extend(["--worker-threads", t]);
    }
    let cp = ControlPlane::start(bin, &config, tmp.path(), &flags).await?;
    let pid = cp.pid();
    let rss_empty = rss_kib(pid)?;
    let incremental = !args.complete;
    println!(
        "endpoint change: {services} services × {per} endpoints, {n} sidecars using {} services each ({} snapshots), {} cores",
        args.calls,
        if incremental { "incremental" } else { "complete" },
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1)
    );

    let started = Instant::now();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let connecting = Arc::new(Semaphore::new(64));
    let mut first_sizes = Vec::with_capacity(n);
    for i in 0..n {
        let mut h = hello(&format!("caller-{i}"), "", "v1", &[]);
        h.calls = calls(i, args.calls, services);
        h.incremental = incremental;
        let (grpc, tx, connecting) = (cp.grpc, seen_tx.clone(), Arc::clone(&connecting));
        tokio::spawn(async move {
            let permit = connecting.acquire_owned().await;
            let mut sidecar = match Sidecar::connect(grpc, h).await {
                Ok(s) => s,
                Err(e) => return eprintln!("sidecar {i}: {e:#}"),
            };
            drop(permit);
            while let Ok(snap) = sidecar.next(Duration::from_secs(3600)).await {
                if sidecar.ack(snap.version).await.is_err() {
                    break;
                }
                let addrs = snap
                    .services
                    .iter()
                    .flat_map(|s| s.endpoints.iter().map(|e| e.address.clone()))
                    .collect();
                let _ = tx.send((i, addrs, snap.encoded_len(), Instant::now()));
            }
        });
    }
    drop(seen_tx);
    let mut connected = HashSet::new();
    while connected.len() < n {
        let (i, _, size, _) = tokio::time::timeout(Duration::from_secs(300), seen.recv())
            .await
            .map_err(|_| anyhow!("only {} of {n} sidecars got a snapshot", connected.len()))?
            .ok_or_else(|| anyhow!("every sidecar task ended"))?;
        if connected.insert(i) {
            first_sizes.push(size);
        }
    }
    let setup = started.elapsed();
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), seen.recv()).await {}
    let rss_idle = rss_kib(pid)?;

    let (mut hot, mut cold, mut bytes_hot, mut bytes_cold) = (vec![], vec![], vec![], vec![]);
    let mut registered = Vec::new();
    for round in 0..args.rounds {
        // Even rounds: svc-0, which every sidecar uses; odd ones: a group's service.
        let target = match round % 2 {
            0 => 0,
            _ => group_service(round / 2 % (n / GROUP).max(1), 1, services),
        };
        let watchers: Vec<usize> = (0..n)
            .filter(|i| calls_index(*i, args.calls, services).contains(&target))
            .collect();
        // A registered address must be the stream's own IP.
        let address = format!("127.0.0.1:{}", 10_000 + round);
        let pushed_before = cp.metric("tern_control_push_bytes_total").await?;
        let changed = Instant::now();
        let registering = Sidecar::connect(
            cp.grpc,
            hello(&format!("svc-{target}"), &address, "v1", &[]),
        )
        .await
        .with_context(|| format!("registering {address}"))?;
        registered.push(registering);
        let mut waiting: HashSet<usize> = watchers.iter().copied().collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !waiting.is_empty() {
            let (i, addrs, _, at) = tokio::time::timeout_at(deadline, seen.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "round {round}: {} watchers never ACKed {address}",
                        waiting.len()
                    )
                })?
                .ok_or_else(|| anyhow!("every sidecar task ended"))?;
            if addrs.contains(&address) && waiting.remove(&i) {
                let took = at.saturating_duration_since(changed);
                match target {
                    0 => hot.push(took),
                    _ => cold.push(took),
                }
            }
        }
        // Nothing else is pushed for this change after its watchers ACKed it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let bytes = cp.metric("tern_control_push_bytes_total").await? - pushed_before;
        let per_watcher = bytes / watchers.len().max(1) as f64;
        match target {
            0 => bytes_hot.push(per_watcher),
            _ => bytes_cold.push(per_watcher),
        }
    }
    let rss_after = rss_kib(pid)?;
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    first_sizes.sort_unstable();
    println!(
        "setup: {n} sidecars subscribed and served in {:.2} s",
        setup.as_secs_f64()
    );
    println!(
        "registration → every watcher ACKed, svc-0 ({n} watchers):      {}",
        summary(&mut hot)
    );
    println!(
        "registration → every watcher ACKed, a group's service ({GROUP}): {}",
        summary(&mut cold)
    );
    println!(
        "bytes pushed per watcher per change: {:.0} (svc-0), {:.0} (group service); a complete snapshot of a sidecar: {} bytes (median)",
        avg(&bytes_hot),
        avg(&bytes_cold),
        first_sizes.get(first_sizes.len() / 2).copied().unwrap_or(0)
    );
    println!(
        "control-plane RSS: {:.1} MiB with the mesh loaded, {:.1} MiB with {n} sidecars, {:.1} MiB after the rounds",
        mib(rss_empty),
        mib(rss_idle),
        mib(rss_after)
    );
    drop(registered);
    Ok(())
}

/// The services sidecar `i` uses: `svc-0` and nine of its group's.
fn calls(i: usize, count: usize, services: usize) -> Vec<String> {
    calls_index(i, count, services)
        .into_iter()
        .map(|s| format!("svc-{s}"))
        .collect()
}

fn calls_index(i: usize, count: usize, services: usize) -> Vec<usize> {
    let group = i / GROUP;
    std::iter::once(0)
        .chain((1..count.max(1)).map(|k| group_service(group, k, services)))
        .collect()
}

fn group_service(group: usize, k: usize, services: usize) -> usize {
    1 + (group * GROUP + k) % (services - 1)
}

/// `services` Services with `per` static endpoints each (10.x.y.z:8080).
pub fn mesh_yaml(services: usize, per: usize) -> String {
    let mut out = String::with_capacity(services * 400);
    for i in 0..services {
        out.push_str(&format!(
            "---\napiVersion: tern.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{ports: [{{name: http, port: 8080}}], virtualIP: 10.{}.{}.{}}}\n",
            100 + i / 65536,
            i / 256 % 256,
            i % 256
        ));
        let endpoints: Vec<String> = (0..per)
            .map(|e| {
                format!(
                    "{{address: \"10.{}.{}.{}:8080\"}}",
                    1 + e,
                    i / 256 % 256,
                    i % 256
                )
            })
            .collect();
        out.push_str(&format!(
            "---\napiVersion: tern.dev/v1alpha1\nkind: Endpoints\nmetadata: {{name: svc-{i}}}\nspec: {{service: svc-{i}, endpoints: [{}]}}\n",
            endpoints.join(", ")
        ));
    }
    out
}
