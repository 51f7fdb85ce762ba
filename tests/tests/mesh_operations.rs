//! The operator's commands against a running `ternctl demo`: `ternctl check` passes on the
//! healthy mesh and fails naming the cause for a rejected (NACKed) config, a stopped sidecar
//! and certificates near expiry; `ternctl stat` agrees with the load generator's own counts;
//! the dashboard, loaded in headless Chromium, shows pay's success rate and both pay replicas.
//!
//! Each test runs a whole demo (tern-control, three sidecars, three apps, loadgen), so they
//! run one at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tern_tests::process::binary;
use tern_tests::{eventually, in_ci, missing, Must, Proc, TestDir};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// A running `ternctl demo` and the addresses it printed.
struct Demo {
    proc: Proc,
    /// tern-control's admin listener.
    control: String,
    dashboard: String,
    /// The directory of mesh config tern-control watches.
    mesh_dir: PathBuf,
    dir: TestDir,
}

impl Demo {
    async fn start(label: &str, extra: &[&str]) -> Result<Self> {
        let dir = TestDir::new(label)?;
        let logs = dir.path().join("logs");
        let mut args: Vec<String> = ["demo", "--rate", "50", "--log-dir"]
            .iter()
            .map(ToString::to_string)
            .collect();
        args.push(logs.display().to_string());
        args.extend(extra.iter().map(ToString::to_string));
        // Without CARGO in its environment ternctl runs the binaries beside it instead of building.
        let program = binary("ternctl")?;
        let mut proc =
            Proc::spawn_with_env_removed(dir.path(), "ternctl", &program, &args, &[], &["CARGO"])?;
        let line = proc
            .wait_for_line("  dashboard", Duration::from_secs(60))
            .await?;
        // "http://127.0.0.1:PORT/   (ternctl check / stat --control 127.0.0.1:PORT)"
        let dashboard = line
            .split_whitespace()
            .next()
            .context("no dashboard address")?
            .trim_end_matches('/')
            .to_string();
        let control = line
            .rsplit("--control ")
            .next()
            .context("no control address")?
            .trim_end_matches(')')
            .to_string();
        // Traffic flows once loadgen reports.
        proc.wait_for_line("t=", Duration::from_secs(30)).await?;
        Ok(Self {
            proc,
            control,
            dashboard,
            mesh_dir: logs.join("mesh"),
            dir,
        })
    }

    /// The admin address the demo printed for a sidecar, e.g. `pay-2-proxy`.
    fn sidecar_admin(&self, name: &str) -> Result<String> {
        let prefix = format!("  {name}");
        let line = self
            .proc
            .stdout()
            .lines()
            .find(|l| l.starts_with(&prefix) && l.contains("metrics: http://"))
            .map(str::to_string)
            .with_context(|| format!("the demo printed no admin address for {name}"))?;
        let rest = line.split("metrics: http://").nth(1).unwrap_or_default();
        Ok(rest.split('/').next().unwrap_or_default().to_string())
    }

    /// A sidecar process of the demo, found by the access log named in its arguments.
    fn sidecar_pid(&self, name: &str) -> Result<Pid> {
        let needle = format!("{name}.access.log");
        let parent = self.proc.pid();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the second field after the command name in parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(&needle) {
                return Ok(Pid::from_raw(pid));
            }
        }
        bail!("no process of the demo runs {name}")
    }
}

/// `ternctl ARGS`: its exit code and stdout.
async fn ternctl(args: &[&str]) -> Result<(i32, String)> {
    let out = tokio::process::Command::new(binary("ternctl")?)
        .args(args)
        .env_remove("CARGO")
        .output()
        .await
        .context("running ternctl")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// `ternctl check --output json` and more flags: its exit code and document.
async fn check(demo: &Demo, more: &[&str]) -> Result<(i32, Value)> {
    let mut args = vec!["check", "--control", &demo.control, "--output", "json"];
    args.extend_from_slice(more);
    let (code, out) = ternctl(&args).await?;
    let doc = serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))?;
    Ok((code, doc))
}

