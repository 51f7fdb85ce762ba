// Fetches /api/overview and redraws the three tables; the server says how often.
"use strict";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const pct = (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(2) + "%");
const ms = (v) => (v === null || v === undefined ? "-" : v.toFixed(1) + " ms");

function num(text, cls) {
  return el("td", { class: "num " + (cls || "") }, text);
}

// A small line chart of p50 and p99 over the history kept.
function chart(history) {
  const w = 180, h = 36, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  const max = Math.max(1e-3, ...history.map((p) => p.p99_ms || 0));
  for (const key of ["p50_ms", "p99_ms"]) {
    const pts = history
      .map((p, i) => [i, p[key]])
      .filter(([, v]) => v !== null && v !== undefined)
      .map(([i, v]) => `${(i * w) / Math.max(1, history.length - 1)},${h - 2 - (v / max) * (h - 4)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("class", key.replace("_ms", ""));
    svg.append(line);
  }
  const title = document.createElementNS(ns, "title");
  title.textContent = `p99 up to ${max.toFixed(1)} ms`;
  svg.append(title);
  return svg;
}

function fill(id, rows, empty, columns) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
  if (rows.length === 0) body.append(el("tr", {}, el("td", { class: "empty", colspan: columns }, empty)));
}

function services(list) {
  const rows = [];
  for (const s of list) {
    const g = s.golden;
    const ok = g.success === null || g.success >= 0.99;
    const row = el("tr", { "data-service": s.service },
      el("td", {}, s.service), el("td", {}, "(all)"), num(g.rps.toFixed(1)),
      num(pct(g.success), "success " + (ok ? "good" : "bad")),
      num(ms(g.p50_ms)), num(ms(g.p95_ms)), num(ms(g.p99_ms)), num(pct(g.mtls)),
      el("td", {}, chart(s.history)));
    rows.push(row);
    for (const r of s.routes) {
      rows.push(el("tr", { class: "route", "data-service": s.service },
        el("td", {}, ""), el("td", {}, r.route), num(r.rps.toFixed(1)), num(pct(r.success)),
        num(ms(r.p50_ms)), num(ms(r.p95_ms)), num(ms(r.p99_ms)), num(pct(r.mtls)), el("td", {}, "")));
    }
  }
  fill("services", rows, "no inbound traffic in the window yet", 9);
}

function left(secs) {
  if (secs === null || secs === undefined) return "";
  if (secs >= 86400) return ` (in ${Math.floor(secs / 86400)}d ${Math.floor((secs % 86400) / 3600)}h)`;
  if (secs >= 3600) return ` (in ${Math.floor(secs / 3600)}h ${Math.floor((secs % 3600) / 60)}m)`;
  return ` (in ${Math.floor(secs / 60)}m ${secs % 60}s)`;
}

function sidecars(list) {
  const rows = list.map((s) => {
    const latest = s.acked_version === s.sent_version;
    return el("tr", { "data-service": s.service },
      el("td", {}, `${s.service}.${s.namespace}`),
      el("td", { class: "address" }, s.address || "(caller only)"),
      el("td", {}, s.labels.join(" ")),
      el("td", { class: latest ? "good" : "bad" }, `v${s.acked_version}` + (latest ? "" : ` of v${s.sent_version}`) + (s.nacks ? `, ${s.nacks} NACK` : "")),
      el("td", { class: s.cert_left_s !== null && s.cert_left_s < 600 ? "bad" : "" }, (s.cert_expires || (s.identity ? "none" : "no identity")) + left(s.cert_left_s)),
      num(pct(s.mtls)),
      el("td", { class: s.answering ? "" : "bad" }, (s.admin || "-") + (s.answering ? "" : " (not answering)")));
  });
  fill("sidecars", rows, "no sidecar connected", 7);
}

function nacks(list) {
  const rows = list.map((n) => el("tr", {}, el("td", {}, n.seen), el("td", {}, n.sidecar), num(`v${n.version}`), el("td", { class: "bad" }, n.reason)));
  fill("nacks", rows, "none", 4);
}

let refresh = 2000;

async function update() {
  const status = document.getElementById("status");
  try {
    const rsp = await fetch("/api/overview", { cache: "no-store" });
    const o = await rsp.json();
    if (o === null) {
      status.textContent = "waiting for the first sample…";
    } else {
      refresh = o.refresh_ms || refresh;
      if (o.error) {
        status.textContent = o.error;
        status.className = "error";
      } else {
        status.textContent = `config v${o.config_version} · updated ${o.updated}`;
        status.className = o.last_config_error ? "error" : "";
        document.getElementById("window").textContent = o.window_s ? `inbound, last ${o.window_s.toFixed(0)} s` : "";
        services(o.services);
        sidecars(o.sidecars);
        nacks(o.nacks);
      }
    }
  } catch (e) {
    status.textContent = `dashboard unreachable: ${e}`;
    status.className = "error";
  }
  setTimeout(update, refresh);
}

update();
