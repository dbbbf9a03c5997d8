"""The console's one page: HTML, CSS and vanilla JavaScript, no external assets.

Rules:

1. Everything the page shows comes from the snapshot stream (``/api/events``) and
   is put in the DOM with ``textContent`` and ``setAttribute``, never ``innerHTML``:
   an agent or entry name is data, not markup, wherever it came from.
2. The timeline and the key schedule are drawn (inline SVG built node by node);
   lists of agents, entries and SVIDs are tables, because a person reads those.
3. The page trusts itself only: the ``Content-Security-Policy`` allows exactly
   this script and this style (by their SHA-256), connections to its own origin,
   and nothing else: no frames, no forms, no other origin.
4. Between snapshots the page ages what it shows by the local clock (an SVID's
   "expires in" counts down), anchored to the CA's time in the last snapshot, so
   a browser whose clock is off still shows the CA's view.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = """
:root { --bg:#f4f5f7; --card:#fff; --ink:#1d2330; --mute:#687083; --line:#e1e4ea;
  --ok:#2e7d32; --warn:#ef8f00; --bad:#c62828; --rot:#1e6fd9; --key:#7b3fc4; --chg:#5f6b7a; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  background:var(--bg); color:var(--ink); }
header { display:flex; flex-wrap:wrap; align-items:center; gap:12px; padding:12px 20px;
  background:#16202e; color:#fff; }
header h1 { font-size:18px; margin:0 12px 0 0; font-weight:600; }
#live { display:inline-flex; align-items:center; gap:6px; font-size:13px; }
#live::before { content:""; width:10px; height:10px; border-radius:50%; background:#888; }
#live.on::before { background:#4caf50; } #live.off::before { background:var(--bad); }
.pill { background:#2a3850; border-radius:12px; padding:2px 10px; font-size:13px; }
.pill.bad { background:var(--bad); } .pill.warn { background:var(--warn); }
.pill.ok { background:var(--ok); }
main { display:grid; grid-template-columns:1fr 1fr; gap:16px; padding:16px 20px; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:12px 14px; min-width:0; }
section.wide { grid-column:1 / -1; }
h2 { font-size:15px; margin:0 0 8px; }
h2 small { color:var(--mute); font-weight:400; margin-left:6px; }
table { width:100%; border-collapse:collapse; font-size:13px; }
th { text-align:left; color:var(--mute); font-weight:500; border-bottom:1px solid var(--line);
  padding:4px 6px; }
td { padding:4px 6px; border-bottom:1px solid var(--line); vertical-align:top;
  overflow-wrap:anywhere; }
.mono { font-family:ui-monospace, "SFMono-Regular", Menlo, monospace; font-size:12px; }
.status { font-weight:600; }
tr.sev-ok .status { color:var(--ok); } tr.sev-warn .status { color:var(--warn); }
tr.sev-bad .status { color:var(--bad); } tr.sev-bad { background:#fdecec; }
tr.sev-warn { background:#fff6e5; }
.sel { display:inline-block; background:#eef1f6; border-radius:4px; padding:0 5px; margin:1px;
  font-family:ui-monospace, Menlo, monospace; font-size:12px; }
.bar { height:6px; background:var(--line); border-radius:3px; overflow:hidden; min-width:60px; }
.bar > i { display:block; height:100%; background:var(--ok); }
.sev-warn .bar > i { background:var(--warn); } .sev-bad .bar > i { background:var(--bad); }
svg { width:100%; display:block; }
svg text { font:11px system-ui, sans-serif; fill:var(--mute); }
svg .lane-label { fill:var(--ink); font-weight:600; }
svg .axis { stroke:var(--line); } svg .now { stroke:var(--ink); stroke-dasharray:3 3; }
svg .ev-rotation { fill:var(--rot); } svg .ev-failure { fill:var(--bad); }
svg .ev-key { fill:var(--key); } svg .ev-change { fill:var(--chg); }
svg .k-active { fill:var(--ok); } svg .k-prepared { fill:#a5d6a7; stroke:var(--ok);
  stroke-dasharray:4 2; } svg .k-retired { fill:#c5cad3; }
svg .mark { stroke:var(--key); stroke-dasharray:2 3; }
svg .mark-label { fill:var(--key); }
svg .bar-label { fill:#fff; font-weight:600; }
#pills { display:inline-flex; flex-wrap:wrap; gap:6px; }
.chain { font-size:16px; font-weight:600; } .chain.ok { color:var(--ok); }
.chain.bad { color:var(--bad); }
.empty { color:var(--mute); font-style:italic; }
.legend { display:flex; gap:14px; font-size:12px; color:var(--mute); margin-top:4px; }
.legend i { display:inline-block; width:10px; height:10px; border-radius:50%;
  margin-right:4px; vertical-align:-1px; }
.legend .l-rotation { background:var(--rot); } .legend .l-failure { background:var(--bad); }
.legend .l-key { background:var(--key); } .legend .l-change { background:var(--chg); }
"""

SCRIPT = r"""
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
let snap = null, receivedAt = 0;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
function nowCA() { return snap ? snap.now + (Date.now() / 1000 - receivedAt) : Date.now() / 1000; }
function span(seconds) {
  const s = Math.abs(seconds);
  if (s < 90) return s.toFixed(0) + "s";
  if (s < 5400) return (s / 60).toFixed(0) + "m";
  if (s < 172800) return (s / 3600).toFixed(1) + "h";
  return (s / 86400).toFixed(0) + "d";
}
function until(t, now) {
  if (t === null || t === undefined) return "-";
  return t >= now ? "in " + span(t - now) : span(now - t) + " ago";
}
function clock(t) { return new Date(t * 1000).toISOString().slice(11, 19); }
function day(t) { return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " "); }
function short(id) { return String(id || "").replace(/^spiffe:\/\/[^/]+/, ""); }

function row(tbody, cls, cells) {
  const tr = el("tr", cls ? { class: cls } : {});
  for (const c of cells) {
    const td = el("td", c.cls ? { class: c.cls } : {});
    if (c.node) td.appendChild(c.node); else td.textContent = String(c.text ?? "");
    if (c.title) td.setAttribute("title", c.title);
    tr.appendChild(td);
  }
  tbody.appendChild(tr);
  return tr;
}
function lifeBar(issued, expires, now) {
  const wrap = el("div", { class: "bar" });
  const i = el("i");
  const life = Math.max(1, expires - issued);
  i.style.width = Math.max(0, Math.min(100, 100 * (expires - now) / life)).toFixed(1) + "%";
  wrap.appendChild(i);
  return wrap;
}

function renderHeader(s) {
  document.getElementById("td").textContent = s.trust_domain;
  const pills = document.getElementById("pills");
  clear(pills);
  const sm = s.summary;
  const add = (text, cls) => pills.appendChild(el("span", { class: "pill " + (cls || "") }, text));
  add(sm.agents_ok + (sm.agents_ok === 1 ? " agent ok" : " agents ok"), "ok");
  if (sm.agents_warn) add(sm.agents_warn + " late", "warn");
  if (sm.agents_bad) add(sm.agents_bad + " failed", "bad");
  add(sm.entries + (sm.entries === 1 ? " entry" : " entries"));
  add(sm.svids_live + " live SVIDs");
  const a = s.audit;
  add(a.ok === false ? "audit chain BROKEN" : "audit chain " + a.records + " records",
      a.ok === false ? "bad" : "");
}

function renderAgents(s, now) {
  const tb = document.getElementById("agents");
  clear(tb);
  if (!s.agents.length) { row(tb, "", [{ text: "no agents yet", cls: "empty" }]); return; }
  for (const a of s.agents) {
    const tr = row(tb, "agent sev-" + a.severity, [
      { text: short(a.id), cls: "mono", title: a.id },
      { text: a.health, cls: "status" },
      { text: a.last_renewal ? until(a.last_renewal, now) : "-" },
      { text: until(a.expires, now) },
      { text: (a.serial || "").slice(0, 12), cls: "mono", title: a.serial || "" },
    ]);
    tr.setAttribute("data-agent", a.id);
    tr.setAttribute("data-health", a.health);
  }
  const more = s.summary.agents - s.agents.length;
  if (more > 0) row(tb, "", [{ text: "and " + more + " more", cls: "empty" }]);
}

function renderEntries(s, now) {
  const tb = document.getElementById("entries");
  clear(tb);
  if (!s.entries.length) { row(tb, "", [{ text: "no entries yet", cls: "empty" }]); return; }
  for (const e of s.entries) {
    const sels = el("div");
    for (const x of e.selectors) sels.appendChild(el("span", { class: "sel" }, x));
    const sev = e.svid_state === "expired" ? "bad" : e.svid_state === "late" ? "warn" : "ok";
    row(tb, "entry sev-" + sev, [
      { text: short(e.spiffe_id), cls: "mono", title: e.spiffe_id },
      { text: short(e.parent_id), cls: "mono", title: e.parent_id },
      { node: sels },
      { text: e.svid_expires ? until(e.svid_expires, now) : "no SVID", cls: "status" },
    ]);
  }
  const more = s.summary.entries - s.entries.length;
  if (more > 0) row(tb, "", [{ text: "and " + more + " more", cls: "empty" }]);
}

function renderExpiring(s, now) {
  const tb = document.getElementById("expiring");
  clear(tb);
  if (!s.expiring.length) { row(tb, "", [{ text: "no SVIDs yet", cls: "empty" }]); return; }
  for (const x of s.expiring) {
    const state = x.expires <= now ? "expired" : x.state;
    const sev = state === "expired" ? "bad" : state === "late" ? "warn" : "ok";
    const tr = row(tb, "svid sev-" + sev, [
      { text: short(x.spiffe_id), cls: "mono", title: x.spiffe_id },
      { text: x.kind },
      { text: until(x.expires, now), cls: "status" },
      { node: lifeBar(x.issued_at, x.expires, now) },
      { text: x.serial.slice(0, 12), cls: "mono", title: x.serial },
    ]);
    tr.setAttribute("data-serial", x.serial);
  }
}

const LANES = [["rotation", "SVIDs issued"], ["key", "CA keys"], ["change", "changes"],
               ["failure", "failures"]];

function renderTimeline(s, now) {
  const svg = document.getElementById("timeline");
  clear(svg);
  const W = 1000, left = 110, right = 16, laneH = 34, top = 8;
  const H = top + LANES.length * laneH + 24;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  // Zoomed to what there is: from the oldest event shown (at least a minute back) to now.
  const tl = s.timeline, t1 = now;
  const oldest = tl.events.length ? tl.events[0].t : t1;
  const t0 = Math.max(t1 - (tl.end - tl.start), Math.min(oldest - 5, t1 - 60));
  const x = (t) => left + (W - left - right) * (t - t0) / Math.max(1, t1 - t0);
  LANES.forEach(([name, label], i) => {
    const y = top + i * laneH + laneH / 2;
    svg.appendChild(sv("line", { class: "axis", x1: left, x2: W - right, y1: y, y2: y }));
    const count = tl.counts[name] || 0;
    svg.appendChild(sv("text", { class: "lane-label", x: 4, y: y + 4 }, label + " (" + count + ")"));
  });
  const axisY = top + LANES.length * laneH + 14;
  for (let k = 0; k <= 5; k++) {
    const t = t0 + (t1 - t0) * k / 5;
    svg.appendChild(sv("text", { x: x(t), y: axisY, "text-anchor": k === 5 ? "end" : "middle" },
                       k === 5 ? "now " + clock(t) : "-" + span(t1 - t)));
  }
  svg.appendChild(sv("line", { class: "now", x1: x(t1), x2: x(t1), y1: top, y2: axisY - 10 }));
  const lanes = Object.fromEntries(LANES.map(([n], i) => [n, i]));
  for (const e of tl.events) {
    if (e.t < t0) continue;
    const i = lanes[e.lane] ?? 2;
    const y = top + i * laneH + laneH / 2;
    const c = sv("circle", { class: "ev ev-" + e.lane, cx: x(e.t).toFixed(1), cy: y,
                             r: e.lane === "failure" ? 6 : 4.5, "fill-opacity": 0.8 });
    c.setAttribute("data-event", e.event);
    if (e.serial) c.setAttribute("data-serial", e.serial);
    const d = e.detail || {};
    const extra = Object.entries(d).map(([k, v]) => k + "=" + v).join(" ");
    c.appendChild(sv("title", {}, clock(e.t) + " " + e.event + " " + (e.spiffe_id || "") +
                     (e.serial ? " serial " + e.serial : "") + (extra ? " " + extra : "")));
    svg.appendChild(c);
  }
}

function renderKeys(s, now) {
  const svg = document.getElementById("keys");
  clear(svg);
  const W = 1000, left = 150, right = 16, barH = 16, gap = 8;
  const groups = [["root", "roots"], ["intermediate", "intermediates"], ["jwt", "JWT keys"]]
    .filter(([k]) => (s.keys.groups[k] || []).length);
  let y = 6;
  const parts = [];
  for (const [kind, title] of groups) {
    const keys = s.keys.groups[kind];
    const marks = s.keys.marks.filter((m) => keys.some((k) => k.id === m.key));
    let t0 = Math.min(...keys.map((k) => k.not_before)), t1 = Math.max(...keys.map((k) => k.not_after));
    t0 = Math.min(t0, now); t1 = Math.max(t1, now);
    const x = (t) => left + (W - left - right) * (t - t0) / Math.max(1, t1 - t0);
    parts.push(sv("text", { class: "lane-label", x: 4, y: y + 12 }, title));
    y += 18;
    const y0 = y;
    for (const k of keys) {
      const label = k.id + (k.upstream ? " (upstream)" : "");
      parts.push(sv("text", { x: 4, y: y + 12 }, label));
      const r = sv("rect", { class: "key k-" + k.state, x: x(k.not_before).toFixed(1), y: y,
                             width: Math.max(2, x(k.not_after) - x(k.not_before)).toFixed(1),
                             height: barH, rx: 3 });
      r.setAttribute("data-key", k.id);
      r.setAttribute("data-state", k.state);
      r.appendChild(sv("title", {}, k.kind + " " + k.id + " " + k.state + " " + day(k.not_before) +
                      " to " + day(k.not_after) + " UTC, sha256 " + k.fingerprint.slice(0, 16)));
      parts.push(r);
      const mid = Math.max(x(k.not_before) + 4, Math.min(x(k.not_after) - 60, x(now) + 6));
      parts.push(sv("text", { class: "bar-label", x: mid, y: y + 12 }, k.state));
      y += barH + gap;
    }
    for (const m of marks) {
      parts.push(sv("line", { class: "mark", x1: x(m.t), x2: x(m.t), y1: y0 - 4, y2: y - gap + 2 }));
      parts.push(sv("text", { class: "mark-label", x: x(m.t) + 3, y: y + 6 }, m.label + " " + until(m.t, now)));
    }
    parts.push(sv("line", { class: "now", x1: x(now), x2: x(now), y1: y0 - 4, y2: y - gap + 2 }));
    parts.push(sv("text", { x: x(t0), y: y + 20 }, day(t0)));
    parts.push(sv("text", { x: x(t1), y: y + 20, "text-anchor": "end" }, day(t1)));
    y += 34;
  }
  svg.setAttribute("viewBox", "0 0 " + W + " " + Math.max(40, y));
  for (const p of parts) svg.appendChild(p);
}

function renderAudit(s) {
  const a = s.audit, box = document.getElementById("audit");
  clear(box);
  const ok = a.ok !== false;
  box.appendChild(el("div", { class: "chain " + (ok ? "ok" : "bad"), id: "chain-state" },
    a.ok === null ? "not checked yet" : ok ? "chain unbroken" : "chain BROKEN"));
  box.appendChild(el("div", {}, a.records + " records, head #" + (a.head_seq ?? "-") +
    " " + (a.head_hash || "")));
  if (a.problem) box.appendChild(el("div", { class: "status" }, a.problem));
  if (a.checked_at) box.appendChild(el("div", { class: "empty" }, "checked " + until(a.checked_at, nowCA())));
}

function render() {
  if (!snap) return;
  const now = nowCA();
  renderHeader(snap);
  renderTimeline(snap, now);
  renderKeys(snap, now);
  renderAgents(snap, now);
  renderExpiring(snap, now);
  renderEntries(snap, now);
  renderAudit(snap);
  document.getElementById("updated").textContent = "CA time " + clock(now) + " UTC";
}

function setLive(on) {
  const live = document.getElementById("live");
  live.className = on ? "on" : "off";
  live.textContent = on ? "live" : "reconnecting";
}

const events = new EventSource("/api/events");
events.addEventListener("snapshot", (ev) => {
  snap = JSON.parse(ev.data);
  receivedAt = Date.now() / 1000;
  setLive(true);
  render();
});
events.addEventListener("open", () => setLive(true));
events.addEventListener("error", () => setLive(false));
setInterval(render, 1000);
"""

BODY = """<header>
<h1>Tally <span id="td"></span></h1>
<span id="live">connecting</span>
<span id="pills"></span>
<span id="updated" class="pill"></span>
</header>
<main>
<section class="wide"><h2>Timeline<small>rotations and failures, last minutes</small></h2>
<svg id="timeline" role="img" aria-label="timeline of rotations and failures"></svg>
<div class="legend"><span><i class="l-rotation"></i>SVID issued or renewed</span>
<span><i class="l-key"></i>CA key step</span><span><i class="l-change"></i>entry, token, agent</span>
<span><i class="l-failure"></i>failure or expiry</span></div></section>
<section class="wide"><h2>Key schedule<small>prepared, active, retired</small></h2>
<svg id="keys" role="img" aria-label="the CA's key schedule"></svg></section>
<section><h2>Agents</h2><table><thead><tr><th>agent</th><th>status</th>
<th>last renewal</th><th>SVID expires</th><th>serial</th></tr></thead>
<tbody id="agents"></tbody></table></section>
<section><h2>Expiring soonest<small>newest SVID of each identity</small></h2><table><thead>
<tr><th>identity</th><th>kind</th><th>expires</th><th>life left</th><th>serial</th></tr></thead>
<tbody id="expiring"></tbody></table></section>
<section><h2>Entries<small>what each selects</small></h2><table><thead><tr><th>SPIFFE ID</th>
<th>parent</th><th>selectors</th><th>SVID</th></tr></thead><tbody id="entries"></tbody></table>
</section>
<section><h2>Audit chain</h2><div id="audit"></div></section>
</main>"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = (
    "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
    "<meta name=viewport content='width=device-width, initial-scale=1'>"
    f"<title>Tally console</title><style>{STYLE}</style></head>\n<body>\n{BODY}\n"
    f"<script>{SCRIPT}</script>\n</body></html>\n"
).encode()

CSP = (
    "default-src 'none'; "
    f"script-src {_sha256(SCRIPT)}; "
    f"style-src {_sha256(STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