fn failures(doc: &Value) -> Vec<&Value> {
    doc["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["ok"] == false)
        .collect()
}

/// Resumes a stopped process however the test ends.
struct Resume(Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_mesh_and_names_a_nack_and_a_stopped_sidecar() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start("check", &[]).await.must();

    // Healthy: every check passes, one line per sidecar among them.
    let (code, doc) = check(&demo, &[]).await.must();
    assert_eq!(code, 0, "{doc:#}\n{}", demo.proc.diagnostics());
    assert_eq!(doc["ok"], true, "{doc:#}");
    let sidecars = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"].as_str().unwrap_or("").starts_with("sidecar "))
        .count();
    assert_eq!(sidecars, 3, "{doc:#}");
    let (code, text) = ternctl(&["check", "--control", &demo.control]).await.must();
    assert_eq!(code, 0, "{text}");
    assert!(text.lines().all(|l| !l.starts_with('✖')), "{text}");
    assert!(text.contains("✔ tern-control: reachable"), "{text}");

    // A policy tern-control accepts but order's sidecar rejects: a backoff base above the
    // sidecar's default backoff maximum.
    let policy_file = demo.mesh_dir.join("pay-traffic.yaml");
    let good = std::fs::read_to_string(&policy_file).unwrap();
    let bad = good.replace(
        "    budget: {percent: 20, minPerSecond: 10}\n",
        "    budget: {percent: 20, minPerSecond: 10}\n    backoff: {base: 30s}\n",
    );
    assert_ne!(good, bad);
    write_atomically(&policy_file, &bad);
    let nacked = |doc: &Value| {
        failures(doc).into_iter().any(|c| {
            let detail = c["detail"].as_str().unwrap_or("");
            c["check"]
                .as_str()
                .unwrap_or("")
                .starts_with("sidecar order.default")
                && detail.contains("NACK")
                && detail.contains("backoff_max is smaller than backoff_base")
        })
    };
    eventually(Duration::from_secs(15), || async {
        let (code, doc) = check(&demo, &[]).await?;
        Ok((code != 1 || !nacked(&doc)).then(|| doc.to_string()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", demo.proc.diagnostics()));
    let (code, doc) = check(&demo, &[]).await.must();
    assert!(code == 1 && nacked(&doc), "{doc:#}");
    assert!(
        failures(&doc).iter().all(|c| c["fix"].is_string()),
        "{doc:#}"
    );
    // The dashboard lists it among the recent NACKs, with its reason.
    let overview = format!("{}/api/overview", demo.dashboard);
    eventually(Duration::from_secs(10), || async {
        let v = http_json(&overview).await?;
        let listed = v["nacks"].as_array().is_some_and(|n| {
            n.iter().any(|n| {
                n["sidecar"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("order.default")
                    && n["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("backoff_max is smaller than backoff_base")
            })
        });
        Ok((!listed).then(|| v["nacks"].to_string()))
    })
    .await
    .must();

    // The fixed policy is acknowledged, and the mesh is healthy again.
    write_atomically(&policy_file, &good);
    eventually(Duration::from_secs(15), || async {
        let (code, doc) = check(&demo, &[]).await?;
        Ok((code != 0).then(|| doc.to_string()))
    })
    .await
    .must();

    // pay-2's sidecar stops (SIGSTOP): its stream to tern-control stays open, but it answers
    // nothing. check names it by its admin address.
    let admin = demo.sidecar_admin("pay-2-proxy").must();
    let pid = demo.sidecar_pid("pay-2-proxy").must();
    kill(pid, Signal::SIGSTOP).unwrap();
    let resume = Resume(pid);
    let (code, doc) = check(&demo, &[]).await.must();
    drop(resume);
    assert_eq!(code, 1, "{doc:#}");
    let failed = failures(&doc);
    assert_eq!(failed.len(), 1, "{doc:#}");
    let check_name = failed[0]["check"].as_str().unwrap_or("");
    let detail = failed[0]["detail"].as_str().unwrap_or("");
    assert!(check_name.starts_with("sidecar pay.default"), "{doc:#}");
    assert!(
        detail.contains("not answering") && detail.contains(&admin),
        "{doc:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_certificates_near_expiry() {
    let _serial = SERIAL.lock().await;
    // Two-minute certificates: less than check's default minimum of ten minutes left.
    let demo = Demo::start("check-certs", &["--cert-lifetime", "2m"])
        .await
        .must();
    let (code, doc) = check(&demo, &[]).await.must();
    assert_eq!(code, 1, "{doc:#}");
    let failed = failures(&doc);
    assert_eq!(failed.len(), 3, "one per sidecar: {doc:#}");
    for f in failed {
        assert!(
            f["check"].as_str().unwrap_or("").ends_with(": certificate")
                && f["detail"].as_str().unwrap_or("").contains("near expiry"),
            "{doc:#}"
        );
    }
    // With a lower bar the same certificates pass: the failure was their expiry.
    let (code, doc) = check(&demo, &["--cert-min-validity", "30s"]).await.must();
    assert_eq!(code, 0, "{doc:#}");
    // The CA's own certificates are years from expiry; a bar above that fails them too.
    let (code, doc) = check(&demo, &["--ca-min-validity", "20years"]).await.must();
    assert_eq!(code, 1, "{doc:#}");
    let failed: Vec<String> = failures(&doc)
        .iter()
        .map(|c| c["check"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(failed.contains(&"CA trust anchor".to_string()), "{doc:#}");
    assert!(failed.contains(&"CA issuer".to_string()), "{doc:#}");
}

/// The `rate=` of each loadgen progress line the demo printed after the first `skip` lines.
fn loadgen_rates(stdout: &str, skip: usize) -> Vec<f64> {
    stdout
        .lines()
        .skip(skip)
        .filter(|l| l.starts_with("t="))
        .filter_map(|l| {
            let rest = l.split("rate=").nth(1)?;
            rest.trim_start().split('/').next()?.trim().parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_agrees_with_the_load_generator() {
    let _serial = SERIAL.lock().await;
    let demo = Demo::start("stat", &[]).await.must();
    // Let the first second's ramp pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = demo.proc.stdout().lines().count();
    let (code, out) = ternctl(&[
        "stat",
        "--control",
        &demo.control,
        "--window",
        "10s",
        "--output",
        "json",
    ])
    .await
    .must();
    assert_eq!(code, 0, "{out}");
    // Loadgen prints the calls completed each second: its rate over the same seconds.
    let rates = loadgen_rates(&demo.proc.stdout(), before);
    assert!(rates.len() >= 8, "{rates:?}\n{}", demo.proc.stdout());
    let loadgen = rates.iter().sum::<f64>() / rates.len() as f64;
    let doc: Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!(
        "loadgen {loadgen:.2}/s over {} seconds; ternctl stat: {doc}",
        rates.len()
    );
    let row = |service: &str, route: Option<&str>| -> Value {
        doc["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == service && r["route"].as_str() == route)
            .cloned()
            .unwrap_or_else(|| panic!("no row for {service} {route:?}: {doc:#}"))
    };
    let within = |what: &str, stat: f64, own: f64| {
        assert!(
            (stat - own).abs() <= own * 0.05,
            "{what}: stat says {stat:.2}, loadgen {own:.2}\n{doc:#}"
        );
    };
    // Every loadgen call is one order call, which makes one pay call.
    let order = row("order", None);
    within("order requests/s", order["rps"].as_f64().unwrap(), loadgen);
    within(
        "order CreateOrder requests/s",
        row("order", Some("tern.demo.v1.OrderService/CreateOrder"))["rps"]
            .as_f64()
            .unwrap(),
        loadgen,
    );
    let pay = row("pay", None);
    within("pay requests/s", pay["rps"].as_f64().unwrap(), loadgen);
    // Loadgen saw no failure; neither did the sidecars.
    assert!(demo.proc.stdout().contains("success=100.00%"));
    assert_eq!(order["success"], 1.0, "{doc:#}");
    assert_eq!(pay["success"], 1.0, "{doc:#}");
    // loadgen calls order in plaintext (from outside the mesh); order calls pay over mTLS.
    assert_eq!(order["mtls"], 0.0, "{doc:#}");
    assert_eq!(pay["mtls"], 1.0, "{doc:#}");
    for q in ["p50_ms", "p95_ms", "p99_ms"] {
        assert!(pay[q].as_f64().unwrap_or(0.0) > 0.0, "{q}: {doc:#}");
    }
    assert!(pay["p50_ms"].as_f64() <= pay["p99_ms"].as_f64(), "{doc:#}");

    // The table is for people: one line per service and route.
    let (code, table) = ternctl(&["stat", "--control", &demo.control, "--window", "2s"])
        .await
        .must();
    assert_eq!(code, 0, "{table}");
    assert!(table.contains("tern.demo.v1.PayService/Pay"), "{table}");

    // --watch redraws in place (home, clear) once per window until stopped.
    let mut watch = tokio::process::Command::new(binary("ternctl").unwrap())
        .args([
            "stat",
            "--control",
            &demo.control,
            "--window",
            "1s",
            "--watch",
        ])
        .env_remove("CARGO")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    watch.start_kill().unwrap();
    let out = watch.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let frames = text.matches("\x1b[H\x1b[2J").count();
    assert!(frames >= 2, "{frames} frames: {text:?}");
    assert_eq!(text.matches("SERVICE").count(), frames, "{text:?}");
}

const CHROMIUM: &str = "/usr/bin/chromium";

async fn chromium(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(args)
        .output()
        .await
        .context("running chromium")?;
    anyhow::ensure!(
        out.status.success(),
        "chromium {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_pay_and_both_replicas_in_a_browser() {
    if !Path::new(CHROMIUM).is_file() {
        return missing("chromium (apt-get install chromium)").must();
    }
    let _serial = SERIAL.lock().await;
    let demo = Demo::start("dashboard", &[]).await.must();
    // Golden metrics need two samples: wait until the overview has pay's.
    let overview = format!("{}/api/overview", demo.dashboard);
    eventually(Duration::from_secs(20), || async {
        let v = http_json(&overview).await?;
        let has_pay = v["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["service"] == "pay"));
        Ok((!has_pay).then(|| v.to_string()))
    })
    .await
    .must();

    // The page's script fetches the overview and renders it; the virtual time budget lets it.
    let dom = chromium(&[
        "--virtual-time-budget=10000",
        "--dump-dom",
        &format!("{}/", demo.dashboard),
    ])
    .await
    .must();
    let pay_row = dom
        .split("<tr")
        .find(|r| r.contains("data-service=\"pay\"") && r.contains("<td>(all)</td>"))
        .unwrap_or_else(|| panic!("no pay row in the services table:\n{dom}"));
    assert!(
        pay_row.contains("class=\"num success good\">100.00%</td>"),
        "pay's success rate: {pay_row}"
    );
    // Both pay replicas, by the addresses tern-control lists for them.
    let state = http_json(&format!("http://{}/state", demo.control))
        .await
        .must();
    let replicas: Vec<String> = state["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == "pay")
        .filter_map(|s| s["address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(replicas.len(), 2, "{state:#}");
    let sidecars = dom
        .split("id=\"sidecars\"")
        .nth(1)
        .unwrap_or_default()
        .split("</table>")
        .next()
        .unwrap_or_default();
    for addr in &replicas {
        let row = sidecars
            .split("<tr")
            .find(|r| r.contains(&format!("<td class=\"address\">{addr}</td>")))
            .unwrap_or_else(|| panic!("pay replica {addr} missing:\n{sidecars}"));
        // Its certificate (a day from tern-control's CA) and its inbound traffic, all mTLS.
        assert!(row.contains("(in 23h "), "certificate expiry: {row}");
        assert!(row.contains(">100.00%</td>"), "inbound mTLS: {row}");
    }
    // A screenshot renders too (docs/dashboard.png is one).
    let shot = demo.dir.path().join("dashboard.png");
    chromium(&[
        "--hide-scrollbars",
        "--window-size=1400,760",
        "--virtual-time-budget=5000",
        &format!("--screenshot={}", shot.display()),
        &format!("{}/", demo.dashboard),
    ])
    .await
    .must();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG"),
        "not a PNG: {} bytes",
        png.len()
    );
    if !in_ci() {
        eprintln!("dashboard screenshot: {}", shot.display());
    }
}

/// GET a JSON document over plain HTTP/1.1 (the dashboard, tern-control's admin port).
async fn http_json(url: &str) -> Result<Value> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").context("not an http URL")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text)).await??;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).with_context(|| format!("{url}: {text}"))
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
