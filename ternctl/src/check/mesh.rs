//! The checks that read the running mesh: tern-control, its CA, and every
//! sidecar it knows.

use std::time::{Duration, SystemTime};

use super::{approx, Limits, Outcome};
use crate::admin_client;
use crate::mesh_state::{self, CaCert, MeshState, Sidecar};
use crate::scrape::{self, Cert};

const FORWARD: &str = "start tern-control, or point --control at its admin listener (in a \
     cluster: kubectl -n tern port-forward deploy/tern-control 9990)";

pub async fn check(control: &str, limits: &Limits) -> Vec<Outcome> {
    let mut out = Vec::new();
    let name = "tern-control";
    match admin_client::get(control, "/ready").await {
        Err(e) => {
            out.push(Outcome::fail(
                name,
                format!("not reachable: {e:#}"),
                FORWARD,
            ));
            return out;
        }
        Ok(r) if !r.ok() => out.push(Outcome::fail(
            name,
            format!("reachable at {control} but not ready ({})", r.body.trim()),
            "see its log: it is ready once it has read its config (directory or Kubernetes API)",
        )),
        Ok(_) => out.push(Outcome::pass(
            name,
            format!("reachable at {control} and ready"),
        )),
    }
    let state = match mesh_state::fetch(control).await {
        Ok(s) => s,
        Err(e) => {
            out.push(Outcome::fail(
                "tern-control /state",
                format!("{e:#}"),
                "/state answers loopback peers only: port-forward to tern-control's admin port, \
                 or start it with --admin-expose-state",
            ));
            return out;
        }
    };
    out.push(config(&state));
    out.extend(ca(&state, limits.ca_min_validity));
    if state.sidecars.is_empty() {
        out.push(Outcome::pass("sidecars", "none connected to tern-control"));
    }
    // Concurrently: a hung sidecar costs one timeout, not one each.
    let mut probes = tokio::task::JoinSet::new();
    for (i, s) in state.sidecars.iter().cloned().enumerate() {
        let cert_min = limits.cert_min_validity;
        probes.spawn(async move { (i, self::sidecar(&s, cert_min).await) });
    }
    let mut sidecars = Vec::new();
    while let Some(done) = probes.join_next().await {
        if let Ok(one) = done {
            sidecars.push(one);
        }
    }
    sidecars.sort_by_key(|(i, _)| *i);
    out.extend(sidecars.into_iter().flat_map(|(_, o)| o));
    for o in &state.orphans {
        out.push(Outcome::fail(
            format!("endpoint {}.{} {}", o.service, o.namespace, o.address),
            "its sidecar's stream to tern-control ended; callers drop it when the \
             registration grace is over",
            "see why the workload's sidecar stopped (crash, OOM, eviction) in its log",
        ));
    }
    out
}

fn config(state: &MeshState) -> Outcome {
    match &state.last_config_error {
        Some(errors) => Outcome::fail(
            "mesh config",
            format!(
                "the last change was rejected, version {} stays in force: {}",
                state.config_version,
                errors.join("; ")
            ),
            "fix the files named above (`tern-control --check --config-dir DIR` says what is \
             wrong without starting)",
        ),
        None => Outcome::pass(
            "mesh config",
            format!("version {} in force", state.config_version),
        ),
    }
}

fn ca(state: &MeshState, min: Duration) -> Vec<Outcome> {
    let (Some(anchor), Some(issuer)) = (&state.anchor, &state.issuer) else {
        return vec![Outcome::pass(
            "CA",
            "tern-control runs without a CA (no workload identities)",
        )];
    };
    let now = SystemTime::now();
    let one = |what: &str, c: &CaCert, fix: &str| {
        let check = format!("CA {what}");
        let Some(not_after) = c.not_after else {
            return Outcome::fail(check, "/state gives no expiry", fix);
        };
        if c.not_before.is_some_and(|nb| nb > now) {
            return Outcome::fail(check, format!("{} is not valid yet", c.subject), fix);
        }
        match not_after.duration_since(now) {
            Ok(left) if left >= min => {
                Outcome::pass(check, format!("{} valid for {}", c.subject, approx(left)))
            }
            Ok(left) => Outcome::fail(
                check,
                format!(
                    "{} expires in {} (less than {})",
                    c.subject,
                    approx(left),
                    approx(min)
                ),
                fix,
            ),
            Err(_) => Outcome::fail(check, format!("{} has expired", c.subject), fix),
        }
    };
    vec![
        one(
            "trust anchor",
            anchor,
            "rotate the trust anchor: add the new root beside the old one in every trust bundle \
             first, then switch tern-control to an issuer signed by it (docs/SECURITY.md)",
        ),
        one(
            "issuer",
            issuer,
            "issue a new issuer certificate from the trust anchor and restart tern-control with \
             it (--ca-issuer-cert, --ca-issuer-key)",
        ),
    ]
}

