//! The sidecar's admin port listens on the pod's address for probes and scraping. What maps the
//! mesh (`/config`: services, endpoints, identities, policies) answers only the pod's own
//! loopback unless `--admin-expose-config` says otherwise; `/metrics`, `/ready` and `/live` stay
//! open to the network.

use std::time::Duration;

use tern_tests::{eventually, http1, netns, Must, Proc, TestDir};

const REFUSED: &str = r#"tern_protocol_rejections_total{listener="admin",reason="not_loopback"}"#;

/// Starts a sidecar for service `name` in `pod`, its admin port on the pod IP; waits for `/ready`.
async fn sidecar(
    pod: &netns::Pod,
    dir: &TestDir,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    let mut args: Vec<String> = [
        "--service-name",
        name,
        "--admin-listen",
        "0.0.0.0:4191",
        "--outbound-listen",
        "127.0.0.1:4140",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let proc = pod.spawn(dir.path(), name, "tern-proxy", &args, false)?;
    let admin = pod.addr(4191);
    eventually(Duration::from_secs(10), || async {
        let r = http1::get(admin, "/ready").await?;
        Ok((r.status != 200).then(|| format!("/ready {}", r.status)))
    })
    .await?;
    Ok(proc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_answers_loopback_unless_exposed() {
    if let Some(what) = netns::missing_prerequisite() {
        return tern_tests::missing(&what).must();
    }
    let dir = TestDir::new("admin-access").must();
    let mut net = netns::Network::create().must();
    let closed = net.pod("closed").must();
    let open = net.pod("open").must();
    let _closed_proxy = sidecar(&closed, &dir, "closed", &[]).await.must();
    let _open_proxy = sidecar(&open, &dir, "open", &["--admin-expose-config"])
        .await
        .must();

    // From the root namespace (the gateway's address): refused, counted; probes still answer.
    let refused = http1::get(closed.addr(4191), "/config").await.must();
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(!refused.text().contains("closed"), "{}", refused.text());
    for path in ["/ready", "/live", "/metrics"] {
        let rsp = http1::get(closed.addr(4191), path).await.must();
        assert_eq!(rsp.status, 200, "{path}: {}", rsp.text());
    }
    let metrics = http1::get(closed.addr(4191), "/metrics")
        .await
        .must()
        .text();
    assert!(metrics.contains(&format!("{REFUSED} 1")), "{metrics}");

    // From inside the pod, on loopback (where `kubectl port-forward` arrives): the config.
    let local = closed.local_config().await.must();
    let view: serde_json::Value = serde_json::from_str(&local)
        .map_err(anyhow::Error::from)
        .must();
    assert_eq!(view["config"]["service_name"], "closed", "{local}");

    // The opt-in flag opens /config to the network, and nothing else: /shutdown stays closed.
    let exposed = http1::get(open.addr(4191), "/config").await.must();
    assert_eq!(exposed.status, 200, "{}", exposed.text());
    let view: serde_json::Value = serde_json::from_str(&exposed.text())
        .map_err(anyhow::Error::from)
        .must();
    assert_eq!(view["config"]["service_name"], "open", "{}", exposed.text());
    let mut conn = http1::Conn::connect(open.addr(4191)).await.must();
    let shutdown = conn.request("POST", "/shutdown", &[], None).await.must();
    assert_eq!(shutdown.status, 403);
}

/// `curl` of `path` on the sidecar's admin port from the pod's own loopback, for at most `secs`
/// seconds: (HTTP status, body). A stream cut off by the time limit still gives both.
fn curl_in_pod(pod: &netns::Pod, path: &str, secs: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:4191{path}");
    let out = pod
        .exec(
            "curl",
            &["-sS", "--max-time", secs, "-w", "\n%{http_code}", &url],
        )
        .must();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// `/tap` shows who calls what: on an admin port that listens on the pod's address it is off
/// unless `--admin-tap`, and says so; when on, it still answers the pod's loopback only, like
/// `/explain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_is_off_on_a_pod_address_unless_enabled_and_answers_loopback_only() {
    if let Some(what) = netns::missing_prerequisite() {
        return tern_tests::missing(&what).must();
    }
    let dir = TestDir::new("admin-tap").must();
    let mut net = netns::Network::create().must();
    let off = net.pod("tap-off").must();
    let on = net.pod("tap-on").must();
    let _off_proxy = sidecar(&off, &dir, "tap-off", &[]).await.must();
    let _on_proxy = sidecar(&on, &dir, "tap-on", &["--admin-tap"]).await.must();

    let (status, body) = curl_in_pod(&off, "/tap", "5");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("--admin-tap"),
        "the refusal names the flag: {body}"
    );

    for path in ["/tap", "/explain?authority=pay"] {
        let remote = http1::get(on.addr(4191), path).await.must();
        assert_eq!(remote.status, 403, "{path}: {}", remote.text());
    }
    let (status, body) = curl_in_pod(&on, "/tap", "1");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.lines().next(), Some(r#"{"tapping":true}"#), "{body}");
    let (status, body) = curl_in_pod(&on, "/explain?authority=pay", "5");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("no service is known"), "{body}");
}