/// One ✔ line when all is well, else one ✖ line per problem.
async fn sidecar(s: &Sidecar, cert_min: Duration) -> Vec<Outcome> {
    let name = format!("sidecar {}", s.name());
    let mut problems = Vec::new();
    let mut facts = vec![format!(
        "connected, config version {} acknowledged",
        s.acked_version
    )];
    match &s.last_nack {
        Some((version, reason)) if *version > s.acked_version => problems.push(Outcome::fail(
            format!("{name}: config"),
            format!(
                "rejected (NACK) config version {version}: {reason}; it keeps version {}",
                s.acked_version
            ),
            "tern-control accepted a config this sidecar cannot apply: fix the policy the \
             reason names",
        )),
        _ if s.acked_version < s.sent_version => problems.push(Outcome::fail(
            format!("{name}: config"),
            format!(
                "acknowledged version {} of version {} sent",
                s.acked_version, s.sent_version
            ),
            "a sidecar that does not acknowledge is hung or overloaded: check its log and \
             /ready, restart its pod",
        )),
        _ => {}
    }
    match &s.admin {
        None => facts.push("admin address not told (certificate not checked)".into()),
        Some(admin) => match probe(admin, s.identity.is_some(), cert_min).await {
            Ok(fact) => facts.push(fact),
            Err(p) => problems.push(Outcome {
                check: format!("{name}: {}", p.check),
                ..p
            }),
        },
    }
    if problems.is_empty() {
        return vec![Outcome::pass(name, facts.join(", "))];
    }
    problems
}

/// The sidecar's admin listener: answering, ready, and its certificate.
async fn probe(admin: &str, has_identity: bool, cert_min: Duration) -> Result<String, Outcome> {
    let ready = admin_client::get(admin, "/ready").await.map_err(|e| {
        Outcome::fail(
            "admin",
            format!("not answering at {admin}: {e:#}"),
            "the sidecar is stopped or hung while its stream to tern-control stays open: \
             look at its process and log, restart its pod",
        )
    })?;
    if !ready.ok() {
        return Err(Outcome::fail(
            "ready",
            format!("/ready answers {}: {}", ready.status, ready.body.trim()),
            "see the sidecar's log: it is ready once it has its certificate and first config",
        ));
    }
    if !has_identity {
        return Ok("ready, no workload identity (plaintext)".into());
    }
    let metrics = scrape::metrics(admin).await.map_err(|e| {
        Outcome::fail(
            "metrics",
            format!("{e:#}"),
            "the sidecar's admin listener must serve /metrics",
        )
    })?;
    let renew = "the sidecar renews at about 70% of the lifetime: look for renewal errors in \
                 its log and in tern-control's; tern-control --cert-lifetime sets the lifetime";
    let Some(cert) = Cert::of(&metrics) else {
        return Err(Outcome::fail("certificate", "none in use", renew));
    };
    let now = SystemTime::now();
    if cert.near_expiry(now, cert_min) {
        return Err(Outcome::fail(
            "certificate",
            format!(
                "expires in {} (at {}), near expiry",
                approx(cert.left(now)),
                humantime::format_rfc3339_seconds(cert.expires)
            ),
            renew,
        ));
    }
    Ok(format!(
        "ready, certificate valid for {}",
        approx(cert.left(now))
    ))
}
